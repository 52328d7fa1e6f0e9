"""``make bench-decode``: the ridge decoder on a real-size synthetic subject, against the sgemm floor and logistic.

Writes one synthetic curated subject as ``make curated`` writes it (the pipeline's writers:
``sub-01.nii.gz``, the int16 matrix ``sub-01_X.npy``, ``sub-01_mask.nii.gz``, ``_labels.npy``,
``_runs.npy``, ``_trials.tsv``) in ``bench/data/decode``: 22,274 trials (30 sessions of 12 runs of
63/62 trials, 226 trials dropped as curation drops them) x the grey-matter voxels of NSD's 3 mm grid
(nilearn's MNI152 grey-matter mask resampled to the 3 mm grid of the 1 mm MNI files, as the 3 mm
stage computes it), 12 classes with NSD-like unbalanced counts, a weak planted pattern, run drifts,
session offsets, shared low-rank noise. ``--scale S`` scales trials and voxels (0.1: ~1000x less
work) for a quick check; the written subject is kept for later runs (``--clean`` removes it).

Then, each in a fresh process (its own peak RSS, ``run_measured``; the process's BLAS set to one thread as
the Makefile does; the decoder runs ``--jobs`` worker threads):

- ``sgemm``: the machine's float32 matrix product rate (numpy ``matmul`` of 4096-square matrices
  with ``--jobs`` BLAS threads, best of 3) -> ``sgemm_floor_seconds = 2 n^2 p / rate``, the time of
  the full product ``X X^T`` (the decoder computes only its lower half, so it can beat the floor);
- ``ridge`` with 100 and with 1000 permutations: ``decode_subject`` as ``make decode`` runs it
  (kernel, folds, chance models) -> ``seconds_full_subject_100perm``, ``peak_rss_gb``,
  ``gram_seconds``, ``ratio_to_floor``, ``seconds_1000perm``;
- ``logistic``: one cross-validation of the logistic path (no permutations; the data matrix in
  memory, ~11 GB at real size) -> ``speedup_vs_logistic`` = ``101 x`` its time / the ridge's
  100-permutation time: extrapolated (the logistic path runs one cross-validation per permutation,
  plus the true labels), not measured; ``--no-logistic`` skips it.

Results: ``bench/results/decode_latest.json`` (+ a dated copy); ``--scale`` other than 1 writes
``decode_small_*`` instead, so a quick check never replaces a real-size result. Also recorded: the
BLAS libraries and their thread counts (threadpoolctl, inside the decoding child), the load
averages before and after, the package versions. Run it on an idle machine: the numbers are times.

    python bench/bench_decode.py [--scale 0.1] [--jobs 2] [--no-logistic] [--clean]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import _shared
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "code"))

NSD_AFFINE = np.array([[-1.0, 0, 0, 90], [0, 1, 0, -126], [0, 0, 1, -72], [0, 0, 0, 1]])
#: NSD's curated subject: 30 sessions x 750 trials, 226 unknown-label trials dropped.
N_SLOTS, N_TRIALS = 22_500, 22_274
RUNS_PER_SESSION, RUN_LENGTHS = 12, (63, 62)
CLASSES = (
    "person", "animal", "vehicle", "food", "sports", "kitchen",
    "furniture", "outdoor", "accessory", "electronic", "indoor", "appliance",
)  # fmt: skip
#: NSD-like unbalanced label frequencies (person most frequent).
PRIOR = np.array([0.30, 0.12, 0.10, 0.09, 0.08, 0.07, 0.06, 0.05, 0.04, 0.04, 0.03, 0.02])
SIGNAL, SHARED, RANK = 0.05, 2.0, 20
LOGISTIC_FACTOR = (
    101  # cross-validations the logistic path runs for 100 permutations (+ true labels)
)
ENV_ONE_THREAD = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONHASHSEED": "0",
}


# ----------------------------------------------------------------------------------------------
# the synthetic subject


def make_subject(folder: Path, scale: float, seed: int = 0) -> dict:
    """Write ``sub-01*`` as the curated stage does; return what was written."""
    import pandas as pd

    from nsdprep.core import masks, nsd
    from nsdprep.core.grid import grid_map
    from nsdprep.core.matrix import MatrixWriter
    from nsdprep.core.nifti import NiftiStreamWriter

    rng = np.random.default_rng(seed)
    gmap = grid_map((182, 218, 182), NSD_AFFINE)
    gm = np.array(masks.gm_mask(gmap.shape, gmap.affine))
    n_gm = int(gm.sum())
    if scale < 1:  # keep every k-th grey-matter voxel
        idx = np.flatnonzero(gm)
        gm = np.zeros(gm.size, bool)
        gm[idx[np.linspace(0, idx.size - 1, max(1, round(idx.size * scale))).astype(int)]] = True
        gm = gm.reshape(gmap.shape)
    p = int(gm.sum())
    slots = max(RUNS_PER_SESSION * 2, round(N_SLOTS * scale))
    n_drop = round((N_SLOTS - N_TRIALS) * slots / N_SLOTS)
    sizes = [RUN_LENGTHS[r % 2] for r in range(slots // 62 + 2)]
    run = np.repeat(np.arange(1, len(sizes) + 1), sizes)[:slots]
    keep = np.ones(slots, bool)
    keep[np.linspace(0, slots - 1, n_drop + 2).astype(int)[1:-1]] = False
    run = run[keep]
    n = run.size
    session = (run - 1) // RUNS_PER_SESSION + 1
    y = rng.choice(len(CLASSES), n, p=PRIOR / PRIOR.sum())
    pattern = rng.standard_normal((len(CLASSES), p), dtype=np.float32) * np.float32(SIGNAL)
    drift = rng.standard_normal((run.max(), p), dtype=np.float32) * np.float32(0.5)
    offset = rng.standard_normal((session.max(), p), dtype=np.float32)
    comps = rng.standard_normal((RANK, p), dtype=np.float32) * np.float32(SHARED / np.sqrt(RANK))
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    vol = np.zeros(gmap.shape, np.int16)
    with (
        NiftiStreamWriter(folder / "sub-01.nii.gz", gmap.shape, gmap.affine, np.int16, n) as w,
        MatrixWriter(folder / "sub-01_X.npy", gm, n) as m,
    ):
        for a in range(0, n, 256):
            b = min(n, a + 256)
            block = rng.standard_normal((b - a, p), dtype=np.float32)
            block += pattern[y[a:b]] + drift[run[a:b] - 1] + offset[session[a:b] - 1]
            block += rng.standard_normal((b - a, RANK), dtype=np.float32) @ comps
            rows = np.clip(np.round(block * 300), -32768, 32767).astype(np.int16)
            for row in rows:
                vol[gm] = row
                w.write(vol)
                m.write(vol)
    with NiftiStreamWriter(
        folder / "sub-01_mask.nii.gz", gmap.shape, gmap.affine, np.uint8, None
    ) as w:
        w.write(gm.astype(np.uint8))
    labels = np.asarray(CLASSES)[y]
    np.save(folder / "sub-01_labels.npy", labels)
    np.save(folder / "sub-01_runs.npy", run.astype(np.int64))
    ris = (run - 1) % RUNS_PER_SESSION + 1
    trial = np.arange(1, slots + 1)[keep]
    table = pd.DataFrame(
        {
            "subject": 1, "session": session, "run_in_session": ris, "run": run, "trial": trial,
            "trial_in_session": (trial - 1) % 750 + 1, "nsdId": 0, "cocoId": 0,
            "supercat": labels, "cat": labels,
            "split": "train",  # no shared images modelled: the bench decodes with SPLIT=cv
        }
    )  # fmt: skip
    table.loc[:, list(nsd.TRIAL_COLUMNS)].to_csv(
        folder / "sub-01_trials.tsv", sep="\t", index=False, lineterminator="\n"
    )
    return {
        "scale": scale,
        "n_trials": n,
        "n_voxels": p,
        "grey_matter_voxels_3mm": n_gm,
        "grid": list(gmap.shape),
        "n_runs": int(np.unique(run).size),
        "n_sessions": int(session.max()),
        "class_counts": np.bincount(y, minlength=len(CLASSES)).tolist(),
        "signal_sd": SIGNAL,
        "write_seconds": round(time.perf_counter() - t0, 1),
        "matrix_bytes": (folder / "sub-01_X.npy").stat().st_size,
    }


# ----------------------------------------------------------------------------------------------
# children (each in its own process)


def child_sgemm(jobs: str) -> dict:
    """Best of 3 float32 ``matmul`` rates of 4096-square matrices with ``jobs`` BLAS threads."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    a = rng.standard_normal((4096, 4096), dtype=np.float32)
    b = rng.standard_normal((4096, 4096), dtype=np.float32)
    with threadpool_limits(int(jobs), user_api="blas"):
        a @ b  # warm up (thread pool, pages)
        best = min(_timed(lambda: a @ b) for _ in range(3))
    return {"gflops": 2 * 4096**3 / best / 1e9, "threads": int(jobs)}


