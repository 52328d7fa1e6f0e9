"""Tests of the ridge decoder (nsdprep.stages.decode.ridge, .linalg): equal to scikit-learn, deterministic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import RidgeClassifier
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import permutation_test_score
from sklearn.model_selection._validation import _shuffle
from sklearn.utils import check_random_state

from nsdprep.core import nsd
from nsdprep.core.errors import FormatError, MissingInputError, UsageError
from nsdprep.stages import decode as dec
from nsdprep.stages.decode import data as decode_data
from nsdprep.stages.decode import linalg, ridge
from test_decode import make_curated


@pytest.fixture
def small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiles, blocks and chunks small enough that a test-sized problem spans many of them (uneven)."""
    monkeypatch.setattr(linalg, "GRAM_TILE", 23)
    monkeypatch.setattr(linalg, "CHOL_TILE", 17)
    monkeypatch.setattr(linalg, "RHS_BLOCK", 5)
    monkeypatch.setattr(ridge, "KERNEL_CHUNK", 37)
    monkeypatch.setattr(ridge, "LABEL_BATCH", 3)


def synthetic(
    n_runs: int = 12,
    run_len: tuple[int, int] = (9, 8),
    p: int = 150,
    n_classes: int = 4,
    signal: float = 0.6,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """int16 trials x voxels (signal pattern + run drift + session offset + noise, x300), labels, runs."""
    rng = np.random.default_rng(seed)
    sizes = [run_len[r % 2] for r in range(n_runs)]
    runs = np.repeat(np.arange(1, n_runs + 1), sizes)
    sessions = (runs - 1) // 3 + 1
    y = np.concatenate([rng.permutation(np.arange(s) % n_classes) for s in sizes])
    X = (
        signal * rng.normal(size=(n_classes, p))[y]
        + rng.normal(size=(n_runs, p))[runs - 1] * 0.5
        + rng.normal(size=(sessions.max(), p))[sessions - 1] * 3
        + rng.normal(size=(runs.size, p)) * 1.5
    )
    X = np.round(X * 300).astype(np.int16)
    X[:, :3] = 0  # voxels never valid
    X[sessions == 2, 5] = 17  # constant within one session
    labels = np.array([f"c{k}" for k in range(n_classes)])[y]
    return {"X": X, "y": labels, "runs": runs, "sessions": sessions}


def zscore_by_session(X: np.ndarray, sessions: np.ndarray) -> np.ndarray:
    """float64 reference: each column z-scored within each session (SD 1 for constant columns)."""
    Z = X.astype(np.float64)
    for s in np.unique(sessions):
        rows = sessions == s
        sd = Z[rows].std(axis=0)
        Z[rows] = (Z[rows] - Z[rows].mean(axis=0)) / np.where(sd == 0, 1.0, sd)
    return Z


def kernel_of(d: dict[str, np.ndarray], workers: int = 2) -> np.ndarray:
    with linalg.Workers(workers) as w:
        K, _ = ridge.subject_kernel(lambda a, b: d["X"][:, a:b], *d["X"].shape, d["sessions"], w)
    return K


# ----------------------------------------------------------------------------------------------
# permutations and scores


def test_permuted_labels_are_scikit_learns() -> None:
    rng = np.random.default_rng(3)
    runs = np.repeat([7, 3, 12, 5, 9], [6, 4, 7, 5, 6])  # unsorted run numbers, unequal runs
    y = rng.choice(np.array(["a", "b", "c"]), runs.size)
    ours = ridge.permuted_labels(y, runs, 12345, 20)
    state = check_random_state(12345)
    theirs = np.array([_shuffle(y, runs, state) for _ in range(20)])
    np.testing.assert_array_equal(ours, theirs)
    for perm in ours:  # within runs: every run keeps its labels
        for r in np.unique(runs):
            assert sorted(perm[runs == r]) == sorted(y[runs == r])
    assert len({tuple(p) for p in ours}) == 20


def test_balanced_accuracy_is_scikit_learns() -> None:
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 5, (30, 40))
    truth[3] = np.where(truth[3] == 4, 0, truth[3])  # class 4 absent from the truth ...
    pred = rng.integers(0, 5, (30, 40))
    pred[3, :5] = 4  # ... but predicted (left out of the mean, as scikit-learn does)
    ours = ridge.balanced_accuracy(truth, pred, 5)
    with pytest.warns(UserWarning, match="y_pred contains classes not in y_true"):
        ref3 = balanced_accuracy_score(truth[3], pred[3])
    ref = [
        balanced_accuracy_score(t, p) if k != 3 else ref3
        for k, (t, p) in enumerate(zip(truth, pred, strict=True))
    ]
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# numerics


