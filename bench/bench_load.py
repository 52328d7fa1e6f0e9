"""``make bench-load``: reading a curated subject from the matrix against streaming the 4D NIfTI.

Writes one full-size synthetic curated subject (default 22,500 trials on NSD's real 3 mm grid,
62x74x62, grey-matter mask from nilearn's MNI152 template; int16 values inside the mask, 0 outside)
as ``sub-01.nii.gz`` and ``sub-01_X.npy`` with the pipeline's own writers, then measures, each in a
fresh subprocess (peak RSS of that child: its own ``VmHWM``, the whole process, imports included):

- time to the first trial;
- time to 1,000 random trials (the same sorted indices for both);
- time to all trials;

for the memory-mapped matrix (``numpy.load(mmap_mode="r")``) and for streaming the 4D file into the
same trials x voxels rows (mask read from ``sub-01_mask.nii.gz`` as the matrix's users do) (``nsdprep.core.nifti.iter_volumes``, the only way to reach a trial in a gzip
stream). Reads run with the files in the page cache from earlier rounds (the cache is dropped after writing,
where the machine allows: pages still cached from the write can be mapped as large folios, which
inflates a reader's RSS, 1.7 GB instead of 0.43 GB for 1,000 random rows, seen here); a cold-cache
round of the random read follows (``/proc/sys/vm/drop_caches``).
Results: ``bench/results/load_latest.json`` (+ a dated copy), key ``speedup_random_1000`` =
NIfTI time / matrix time for the 1,000 random trials.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import _shared
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "code"))

NSD_AFFINE = np.array([[-1.0, 0, 0, 90], [0, 1, 0, -126], [0, 0, 1, -72], [0, 0, 0, 1]])
N_RANDOM = 1000


def make_subject(folder: Path, n_trials: int, seed: int = 0) -> dict:
    """Write ``sub-01.nii.gz`` and ``sub-01_X.npy`` for ``n_trials`` synthetic trials."""
    from nsdprep.core import masks
    from nsdprep.core.matrix import MatrixWriter
    from nsdprep.core.nifti import NiftiStreamWriter
    from nsdprep.stages.resample import grid_map

    gmap = grid_map((182, 218, 182), NSD_AFFINE)
    mask = masks.gm_mask(gmap.shape, gmap.affine)
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    vol = np.zeros(gmap.shape, np.int16)
    mask_path = folder / "sub-01_mask.nii.gz"
    with NiftiStreamWriter(mask_path, gmap.shape, gmap.affine, np.uint8, None) as w:
        w.write(mask.astype(np.uint8))
    with (
        NiftiStreamWriter(
            folder / "sub-01.nii.gz", gmap.shape, gmap.affine, np.int16, n_trials
        ) as w,
        MatrixWriter(folder / "sub-01_X.npy", mask, n_trials) as m,
    ):
        for _ in range(n_trials):
            vol[mask] = rng.normal(0, 300, int(mask.sum())).astype(np.int16)
            w.write(vol)
            m.write(vol)
    return {
        "grid": list(gmap.shape),
        "n_trials": n_trials,
        "n_voxels": int(mask.sum()),
        "write_s": round(time.perf_counter() - t0, 1),
        "nifti_bytes": (folder / "sub-01.nii.gz").stat().st_size,
        "matrix_bytes": (folder / "sub-01_X.npy").stat().st_size,
        "nifti_decompressed_bytes": int(np.prod(gmap.shape)) * 2 * n_trials + 352,
    }


# -- what each child does ----------------------------------------------------------------------------
def child(method: str, what: str, folder: Path, rows_file: Path) -> None:
    """Run one measurement and print ``seconds checksum`` (the checksum proves the same rows)."""
    import nibabel as nib

    from nsdprep.core.nifti import iter_volumes, read_header

    rows = np.load(rows_file, allow_pickle=False)
    t0 = time.perf_counter()
    if method == "matrix":
        X = np.load(folder / "sub-01_X.npy", mmap_mode="r", allow_pickle=False)
        if what == "first":
            out = np.array(X[0])
        elif what == "random":
            out = np.array(X[rows])
        else:
            out = np.array(X)
    else:
        path = folder / "sub-01.nii.gz"
        hdr = read_header(path)
        mask = np.asarray(nib.load(folder / "sub-01_mask.nii.gz").dataobj) != 0
        n = int(hdr.get_data_shape()[3])
        wanted = {0} if what == "first" else set(rows.tolist()) if what == "random" else None
        last = 0 if what == "first" else int(rows.max()) if what == "random" else n - 1
        out = np.empty((1 if what == "first" else len(rows) if what == "random" else n,
                        int(mask.sum())), np.int16)  # fmt: skip
        i = 0
        for k, vol in enumerate(iter_volumes(path, stop=last + 1)):
            if wanted is None or k in wanted:
                out[i] = vol[mask]
                i += 1
    seconds = time.perf_counter() - t0
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmHWM:"))  # fmt: skip
    print(f"{seconds:.6f} {int(out.sum(dtype=np.int64))} {int(hwm.split()[1])}")


def run_child(method: str, what: str, folder: Path, rows_file: Path) -> dict:
    """One measurement in a fresh process: seconds, checksum, peak RSS (MB)."""
    cmd = [sys.executable, __file__, "--child", method, what, str(folder), str(rows_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"child {method} {what} failed: {proc.stdout}{proc.stderr}")
    seconds, checksum, hwm_kb = proc.stdout.split()
    return {"s": float(seconds), "checksum": int(checksum), "peak_rss_mb": int(hwm_kb) / 1024}


def drop_caches() -> bool:
    """Drop the page cache if allowed (root on a machine that permits it)."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> int:
    """Write the subject (unless present), measure, write the results JSON, print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=22500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=ROOT / "bench/data/load")
    parser.add_argument("--keep", action="store_true", help="keep the data for another run")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    _shared.add_make_options(parser)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], Path(args.child[2]), Path(args.child[3]))
        return 0
    _shared.make_options(args)  # none of them changes this benchmark; a wrong one is refused
    info_file = args.data / "info.json"
    if info_file.exists() and json.loads(info_file.read_text())["n_trials"] == args.trials:
        info = json.loads(info_file.read_text())
    else:
        print(f"writing a synthetic curated subject of {args.trials} trials to {args.data} ...")
        info = make_subject(args.data, args.trials)
        info_file.write_text(json.dumps(info))
    n_random = min(N_RANDOM, args.trials // 2)
    rows = np.sort(np.random.default_rng(1).choice(args.trials, n_random, replace=False))
    rows_file = args.data / "rows.npy"
    np.save(rows_file, rows)
    # Start from the page cache a reader meets: pages just written can sit in the cache as large
    # folios that a read-only mapping maps whole (RSS then counts up to MBs per touched row).
    dropped_after_write = drop_caches()
    results: dict[str, dict[str, list[dict]]] = {}
    for what in ("first", "random", "all"):
        for method in ("matrix", "nifti"):
            for _ in range(args.repeats if not (method == "nifti" and what == "all") else 1):
                results.setdefault(what, {}).setdefault(method, []).append(
                    run_child(method, what, args.data, rows_file)
                )
        if len({r["checksum"] for m in results[what].values() for r in m}) != 1:
            raise SystemExit(f"{what}: the matrix and the NIfTI gave different rows")
    cold = {}
    if drop_caches():
        for method in ("matrix", "nifti"):
            drop_caches()
            cold[method] = run_child(method, "random", args.data, rows_file)
    summary = {
        what: {
            method: {
                "median_s": statistics.median(r["s"] for r in runs),
                "min_s": min(r["s"] for r in runs),
                "max_s": max(r["s"] for r in runs),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                "runs": len(runs),
            }
            for method, runs in by_method.items()
        }
        for what, by_method in results.items()
    }
    out = {
        "subject": info,
        "n_random": n_random,
        "page_cache": "warm from reading"
        + (" (cache dropped after writing)" if dropped_after_write else " (maybe from writing)"),
        "results": summary,
        "cold_random_1000": cold or "not measured (cannot drop the page cache here)",
        "speedup_first": summary["first"]["nifti"]["median_s"]
        / summary["first"]["matrix"]["median_s"],
        "speedup_random_1000": summary["random"]["nifti"]["median_s"]
        / summary["random"]["matrix"]["median_s"],
        "speedup_all": summary["all"]["nifti"]["median_s"] / summary["all"]["matrix"]["median_s"],
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg": os.getloadavg(),
        },  # fmt: skip
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    _shared.save_results("load", out)
    print(
        f"{'':8} {'matrix s':>10} {'NIfTI s':>10} {'speedup':>8} {'RSS matrix':>11} {'RSS NIfTI':>10}"
    )
    for what in ("first", "random", "all"):
        m, n = summary[what]["matrix"], summary[what]["nifti"]
        print(f"{what:8} {m['median_s']:10.4f} {n['median_s']:10.2f} "
              f"{n['median_s'] / m['median_s']:8.1f} {m['peak_rss_mb']:9.0f}MB {n['peak_rss_mb']:8.0f}MB")  # fmt: skip
    if cold:
        print(
            f"cold cache, 1000 random: matrix {cold['matrix']['s']:.3f} s, "
            f"NIfTI {cold['nifti']['s']:.1f} s"
        )
    if not args.keep:
        for f in ("sub-01.nii.gz", "sub-01_X.npy", "sub-01_mask.nii.gz", "rows.npy", "info.json"):
            (args.data / f).unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
