"""Grid arithmetic of the 3 mm stage: nilearn's target grid for a 3 mm ``target_affine``, the voxel map.

Computed from the input grid only (shape and affine, never the data). When the target grid samples the
source grid exactly (NSD's 1 mm MNI grid in either x orientation) the map is a strided pick.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Target voxel axes (mm) of the original processing: ``target_affine=np.diag((3, 3, 3))``.
TARGET_AXES = np.diag((3.0, 3.0, 3.0))
#: How far (in source voxels) a target voxel centre may be from a source voxel centre and still
#: count as sampling it exactly. The spline error this allows is far below int16 rounding.
GRID_TOL = 1e-6
#: nilearn's spline order for ``interpolation="continuous"``.
SPLINE_ORDER = 3


@dataclass(frozen=True)
class GridMap:
    """Target grid and voxel map of one resample, computed from the input grid only.

    ``matrix``/``offset`` map target voxel indices to source voxel indices (nilearn's ``A``, ``b``);
    ``slices`` is set on the fast path: ``out[target] = vol[source]`` (tuples of slices).
    """

    in_shape: tuple[int, int, int]
    in_affine: np.ndarray
    shape: tuple[int, int, int]
    affine: np.ndarray
    matrix: np.ndarray
    offset: np.ndarray
    target_slices: tuple[slice, slice, slice] | None
    source_slices: tuple[slice, slice, slice] | None

    @property
    def fast(self) -> bool:
        """True when the target grid samples the source grid exactly (strided subsample)."""
        return self.target_slices is not None


def grid_map(
    in_shape: Sequence[int],
    in_affine: np.ndarray,
    target_axes: np.ndarray = TARGET_AXES,
    tol: float = GRID_TOL,
) -> GridMap:
    """Reproduce nilearn's target grid for a 3x3 ``target_affine`` and derive the voxel map.

    Same arithmetic as ``nilearn.image.resample_img`` (0.14.1): the bounding box of the input's
    corners in target voxel units gives the offset (``axes @ mins``) and the shape
    (``ceil(max - min) + 1``); ``A, b`` = ``inv(in_affine) @ target_affine``.
    """
    from nilearn.image.resampling import get_bounds
    from scipy import linalg

    in_shape = tuple(int(s) for s in in_shape[:3])
    affine = np.asarray(in_affine, dtype=np.float64)
    target = np.eye(4)
    target[:3, :3] = np.asarray(target_axes, dtype=np.float64)
    transform = np.linalg.inv(target).dot(affine)
    (xmin, xmax), (ymin, ymax), (zmin, zmax) = get_bounds(in_shape, transform)
    target[:3, 3] = target[:3, :3].dot([xmin, ymin, zmin])
    xmax, ymax, zmax = xmax - xmin, ymax - ymin, zmax - zmin
    shape = (int(np.ceil(xmax)) + 1, int(np.ceil(ymax)) + 1, int(np.ceil(zmax)) + 1)
    if np.all(target == affine):
        vox = np.eye(4)
    else:
        vox = np.dot(linalg.inv(affine), target)
    matrix, offset = vox[:3, :3].copy(), vox[:3, 3].copy()
    tslices, sslices = strided_map(in_shape, shape, matrix, offset, tol)
    return GridMap(
        in_shape=in_shape,
        in_affine=affine,
        shape=shape,
        affine=target,
        matrix=matrix,
        offset=offset,
        target_slices=tslices,
        source_slices=sslices,
    )


def nearest_on_grid(
    vol: np.ndarray, src_affine: np.ndarray, shape: Sequence[int], affine: np.ndarray
) -> np.ndarray:
    """Nearest-neighbour resample of a 3D volume onto the grid ``shape``/``affine`` (0 outside).

    The way the grey-matter mask goes to 3 mm (nilearn's ``resample_to_img``, nearest), with a
    shortcut: when target voxels land exactly on source voxels (the 3 mm grid of a 1 mm MNI
    file), it is a strided pick, which is what nilearn computes there too.
    """
    shape3 = tuple(int(s) for s in shape[:3])
    src_affine = np.asarray(src_affine, dtype=np.float64)
    affine = np.asarray(affine, dtype=np.float64)
    vox = np.linalg.inv(src_affine) @ affine
    tsl, ssl = strided_map(tuple(vol.shape[:3]), shape3, vox[:3, :3], vox[:3, 3], GRID_TOL)
    if tsl is not None and ssl is not None:
        out = np.zeros(shape3, dtype=vol.dtype)
        out[tsl] = vol[ssl]
        return out
    import nibabel as nib
    from nilearn.image import resample_to_img

    data = vol.astype(np.uint8) if vol.dtype == bool else vol
    img = resample_to_img(
        nib.Nifti1Image(data, src_affine),
        nib.Nifti1Image(np.zeros(shape3, np.int8), affine),
        interpolation="nearest",
        force_resample=True,
        copy_header=True,
    )
    return np.asarray(img.dataobj).astype(vol.dtype)


def strided_map(
    in_shape: tuple[int, int, int],
    out_shape: tuple[int, int, int],
    matrix: np.ndarray,
    offset: np.ndarray,
    tol: float,
) -> tuple[tuple[slice, slice, slice] | None, tuple[slice, slice, slice] | None]:
    """Slices with ``out[t] = vol[s]`` if target voxels land exactly on source voxels, else None."""
    if not np.allclose(matrix, np.diag(np.diag(matrix)), rtol=0, atol=tol):
        return None, None
    tsl, ssl = [], []
    for axis in range(3):
        step_f, off_f = matrix[axis, axis], offset[axis]
        step, off = int(round(step_f)), int(round(off_f))
        if step == 0 or abs(step_f - step) > tol or abs(off_f - off) > tol:
            return None, None
        n_in, n_out = in_shape[axis], out_shape[axis]
        src = off + step * np.arange(n_out)
        inside = np.flatnonzero((src >= 0) & (src <= n_in - 1))
        if inside.size == 0:  # no overlap on this axis: output all zeros
            tsl.append(slice(0, 0))
            ssl.append(slice(0, 0))
            continue
        t0, t1 = int(inside[0]), int(inside[-1]) + 1
        s0, s_last = int(src[t0]), int(src[t1 - 1])
        stop = s_last + (1 if step > 0 else -1)
        tsl.append(slice(t0, t1))
        ssl.append(slice(s0, None if stop < 0 else stop, step))
    return (tsl[0], tsl[1], tsl[2]), (ssl[0], ssl[1], ssl[2])
