"""The ridge decoder: one kernel per subject, one Cholesky per fold for the true and every permuted labels.

A ridge classifier (scikit-learn's ``RidgeClassifier``: one-vs-rest targets of +1/-1, an intercept,
the class of the largest decision value) has fitted values ``H Y`` with a hat matrix ``H`` that does
not depend on the labels. So one factorization per fold serves the true labels and all ``N`` label
permutations at once: ``n_classes x (1 + N)`` target columns. With far fewer trials than voxels it
is solved in the dual (kernel) form:

- **Standardization** (label-free, the field's convention for NSD betas): every voxel is z-scored
  within its session, over the session's decoded trials (mean 0, SD 1; a voxel constant in a
  session, e.g. invalid there and 0, is 0 for that session's trials).
- **Kernel**: ``K = Z Z^T`` over all voxels, built once per subject from column chunks of the
  int16 curated matrix (:func:`subject_kernel`), never holding ``Z`` whole.
- **Per fold**: the kernel is centred on the training trials' mean (the analytic centring of the
  training and test blocks: the same as centring ``Z`` with the training mean, no statistic of the
  test trials; this is the intercept), ``alpha`` is added to the training block's diagonal,
  which is factored once (:class:`~nsdprep.stages.decode.linalg.BlockCholesky`); the decision values
  of the test trials are ``K_test (K_train + alpha I)^-1 (Y - mean Y) + mean Y`` for every column.
  Whichever is cheaper is solved for: the target columns, or the test kernel's rows.
- **Alpha** is fixed, not tuned: ``alpha_per_voxel x n_voxels`` (the kernel's diagonal is about
  ``n_voxels`` after z-scoring, so the penalty is relative to it; default and its grounds:
  ``nsdprep.stages.decode.DEFAULT_ALPHA``). Choosing it inside the training folds would cost one
  factorization per candidate and inner fold, each nearly as much as an outer one (an
  eigendecomposition, which would serve every candidate, costs ~25 Cholesky factorizations).
- **Permutations**: the label vectors :func:`permuted_labels` draws are those of scikit-learn's
  ``permutation_test_score(groups=runs, random_state=...)``, and ``p = (1 + #{perm >= true}) / (1 + N)``.

The session z-scoring uses every decoded trial of a session, test trials included, but no label.

Why not himalaya (the field's kernel ridge for many targets): its ``KernelRidge`` takes a
precomputed kernel and many targets, but solves a scalar alpha with an eigendecomposition of the
training kernel (its ``"eigenvalues"`` solver), several times the cost of the one Cholesky used
here, and a ``"precomputed"`` kernel leaves the per-fold centring to the caller anyway. What remains
is a factor and two triangular solves (scipy), tiled so that the result does not depend on the
number of threads (``datalad rerun`` must reproduce the bytes); one dependency fewer.

The result equals scikit-learn's ``RidgeClassifier(alpha)`` fitted on the standardized training
trials of each fold: decision values within 1e-4 in the tests (float32 kernel and factor; the
rounding of the kernel to float32 dominates, and grows with its condition number: ~3e-4 was seen on
an NSD-shaped synthetic subject with strong shared noise, every prediction the same). It is
bit-identical for any number of worker threads (:mod:`nsdprep.stages.decode.linalg`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from nsdprep.stages.decode import linalg
from nsdprep.stages.decode.linalg import BlockCholesky, Workers

log = logging.getLogger(__name__)

#: Voxel columns standardized and multiplied per step of the kernel (n_trials x 4096 float32 each).
KERNEL_CHUNK = 4096
#: Label vectors (true + permuted) whose targets are built and solved at once.
LABEL_BATCH = 101


def permuted_labels(y: np.ndarray, runs: np.ndarray, random_state: int, n: int) -> np.ndarray:
    """``(n, len(y))``: ``y`` permuted within runs, ``n`` times, as scikit-learn's permutation test draws them.

    ``permutation_test_score(..., groups=runs, random_state=random_state)`` makes one
    ``RandomState(random_state)`` and, for each permutation, shuffles the positions of every run
    (runs in sorted order) with ``permutation``; the same calls in the same order give the same vectors.
    """
    rng = np.random.RandomState(random_state)
    groups = [np.flatnonzero(runs == g) for g in np.unique(runs)]
    out = np.empty((n, y.size), dtype=y.dtype)
    for k in range(n):
        idx = np.arange(y.size)
        for g in groups:
            idx[g] = rng.permutation(idx[g])
        out[k] = y[idx]
    return out


def balanced_accuracy(truth: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Balanced accuracy of each row of ``(V, t)`` class-index arrays: mean recall over classes present.

    As scikit-learn's ``balanced_accuracy_score``: a class predicted but absent from the truth is
    left out of the mean.
    """
    V = truth.shape[0]
    idx = (truth + (np.arange(V) * n_classes)[:, None]).ravel()
    counts = np.bincount(idx, minlength=V * n_classes).reshape(V, n_classes)
    hits = np.bincount(idx, weights=(truth == pred).ravel(), minlength=V * n_classes)
    present = counts > 0
    recall = np.where(present, hits.reshape(V, n_classes) / np.maximum(counts, 1), 0.0)
    return recall.sum(axis=1) / present.sum(axis=1)


