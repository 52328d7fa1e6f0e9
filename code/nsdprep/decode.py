"""Run-grouped cross-validated decoding baseline on ``derivatives/curated_3mm``, with a report.

Per subject, the curated 4D betas (``sub-XX.nii.gz``, int16 x300, zero outside the grey-matter mask)
are streamed volume by volume into a ``(n_trials, n_voxels)`` float32 matrix of the voxels in the
*analysis mask*, and a linear classifier (``StandardScaler`` → ``LogisticRegression``) predicts the
supercategory label of each trial (``sub-XX_labels.npy``). ``sub-XX_trials.tsv`` is not needed.

Design choices
--------------
- **Mask**: voxels that are nonzero in at least one selected trial. The curated stage zeroes every
  voxel outside the grey-matter mask (and NSD zeroes voxels without valid data), so this is that
  mask minus voxels that are never valid, read from the data itself: it needs no template
  resampling and works on any grid. It takes one extra streaming pass over the file.
- **Memory**: the 4D file is never loaded whole; the matrix is preallocated as float32 and filled
  one volume at a time (:func:`nsdprep.nifti.iter_volumes`). Folds run in threads over the same
  matrix (no copy per worker); each fold holds its own training copy, scaled in place by a
  blockwise scaler (scikit-learn's would add a float64 copy). ``--memory-gb`` caps how many folds
  run at once. For a real subject (22.5k trials x ~64k voxels) that is ~5.8 GB of data plus
  ~5 GB per fold.
- **Cross-validation** is grouped by run (``sub-XX_runs.npy``, :class:`~sklearn.model_selection.GroupKFold`):
  trials of one run are never in training and test at once, checked for every split at run time
  (adjacent trials of a run share slow drifts, which would inflate accuracy).
- **Chance**: ``1 / n_classes`` (balanced accuracy), a stratified ``DummyClassifier`` in the same
  folds, and label permutations *within runs* (as :func:`sklearn.model_selection.permutation_test_score`
  does with groups) put through the full cross-validation, giving a permutation p-value
  ``(1 + #{perm >= observed}) / (1 + n_permutations)``.
- **Determinism**: fixed seeds everywhere, ``GroupKFold`` without shuffling, the lbfgs solver,
  floats in ``results.json`` rounded to 6 decimals, PNGs written without software/time metadata.
  ``seconds`` and ``peak_rss_bytes`` go to ``resources.json``, the only output expected to differ
  between reruns (``results.json``, ``report.md`` and the PNGs are byte-identical).
"""

from __future__ import annotations

import argparse
import copy
import json
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

from nsdprep import nsd
from nsdprep._io import atomic_path, require_content
from nsdprep.errors import FormatError, MissingInputError, NsdPrepError, UsageError
from nsdprep.nsd import CuratedFiles

log = logging.getLogger(__name__)

DEFAULT_N_FOLDS = 5
DEFAULT_N_PERMUTATIONS = 5
#: Inverse L2 strength of the logistic regression. Fixed, not tuned: with ~64k standardized voxels
#: and at most a few ten thousand trials the problem is separable, so strong shrinkage is needed for
#: a stable baseline (and makes lbfgs converge in few iterations).
DEFAULT_C = 0.01
DEFAULT_MAX_ITER = 500
#: Memory budget used to cap the number of folds fitted at once (the machine has 24 GB, shared).
DEFAULT_MEMORY_GB = 16.0
MASK_RULE = (
    "sub-XX_mask.nii.gz when present (make curated VALID=1), else voxels nonzero in at least one "
    "selected trial (grey-matter mask as written by curate)"
)
RESULTS_NAME = "results.json"
REPORT_NAME = "report.md"
RESOURCES_NAME = "resources.json"
RESOURCE_KEYS = ("seconds", "peak_rss_bytes")
ACCURACY_PLOT_NAME = "accuracy_vs_chance.png"
#: PNG metadata: no software/version string, so the bytes depend only on the figure.
_PNG_METADATA = {"Software": None}


