"""Benchmark of the decoding stage's cross-validation: the former hand-written loop versus scikit-learn.

Compares, on synthetic ``(n_trials, n_voxels)`` float32 data with a planted label pattern, run
drifts and noise (runs of 63/62 trials as in NSD, or 8/7 as in the demo):

* ``old`` -- the loop ``nsdprep.stages.decode`` had before it used scikit-learn's permutation test
  (``cross_validate_grouped`` over ``[classifier, dummy, classifier x n_permutations]`` with
  ``permute_within_runs``), imported from a saved copy of that module (``--old PATH``; git can
  produce it: ``git show 0659749:code/nsdprep/stages/decode/__init__.py > /tmp/decode_old.py``);
* ``new`` -- :func:`nsdprep.stages.decode.cross_validate` (``cross_val_predict`` + dummy +
  ``permutation_test_score``, joblib threads, the blockwise in-place scaler);
* ``new-stdscaler`` -- the same with scikit-learn's ``StandardScaler`` instead of the blockwise one,
  to see whether the latter still matters for memory;
* ``sklearn-plain`` -- the same scikit-learn calls handed the data matrix itself instead of row
  numbers (``nsdprep.stages.decode.rows_of``), to show what that step saves. Its scores must equal
  ``new``'s (same splits, same seeds).

Each measurement runs in its own subprocess (one BLAS thread, like ``make decode``): the data are
loaded from ``bench/data/`` (written once, ignored by git), then the cross-validation is timed. Peak
RSS is the child's ``ru_maxrss``; ``rss_data`` is the peak right after loading (the data matrix and
the libraries), so ``peak - rss_data`` is what the cross-validation itself adds. Per-permutation
cost is the slope between two permutation counts, ``(T(k2) - T(k1)) / (k2 - k1)``, so fixed costs
(the observed-label fits, the dummy) cancel out; it is given for wall time and for CPU time (user +
system of the child), the latter robust to a loaded machine. Results: a table on stdout and
``bench/results/decode_<stamp>.json`` + ``decode_latest.json`` (with the machine's load averages).

    python bench/bench_decode.py --old /tmp/decode_old.py [--cases demo large] [--jobs 1 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import _shared
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "code"))

DATA = REPO / "bench" / "data"
#: name -> (n_trials, n_voxels, n_classes, run lengths, permutation counts, repeats)
CASES: dict[str, tuple[int, int, int, tuple[int, int], tuple[int, ...], int]] = {
    "demo": (87, 1500, 12, (8, 7), (5, 100), 3),
    "large": (1000, 69_500, 12, (63, 62), (1, 5), 1),
    # a real subject; one permutation only (~hours with more): run it on purpose with --cases real
    "real": (22_500, 64_000, 12, (63, 62), (1,), 1),
}
MODES = ("old", "new", "new-stdscaler", "sklearn-plain")
SEED = 0
SUBJECT = 1


def make_data(
    n: int, p: int, n_classes: int, run_lengths: tuple[int, int], signal: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``X`` (float32) = signal * pattern[label] + drift[run] + noise, built in row blocks."""
    rng = np.random.default_rng(seed)
    sizes: list[int] = []
    while sum(sizes) < n:
        sizes.append(run_lengths[len(sizes) % 2])
    sizes[-1] -= sum(sizes) - n
    runs = np.repeat(np.arange(1, len(sizes) + 1), sizes)
    y_idx = np.concatenate([rng.permutation(np.arange(s) % n_classes) for s in sizes])
    classes = np.array([f"class{k:02d}" for k in range(n_classes)])
    patterns = rng.standard_normal((n_classes, p), dtype=np.float32) * np.float32(signal)
    drift = rng.standard_normal((len(sizes), p), dtype=np.float32) * np.float32(0.5)
    X = np.empty((n, p), dtype=np.float32)
    for a in range(0, n, 512):
        b = min(n, a + 512)
        X[a:b] = rng.standard_normal((b - a, p), dtype=np.float32)
        X[a:b] += patterns[y_idx[a:b]]
        X[a:b] += drift[runs[a:b] - 1]
    return X, classes[y_idx], runs


def data_paths(case: str, signal: float) -> tuple[Path, Path, Path]:
    n, p, k, lengths, _, _ = CASES[case]
    stem = f"decode_{n}x{p}_{k}c_{lengths[0]}-{lengths[1]}_s{signal:g}"
    return DATA / f"{stem}_X.npy", DATA / f"{stem}_y.npy", DATA / f"{stem}_runs.npy"


def ensure_data(case: str, signal: float) -> None:
    paths = data_paths(case, signal)
    if all(p.exists() for p in paths):
        return
    n, p, k, lengths, _, _ = CASES[case]
    DATA.mkdir(parents=True, exist_ok=True)
    X, y, runs = make_data(n, p, k, lengths, signal)
    for path, arr in zip(paths, (X, y, runs), strict=True):
        np.save(path, arr)