def test_kernel_is_the_session_zscored_gram(small_tiles: None) -> None:
    d = synthetic()
    K = kernel_of(d)
    Z = zscore_by_session(d["X"], d["sessions"])
    np.testing.assert_allclose(K, Z @ Z.T, rtol=0, atol=2e-5 * Z.shape[1])
    assert np.array_equal(K, K.T)
    used = np.zeros(d["X"].shape[1], dtype=bool)
    chunks = ridge.standardized_chunks(
        lambda a, b: d["X"][:, a:b], d["X"].shape[1], d["sessions"], used=used
    )
    np.testing.assert_allclose(np.hstack(list(chunks)), Z, rtol=0, atol=1e-5)
    assert used.sum() == d["X"].shape[1] - 3


def test_block_cholesky_solves(small_tiles: None) -> None:
    rng = np.random.default_rng(1)
    m = 80  # tiles of 17: 4 full and one of 12
    B = rng.normal(size=(m, 120))
    A = B @ B.T + 5 * np.eye(m)
    rows = [A[s:e, :e].astype(np.float32) for s, e in linalg.edges(m, linalg.CHOL_TILE)]
    Y = rng.normal(size=(m, 13)).astype(np.float32)
    with linalg.Workers(2) as w:
        X = linalg.BlockCholesky(rows).factor(w).solve(Y.copy(), w)
    np.testing.assert_allclose(X, np.linalg.solve(A, Y.astype(np.float64)), rtol=0, atol=1e-4)
    with (
        linalg.Workers(1) as w,
        pytest.raises(linalg.NotPositiveDefiniteError, match="raise alpha"),
    ):
        bad = [(-A)[s:e, :e].astype(np.float32) for s, e in linalg.edges(m, linalg.CHOL_TILE)]
        linalg.BlockCholesky(bad).factor(w)


def test_bit_identical_for_any_number_of_workers(small_tiles: None) -> None:
    d = synthetic()
    kernels = [kernel_of(d, w) for w in (1, 2, 3)]
    assert all(np.array_equal(kernels[0], k) for k in kernels[1:])
    splits = dec.run_grouped_splits(d["runs"], 4)
    outs = []
    for workers in (1, 2, 3):
        with linalg.Workers(workers) as w:
            outs.append(
                ridge.cross_validate_ridge(kernels[0], d["y"], d["runs"], splits, 150.0, 7, 5, w)
            )
    for out in outs[1:]:
        assert out["fold_scores"] == outs[0]["fold_scores"]
        assert out["permutation_scores"] == outs[0]["permutation_scores"]
        np.testing.assert_array_equal(out["y_pred"], outs[0]["y_pred"])


