"""The original scripts' 3 mm processing, kept as the oracle for tests and ``make bench``.

Loads the whole session in memory (10.8 GB int16 for a real NSD session, more as float): never use it
on real data. :mod:`nsdprep.stages.resample` computes the same numbers volume by volume.
"""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np


def original_3mm(img: nib.Nifti1Image) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """Return ``(masked, unmasked)`` 3 mm images exactly as the original processing made them.

    ``nilearn.image.resample_img`` to ``diag(3, 3, 3)`` (continuous interpolation), then nilearn's
    MNI152 grey-matter mask resampled (nearest) to that image, and a ``NiftiMasker`` round trip
    (zero outside grey matter). ``force_resample``/``copy_header`` reproduce the original behaviour
    without nilearn 0.14's deprecation warnings.
    """
    from nilearn.datasets import load_mni152_gm_mask
    from nilearn.image import resample_img, resample_to_img
    from nilearn.maskers import NiftiMasker

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Casting data from int16 to float32")
        img3 = resample_img(
            img,
            target_affine=np.diag((3, 3, 3)),
            interpolation="continuous",
            force_resample=True,
            copy_header=True,
        )
    gm = resample_to_img(
        load_mni152_gm_mask(), img3, interpolation="nearest", force_resample=True, copy_header=True
    )
    masker = NiftiMasker(mask_img=gm, standardize=None).fit()  # None: no standardizing (default)
    return masker.inverse_transform(masker.transform(img3)), img3
