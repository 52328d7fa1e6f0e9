"""Benchmark of ``make 3mm DROP=1`` as a real user runs it: downloads overlapping compute, bounded disk.

Full-geometry synthetic sessions (182x218x182 int16, NSD affine; ``--sessions`` x ``--volumes``) are
served by the loopback mirror with a bandwidth cap (``nsdprep.testing.serve``, ``--rate``) and
registered by ``make inputs`` in a fresh clone of this checkout, exactly as the real bucket would be.
Then, each in its own child process (its own peak RSS and CPU):

* ``compute``: the 3 mm stage alone, content present, ``--jobs 1`` and ``--jobs J``;
* ``fetch``: the downloads alone, one ``datalad get`` per session in order, as the pipeline does,
  at the capped rate;
* ``pipeline``: the pipelined DROP run (``resample_subject(drop=True, prefetch=P, jobs=J)``), with a
  thread sampling the disk used by the annex (objects + partial downloads) every 50 ms.

The rate defaults to the *balanced* one, where the fetch alone takes as long as the compute alone
(where overlap matters most): first ``total MB / compute_s``, then corrected once for the per-session
cost of a ``datalad get`` measured at that rate. ``overlap_ratio = wall / max(download, compute)``
(1 = perfect overlap), ``sum_ratio = wall / (download + compute)`` (1 = no overlap).

From the measured per-volume compute cost and ``--link-rate`` (a user's bandwidth, MB/s) it
projects how long ``make 3mm DROP=1`` takes for the whole NSD on this machine: session sizes from a
registered ``inputs/nsd`` when there is one (``--sizes-from``; ``make inputs`` records each file's
size), else the synthetic compressed size per volume (an assumption, stated in the output).

MB = 10^6 bytes throughout. Results: a table on stdout, ``bench/results/pipeline_<stamp>.json`` and
``bench/results/pipeline_latest.json``. The data (``bench/data/pipeline/``, git-ignored) is deleted at
the end unless ``--keep-data``.

    python bench/bench_pipeline.py [--jobs 2] [--prefetch 1] [--sessions 16] [--volumes 100]
                                   [--rate MB/S] [--link-rate 50] [--sizes-from DIR] [--keep-data]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import _shared

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "code"))

DATA = REPO / "bench" / "data" / "pipeline"
VENV_BIN = Path(sys.executable).parent
SUBJECT = 1
#: NSD facts for the projection when no registered dataset tells (see docs: nsd-notes).
NSD_SESSIONS = (40, 40, 32, 30, 40, 32, 40, 30)
NSD_VOLUMES_PER_SESSION = 750
#: Issue targets.
MAX_OVERLAP_RATIO = 1.15
MAX_SUM_RATIO = 0.65
MAX_WORKER_RSS_MB = 300.0
MIN_JOBS_SCALING = 1.8


# ---------------------------------------------------------------- environment and data


def bench_env() -> dict[str, str]:
    """Environment of every child: venv tools first, loopback allowed for git-annex, an identity."""
    from nsdprep.testing.demo import ensure_identity, loopback_env

    env = loopback_env(dict(os.environ))
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO / "code")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    ensure_identity(env)
    return env


def layout_for(volumes: int) -> Any:
    """Two runs whose lengths add up to ``volumes`` (the layout only shapes the design file)."""
    from nsdprep.core.nsd import Layout

    return Layout(2, (volumes - volumes // 2, volumes // 2))


def make_data(sessions: int, volumes: int, env: dict[str, str]) -> Path:
    """Synthetic full-geometry NSD tree (cached under bench/data/pipeline/)."""
    synth = DATA / f"synth_{sessions}x{volumes}"
    if (synth / "synth_manifest.json").exists():
        return synth
    if synth.exists():
        shutil.rmtree(synth)
    DATA.mkdir(parents=True, exist_ok=True)
    ignore = DATA.parent / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# generated benchmark data, never committed\n*\n")
    print(
        f"generating {sessions} sessions x {volumes} volumes (full geometry) ...", file=sys.stderr
    )
    t0 = time.perf_counter()
    run_child(env, "generate", str(synth), str(sessions), str(volumes))
    print(f"  generated in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return synth


def make_dataset(synth: Path, mirror_url: str, env: dict[str, str]) -> Path:
    """A fresh user clone of this checkout with ``make inputs`` run against the mirror."""
    from nsdprep.testing.demo import user_clone

    ds = DATA / "dataset"
    if ds.exists():
        _rmtree(ds)
    user_clone(REPO, ds, env, overlay=True)
    os.utime(ds / "requirements.txt", (0, 0))  # the venv is current: no pip run
    subprocess.run(
        ["make", "--no-print-directory", "-C", str(ds), "inputs", f"VENV={VENV_BIN.parent}",
         f"NSD_URL={mirror_url}/nsd",
         f"COCO_URL={mirror_url}/coco/annotations/annotations_trainval2017.zip"],
        check=True, env=env, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return ds


def _rmtree(path: Path) -> None:
    subprocess.run(["chmod", "-R", "u+w", str(path)], check=False)
    shutil.rmtree(path)


def annex_dir(nsd_ds: Path) -> Path:
    return Path(
        subprocess.run(
            ["git", "-C", str(nsd_ds), "rev-parse", "--absolute-git-dir"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    ) / "annex"  # fmt: skip


def disk_bytes(annex: Path) -> int:
    """Bytes on disk of annexed content and partial downloads (``objects/`` + ``tmp/``)."""
    total = 0
    for sub in ("objects", "tmp"):
        for root, _dirs, files in os.walk(annex / sub):
            for name in files:
                try:
                    total += os.lstat(os.path.join(root, name)).st_blocks * 512
                except FileNotFoundError:
                    pass  # moved from tmp/ to objects/ between listing and stat
    return total


def present_sessions(nsd_ds: Path) -> list[Path]:
    from nsdprep.core import nsd
    from nsdprep.core.inventory import registered_sessions

    return [nsd_ds / nsd.betas_key(SUBJECT, s) for s in registered_sessions(nsd_ds, SUBJECT)]


def registered_sizes(nsd_ds: Path) -> dict[str, int]:
    """``key -> bytes`` of every registered betas file, from the annex keys (content not needed)."""
    from nsdprep.core import dataset, nsd

    records, _ = dataset.annex_json(nsd_ds, "find", "--include=*", nsd.BETAS_ROOT_KEY)
    sizes = {}
    for rec in records:
        parsed = nsd.parse_betas_key(rec.get("file", ""))
        if parsed is not None and parsed[0] == "betas" and rec.get("bytesize") not in (None, "-"):
            sizes[rec["file"]] = int(rec["bytesize"])
    return sizes


# ---------------------------------------------------------------- measured children


def child_generate(out: str, sessions: str, volumes: str) -> dict:
    from nsdprep.testing.synth import SynthSpec, make_synthetic

    spec = SynthSpec(seed=0, sessions=(int(sessions),), layout=layout_for(int(volumes)), full=True)
    make_synthetic(Path(out), spec)
    return {"path": out}


def _cpu() -> float:
    import resource

    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def child_fetch(nsd_ds: str) -> dict:
    """One ``datalad get`` per session, in order (what the pipeline's fetcher does), timed."""
    from nsdprep.core import dataset

    ds = Path(nsd_ds)
    srcs = present_sessions(ds)
    import datalad.api  # noqa: F401  (the import is not what is timed)

    c0, t0 = _cpu(), time.perf_counter()
    per = []
    for src in srcs:
        t = time.perf_counter()
        dataset.get(ds, [src])
        per.append(time.perf_counter() - t)
    return {
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": _cpu() - c0,
        "per_session_seconds": per,
        "bytes": sum(p.stat().st_size for p in srcs),
    }


def child_compute(nsd_ds: str, out: str, jobs: str) -> dict:
    from nsdprep.stages.resample import resample_subject

    c0, t0 = _cpu(), time.perf_counter()
    results = resample_subject(Path(nsd_ds), SUBJECT, Path(out), jobs=int(jobs), progress=False)
    return {
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": _cpu() - c0,
        "volumes": sum(r.n_volumes for r in results),
        "worker_peak_rss_mb": max(r.peak_rss_mb for r in results),
        "session_seconds": [r.seconds for r in results],
    }


def child_pipeline(nsd_ds: str, out: str, jobs: str, prefetch: str) -> dict:
    from nsdprep.stages.resample import PipelineStats, resample_subject

    ds = Path(nsd_ds)
    annex = annex_dir(ds)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], disk_bytes(annex))
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    stats = PipelineStats()
    import datalad.api  # noqa: F401  (as in the fetch child: imports are not what we time)

    c0 = _cpu()
    sampler.start()
    t0 = time.perf_counter()
    try:
        results = resample_subject(
            ds, SUBJECT, Path(out), jobs=int(jobs), drop=True, prefetch=int(prefetch),
            progress=False, stats=stats,
        )  # fmt: skip
        wall = time.perf_counter() - t0
    finally:
        done.set()
        sampler.join()
    return {
        "seconds": wall,
        "cpu_seconds": _cpu() - c0,
        "volumes": sum(r.n_volumes for r in results),
        "worker_peak_rss_mb": max(r.peak_rss_mb for r in results),
        "timeline": timeline_overlap(stats.events, results),
        "peak_disk_bytes_sampled": peak[0],
        "peak_disk_bytes_at_fetch_end": stats.peak_bytes_on_disk,
        "peak_sessions_on_disk": stats.peak_sessions_on_disk,
        "fetch_seconds": stats.fetch_seconds,
        "left_on_disk_bytes": disk_bytes(annex),
        "events": stats.events,
        "summary": stats.summary(),
    }


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def timeline_overlap(events: list, results: list) -> dict:
    """How much of the time downloads ran while a worker computed, from the run's own timeline.

    Download intervals: ``fetch`` to ``fetched``. Compute intervals: a session's ``done`` minus the
    seconds its worker spent on it (a session handed over may wait in the pool for a free worker).
    Independent of how loaded the machine was when the parts were timed alone.
    """
    t: dict[tuple[str, int], float] = {(kind, s): when for when, kind, s in events}
    secs = {int(re.search(r"(\d+)\.nii", r.dst.name).group(1)): r.seconds for r in results}
    fetch = _union([(t["fetch", s], t["fetched", s]) for (k, s) in t if k == "fetch"])
    comp = _union([(t["done", s] - secs[s], t["done", s]) for (k, s) in t if k == "done"])
    both = sum(max(0.0, min(b1, b2) - max(a1, a2)) for a1, b1 in fetch for a2, b2 in comp)
    f_busy = sum(b - a for a, b in fetch)
    c_busy = sum(b - a for a, b in comp)
    return {
        "download_busy_s": f_busy,
        "compute_busy_s": c_busy,
        "both_busy_s": both,
        "overlap_fraction": both / min(f_busy, c_busy) if min(f_busy, c_busy) > 0 else 0.0,
    }