@pytest.mark.parametrize("many_targets", [False, True], ids=["solve-targets", "solve-test-trials"])
def test_decision_values_equal_ridge_classifier(small_tiles: None, many_targets: bool) -> None:
    """Same folds, alpha and standardization: the decision values of scikit-learn's RidgeClassifier.

    For the true labels and one permutation; with few target columns the targets are solved for,
    with more target columns than test trials the test trials are (both paths).
    """
    d = synthetic()
    K = kernel_of(d)
    Z = zscore_by_session(d["X"], d["sessions"])
    classes, y = np.unique(d["y"], return_inverse=True)
    splits = dec.run_grouped_splits(d["runs"], 4)
    alpha = 0.7 * Z.shape[1]
    n_perm = 40 if many_targets else 1
    perms = ridge.permuted_labels(y, d["runs"], 99, n_perm)
    labels = np.vstack([y, perms])
    worst = 0.0
    for train, test in splits:
        assert (labels.shape[0] * classes.size > test.size) is many_targets
        rows, cross = ridge.centred_fold(K, train, test, alpha)
        with linalg.Workers(2) as w:
            factor = linalg.BlockCholesky(rows).factor(w)
            D = np.concatenate(
                [D for _, D in ridge.fold_decisions(factor, cross, labels[:, train], 4, w)], axis=1
            )
        for v in (0, 1):  # the true labels, one permutation
            ref = (
                RidgeClassifier(alpha=alpha)
                .fit(Z[train], labels[v, train])
                .decision_function(Z[test])
            )
            worst = max(worst, float(np.abs(D[:, v, :] - ref).max()))
            np.testing.assert_array_equal(D[:, v, :].argmax(axis=1), ref.argmax(axis=1))
    print(f"max |decision - RidgeClassifier| = {worst:.2e}")
    assert worst < 1e-4


def test_class_absent_from_training_is_predicted_as_scikit_learn_does(small_tiles: None) -> None:
    """A class only in the test runs: scikit-learn's classifier does not know it, so never predicts it."""
    d = synthetic(seed=8)
    y = d["y"].astype("<U4")
    y[d["runs"] == 1] = np.where(y[d["runs"] == 1] == "c0", "rare", y[d["runs"] == 1])
    Z = zscore_by_session(d["X"], d["sessions"])
    classes, y_idx = np.unique(y, return_inverse=True)
    splits = dec.run_grouped_splits(d["runs"], 4)
    train, test = next((tr, te) for tr, te in splits if 1 in d["runs"][te])
    alpha = (
        0.01 * Z.shape[1]
    )  # little shrinkage: decision values far from the -1 of an unknown class
    rows, cross = ridge.centred_fold(kernel_of(d), train, test, alpha)
    with linalg.Workers(2) as w:
        factor = linalg.BlockCholesky(rows).factor(w)
        ((_, D),) = ridge.fold_decisions(factor, cross, y_idx[None, train], classes.size, w)
    ref = RidgeClassifier(alpha=alpha).fit(Z[train], y[train]).predict(Z[test])
    assert "rare" in y[test] and "rare" not in ref and (D[:, 0, classes == "rare"] == -1).all()
    np.testing.assert_array_equal(classes[D[:, 0, :].argmax(axis=1)], ref)


def test_scores_and_p_equal_scikit_learns_permutation_test(small_tiles: None) -> None:
    """``permutation_test_score(RidgeClassifier, groups=runs)``: the same score, null scores and p."""
    d = synthetic(signal=0.0, seed=4)
    Z = zscore_by_session(d["X"], d["sessions"])
    splits = dec.run_grouped_splits(d["runs"], 4)
    alpha = 2.0 * Z.shape[1]
    seed = dec.permutation_seed(0, 3)
    score, perm_scores, p = permutation_test_score(
        RidgeClassifier(alpha=alpha), Z, d["y"], groups=d["runs"], cv=splits, n_permutations=30,
        random_state=seed, scoring="balanced_accuracy",
    )  # fmt: skip
    with linalg.Workers(2) as w:
        out = ridge.cross_validate_ridge(
            kernel_of(d), d["y"], d["runs"], splits, alpha, 30, seed, w
        )
    assert np.mean(out["fold_scores"]) == pytest.approx(score, abs=1e-12)
    np.testing.assert_allclose(out["permutation_scores"], perm_scores, rtol=0, atol=1e-12)
    assert out["p_value"] == pytest.approx(p, abs=1e-12)
    ge = sum(s >= np.mean(out["fold_scores"]) for s in out["permutation_scores"])
    assert out["p_value"] == (1 + ge) / 31 and 0 < ge < 30  # no signal: p between the ends