@dataclass(frozen=True)
class DecodeConfig:
    """Settings of one decoding run (all recorded in ``results.json``)."""

    n_folds: int = DEFAULT_N_FOLDS
    n_permutations: int = DEFAULT_N_PERMUTATIONS
    seed: int = 0
    subsample: int = 0
    jobs: int = 1
    C: float = DEFAULT_C
    max_iter: int = DEFAULT_MAX_ITER
    memory_gb: float = DEFAULT_MEMORY_GB

    def __post_init__(self) -> None:
        if self.n_folds < 2:
            raise UsageError(f"--n-folds must be >= 2, got {self.n_folds}")
        if self.n_permutations < 0:
            raise UsageError(f"--n-permutations must be >= 0, got {self.n_permutations}")
        if self.subsample < 0:
            raise UsageError(f"--subsample must be >= 0 (0 = all trials), got {self.subsample}")
        if self.jobs < 1:
            raise UsageError(f"--jobs must be >= 1, got {self.jobs}")
        if not self.memory_gb > 0:
            raise UsageError(f"--memory-gb must be > 0, got {self.memory_gb}")
        if not self.C > 0:
            raise UsageError(f"--C must be > 0, got {self.C}")


# ----------------------------------------------------------------------------------------------
# inputs


def find_subjects(curated_dir: str | Path) -> list[int]:
    """Subjects (1-based numbers) that have a ``sub-XX.nii.gz`` in ``curated_dir``, sorted."""
    curated_dir = Path(curated_dir)
    if not curated_dir.is_dir():
        raise MissingInputError(
            f"{curated_dir}: curated folder not found; expected sub-XX.nii.gz, sub-XX_labels.npy "
            "and sub-XX_runs.npy per subject. Build it first (`make curated`) or `datalad get` it."
        )
    subjects = sorted(
        int(m[1]) for p in curated_dir.iterdir() if (m := nsd.CURATED_BETAS_RE.match(p.name))
    )
    if not subjects:
        raise MissingInputError(
            f"{curated_dir}: no sub-XX.nii.gz found; build the curated stage first (`make curated`)"
        )
    return subjects


def subject_files(curated_dir: str | Path, subject: int) -> CuratedFiles:
    """Paths of one subject's curated files; :class:`MissingInputError` if any is absent."""
    label = nsd.bids_subject_label(subject)
    files = nsd.curated_files(subject, curated_dir)
    for path in (files.betas, files.labels, files.runs):
        require_content(
            path,
            f"curated file of {label}",
            "build it with `make curated` (or pick other --subjects)",
        )
    return files


def load_labels_runs(files: CuratedFiles, n_volumes: int) -> tuple[np.ndarray, np.ndarray]:
    """Load and check the per-trial labels (unicode) and runs (integers) of one subject."""
    labels = _load_npy(files.labels)
    runs = _load_npy(files.runs)
    for path, arr in ((files.labels, labels), (files.runs, runs)):
        if arr.shape != (n_volumes,):
            raise FormatError(
                f"{path}: expected one entry per volume of {files.betas.name}, shape ({n_volumes},); "
                f"found shape {arr.shape}"
            )
    if labels.dtype.kind != "U":
        raise FormatError(f"{files.labels}: expected unicode labels, found dtype {labels.dtype}")
    if not np.issubdtype(runs.dtype, np.integer):
        raise FormatError(
            f"{files.runs}: expected integer run numbers, found dtype {runs.dtype} "
            f"(first values {runs[:3].tolist()}); labels saved as runs? Rebuild with `make curated`."
        )
    return labels, runs


def select_trials(labels: np.ndarray, n: int) -> np.ndarray:
    """Indices of ``n`` trials, stratified by label and evenly spaced in time (deterministic).

    Each class keeps a share of ``n`` proportional to its size (largest remainder, ties to the
    earlier class in sorted order), taken at evenly spaced positions among its trials so that every
    part of the experiment (every run, roughly) stays represented. ``n <= 0`` or ``n >= len(labels)``
    selects all trials. Returned indices are sorted.
    """
    total = len(labels)
    if n <= 0 or n >= total:
        return np.arange(total)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n / total
    take = np.floor(exact).astype(int)
    order = np.argsort(-(exact - take), kind="stable")
    take[order[: n - take.sum()]] += 1
    chosen = []
    for cls, k in zip(classes, take, strict=True):
        idx = np.flatnonzero(labels == cls)
        if k > 0:
            pos = np.floor((np.arange(k) + 0.5) * len(idx) / k).astype(int)
            chosen.append(idx[pos])
    return np.sort(np.concatenate(chosen))


