"""Run-grouped cross-validated decoding baseline on ``derivatives/curated_3mm``.

Per subject, a linear classifier predicts the supercategory label of each trial
(``sub-XX_labels.npy``) from its curated 3 mm betas (int16 x300, the voxels of the curated mask);
:mod:`nsdprep.stages.decode.report` writes ``results.json``, ``report.md`` and the plots. Two
classifiers (``DecodeConfig.classifier``):

- ``"ridge"`` (default): a ridge classifier in the dual form, :mod:`nsdprep.stages.decode.ridge`.
  Each voxel is z-scored within its session (label-free); one kernel per subject, streamed from the
  int16 curated matrix ``sub-XX_X.npy`` in float32 column chunks; per fold the kernel is centred on
  the training trials and its training block factored once (Cholesky) for the true labels and every
  permutation together. ``alpha = alpha_per_voxel x n_voxels``, fixed. Made for a real-size
  subject (22k trials x 56k voxels, 100 permutations) in minutes and < 4 GB (estimated peak
  3.5 GB: :func:`ridge_memory_bytes`; measured by ``bench/bench_decode.py``).
- ``"logistic"``: ``StandardScaler`` fitted per training fold → L2 ``LogisticRegression`` (lbfgs),
  each permutation a full scikit-learn cross-validation (kept for comparison: ~7 hours and 11 GB
  for a real-size subject).

Common to both:

- **Voxels**: those of the curated mask nonzero in at least one selected trial: the grey-matter mask
  the curated stage applied, minus voxels NSD never had valid data for, read from the data.
- **Cross-validation**: :class:`~sklearn.model_selection.GroupKFold` splits by run
  (``sub-XX_runs.npy``), checked before use: no run is in training and test at once (trials of a run
  share slow drifts, which would inflate accuracy). Scores are balanced accuracies.
- **Chance**: ``1 / n_classes``, a stratified ``DummyClassifier`` in the same folds, and a
  permutation test: labels permuted within runs (the permutations scikit-learn's
  ``permutation_test_score(groups=runs)`` draws for the same seed), each one cross-validated in full:
  ``p = (1 + #{perm >= observed}) / (1 + permutations)``, never below ``1 / (1 + permutations)``
  (default 100 permutations: p >= 0.0099). 0 permutations skip the test.
- **Memory**: the 4D file is never loaded whole. Ridge: the kernel (``4 n^2`` bytes), half the
  training block and the test block of one fold; logistic: threads over one float32 data matrix,
  ``--memory-gb`` caps the fits run at once. Subjects are decoded one after the other: with ridge,
  ``jobs`` threads share one subject's products (BLAS-bound, so one subject at a time uses every
  core with half the memory of two).
- **Determinism**: fixed seeds (the permutations' from ``seed`` and the subject: the same in any
  process), ``GroupKFold`` without shuffling, rounded floats, PNGs without metadata. Ridge: each
  product is cut into tiles fixed by the matrix sizes, each a single-threaded BLAS call, so the
  numbers do not depend on ``jobs`` (:mod:`nsdprep.stages.decode.linalg`); logistic: one BLAS
  thread (set by the Makefile). Time and peak RSS are logged, not written: every output is
  byte-identical on ``datalad rerun``.
"""

from __future__ import annotations

import argparse
import logging
import resource
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.preprocessing import StandardScaler

from nsdprep import options
from nsdprep.core import nsd, provenance
from nsdprep.core._io import require_content
from nsdprep.core.errors import FormatError, NsdPrepError, UsageError
from nsdprep.core.nsd import CuratedFiles
from nsdprep.stages.decode.data import (
    ColumnReader,
    find_subjects,
    load_labels_runs,
    load_masked,
    load_sessions,
    load_split,
    select_trials,
    subject_files,
)

log = logging.getLogger(__name__)