CHILDREN = {
    "generate": child_generate,
    "fetch": child_fetch,
    "compute": child_compute,
    "pipeline": child_pipeline,
}


def run_child(env: dict[str, str], *args: str) -> dict:
    """Run this script as ``--child ...``; return its JSON plus its peak RSS (``wait4``)."""
    result, peak_rss_mb = _shared.run_child(__file__, args, env)
    result["process_peak_rss_mb"] = peak_rss_mb
    result["loadavg_after"] = os.getloadavg()
    return result


# ---------------------------------------------------------------- orchestration


def drop_all(nsd_ds: Path, env: dict[str, str]) -> None:
    """Drop the betas content (the registered URLs stay)."""
    subprocess.run(
        ["datalad", "drop", "--reckless", "availability", "-d", str(nsd_ds),
         *map(str, present_sessions(nsd_ds))],
        check=True, env=env, stdout=subprocess.DEVNULL,
    )  # fmt: skip


def projection(
    args: argparse.Namespace,
    cpu_per_volume: float,
    wall_per_volume_jobs: float,
    mb_per_volume_synth: float,
    fetch_cpu_s_per_mb: float,
) -> dict:
    """Hours of ``make 3mm DROP=1`` for all of NSD on this machine at ``--link-rate`` MB/s.

    Compute comes from the measured CPU seconds per volume (what the code costs on these cores,
    whatever else ran meanwhile): ``volumes x CPU/volume / JOBS``, or, when JOBS uses every core,
    ``(volumes x CPU/volume + MB x fetch CPU/MB) / cores`` (downloading and checksumming then take
    CPU from the workers). The figure at the load measured during the benchmark is given too.
    """
    sizes_from = args.sizes_from or REPO / "inputs" / "nsd"
    sizes: dict[str, int] = {}
    if (sizes_from / ".git").exists():
        try:
            sizes = registered_sizes(sizes_from)
        except Exception as exc:  # a broken or foreign dataset: fall back to the assumption
            print(f"cannot read sizes from {sizes_from}: {exc}", file=sys.stderr)
    if sizes:
        mbs = [b / 1e6 for b in sizes.values()]
        n_sessions = len(mbs)
        source = f"registered sizes of {n_sessions} betas files in {sizes_from}"
        n_volumes = n_sessions * NSD_VOLUMES_PER_SESSION
        volumes_note = f"{NSD_VOLUMES_PER_SESSION} volumes per session (NSD layout)"
    else:
        n_sessions = sum(NSD_SESSIONS)
        mb = mb_per_volume_synth * NSD_VOLUMES_PER_SESSION
        mbs = [mb] * n_sessions
        source = (
            f"ASSUMPTION: no registered inputs/nsd with sizes here; each of NSD's {n_sessions} "
            f"sessions taken as {NSD_VOLUMES_PER_SESSION} volumes x {mb_per_volume_synth:.2f} MB "
            "(the synthetic data's compressed size; real sizes UNCONFIRMED - run `make inputs`, "
            "then this benchmark again)"
        )
        n_volumes = n_sessions * NSD_VOLUMES_PER_SESSION
        volumes_note = f"{NSD_VOLUMES_PER_SESSION} volumes per session (NSD layout)"
    total_mb = sum(mbs)
    cores = os.cpu_count() or 1
    download_s = total_mb / args.link_rate
    compute_s = n_volumes * cpu_per_volume / min(args.jobs, cores)
    if args.jobs >= cores:
        compute_s = max(
            compute_s, (n_volumes * cpu_per_volume + total_mb * fetch_cpu_s_per_mb) / cores
        )
    fill_s = mbs[0] / args.link_rate  # nothing to compute until the first session is here
    drain_s = NSD_VOLUMES_PER_SESSION * cpu_per_volume  # the last session, on one worker
    wall_s = max(download_s + drain_s, fill_s + compute_s)
    loaded_compute_s = n_volumes * wall_per_volume_jobs
    loaded_wall_s = max(download_s + drain_s, fill_s + loaded_compute_s)
    bound = "download (link)" if download_s >= compute_s else "compute (CPU)"
    peak_disk_mb = (args.jobs + args.prefetch) * max(mbs)
    return {
        "link_rate_mb_s": args.link_rate,
        "sizes_source": source,
        "sessions": n_sessions,
        "volumes": n_volumes,
        "volumes_note": volumes_note,
        "total_gb": total_mb / 1e3,
        "largest_session_mb": max(mbs),
        "download_hours": download_s / 3600,
        "compute_hours": compute_s / 3600,
        "hours": wall_s / 3600,
        "hours_at_benchmark_load": loaded_wall_s / 3600,
        "cpu_s_per_volume": cpu_per_volume,
        "fetch_cpu_s_per_gb": fetch_cpu_s_per_mb * 1e3,
        "model": "max(download + last session's compute, first session's download + compute); "
        "see projection() for compute",
        "peak_disk_gb": peak_disk_mb / 1e3,
        "peak_disk_rule": "(JOBS + PREFETCH) x largest session",
        "bound": bound,
        "fetch_cpu_cores_at_link_rate": fetch_cpu_s_per_mb * args.link_rate,
        "jobs": args.jobs,
        "prefetch": args.prefetch,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=None, help="workers (default: JOBS)")
    p.add_argument("--prefetch", type=int, default=None, help="fetched ahead (default: PREFETCH)")
    p.add_argument("--sessions", type=int, default=16, help="synthetic sessions (>= 4)")
    p.add_argument("--volumes", type=int, default=100, help="volumes per synthetic session")
    p.add_argument("--rate", type=float, default=None, help="mirror cap MB/s (default: balanced)")
    p.add_argument("--link-rate", type=float, default=None, help="default: RATE_MB_S (MB/s)")
    p.add_argument("--repeats", type=int, default=1, help="pipelined runs (median)")
    p.add_argument("--sizes-from", type=Path, default=None, help="a registered inputs/nsd")
    p.add_argument("--keep-data", action="store_true", help="keep bench/data/pipeline/")
    p.add_argument(
        "--no-jobs1", action="store_true", help="skip the extra JOBS=1 pipelined measurement"
    )
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    _shared.add_make_options(p)
    args = p.parse_args(argv)
    if args.child:
        return _shared.answer_child(CHILDREN, args.child)
    opts = _shared.make_options(args)
    args.jobs = opts.jobs if args.jobs is None else args.jobs
    args.prefetch = opts.prefetch if args.prefetch is None else args.prefetch
    args.link_rate = opts.rate_mb_s if args.link_rate is None else args.link_rate
    if args.sessions < 4:
        p.error("--sessions must be >= 4")

    from nsdprep.testing.serve import Mirror

    env = bench_env()
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    free_gb = shutil.disk_usage(REPO).free / 1e9
    print(f"{free_gb:.0f} GB free on the bench disk", file=sys.stderr)
    synth = make_data(args.sessions, args.volumes, env)
    try:
        with Mirror(synth) as mirror:
            ds = make_dataset(synth, mirror.url, env)
            nsd_ds = ds / "inputs" / "nsd"
            srcs = present_sessions(nsd_ds)
            total_mb = (
                sum((synth / "nsd" / s.relative_to(nsd_ds)).stat().st_size for s in srcs) / 1e6
            )
            n_sessions = len(srcs)
            largest_mb = max_session_mb(synth)
            out = DATA / "out"

            def fresh_out() -> str:
                if out.exists():
                    _rmtree(out)
                return str(out)

            print("fetch, no cap (content for the compute runs) ...", file=sys.stderr)
            fetch_free = run_child(env, "fetch", str(nsd_ds))
            compute: dict[int, dict] = {}
            for jobs in sorted({1, args.jobs}):
                print(f"compute alone, JOBS={jobs} ...", file=sys.stderr)
                compute[jobs] = run_child(env, "compute", str(nsd_ds), fresh_out(), str(jobs))
            compute_s = compute[args.jobs]["seconds"]
            drop_all(nsd_ds, env)

            def measure(jobs: int) -> dict:
                """Fetch alone and the pipelined run for ``jobs`` workers, at the balanced rate."""
                c_s = compute[jobs]["seconds"]
                calibration = []
                note = ""
                if args.rate is not None:
                    rate: float | None = args.rate
                    note = f"fixed by --rate {args.rate:g}"
                elif fetch_free["seconds"] >= 0.9 * c_s:
                    rate = None
                    note = (
                        f"no cap: the fetch alone, uncapped, takes {fetch_free['seconds']:.1f} s, "
                        f"already longer than compute ({c_s:.1f} s); a cap can only slow it"
                    )
                else:
                    rate = total_mb / c_s
                    print(f"fetch alone at {rate:.0f} MB/s (calibration) ...", file=sys.stderr)
                    mirror.limit(rate)
                    first = run_child(env, "fetch", str(nsd_ds))
                    drop_all(nsd_ds, env)
                    overhead = first["seconds"] - total_mb / rate
                    calibration.append({"rate_mb_s": rate, "download_s": first["seconds"]})
                    if c_s - overhead > 0.3 * c_s:
                        rate = total_mb / (c_s - overhead)
                mirror.limit(rate)
                label = "no cap" if rate is None else f"{rate:.0f} MB/s"
                print(f"fetch alone, {label} ...", file=sys.stderr)
                cpu0 = _own_cpu()
                fetch = run_child(env, "fetch", str(nsd_ds))
                fetch["server_cpu_seconds"] = _own_cpu() - cpu0
                drop_all(nsd_ds, env)
                runs = []
                for rep in range(args.repeats):
                    print(
                        f"pipelined DROP run {rep + 1}/{args.repeats}, JOBS={jobs} "
                        f"PREFETCH={args.prefetch}, {label} ...",
                        file=sys.stderr,
                    )
                    runs.append(
                        run_child(env, "pipeline", str(nsd_ds), fresh_out(), str(jobs),
                                  str(args.prefetch))
                    )  # fmt: skip
                    if runs[-1]["left_on_disk_bytes"]:
                        print("WARNING: content left in the annex after DROP", file=sys.stderr)
                    drop_all(nsd_ds, env)
                mirror.limit(None)
                return {
                    "jobs": jobs,
                    "rate": rate,
                    "calibration": calibration,
                    "note": note,
                    "fetch": fetch,
                    "runs": runs,
                }

            variants = [measure(args.jobs)]
            if args.jobs != 1 and not args.no_jobs1:
                variants.append(measure(1))
    finally:
        if not args.keep_data:
            for path in (DATA / "dataset", DATA / "out"):
                if path.exists():
                    _rmtree(path)
            if synth.exists():
                shutil.rmtree(synth)
    load_after = os.getloadavg()

    main_v = variants[0]
    runs, fetch, rate = main_v["runs"], main_v["fetch"], main_v["rate"]
    run = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
    wall_s = statistics.median(r["seconds"] for r in runs)
    download_s = fetch["seconds"]
    volumes = compute[args.jobs]["volumes"]
    mb_per_volume = total_mb / volumes
    s_per_volume_jobs = compute_s / volumes
    s_per_volume_worker = min(min(c["session_seconds"]) for c in compute.values()) / (
        volumes / n_sessions
    )
    fetch_cpu_s_per_mb = fetch["cpu_seconds"] / total_mb
    report: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.executable).name, "bench/bench_pipeline.py", *sys.argv[1:]]),
        "wall_seconds_benchmark": time.perf_counter() - t_start,
        "jobs": args.jobs,
        "prefetch": args.prefetch,
        "sessions": n_sessions,
        "volumes_per_session": args.volumes,
        "shape3d": [182, 218, 182],
        "mb_per_session": total_mb / n_sessions,
        "largest_session_mb": largest_mb,
        "rate_mb_s": rate,
        "rate_note": main_v["note"]
        or "balanced: the fetch alone takes about as long as the compute alone",
        "rate_calibration": main_v["calibration"],
        "download_s": download_s,
        "compute_s": compute_s,
        "wall_s": wall_s,
        "wall_s_all": [r["seconds"] for r in runs],
        "overlap_ratio": wall_s / max(download_s, compute_s),
        "sum_ratio": wall_s / (download_s + compute_s),
        # sequential downloads: nothing to compute before the first session is here, and the
        # last one is computed by one worker after it arrived
        "ideal_wall_s_model": max(
            download_s + compute_s * args.jobs / n_sessions, download_s / n_sessions + compute_s
        ),
        "peak_disk_mb": run["peak_disk_bytes_sampled"] / 1e6,
        "peak_disk_mb_at_fetch_end": run["peak_disk_bytes_at_fetch_end"] / 1e6,
        "peak_sessions_on_disk": run["peak_sessions_on_disk"],
        "disk_bound_mb": (args.jobs + args.prefetch) * largest_mb,
        "left_on_disk_mb": run["left_on_disk_bytes"] / 1e6,
        "peak_rss_mb": run["worker_peak_rss_mb"],
        "peak_rss_mb_main_process": run["process_peak_rss_mb"],
        "compute_jobs": {
            str(j): {
                "seconds": c["seconds"],
                "volumes_per_s": c["volumes"] / c["seconds"],
                "cpu_seconds": c["cpu_seconds"],
                "worker_peak_rss_mb": c["worker_peak_rss_mb"],
                "loadavg_after": c["loadavg_after"],
            }
            for j, c in compute.items()
        },
        "fetch": {
            "no_cap_s": fetch_free["seconds"],
            "at_rate_s": download_s,
            "per_session_s": fetch["per_session_seconds"],
            "cpu_seconds": fetch["cpu_seconds"],
            "cpu_s_per_gb": fetch_cpu_s_per_mb * 1e3,
            "server_cpu_seconds": fetch["server_cpu_seconds"],
            "how": "one `datalad get` per session in order (the pipeline's fetcher), content "
            "checksummed by git-annex (MD5E)",
        },
        "cpu_bound_s": cpu_bound(compute[args.jobs], fetch),
        "timeline": run["timeline"],
        "pipeline_summary": run["summary"],
        "pipeline_events": run["events"],
        "pipeline_cpu_seconds": run["cpu_seconds"],
        "s_per_volume_jobs": s_per_volume_jobs,
        "s_per_volume_worker": s_per_volume_worker,
        "mb_per_volume": mb_per_volume,
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after_fetch": fetch["loadavg_after"],
            "loadavg_after_pipeline": [r["loadavg_after"] for r in runs],
            "loadavg_after": load_after,
            "platform": platform.platform(),
            "note": "shared machine: other processes compete for the CPUs (see loadavg)",
        },
        "versions": versions(),
    }
    report["overlap_ratio_vs_cpu_bound"] = wall_s / max(
        download_s, compute_s, report["cpu_bound_s"]
    )
    report["variants"] = [summarise_variant(v, compute, total_mb) for v in variants]
    if 1 in compute and args.jobs != 1:
        report["jobs_scaling"] = compute[1]["seconds"] / compute[args.jobs]["seconds"]
    # steady-state cost of one volume on one worker: the median session of the JOBS=1 run (the
    # first one also pays the worker's GM-mask set-up); wall time of a single process, which
    # equals its CPU time on an idle core
    per_session = compute[1]["session_seconds"]
    cpu_per_volume = statistics.median(per_session) / (compute[1]["volumes"] / len(per_session))
    report["cpu_s_per_volume"] = cpu_per_volume
    report["projection"] = projection(
        args,
        cpu_per_volume,
        s_per_volume_jobs,
        mb_per_volume,
        (fetch["cpu_seconds"] + fetch["server_cpu_seconds"]) / total_mb,
    )
    targets = {
        f"overlap_ratio<={MAX_OVERLAP_RATIO}": report["overlap_ratio"] <= MAX_OVERLAP_RATIO,
        f"sum_ratio<={MAX_SUM_RATIO}": report["sum_ratio"] <= MAX_SUM_RATIO,
        "peak disk <= (JOBS+PREFETCH) x largest session": report["peak_disk_mb"]
        <= report["disk_bound_mb"] * 1.001,
        f"worker peak RSS<{MAX_WORKER_RSS_MB:g} MB": report["peak_rss_mb"] < MAX_WORKER_RSS_MB,
        "nothing left on disk after the DROP run": run["left_on_disk_bytes"] == 0,
    }
    if "jobs_scaling" in report:
        targets[f"compute JOBS={args.jobs}/JOBS=1 >= {MIN_JOBS_SCALING}"] = (
            report["jobs_scaling"] >= MIN_JOBS_SCALING
        )
    report["targets_met"] = targets
    print_table(report)
    _shared.save_results("pipeline", report)
    return 0