def load_masked(
    betas: str | Path, trials: np.ndarray, *, desc: str = ""
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stream the selected volumes of a 4D file into a float32 ``(n_trials, n_voxels)`` matrix.

    Two sequential passes: the first builds the mask (voxels nonzero in any selected trial, within
    ``sub-XX_mask.nii.gz`` when it lies next to the betas: grey matter, or with ``make curated
    VALID=1`` grey matter valid in every session), the second fills the preallocated matrix.
    Memory: the matrix plus one volume. Voxel columns are in numpy's boolean-mask (C) order, as
    ``volume[mask]`` and nilearn's ``apply_mask`` give.

    Returns
    -------
    X, mask, affine
        Data in the order of ``trials``; 3D boolean mask; the file's voxel-to-world affine.
    """
    from tqdm.auto import tqdm

    from nsdprep.nifti import header_affine, iter_volumes, read_header, volume_count

    hdr = read_header(betas)
    shape = hdr.get_data_shape()
    if len(shape) != 4:
        raise FormatError(f"{betas}: expected a 4D image (x, y, z, trial), found shape {shape}")
    n_vol = volume_count(hdr)
    trials = np.asarray(trials)
    if trials.size == 0 or trials.min() < 0 or trials.max() >= n_vol:
        raise NsdPrepError(f"{betas}: trial indices outside 0..{n_vol - 1}")
    stop = int(trials.max()) + 1
    wanted = np.zeros(stop, dtype=bool)
    wanted[trials] = True

    mask = np.zeros(shape[:3], dtype=bool)
    vols = iter_volumes(betas, 0, stop, header=hdr, reuse_buffer=True)
    for i, vol in enumerate(
        tqdm(vols, total=stop, desc=f"{desc} mask", unit="vol", leave=False, disable=None)
    ):
        if wanted[i]:
            mask |= vol != 0
    mask_file = Path(str(betas)[: -len(".nii.gz")] + "_mask.nii.gz")
    if mask_file.exists():  # the curated mask: grey matter (VALID=1: valid in every session)
        (written,) = (v != 0 for v in iter_volumes(mask_file))
        if written.shape != tuple(shape[:3]):
            raise FormatError(f"{mask_file}: grid {written.shape}, betas grid {tuple(shape[:3])}")
        mask &= written
    n_voxels = int(mask.sum())
    if n_voxels == 0:
        raise FormatError(f"{betas}: every selected trial is 0 everywhere; nothing to decode")

    row_of = np.full(stop, -1, dtype=np.int64)
    row_of[trials] = np.arange(trials.size)
    X = np.empty((trials.size, n_voxels), dtype=np.float32)
    vols = iter_volumes(betas, 0, stop, header=hdr, reuse_buffer=True)
    for i, vol in enumerate(
        tqdm(vols, total=stop, desc=f"{desc} load", unit="vol", leave=False, disable=None)
    ):
        if row_of[i] >= 0:
            X[row_of[i]] = vol[mask]
    return X, mask, header_affine(hdr)


# ----------------------------------------------------------------------------------------------
# cross-validation


def run_grouped_splits(runs: np.ndarray, n_folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
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
    dummy_x = np.zeros((len(runs), 1))
    splits = list(GroupKFold(n_splits=n_folds).split(dummy_x, groups=runs))
    check_splits_disjoint(splits, runs)
    return splits


def check_splits_disjoint(
    splits: Sequence[tuple[np.ndarray, np.ndarray]], runs: np.ndarray
) -> None:
    """Raise :class:`NsdPrepError` if a run has trials in both training and test of one split."""
    for k, (train, test) in enumerate(splits):
        shared = np.intersect1d(runs[train], runs[test])
        if shared.size:
            raise NsdPrepError(
                f"cross-validation fold {k}: runs {shared[:10].tolist()} are in training and test"
            )
        if np.intersect1d(train, test).size:
            raise NsdPrepError(f"cross-validation fold {k}: a trial is in training and test")


def make_classifier(seed: int = 0, C: float = DEFAULT_C, max_iter: int = DEFAULT_MAX_ITER) -> Any:
    """``StandardScaler`` → L2 ``LogisticRegression`` (lbfgs, multinomial), fixed random state.

    The scaler (:class:`BlockwiseStandardScaler`) works in place (``copy=False``):
    :func:`cross_validate_grouped` always hands it a fresh training/test copy, so the caller's
    matrix is never modified and a full-size copy is saved. The lbfgs workspace depends on
    ``n_classes x n_voxels`` only (~25 x 8 bytes each), not on the number of trials.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    return make_pipeline(
        BlockwiseStandardScaler(copy=False),
        LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, random_state=seed),
    )