#: One cross-validation split: training and test row numbers.
Split = tuple[np.ndarray, np.ndarray]
DEFAULT_N_FOLDS = 5
#: The smallest reachable p is 1/101 < 0.01.
DEFAULT_PERMUTATIONS = options.Options().permutations
#: Inverse L2 strength, fixed, not tuned: ~64k standardized voxels and at most a few ten thousand
#: trials are separable, so strong shrinkage gives a stable baseline (and lbfgs few iterations).
DEFAULT_C = 0.01
DEFAULT_MAX_ITER = 500
#: Classifiers: the fast ridge decoder, and the logistic path kept for comparison.
CLASSIFIERS = ("ridge", "logistic")
#: Ridge penalty per voxel (``alpha = DEFAULT_ALPHA x n_voxels``; the kernel's diagonal is ~n_voxels
#: after z-scoring), fixed, not tuned (tuning would cost a factorization per candidate and fold). On
#: synthetic subjects shaped like NSD's (trials/voxels ~0.3-0.4, shared low-rank noise, run and
#: session offsets, balanced or NSD-like unbalanced classes) the balanced accuracy was flat within
#: ~10% for 0.003-0.1 and fell to chance above ~0.3 with unbalanced classes (strong shrinkage leaves
#: the intercept's class prior to decide: the largest class every time); 0.03 is inside the plateau.
DEFAULT_ALPHA = options.Options().alpha
#: How the rows are split for testing (``split`` of :class:`DecodeConfig`).
SPLIT_RULE = {
    "cv": "GroupKFold by run (no shuffling)",
    "shared1000": "held out: trained on the rows of split 'train', tested on the rows of split "
    "'test' (the shared 1000 images, sharedix)",
}
#: Memory budget used to cap the number of jobs run at once (the machine has 24 GB, shared).
DEFAULT_MEMORY_GB = 16.0
CLASSIFIER_DETAIL = {
    "ridge": "RidgeClassifier (one-vs-rest targets +1/-1, intercept) in the dual form: one kernel "
    "per subject, one Cholesky per fold for the true and all permuted labels",
    "logistic": "StandardScaler -> LogisticRegression(lbfgs, L2)",
}
STANDARDIZATION = {
    "ridge": "each voxel z-scored within its session over the session's decoded trials "
    "(label-free); kernel centred per fold on the training trials' mean",
    "logistic": "StandardScaler fitted on each training fold",
}
MASK_RULE = (
    "voxels of sub-XX_mask.nii.gz (grey matter; with make curated VALID=1 grey matter valid in "
    "every session) that are nonzero in at least one selected trial"
)


@dataclass(frozen=True)
class DecodeConfig:
    """Settings of one decoding run (all recorded in ``results.json``)."""

    n_folds: int = DEFAULT_N_FOLDS
    permutations: int = DEFAULT_PERMUTATIONS
    seed: int = 0
    subsample: int = 0
    jobs: int = 1
    C: float = DEFAULT_C
    max_iter: int = DEFAULT_MAX_ITER
    memory_gb: float = DEFAULT_MEMORY_GB
    #: "ridge" (dual-form ridge classifier, session z-scoring) or "logistic" (the former path)
    classifier: str = options.Options().classifier
    #: ridge only: penalty per voxel; the ridge's alpha is ``alpha x n_voxels``
    alpha: float = DEFAULT_ALPHA
    #: "cv" (run-grouped folds) or "shared1000" (train on the ``train`` rows, test on ``test``)
    split: str = options.Options().split

    def __post_init__(self) -> None:
        if self.split not in SPLIT_RULE:
            raise UsageError(f"--split must be one of {', '.join(SPLIT_RULE)}, got {self.split!r}")
        if self.split != "cv" and self.classifier != "ridge":
            raise UsageError(
                f"SPLIT={self.split} is decoded with CLASSIFIER=ridge (logistic: run-grouped folds)"
            )
        minimum = {"n_folds": 2, "permutations": 0, "subsample": 0, "jobs": 1, "max_iter": 1}
        for name, value in asdict(self).items():
            flag = "--" + name.replace("_", "-")
            if name in minimum and value < minimum[name]:
                raise UsageError(f"{flag} must be >= {minimum[name]}, got {value}")
            if name in ("C", "memory_gb", "alpha") and not value > 0:
                raise UsageError(f"{flag} must be > 0, got {value}")
        if self.classifier not in CLASSIFIERS:
            raise UsageError(
                f"--classifier must be one of {', '.join(CLASSIFIERS)}, got {self.classifier!r}"
            )


