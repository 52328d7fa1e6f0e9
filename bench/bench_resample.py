"""Benchmark of the 3 mm stage on full-geometry synthetic sessions (182x218x182, NSD affine, int16).

Three methods, each run in its own subprocess (peak RSS of that child alone, ``run_measured``):

* ``reference`` -- nilearn as in the original processing (``resample_img`` to ``diag(3, 3, 3)``,
  GM mask resampled nearest, ``NiftiMasker`` round trip; the oracle of tests/test_resample.py),
* ``ours`` -- :func:`nsdprep.stages.resample.resample_session` (reads, resamples, masks, writes),
* ``floor`` -- plain gzip decompression of the same file with ISA-L (``isal.igzip``), the
  fastest decoder available: no resampler that reads the file can beat it.

Each method is timed on two session lengths (``--ref-counts``, ``--counts``), ``--repeats`` times
each (rounds interleave the methods so load changes hit all of them); the median time per length
gives the **slope** (marginal seconds per volume, setup excluded) and the **total per volume** at the
larger length (setup included). Imports are timed separately and excluded from both (a worker pays
them once for all its sessions). A ``setup`` child breaks ours' fixed cost down. Max |ours -
reference| is taken over all volumes of the reference's larger session.

``--rss-volumes N`` (default 750, a real session's length; 0 skips) streams an N-volume file to
``bench/data/`` (self-ignored by git), runs ours and the floor on it once, and deletes it
(``--keep-data`` keeps it). Results: a table on stdout, ``bench/results/resample_<stamp>.json`` and
``bench/results/resample_latest.json``.

    python bench/bench_resample.py [--counts 40 120] [--ref-counts 4 20] [--repeats 3] [--rss-volumes 750]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _shared
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "code"))

DATA = REPO / "bench" / "data"
SHAPE = (182, 218, 182)
NSD_AFFINE = np.array(
    [[-1.0, 0, 0, 90], [0, 1.0, 0, -126], [0, 0, 1.0, -72], [0, 0, 0, 1]], dtype=np.float64
)
#: Issue targets.
MIN_SPEEDUP = 20.0
MAX_FLOOR_RATIO = 1.5
MAX_RSS_MB = 1.5 * 1024


def session_path(n_volumes: int, seed: int) -> Path:
    return DATA / f"betas_full_{n_volumes}v_seed{seed}.nii.gz"


def make_session(n_volumes: int, seed: int = 0) -> Path:
    """Write (once, streaming) a synthetic int16 session: noisy betas in a brain-sized ellipsoid."""
    from nsdprep.core.nifti import NiftiStreamWriter

    DATA.mkdir(parents=True, exist_ok=True)
    ignore = DATA / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# generated benchmark data, never committed\n*\n")
    path = session_path(n_volumes, seed)
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    grid = np.indices(SHAPE, dtype=np.float32)
    centre = np.array(SHAPE, dtype=np.float32)[:, None, None, None] / 2
    radii = np.array([70, 90, 75], dtype=np.float32)[:, None, None, None]
    inside = (((grid - centre) / radii) ** 2).sum(axis=0) <= 1
    del grid
    smooth = rng.normal(0, 150, size=SHAPE).astype(np.float32)
    t0 = time.perf_counter()
    with NiftiStreamWriter(path, SHAPE, NSD_AFFINE, np.int16, n_volumes) as w:
        for t in range(n_volumes):
            vol = smooth + rng.normal(0, 250, size=SHAPE).astype(np.float32)
            vol = np.clip(np.rint(vol), -32768, 32767).astype(np.int16)
            vol[~inside] = 0
            w.write(vol)
            if t % 50 == 0:
                print(f"  generating {path.name}: {t}/{n_volumes}", file=sys.stderr)
    print(f"  generated {path.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return path


# ---------------------------------------------------------------- measured children


def _timed_imports(modules: list[str]) -> float:
    import importlib

    t0 = time.perf_counter()
    for m in modules:
        importlib.import_module(m)
    return time.perf_counter() - t0


def child_reference(src: str, out_npy: str) -> dict:

    imports = _timed_imports(
        ["nibabel", "nilearn.datasets", "nilearn.image", "nilearn.maskers", "scipy.ndimage"]
    )
    import nibabel as nib

    from nsdprep.testing.reference import original_3mm

    c0, t0 = time.process_time(), time.perf_counter()
    img = nib.load(src)
    img = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header)
    out, _ = original_3mm(img)
    data = np.asarray(out.dataobj)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    if out_npy != "-":
        np.save(out_npy, data)
    return {
        "volumes": int(data.shape[3]),
        "seconds": seconds,
        "cpu_seconds": cpu,
        "import_seconds": imports,
    }


def child_ours(src: str, dst: str) -> dict:
    imports = _timed_imports(["nsdprep.stages.resample", "nilearn.datasets", "nilearn.image"])
    from nsdprep.stages.resample import resample_session

    stamps: list[float] = []
    c0, t0 = time.process_time(), time.perf_counter()
    res = resample_session(src, dst, progress=lambda n: stamps.append(time.perf_counter()))
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    steady = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else float("nan")
    return {
        "volumes": res.n_volumes,
        "seconds": total,
        "cpu_seconds": cpu,
        "import_seconds": imports,
        # fixed cost before the first volume, as seen from inside this run
        "setup_seconds": stamps[0] - t0 - steady,
        "fast_path": res.fast,
        "dtype": res.dtype,
        "output_mb": os.path.getsize(dst) / 2**20,
    }


def child_floor(src: str) -> dict:
    imports = _timed_imports(["isal.igzip", "nsdprep.core.nifti"])
    from isal import igzip

    from nsdprep.core.nifti import read_header, volume_count

    n = volume_count(read_header(src))
    c0, t0 = time.process_time(), time.perf_counter()
    total = 0
    buf = bytearray(1 << 20)
    with open(src, "rb", buffering=1 << 20) as raw, igzip.GzipFile(fileobj=raw) as f:
        while got := f.readinto(buf):
            total += got
    return {
        "volumes": n,
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "import_seconds": imports,
        "bytes": total,
    }


def child_setup(src: str) -> dict:
    """Where ours' fixed cost goes: imports, header, grid plan, first volume, GM mask."""
    out: dict = {}
    t = time.perf_counter()
    import nsdprep.stages.resample as r

    out["import_nsdprep_resample"] = time.perf_counter() - t
    t = time.perf_counter()
    import nilearn.datasets  # noqa: F401
    import nilearn.image  # noqa: F401  (what grid_map / gm_mask import lazily)

    out["import_nilearn"] = time.perf_counter() - t
    t = time.perf_counter()
    hdr = r.check_betas_header(src, dtype=np.int16)
    out["check_header"] = time.perf_counter() - t
    t = time.perf_counter()
    plan = r.grid_map(hdr.get_data_shape()[:3], r.header_affine(hdr))
    out["grid_map"] = time.perf_counter() - t
    t = time.perf_counter()
    next(r.iter_volumes(src, stop=1, header=hdr))
    out["probe_first_volume"] = time.perf_counter() - t
    t = time.perf_counter()
    from nilearn.datasets import load_mni152_gm_mask

    gm = load_mni152_gm_mask()
    np.asarray(gm.dataobj)
    out["gm_mask_load_mni152"] = time.perf_counter() - t
    t = time.perf_counter()
    r.gm_mask(plan)  # load again + nearest resample to the 3 mm grid (cached afterwards)
    out["gm_mask_total"] = time.perf_counter() - t
    t = time.perf_counter()
    r.gm_mask(plan)
    out["gm_mask_cached_call"] = time.perf_counter() - t
    return out