class BlockwiseStandardScaler(StandardScaler):
    """``StandardScaler`` whose ``fit`` works on blocks of columns.

    scikit-learn's ``fit`` upcasts to float64 and builds temporaries ~2.3 times the size of a
    float32 input (9+ GB for 18k trials x 64k voxels). Here the mean and variance are computed in
    float64 on ``BLOCK`` columns at a time (``n_samples x BLOCK`` doubles of extra memory); the
    results match ``StandardScaler`` to float64 round-off, ``transform`` is inherited. Constant
    columns get a scale of 1, as in scikit-learn. Only the default ``with_mean``/``with_std`` are
    supported and ``sample_weight`` is not.
    """

    #: Columns per block.
    BLOCK = 2048

    def fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> BlockwiseStandardScaler:
        """Compute ``mean_``, ``var_`` and ``scale_`` per column, block by block."""
        from sklearn.utils.validation import validate_data

        if sample_weight is not None or not (self.with_mean and self.with_std):
            raise ValueError("BlockwiseStandardScaler supports only the default, unweighted fit")
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=True)
        n, p = X.shape
        mean = np.empty(p, dtype=np.float64)
        var = np.empty(p, dtype=np.float64)
        for a in range(0, p, self.BLOCK):
            block = X[:, a : a + self.BLOCK].astype(np.float64)
            mean[a : a + self.BLOCK] = block.mean(axis=0)
            var[a : a + self.BLOCK] = block.var(axis=0)
        scale = np.sqrt(var)
        constant = var <= 10 * np.finfo(np.float64).eps * np.maximum(mean**2, 1.0)
        scale[constant] = 1.0
        self.mean_, self.var_, self.scale_ = mean, var, scale
        self.n_samples_seen_ = n
        return self


def cross_validate_grouped(
    X: np.ndarray,
    y: np.ndarray,
    splits: Sequence[tuple[np.ndarray, np.ndarray]],
    estimators: Sequence[Any],
    label_sets: Sequence[np.ndarray] | None = None,
    *,
    jobs: int = 1,
    desc: str = "",
) -> list[dict[str, Any]]:
    """Fit/score each (estimator, label set) pair in every split, folds in parallel threads.

    ``estimators[i]`` is fit on ``label_sets[i]`` (default: ``y`` for all). Returns one dict per pair:
    ``fold_scores`` (balanced accuracy per split), ``y_pred`` (out-of-fold predictions) and
    ``n_iter`` (solver iterations per split, 0 for estimators without).
    Threads share ``X`` (numpy/BLAS release the GIL), so no worker copies the whole matrix.
    """
    from joblib import Parallel, delayed
    from tqdm.auto import tqdm

    label_sets = [y] * len(estimators) if label_sets is None else list(label_sets)
    tasks = [(i, k) for i in range(len(estimators)) for k in range(len(splits))]
    results = Parallel(n_jobs=jobs, backend="threading", return_as="generator")(
        delayed(_fit_score)(X, label_sets[i], splits[k], estimators[i]) for i, k in tasks
    )
    out = [
        {
            "fold_scores": [0.0] * len(splits),
            "y_pred": np.empty(len(y), dtype=y.dtype),
            "n_iter": [0] * len(splits),
        }
        for _ in estimators
    ]
    for (i, k), (score, pred, n_iter) in zip(
        tasks,
        tqdm(results, total=len(tasks), desc=f"{desc} fits", leave=False, disable=None),
        strict=True,
    ):
        out[i]["fold_scores"][k] = score
        out[i]["y_pred"][splits[k][1]] = pred
        out[i]["n_iter"][k] = n_iter
    return out


