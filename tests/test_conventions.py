"""The field's preparations of the curated set: per-session z-scoring, repeat averaging, the
shared1000 split, NSD's MNI ROIs and a session cap, each written to its own folder.

The shared synthetic tree is registered in a plain git repository, resampled with the 3 mm stage
and labelled from its COCO zip, then curated under each option. Every expectation is recomputed
here from the raw files: ``sharedix`` and the stim info CSV with scipy and pandas, z-scores with
``scipy.stats.zscore`` over the 3 mm sessions read with nibabel, ROI voxels with nilearn's
``resample_to_img`` (nearest) and its grey-matter mask. One end-to-end test runs ``make curated``
with the options in a clone of the demo dataset and reruns every new output with ``datalad rerun``.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.stats

from conftest import REPO_ROOT, RUNS_PER_SESSION, TRIALS_PER_RUN, git_out
from nsdprep import pipeline
from nsdprep.core import inventory, nsd
from nsdprep.core.errors import FormatError, MissingInputError, UsageError
from nsdprep.core.nsd import Layout
from nsdprep.options import Options
from nsdprep.stages import curate
from nsdprep.stages.curate.split import train_test
from nsdprep.stages.labels import write_table

LAYOUT = Layout(RUNS_PER_SESSION, TRIALS_PER_RUN)
S = LAYOUT.trials_per_session
VENV = Path(sys.executable).parent.parent
#: the option sets built once for this module (folder name -> curate keywords)
BUILDS = {
    "default": {},
    "zscore": {"zscore": "session"},
    "avg": {"average": True},
    "zscore_avg": {"zscore": "session", "average": True},
    "roi": {"roi": "nsdgeneral"},
    "zscore_avg_roi": {"zscore": "session", "average": True, "roi": "nsdgeneral"},
    "maxsession": {"max_session": 1},
}


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def _register(src: Path, nsd_ds: Path) -> Path:
    """A copy of a synthetic bucket as a plain git repository (curate reads the registry)."""
    shutil.copytree(src, nsd_ds)
    subprocess.run(["git", "init", "-q", str(nsd_ds)], check=True)
    _git(nsd_ds, "add", "-A")
    _git(nsd_ds, "commit", "-q", "-m", "register")
    return nsd_ds


@pytest.fixture(scope="module")
def tree(synth_root: Path, git_env, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The synthetic tree registered, resampled, labelled, and curated under every :data:`BUILDS`."""
    from nsdprep.stages.labels import build as build_labels
    from nsdprep.stages.resample import resample_subject

    root = tmp_path_factory.mktemp("conventions")
    nsd_ds = _register(synth_root / "nsd", root / "nsd")
    labels = root / "labels.pkl"
    build_labels(
        synth_root / "coco/annotations" / nsd.COCO_ZIP_NAME, nsd_ds / nsd.STIM_INFO_KEY,
        root / "merged.json", labels,
    )  # fmt: skip
    resampled = root / "3mm"
    for s in inventory.registered_subjects(nsd_ds):
        resample_subject(nsd_ds, s, resampled / nsd.subject_label(s), jobs=1, progress=False)
    out, sel = {}, {}
    for name, kw in BUILDS.items():
        out[name] = root / "derivatives" / name
        sel[name] = curate.curate(
            nsd_ds, resampled, labels, out[name], layout=LAYOUT, command="test", **kw
        )
    return {"root": root, "nsd": nsd_ds, "resampled": resampled, "labels": labels, "out": out,
            "sel": sel}  # fmt: skip


def _tsv(folder: Path, subject: int) -> pd.DataFrame:
    return pd.read_csv(nsd.curated_files(subject, folder).trials, sep="\t")


def _X(folder: Path, subject: int) -> np.ndarray:
    return np.load(nsd.curated_files(subject, folder).matrix, allow_pickle=False)


def _mask(folder: Path, subject: int) -> np.ndarray:
    return np.asarray(nib.load(nsd.curated_files(subject, folder).mask).dataobj) != 0


def _subjects(tree: dict) -> list[int]:
    return sorted(tree["sel"]["default"].trials)