def child_generate(n: str, seed: str) -> dict:
    t0 = time.perf_counter()
    path = make_session(int(n), int(seed))
    return {"volumes": int(n), "seconds": time.perf_counter() - t0, "path": str(path)}


CHILDREN = {
    "reference": child_reference,
    "ours": child_ours,
    "floor": child_floor,
    "setup": child_setup,
    "generate": child_generate,
}


def run_child(*args: str) -> dict:
    """Run this script as ``--child ...``; return its JSON plus its own peak RSS."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    result, peak_rss_mb = _shared.run_child(__file__, args, env)
    result["peak_rss_mb"] = peak_rss_mb
    return result


# ---------------------------------------------------------------- analysis


def max_diff(ours_path: Path, ref_npy: Path) -> dict:
    from nsdprep.core.nifti import iter_volumes

    ref = np.load(ref_npy, allow_pickle=False)
    ours = np.stack(list(iter_volumes(ours_path)), axis=-1)
    if ours.shape != ref.shape:
        raise SystemExit(f"shape mismatch: ours {ours.shape}, reference {ref.shape}")
    return {
        "compared_volumes": int(ref.shape[3]),
        "ours_dtype": str(ours.dtype),
        "reference_dtype": str(ref.dtype),
        "max_abs_diff": float(np.abs(ours.astype(np.float64) - ref).max()),
        "max_abs_diff_vs_reference_rounded": float(np.abs(ours - np.rint(ref)).max()),
        "n_voxels_differing_after_rounding": int((ours != np.rint(ref)).sum()),
    }


def summarise(runs: dict[int, list[dict]]) -> dict:
    """Median per length; slope between the two lengths; total per volume at the larger one."""
    (n1, r1), (n2, r2) = sorted(runs.items())
    t1 = statistics.median(r["seconds"] for r in r1)
    t2 = statistics.median(r["seconds"] for r in r2)
    slope = (t2 - t1) / (n2 - n1)
    c1 = statistics.median(r["cpu_seconds"] for r in r1)
    c2 = statistics.median(r["cpu_seconds"] for r in r2)
    return {
        "volumes": [n1, n2],
        "median_seconds": [t1, t2],
        "all_seconds": [[r["seconds"] for r in r1], [r["seconds"] for r in r2]],
        "slope_s_per_volume": slope,
        "intercept_seconds": t1 - slope * n1,
        "total_s_per_volume": t2 / n2,
        "median_cpu_seconds": [c1, c2],
        "cpu_slope_s_per_volume": (c2 - c1) / (n2 - n1),
        "cpu_total_s_per_volume": c2 / n2,
        "median_import_seconds": statistics.median(r["import_seconds"] for r in r1 + r2),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in r1 + r2),
    }


def versions() -> dict:
    return _shared.versions(("numpy", "scipy", "nibabel", "nilearn", "isal"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--counts", type=int, nargs=2, default=[40, 120], help="lengths for ours/floor")
    p.add_argument("--ref-counts", type=int, nargs=2, default=[4, 20], help="lengths for nilearn")
    p.add_argument("--repeats", type=int, default=3, help="runs per method and length (median)")
    p.add_argument(
        "--rss-volumes", type=int, default=750, help="ours' RSS on an N-volume session (0: skip)"
    )
    p.add_argument("--keep-data", action="store_true", help="keep the --rss-volumes file")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    _shared.add_make_options(p)
    args = p.parse_args(argv)
    if args.child:
        return _shared.answer_child(CHILDREN, args.child)
    _shared.make_options(args)  # none of them changes this benchmark; a wrong one is refused
    if len(set(args.counts)) != 2 or len(set(args.ref_counts)) != 2:
        p.error("--counts and --ref-counts need two different lengths each")

    load_before = os.getloadavg()
    t_start = time.perf_counter()
    # generated in children: this process stays small (ru_maxrss is inherited through fork+exec)
    files = {
        n: Path(run_child("generate", str(n), "0")["path"])
        for n in sorted({*args.counts, *args.ref_counts})
    }
    runs: dict[str, dict[int, list[dict]]] = {
        "floor": {n: [] for n in args.counts},
        "ours": {n: [] for n in args.counts},
        "reference": {n: [] for n in args.ref_counts},
    }
    setups: list[dict] = []
    loads: list[tuple[float, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench_resample_") as tmp:
        tmp_p = Path(tmp)
        ref_npy = tmp_p / "ref.npy"
        n_ref = max(args.ref_counts)
        for rep in range(args.repeats):
            loads.append(os.getloadavg())
            print(f"round {rep + 1}/{args.repeats} (load {loads[-1][0]:.2f}) ...", file=sys.stderr)
            for n in args.counts:
                runs["floor"][n].append(run_child("floor", str(files[n])))
                runs["ours"][n].append(run_child("ours", str(files[n]), str(tmp_p / "o.nii.gz")))
            for n in args.ref_counts:
                npy = str(ref_npy) if (rep == 0 and n == n_ref) else "-"
                runs["reference"][n].append(run_child("reference", str(files[n]), npy))
            setups.append(run_child("setup", str(files[max(args.counts)])))
        # ours on the reference's session, for the value comparison (not timed)
        run_child("ours", str(files[n_ref]), str(tmp_p / "cmp.nii.gz"))
        diff = max_diff(tmp_p / "cmp.nii.gz", ref_npy)

        big: dict = {}
        if args.rss_volumes:
            free_gb = shutil.disk_usage(DATA.parent).free / 2**30
            print(
                f"generating {args.rss_volumes} volumes ({free_gb:.0f} GB free) ...",
                file=sys.stderr,
            )
            gen = run_child("generate", str(args.rss_volumes), "1")
            big_path = Path(gen["path"])
            try:
                print(f"ours on {args.rss_volumes} volumes ...", file=sys.stderr)
                o = run_child("ours", str(big_path), str(tmp_p / "big.nii.gz"))
                print(f"floor on {args.rss_volumes} volumes ...", file=sys.stderr)
                f = run_child("floor", str(big_path))
                big = {
                    "volumes": args.rss_volumes,
                    "input_gb_compressed": big_path.stat().st_size / 2**30,
                    "generate_seconds": gen["seconds"],
                    "ours": {**o, "s_per_volume": o["seconds"] / o["volumes"]},
                    "floor": {**f, "s_per_volume": f["seconds"] / f["volumes"]},
                }
                big["ratio_ours_to_floor"] = big["ours"]["seconds"] / big["floor"]["seconds"]
            finally:
                if not args.keep_data:
                    big_path.unlink(missing_ok=True)
    load_after = os.getloadavg()

    s = {k: summarise(v) for k, v in runs.items()}
    ours, ref, floor = s["ours"], s["reference"], s["floor"]
    setup_med = {
        k: statistics.median(d[k] for d in setups) for k in setups[0] if k != "peak_rss_mb"
    }
    ratios = {
        "reference_over_ours_slope": ref["slope_s_per_volume"] / ours["slope_s_per_volume"],
        "reference_over_ours_total": ref["total_s_per_volume"] / ours["total_s_per_volume"],
        "ours_over_floor_slope": ours["slope_s_per_volume"] / floor["slope_s_per_volume"],
        "ours_over_floor_total": ours["total_s_per_volume"] / floor["total_s_per_volume"],
        # CPU time of the measured child only: less sensitive to other users of the machine
        "reference_over_ours_cpu_slope": ref["cpu_slope_s_per_volume"]
        / ours["cpu_slope_s_per_volume"],
        "ours_over_floor_cpu_slope": ours["cpu_slope_s_per_volume"]
        / floor["cpu_slope_s_per_volume"],
    }
    if big:
        ratios[f"ours_over_floor_{args.rss_volumes}v_total"] = big["ratio_ours_to_floor"]
        # conservative: the reference's per-volume cost is at least its slope
        ratios[f"reference_slope_over_ours_{args.rss_volumes}v_total"] = (
            ref["slope_s_per_volume"] / big["ours"]["s_per_volume"]
        )
    rss_ours = max([ours["peak_rss_mb"]] + ([big["ours"]["peak_rss_mb"]] if big else []))
    targets = {
        f"speedup>={MIN_SPEEDUP:g}x (slope)": ratios["reference_over_ours_slope"] >= MIN_SPEEDUP,
        f"speedup>={MIN_SPEEDUP:g}x (total)": ratios["reference_over_ours_total"] >= MIN_SPEEDUP,
        f"ours<={MAX_FLOOR_RATIO:g}x floor (slope)": ratios["ours_over_floor_slope"]
        <= MAX_FLOOR_RATIO,
        f"ours<={MAX_FLOOR_RATIO:g}x floor (total)": ratios["ours_over_floor_total"]
        <= MAX_FLOOR_RATIO,
        "max diff == 0 (vs reference rounded)": diff["max_abs_diff_vs_reference_rounded"] == 0,
    }
    if big:
        targets[f"speedup>={MIN_SPEEDUP:g}x (reference slope / ours {args.rss_volumes}v)"] = (
            ratios[f"reference_slope_over_ours_{args.rss_volumes}v_total"] >= MIN_SPEEDUP
        )
        targets[f"ours<={MAX_FLOOR_RATIO:g}x floor ({args.rss_volumes}v total)"] = (
            big["ratio_ours_to_floor"] <= MAX_FLOOR_RATIO
        )
        targets[f"peak RSS<1.5GB ({args.rss_volumes}v)"] = big["ours"]["peak_rss_mb"] < MAX_RSS_MB
    else:
        targets["peak RSS<1.5GB (no long session run)"] = rss_ours < MAX_RSS_MB
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.executable).name, "bench/bench_resample.py", *sys.argv[1:]]),
        "wall_seconds": time.perf_counter() - t_start,
        "input": {
            "shape3d": list(SHAPE),
            "dtype": "int16",
            "files": {str(n): str(f.relative_to(REPO)) for n, f in files.items()},
            "mb_compressed": {str(n): f.stat().st_size / 2**20 for n, f in files.items()},
        },
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_per_round": loads,
            "loadavg_after": load_after,
            "platform": platform.platform(),
            "note": "shared machine: other processes compete for the CPUs (see loadavg)",
        },
        "versions": versions(),
        "repeats": args.repeats,
        "methods": s,
        "raw_runs": {k: {str(n): r for n, r in v.items()} for k, v in runs.items()},
        "ours_setup_breakdown_median_seconds": setup_med,
        "long_session": big,
        "max_diff": diff,
        "ratios": ratios,
        "targets_met": targets,
    }
    print_table(report, args)
    _shared.save_results("resample", report)
    return 0


def print_table(rep: dict, args: argparse.Namespace) -> None:
    m = rep["methods"]
    print(
        f"\n3 mm resample benchmark, {rep['when']}, {rep['machine']['cpus']} CPUs, "
        f"median of {rep['repeats']} runs, full geometry {SHAPE} int16"
    )
    print(
        f"{'method':<11}{'volumes':>9}{'median s':>17}{'slope s/vol':>13}"
        f"{'total s/vol':>13}{'setup s':>9}{'imports s':>11}{'peak RSS MB':>13}"
        f"{'CPU slope':>11}{'CPU total':>11}"
    )
    for name in ("reference", "ours", "floor"):
        r = m[name]
        vols = "/".join(map(str, r["volumes"]))
        secs = "/".join(f"{t:.2f}" for t in r["median_seconds"])
        print(
            f"{name:<11}{vols:>9}{secs:>17}{r['slope_s_per_volume']:>13.4f}"
            f"{r['total_s_per_volume']:>13.4f}{r['intercept_seconds']:>9.2f}"
            f"{r['median_import_seconds']:>11.2f}{r['peak_rss_mb']:>13.0f}"
            f"{r['cpu_slope_s_per_volume']:>11.4f}{r['cpu_total_s_per_volume']:>11.4f}"
        )
    big = rep["long_session"]
    if big:
        for name in ("ours", "floor"):
            r = big[name]
            print(
                f"{name + ' ' + str(big['volumes']) + 'v':<11}{big['volumes']:>9}"
                f"{r['seconds']:>17.2f}{'':>13}{r['s_per_volume']:>13.4f}{'':>9}"
                f"{r['import_seconds']:>11.2f}{r['peak_rss_mb']:>13.0f}"
                f"{'':>11}{r['cpu_seconds'] / r['volumes']:>11.4f}"
            )
    print(
        "ours' setup (median s): "
        + ", ".join(f"{k} {v:.3f}" for k, v in rep["ours_setup_breakdown_median_seconds"].items())
    )
    d = rep["max_diff"]
    print(
        f"max |ours - reference| over {d['compared_volumes']} volumes: {d['max_abs_diff']:.3g} "
        f"({d['reference_dtype']} reference); after rounding the reference: "
        f"{d['max_abs_diff_vs_reference_rounded']:g}"
    )
    print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in rep["ratios"].items()))
    for k, v in rep["targets_met"].items():
        print(f"  {'PASS' if v else 'FAIL'}  {k}")
    mc = rep["machine"]
    print(
        f"load average (1/5/15 min) before {tuple(round(x, 2) for x in mc['loadavg_before'])}, "
        f"after {tuple(round(x, 2) for x in mc['loadavg_after'])}, on {mc['cpus']} CPUs "
        f"(shared machine); wall {rep['wall_seconds']:.0f} s"
    )


if __name__ == "__main__":
    raise SystemExit(main())
