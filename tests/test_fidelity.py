"""Facts about the real NSD files: the stim-info CSV and old pickles, nsd_access's paths, NSD's header.

- ``nsd_stim_info_merged.pkl`` written by old pandas holds the same table as the CSV, which is what
  the stage reads (fixtures in ``tests/data``, made by real old pandas versions; see their README);
- the paths tknapen/nsd_access builds (from its documentation and code, re-typed here) resolve to files
  registered in ``inputs/nsd``, and read as nsd_access reads them;
- NSD's own NIfTI header (x running forward, ``sform_code`` 1, ``qform_code`` 0, no scaling) gives the
  same 3 mm world result as FSL's x-flipped header, checked against nilearn.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from nsdprep import pipeline
from nsdprep.core import nsd
from nsdprep.core.errors import MissingInputError
from nsdprep.core.nifti import (
    NiftiStreamWriter,
    iter_volumes,
    on_mni152_grid,
    read_header,
)
from nsdprep.options import Options
from nsdprep.stages import labels as coco
from nsdprep.stages.labels import stim_info
from nsdprep.stages.resample import nearest_on_grid, resample_session
from nsdprep.testing.demo import DemoSpec, build_demo, loopback_env
from nsdprep.testing.reference import original_3mm
from nsdprep.testing.serve import Mirror
from nsdprep.testing.synth import (
    FLIPPED_AFFINE,
    NONFLIPPED_AFFINE,
    SynthSpec,
    make_synthetic,
)

DATA = Path(__file__).parent / "data"
#: Stim-info fixtures: one table pickled by three pandas versions, each with the same CSV.
FIXTURES = ("stim_info_pandas1", "stim_info_py27_pandas024", "stim_info_pandas019")
VENV = Path(sys.executable).parent.parent


# ---------------------------------------------------------------------------- stim info


@pytest.mark.parametrize("folder", FIXTURES)
def test_stim_info_is_read_from_the_csv_whichever_pandas_wrote_the_pickle(folder: str) -> None:
    pkl = DATA / folder / "nsd_stim_info_merged.pkl"
    csv = DATA / folder / "nsd_stim_info_merged.csv"
    for got in (stim_info.load_stim_info(pkl, csv), stim_info.load_stim_info(pkl)):
        assert got.reader == "csv" and got.path == csv
        assert got.describe() == "nsd_stim_info_merged.csv via csv"
        # The CSV read the way nsd_access reads it gives the same table, cell by cell.
        reference = stim_info.normalize_stim_info(pd.read_csv(csv, index_col=0), csv)
        pd.testing.assert_frame_equal(got.table, reference, check_exact=True)
    assert got.table["cropBox"].iloc[0] == (0, 0, 0.1671875, 0.1671875)
    assert list(got.table.columns[:8]) == [
        "cocoId", "cocoSplit", "cropBox", "loss", "nsdId", "flagged", "BOLD5000", "shared1000",
    ]  # fmt: skip


def test_every_fixture_pickle_equals_its_csv() -> None:
    """pandas 1.5.3's pickle, Python 2's pickle (latin1) and the CSV hold one table."""
    import pickle

    ref = pd.read_pickle(DATA / "stim_info_pandas1/nsd_stim_info_merged.pkl")
    with open(DATA / "stim_info_py27_pandas024/nsd_stim_info_merged.pkl", "rb") as fh:
        py2 = pickle.load(fh, encoding="latin1")
    pd.testing.assert_frame_equal(py2, ref, check_exact=True)
    csvs = {(DATA / f / "nsd_stim_info_merged.csv").read_bytes() for f in FIXTURES}
    assert len(csvs) == 1
    for folder in FIXTURES:
        with pytest.raises(Exception):  # noqa: B017, PT011 - whatever this pandas raises
            if folder != "stim_info_pandas1":
                pd.read_pickle(DATA / folder / "nsd_stim_info_merged.pkl")
            else:
                raise ValueError("readable: nothing to check")


def test_pickle_without_its_csv_is_refused_unread(tmp_path: Path) -> None:
    pkl = tmp_path / "nsd_stim_info_merged.pkl"
    shutil.copy(DATA / "stim_info_pandas1/nsd_stim_info_merged.pkl", pkl)
    with pytest.raises(MissingInputError, match=r"nsd_stim_info_merged\.csv: missing .*CSV only"):
        stim_info.load_stim_info(pkl)


def test_the_csv_wins_over_a_disagreeing_pickle(tmp_path: Path) -> None:
    src = DATA / "stim_info_pandas1"
    csv = tmp_path / "nsd_stim_info_merged.csv"
    lines = (src / "nsd_stim_info_merged.csv").read_text().splitlines(keepends=True)
    lines[3] = lines[3].replace(",train2017,", ",val2017,", 1)
    csv.write_text("".join(lines))
    got = stim_info.load_stim_info(src / "nsd_stim_info_merged.pkl", csv)
    assert got.table["cocoSplit"].iloc[2] == "val2017"


def test_synthetic_pickle_and_csv_are_one_table(synth_root: Path) -> None:
    bucket = synth_root / "nsd"
    pkl = stim_info.normalize_stim_info(pd.read_pickle(bucket / nsd.STIM_INFO_KEY), "pkl")
    csv_path = bucket / nsd.STIM_INFO_CSV_KEY
    assert csv_path.read_text().startswith(",cocoId,cocoSplit,cropBox,")
    csv = stim_info.normalize_stim_info(pd.read_csv(csv_path, index_col=0), csv_path)
    pd.testing.assert_frame_equal(pkl, csv, check_exact=True)


def test_labels_from_the_csv_equal_labels_from_the_pickle(synth_root: Path, tmp_path: Path) -> None:
    """Same table, same bytes: reading the CSV instead of the pickle changes no label output."""
    bucket = synth_root / "nsd"
    zp = synth_root / "coco/annotations" / nsd.COCO_ZIP_NAME
    pkl, csv = bucket / nsd.STIM_INFO_KEY, bucket / nsd.STIM_INFO_CSV_KEY
    got = coco.build(zp, pkl, tmp_path / "a.json", tmp_path / "a.pkl", stim_info_csv=csv)
    # this test's own synthetic pickle, unpickled here only to compare
    from_pickle = stim_info.normalize_stim_info(pd.read_pickle(pkl), pkl)
    want = coco.label_table(coco.read_instances(zp), from_pickle)
    pd.testing.assert_frame_equal(got, want, check_exact=True)
    coco.write_table(want, tmp_path / "b.pkl")
    assert (tmp_path / "a.pkl").read_bytes() == (tmp_path / "b.pkl").read_bytes()
    summary = (tmp_path / "a_summary.tsv").read_text()
    assert "input\tstim_info\tnsd_stim_info_merged.csv via csv\n" in summary


# ---------------------------------------------------------------------------- nsd_access


class NsdAccessPaths:
    """The paths tknapen/nsd_access (nsd_access/nsda.py) builds, re-typed from its documentation.

    ``NSDAccess(nsd_folder)`` joins: ``nsddata_betas/ppdata/{subject}/{data_format}/{data_type}/
    betas_session{session_index zero-filled to 2}.nii.gz`` in ``read_betas`` (subject like 'subj01',
    the session number used as given); ``nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5`` (h5py
    dataset ``imgBrick``, indexed by 73k id) in ``read_images``; and
    ``nsddata/experiments/nsd/nsd_stim_info_merged.csv`` read with ``pd.read_csv(..., index_col=0)``
    and indexed with ``.iloc[image_index]`` in ``read_images``/``read_image_coco_info``.
    """

    def __init__(self, nsd_folder: Path) -> None:
        self.nsd_folder = nsd_folder

    def betas(self, subject: str, session_index: int, data_type: str, data_format: str) -> Path:
        name = f"betas_session{str(session_index).zfill(2)}.nii.gz"
        return self.nsd_folder / "nsddata_betas/ppdata" / subject / data_format / data_type / name

    def stimuli(self) -> Path:
        return self.nsd_folder / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"

    def stim_descriptions(self) -> Path:
        return self.nsd_folder / "nsddata/experiments/nsd/nsd_stim_info_merged.csv"


@pytest.mark.datalad
def test_nsd_access_paths_resolve_in_inputs_nsd(demo_built: Path, git_env) -> None:
    nsd_ds = demo_built / nsd.NSD_DATASET
    access = NsdAccessPaths(nsd_ds)
    betas = access.betas("subj01", 1, data_type="betas_fithrf", data_format="MNI")
    paths = [betas, access.betas("subj02", 3, "betas_fithrf", "MNI")]
    paths += [access.stimuli(), access.stim_descriptions()]
    tracked = set(
        subprocess.run(
            ["git", "-C", str(nsd_ds), "ls-files"], check=True, capture_output=True, text=True
        ).stdout.split()
    )
    for p in paths:
        assert p.relative_to(nsd_ds).as_posix() in tracked, p
    assert betas.relative_to(nsd_ds).as_posix() == nsd.betas_key(1, 1)
    assert access.stim_descriptions().relative_to(nsd_ds).as_posix() == nsd.STIM_INFO_CSV_KEY
    assert access.stimuli().relative_to(nsd_ds).as_posix() == nsd.STIMULI_KEY

    # The demo's mirror is gone: serve its synthetic bucket again at the registered address.
    table = pd.read_csv(nsd_ds / nsd.ADDURLS_TABLE)
    url = table.loc[table["filename"] == nsd.STIMULI_KEY, "url"].item()
    env = {**loopback_env(git_env), "PATH": f"{VENV / 'bin'}:{git_env['PATH']}"}
    with Mirror(demo_built.parent / "synth", port=urllib.parse.urlsplit(url).port):
        subprocess.run(
            ["datalad", "get", *map(str, paths)], cwd=demo_built, check=True, env=env,
            capture_output=True,
        )  # fmt: skip
    # read_betas: nibabel on the path; read_images: imgBrick rows by 73k id and the CSV by iloc
    assert nib.load(betas).shape[3] == DemoSpec().layout.trials_per_session
    import h5py

    with h5py.File(access.stimuli(), "r") as f:
        assert f["imgBrick"][[0, 2]].shape == (2, 425, 425, 3)
    descriptions = pd.read_csv(access.stim_descriptions(), index_col=0)
    # the pickle as the synthetic generator wrote it here (never the downloaded copy)
    pkl = pd.read_pickle(demo_built.parent / "synth" / "nsd" / nsd.STIM_INFO_KEY)
    for image_index in (0, 17, len(pkl) - 1):
        row = descriptions.iloc[image_index]
        assert row["cocoId"] == pkl["cocoId"].iloc[image_index]
        assert row["cocoSplit"] == pkl["cocoSplit"].iloc[image_index]
        assert row["nsdId"] == image_index


@pytest.mark.datalad
def test_the_run_records_which_stim_info_file_was_read(demo_built: Path) -> None:
    summary = demo_built / nsd.summary_path(nsd.COCO_CATEGORIES)
    assert "input\tstim_info\tnsd_stim_info_merged.csv via csv\n" in summary.read_text()
    log = subprocess.run(
        ["git", "-C", str(demo_built), "log", "--format=%B", "-n1", "--", str(summary)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert log.startswith("[DATALAD RUNCMD] [nsdprep] coco-labels"), log
    record = json.loads(log.split("=== Do not change lines below ===")[1].split("^^^")[0])
    assert f"--stim-info {nsd.NSD_DATASET}/{nsd.STIM_INFO_CSV_KEY}" in record["cmd"], record
    assert nsd.STIM_INFO_KEY not in record["cmd"] + " ".join(record["inputs"]), record


# ---------------------------------------------------------------------------- NSD's header


def test_mni152_grid_detection() -> None:
    full = (182, 218, 182)
    assert on_mni152_grid(full, FLIPPED_AFFINE) and on_mni152_grid(full, NONFLIPPED_AFFINE)
    crop = NONFLIPPED_AFFINE.copy()
    crop[:3, 3] += [50, 60, 40]
    assert on_mni152_grid((36, 42, 36), crop)
    assert not on_mni152_grid((183, 218, 182), NONFLIPPED_AFFINE)  # one voxel beyond the box
    shifted = NONFLIPPED_AFFINE.copy()
    shifted[0, 3] += 0.5  # half a voxel off the lattice
    assert not on_mni152_grid(full, shifted)
    assert not on_mni152_grid((91, 109, 91), np.diag([2.0, 2, 2, 1]) @ NONFLIPPED_AFFINE)
    flipped_y = NONFLIPPED_AFFINE.copy()
    flipped_y[1, 1] = -1
    assert not on_mni152_grid(full, flipped_y)


def test_writer_stores_nsd_header_fields(tmp_path: Path) -> None:
    path = tmp_path / "nsd.nii.gz"
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    with NiftiStreamWriter(
        path, data.shape, NONFLIPPED_AFFINE, np.int16, None, xform_code=1, qform_code=0,
        scl_fields=(0.0, 0.0),
    ) as w:  # fmt: skip
        w.write(data)
    hdr = read_header(path)
    assert (int(hdr["sform_code"]), int(hdr["qform_code"])) == (1, 0)
    assert float(hdr["scl_slope"]) == 0.0 and float(hdr["scl_inter"]) == 0.0
    img = nib.load(path)
    np.testing.assert_array_equal(img.affine, NONFLIPPED_AFFINE)
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)  # slope 0 = no scaling
    (vol,) = iter_volumes(path)
    assert vol.dtype == np.int16


@pytest.fixture(scope="module")
def two_headers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same small synthetic data written with FSL's header and with NSD's."""
    base = tmp_path_factory.mktemp("headers")
    spec = SynthSpec(
        seed=5, sessions=(2,), layout=nsd.Layout(2, (4, 3)), n_images=300,
        images_per_subject=60, n_shared=20, crop_shape=(22, 26, 20),
    )  # fmt: skip
    return {
        h: make_synthetic(base / h, dataclasses.replace(spec, header=h)) for h in ("fsl", "nsd")
    }


