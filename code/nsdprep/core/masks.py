"""Brain masks on a given grid: nilearn's MNI152 grey-matter mask and NSD's ROIs, nearest-neighbour.

The 3 mm stage zeroes every voxel outside this mask; the curated matrix keeps exactly its voxels. Both
compute it from the grid (shape and affine) alone, with the same call, so they agree.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np


def gm_mask(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """MNI152 grey-matter mask (nilearn's, threshold 0.2) on the grid ``shape``/``affine``.

    As in the original processing: ``resample_to_img(load_mni152_gm_mask(), img, "nearest")``.
    Cached per grid within a process; the returned array is read-only.
    """
    shape = tuple(int(s) for s in shape[:3])
    affine = np.asarray(affine, dtype=np.float64)
    return _gm_mask_cached(shape, affine.tobytes())  # type: ignore[arg-type]


@functools.lru_cache(maxsize=4)
def _gm_mask_cached(shape: tuple[int, int, int], affine_bytes: bytes) -> np.ndarray:
    import nibabel as nib
    from nilearn.datasets import load_mni152_gm_mask
    from nilearn.image import resample_to_img

    affine = np.frombuffer(affine_bytes, dtype=np.float64).reshape(4, 4)
    target = nib.Nifti1Image(np.zeros(shape, np.int8), affine)
    mask = resample_to_img(
        load_mni152_gm_mask(),
        target,
        interpolation="nearest",
        force_resample=True,
        copy_header=True,
    )
    out = np.asarray(mask.dataobj) != 0
    out.flags.writeable = False
    return out


def roi_on_grid(
    path: str | os.PathLike[str], shape: tuple[int, int, int], affine: np.ndarray
) -> np.ndarray:
    """The voxels of an NSD ROI volume on the grid ``shape``/``affine``, nearest neighbour.

    NSD's ROI files hold -1 outside the brain, 0 where the voxel is not in the ROI and a positive
    number (the label, for a multi-label atlas) where it is. The values are resampled first
    (nearest neighbour, as the grey-matter mask is; 0 beyond the file's field of view) and a voxel
    is in the ROI when its value is positive. Values other than -1, 0 and positive whole numbers
    are refused: they would mean another convention.
    """
    from nsdprep.core import nifti
    from nsdprep.core.errors import FormatError
    from nsdprep.core.grid import nearest_on_grid

    path = Path(path)
    hdr = nifti.read_header(path)
    if nifti.volume_count(hdr) != 1:
        raise FormatError(f"{path}: expected a 3D ROI volume, found shape {hdr.get_data_shape()}")
    (vol,) = nifti.iter_volumes(path, header=hdr)  # exhausted: the gzip CRC is checked
    finite = np.isfinite(vol)
    odd = ~finite | (vol < -1) | (vol != np.round(vol))
    if np.any(odd):
        bad = np.unique(np.asarray(vol)[odd])[:5].tolist()
        raise FormatError(
            f"{path}: values {bad} are not NSD's ROI convention (-1 outside the brain, 0 not in "
            "the ROI, positive whole numbers in it)"
        )
    if not np.any(vol > 0):
        raise FormatError(f"{path}: no voxel is in the ROI (no positive value)")
    on_grid = nearest_on_grid(np.asarray(vol), nifti.header_affine(hdr), shape, affine)
    return np.asarray(on_grid > 0)