# ----------------------------------------------------------------------------------------------
# one measurement (child process)


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(spec: dict) -> dict:
    """Load the data, run one mode's cross-validation, return time, memory and scores."""
    from nsdprep.stages import decode as dec

    x_path, y_path, runs_path = (Path(s) for s in spec["paths"])
    X = np.load(x_path, allow_pickle=False)
    y, runs = np.load(y_path, allow_pickle=False), np.load(runs_path, allow_pickle=False)
    rss_data = _peak()
    checksum = _checksum(X)
    config = dec.DecodeConfig(n_permutations=spec["n_perm"], jobs=spec["jobs"], seed=SEED)
    t0, cpu0 = time.perf_counter(), _cpu()
    if spec["mode"] == "old":
        scores = _run_old(spec["old"], X, y, runs, config)
    elif spec["mode"] == "sklearn-plain":
        scores = _run_sklearn_plain(dec, X, y, runs, config)
    else:
        if spec["mode"] == "new-stdscaler":
            _use_sklearn_scaler(dec)
        cv = dec.cross_validate(X, y, runs, config, SUBJECT)
        perm = cv["permutation_scores"] or []
        scores = {
            "fold_scores": cv["fold_scores"],
            "dummy_scores": cv["dummy_scores"],
            "permutation_scores": perm,
            "p_value": cv["p_value"],
        }
    seconds, cpu_seconds = time.perf_counter() - t0, _cpu() - cpu0
    return {
        **spec,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "rss_data": rss_data,
        "peak_rss": _peak(),
        "x_bytes": X.nbytes,
        "x_unchanged": _checksum(X) == checksum,
        "mean_balanced_accuracy": float(np.mean(scores["fold_scores"])),
        "dummy_chance": float(np.mean(scores["dummy_scores"])),
        "permutation_mean": float(np.mean(scores["permutation_scores"]))
        if scores["permutation_scores"]
        else None,
        "p_value": scores["p_value"],
    }


def _cpu() -> float:
    """User + system CPU seconds of this process (all threads): robust to a loaded machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _checksum(X: np.ndarray) -> float:
    """Sum over every 97th column: enough to see an in-place modification of the data matrix."""
    return float(X[:, :: max(1, X.shape[1] // 97)].sum(dtype=np.float64))


def _run_old(old_path: str, X: np.ndarray, y: np.ndarray, runs: np.ndarray, config) -> dict:
    """The former loop, exactly as its ``decode_subject`` called it."""
    from sklearn.dummy import DummyClassifier

    spec = importlib.util.spec_from_file_location("decode_old", old_path)
    old = importlib.util.module_from_spec(spec)
    sys.modules["decode_old"] = old  # dataclasses look their module up there
    spec.loader.exec_module(old)
    splits = old.run_grouped_splits(runs, config.n_folds)
    clf = old.make_classifier(config.seed, config.C, config.max_iter)
    dummy = DummyClassifier(strategy="stratified", random_state=config.seed)
    perms = [
        old.permute_within_runs(y, runs, (config.seed, SUBJECT, p))
        for p in range(config.n_permutations)
    ]
    jobs = old.fold_jobs(X, splits, np.unique(y).size, config.jobs, config.memory_gb)
    fits = old.cross_validate_grouped(
        X, y, splits, [clf, dummy] + [clf] * len(perms), [y, y, *perms], jobs=jobs
    )
    mean = float(np.mean(fits[0]["fold_scores"]))
    perm_means = [float(np.mean(f["fold_scores"])) for f in fits[2:]]
    p_value = (1 + sum(m >= mean for m in perm_means)) / (1 + len(perm_means)) if perms else None
    return {
        "fold_scores": fits[0]["fold_scores"],
        "dummy_scores": fits[1]["fold_scores"],
        "permutation_scores": perm_means,
        "p_value": p_value,
    }


def _run_sklearn_plain(dec, X: np.ndarray, y: np.ndarray, runs: np.ndarray, config) -> dict:
    """scikit-learn's functions handed ``X`` itself (what ``rows_of`` avoids)."""
    from joblib import parallel_config
    from sklearn.dummy import DummyClassifier
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import cross_val_predict, cross_val_score, permutation_test_score

    splits = dec.run_grouped_splits(runs, config.n_folds)
    clf = dec.make_classifier(config.seed, config.C, config.max_iter)
    dummy = DummyClassifier(strategy="stratified", random_state=config.seed)
    stand_in = np.zeros((len(y), 1))
    out = {"permutation_scores": [], "p_value": None}
    with parallel_config("threading", n_jobs=config.jobs):
        y_pred = cross_val_predict(clf, X, y, cv=splits, n_jobs=config.jobs)
        out["fold_scores"] = [balanced_accuracy_score(y[te], y_pred[te]) for _, te in splits]
        out["dummy_scores"] = cross_val_score(
            dummy, stand_in, y, cv=splits, scoring="balanced_accuracy"
        ).tolist()
        if config.n_permutations:
            _, perms, p_value = permutation_test_score(
                clf,
                X,
                y,
                groups=runs,
                cv=splits,
                n_permutations=config.n_permutations,
                n_jobs=config.jobs,
                random_state=dec.permutation_seed(config.seed, SUBJECT),
                scoring="balanced_accuracy",
            )
            out["permutation_scores"], out["p_value"] = perms.tolist(), float(p_value)
    return out