def test_nsd_header_files_hold_the_same_world_data(two_headers: dict[str, Path]) -> None:
    for kind in ("betas", "valid"):
        key = nsd.betas_key(1, 2) if kind == "betas" else nsd.valid_key(1, 2)
        fsl = nib.load(two_headers["fsl"] / "nsd" / key)
        nsd_img = nib.load(two_headers["nsd"] / "nsd" / key)
        hdr = read_header(two_headers["nsd"] / "nsd" / key)
        assert (int(hdr["sform_code"]), int(hdr["qform_code"]), float(hdr["scl_slope"])) == (
            1, 0, 0.0,
        )  # fmt: skip
        assert nsd_img.get_data_dtype() == np.int16
        assert nsd_img.affine[0, 0] == 1 and fsl.affine[0, 0] == -1
        a, b = np.asarray(fsl.dataobj), np.asarray(nsd_img.dataobj)
        # every voxel holds the same value at the same world position
        ijk = np.argwhere(np.ones(a.shape[:3], bool))[::97]
        world = nib.affines.apply_affine(fsl.affine, ijk)
        back = np.rint(nib.affines.apply_affine(np.linalg.inv(nsd_img.affine), world)).astype(int)
        np.testing.assert_array_equal(a[tuple(ijk.T)], b[tuple(back.T)])
        if kind == "valid":
            assert set(np.unique(b)) <= {0, 1} and b.ndim == 3