def child_ridge(folder: str, permutations: str, jobs: str) -> dict:
    """``decode_subject`` with the ridge decoder, as ``make decode`` runs it."""
    from threadpoolctl import threadpool_info

    from nsdprep.core import nsd
    from nsdprep.stages import decode as dec

    config = dec.DecodeConfig(permutations=int(permutations), jobs=int(jobs))
    timings: dict[str, float] = {}
    t0, cpu0 = time.perf_counter(), _cpu()
    res = dec.decode_subject(nsd.curated_files(1, folder), config, timings)
    seconds, cpu = time.perf_counter() - t0, _cpu() - cpu0
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        **timings,
        "mean_balanced_accuracy": res["mean_balanced_accuracy"],
        "permutation_mean": res["permutation_mean"],
        "p_value": res["permutation_p_value"],
        "alpha": res["alpha"],
        "blas": [
            {
                k: i.get(k)
                for k in ("internal_api", "version", "num_threads", "architecture", "filepath")
            }
            for i in threadpool_info()
            if i.get("user_api") == "blas"
        ],
    }


def child_logistic(folder: str, jobs: str) -> dict:
    """One cross-validation of the logistic path (no permutations), the data matrix in memory."""
    from nsdprep.core import nsd
    from nsdprep.stages import decode as dec
    from nsdprep.stages.decode.data import load_labels_runs, load_masked

    files = nsd.curated_files(1, folder)
    n = int(np.load(files.runs, allow_pickle=False).size)
    y, runs = load_labels_runs(files, n)
    X, _, _ = load_masked(files, np.arange(n))
    config = dec.DecodeConfig(classifier="logistic", permutations=0, jobs=int(jobs))
    t0, cpu0 = time.perf_counter(), _cpu()
    cv = dec.cross_validate(X, y, runs, config, 1)
    return {
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": _cpu() - cpu0,
        "mean_balanced_accuracy": float(np.mean(cv["fold_scores"])),
    }