# ----------------------------------------------------------------------------------------------
# cross-validation


def run_grouped_splits(runs: np.ndarray, n_folds: int) -> list[Split]:
    """``GroupKFold`` splits by run; raises if any run would be in training and test at once.

    ``n_folds`` is lowered to the number of runs when there are fewer runs (with a warning).
    """
    from sklearn.model_selection import GroupKFold

    n_runs = len(np.unique(runs))
    if n_runs < 2:
        raise FormatError(f"run-grouped cross-validation needs >= 2 runs, found {n_runs}")
    if n_folds > n_runs:
        log.warning("only %d runs: using %d folds instead of %d", n_runs, n_runs, n_folds)
        n_folds = n_runs
    splits = list(GroupKFold(n_splits=n_folds).split(np.zeros((len(runs), 1)), groups=runs))
    check_splits_disjoint(splits, runs)
    return splits


def check_splits_disjoint(splits: Sequence[Split], runs: np.ndarray) -> None:
    """Raise :class:`NsdPrepError` if a run (hence also a trial) is in training and test at once."""
    for k, (train, test) in enumerate(splits):
        shared = np.intersect1d(runs[train], runs[test])
        if shared.size:
            raise NsdPrepError(
                f"cross-validation fold {k}: runs {shared[:10].tolist()} are in training and test"
            )