# ----------------------------------------------------------------------------------------------
# the stage


def test_planted_signal_found_null_spread() -> None:
    """Planted signal: p = 1/(N+1). Null subjects (labels unrelated to the data): p spread over (0, 1]."""
    n_perm = 100
    d = synthetic(signal=1.0, seed=11, n_classes=12, n_runs=12, run_len=(13, 12), p=400)
    splits = dec.run_grouped_splits(d["runs"], 5)
    with linalg.Workers(2) as w:
        out = ridge.cross_validate_ridge(
            kernel_of(d), d["y"], d["runs"], splits, 400.0, n_perm, 1, w
        )
    assert np.mean(out["fold_scores"]) > 1 / 12 + 0.3
    assert out["p_value"] == 1 / (n_perm + 1)
    p_null = []
    for seed in range(10):
        d = synthetic(signal=0.0, seed=100 + seed, n_classes=12, n_runs=12, run_len=(13, 12), p=400)
        with linalg.Workers(2) as w:
            out = ridge.cross_validate_ridge(
                kernel_of(d), d["y"], d["runs"], splits, 400.0, n_perm, seed, w
            )
        ge = sum(s >= np.mean(out["fold_scores"]) for s in out["permutation_scores"])
        assert out["p_value"] == (1 + ge) / (n_perm + 1)
        p_null.append(out["p_value"])
    print("null p values:", sorted(p_null))
    # uniform p: P(max <= 0.5) = 0.5^10 = 0.001; P(4 or more of 10 below 0.05) < 0.002
    assert max(p_null) > 0.5 and sum(p < 0.05 for p in p_null) < 4
    assert len(set(p_null)) >= 5


@pytest.fixture(scope="module")
def curated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("curated")
    make_curated(root, 1, seed=1)
    make_curated(root, 2, classes=("food", "kitchen", "sports"), n_runs=6, first_run=41, seed=3)
    return root