def _cpu() -> float:
    """User + system CPU seconds of this process, all threads (robust to a loaded machine)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


CHILDREN = {"sgemm": child_sgemm, "ridge": child_ridge, "logistic": child_logistic}


def run(kind: str, *args: str, threads: int = 1) -> tuple[dict, float]:
    """One child; returns its JSON and peak RSS in GB."""
    env = {**os.environ, **ENV_ONE_THREAD, "PYTHONPATH": str(ROOT / "code")}
    if threads != 1:
        env.update(OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    out, peak_mb = _shared.run_child(__file__, [kind, *args], env)
    return out, peak_mb * 1024 * 1024 / 1e9


# ----------------------------------------------------------------------------------------------
# driver


def main() -> int:
    """Write the subject (unless present), measure, write the results JSON, print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scale", type=float, default=1.0, help="trials and voxels x S (quick check)"
    )
    parser.add_argument("--jobs", type=int, default=None, help="worker threads (default: JOBS)")
    parser.add_argument("--data", type=Path, default=ROOT / "bench/data/decode")
    parser.add_argument("--no-logistic", action="store_true", help="skip the logistic comparison")
    parser.add_argument(
        "--clean", action="store_true", help="remove the synthetic subject at the end"
    )
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    _shared.add_make_options(parser)
    args = parser.parse_args()
    if not args.child:
        opts = _shared.make_options(args)
        args.jobs = opts.jobs if args.jobs is None else args.jobs
    if args.child:
        return _shared.answer_child(CHILDREN, args.child)
    if not 0 < args.scale <= 1:
        parser.error("--scale must be in (0, 1]")
    folder = args.data / f"scale{args.scale:g}"
    info_file = folder / "info.json"
    if info_file.is_file():
        info = json.loads(info_file.read_text())
    else:
        shutil.rmtree(folder, ignore_errors=True)
        print(
            f"writing a synthetic curated subject (scale {args.scale:g}) to {folder} ...",
            flush=True,
        )
        info = make_subject(folder, args.scale)
        info_file.write_text(json.dumps(info))
    n, p = info["n_trials"], info["n_voxels"]
    print(f"subject: {n} trials x {p} voxels, {info['n_runs']} runs, {info['n_sessions']} sessions")

    load_before = os.getloadavg()
    sgemm, _ = run("sgemm", str(args.jobs), threads=args.jobs)
    print(f"sgemm: {sgemm['gflops']:.1f} GFLOP/s with {args.jobs} BLAS threads", flush=True)
    ridge100, peak100 = run("ridge", str(folder), "100", str(args.jobs))
    print(
        f"ridge, 100 permutations: {ridge100['seconds']:.1f} s, peak {peak100:.2f} GB", flush=True
    )
    ridge1000, peak1000 = run("ridge", str(folder), "1000", str(args.jobs))
    print(
        f"ridge, 1000 permutations: {ridge1000['seconds']:.1f} s, peak {peak1000:.2f} GB",
        flush=True,
    )
    logistic = None
    if not args.no_logistic:
        logistic, peak_lr = run("logistic", str(folder), str(args.jobs))
        logistic["peak_rss_gb"] = peak_lr
        print(f"logistic, one cross-validation: {logistic['seconds']:.1f} s, peak {peak_lr:.2f} GB")
    load_after = os.getloadavg()

    floor = 2 * n * n * p / (sgemm["gflops"] * 1e9)
    record = {
        "seconds_full_subject_100perm": ridge100["seconds"],
        "peak_rss_gb": peak100,
        "gram_seconds": ridge100["kernel_seconds"],
        "sgemm_floor_seconds": floor,
        "ratio_to_floor": ridge100["seconds"] / floor,
        "seconds_1000perm": ridge1000["seconds"],
        "cpu_seconds_100perm": ridge100["cpu_seconds"],
        "cpu_seconds_1000perm": ridge1000["cpu_seconds"],
        "peak_rss_gb_1000perm": peak1000,
        "speedup_vs_logistic": (
            LOGISTIC_FACTOR * logistic["seconds"] / ridge100["seconds"] if logistic else None
        ),
        "speedup_vs_logistic_cpu": (
            LOGISTIC_FACTOR * logistic["cpu_seconds"] / ridge100["cpu_seconds"]
            if logistic
            else None
        ),
        "speedup_vs_logistic_note": (
            f"extrapolated: one logistic cross-validation measured ({logistic['seconds']:.1f} s) "
            f"x {LOGISTIC_FACTOR} (the true labels + 100 permutations, one cross-validation each)"
            if logistic
            else "not measured (--no-logistic)"
        ),
        "sgemm_gflops": sgemm["gflops"],
        "sgemm_floor_note": "2 n^2 p flops (the full X X^T) / the sgemm rate; the decoder "
        "computes the lower half of X X^T only",
        "jobs": args.jobs,
        "blas": ridge100["blas"],
        "blas_threads_note": "the process's BLAS is set to 1 thread (as by the Makefile); the "
        f"decoder runs its fixed tiles on {args.jobs} worker threads, each BLAS call single-threaded",
        "load": {"before": load_before, "after": load_after},
        "ridge_100": {**ridge100, "peak_rss_gb": peak100},
        "ridge_1000": {**ridge1000, "peak_rss_gb": peak1000},
        "logistic_one_cv": logistic,
        "subject": info,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "versions": _shared.versions(["numpy", "scipy", "scikit-learn", "threadpoolctl"]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    _shared.save_results("decode" if args.scale == 1 else "decode_small", record)
    print(
        f"\n{'':28} {'seconds':>9} {'peak GB':>8}\n"
        f"{'ridge, 100 permutations':28} {ridge100['seconds']:9.1f} {peak100:8.2f}\n"
        f"{'  kernel (Gram)':28} {ridge100['kernel_seconds']:9.1f}\n"
        f"{'ridge, 1000 permutations':28} {ridge1000['seconds']:9.1f} {peak1000:8.2f}\n"
        f"{'sgemm floor (2 n^2 p)':28} {floor:9.1f}\n"
        f"ratio to floor {record['ratio_to_floor']:.2f}; speed-up vs logistic "
        + (f"{record['speedup_vs_logistic']:.0f}x (extrapolated)" if logistic else "not measured")
    )
    if args.clean:
        shutil.rmtree(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