def make_classifier(seed: int = 0, C: float = DEFAULT_C, max_iter: int = DEFAULT_MAX_ITER) -> Any:
    """:class:`BlockwiseStandardScaler` → L2 ``LogisticRegression`` (lbfgs), fixed random state.

    The scaler works in place (``copy=False``): scikit-learn's cross-validation hands every fit and
    prediction a fresh copy of the fold's rows (fancy indexing), so the caller's matrix is never
    modified and a full-size copy per job is saved. The lbfgs workspace depends on
    ``n_classes x n_voxels`` only (~25 x 8 bytes each), not on the number of trials.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    return make_pipeline(
        BlockwiseStandardScaler(copy=False),
        LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, random_state=seed),
    )


def rows_of(X: np.ndarray) -> Any:
    """Pipeline step that maps row numbers (an ``(n, 1)`` array) to a fresh copy of those rows of X.

    Handed ``X`` itself, ``permutation_test_score`` still holds one fold's training and test copies
    (its loop variables) while it makes the next fold's: two training copies per job (measured at
    real size: 16.3 GB peak instead of 11.1). Handed row numbers, scikit-learn copies those, and
    this step gathers the rows inside ``fit`` and ``predict``, one copy at a time. ``X`` is reached
    through a closure, never a parameter: ``clone`` deep-copies parameters but not functions.
    """
    from sklearn.preprocessing import FunctionTransformer

    def take(rows: np.ndarray) -> np.ndarray:
        return X[rows[:, 0]]

    return FunctionTransformer(take)


class BlockwiseStandardScaler(StandardScaler):
    """``StandardScaler`` whose ``fit`` works on blocks of columns, to bound its memory.

    scikit-learn's ``fit`` builds float64 temporaries larger than a float32 input.
    Here mean and variance are computed in float64 on ``BLOCK`` columns at a time; they match
    ``StandardScaler`` to round-off, ``transform`` is inherited, constant columns get a scale of 1.
    Only the default ``with_mean``/``with_std`` are supported, without weights.
    """

    #: Columns per block.
    BLOCK = 2048

    def fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> BlockwiseStandardScaler:
        """Compute ``mean_``, ``var_`` and ``scale_`` per column, block by block."""
        from sklearn.utils.validation import validate_data

        if sample_weight is not None or not (self.with_mean and self.with_std):
            raise UsageError("BlockwiseStandardScaler supports only the default, unweighted fit")
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=True)
        n, p = X.shape
        mean = np.empty(p, dtype=np.float64)
        var = np.empty(p, dtype=np.float64)
        for a in range(0, p, self.BLOCK):
            block = X[:, a : a + self.BLOCK].astype(np.float64)
            mean[a : a + self.BLOCK] = block.mean(axis=0)
            var[a : a + self.BLOCK] = block.var(axis=0)
        scale = np.sqrt(var)
        scale[var <= 10 * np.finfo(np.float64).eps * np.maximum(mean**2, 1.0)] = 1.0
        self.mean_, self.var_, self.scale_ = mean, var, scale
        self.n_samples_seen_ = n
        return self


def parallel_jobs(
    X: np.ndarray, splits: Sequence[Split], n_classes: int, config: DecodeConfig
) -> int:
    """``--jobs``, lowered so the estimated peak memory stays within ``--memory-gb`` (at least 1).

    Per job (one fit): the training copy of ``X`` (freed before the test copy is made, see
    :func:`rows_of`), the scaler's float64 block, the lbfgs workspace (~25 doubles per coefficient)
    and the class probabilities; once: ``X`` itself and ~0.5 GB of interpreter and libraries.
    """
    n, p = X.shape
    rows = max(max(len(train), len(test)) for train, test in splits)
    n_train = max(len(train) for train, _ in splits)
    per_job = rows * p * X.itemsize + n_train * min(p, BlockwiseStandardScaler.BLOCK) * 8
    per_job += 25 * n_classes * (p + 1) * 8 + n * n_classes * 8
    fit = int((config.memory_gb * 1e9 - X.nbytes - 0.5e9) // per_job)
    if fit < 1:
        log.warning("one job (%.1f GB) exceeds --memory-gb; running one anyway", per_job / 1e9)
    elif fit < config.jobs:
        log.info("running %d job(s) at a time instead of %d (memory budget)", fit, config.jobs)
    return max(1, min(config.jobs, fit))


def permutation_seed(seed: int, subject: int) -> int:
    """Seed of one subject's permutations: fixed by ``(seed, subject)``, the same in any process."""
    return int(np.random.SeedSequence([seed, subject]).generate_state(1)[0])


def cross_validate(
    X: np.ndarray,
    y: np.ndarray,
    runs: np.ndarray,
    config: DecodeConfig,
    subject: int = 0,
) -> dict[str, Any]:
    """Classifier, stratified dummy and within-run permutation test on the same run-grouped folds.

    Returns ``splits``; the classifier's out-of-fold predictions ``y_pred`` and ``fold_scores``
    (balanced accuracy); ``dummy_scores``; ``permutation_scores`` (mean balanced accuracy per
    permutation) and ``p_value``, both ``None`` without permutations. scikit-learn splits row
    numbers; the jobs, threads, gather rows from the one ``X`` (:func:`rows_of`), never modified.
    """
    from joblib import parallel_config
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import cross_val_predict, permutation_test_score

    splits = run_grouped_splits(runs, config.n_folds)
    jobs = parallel_jobs(X, splits, np.unique(y).size, config)
    clf = make_classifier(config.seed, config.C, config.max_iter)
    clf.steps.insert(0, ("rows", rows_of(X)))  # scikit-learn splits row numbers, not X
    idx = np.arange(len(y)).reshape(-1, 1)
    out: dict[str, Any] = {"splits": splits, "permutation_scores": None, "p_value": None}
    with warnings.catch_warnings(), parallel_config("threading", n_jobs=jobs):
        # expected when a test fold lacks a class (short runs, many classes); the score is right
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        y_pred = out["y_pred"] = cross_val_predict(clf, idx, y, cv=splits, n_jobs=jobs)
        out["fold_scores"] = [balanced_accuracy_score(y[te], y_pred[te]) for _, te in splits]
        out["dummy_scores"] = dummy_scores(y, splits, config.seed)
        if config.permutations:
            _, perms, p_value = permutation_test_score(
                clf,
                idx,
                y,
                groups=runs,
                cv=splits,
                n_permutations=config.permutations,
                n_jobs=jobs,
                random_state=permutation_seed(config.seed, subject),
                scoring="balanced_accuracy",
            )
            out["permutation_scores"], out["p_value"] = perms.tolist(), float(p_value)
    return out