def _session(tree: dict, subject: int, session: int) -> np.ndarray:
    """All volumes of one 3 mm session, read with nibabel (x, y, z, trial)."""
    path = tree["resampled"] / nsd.subject_label(subject) / f"betas_session{session:02d}.nii.gz"
    return np.asarray(nib.load(path).dataobj)


# ------------------------------------------------------------------------------------------------
# the split


def test_test_rows_are_exactly_the_trials_of_shared_images(tree: dict) -> None:
    mat = scipy.io.loadmat(tree["nsd"] / nsd.EXPDESIGN_KEY)
    sharedix = set(mat["sharedix"][0].astype(int))  # 1-based 73k ids
    csv = pd.read_csv(tree["nsd"] / nsd.STIM_INFO_CSV_KEY, index_col=0)
    assert set(np.flatnonzero(csv["shared1000"].to_numpy()) + 1) == sharedix
    mo, sim = mat["masterordering"][0].astype(int), mat["subjectim"].astype(int)
    for name in ("default", "zscore", "roi", "maxsession", "avg"):
        folder = tree["out"][name]
        desc = json.loads((folder / "dataset_description.json").read_text())
        readme = (folder / "README.md").read_text()
        for s in _subjects(tree):
            t = _tsv(folder, s)
            if name != "avg":  # the image of each trial, from the design
                np.testing.assert_array_equal(sim[s - 1, mo[t["trial"] - 1] - 1] - 1, t["nsdId"])
            want = np.where([i + 1 in sharedix for i in t["nsdId"]], "test", "train")
            np.testing.assert_array_equal(t["split"].to_numpy(dtype=str), want)
            n_test = int((want == "test").sum())
            assert 0 < n_test < len(t), (name, s)
            rows = desc["Split"]["Rows"][nsd.bids_subject_label(s)]
            assert rows == {"train": len(t) - n_test, "test": n_test}
            assert f"| {nsd.bids_subject_label(s)} | {len(t) - n_test} | {n_test} |" in readme


def test_shared_images_must_agree_with_the_stim_info(tree: dict, tmp_path: Path) -> None:
    csv = pd.read_csv(tree["nsd"] / nsd.STIM_INFO_CSV_KEY, index_col=0)
    first = int(np.flatnonzero(csv["shared1000"].to_numpy())[0])
    csv.loc[first, "shared1000"] = False
    bad = tmp_path / "nsd_stim_info_merged.csv"
    csv.to_csv(bad)
    with pytest.raises(
        FormatError, match=rf"shared images disagree.*only in sharedix: \[{first}\]"
    ):
        curate.curate(
            tree["nsd"], tree["resampled"], tree["labels"], tmp_path / "o", layout=LAYOUT,
            stim_info_csv=bad,
        )  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_load_curated_split_and_the_held_out_helper(tree: dict, tmp_path: Path) -> None:
    import nsdprep

    opts = Options(zscore="session", average=True, roi="nsdgeneral")
    shutil.copytree(tree["out"]["zscore_avg_roi"], tmp_path / pipeline.curated_dir(opts))
    for s in _subjects(tree):
        d = nsdprep.load_curated(s, dataset=tmp_path, zscore="session", average=True,
                                 roi="nsdgeneral")  # fmt: skip
        X_train, y_train, X_test, y_test = train_test(d)
        t = _tsv(tree["out"]["zscore_avg_roi"], s)
        test = t["split"].to_numpy(dtype=str) == "test"
        X = _X(tree["out"]["zscore_avg_roi"], s)
        np.testing.assert_array_equal(X_test, X[test])
        np.testing.assert_array_equal(X_train, X[~test])
        np.testing.assert_array_equal(y_test, t["supercat"].to_numpy(dtype=str)[test])
        np.testing.assert_array_equal(y_train, t["supercat"].to_numpy(dtype=str)[~test])
        assert not set(t["nsdId"][test]) & set(t["nsdId"][~test])
        for side, rows in (("train", ~test), ("test", test)):
            part = nsdprep.load_curated(s, dataset=tmp_path, zscore="session", average=True,
                                        roi="nsdgeneral", split=side)  # fmt: skip
            np.testing.assert_array_equal(part.X, X[rows])
            np.testing.assert_array_equal(part.runs, t["run"].to_numpy()[rows])
            assert part.trials["nsdId"].tolist() == t["nsdId"][rows].tolist()
            assert part.to_img([0]).get_data_dtype() == np.float32
    with pytest.raises(UsageError, match="split must be"):
        nsdprep.load_curated(1, dataset=tmp_path, split="validation")