def test_3mm_outputs_identical_for_both_headers_and_equal_nilearn(
    two_headers: dict[str, Path], tmp_path: Path
) -> None:
    outs = {}
    for h, root in two_headers.items():
        src = root / "nsd" / nsd.betas_key(1, 1)
        outs[h] = tmp_path / f"{h}.nii.gz"
        result = resample_session(src, outs[h])
        assert result.fast  # the 3 mm grid samples both 1 mm grids exactly
        hdr = read_header(outs[h])
        assert (int(hdr["sform_code"]), int(hdr["qform_code"])) == (4, 4)  # MNI, whatever came in
        want, _ = original_3mm(nib.load(src))
        got = nib.load(outs[h])
        np.testing.assert_allclose(got.affine, want.affine)
        np.testing.assert_array_equal(
            np.asarray(got.dataobj), np.rint(np.asarray(want.dataobj)).astype(np.int16)
        )
    assert outs["fsl"].read_bytes() == outs["nsd"].read_bytes()


def test_other_grids_keep_their_code(tmp_path: Path) -> None:
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-200.5, 0, 0]  # not on the MNI lattice
    src = tmp_path / "scanner.nii.gz"
    with NiftiStreamWriter(src, (9, 8, 7), affine, np.int16, 2, xform_code=1, qform_code=0) as w:
        w.write(np.ones((9, 8, 7), np.int16))
        w.write(np.ones((9, 8, 7), np.int16))
    resample_session(src, tmp_path / "out.nii.gz")
    assert int(read_header(tmp_path / "out.nii.gz")["sform_code"]) == 1