def fold_jobs(
    X: np.ndarray,
    splits: Sequence[tuple[np.ndarray, np.ndarray]],
    n_classes: int,
    jobs: int,
    memory_gb: float,
) -> int:
    """Folds to fit at once: ``jobs``, lowered so the estimated peak memory stays in ``memory_gb``.

    Estimate per fold: the training copy of ``X`` (freed before the test copy is made), the
    scaler's float64 column block, the lbfgs workspace (~25 doubles per coefficient) and the class
    probabilities; plus ``X`` itself and ~0.5 GB of interpreter and libraries once.
    """
    n, p = X.shape
    n_train = max(len(train) for train, _ in splits)
    n_test = max(len(test) for _, test in splits)
    per_fold = (
        max(n_train, n_test) * p * X.itemsize
        + n_train * min(p, BlockwiseStandardScaler.BLOCK) * 8
        + 25 * n_classes * (p + 1) * 8
        + n * n_classes * 8
    )
    avail = memory_gb * 1e9 - X.nbytes - 0.5e9
    fit = int(avail // per_fold)
    if fit < 1:
        log.warning(
            "estimated memory for one fold (%.1f GB + data %.1f GB) exceeds --memory-gb %.1f; "
            "running one fold at a time anyway (use --subsample to reduce)",
            per_fold / 1e9,
            X.nbytes / 1e9,
            memory_gb,
        )
    if fit < jobs:
        log.info("fitting %d fold(s) at a time instead of %d (memory budget)", max(fit, 1), jobs)
    return max(1, min(jobs, fit))


def permute_within_runs(y: np.ndarray, runs: np.ndarray, seed: Sequence[int] | int) -> np.ndarray:
    """Copy of ``y`` with labels shuffled among the trials of each run (the run-respecting null)."""
    rng = np.random.default_rng(seed)
    out = y.copy()
    for run in np.unique(runs):
        idx = np.flatnonzero(runs == run)
        out[idx] = y[rng.permutation(idx)]
    return out


def _fit_score(
    X: np.ndarray, y: np.ndarray, split: tuple[np.ndarray, np.ndarray], estimator: Any
) -> tuple[float, np.ndarray, int]:
    from sklearn.base import clone
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import balanced_accuracy_score

    train, test = split
    est = clone(estimator)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        est.fit(X[train], y[train])  # fancy indexing: a fresh copy the pipeline may modify
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        log.warning("the classifier did not converge in one fold; raise --max-iter")
    n_iter = int(np.max(getattr(est[-1] if hasattr(est, "steps") else est, "n_iter_", 0)))
    pred = est.predict(X[test])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "y_pred contains classes not in y_true"
        score = float(balanced_accuracy_score(y[test], pred))
    return score, pred, n_iter


# ----------------------------------------------------------------------------------------------
# per subject and whole run


def decode_subject(files: CuratedFiles, config: DecodeConfig) -> dict[str, Any]:
    """Load one subject, cross-validate the classifier and the chance models; return its results."""
    from sklearn.dummy import DummyClassifier
    from sklearn.metrics import confusion_matrix

    from nsdprep.nifti import read_header, volume_count

    t0 = time.perf_counter()
    label = nsd.bids_subject_label(files.subject)
    n_volumes = volume_count(read_header(files.betas))
    labels_all, runs_all = load_labels_runs(files, n_volumes)
    trials = select_trials(labels_all, config.subsample)
    y, runs = labels_all[trials], runs_all[trials]
    classes, counts = np.unique(y, return_counts=True)
    if classes.size < 2:
        raise FormatError(f"{files.labels}: need >= 2 classes to decode, found {classes.tolist()}")
    log.info(
        "%s: %d of %d trials, %d classes, %d runs",
        label,
        len(trials),
        n_volumes,
        classes.size,
        np.unique(runs).size,
    )
    X, mask, _ = load_masked(files.betas, trials, desc=label)
    splits = run_grouped_splits(runs, config.n_folds)

    clf = make_classifier(config.seed, config.C, config.max_iter)
    dummy = DummyClassifier(strategy="stratified", random_state=config.seed)
    perms = [
        permute_within_runs(y, runs, (config.seed, files.subject, p))
        for p in range(config.n_permutations)
    ]
    fits = cross_validate_grouped(
        X,
        y,
        splits,
        [clf, dummy] + [clf] * len(perms),
        [y, y, *perms],
        jobs=fold_jobs(X, splits, classes.size, config.jobs, config.memory_gb),
        desc=label,
    )
    true_fit, dummy_fit, perm_fits = fits[0], fits[1], fits[2:]
    del X

    mean = float(np.mean(true_fit["fold_scores"]))
    perm_means = [float(np.mean(f["fold_scores"])) for f in perm_fits]
    p_value = (
        (1 + sum(m >= mean for m in perm_means)) / (1 + len(perm_means)) if perm_means else None
    )
    cm_counts = confusion_matrix(y, true_fit["y_pred"], labels=classes)
    cm = cm_counts / cm_counts.sum(axis=1, keepdims=True)
    return {
        "subject": label,
        "n_trials": int(len(trials)),
        "n_trials_available": int(n_volumes),
        "n_voxels": int(mask.sum()),
        "n_runs": int(np.unique(runs).size),
        "n_folds": len(splits),
        "n_classes": int(classes.size),
        "classes": classes.tolist(),
        "class_counts": counts.astype(int).tolist(),
        "fold_test_runs": [np.unique(runs[test]).astype(int).tolist() for _, test in splits],
        "fold_balanced_accuracy": _r(true_fit["fold_scores"]),
        "mean_balanced_accuracy": _r(mean),
        "std_balanced_accuracy": _r(float(np.std(true_fit["fold_scores"]))),
        "chance_theoretical": _r(1.0 / classes.size),
        "dummy_fold_balanced_accuracy": _r(dummy_fit["fold_scores"]),
        "dummy_chance": _r(float(np.mean(dummy_fit["fold_scores"]))),
        "permutation_means": _r(perm_means),
        "max_solver_iterations": int(
            max(true_fit["n_iter"] + [n for f in perm_fits for n in f["n_iter"]])
        ),
        "permutation_mean": _r(float(np.mean(perm_means))) if perm_means else None,
        "permutation_p_value": _r(p_value) if p_value is not None else None,
        "confusion_matrix": _r(cm.tolist()),
        "confusion_counts": cm_counts.astype(int).tolist(),
        "seconds": round(time.perf_counter() - t0, 2),
        "peak_rss_bytes": peak_rss_bytes(),
    }


def decode(
    curated_dir: str | Path,
    out_dir: str | Path,
    subjects: Sequence[int] | None = None,
    config: DecodeConfig | None = None,
) -> dict[str, Any]:
    """Decode every subject, write ``results.json``, the PNG plots and ``report.md``; return results.

    All inputs are checked before any subject is processed, so a missing file fails fast.
    """
    from tqdm.auto import tqdm

    config = DecodeConfig() if config is None else config
    curated_dir, out_dir = Path(curated_dir), Path(out_dir)
    subjects = find_subjects(curated_dir) if not subjects else sorted(set(subjects))
    files = [subject_files(curated_dir, s) for s in subjects]
    results: dict[str, Any] = {
        "config": {
            **asdict(config),
            "classifier": "StandardScaler -> LogisticRegression(lbfgs, L2)",
            "cv": "GroupKFold by run (no shuffling)",
            "metric": "balanced accuracy",
            "mask": MASK_RULE,
            "subsample_rule": "stratified by label, evenly spaced in time"
            if config.subsample
            else "all trials",
            "permutation_null": "labels shuffled within runs, full cross-validation",
        },
        "software": _versions(),
        "subjects": {},
    }
    for f in tqdm(files, desc="subjects", unit="subject", disable=None):
        res = decode_subject(f, config)
        results["subjects"][res["subject"]] = res
        log.info(
            "%s: balanced accuracy %.3f (dummy %.3f, permutation %s, chance %.3f) in %.0f s",
            res["subject"],
            res["mean_balanced_accuracy"],
            res["dummy_chance"],
            res["permutation_mean"],
            res["chance_theoretical"],
            res["seconds"],
        )
    write_outputs(results, out_dir)
    return results


def write_outputs(results: dict[str, Any], out_dir: str | Path) -> None:
    """Write ``results.json``, one confusion PNG per subject, the accuracy PNG and ``report.md``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = copy.deepcopy(results)
    resources = {
        name: {key: res.pop(key) for key in RESOURCE_KEYS if key in res}
        for name, res in results["subjects"].items()
    }
    with atomic_path(out_dir / RESULTS_NAME) as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    with atomic_path(out_dir / RESOURCES_NAME) as tmp:
        tmp.write_text(json.dumps(resources, indent=2) + "\n", encoding="utf-8")
    for res in results["subjects"].values():
        plot_confusion(res, out_dir / f"confusion_{res['subject']}.png")
    plot_accuracy_vs_chance(results["subjects"], out_dir / ACCURACY_PLOT_NAME)
    with atomic_path(out_dir / REPORT_NAME) as tmp:
        tmp.write_text(render_report(results), encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# report and plots


def render_report(results: dict[str, Any]) -> str:
    """Markdown report: settings, one table row per subject, embedded plots."""
    cfg = results["config"]
    subs = results["subjects"]
    lines = [
        "# Decoding baseline: COCO supercategory from single-trial 3 mm betas",
        "",
        f"Classifier: {cfg['classifier']} (C={cfg['C']}, max_iter={cfg['max_iter']}); "
        f"cross-validation: {cfg['cv']}, {cfg['n_folds']} folds; metric: {cfg['metric']}; "
        f"seed {cfg['seed']}.",
        f"Voxels: {cfg['mask']}. Trials: {cfg['subsample_rule']}"
        + (f" ({cfg['subsample']} per subject)." if cfg["subsample"] else "."),
        f"Chance: 1/n_classes; a stratified DummyClassifier in the same folds; "
        f"{cfg['n_permutations']} label permutations ({cfg['permutation_null']}); "
        "p = (1 + #perm >= observed) / (1 + n_permutations).",
        "",
        "| subject | trials | voxels | classes | runs | folds | balanced accuracy (mean ± sd) "
        "| 1/n_classes | dummy | permutation mean | p |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in subs.values():
        perm = "–" if r["permutation_mean"] is None else f"{r['permutation_mean']:.3f}"
        p = "–" if r["permutation_p_value"] is None else f"{r['permutation_p_value']:.3f}"
        lines.append(
            f"| {r['subject']} | {r['n_trials']} | {r['n_voxels']} | {r['n_classes']} "
            f"| {r['n_runs']} | {r['n_folds']} "
            f"| {r['mean_balanced_accuracy']:.3f} ± {r['std_balanced_accuracy']:.3f} "
            f"| {r['chance_theoretical']:.3f} | {r['dummy_chance']:.3f} | {perm} | {p} |"
        )
    lines += [
        "",
        f"Time and peak RSS per subject are in `{RESOURCES_NAME}` (the only file that differs "
        "between reruns); this report, `results.json` and the PNGs are deterministic.",
        "",
        "## Accuracy versus chance",
        "",
        f"![balanced accuracy per subject versus chance]({ACCURACY_PLOT_NAME})",
        "",
        "## Confusion matrices (rows: true class, normalized)",
        "",
    ]
    for r in subs.values():
        lines += [
            f"### {r['subject']}",
            "",
            f"![confusion {r['subject']}](confusion_{r['subject']}.png)",
            "",
        ]
    return "\n".join(lines)


def plot_confusion(res: dict[str, Any], target: str | Path) -> None:
    """Heat map of the row-normalized confusion matrix with class names, values and a colorbar."""
    plt = _pyplot()
    cm = np.asarray(res["confusion_matrix"], dtype=float)
    classes = res["classes"]
    n = len(classes)
    size = max(4.5, 0.55 * n + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    im = ax.imshow(cm, cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(
        f"{res['subject']}: confusion (row-normalized)\n"
        f"balanced accuracy {res['mean_balanced_accuracy']:.3f}, chance {res['chance_theoretical']:.3f}"
    )
    if n <= 15:
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    f"{cm[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=9,
                    color="black" if cm[i, j] > 0.6 else "white",
                )
    fig.colorbar(im, ax=ax, label="fraction of true-class trials")
    fig.tight_layout()
    _save_png(fig, target)


def plot_accuracy_vs_chance(subjects: dict[str, dict[str, Any]], target: str | Path) -> None:
    """Per-subject mean balanced accuracy with fold values, against the three chance estimates."""
    plt = _pyplot()
    names = list(subjects)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(names) + 2.5), 4.5))
    for x, name in enumerate(names):
        r = subjects[name]
        folds = np.asarray(r["fold_balanced_accuracy"])
        jitter = np.linspace(-0.12, 0.12, folds.size) if folds.size > 1 else np.zeros(1)
        ax.scatter(
            x + jitter, folds, s=14, color="tab:blue", alpha=0.5, label="fold" if x == 0 else None
        )
        ax.errorbar(
            x,
            r["mean_balanced_accuracy"],
            yerr=r["std_balanced_accuracy"],
            fmt="o",
            color="tab:blue",
            ms=8,
            capsize=5,
            label="mean ± sd" if x == 0 else None,
        )
        ax.hlines(
            r["chance_theoretical"],
            x - 0.35,
            x + 0.35,
            colors="black",
            linestyles=":",
            label="1 / n_classes" if x == 0 else None,
        )
        ax.scatter(
            x + 0.25,
            r["dummy_chance"],
            marker="s",
            color="tab:gray",
            label="dummy (stratified)" if x == 0 else None,
        )
        if r["permutation_means"]:
            perm = np.asarray(r["permutation_means"])
            ax.errorbar(
                x - 0.25,
                perm.mean(),
                yerr=[[perm.mean() - perm.min()], [perm.max() - perm.mean()]],
                fmt="D",
                color="tab:orange",
                capsize=4,
                label="permutation mean (min–max)" if x == 0 else None,
            )
    ax.set_xticks(range(len(names)), names)
    ax.set_xlim(-0.7, len(names) - 0.3)
    ax.set_ylim(0.0, 1.04)
    ax.set_xlabel("subject")
    ax.set_ylabel("balanced accuracy")
    ax.set_title("Run-grouped cross-validated decoding vs chance")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    _save_png(fig, target)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far, in bytes (Linux ``ru_maxrss`` is in KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ----------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m nsdprep decode``."""
    parser.add_argument(
        "--curated",
        type=Path,
        default=Path(nsd.CURATED_DIR),
        help="curated folder with sub-XX.nii.gz, sub-XX_labels.npy, sub-XX_runs.npy",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(nsd.DECODING_DIR),
        help="output folder (results.json, report.md, PNG plots)",
    )
    parser.add_argument(
        "--subjects",
        type=int,
        nargs="+",
        metavar="N",
        help="subject numbers (default: every sub-XX.nii.gz in --curated)",
    )
    parser.add_argument(
        "--subsample",
        type=int,
        default=0,
        metavar="N",
        help="keep N trials per subject, stratified and evenly spaced (0 = all)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="folds fitted in parallel (threads)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of classifier, dummy, permutations"
    )
    parser.add_argument(
        "--n-permutations",
        type=int,
        default=DEFAULT_N_PERMUTATIONS,
        help="label permutations (within runs) for the chance level; 0 = none",
    )
    parser.add_argument(
        "--n-folds", type=int, default=DEFAULT_N_FOLDS, help="run-grouped cross-validation folds"
    )
    parser.add_argument("--C", type=float, default=DEFAULT_C, help="inverse L2 strength")
    parser.add_argument("--max-iter", type=int, default=DEFAULT_MAX_ITER, help="lbfgs iterations")
    parser.add_argument(
        "--memory-gb",
        type=float,
        default=DEFAULT_MEMORY_GB,
        help="memory budget; fewer folds run at once when --jobs would exceed it",
    )


def main(args: argparse.Namespace) -> int:
    """Run the decoding stage from parsed arguments; print a one-line summary per subject."""
    config = DecodeConfig(
        n_folds=args.n_folds,
        n_permutations=args.n_permutations,
        seed=args.seed,
        subsample=args.subsample,
        jobs=args.jobs,
        C=args.C,
        max_iter=args.max_iter,
        memory_gb=args.memory_gb,
    )
    results = decode(args.curated, args.out, args.subjects, config)
    for r in results["subjects"].values():
        print(
            f"{r['subject']}: balanced accuracy {r['mean_balanced_accuracy']:.3f} "
            f"(chance {r['chance_theoretical']:.3f}, dummy {r['dummy_chance']:.3f}, "
            f"permutation {r['permutation_mean']}, p={r['permutation_p_value']}) "
            f"{r['n_trials']} trials x {r['n_voxels']} voxels, {r['seconds']:.0f} s, "
            f"peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB"
        )
    print(f"wrote {args.out / REPORT_NAME}")
    return 0


# ----------------------------------------------------------------------------------------------
# helpers


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:  # object arrays need pickle: not the curated format
        raise FormatError(f"{path}: not a plain numpy array ({exc})") from exc
    except OSError as exc:
        raise FormatError(f"{path}: unreadable .npy file ({exc})") from exc


def _r(value: Any, ndigits: int = 6) -> Any:
    """Round floats (also in nested lists) so results.json does not show last-bit noise."""
    if isinstance(value, list | tuple):
        return [_r(v, ndigits) for v in value]
    if isinstance(value, float | np.floating):
        return round(float(value), ndigits)
    return value


def _versions() -> dict[str, str]:
    import matplotlib
    import nibabel
    import sklearn

    return {
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
        "nibabel": nibabel.__version__,
        "matplotlib": matplotlib.__version__,
    }


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig: Any, target: str | Path) -> None:
    plt = _pyplot()
    try:
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format="png", dpi=110, metadata=_PNG_METADATA)
    finally:
        plt.close(fig)