# ------------------------------------------------------------------------------------------------
# z-scoring


def test_zscored_values_have_mean_0_and_sd_1_per_voxel_per_session(tree: dict, tmp_path: Path):
    """One subject registered and no picture unknown: every trial is kept, so the output holds the
    whole of each session and the property can be checked on the output itself."""
    root = tmp_path / "one"
    nsd_ds = root / "nsd"
    shutil.copytree(tree["nsd"], nsd_ds, symlinks=True)
    _git(nsd_ds, "rm", "-q", "-r", "nsddata_betas/ppdata/subj02", "nsddata_betas/ppdata/subj03",
         "nsddata_betas/ppdata/subj04")  # fmt: skip
    _git(nsd_ds, "commit", "-q", "-m", "subj01 only")
    table = pd.read_pickle(tree["labels"])
    table["supercat"] = table["supercat"].replace("unknown", "animal")
    labels = root / "labels.pkl"
    write_table(table, labels)  # the pickle and the TSV sidecar curate reads
    out = root / "z"
    sel = curate.curate(
        nsd_ds, tree["resampled"], labels, out, layout=LAYOUT, zscore="session", command="t"
    )
    t, X = _tsv(out, 1), _X(out, 1)
    assert X.dtype == np.float32 and len(t) == sel.n_sessions * S  # all trials kept
    mask = _mask(out, 1)
    constant = 0
    for ses in sel.sessions_used:
        rows = t["session"].to_numpy() == ses
        assert rows.sum() == S
        z = X[rows].astype(np.float64)
        src = _session(tree, 1, ses)[mask].T  # trials x voxels
        flat = np.all(src == src[0], axis=0)
        constant += int(flat.sum())
        assert np.all(z[:, flat] == 0)
        np.testing.assert_allclose(z[:, ~flat].mean(axis=0), 0, atol=1e-5)
        np.testing.assert_allclose(z[:, ~flat].std(axis=0), 1, atol=1e-5)
    assert constant > 0  # voxels not valid in a session (0 in every trial) are exercised
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["Preparation"]["ConstantVoxelSessions"] == {"sub-01": constant}
    assert "z = (x - mean) / sd" in desc["Preparation"]["ZScoreRule"]