def test_stage_outputs_name_classifier_standardization_and_alpha(
    curated: Path, tmp_path: Path
) -> None:
    cfg = dec.DecodeConfig(n_folds=4, permutations=20, alpha=0.5)
    results = dec.decode(curated, tmp_path / "out", None, cfg)
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    c = on_disk["config"]
    assert (
        c["classifier"] == "ridge"
        and c["alpha"] == 0.5
        and "RidgeClassifier" in c["classifier_detail"]
    )
    assert "z-scored within its session" in c["standardization"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Classifier: ridge" in report and "alpha = 0.5 x n_voxels" in report
    assert "Standardization: each voxel z-scored within its session" in report
    for name, r in on_disk["subjects"].items():
        assert r["alpha"] == 0.5 * r["n_voxels"]
        assert f"{name} {r['alpha']:g}" in report
        assert r["mean_balanced_accuracy"] > 1 / r["n_classes"] + 0.3
        assert r["permutation_p_value"] == pytest.approx(1 / 21)
        assert len(r["permutation_means"]) == 20
        assert (tmp_path / "out" / f"confusion_{name}.png").is_file()
    assert (tmp_path / "out" / "accuracy_vs_chance.png").is_file()
    logistic = dec.decode(
        curated,
        tmp_path / "lr",
        [1],
        dec.DecodeConfig(n_folds=4, permutations=0, classifier="logistic"),
    )
    assert logistic["config"]["classifier"] == "logistic"
    assert "StandardScaler" in (tmp_path / "lr" / "report.md").read_text()
    assert "alpha" not in logistic["subjects"]["sub-01"]


def test_matrix_and_4d_file_give_the_same_results(tmp_path: Path) -> None:
    """Without the matrix the 4D file is streamed: the same kernel to the bit, the same results.

    Some mask voxels are 0 in every trial: left out of the streamed rows, kept (as zeros) in the
    matrix, where they shift the chunks unless the streamed rows are put back in the matrix's columns.
    """
    matrix, stream = tmp_path / "matrix", tmp_path / "stream"
    make_curated(matrix, 1, seed=5, dead=25)
    stream.mkdir()
    for suffix in (".nii.gz", "_mask.nii.gz", "_labels.npy", "_runs.npy", "_trials.tsv"):
        (stream / f"sub-01{suffix}").write_bytes((matrix / f"sub-01{suffix}").read_bytes())
    trials = np.arange(0, 192, 2)
    sessions = decode_data.load_sessions(nsd.curated_files(1, matrix), 192)[trials]
    kernels = []
    for folder in (matrix, stream):
        with (
            decode_data.ColumnReader(nsd.curated_files(1, folder), trials, 192) as read,
            linalg.Workers(2) as w,
        ):
            kernels.append(ridge.subject_kernel(read, read.n_rows, read.n_cols, sessions, w, 64))
    assert kernels[0][1] == kernels[1][1] == int(np.load(matrix / "sub-01_X.npy").shape[1]) - 25
    np.testing.assert_array_equal(kernels[0][0], kernels[1][0])
    cfg = dec.DecodeConfig(n_folds=4, permutations=10, subsample=150)
    a = dec.decode(matrix, tmp_path / "a", [1], cfg)["subjects"]["sub-01"]
    b = dec.decode(stream, tmp_path / "b", [1], cfg)["subjects"]["sub-01"]
    assert a == b and a["n_trials"] == 150


def test_reader_reads_the_matrix_rows_by_pread(curated: Path) -> None:
    files = nsd.curated_files(1, curated)
    trials = np.array([0, 3, 4, 100, 191])
    with decode_data.ColumnReader(files, trials, 192) as read:
        assert read.path == files.matrix and read.n_cols == int(
            np.load(files.matrix, mmap_mode="r").shape[1]
        )
        np.testing.assert_array_equal(read(5, 40), np.load(files.matrix)[trials, 5:40])
    with pytest.raises(FormatError, match="rows, expected one per volume"):
        decode_data.ColumnReader(files, trials, 193)


def test_sessions_come_from_the_trial_table(curated: Path, tmp_path: Path) -> None:
    files = nsd.curated_files(1, curated)
    sessions = decode_data.load_sessions(files, 192)
    assert sessions.tolist() == sorted(sessions.tolist()) and set(sessions.tolist()) == {1, 2, 3}
    bad = tmp_path / "bad"
    bad.mkdir()
    for suffix in (".nii.gz", "_labels.npy", "_runs.npy"):
        (bad / f"sub-01{suffix}").write_bytes((curated / f"sub-01{suffix}").read_bytes())
    (bad / "sub-02.nii.gz").write_bytes((curated / "sub-02.nii.gz").read_bytes())
    for suffix in ("_labels.npy", "_runs.npy", "_trials.tsv"):
        (bad / f"sub-02{suffix}").write_bytes((curated / f"sub-02{suffix}").read_bytes())
    with pytest.raises(
        MissingInputError, match="sub-01_trials.tsv: missing curated file of sub-01"
    ):
        dec.decode(bad, tmp_path / "o", [2, 1], dec.DecodeConfig(permutations=0))
    assert not (tmp_path / "o").exists()  # checked before any subject is decoded
    (bad / "sub-01_trials.tsv").write_text("trial\trun\n1\t1\n")
    with pytest.raises(FormatError, match="`session` column"):
        decode_data.load_sessions(nsd.curated_files(1, bad), 192)
    (bad / "sub-01_trials.tsv").write_text("session\n" + "1\n" * 191)
    with pytest.raises(FormatError, match="expected 192 integer sessions"):
        decode_data.load_sessions(nsd.curated_files(1, bad), 192)


def test_rerun_in_another_process_is_byte_identical(curated: Path, tmp_path: Path) -> None:
    """A rerun in a fresh process writes the same bytes; with other jobs and BLAS threads, the same
    bytes but for the jobs recorded in the config."""
    cfg = dec.DecodeConfig(n_folds=4, permutations=30, jobs=1)
    dec.decode(curated, tmp_path / "a", None, cfg)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "code")}
    for name, jobs, threads in (("b", 1, "1"), ("c", 3, "2")):
        code = (
            "from nsdprep.stages import decode as d; "
            f"d.decode({str(curated)!r}, {str(tmp_path / name)!r}, None, "
            f"d.DecodeConfig(n_folds=4, permutations=30, jobs={jobs}))"
        )
        threads_env = {"OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}
        subprocess.run([sys.executable, "-c", code], check=True, env={**env, **threads_env})
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert "results.json" in names and "report.md" in names
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
        if name != "results.json":
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "c" / name).read_bytes()
    a, c = (json.loads((tmp_path / x / "results.json").read_text()) for x in "ac")
    assert (a["config"].pop("jobs"), c["config"].pop("jobs")) == (1, 3)
    assert a == c