def _use_sklearn_scaler(dec) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def make_classifier(seed: int = 0, C: float = dec.DEFAULT_C, max_iter: int = 500):
        lr = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, random_state=seed)
        return make_pipeline(StandardScaler(), lr)

    dec.make_classifier = make_classifier


# ----------------------------------------------------------------------------------------------
# driver


def measure(spec: dict) -> dict:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONHASHSEED": "0",
        "PYTHONPATH": str(REPO / "code"),
    }
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument(
        "--old", type=Path, help="saved copy of the former nsdprep/stages/decode/__init__.py"
    )
    parser.add_argument("--cases", nargs="+", default=["demo", "large"], choices=list(CASES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--jobs", nargs="+", type=int, default=[1])
    parser.add_argument("--counts", nargs="+", type=int, help="permutation counts (override)")
    parser.add_argument("--repeats", type=int, help="repeats per measurement (override)")
    parser.add_argument("--signal", type=float, default=0.1, help="pattern SD (noise SD is 1)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if "old" in args.modes and (args.old is None or not args.old.is_file()):
        parser.error("mode 'old' needs --old PATH (a saved copy of the former decode.py)")
    runs: list[dict] = []
    load = {"before": os.getloadavg()}
    for case in args.cases:
        ensure_data(case, args.signal)
        _, _, _, _, counts, repeats = CASES[case]
        counts, repeats = args.counts or counts, args.repeats or repeats
        for jobs in args.jobs:
            for n_perm in counts:
                for rep in range(repeats):
                    for mode in args.modes:  # interleaved, so load changes hit every mode
                        spec = {
                            "case": case,
                            "mode": mode,
                            "n_perm": n_perm,
                            "jobs": jobs,
                            "rep": rep,
                            "paths": [str(x) for x in data_paths(case, args.signal)],
                            "old": str(args.old) if args.old else "",
                        }
                        r = measure(spec)
                        r["load"] = os.getloadavg()
                        runs.append(r)
                        print(
                            f"{case:6s} {mode:13s} jobs={jobs} perms={n_perm:4d} rep={rep} "
                            f"{r['seconds']:9.2f} s (cpu {r['cpu_seconds']:8.2f} s)  "
                            f"peak {r['peak_rss'] / 1e9:6.3f} GB "
                            f"(data+libs {r['rss_data'] / 1e9:6.3f} GB)  acc "
                            f"{r['mean_balanced_accuracy']:.3f} dummy {r['dummy_chance']:.3f} "
                            f"perm {r['permutation_mean']} p {r['p_value']}",
                            flush=True,
                        )
    load["after"] = os.getloadavg()
    summary = summarize(runs)
    for line in summary["lines"]:
        print(line)
    record = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load": load},
        "versions": {
            name: metadata.version(name) for name in ("numpy", "scipy", "scikit-learn", "joblib")
        },
        "signal": args.signal,
        "runs": runs,
        "summary": summary["table"],
    }
    _shared.save_results("decode", record)
    return 0


def summarize(runs: list[dict]) -> dict:
    """Median wall and CPU time per (case, mode, jobs, permutations), slopes per permutation, RSS."""
    table = []
    lines = [
        "",
        "case   mode          jobs perms  wall s   cpu s  wall/perm cpu/perm  peak GB  CV adds GB",
    ]
    keys = sorted({(r["case"], r["mode"], r["jobs"]) for r in runs})
    for case, mode, jobs in keys:
        sel = [r for r in runs if (r["case"], r["mode"], r["jobs"]) == (case, mode, jobs)]
        counts = sorted({r["n_perm"] for r in sel})
        wall, cpu = (
            {c: statistics.median(r[key] for r in sel if r["n_perm"] == c) for c in counts}
            for key in ("seconds", "cpu_seconds")
        )
        span = counts[-1] - counts[0]
        wall_slope = (wall[counts[-1]] - wall[counts[0]]) / span if span else float("nan")
        cpu_slope = (cpu[counts[-1]] - cpu[counts[0]]) / span if span else float("nan")
        for c in counts:
            peak = max(r["peak_rss"] for r in sel if r["n_perm"] == c)
            data = min(r["rss_data"] for r in sel if r["n_perm"] == c)
            table.append(
                {
                    "case": case,
                    "mode": mode,
                    "jobs": jobs,
                    "n_perm": c,
                    "median_seconds": wall[c],
                    "median_cpu_seconds": cpu[c],
                    "seconds_per_permutation": wall_slope,
                    "cpu_seconds_per_permutation": cpu_slope,
                    "peak_rss": peak,
                    "cv_adds": peak - data,
                    "x_unchanged": all(r["x_unchanged"] for r in sel),
                }
            )
            lines.append(
                f"{case:6s} {mode:13s} {jobs:4d} {c:5d} {wall[c]:7.2f} {cpu[c]:7.2f} "
                f"{wall_slope:9.3f} {cpu_slope:8.3f} {peak / 1e9:8.3f} {(peak - data) / 1e9:10.3f}"
            )
    return {"table": table, "lines": lines}


if __name__ == "__main__":
    sys.exit(main())