def _own_cpu() -> float:
    """CPU seconds of this process (the mirror's threads while a child fetches)."""
    import resource

    me = resource.getrusage(resource.RUSAGE_SELF)
    return me.ru_utime + me.ru_stime


def cpu_bound(compute: dict, fetch: dict) -> float:
    """Lower bound of a pipelined run on this machine: all CPU work (3 mm, git-annex + datalad
    downloading and checksumming, the mirror) spread over every core."""
    work = compute["cpu_seconds"] + fetch["cpu_seconds"] + fetch["server_cpu_seconds"]
    return work / (os.cpu_count() or 1)


def summarise_variant(v: dict, compute: dict, total_mb: float) -> dict:
    """The headline numbers of one (JOBS, rate) measurement."""
    runs = v["runs"]
    wall = statistics.median(r["seconds"] for r in runs)
    d, c = v["fetch"]["seconds"], compute[v["jobs"]]["seconds"]
    bound = cpu_bound(compute[v["jobs"]], v["fetch"])
    return {
        "jobs": v["jobs"],
        "rate_mb_s": v["rate"],
        "rate_note": v["note"] or "balanced",
        "rate_calibration": v["calibration"],
        "download_s": d,
        "compute_s": c,
        "wall_s": wall,
        "wall_s_all": [r["seconds"] for r in runs],
        "overlap_ratio": wall / max(d, c),
        "sum_ratio": wall / (d + c),
        "cpu_bound_s": bound,
        "overlap_ratio_vs_cpu_bound": wall / max(d, c, bound),
        "peak_disk_mb": max(r["peak_disk_bytes_sampled"] for r in runs) / 1e6,
        "worker_peak_rss_mb": max(r["worker_peak_rss_mb"] for r in runs),
        "fetch_cpu_s_per_gb": v["fetch"]["cpu_seconds"] / total_mb * 1e3,
        "timeline": runs[-1]["timeline"],
        "pipeline_summary": runs[-1]["summary"],
        "pipeline_events": runs[-1]["events"],
        "loadavg_after": [r["loadavg_after"] for r in runs],
    }


