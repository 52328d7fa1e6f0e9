"""Brain masks on a given grid: nilearn's MNI152 grey-matter mask, resampled nearest-neighbour.

The 3 mm stage zeroes every voxel outside this mask; the curated matrix keeps exactly its voxels. Both
compute it from the grid (shape and affine) alone, with the same call, so they agree.
"""

from __future__ import annotations

import functools

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