def test_zscore_uses_all_of_a_sessions_trials_before_the_selection(tree: dict) -> None:
    sel = tree["sel"]["zscore"]
    folder = tree["out"]["zscore"]
    dropped = 0
    for s in _subjects(tree):
        t, X = _tsv(folder, s), _X(folder, s)
        mask = _mask(folder, s)
        np.testing.assert_array_equal(mask, _mask(tree["out"]["default"], s))
        for ses in sel.sessions_used:
            src = _session(tree, s, ses)[mask].T.astype(np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                want = np.nan_to_num(scipy.stats.zscore(src, axis=0, ddof=0), nan=0.0)
            rows = t["session"].to_numpy() == ses
            kept = t["trial_in_session"].to_numpy()[rows] - 1
            dropped += S - kept.size
            np.testing.assert_allclose(X[rows], want[kept], atol=1e-5, rtol=0)
            if kept.size < S:  # z-scoring the kept trials only would give other values
                with np.errstate(invalid="ignore", divide="ignore"):
                    only = np.nan_to_num(scipy.stats.zscore(src[kept], axis=0), nan=0.0)
                assert np.abs(only - X[rows]).max() > 1e-3
    assert dropped > 0


# ------------------------------------------------------------------------------------------------
# averaging


@pytest.mark.parametrize(("averaged", "single"), [("zscore_avg", "zscore"), ("avg", "default")])
def test_averaged_rows_are_the_mean_of_their_repeats(tree: dict, averaged: str, single: str):
    for s in _subjects(tree):
        a, one = _tsv(tree["out"][averaged], s), _tsv(tree["out"][single], s)
        Xa, X1 = _X(tree["out"][averaged], s), _X(tree["out"][single], s).astype(np.float64)
        labels = np.load(nsd.curated_files(s, tree["out"][averaged]).labels)
        runs = np.load(nsd.curated_files(s, tree["out"][averaged]).runs)
        assert Xa.dtype == np.float32 and Xa.shape == (len(a), X1.shape[1])
        assert list(a.columns) == list(nsd.AVERAGED_COLUMNS)
        # one row per image, in the order of each image's first kept trial
        assert a["nsdId"].is_unique
        assert a["nsdId"].tolist() == list(dict.fromkeys(one["nsdId"].tolist()))
        assert a["n_repeats"].max() > 1
        for r, row in a.iterrows():
            idx = np.flatnonzero(one["nsdId"].to_numpy() == row["nsdId"])
            assert row["n_repeats"] == idx.size
            assert row["trials"] == ",".join(map(str, one["trial"].to_numpy()[idx]))
            np.testing.assert_allclose(Xa[r], X1[idx].mean(axis=0), atol=1e-5, rtol=1e-6)
            first = one.iloc[idx[0]]
            assert (row["session"], row["run"], runs[r]) == (first.session, first.run, first.run)
            assert labels[r] == row["supercat"] == first.supercat
            assert (row["cocoId"], row["split"]) == (first.cocoId, first.split)
        readme = (tree["out"][averaged] / "README.md").read_text()
        assert "run of its first kept trial" in readme and "one side of a split" in readme


def test_no_image_has_rows_on_both_sides_of_a_split(tree: dict) -> None:
    from sklearn.model_selection import GroupKFold

    for s in _subjects(tree):
        a = _tsv(tree["out"]["zscore_avg"], s)
        runs = np.load(nsd.curated_files(s, tree["out"]["zscore_avg"]).runs)
        for train, test in GroupKFold(n_splits=3).split(a, groups=runs):
            assert not set(a["nsdId"].iloc[train]) & set(a["nsdId"].iloc[test])
        one = _tsv(tree["out"]["zscore"], s)  # single trials: the split keeps repeats together
        assert (one.groupby("nsdId")["split"].nunique() == 1).all()


# ------------------------------------------------------------------------------------------------
# the ROI


def _reference_roi(roi_file: Path, target: nib.Nifti1Image) -> np.ndarray:
    """nilearn's nearest-neighbour resample of the ROI file, value > 0, and its grey matter."""
    from nilearn.datasets import load_mni152_gm_mask
    from nilearn.image import resample_to_img

    kw = {"interpolation": "nearest", "force_resample": True, "copy_header": True}
    roi = np.asarray(resample_to_img(nib.load(roi_file), target, **kw).dataobj) > 0
    gm = np.asarray(resample_to_img(load_mni152_gm_mask(), target, **kw).dataobj) != 0
    return roi & gm


def test_roi_voxels_are_the_nearest_resample_within_grey_matter(tree: dict) -> None:
    folder = tree["out"]["roi"]
    desc = json.loads((folder / "dataset_description.json").read_text())
    for s in _subjects(tree):
        ref_img = nib.load(tree["resampled"] / nsd.subject_label(s) / "betas_session01.nii.gz")
        target = nib.Nifti1Image(np.zeros(ref_img.shape[:3], np.int8), ref_img.affine)
        want = _reference_roi(tree["nsd"] / nsd.roi_key(s, "nsdgeneral"), target)
        assert 50 < want.sum() < _mask(tree["out"]["default"], s).sum()
        for name in ("roi", "zscore_avg_roi"):
            np.testing.assert_array_equal(_mask(tree["out"][name], s), want)
        # the ROI's columns of the grey-matter matrix, and zeros elsewhere in the 4D file
        gm = _mask(tree["out"]["default"], s)
        np.testing.assert_array_equal(_X(folder, s), _X(tree["out"]["default"], s)[:, want[gm]])
        data = np.asarray(nib.load(nsd.curated_files(s, folder).betas).dataobj)
        assert not data[~want].any()
        kept = desc["Preparation"]["ROIVoxels"][nsd.bids_subject_label(s)]
        assert kept["Kept"] == int(want.sum())
    readme = (folder / "README.md").read_text()
    assert "resampled to the 3 mm grid by nearest neighbour" in readme
    assert "value is positive and it is in the grey-matter mask" in readme


def test_roi_values_follow_nsds_convention(tree: dict, tmp_path: Path) -> None:
    """A multi-label ROI: every positive label is in, -1 (outside the brain) and 0 are not; a value
    of another convention is refused."""
    root = tmp_path / "multi"
    nsd_ds = root / "nsd"
    shutil.copytree(tree["nsd"], nsd_ds, symlinks=True)
    src = nib.load(nsd_ds / nsd.roi_key(1, "nsdgeneral"))
    vol = np.asarray(src.dataobj).astype(np.int16)
    rng = np.random.default_rng(0)
    vol[vol > 0] = rng.integers(1, 6, size=int((vol > 0).sum()))  # labels 1..5
    multi = nsd_ds / nsd.roi_key(1, "multi")
    nib.save(nib.Nifti1Image(vol, src.affine, src.header), multi)
    _git(nsd_ds, "add", "-A")
    _git(nsd_ds, "commit", "-q", "-m", "multi")
    out = root / "o"
    curate.curate(nsd_ds, tree["resampled"], tree["labels"], out, subjects=[1], layout=LAYOUT,
                  roi="multi")  # fmt: skip
    ref = nib.load(tree["resampled"] / "subj01/betas_session01.nii.gz")
    target = nib.Nifti1Image(np.zeros(ref.shape[:3], np.int8), ref.affine)
    np.testing.assert_array_equal(_mask(out, 1), _reference_roi(multi, target))
    np.testing.assert_array_equal(_mask(out, 1), _mask(tree["out"]["roi"], 1))  # same voxels
    vol[0, 0, 0] = -2
    nib.save(nib.Nifti1Image(vol, src.affine, src.header), multi)
    with pytest.raises(FormatError, match=r"values \[-2\] are not NSD's ROI convention"):
        curate.curate(nsd_ds, tree["resampled"], tree["labels"], root / "o2", subjects=[1],
                      layout=LAYOUT, roi="multi")  # fmt: skip
    with pytest.raises(MissingInputError, match="ROI nope of subj01"):
        curate.curate(nsd_ds, tree["resampled"], tree["labels"], root / "o3", subjects=[1],
                      layout=LAYOUT, roi="nope")  # fmt: skip


def test_roi_registration_says_when_a_subject_has_none(synth_copy: Path, caplog) -> None:
    from nsdprep.stages import inputs
    from nsdprep.testing.serve import Mirror

    shutil.rmtree(synth_copy / "nsd" / nsd.roi_dir_key(4))
    caplog.set_level(logging.INFO, logger="nsdprep.stages.inputs")
    with Mirror(synth_copy) as m:
        rows = inputs.nsd_table(f"{m.url}/nsd")
    keys = [r["filename"] for r in rows]
    rois = [k for k in keys if nsd.parse_roi_key(k)]
    assert rois == [nsd.roi_key(s, "nsdgeneral") for s in (1, 2, 3)]
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len([x for x in lines if "ROI" in x]) == 1
    assert "subj04: no MNI ROI volumes under" in lines[0]


def test_a_subject_without_the_roi_is_named_before_any_step(tree: dict, tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    nsd_ds = ds / nsd.NSD_DATASET
    shutil.copytree(tree["nsd"], nsd_ds, symlinks=True)
    _git(nsd_ds, "rm", "-q", nsd.roi_key(3, "nsdgeneral"))
    _git(nsd_ds, "commit", "-q", "-m", "no ROI for subj03")
    with pytest.raises(MissingInputError, match=r"ROI=nsdgeneral: .*subj03 has no MNI ROI"):
        pipeline.STAGES["curated"].plan(ds, Options(roi="nsdgeneral"))
    steps = pipeline.STAGES["curated"].plan(ds, Options(roi="nsdgeneral", subjects=(1, 2)))
    assert [i.path for i in steps[0].inputs if "/roi/" in i.path] == [
        f"{nsd.NSD_DATASET}/{nsd.roi_key(s, 'nsdgeneral')}" for s in (1, 2)
    ]


# ------------------------------------------------------------------------------------------------
# sessions


def test_sessions_used_and_the_late_released_ones_are_recorded(tree: dict) -> None:
    assert nsd.late_sessions(1) == (38, 39, 40) and nsd.late_sessions(4) == (28, 29, 30)
    for name, used in (("default", [1, 2]), ("maxsession", [1])):
        desc = json.loads((tree["out"][name] / "dataset_description.json").read_text())
        for s in _subjects(tree):
            rec = desc["Sessions"]["PerSubject"][nsd.bids_subject_label(s)]
            assert rec["Used"] == used
            assert rec["LateReleased"] == list(nsd.late_sessions(s))
            assert rec["LateReleasedUsed"] is False
            t = _tsv(tree["out"][name], s)
            assert sorted(set(t["session"])) == used
        assert desc["Selection"]["SessionsUsed"] == len(used)
    desc = json.loads((tree["out"]["maxsession"] / "dataset_description.json").read_text())
    assert (
        desc["Selection"]["MaxSession"] == 1 and desc["Selection"]["FewestRegisteredSessions"] == 2
    )
    assert "at most MAX_SESSION = 1" in (tree["out"]["maxsession"] / "README.md").read_text()


# ------------------------------------------------------------------------------------------------
# the default folder, names, bytes


def _pre_split_code(dest: Path) -> Path:
    """The package as it was before the split column (the parent of the commit adding it)."""
    log = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "log", "--format=%H", '-S"split",', "--",
         "code/nsdprep/core/nsd.py"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    rev = f"{log[-1]}^" if log else "HEAD"  # not committed yet: HEAD is still before it
    archive = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", rev, "code"], capture_output=True, check=True
    ).stdout
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    assert '"split"' not in (dest / "code/nsdprep/core/nsd.py").read_text()
    return dest / "code"


def test_default_folder_keeps_its_files_and_bytes(tree: dict, tmp_path: Path, git_env) -> None:
    """Against the code before the split: same files, the same bytes but for the trial tables,
    which gain one last column, ``split``; README.md and dataset_description.json (in git) say more."""
    old = tmp_path / "old"
    code = _pre_split_code(tmp_path / "src")
    subprocess.run(
        [sys.executable, "-m", "nsdprep", "curate", "--nsd", str(tree["nsd"]),
         "--resampled", str(tree["resampled"]), "--labels-table", str(tree["labels"]),
         "--expdesign", str(tree["nsd"] / nsd.EXPDESIGN_KEY), "--out", str(old),
         *LAYOUT.cli_args()],
        check=True, capture_output=True, env={**git_env, "PYTHONPATH": str(code)},
    )  # fmt: skip
    new = tree["out"]["default"]
    assert sorted(p.name for p in new.iterdir()) == sorted(p.name for p in old.iterdir())
    for f in sorted(old.iterdir()):
        if f.name.endswith("_trials.tsv"):
            a, b = pd.read_csv(new / f.name, sep="\t"), pd.read_csv(f, sep="\t")
            assert list(a.columns) == [*b.columns, "split"]
            pd.testing.assert_frame_equal(a.drop(columns="split"), b)
        elif f.suffix not in (".md", ".json"):
            assert (new / f.name).read_bytes() == f.read_bytes(), f.name


def test_each_option_set_has_its_own_folder_and_step_name() -> None:
    assert pipeline.curated_dir(Options()) == "derivatives/curated_3mm"
    opts = Options(zscore="session", average=True, roi="nsdgeneral")
    assert pipeline.curated_dir(opts) == "derivatives/curated_3mm_zscore-session_avg_roi-nsdgeneral"
    all_on = opts.replace(labels="crop", max_session=37)
    assert pipeline.curated_dir(all_on) == (
        "derivatives/curated_3mm_crop_zscore-session_avg_roi-nsdgeneral_maxsession-37"
    )
    step = pipeline.Step("curated", (1, 2), opts, (), ())
    assert step.name == "curated zscore-session_avg_roi-nsdgeneral sub-01 sub-02"
    assert "--zscore session --average --roi nsdgeneral --max-session 0" in " ".join(step.command)
    assert "--roi" not in pipeline.Step("curated", (1,), Options(), (), ()).command
    names = {pipeline.curated_dir(Options(**kw)) for kw in BUILDS.values()}
    assert len(names) == len(BUILDS)


def test_prepared_folders_are_deterministic(tree: dict, tmp_path: Path) -> None:
    again = tmp_path / "again"
    curate.curate(tree["nsd"], tree["resampled"], tree["labels"], again, layout=LAYOUT,
                  command="test", **BUILDS["zscore_avg_roi"])  # fmt: skip
    first = tree["out"]["zscore_avg_roi"]
    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in first.iterdir())
    for f in first.iterdir():
        assert (again / f.name).read_bytes() == f.read_bytes(), f.name