def test_config_checks_classifier_and_alpha() -> None:
    with pytest.raises(ValueError, match="--classifier must be one of ridge, logistic, got 'svm'"):
        dec.DecodeConfig(classifier="svm")
    with pytest.raises(ValueError, match="--alpha must be > 0, got 0"):
        dec.DecodeConfig(alpha=0)
    assert dec.DecodeConfig().classifier == "ridge"


def test_shared1000_split_trains_on_train_and_tests_on_test(tmp_path: Path) -> None:
    """SPLIT=shared1000: one fit on the train rows, scored on the test rows only; the same
    predictions as scikit-learn's RidgeClassifier on the session-z-scored data."""
    import pandas as pd

    folder = tmp_path / "curated"
    truth = make_curated(folder, 1, seed=7)
    table_path = folder / "sub-01_trials.tsv"
    table = pd.read_csv(table_path, sep="\t")
    n = len(table)
    test = np.zeros(n, bool)
    test[np.random.default_rng(2).choice(n, size=n // 4, replace=False)] = True
    table["split"] = np.where(test, "test", "train")
    table.to_csv(table_path, sep="\t", index=False)
    cfg = dec.DecodeConfig(permutations=10, alpha=0.5, split="shared1000")
    res = dec.decode(folder, tmp_path / "out", [1], cfg)["subjects"]["sub-01"]
    assert (res["split"], res["n_train"], res["n_test"]) == (
        "shared1000",
        n - test.sum(),
        test.sum(),
    )
    assert res["n_trials"] == test.sum() and len(res["fold_balanced_accuracy"]) == 1
    X = np.load(folder / "sub-01_X.npy").astype(np.float64)
    Z = zscore_by_session(X, table["session"].to_numpy())
    y = np.load(folder / "sub-01_labels.npy")
    Zs = Z[:, np.any(X != 0, axis=0)]
    clf = RidgeClassifier(alpha=0.5 * Zs.shape[1]).fit(Zs[~test], y[~test])
    expected = balanced_accuracy_score(y[test], clf.predict(Zs[test]))
    assert res["mean_balanced_accuracy"] == pytest.approx(expected, abs=1e-6)
    assert res["mean_balanced_accuracy"] > 1 / res["n_classes"] + 0.2  # the planted signal
    assert res["permutation_p_value"] == pytest.approx(1 / 11)
    assert truth["labels"].size == n
    with pytest.raises(UsageError, match="CLASSIFIER=ridge"):
        dec.DecodeConfig(split="shared1000", classifier="logistic")