def max_session_mb(synth: Path) -> float:
    files = (synth / "nsd").rglob("betas_session*.nii.gz")
    return max(f.stat().st_size for f in files) / 1e6


def versions() -> dict:
    out = _shared.versions(("numpy", "nibabel", "nilearn", "isal", "datalad"))
    annex = subprocess.run(["git", "annex", "version", "--raw"], capture_output=True, text=True)
    out["git-annex"] = annex.stdout.strip() or None
    return out


def print_table(r: dict) -> None:
    m = r["machine"]
    print(
        f"\n3mm DROP=1 pipeline benchmark, {r['when']}, {m['cpus']} CPUs, JOBS={r['jobs']} "
        f"PREFETCH={r['prefetch']}: {r['sessions']} sessions x {r['volumes_per_session']} volumes "
        f"(182x218x182 int16), {r['mb_per_session']:.0f} MB per session, mirror "
        + ("not capped" if r["rate_mb_s"] is None else f"capped at {r['rate_mb_s']:.0f} MB/s")
        + f" ({r['rate_note']})"
    )
    rows = [
        ("download alone", r["download_s"], "one datalad get per session, in order"),
        ("compute alone", r["compute_s"], f"JOBS={r['jobs']}, content present"),
        ("pipelined DROP", r["wall_s"], r["pipeline_summary"]),
    ]
    for name, secs, note in rows:
        print(f"  {name:<16}{secs:>8.1f} s   {note}")
    print(
        f"  overlap_ratio {r['overlap_ratio']:.2f} (wall / max), sum_ratio {r['sum_ratio']:.2f} "
        f"(wall / sum); model with pipeline fill and drain: {r['ideal_wall_s_model']:.1f} s; "
        f"CPU bound (all CPU work / {m['cpus']} cores) {r['cpu_bound_s']:.1f} s -> wall / "
        f"max(download, compute, CPU bound) {r['overlap_ratio_vs_cpu_bound']:.2f}"
    )
    tl = r["timeline"]
    print(
        f"  timeline of the pipelined run: downloading {tl['download_busy_s']:.1f} s, computing "
        f"{tl['compute_busy_s']:.1f} s, both at once {tl['both_busy_s']:.1f} s = "
        f"{100 * tl['overlap_fraction']:.0f}% of the shorter"
    )
    for v in r["variants"][1:]:
        cap = "no cap" if v["rate_mb_s"] is None else f"{v['rate_mb_s']:.0f} MB/s"
        print(
            f"  JOBS={v['jobs']} ({cap}, {v['rate_note']}): download {v['download_s']:.1f} s, "
            f"compute {v['compute_s']:.1f} s, pipelined {v['wall_s']:.1f} s -> overlap_ratio "
            f"{v['overlap_ratio']:.2f}, sum_ratio {v['sum_ratio']:.2f}, vs CPU bound "
            f"{v['overlap_ratio_vs_cpu_bound']:.2f}; both busy "
            f"{100 * v['timeline']['overlap_fraction']:.0f}%; peak disk {v['peak_disk_mb']:.0f} MB"
        )
    print(
        f"  peak disk {r['peak_disk_mb']:.0f} MB sampled ({r['peak_disk_mb_at_fetch_end']:.0f} MB at "
        f"download ends, {r['peak_sessions_on_disk']} sessions) <= bound {r['disk_bound_mb']:.0f} MB; "
        f"left after: {r['left_on_disk_mb']:.0f} MB; worker peak RSS {r['peak_rss_mb']:.0f} MB"
    )
    for j, c in r["compute_jobs"].items():
        print(
            f"  compute JOBS={j}: {c['seconds']:.1f} s, {c['volumes_per_s']:.1f} volumes/s, "
            f"load after {tuple(round(x, 2) for x in c['loadavg_after'])}"
        )
    if "jobs_scaling" in r:
        print(f"  JOBS={r['jobs']} / JOBS=1 compute throughput: {r['jobs_scaling']:.2f}")
    f = r["fetch"]
    print(
        f"  fetch CPU {f['cpu_s_per_gb']:.2f} s per GB (git-annex + datalad); no-cap fetch "
        f"{f['no_cap_s']:.1f} s"
    )
    pr = r["projection"]
    print(
        f"projection: make 3mm DROP=1 JOBS={pr['jobs']} PREFETCH={pr['prefetch']} for all NSD "
        f"({pr['sessions']} sessions, {pr['total_gb']:.0f} GB) at {pr['link_rate_mb_s']:g} MB/s on "
        f"this machine: {pr['hours']:.1f} h (download {pr['download_hours']:.1f} h, compute "
        f"{pr['compute_hours']:.2f} h from {pr['cpu_s_per_volume']:.4f} CPU s/volume), peak disk "
        f"{pr['peak_disk_gb']:.1f} GB, bound by {pr['bound']}; at the load measured here "
        f"{pr['hours_at_benchmark_load']:.1f} h"
    )
    print(f"  sizes: {pr['sizes_source']}")
    for k, v in r["targets_met"].items():
        print(f"  {'PASS' if v else 'FAIL'}  {k}")
    print(
        f"load average (1/5/15 min) before {tuple(round(x, 2) for x in m['loadavg_before'])}, "
        f"after {tuple(round(x, 2) for x in m['loadavg_after'])} (shared machine); benchmark "
        f"wall {r['wall_seconds_benchmark']:.0f} s"
    )


if __name__ == "__main__":
    raise SystemExit(main())