# ------------------------------------------------------------------------------------------------
# the synthetic ROI files


def test_synthetic_rois_follow_nsds_convention(synth_root: Path) -> None:
    from nilearn import datasets, image

    for s in range(1, 5):
        roi = nib.load(synth_root / "nsd" / nsd.roi_key(s, "nsdgeneral"))
        betas = nib.load(synth_root / "nsd" / nsd.valid_key(s, 1))
        np.testing.assert_allclose(roi.affine, betas.affine)
        vol = np.asarray(roi.dataobj)
        assert set(np.unique(vol).tolist()) == {-1, 0, 1}
        brain = image.resample_to_img(
            datasets.load_mni152_brain_mask(resolution=1), roi, interpolation="nearest",
            force_resample=True, copy_header=True,
        )  # fmt: skip
        np.testing.assert_array_equal(vol == -1, np.asarray(brain.dataobj) == 0)
        signal = np.asarray(betas.dataobj) != 0  # where the planted betas are
        assert (signal[vol == 1]).mean() > 0.9


# ------------------------------------------------------------------------------------------------
# end to end: make curated with the options, recorded, rerun identically


#: What a researcher copies to get the shared1000 split of the field's preparation (README).
README_LINES = """\
import nsdprep
from nsdprep.stages.curate.split import train_test
X_train, y_train, X_test, y_test = train_test(nsdprep.load_curated(1, zscore="session", average=True, roi="nsdgeneral"))
"""


