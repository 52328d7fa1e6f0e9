"""Valid-voxel masks: ``valid_sessionNN.nii.gz`` on the 3 mm grid, ``curate --valid``, decode's mask.

The synthetic bucket is registered in a plain git repository (curate reads the registry), resampled
with the 3 mm stage, and curated with and without ``--valid``. Expectations come from nilearn
(``resample_to_img``, nearest) and nibabel, not from the code under test.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import RUNS_PER_SESSION, TRIALS_PER_RUN
from nsdprep.core import inventory, nsd
from nsdprep.core.errors import MissingInputError
from nsdprep.core.nsd import Layout
from nsdprep.stages import curate
from nsdprep.stages import labels as coco
from nsdprep.stages.decode.data import load_masked
from nsdprep.stages.resample import resample_subject

LAYOUT = Layout(RUNS_PER_SESSION, TRIALS_PER_RUN)


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def built(synth_root: Path, git_env, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("valid")
    nsd_ds = root / "nsd"
    shutil.copytree(synth_root / "nsd", nsd_ds)
    _git(root, "init", "-q", str(nsd_ds))
    _git(nsd_ds, "add", "-A")
    _git(nsd_ds, "commit", "-q", "-m", "register")
    labels = root / "labels.pkl"
    coco.build(
        synth_root / "coco/annotations" / nsd.COCO_ZIP_NAME, nsd_ds / nsd.STIM_INFO_KEY,
        root / "merged.json", labels,
    )  # fmt: skip
    resampled = root / "3mm"
    for s in inventory.registered_subjects(nsd_ds):
        resample_subject(nsd_ds, s, resampled / nsd.subject_label(s), jobs=1, progress=False)
    outs = {}
    for valid in (False, True):
        outs[valid] = root / ("valid" if valid else "default")
        sel = curate.curate(
            nsd_ds, resampled, labels, outs[valid], layout=LAYOUT, valid=valid, command="test"
        )
    return {"nsd": nsd_ds, "resampled": resampled, "labels": labels, "out": outs, "sel": sel}


def _expected_mask(built: dict, subject: int) -> tuple[np.ndarray, np.ndarray]:
    """(grey matter, grey matter valid in every session used), with nilearn."""
    from nilearn.datasets import load_mni152_gm_mask
    from nilearn.image import resample_to_img

    ref = nib.load(built["resampled"] / nsd.subject_label(subject) / "betas_session01.nii.gz")
    target = nib.Nifti1Image(np.zeros(ref.shape[:3], np.int8), ref.affine)
    kw = {"interpolation": "nearest", "force_resample": True, "copy_header": True}
    gm = np.asarray(resample_to_img(load_mni152_gm_mask(), target, **kw).dataobj) != 0
    valid = np.ones(ref.shape[:3], dtype=bool)
    for ses in range(1, built["sel"].n_sessions + 1):
        one = nib.load(built["nsd"] / nsd.valid_key(subject, ses))
        valid &= np.asarray(resample_to_img(one, target, **kw).dataobj) != 0
    return gm, gm & valid


def test_mask_equals_nilearn_and_data_are_zero_outside(built: dict) -> None:
    for s in sorted(built["sel"].trials):
        gm, want = _expected_mask(built, s)
        mask_file = nsd.curated_mask_path(s, built["out"][True])
        mask_img = nib.load(mask_file)
        mask = np.asarray(mask_img.dataobj)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        np.testing.assert_array_equal(mask != 0, want)
        assert 0 < want.sum() < gm.sum()  # some grey matter is invalid in some session
        assert int(mask_img.header["sform_code"]) == 4
        files = {v: nsd.curated_files(s, built["out"][v]) for v in (False, True)}
        plain = np.asarray(nib.load(files[False].betas).dataobj)
        kept = np.asarray(nib.load(files[True].betas).dataobj)
        assert not kept[~want].any()
        np.testing.assert_array_equal(kept[want], plain[want])
        assert plain[gm & ~want].any()  # what VALID removes: zeros that look like data
        for name in ("labels", "runs", "trials"):
            a, b = getattr(files[False], name), getattr(files[True], name)
            assert a.read_bytes() == b.read_bytes(), name
        # without VALID the mask of the matrix columns is the grey-matter mask
        plain_mask = np.asarray(nib.load(nsd.curated_mask_path(s, built["out"][False])).dataobj)
        np.testing.assert_array_equal(plain_mask != 0, gm)


def test_readme_reports_invalid_fractions(built: dict) -> None:
    for valid in (False, True):
        desc = json.loads((built["out"][valid] / "dataset_description.json").read_text())
        readme = (built["out"][valid] / "README.md").read_text()
        assert desc["ValidVoxels"]["Applied"] is valid
        assert "## Valid voxels" in readme
        for s in sorted(built["sel"].trials):
            gm, want = _expected_mask(built, s)
            got = desc["ValidVoxels"]["PerSubject"][nsd.bids_subject_label(s)]
            assert got["GreyMatterVoxels"] == int(gm.sum())
            assert got["InvalidInAnySession"] == int((gm & ~want).sum())
            assert got["FractionInvalid"] == round((gm & ~want).sum() / gm.sum(), 6)
            assert got["VoxelsKept"] == (int(want.sum()) if valid else None)
            assert f"| {got['FractionInvalid']:.4f} |" in readme
    assert "voxels: grey matter valid in every session" in json.dumps(desc["Selection"])


def test_decode_uses_the_mask_when_present(built: dict) -> None:
    s = 1
    trials = np.arange(5)
    for valid in (False, True):
        files = nsd.curated_files(s, built["out"][valid])
        X, mask, _ = load_masked(files, trials)
        data = np.asarray(nib.load(files.betas).dataobj)
        written = np.asarray(nib.load(files.mask).dataobj) != 0
        want = written & np.any(data[..., trials] != 0, axis=3)
        np.testing.assert_array_equal(mask, want)
        np.testing.assert_array_equal(X, data[..., trials][want].T.astype(np.float32))


def test_missing_valid_mask(built: dict, tmp_path: Path) -> None:
    nsd_ds = tmp_path / "nsd"
    shutil.copytree(built["nsd"], nsd_ds, symlinks=True)
    _git(nsd_ds, "rm", "-q", nsd.valid_key(2, 1))
    _git(nsd_ds, "commit", "-q", "-m", "no mask")
    args = (nsd_ds, built["resampled"], built["labels"])
    with pytest.raises(MissingInputError, match="valid_session01.nii.gz"):
        curate.curate(*args, tmp_path / "v", subjects=[2], layout=LAYOUT, valid=True)
    curate.curate(*args, tmp_path / "d", subjects=[2], layout=LAYOUT)
    readme = (tmp_path / "d" / "README.md").read_text()
    assert "| sub-02 | " in readme and "n/a (no mask for session(s) 1)" in readme
