"""3 mm stage: equality with the nilearn oracle on both paths and orientations, CLI, failures."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from nsdprep.core import nsd as nsdp
from nsdprep.core._io import remove_stale_parts
from nsdprep.core.errors import FormatError, MissingInputError
from nsdprep.core.nifti import NiftiStreamWriter
from nsdprep.stages.resample import grid_map, resample_session, resample_subject

SHAPE = (23, 27, 21)  # unequal sizes: axis mix-ups fail


def _affine(sizes=(-1.0, 1.0, 1.0), origin=(22.0, -90.0, 0.0)) -> np.ndarray:
    """Grid over occipital cortex (has grey matter); x flipped when sizes[0] < 0."""
    aff = np.diag(list(sizes) + [1.0])
    aff[:3, 3] = origin
    return aff


#: name -> (affine, expected path)
GRIDS = {
    "nsd_flipped_x": (_affine(), True),
    "non_flipped": (_affine((1.0, 1.0, 1.0), (-10.0, -90.0, 0.0)), True),
    "shifted_half_mm": (_affine((-1.0, 1.0, 1.0), (22.5, -89.5, 0.5)), True),
    "voxel_1p1mm": (_affine((-1.1, 1.1, 1.1), (22.0, -90.0, 0.0)), False),
    "voxel_2mm_flipped": (_affine((-2.0, 2.0, 2.0), (22.0, -95.0, 0.0)), False),
}


def _betas(path: Path, affine: np.ndarray, n: int = 3, seed: int = 0, shape=SHAPE) -> np.ndarray:
    """Write smooth-ish int16 betas (x300 scale) with nibabel (MNI codes), return the data."""
    rng = np.random.default_rng(seed)
    data = rng.normal(0, 300, size=shape + (n,)).round().astype(np.int16)
    data[0] = 0  # a zero slab like NSD's masked-out voxels
    img = nib.Nifti1Image(data, affine)
    img.header.set_sform(affine, code=4)
    img.header.set_qform(affine, code=4)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.to_filename(path)
    return data


def nilearn_reference(path: Path, unmasked: bool = False):
    """The original processing (the oracle), see :mod:`nsdprep.testing.reference`."""
    from nsdprep.testing.reference import original_3mm

    out, img3 = original_3mm(nib.load(path))
    return (out, img3) if unmasked else out


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_matches_nilearn_oracle(tmp_path: Path, grid: str) -> None:
    affine, fast = GRIDS[grid]
    src = tmp_path / "betas_session01.nii.gz"
    _betas(src, affine)
    ref, img3 = nilearn_reference(src, unmasked=True)
    ref_data = np.asarray(ref.dataobj)
    assert ref_data.dtype == np.float32

    dst = tmp_path / "out" / "betas_session01.nii.gz"
    result = resample_session(src, dst)
    assert result.fast is fast and result.n_volumes == 3
    ours = nib.load(dst)
    assert ours.shape == ref.shape
    # header affines are float32: equal up to that storage precision
    np.testing.assert_allclose(ours.affine, ref.affine, rtol=0, atol=1e-5)
    assert int(ours.header["sform_code"]) == 4 and int(ours.header["qform_code"]) == 4
    got = np.asarray(ours.dataobj)
    # the mask is exercised: data survives inside grey matter and is zeroed outside it
    big = np.abs(np.asarray(img3.dataobj)) >= 1
    assert (big & (ref_data != 0)).any() and (big & (ref_data == 0)).any()
    if fast:
        assert got.dtype == np.int16
        # nilearn's float32 values are the int16 samples up to spline round-off: round, never truncate
        assert np.abs(ref_data - np.rint(ref_data)).max() < 1e-3
        np.testing.assert_array_equal(got, np.rint(ref_data).astype(np.int16))
        assert np.abs(got - ref_data.astype(np.float64)).max() < 1e-3
    else:
        assert got.dtype == np.float32
        assert np.abs(got - ref_data).max() == 0


def test_nsd_geometry_plan() -> None:
    nsd_affine = np.array([[-1.0, 0, 0, 90], [0, 1, 0, -126], [0, 0, 1, -72], [0, 0, 0, 1]])
    plan = grid_map((182, 218, 182), nsd_affine)
    assert plan.shape == (62, 74, 62)
    expected = np.diag([3.0, 3.0, 3.0, 1.0])
    expected[:3, 3] = (-91, -126, -72)
    np.testing.assert_allclose(plan.affine, expected)
    assert plan.fast
    # i = 181 - 3 I (x flipped, last target slab I=61 lands at -2: outside, stays 0), j = 3 J, k = 3 K
    vol = np.arange(182 * 218 * 182, dtype=np.int32).reshape((182, 218, 182), order="F")
    sub = np.zeros(plan.shape, np.int32)
    sub[plan.target_slices] = vol[plan.source_slices]
    assert sub[0, 0, 0] == vol[181, 0, 0] and sub[60, 72, 60] == vol[1, 216, 180]
    assert not sub[61].any()


def test_wrong_dtype_and_grid_rejected_before_work(tmp_path: Path) -> None:
    src = tmp_path / "f.nii.gz"
    nib.Nifti1Image(np.zeros(SHAPE + (2,), np.float32), _affine()).to_filename(src)
    with pytest.raises(FormatError, match=r"f\.nii\.gz: expected data type int16, found float32"):
        resample_session(src, tmp_path / "o.nii.gz")
    src3 = tmp_path / "three.nii.gz"
    nib.Nifti1Image(np.zeros(SHAPE, np.int16), _affine()).to_filename(src3)
    with pytest.raises(FormatError, match=r"three\.nii\.gz: expected a 4D image"):
        resample_session(src3, tmp_path / "o.nii.gz")
    # a singular sform (nibabel refuses to write one): patch srow_z in a valid file
    good = tmp_path / "good.nii.gz"
    nib.Nifti1Image(np.zeros(SHAPE + (2,), np.int16), _affine()).to_filename(good)
    raw = bytearray(gzip.decompress(good.read_bytes()))
    raw[312:328] = np.zeros(4, "<f4").tobytes()  # srow_z
    singular = tmp_path / "singular.nii.gz"
    singular.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(FormatError, match=r"singular\.nii\.gz: affine is not finite/invertible"):
        resample_session(singular, tmp_path / "o.nii.gz")
    assert not (tmp_path / "o.nii.gz").exists()


def test_truncated_input_leaves_no_output(tmp_path: Path) -> None:
    src = tmp_path / "full.nii.gz"
    rng = np.random.default_rng(1)
    shape = (48, 48, 40)  # incompressible volumes larger than the decoder's read-ahead
    with NiftiStreamWriter(src, shape, _affine(), np.int16, 5, compresslevel=1) as w:
        for _ in range(5):
            w.write(rng.integers(-30000, 30000, size=shape, dtype=np.int16))
    cut = tmp_path / "betas_cut.nii.gz"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size * 2 // 3])
    dst = tmp_path / "out" / "betas_cut.nii.gz"
    with pytest.raises(FormatError, match=r"betas_cut\.nii\.gz: gzip stream truncated .* volume"):
        resample_session(cut, dst)
    assert not dst.exists() and not list(dst.parent.iterdir())


# ---------------------------------------------------------------- CLI on a tiny git dataset


def _fake_nsd(root: Path, sessions=(1, 2, 10), n: int = 2) -> Path:
    nsd = root / "inputs" / "nsd"
    for s in sessions:
        _betas(nsd / nsdp.betas_key(1, s), _affine(), n=n, seed=s)
    subprocess.run(["git", "init", "-q", str(nsd)], check=True)
    subprocess.run(["git", "-C", str(nsd), "add", "."], check=True)
    return nsd


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nsdprep", "resample", *args, "--no-progress"],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "PYTHONPATH": str(Path(nsdp.__file__).parents[2])},
    )


def test_cli_processes_registered_sessions(tmp_path: Path, git_env: dict[str, str]) -> None:
    nsd = _fake_nsd(tmp_path)
    out = tmp_path / "derivatives" / "3mm" / "subj01"
    out.mkdir(parents=True)
    stale = out / ".betas_session01.nii.gz.abc123.part"
    stale.write_bytes(b"half")
    # a registered session whose file is not committed is still registered (tracked in the index)
    proc = _cli("--nsd", str(nsd), "--subject", "1", "--out", str(out), "--jobs", "2")
    assert proc.returncode == 0, proc.stderr
    assert "3 sessions, 6 volumes" in proc.stdout
    assert not stale.exists()
    names = sorted(p.name for p in out.iterdir())
    assert names == ["betas_session01.nii.gz", "betas_session02.nii.gz", "betas_session10.nii.gz"]
    ref = np.rint(np.asarray(nilearn_reference(nsd / nsdp.betas_key(1, 10)).dataobj))
    np.testing.assert_array_equal(np.asarray(nib.load(out / "betas_session10.nii.gz").dataobj), ref)
    # each output is what the (oracle-tested) in-process function writes, byte for byte
    for s in (1, 2):
        again = tmp_path / "again" / f"betas_session{s:02d}.nii.gz"
        resample_session(nsd / nsdp.betas_key(1, s), again)
        assert again.read_bytes() == (out / again.name).read_bytes()


def test_cli_missing_content_and_broken_session(tmp_path: Path, git_env: dict[str, str]) -> None:
    nsd = _fake_nsd(tmp_path, sessions=(1, 2, 3))
    out = tmp_path / "out"
    # registered but absent content (like an annexed file not fetched): clear message, nothing done
    absent = nsd / nsdp.betas_key(1, 3)
    absent.unlink()
    absent.symlink_to("../../../../../.git/annex/objects/xx/yy/SHA256E-s1--0.nii.gz")
    proc = _cli("--nsd", str(nsd), "--subject", "1", "--out", str(out))
    assert proc.returncode == 2
    assert "betas_session03.nii.gz" in proc.stderr and "datalad get" in proc.stderr
    assert "make get SUBJECTS=01" in proc.stderr
    assert not list(out.glob("*.nii.gz"))

    # a corrupted session: error names it, no output for it, other sessions' outputs kept
    good = nsd / nsdp.betas_key(1, 1)
    bad = nsd / nsdp.betas_key(1, 2)
    raw = bytearray(bad.read_bytes())
    raw[-8] ^= 0xFF  # CRC
    bad.write_bytes(bytes(raw))
    shutil.copy(good, tmp_path / "keep.nii.gz")
    proc = _cli(
        "--nsd",
        str(nsd),
        "--subject",
        "1",
        "--out",
        str(out),
        "--sessions",
        "1",
        "2",
        "--jobs",
        "1",
    )
    assert proc.returncode == 2
    assert "betas_session02.nii.gz" in proc.stderr and "CRC" in proc.stderr
    assert (out / "betas_session01.nii.gz").exists()
    assert not (out / "betas_session02.nii.gz").exists()
    assert not list(out.glob("*.part"))


def test_resample_subject_unknown_session(tmp_path: Path, git_env: dict[str, str]) -> None:
    nsd = _fake_nsd(tmp_path, sessions=(1,), n=1)
    with pytest.raises(MissingInputError, match=r"session\(s\) \[4\] of subj01 not registered"):
        resample_subject(nsd, 1, tmp_path / "o", sessions=[4], progress=False)


def test_remove_stale_parts(tmp_path: Path) -> None:
    (tmp_path / ".a.nii.gz.x1.part").write_bytes(b"")
    (tmp_path / "b.part").write_bytes(b"")
    (tmp_path / "keep.nii.gz").write_bytes(b"")
    removed = remove_stale_parts(tmp_path)
    assert len(removed) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["keep.nii.gz"]