@pytest.mark.parametrize("header", ["fsl", "nsd"])
def test_valid_masks_to_3mm_equal_nilearn_nearest(
    two_headers: dict[str, Path], header: str, tmp_path: Path
) -> None:
    from nilearn.image import resample_to_img

    valid = nib.load(two_headers[header] / "nsd" / nsd.valid_key(1, 2))
    target_out = tmp_path / "t.nii.gz"
    resample_session(two_headers[header] / "nsd" / nsd.betas_key(1, 2), target_out)
    target = nib.load(target_out)
    want = resample_to_img(
        valid, target, interpolation="nearest", force_resample=True, copy_header=True
    )
    data = np.asarray(valid.dataobj)
    got = nearest_on_grid(data != 0, valid.affine, target.shape[:3], target.affine)
    np.testing.assert_array_equal(got, np.asarray(want.dataobj) != 0)
    assert 0 < got.sum() < got.size
    # a grid that does not sample the 1 mm grid exactly goes through nilearn itself
    odd = target.affine.copy()
    odd[:3, 3] += 1.3
    got = nearest_on_grid(data, valid.affine, target.shape[:3], odd)
    want = resample_to_img(
        valid, nib.Nifti1Image(np.zeros(target.shape[:3], np.int8), odd),
        interpolation="nearest", force_resample=True, copy_header=True,
    )  # fmt: skip
    np.testing.assert_array_equal(got, np.asarray(want.dataobj))