def dummy_scores(y: np.ndarray, splits: Sequence[Split], seed: int) -> list[float]:
    """Balanced accuracy per fold of a stratified ``DummyClassifier`` (it only counts rows: no data)."""
    from sklearn.dummy import DummyClassifier
    from sklearn.model_selection import cross_val_score

    dummy = DummyClassifier(strategy="stratified", random_state=seed)
    idx = np.arange(len(y)).reshape(-1, 1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return cross_val_score(dummy, idx, y, cv=splits, scoring="balanced_accuracy").tolist()


def cross_validate_ridge(
    files: CuratedFiles,
    trials: np.ndarray,
    y: np.ndarray,
    runs: np.ndarray,
    n_volumes: int,
    config: DecodeConfig,
    timings: dict[str, float] | None = None,
    held_out: list[Split] | None = None,
) -> dict[str, Any]:
    """The ridge decoder on one subject's selected trials: the fields of :func:`cross_validate`.

    Plus ``n_voxels`` and ``alpha`` (the ridge penalty used: ``config.alpha x n_voxels``).
    ``timings`` (if given) receives the seconds of the kernel and of the folds.
    """
    from nsdprep.stages.decode import ridge
    from nsdprep.stages.decode.linalg import Workers

    sessions = load_sessions(files, n_volumes)[trials]
    splits = held_out or run_grouped_splits(runs, config.n_folds)
    _check_ridge_memory(trials.size, splits, config.memory_gb)
    t0 = time.perf_counter()
    with ColumnReader(files, trials, n_volumes) as read, Workers(config.jobs) as workers:
        K, n_voxels = ridge.subject_kernel(read, read.n_rows, read.n_cols, sessions, workers)
        t_kernel = time.perf_counter() - t0
        if n_voxels == 0:
            raise FormatError(
                f"{read.path}: every selected trial is 0 everywhere; nothing to decode"
            )
        alpha = config.alpha * n_voxels
        out = ridge.cross_validate_ridge(
            K,
            y,
            runs,
            splits,
            alpha,
            config.permutations,
            permutation_seed(config.seed, files.subject),
            workers,
            timings,
        )
    if timings is not None:
        timings["kernel_seconds"] = t_kernel
    log.info("%s: kernel %.1f s (%d voxels), folds %.1f s", nsd.bids_subject_label(files.subject),
             t_kernel, n_voxels, time.perf_counter() - t0 - t_kernel)  # fmt: skip
    out.update(splits=splits, dummy_scores=dummy_scores(y, splits, config.seed))
    out.update(n_voxels=n_voxels, alpha=alpha)
    return out


def ridge_memory_bytes(n: int, splits: Sequence[Split]) -> int:
    """Estimated peak bytes of the ridge decoder for ``n`` trials (float32 throughout).

    The kernel (``n x n``) plus the larger of: while it is built, two standardized column chunks
    and the int16 one being read; per fold, the lower training block rows, the test block and the
    targets of a batch. Plus ~0.3 GB of interpreter and libraries.
    """
    from nsdprep.stages.decode.linalg import CHOL_TILE
    from nsdprep.stages.decode.ridge import KERNEL_CHUNK, LABEL_BATCH

    building = 2 * 4 * n * KERNEL_CHUNK + 2 * n * KERNEL_CHUNK
    fold = max(
        4 * (len(tr) * (len(tr) + CHOL_TILE) // 2 + len(tr) * len(te))
        + 12 * len(tr) * 12 * LABEL_BATCH
        for tr, te in splits
    )
    return 4 * n * n + max(building, fold) + 300_000_000


def _check_ridge_memory(n: int, splits: Sequence[Split], memory_gb: float) -> None:
    need = ridge_memory_bytes(n, splits)
    if need > memory_gb * 1e9:
        log.warning(
            "the ridge decoder needs ~%.1f GB for %d trials, above --memory-gb %.1f; running anyway",
            need / 1e9, n, memory_gb,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# per subject and whole run


def decode_subject(
    files: CuratedFiles, config: DecodeConfig, timings: dict[str, float] | None = None
) -> dict[str, Any]:
    """Load one subject, cross-validate the classifier and the chance models; return its results.

    Time and peak RSS are logged (INFO), not returned: the results must not change between runs.
    ``timings`` (ridge, if given) receives the seconds of the kernel and of the folds.
    """
    from nsdprep.core.nifti import read_header, volume_count
    from nsdprep.stages.decode.report import subject_results

    t0 = time.perf_counter()
    label = nsd.bids_subject_label(files.subject)
    n_volumes = volume_count(read_header(files.betas))
    labels_all, runs_all = load_labels_runs(files, n_volumes)
    trials = select_trials(labels_all, config.subsample)
    y, runs = labels_all[trials], runs_all[trials]
    classes = np.unique(y)
    if classes.size < 2:
        raise FormatError(f"{files.labels}: need >= 2 classes to decode, found {classes.tolist()}")
    n_runs = np.unique(runs).size
    log.info(
        "%s: %d of %d trials, %d classes, %d runs", label, y.size, n_volumes, classes.size, n_runs
    )
    held_out = None
    if config.split == "shared1000":
        part = load_split(files, n_volumes)[trials]
        train, test = (
            np.flatnonzero(part == nsd.SPLIT_TRAIN),
            np.flatnonzero(part == nsd.SPLIT_TEST),
        )
        if train.size == 0 or test.size == 0:
            raise FormatError(
                f"{files.trials}: SPLIT=shared1000 needs train and test rows, found "
                f"{train.size} and {test.size}"
            )
        held_out = [(train, test)]  # split by image: an image's repeats are on one side only
    if config.classifier == "ridge":
        cv = cross_validate_ridge(files, trials, y, runs, n_volumes, config, timings, held_out)
        n_voxels, extra = cv["n_voxels"], {"alpha": float(cv["alpha"])}
    else:
        X, mask, _ = load_masked(files, trials, desc=label)
        cv = cross_validate(X, y, runs, config, files.subject)
        del X
        n_voxels, extra = int(mask.sum()), {}
    if held_out:  # scored on the test rows only
        ((train, test),) = held_out
        cv = {**cv, "y_pred": cv["y_pred"][test], "splits": [(train, np.arange(test.size))]}
        y, runs = y[test], runs[test]
        extra |= {"split": config.split, "n_train": int(train.size), "n_test": int(test.size)}
    res = subject_results(label, y, runs, cv, n_available=n_volumes, n_voxels=n_voxels)
    res.update(extra)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB
    log.info("%s: %.1f s, peak RSS %.2f GB", label, time.perf_counter() - t0, peak_gb)
    return res


def decode(
    curated_dir: str | Path,
    out_dir: str | Path,
    subjects: Sequence[int] | None = None,
    config: DecodeConfig | None = None,
    command: str = "",
) -> dict[str, Any]:
    """Decode every subject, write ``results.json``, the PNG plots and ``report.md``; return results.

    All inputs are checked before any subject is processed, so a missing file fails fast.
    ``command`` (the command line that ran, if any) is recorded in the results.
    """
    from tqdm.auto import tqdm

    from nsdprep.stages.decode.report import write_outputs

    config = DecodeConfig() if config is None else config
    curated_dir, out_dir = Path(curated_dir), Path(out_dir)
    subjects = find_subjects(curated_dir) if not subjects else sorted(set(subjects))
    files = [subject_files(curated_dir, s) for s in subjects]
    if config.classifier == "ridge":  # the sessions, for the z-scoring
        for f in files:
            require_content(f.trials, f"curated file of {nsd.bids_subject_label(f.subject)}",
                            "build it with `make curated` (or pick other --subjects)")  # fmt: skip
    subsample_rule = (
        "stratified by label, evenly spaced in time" if config.subsample else "all trials"
    )
    results: dict[str, Any] = {
        "config": {
            **asdict(config),
            "classifier": config.classifier,
            "classifier_detail": CLASSIFIER_DETAIL[config.classifier],
            "standardization": STANDARDIZATION[config.classifier],
            "alpha_rule": "alpha x n_voxels (per subject: `alpha` in its record)"
            if config.classifier == "ridge"
            else None,
            "cv": SPLIT_RULE[config.split],
            "metric": "balanced accuracy",
            "mask": MASK_RULE,
            "subsample_rule": subsample_rule,
            "permutation_null": "labels shuffled within runs, full cross-validation each",
        },
        "command": command,
        "software": provenance.versions("numpy", "scipy", "scikit-learn", "nibabel", "matplotlib"),
        "subjects": {},
    }
    for f in tqdm(files, desc="subjects", unit="subject", disable=None):
        res = decode_subject(f, config)
        results["subjects"][res["subject"]] = res
    write_outputs(results, out_dir, jobs=config.jobs)
    return results


# ----------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m nsdprep decode`` (``JOBS``, ``PERMUTATIONS``, ... from the spec)."""
    add = parser.add_argument
    add("--curated", type=Path, default=Path(nsd.CURATED_DIR), help="curated folder (sub-XX*)")
    add("--out", type=Path, default=Path(nsd.DECODING_DIR), help="output folder")
    add("--subjects", type=int, nargs="+", metavar="N", help="default: all in --curated")
    options.add_arguments(parser, options.passed_to("decode"))
    add("--seed", type=int, default=0, help="seed of classifier, dummy and permutations")
    add("--n-folds", type=int, default=DEFAULT_N_FOLDS, help="run-grouped folds")
    add("--C", type=float, default=DEFAULT_C, help="logistic: inverse L2 strength")
    add("--max-iter", type=int, default=DEFAULT_MAX_ITER, help="logistic: lbfgs iterations")
    add(
        "--memory-gb", type=float, default=DEFAULT_MEMORY_GB, help="logistic: caps the fits at once"
    )


def main(args: argparse.Namespace) -> int:
    """Run the decoding stage from parsed arguments; print a one-line summary per subject."""
    from nsdprep.stages.decode.report import REPORT_NAME

    opts = options.from_args(args)
    config = DecodeConfig(
        n_folds=args.n_folds,
        permutations=opts.permutations,
        seed=args.seed,
        subsample=opts.subsample,
        jobs=opts.jobs,
        C=args.C,
        max_iter=args.max_iter,
        memory_gb=args.memory_gb,
        classifier=opts.classifier,
        alpha=opts.alpha,
        split=opts.split,
    )
    results = decode(args.curated, args.out, args.subjects, config, provenance.command_of(args))
    for r in results["subjects"].values():
        p = r["permutation_p_value"]
        p_text = "no permutations" if p is None else f"p {p:.3g} >= {r['permutation_p_min']:.3g}"
        print(f"{r['subject']}: balanced accuracy {r['mean_balanced_accuracy']:.3f} ({p_text})")
    print(f"wrote {args.out / REPORT_NAME}")
    return 0