# ----------------------------------------------------------------------------------------------
# kernel


def standardized_chunks(
    read: Callable[[int, int], np.ndarray],
    n_cols: int,
    sessions: np.ndarray,
    chunk: int | None = None,
    used: np.ndarray | None = None,
) -> Iterator[np.ndarray]:
    """Column chunks of the data, each voxel z-scored within each session (float32, fresh arrays).

    ``read(a, b)`` returns columns ``a:b`` of every row. Statistics in float64 (population SD; a
    constant column gets SD 1, hence 0 after centring). ``used`` (bool, ``n_cols``), if given, is
    set where a column is nonzero in some row.
    """
    groups = [np.flatnonzero(sessions == s) for s in np.unique(sessions)]
    chunk = chunk or KERNEL_CHUNK
    for a in range(0, n_cols, chunk):
        b = min(n_cols, a + chunk)
        raw = read(a, b)
        if used is not None:
            used[a:b] = np.any(raw != 0, axis=0)
        Z = np.empty(raw.shape, dtype=np.float32)
        for g in groups:
            x = raw[g].astype(np.float64)
            mean = x.mean(axis=0)
            x -= mean
            sd = np.sqrt(np.mean(x * x, axis=0))
            sd[sd == 0] = 1.0
            x /= sd
            Z[g] = x
        yield Z


def subject_kernel(
    read: Callable[[int, int], np.ndarray],
    n_rows: int,
    n_cols: int,
    sessions: np.ndarray,
    workers: Workers,
    chunk: int | None = None,
) -> tuple[np.ndarray, int]:
    """``(K, n_used)``: the kernel of the session-z-scored data and the number of nonzero voxels."""
    used = np.zeros(n_cols, dtype=bool)
    K = linalg.gram(standardized_chunks(read, n_cols, sessions, chunk, used), n_rows, workers)
    return K, int(used.sum())


# ----------------------------------------------------------------------------------------------
# one fold


def centred_fold(
    K: np.ndarray, train: np.ndarray, test: np.ndarray, alpha: float, tile: int | None = None
) -> tuple[list[np.ndarray], np.ndarray]:
    """Training block rows (lower, centred, ``+ alpha`` on the diagonal) and the centred ``K[train, test]``.

    Centring with the training mean ``mu`` of the features, written with kernel entries only:
    ``(x_i - mu).(x_j - mu) = K_ij - kbar_i - kbar_j + kbarbar`` for training ``i, j`` and
    ``K_it - kbar_i - r_t + kbarbar`` for a test trial ``t``, where ``kbar`` (``r``) are the means over
    the training trials of the kernel's training (test) columns and ``kbarbar`` the mean of ``kbar``.
    """
    m = train.size
    parts = linalg.edges(m, tile or linalg.CHOL_TILE)
    kbar = np.empty(m, dtype=np.float64)
    rows = []
    for s, e in parts:
        block = K[np.ix_(train[s:e], train)]
        kbar[s:e] = block.sum(axis=1, dtype=np.float64) / m
        rows.append(np.array(block[:, :e]))
        del block
    grand = kbar.mean()
    for (s, e), row in zip(parts, rows, strict=True):
        row -= kbar[s:e, None] + (kbar[None, :e] - grand)
        row[:, s:e][np.diag_indices(e - s)] += np.float32(alpha)
    cross = K[np.ix_(train, test)]
    r = cross.sum(axis=0, dtype=np.float64) / m
    cross -= kbar[:, None] + (r[None, :] - grand)
    return rows, cross