@pytest.mark.slow
@pytest.mark.datalad
def test_make_curated_with_the_fields_options_reruns_identically(
    demo_built: Path, git_env, tmp_path: Path
) -> None:
    from nsdprep.testing.demo import TEST_SPEC, loopback_env
    from nsdprep.testing.serve import Mirror

    env = {**loopback_env(git_env), "PATH": f"{VENV / 'bin'}:{git_env['PATH']}"}
    ds = tmp_path / "clone"
    subprocess.run(["datalad", "clone", str(demo_built), str(ds)], check=True, env=env,
                   capture_output=True)  # fmt: skip
    nsd_ds = demo_built / nsd.NSD_DATASET
    # nsd_access reads {ppdata}/{subject}/MNI/roi/{atlas}.nii.gz: registered for every subject
    tracked = set(git_out(nsd_ds, "ls-files").split())
    for s in range(1, len(TEST_SPEC.sessions) + 1):
        assert f"nsddata/ppdata/subj{s:02d}/MNI/roi/nsdgeneral.nii.gz" in tracked
    table = pd.read_csv(nsd_ds / nsd.ADDURLS_TABLE)
    url = table.loc[table["filename"] == nsd.roi_key(1, "nsdgeneral"), "url"].item()
    runs = {
        "zscore-session_avg_roi-nsdgeneral": ["ZSCORE=session", "AVERAGE=1", "ROI=nsdgeneral"],
        "maxsession-1": ["MAX_SESSION=1"],
    }
    numbers = {}
    # The demo's mirror is gone: serve its synthetic bucket again at the registered address.
    with Mirror(demo_built.parent / "synth", port=urllib.parse.urlsplit(url).port):
        for variant, words in runs.items():
            make = ["make", "-C", str(ds), "curated", f"VENV={VENV}", *TEST_SPEC.make_vars()]
            proc = subprocess.run([*make, *words], env=env, capture_output=True, text=True)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            folder = ds / f"derivatives/curated_3mm_{variant}"
            assert (folder / "README.md").is_file()
            log = git_out(ds, "log", "-1", "--format=%s")
            assert f"[nsdprep] curated {variant} sub-01 sub-02 sub-03 sub-04 (inputs " in log
            commit = git_out(ds, "rev-parse", "HEAD").strip()
            changed = git_out(ds, "diff-tree", "--no-commit-id", "--name-only", "-r", commit)
            assert changed.split() and all(
                p.startswith(f"derivatives/curated_3mm_{variant}/") for p in changed.split()
            )
            before = git_out(ds, "ls-files", "-s", "--", *changed.split())
            subprocess.run(["datalad", "rerun", commit], cwd=ds, check=True, env=env,
                           capture_output=True)  # fmt: skip
            assert git_out(ds, "ls-files", "-s", "--", *changed.split()) == before
            assert git_out(ds, "rev-parse", "HEAD").strip() == commit  # identical: no new commit
            again = subprocess.run([*make, *words], env=env, capture_output=True, text=True)
            assert again.returncode == 0 and "up to date" in again.stdout + again.stderr
            numbers[variant] = json.loads((folder / "dataset_description.json").read_text())
    # the README lines a researcher copies, as written, in the clone
    proc = subprocess.run(
        [sys.executable, "-c", README_LINES + "\nprint(X_train.shape, X_test.shape, len(y_train), len(y_test))"],
        cwd=ds, capture_output=True, text=True, check=True,
        env={**git_env, "PYTHONPATH": str(ds / "code")},
    )  # fmt: skip
    desc = numbers["zscore-session_avg_roi-nsdgeneral"]
    rows, vox = desc["Split"]["Rows"]["sub-01"], desc["Preparation"]["ROIVoxels"]["sub-01"]["Kept"]
    want = f"({rows['train']}, {vox}) ({rows['test']}, {vox}) {rows['train']} {rows['test']}"
    assert proc.stdout.strip() == want, proc.stdout + proc.stderr
    # the default folder: the split column is there, its other files untouched by these runs
    assert git_out(ds, "diff", "--stat", f"{git_out(demo_built, 'rev-parse', 'HEAD').strip()}",
                   "--", "derivatives/curated_3mm") == ""  # fmt: skip
    default = json.loads((ds / "derivatives/curated_3mm/dataset_description.json").read_text())
    report = {
        bids: {
            "trials": default["Counts"]["Trials"][bids],
            "train_trials": default["Split"]["Rows"][bids]["train"],
            "test_trials": default["Split"]["Rows"][bids]["test"],
            "averaged_rows": desc["Counts"]["AveragedRows"][bids],
            "train_images": desc["Split"]["Rows"][bids]["train"],
            "test_images": desc["Split"]["Rows"][bids]["test"],
            "roi_voxels": desc["Preparation"]["ROIVoxels"][bids],
        }
        for bids in default["Counts"]["Trials"]
    }
    print("demo numbers:", json.dumps(report, indent=1))
    for v in report.values():
        assert v["train_trials"] + v["test_trials"] == v["trials"] and v["test_trials"] > 0
        assert v["averaged_rows"] == v["train_images"] + v["test_images"] < v["trials"]
        assert 0 < v["roi_voxels"]["Kept"] <= v["roi_voxels"]["InROI"]