# ---------------------------------------------------------------------------- both headers, end to end


@dataclasses.dataclass(frozen=True)
class NsdHeaderDemo(DemoSpec):
    """The demo's data, written with NSD's own header."""

    def synth_spec(self) -> SynthSpec:
        return dataclasses.replace(super().synth_spec(), header="nsd")


def _annex_keys(ds: Path, pattern: str) -> dict[str, str]:
    """Path -> annex key (the checksum-named target of the symlink) of committed files."""
    out = subprocess.run(
        ["git", "-C", str(ds), "ls-files", "--", pattern],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return {p: Path(str((ds / p).readlink())).name for p in out.split() if (ds / p).is_symlink()}


DERIVATIVES = ("derivatives/3mm", "derivatives/curated_3mm/sub-*", "derivatives/coco_*")


@pytest.fixture(scope="module")
def demo_nsd_header(git_env, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The demo pipeline up to curated on NSD-header data (the fsl one is ``demo_built``), then
    ``VALID=1`` and ``LABELS=crop`` on top; keys of the plain outputs are taken first."""
    work = tmp_path_factory.mktemp("e2e_nsd")
    spec = NsdHeaderDemo()
    ds = build_demo(
        work, VENV, Path(__file__).resolve().parents[1], spec,
        targets=("coco-labels", "3mm", "curated"), overlay=True, env=git_env,
    )  # fmt: skip
    keys = {pattern: _annex_keys(ds, pattern) for pattern in DERIVATIVES}
    env = {**loopback_env(git_env), "PATH": f"{VENV / 'bin'}:{git_env['PATH']}"}

    def make(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = ["make", "--no-print-directory", "-C", str(ds), f"VENV={VENV}", *spec.make_vars()]
        proc = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise AssertionError(f"make {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    refused = make("curated", "VALID=1", check=False)
    make("curated", "VALID=1", "FORCE=1")
    make("decode", "SUBJECTS=01")
    make("coco-labels", "LABELS=crop")
    make("curated", "LABELS=crop")
    return {"ds": ds, "keys": keys, "refused": refused, "synth": work / "synth"}


@pytest.mark.slow
@pytest.mark.datalad
def test_both_headers_give_identical_derivatives(demo_built: Path, demo_nsd_header: dict) -> None:
    ds = demo_nsd_header["ds"]
    assert (
        int(read_header(demo_nsd_header["synth"] / "nsd" / nsd.betas_key(1, 1))["sform_code"]) == 1
    )
    for pattern in DERIVATIVES:
        fsl = _annex_keys(demo_built, pattern)
        assert fsl and fsl == demo_nsd_header["keys"][pattern], pattern
    hdr = read_header(ds / "derivatives/3mm/subj01/betas_session01.nii.gz")
    assert int(hdr["sform_code"]) == 4 == int(hdr["qform_code"])


@pytest.mark.slow
@pytest.mark.datalad
def test_make_curated_valid_then_decode_with_its_mask(demo_nsd_header: dict) -> None:
    ds, before = demo_nsd_header["ds"], demo_nsd_header["keys"]["derivatives/curated_3mm/sub-*"]
    refused = demo_nsd_header["refused"]
    assert refused.returncode != 0 and "FORCE=1" in refused.stdout + refused.stderr
    after = _annex_keys(ds, "derivatives/curated_3mm/sub-*")
    cur = ds / nsd.CURATED_DIR
    desc = json.loads((cur / "dataset_description.json").read_text())
    for s in range(1, len(NsdHeaderDemo().sessions) + 1):
        files = nsd.curated_files(s, nsd.CURATED_DIR)
        mask = nsd.curated_mask_path(s, nsd.CURATED_DIR).as_posix()
        assert mask in after and after[mask] != before[mask]  # grey matter -> valid grey matter
        for f in (files.labels, files.runs, files.trials):  # same trials, same labels
            assert after[f.as_posix()] == before[f.as_posix()]
        assert after[files.betas.as_posix()] != before[files.betas.as_posix()]
        kept = desc["ValidVoxels"]["PerSubject"][nsd.bids_subject_label(s)]["VoxelsKept"]
        assert kept == int(np.asarray(nib.load(ds / mask).dataobj).sum()) > 0
    results = json.loads((ds / nsd.DECODING_DIR / "results.json").read_text())
    text = json.dumps(results)
    mask01 = np.asarray(nib.load(ds / nsd.curated_mask_path(1, nsd.CURATED_DIR)).dataobj) != 0
    data01 = np.asarray(nib.load(ds / nsd.curated_files(1, nsd.CURATED_DIR).betas).dataobj)
    used = mask01 & np.any(data01 != 0, axis=3)  # decode: the mask, minus voxels never nonzero
    assert 0 < used.sum() <= mask01.sum()
    assert f'"n_voxels": {int(used.sum())}' in text
    log = subprocess.run(
        ["git", "-C", str(ds), "log", "-n1", "--format=%B", "--", nsd.CURATED_DIR],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert "--valid" in log


@pytest.mark.slow
@pytest.mark.datalad
def test_make_crop_labels_counts_changed_images_and_trials(demo_nsd_header: dict) -> None:
    ds = demo_nsd_header["ds"]
    man = json.loads((demo_nsd_header["synth"] / "synth_manifest.json").read_text())
    crop = Options(labels="crop")
    summary = (ds / nsd.summary_path(pipeline.labels_table(crop))).read_text()
    changed = sum(a != b for a, b in zip(man["labels"], man["crop_labels"], strict=True))
    assert f"crop\tchanged_supercat\t{changed}\n" in summary
    readme = (ds / pipeline.curated_dir(crop) / "README.md").read_text()
    assert "## Crop-aware labels" in readme
    for s in range(1, len(NsdHeaderDemo().sessions) + 1):
        trials = pd.read_csv(nsd.curated_files(s, ds / pipeline.curated_dir(crop)).trials, sep="\t")
        assert (trials["supercat"] == pd.Series(man["crop_labels"])[trials["nsdId"]].values).all()
        differ = int((trials["supercat"].values != np.array(man["labels"])[trials["nsdId"]]).sum())
        assert f"| {nsd.bids_subject_label(s)} | {len(trials)} | {differ} |" in readme
    assert (
        "[nsdprep] curated crop sub-01"
        in subprocess.run(
            ["git", "-C", str(ds), "log", "--format=%s"], check=True, capture_output=True, text=True
        ).stdout
    )