def one_vs_rest(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """``(n_trials, V * n_classes)`` float64 targets +1/-1 for ``(V, n_trials)`` class indices; column ``v*K + c``."""
    hit = labels.T[:, :, None] == np.arange(n_classes)
    return np.where(hit, 1.0, -1.0).reshape(labels.shape[1], -1)


def fold_decisions(
    factor: BlockCholesky,
    cross: np.ndarray,
    train_labels: np.ndarray,
    n_classes: int,
    workers: Workers,
    batch: int = LABEL_BATCH,
) -> Iterator[tuple[int, np.ndarray]]:
    """``(v0, D)`` per batch of label vectors: decision values ``(t, V_batch, n_classes)`` of the test trials.

    ``cross``: the centred ``K[train, test]`` (:func:`centred_fold`; overwritten when the test trials
    are solved for). ``train_labels``: ``(V, m)`` class indices of the training trials for every
    label vector. A class absent from a vector's training labels gets the constant -1, never the
    largest value (never predicted, as by scikit-learn, which would not know it): every training
    trial's targets over the ``k`` classes present sum to ``2 - k``, so the decision values of any
    trial over them sum to ``2 - k`` too, and their largest is ``>= (2 - k) / k > -1``.
    """
    V, m = train_labels.shape
    t = cross.shape[1]
    via_test = V * n_classes > t  # solve for the t test trials once, not for every target column
    if via_test:
        factor.solve(cross, workers)  # now (K_train + alpha I)^-1 K[train, test]
    for v0 in range(0, V, batch):
        Y = one_vs_rest(train_labels[v0 : v0 + batch], n_classes)
        mean = Y.mean(axis=0)
        Yc = (Y - mean).astype(np.float32)
        del Y
        if via_test:
            D = linalg.matmul(cross.T, Yc, workers)
        else:
            D = linalg.matmul(cross.T, factor.solve(Yc, workers), workers)
        D = D.astype(np.float64) + mean
        yield v0, D.reshape(t, -1, n_classes)


# ----------------------------------------------------------------------------------------------
# cross-validation


def cross_validate_ridge(
    K: np.ndarray,
    y: np.ndarray,
    runs: np.ndarray,
    splits: list[tuple[np.ndarray, np.ndarray]],
    alpha: float,
    permutations: int,
    random_state: int,
    workers: Workers,
    timings: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Fold scores and predictions of the true labels and the mean score of every permutation.

    Returns ``y_pred``, ``fold_scores`` (balanced accuracy per fold, true labels),
    ``permutation_scores`` (mean over folds per permutation; ``None`` without permutations) and
    ``p_value`` = ``(1 + #{perm >= true}) / (1 + N)``.
    """
    classes, y_idx = np.unique(y, return_inverse=True)
    n_classes = classes.size
    y_idx = y_idx.astype(np.int16 if n_classes <= np.iinfo(np.int16).max else np.intp)
    perms = permuted_labels(y_idx, runs, random_state, permutations)
    labels = np.vstack([y_idx[None, :], perms])  # (V, n): row 0 the true labels
    del perms
    V = labels.shape[0]
    scores = np.empty((len(splits), V))
    y_pred = np.zeros(y.size, dtype=np.intp)  # rows in no test fold (a held-out split) stay 0
    t_factor = t_solve = 0.0
    for f, (train, test) in enumerate(splits):
        t0 = time.perf_counter()
        rows, cross = centred_fold(K, train, test, alpha)
        factor = BlockCholesky(rows).factor(workers)
        t1 = time.perf_counter()
        truth = labels[:, test].astype(np.intp)
        for v0, D in fold_decisions(factor, cross, labels[:, train], n_classes, workers):
            pred = D.argmax(axis=2).T  # (V_batch, t); ties to the first class, as scikit-learn
            v1 = v0 + pred.shape[0]
            if v0 == 0:
                y_pred[test] = pred[0]
            scores[f, v0:v1] = balanced_accuracy(truth[v0:v1], pred, n_classes)
        del rows, cross, factor
        t2 = time.perf_counter()
        t_factor, t_solve = t_factor + t1 - t0, t_solve + t2 - t1
        log.debug("fold %d: %.1f s kernel block + Cholesky, %.1f s solves", f, t1 - t0, t2 - t1)
    if timings is not None:
        timings.update(folds_factor_seconds=t_factor, folds_solve_seconds=t_solve)
    means = scores.mean(axis=0)
    out: dict[str, Any] = {
        "y_pred": classes[y_pred],
        "fold_scores": scores[:, 0].tolist(),
        "permutation_scores": None,
        "p_value": None,
    }
    if permutations:
        out["permutation_scores"] = means[1:].tolist()
        out["p_value"] = float((1 + np.sum(means[1:] >= means[0])) / (1 + permutations))
    return out
