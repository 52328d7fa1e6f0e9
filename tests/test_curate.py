"""Tests of nsdprep.stages.curate on small hand-built inputs (registry, expdesign, labels, 3 mm files).

Every expectation is computed here independently: volumes are read back with nibabel, the trial
selection is re-derived with the original scripts' rule (label matrix, "unknown" padding, earliest
"person" trials), runs with their own formula.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import scipy.io

from nsdprep.cli import main
from nsdprep.core.errors import FormatError, MissingInputError, NsdPrepError
from nsdprep.core.nsd import Layout
from nsdprep.stages import curate
from nsdprep.stages.curate import selection as curate_select
from nsdprep.stages.labels import write_table
from nsdprep.testing.measure import run_measured

RUNS = 4
TPR = (8, 7)
S = 30  # trials per session of that layout: 2*8 + 2*7
SHAPE = (7, 8, 9)
AFFINE = np.array([[-3.0, 0, 0, 90], [0, 3, 0, -126], [0, 0, 3, -72], [0, 0, 0, 1]])
N_IMAGES = 40  # columns of subjectim ("10000" in NSD)
N_73K = 300  # size of the fake 73k id space
SUPERCATS = ["person", "animal", "vehicle", "food", "unknown"]
PROBS = [0.4, 0.2, 0.15, 0.15, 0.1]


@dataclass
class Inputs:
    root: Path
    nsd: Path
    resampled: Path
    labels: Path
    legacy_labels: Path
    expdesign: Path
    masterordering: np.ndarray  # 1D, 1-based
    subjectim: np.ndarray  # 8 x N_IMAGES, 1-based 73k ids
    table: pd.DataFrame
    legacy_table: pd.DataFrame


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def _write_valid(path: Path, shape: tuple[int, int, int]) -> None:
    """An all-valid 1 mm mask (int16, as NSD) whose grid the 3 mm AFFINE samples exactly."""
    one_mm = AFFINE.copy()
    one_mm[:3, :3] /= 3
    img = nib.Nifti1Image(np.ones(tuple(3 * n for n in shape), dtype=np.int16), one_mm)
    nib.save(img, path)


def make_inputs(
    root: Path,
    registered: dict[int, int],
    missing_3mm: dict[int, list[int]] | None = None,
    *,
    shape: tuple[int, int, int] = SHAPE,
    runs: int = RUNS,
    tpr: tuple[int, int] = TPR,
    seed: int = 0,
    n_sessions_3mm: dict[int, int] | None = None,
    probs: list[float] | None = None,
) -> Inputs:
    """Registered ``inputs/nsd`` (plain git), expdesign, labels tables and random 3 mm files."""
    rng = np.random.default_rng(seed)
    s_per = sum(tpr[0] if r % 2 else tpr[1] for r in range(1, runs + 1))
    nsd = root / "inputs" / "nsd"
    nsd.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(nsd)], check=True)
    for subj, n in registered.items():
        d = nsd / f"nsddata_betas/ppdata/subj{subj:02d}/MNI/betas_fithrf"
        d.mkdir(parents=True)
        for ses in range(1, n + 1):
            (d / f"betas_session{ses:02d}.nii.gz").write_text(f"{subj} {ses}\n")
            _write_valid(d / f"valid_session{ses:02d}.nii.gz", shape)
    max_trials = max(registered.values()) * s_per
    masterordering = rng.integers(1, N_IMAGES + 1, size=(1, max_trials)).astype(np.float64)
    subjectim = np.stack([rng.permutation(N_73K)[:N_IMAGES] + 1 for _ in range(8)]).astype(float)
    expdesign = nsd / "nsddata/experiments/nsd/nsd_expdesign.mat"
    expdesign.parent.mkdir(parents=True)
    scipy.io.savemat(
        expdesign,
        {
            "masterordering": masterordering,
            "subjectim": subjectim,
            "sharedix": np.arange(1, 11, dtype=float)[None, :],
        },
    )
    # The stim info as CSV (row = nsdId), its shared1000 column = sharedix (1..10, 1-based).
    pd.DataFrame(
        {"cocoId": 5000 + 7 * np.arange(N_73K), "nsdId": np.arange(N_73K),
         "shared1000": np.arange(N_73K) < 10},
    ).to_csv(expdesign.with_name("nsd_stim_info_merged.csv"))  # fmt: skip
    _git(nsd, "add", ".")
    _git(nsd, "commit", "-q", "-m", "register")

    sc = rng.choice(SUPERCATS, size=N_73K, p=probs or PROBS)
    table = pd.DataFrame(
        {
            "nsdId": np.arange(N_73K),
            "cocoId": 5000 + 7 * np.arange(N_73K),
            "cocoSplit": "train2017",
            "supercats": [[str(x)] for x in sc],  # plain str, as the stage writes
            "cats": [[f"{x}-cat"] for x in sc],
            "areas": [[1.0] for _ in sc],
            "supercat": sc,
            "cat": [f"{x}-cat{i % 3}" for i, x in enumerate(sc)],
        }
    )
    labels = root / "derivatives" / "coco_categories.pkl"
    labels.parent.mkdir(parents=True)
    write_table(table, labels)
    lsc = rng.choice(SUPERCATS, size=N_73K, p=probs or PROBS)
    legacy_table = pd.DataFrame(
        {
            "id": np.arange(1, N_73K + 1)[::-1],
            "supercat": lsc[::-1],
            "cat": [f"L{x}" for x in lsc][::-1],
        }
    )
    legacy = root / "derivatives" / "coco_categories_legacy.pkl"
    write_table(legacy_table, legacy)

    resampled = root / "derivatives" / "3mm"
    missing_3mm = missing_3mm or {}
    for subj, n in (n_sessions_3mm or registered).items():
        d = resampled / f"subj{subj:02d}"
        d.mkdir(parents=True)
        for ses in range(1, n + 1):
            if ses in missing_3mm.get(subj, []):
                continue
            data = rng.integers(-3000, 3000, size=(*shape, s_per), dtype=np.int16)
            img = nib.Nifti1Image(data, AFFINE)
            img.header.set_data_dtype(np.int16)
            nib.save(img, d / f"betas_session{ses:02d}.nii.gz")
    return Inputs(
        root,
        nsd,
        resampled,
        labels,
        legacy,
        expdesign,
        masterordering.reshape(-1).astype(int),
        subjectim.astype(int),
        table,
        legacy_table,
    )


def run_curate(inp: Inputs, out: Path, subjects=None, legacy=False, extra=()) -> int:
    argv = [
        "curate",
        "--nsd",
        str(inp.nsd),
        "--resampled",
        str(inp.resampled),
        "--labels-table",
        str(inp.legacy_labels if legacy else inp.labels),
        "--expdesign",
        str(inp.expdesign),
        "--out",
        str(out),
        "--runs-per-session",
        str(RUNS),
        "--trials-per-run",
        ",".join(map(str, TPR)),
        *extra,
    ]
    if subjects:
        argv += ["--subjects", *map(str, subjects)]
    if legacy:
        argv += ["--labels", "legacy"]
    return main(argv)


def expected_selection(inp: Inputs, n_trials: int, legacy: bool = False) -> dict[int, np.ndarray]:
    """The original rule, re-implemented: 8 x T label matrix, trials >= N set to "unknown", then
    each subject's earliest "person" trials set to "unknown" until all have as many unknowns as the
    subject with most; kept = the rest (0-based trial indices). Over all registered subjects.
    """
    registered = sorted(
        int(p.name[4:]) for p in (inp.nsd / "nsddata_betas/ppdata").iterdir() if p.is_dir()
    )
    if legacy:
        lut = dict(zip(inp.legacy_table["id"], inp.legacy_table["supercat"], strict=True))
    else:
        lut = dict(zip(inp.table["nsdId"] + 1, inp.table["supercat"], strict=True))
    total = inp.masterordering.size
    lab = {}
    for s in registered:
        ids = inp.subjectim[s - 1, inp.masterordering - 1]
        row = np.array([lut[i] for i in ids], dtype=object)
        row[n_trials:] = "unknown"
        lab[s] = row
    most = max(int(np.sum(r == "unknown")) for r in lab.values())
    for row in lab.values():
        need = most - int(np.sum(row == "unknown"))
        for t in range(total):
            if need == 0:
                break
            if row[t] == "person":
                row[t] = "unknown"
                need -= 1
    return {s: np.flatnonzero(row != "unknown") for s, row in lab.items()}


def run_of(session: np.ndarray, trial_in_session: np.ndarray) -> np.ndarray:
    """Independent run numbering: walk the runs of a session trial by trial."""
    starts = []
    pos = 0
    for r in range(1, RUNS + 1):
        starts.append(pos)
        pos += TPR[0] if r % 2 == 1 else TPR[1]
    run_in = np.searchsorted(np.array(starts), trial_in_session - 1, side="right")
    return (session - 1) * RUNS + run_in


# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big(tmp_path_factory, git_env) -> Inputs:
    """Subjects 2, 5, 7 (not 1: mapping by number); 11/10/12 sessions registered; subj05 session 10
    has no 3 mm file (registered but not resampled)."""
    root = tmp_path_factory.mktemp("curate_big")
    return make_inputs(root, {7: 12, 2: 11, 5: 10}, missing_3mm={5: [10]}, seed=1)


@pytest.fixture(scope="module")
def big_out(big: Inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "curated_3mm"
    out.mkdir()
    (out / ".sub-02.nii.gz.abc.part").write_bytes(b"stale")
    assert run_curate(big, out, subjects=[7, 2]) == 0
    return out


def test_layout_runs():
    lay = Layout(12, (63, 62))
    assert lay.trials_per_session == 750
    ris = lay.run_in_session()
    assert ris[0] == 1 and ris[62] == 1 and ris[63] == 2 and ris[124] == 2 and ris[125] == 3
    assert ris[-1] == 12 and np.bincount(ris)[1:].tolist() == [63, 62] * 6
    assert Layout.parse("12", "63,62") == Layout(12, (63, 62))
    with pytest.raises(NsdPrepError, match="trials per run A,B"):
        Layout.parse("12", "63")


def test_equalize_drops_earliest_person():
    sc = {
        1: np.array(["person", "animal", "person", "unknown", "person", "food"]),
        2: np.array(["unknown", "person", "unknown", "animal", "food", "person"]),
    }
    kept, dropped = curate_select.equalize(sc)
    assert kept[2].tolist() == [1, 3, 4, 5]
    assert kept[1].tolist() == [1, 2, 4, 5]  # the earliest "person" (0) dropped, not 2 or 4
    assert dropped == {1: 1, 2: 0}


def test_equalize_counts_and_error():
    sc = {
        1: np.array(["person", "animal", "person", "unknown", "person", "food"]),  # 5 known
        2: np.array(["unknown", "person", "unknown", "animal", "food", "unknown"]),  # 3 known
    }
    kept, dropped = curate_select.equalize(sc)
    assert kept[1].tolist() == [1, 4, 5] and kept[2].tolist() == [1, 3, 4]
    assert dropped == {1: 2, 2: 0}
    bad = {1: np.array(["animal", "food", "animal"]), 2: np.array(["unknown", "food", "animal"])}
    with pytest.raises(NsdPrepError, match=r"subj01 has 3 labelled trials.*only 0 'person'"):
        curate_select.equalize(bad)


def test_outputs_match_independent_reads(big: Inputs, big_out: Path):
    n_trials = 10 * S  # fewest REGISTERED sessions: subj05 (10), whose session 10 has no 3 mm file
    expected = expected_selection(big, n_trials)
    rng = np.random.default_rng(123)
    counts = set()
    for subj in (2, 7):
        name = f"sub-{subj:02d}"
        img = nib.load(big_out / f"{name}.nii.gz")
        labels = np.load(big_out / f"{name}_labels.npy", allow_pickle=False)
        runs = np.load(big_out / f"{name}_runs.npy", allow_pickle=False)
        tsv = pd.read_csv(big_out / f"{name}_trials.tsv", sep="\t")
        assert list(tsv.columns) == list(curate.TRIAL_COLUMNS)
        n = len(tsv)
        counts.add(n)
        assert img.shape == (*SHAPE, n) and labels.shape == (n,) and runs.shape == (n,)
        assert labels.dtype.kind == "U"
        assert np.allclose(img.affine, AFFINE)
        assert img.get_data_dtype() == np.int16
        # the selection equals the original rule's, trial by trial
        assert (tsv["trial"].to_numpy() - 1).tolist() == expected[subj].tolist()
        assert tsv["trial"].max() <= n_trials
        assert (tsv["subject"] == subj).all()
        # sessions ascending numerically (10, 11 after 9), trials in order
        assert np.all(np.diff(tsv["trial"].to_numpy()) > 0)
        assert np.all(np.diff(tsv["session"].to_numpy()) >= 0)
        assert set(tsv["session"]) == set(range(1, 11))
        t0 = tsv["trial"].to_numpy() - 1
        assert (tsv["session"].to_numpy() == t0 // S + 1).all()
        assert (tsv["trial_in_session"].to_numpy() == t0 % S + 1).all()
        # labels, nsdId, cocoId from the expdesign and the table, independently
        ids73k = big.subjectim[subj - 1, big.masterordering[t0] - 1]
        assert (tsv["nsdId"].to_numpy() == ids73k - 1).all()
        lut = big.table.set_index("nsdId")
        assert labels.tolist() == lut.loc[ids73k - 1, "supercat"].tolist()
        assert tsv["supercat"].tolist() == labels.tolist()
        assert tsv["cat"].tolist() == lut.loc[ids73k - 1, "cat"].tolist()
        assert tsv["cocoId"].tolist() == lut.loc[ids73k - 1, "cocoId"].tolist()
        assert "unknown" not in set(labels)
        # runs: independent formula
        want_runs = run_of(tsv["session"].to_numpy(), tsv["trial_in_session"].to_numpy())
        assert runs.tolist() == want_runs.tolist() == tsv["run"].tolist()
        assert runs.min() >= 1 and runs.max() <= 10 * RUNS
        assert (tsv["run_in_session"].to_numpy() == (want_runs - 1) % RUNS + 1).all()
        # volumes: random kept trials vs. the 3 mm file read with nibabel
        data = np.asanyarray(img.dataobj)
        for k in rng.choice(n, size=12, replace=False):
            ses, tis = int(tsv["session"][k]), int(tsv["trial_in_session"][k])
            src = nib.load(big.resampled / f"subj{subj:02d}" / f"betas_session{ses:02d}.nii.gz")
            want = np.asanyarray(src.dataobj[..., tis - 1])
            np.testing.assert_array_equal(data[..., k], want)
    assert len(counts) == 1
    # the stale temporary was removed, nothing else left behind
    assert not list(big_out.glob("*.part")) and not list(big_out.glob(".*.part"))
    assert not (big_out / "sub-05.nii.gz").exists()


def test_description_and_readme(big: Inputs, big_out: Path):
    desc = json.loads((big_out / "dataset_description.json").read_text())
    sel = desc["Selection"]
    assert sel["SessionsUsed"] == 10 and sel["CandidateTrialsPerSubject"] == 10 * S
    assert sel["RegisteredSessions"] == {"subj02": 11, "subj05": 10, "subj07": 12}
    kept = {s: len(v) for s, v in expected_selection(big, 10 * S).items()}
    assert desc["Counts"]["Trials"] == {f"sub-{s:02d}": n for s, n in kept.items()}
    assert "--subjects 7 2" in desc["GeneratedBy"][0]["Command"]
    labels = np.load(big_out / "sub-07_labels.npy", allow_pickle=False)
    vals, cnt = np.unique(labels, return_counts=True)
    assert desc["Counts"]["Labels"]["sub-07"] == dict(zip(vals.tolist(), cnt.tolist(), strict=True))
    readme = (big_out / "README.md").read_text()
    assert "sub-02, sub-07" in readme and str(sel["TrialsPerSubject"]) in readme
    assert "| sub-05 | 10 |" in readme


def test_deterministic_and_subset_identical(big: Inputs, big_out: Path, tmp_path: Path):
    again = tmp_path / "again"
    assert run_curate(big, again, subjects=[7, 2]) == 0
    for f in sorted(p.name for p in big_out.iterdir()):
        if f.endswith(".md") or f.endswith(".json"):
            continue
        assert (again / f).read_bytes() == (big_out / f).read_bytes(), f
    # README/JSON identical too (no timestamps), apart from the out path in the command
    for f in ("README.md", "dataset_description.json"):
        a = (again / f).read_text().replace(str(again), "OUT")
        b = (big_out / f).read_text().replace(str(big_out), "OUT")
        assert a == b, f
    subset = tmp_path / "subset"
    assert run_curate(big, subset, subjects=[7]) == 0
    suffixes = (".nii.gz", "_X.npy", "_labels.npy", "_mask.nii.gz", "_runs.npy", "_trials.tsv")
    assert sorted(p.name for p in subset.glob("sub-*")) == sorted(f"sub-07{x}" for x in suffixes)
    for suffix in suffixes:
        assert (subset / f"sub-07{suffix}").read_bytes() == (
            big_out / f"sub-07{suffix}"
        ).read_bytes()


def test_missing_3mm_session_is_named(big: Inputs, tmp_path: Path):
    with pytest.raises(MissingInputError, match=r'subj05 session\(s\) 10.*make 3mm SUBJECTS="05"'):
        curate.curate(
            big.nsd,
            big.resampled,
            big.labels,
            tmp_path / "o",
            subjects=[5],
            layout=Layout(RUNS, TPR),
            expdesign=big.expdesign,
        )
    assert not (tmp_path / "o").exists()
    # the CLI turns it into exit code 2
    assert run_curate(big, tmp_path / "o2", subjects=[2, 5]) == 2


def test_legacy_labels(big: Inputs, tmp_path: Path):
    out = tmp_path / "legacy"
    assert run_curate(big, out, subjects=[2], legacy=True) == 0
    tsv = pd.read_csv(out / "sub-02_trials.tsv", sep="\t", keep_default_na=False)
    expected = expected_selection(big, 10 * S, legacy=True)
    assert (tsv["trial"].to_numpy() - 1).tolist() == expected[2].tolist()
    lut = big.legacy_table.set_index("id")
    ids73k = tsv["nsdId"].to_numpy() + 1
    labels = np.load(out / "sub-02_labels.npy", allow_pickle=False)
    assert labels.tolist() == lut.loc[ids73k, "supercat"].tolist()
    assert tsv["cat"].tolist() == lut.loc[ids73k, "cat"].tolist()
    assert set(tsv["cocoId"]) == {"n/a"}
    # the default table is refused as legacy and vice versa, with a hint
    with pytest.raises(FormatError, match="lacks column"):
        curate_select.load_labels(big.labels, legacy=True)
    with pytest.raises(FormatError, match="--labels legacy"):
        curate_select.load_labels(big.legacy_labels, legacy=False)


@pytest.fixture
def small(tmp_path: Path, git_env) -> Inputs:
    return make_inputs(tmp_path, {1: 2, 3: 3}, seed=2)


def _curate(inp: Inputs, out: Path, **kw):
    return curate.curate(
        inp.nsd,
        inp.resampled,
        kw.pop("labels", inp.labels),
        out,
        layout=kw.pop("layout", Layout(RUNS, TPR)),
        expdesign=kw.pop("expdesign", inp.expdesign),
        **kw,
    )


def test_wrong_volume_count(small: Inputs, tmp_path: Path):
    f = small.resampled / "subj03" / "betas_session02.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((*SHAPE, S + 1), np.int16), AFFINE), f)
    with pytest.raises(FormatError, match=rf"betas_session02.*expected {S} volumes.*found {S + 1}"):
        _curate(small, tmp_path / "o")
    # and a layout that does not match the files
    with pytest.raises(FormatError, match=r"expected 28 volumes"):
        _curate(small, tmp_path / "o", subjects=[1], layout=Layout(4, (8, 6)))


def test_grid_mismatch(small: Inputs, tmp_path: Path):
    f = small.resampled / "subj03" / "betas_session01.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((7, 8, 10, S), np.int16), AFFINE), f)
    with pytest.raises(FormatError, match=r"grid shape \(7, 8, 9\), found \(7, 8, 10\)"):
        _curate(small, tmp_path / "o")
    shifted = AFFINE.copy()
    shifted[0, 3] += 3
    nib.save(nib.Nifti1Image(np.zeros((*SHAPE, S), np.int16), shifted), f)
    with pytest.raises(FormatError, match="expected affine"):
        _curate(small, tmp_path / "o")


def test_expdesign_checks(small: Inputs, tmp_path: Path):
    short = tmp_path / "short.mat"
    scipy.io.savemat(
        short,
        {
            "masterordering": small.masterordering[None, :40].astype(float),
            "subjectim": small.subjectim.astype(float),
        },
    )
    with pytest.raises(FormatError, match=r"'masterordering' has 40 entries, 60 trials needed"):
        _curate(small, tmp_path / "o", expdesign=short)
    nosub = tmp_path / "nosub.mat"
    scipy.io.savemat(nosub, {"masterordering": small.masterordering[None, :].astype(float)})
    with pytest.raises(FormatError, match="field 'subjectim' missing"):
        _curate(small, tmp_path / "o", expdesign=nosub)
    few_rows = tmp_path / "rows.mat"
    scipy.io.savemat(
        few_rows,
        {
            "masterordering": small.masterordering[None, :].astype(float),
            "subjectim": small.subjectim[:2].astype(float),
        },
    )
    with pytest.raises(FormatError, match="'subjectim' has 2 rows, subject 3"):
        _curate(small, tmp_path / "o", expdesign=few_rows)


def test_labels_must_cover_used_ids(small: Inputs, tmp_path: Path):
    used = small.subjectim[0, small.masterordering[: 2 * S] - 1] - 1
    table = small.table[small.table["nsdId"] != used[5]].reset_index(drop=True)
    p = tmp_path / "labels.pkl"
    write_table(table, p)
    with pytest.raises(FormatError, match=rf"lacks 1 nsdId.*\[{used[5]}\]"):
        _curate(small, tmp_path / "o", labels=p)


def test_not_enough_person_trials(tmp_path: Path, git_env):
    inp = make_inputs(tmp_path, {1: 1, 2: 1}, seed=3)
    table = inp.table.copy()
    used1 = set(inp.subjectim[0, inp.masterordering[:S] - 1] - 1)
    used2 = set(inp.subjectim[1, inp.masterordering[:S] - 1] - 1) - used1
    table["supercat"] = "animal"
    table.loc[table["nsdId"].isin(list(used2)[:1]), "supercat"] = "unknown"
    write_table(table, inp.labels)
    with pytest.raises(NsdPrepError, match="cannot equalize trials: subj01.*only 0 'person'"):
        _curate(inp, tmp_path / "o")


def test_no_content_for_unfetched(small: Inputs, tmp_path: Path):
    f = small.resampled / "subj01" / "betas_session02.nii.gz"
    f.unlink()
    f.symlink_to("../.git/annex/objects/XX/missing")
    with pytest.raises(MissingInputError, match="content absent.*datalad get"):
        _curate(small, tmp_path / "o")


def test_peak_rss_does_not_grow_with_trials(tmp_path: Path, git_env):
    """Two runs over 2 and 10 sessions of a 48x56x48 grid (80 vs 400 volumes, 21 MB vs 103 MB of
    int16): peak memory must not follow the number of volumes."""
    shape, runs, tpr = (48, 56, 48), 2, (20, 20)
    rss = {}
    shared = make_inputs(
        tmp_path / "big",
        {1: 10},
        shape=shape,
        runs=runs,
        tpr=tpr,
        probs=[0.25, 0.25, 0.25, 0.25, 0],
    )
    small_root = tmp_path / "small"
    small_nsd = small_root / "inputs" / "nsd"
    small_nsd.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(small_nsd)], check=True)
    d = small_nsd / "nsddata_betas/ppdata/subj01/MNI/betas_fithrf"
    d.mkdir(parents=True)
    for ses in (1, 2):
        (d / f"betas_session{ses:02d}.nii.gz").write_text("x\n")
    _git(small_nsd, "add", ".")
    _git(small_nsd, "commit", "-q", "-m", "register")
    for label, nsd in (("2 sessions", small_nsd), ("10 sessions", shared.nsd)):
        out = tmp_path / f"out_{label.split()[0]}"
        cmd = [
            sys.executable,
            "-m",
            "nsdprep",
            "curate",
            "--nsd",
            str(nsd),
            "--resampled",
            str(shared.resampled),
            "--labels-table",
            str(shared.labels),
            "--expdesign",
            str(shared.expdesign),
            "--out",
            str(out),
            "--runs-per-session",
            str(runs),
            "--trials-per-run",
            "20,20",
        ]
        res = run_measured(cmd, env=git_env, capture=True)
        assert res.returncode == 0, res.stderr
        rss[label] = res.peak_mb
        n = nib.load(out / "sub-01.nii.gz").shape[3]
        assert n == int(label.split()[0]) * 40
        rss[label + " volumes"] = n
    print(f"peak RSS: {rss}")
    growth = rss["10 sessions"] - rss["2 sessions"]
    assert growth < 50, f"peak RSS grew by {growth:.1f} MB with 5x the volumes: {rss}"


def test_on_synthetic_tree(synth_root: Path, tmp_path: Path, git_env):
    """The shared synthetic tree: registered as symlinks (like annexed files), 3 mm stand-ins made
    here by taking every third 1 mm voxel, labels from the manifest."""
    manifest = json.loads((synth_root / "synth_manifest.json").read_text())
    lay = manifest["layout"]
    s_per = lay["trials_per_session"]
    nsd = tmp_path / "inputs" / "nsd"
    nsd.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(nsd)], check=True)
    for f in sorted((synth_root / "nsd").rglob("*")):
        if f.is_file():
            link = nsd / f.relative_to(synth_root / "nsd")
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(f)
    _git(nsd, "add", ".")
    _git(nsd, "commit", "-q", "-m", "register")
    resampled = tmp_path / "3mm"
    for subj, n in enumerate(lay["sessions"], start=1):
        for ses in range(1, n + 1):
            src = nib.load(
                synth_root
                / f"nsd/nsddata_betas/ppdata/subj{subj:02d}/MNI/betas_fithrf/betas_session{ses:02d}.nii.gz"
            )
            data = np.asanyarray(src.dataobj)[::3, ::3, ::3]
            out = resampled / f"subj{subj:02d}" / f"betas_session{ses:02d}.nii.gz"
            out.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, src.affine @ np.diag([3.0, 3, 3, 1])), out)
    labels = tmp_path / "labels.pkl"
    sc = np.array(manifest["labels"])
    write_table(
        pd.DataFrame(
            {"nsdId": np.arange(sc.size), "cocoId": np.arange(sc.size), "supercat": sc, "cat": sc}
        ),
        labels,
    )
    cur = tmp_path / "curated"
    sel = curate.curate(
        nsd,
        resampled,
        labels,
        cur,
        layout=Layout(lay["runs_per_session"], tuple(lay["trials_per_run"])),
    )
    n_trials = min(lay["sessions"]) * s_per
    assert sel.n_trials == n_trials
    mat = scipy.io.loadmat(nsd / "nsddata/experiments/nsd/nsd_expdesign.mat")
    mo, sim = mat["masterordering"][0].astype(int), mat["subjectim"].astype(int)
    sizes = set()
    for subj in range(1, len(lay["sessions"]) + 1):
        tsv = pd.read_csv(cur / f"sub-{subj:02d}_trials.tsv", sep="\t")
        got = np.load(cur / f"sub-{subj:02d}_labels.npy", allow_pickle=False)
        sizes.add(got.size)
        t0 = tsv["trial"].to_numpy() - 1
        assert t0.max() < n_trials
        nsd_ids = sim[subj - 1, mo[t0] - 1] - 1
        assert got.tolist() == sc[nsd_ids].tolist()
        img = nib.load(cur / f"sub-{subj:02d}.nii.gz")
        for k in (0, got.size // 2, got.size - 1):
            ses, tis = int(tsv["session"][k]), int(tsv["trial_in_session"][k])
            src = nib.load(resampled / f"subj{subj:02d}" / f"betas_session{ses:02d}.nii.gz")
            np.testing.assert_array_equal(img.dataobj[..., k], src.dataobj[..., tis - 1])
        _check_matrix(cur, f"sub-{subj:02d}")
    assert len(sizes) == 1


def _check_matrix(cur: Path, sub: str) -> None:
    """The trials x voxels matrix is the 4D file's volumes inside the written mask, exactly."""
    from nsdprep.core.matrix import open_matrix

    img = nib.load(cur / f"{sub}.nii.gz")
    mask_img = nib.load(cur / f"{sub}_mask.nii.gz")
    np.testing.assert_allclose(mask_img.affine, img.affine)
    mask = np.asarray(mask_img.dataobj) != 0
    X = open_matrix(cur / f"{sub}_X.npy")
    data = np.asarray(img.dataobj)
    assert mask.sum() > 100 and X.shape == (data.shape[3], int(mask.sum()))
    np.testing.assert_array_equal(np.asarray(X), data[mask].T)
