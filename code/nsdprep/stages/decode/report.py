"""What the decoding stage records and shows: ``results.json``, ``report.md`` and the PNG plots.

:mod:`nsdprep.stages.decode` computes (loading, cross-validation, permutations); this module turns its
numbers into the per-subject record (:func:`subject_results`, floats rounded) and writes the files.
Every file depends only on the results dictionary and PNGs carry no software/time metadata, so
rewriting the same results gives byte-identical files (``datalad rerun`` makes no new commit).
"""

from __future__ import annotations

import json
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from nsdprep.core._io import atomic_path

RESULTS_NAME = "results.json"
REPORT_NAME = "report.md"
ACCURACY_PLOT_NAME = "accuracy_vs_chance.png"
#: PNG metadata: no software/version string, so the bytes depend only on the figure.
_PNG_METADATA = {"Software": None}


def subject_results(
    label: str,
    y: np.ndarray,
    runs: np.ndarray,
    cv: dict[str, Any],
    *,
    n_available: int,
    n_voxels: int,
) -> dict[str, Any]:
    """One subject's record in ``results.json``, from :func:`nsdprep.stages.decode.cross_validate`'s output.

    Floats are rounded to 6 decimals (no last-bit noise); the confusion matrix is row-normalized.
    """
    from sklearn.metrics import confusion_matrix

    classes, counts = np.unique(y, return_counts=True)
    cm = confusion_matrix(y, cv["y_pred"], labels=classes)
    perm = cv["permutation_scores"]
    return {
        "subject": label,
        "n_trials": int(y.size),
        "n_trials_available": int(n_available),
        "n_voxels": int(n_voxels),
        "n_runs": int(np.unique(runs).size),
        "n_folds": len(cv["splits"]),
        "n_classes": int(classes.size),
        "classes": classes.tolist(),
        "class_counts": counts.astype(int).tolist(),
        "fold_test_runs": [np.unique(runs[test]).astype(int).tolist() for _, test in cv["splits"]],
        "fold_balanced_accuracy": _r(cv["fold_scores"]),
        "mean_balanced_accuracy": _r(np.mean(cv["fold_scores"])),
        "std_balanced_accuracy": _r(np.std(cv["fold_scores"])),
        "chance_theoretical": _r(1.0 / classes.size),
        "dummy_fold_balanced_accuracy": _r(cv["dummy_scores"]),
        "dummy_chance": _r(np.mean(cv["dummy_scores"])),
        "permutation_means": _r(perm) if perm else [],
        "permutation_mean": _r(np.mean(perm)) if perm else None,
        "permutation_p_value": _r(cv["p_value"]) if perm else None,
        "permutation_p_min": _r(1.0 / (len(perm) + 1)) if perm else None,
        "confusion_matrix": _r((cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)).tolist()),
        "confusion_counts": cm.astype(int).tolist(),
    }


def write_outputs(results: dict[str, Any], out_dir: str | Path, jobs: int = 1) -> None:
    """Write ``results.json``, one confusion PNG per subject, the accuracy PNG and ``report.md``.

    With ``jobs`` > 1 the plots are drawn by that many forked processes (text layout makes each
    confusion matrix take most of a second; the bytes do not depend on the process).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / RESULTS_NAME) as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plots: list[tuple[Callable[[Any, Path], None], Any, Path]] = [
        (plot_confusion, res, out_dir / f"confusion_{res['subject']}.png")
        for res in results["subjects"].values()
    ]
    plots.append((plot_accuracy_vs_chance, results["subjects"], out_dir / ACCURACY_PLOT_NAME))
    _draw_all(plots, jobs)
    with atomic_path(out_dir / REPORT_NAME) as tmp:
        tmp.write_text(render_report(results), encoding="utf-8")


def render_report(results: dict[str, Any]) -> str:
    """Markdown report: settings, one table row per subject, embedded plots."""
    cfg = results["config"]
    subs = results["subjects"]
    lines = [
        "# Decoding baseline: COCO supercategory from single-trial 3 mm betas",
        "",
        f"Classifier: {_classifier_text(cfg, subs)}; "
        f"cross-validation: {cfg['cv']}, {cfg['n_folds']} folds; metric: {cfg['metric']}; "
        f"seed {cfg['seed']}.",
        f"Standardization: {cfg['standardization']}.",
        f"Voxels: {cfg['mask']}. Trials: {cfg['subsample_rule']}"
        + (f" ({cfg['subsample']} per subject)." if cfg["subsample"] else "."),
        f"Chance: 1/n_classes; a stratified DummyClassifier in the same folds; "
        f"{cfg['permutations']} label permutations ({cfg['permutation_null']}); "
        "p = (1 + #perm >= observed) / (1 + permutations), so it is never below "
        "1 / (1 + permutations) (shown in brackets).",
        "",
        "| subject | trials | voxels | classes | runs | folds | balanced accuracy (mean ± sd) "
        "| 1/n_classes | dummy | permutation mean | p (smallest possible) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in subs.values():
        perm = "–" if r["permutation_mean"] is None else f"{r['permutation_mean']:.3f}"
        p = (
            "–"
            if r["permutation_p_value"] is None
            else f"{r['permutation_p_value']:.3g} (≥ {r['permutation_p_min']:.3g})"
        )
        lines.append(
            f"| {r['subject']} | {r['n_trials']} | {r['n_voxels']} | {r['n_classes']} "
            f"| {r['n_runs']} | {r['n_folds']} "
            f"| {r['mean_balanced_accuracy']:.3f} ± {r['std_balanced_accuracy']:.3f} "
            f"| {r['chance_theoretical']:.3f} | {r['dummy_chance']:.3f} | {perm} | {p} |"
        )
    lines += [
        "",
        "This report, `results.json` and the PNGs are deterministic (a rerun reproduces them byte "
        "for byte); time and peak memory per subject are logged by the run, not recorded here.",
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


def _classifier_text(cfg: dict[str, Any], subs: dict[str, dict[str, Any]]) -> str:
    """The classifier, its detail and its regularization (ridge: alpha per voxel and per subject)."""
    if cfg["classifier"] == "ridge":
        per_subject = ", ".join(f"{name} {r['alpha']:g}" for name, r in subs.items())
        return (
            f"ridge, {cfg['classifier_detail']}; alpha = {cfg['alpha']:g} x n_voxels, fixed "
            f"({per_subject})"
        )
    return f"{cfg['classifier']}, {cfg['classifier_detail']} (C={cfg['C']}, max_iter={cfg['max_iter']})"


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


def _draw_all(plots: Sequence[tuple[Callable[[Any, Path], None], Any, Path]], jobs: int) -> None:
    """Run each ``plot(data, target)``, in ``jobs`` forked processes when there is more than one."""
    jobs = min(jobs, len(plots))
    if jobs <= 1:
        for plot, data, target in plots:
            plot(data, target)
        return
    _pyplot()  # imported once here; the forked processes inherit it
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        for done in [pool.submit(plot, data, target) for plot, data, target in plots]:
            done.result()


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


def _r(value: Any, ndigits: int = 6) -> Any:
    """Round floats (also in nested lists) so results.json does not show last-bit noise."""
    if isinstance(value, list | tuple):
        return [_r(v, ndigits) for v in value]
    if isinstance(value, float | np.floating):
        return round(float(value), ndigits)
    return value
