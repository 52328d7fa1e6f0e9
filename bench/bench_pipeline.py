"""Benchmark of ``make 3mm DROP=1`` as a real user runs it: downloads overlapping compute, bounded disk.

Full-geometry synthetic sessions (182x218x182 int16, NSD affine; ``--sessions`` x ``--volumes``) are
served by the loopback mirror (``nsdprep.testing.serve``) and registered by ``make inputs`` in a fresh
clone of this checkout, exactly as the real bucket would be. Then, each in its own child process (its
own peak RSS and CPU):

* ``compute``: the 3 mm stage alone, content present, ``--jobs 1`` and ``--jobs J``;
* ``fetch_streams``: the downloads alone with 1, 2, 4 and 8 streams (``--streams-list``), through
  the DROP mode's own fetcher, with the mirror modelling S3: each connection capped at
  ``--per-connection`` MB/s (40) and all of them at ``--total-rate`` (200);
* ``pipeline``: the pipelined DROP run at the fastest stream count (``resample_subject(drop=True,
  streams=N, prefetch=max(P, N), jobs=J)``) under the same caps, with a thread sampling the disk used
  by the annex (objects + partial downloads) every 50 ms;
* unless ``--no-single-stream``: the one-stream measurement at the *balanced* rate (the fetch alone,
  one ``datalad get`` per session in order, taking as long as the compute alone: first
  ``total MB / compute_s``, then corrected once for the per-session cost of a ``datalad get``), with
  its pipelined runs at ``JOBS=J`` and ``JOBS=1``.

``overlap_ratio = wall / max(download, compute)`` (1 = perfect overlap), ``sum_ratio = wall /
(download + compute)`` (1 = no overlap); ``streams_speedup_4`` = the download time with 1 stream
over the time with 4.

From the measured CPU seconds per volume and per downloaded MB it projects how long ``make 3mm
DROP=1`` takes for the whole NSD on this machine at 1 Gbps and on a 16-core node at 10 Gbps (50 MB/s
per connection), which resource binds and which ``STREAMS`` reaches it: session sizes from a
registered ``inputs/nsd`` when there is one (``--sizes-from``; ``make inputs`` records each file's
size), else the synthetic compressed size per volume (an assumption, stated in the output). The
one-stream measurement adds the older projection at ``--link-rate`` (``RATE_MB_S``).

MB = 10^6 bytes throughout. Results: a table on stdout, ``bench/results/pipeline_<stamp>.json`` and
``bench/results/pipeline_latest.json``. The data (``bench/data/pipeline/``, git-ignored) is deleted at
the end unless ``--keep-data``.

    python bench/bench_pipeline.py [--jobs 2] [--prefetch 1] [--sessions 16] [--volumes 100]
                                   [--streams-list 1 2 4 8] [--per-connection 40] [--total-rate 200]
                                   [--no-single-stream] [--rate MB/S] [--link-rate 50]
                                   [--sizes-from DIR] [--keep-data]
"""

from __future__ import annotations

import argparse
import math
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
#: The S3 model of the STREAMS measurement (MB/s): one connection's cap, and the link's.
PER_CONNECTION_MB_S = 40.0
TOTAL_MB_S = 200.0
STREAM_COUNTS = (1, 2, 4, 8)
MIN_STREAMS_SPEEDUP_4 = 3.5
#: Whole-NSD projection cases: name, cores (None: this machine's), link MB/s, one connection MB/s.
PROJECTION_CASES = (
    ("this machine at 1 Gbps", None, 125.0, 50.0),
    ("16-core node at 10 Gbps", 16, 1250.0, 50.0),
)


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


def child_fetch_streams(nsd_ds: str, streams: str) -> dict:
    """The DROP mode's fetcher alone: every session, ``streams`` downloads at once in order of need.

    No compute and no disk bound (a slot per session), so the time is the downloads' alone; the
    sessions are dropped again afterwards (not timed).
    """
    from nsdprep.stages.resample import PipelineStats, Prefetcher

    ds = Path(nsd_ds)
    sessions = list(enumerate(present_sessions(ds), start=1))
    import datalad.api  # noqa: F401  (as in the other children: imports are not what we time)

    stats = PipelineStats()
    fetcher = Prefetcher(ds, sessions, len(sessions), stats, streams=int(streams))
    c0, t0 = _cpu(), time.perf_counter()
    stats.t0 = time.monotonic()
    fetcher.start()
    try:
        arrived: list[int] = []
        while fetcher.active():
            arrived += fetcher.ready(block=True)
            if fetcher.error is not None:
                raise fetcher.error
        seconds, cpu = time.perf_counter() - t0, _cpu() - c0
    finally:
        fetcher.close()
    if sorted(arrived) != [s for s, _ in sessions]:
        raise SystemExit(f"fetched {sorted(arrived)}, expected every session")
    t: dict[tuple[str, int], float] = {(kind, s): when for when, kind, s in stats.events}
    return {
        "streams": int(streams),
        "seconds": seconds,
        "cpu_seconds": cpu,
        "bytes": stats.fetched_bytes,
        "peak_streams": stats.peak_streams,
        "per_session_s": [t["fetched", s] - t["fetch", s] for s, _ in sessions],
        "first_arrival_s": min(t["fetched", s] for s, _ in sessions),
    }


def child_pipeline(nsd_ds: str, out: str, jobs: str, prefetch: str, streams: str = "1") -> dict:
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
            streams=int(streams), progress=False, stats=stats,
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
        "peak_streams": stats.peak_streams,
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
    "fetch_streams": child_fetch_streams,
    "compute": child_compute,
    "pipeline": child_pipeline,
}


def run_child(env: dict[str, str], *args: str) -> dict:
    """Run this script as ``--child ...``; return its JSON plus its own peak RSS."""
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


def nsd_sizes(args: argparse.Namespace, mb_per_volume_synth: float) -> tuple[list[float], str]:
    """MB of every NSD betas session, and where they come from.

    From a registered ``inputs/nsd`` (``--sizes-from``; ``make inputs`` records each file's size in
    its key) when there is one, else NSD's session counts x 750 volumes x the synthetic data's
    compressed MB per volume (an assumption, stated in the text).
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
        return mbs, f"registered sizes of {len(mbs)} betas files in {sizes_from}"
    n_sessions = sum(NSD_SESSIONS)
    mb = mb_per_volume_synth * NSD_VOLUMES_PER_SESSION
    source = (
        f"ASSUMPTION: no registered inputs/nsd with sizes here; each of NSD's {n_sessions} "
        f"sessions taken as {NSD_VOLUMES_PER_SESSION} volumes x {mb_per_volume_synth:.2f} MB "
        "(the synthetic data's compressed size; real sizes UNCONFIRMED - run `make inputs`, "
        "then this benchmark again)"
    )
    return [mb] * n_sessions, source


def projection_streams(
    mbs: list[float], source: str, cpu_per_volume: float, fetch_cpu_s_per_mb: float
) -> dict:
    """Hours of ``make 3mm DROP=1`` for all of NSD per :data:`PROJECTION_CASES`, and what binds.

    Each download stream is one connection at most ``per connection`` MB/s; together they get at
    most the link. CPU work: the 3 mm compute (volumes x the measured CPU s per volume) plus the
    downloads' own (MB x the measured git-annex + datalad CPU s per MB: HTTP and the checksum),
    over every core (same speed per core as here). The link binds if ``MB / link`` is the longer,
    reached with ``STREAMS = ceil(link / per connection)``; else the CPU binds, reached with the
    fewest streams whose download keeps up with it. JOBS: workers enough for the compute alone to
    finish within that time; PREFETCH = STREAMS keeps every stream busy while JOBS sessions are
    computed, so the disk holds at most ``(JOBS + PREFETCH) x largest session``. Wall time adds
    the first session's download (nothing to compute before) and the last one's compute.
    """
    total_mb, largest = sum(mbs), max(mbs)
    volumes = len(mbs) * NSD_VOLUMES_PER_SESSION
    compute_cpu = volumes * cpu_per_volume
    fetch_cpu = total_mb * fetch_cpu_s_per_mb
    cases = []
    for name, cores, link, per_conn in PROJECTION_CASES:
        cores = cores or os.cpu_count() or 1
        link_s = total_mb / link
        cpu_s = (compute_cpu + fetch_cpu) / cores
        link_streams = math.ceil(link / per_conn - 1e-9)
        if link_s >= cpu_s:
            binds, bound_s, streams = "link", link_s, link_streams
        else:
            binds, bound_s = "CPU", cpu_s
            streams = min(link_streams, math.ceil(total_mb / cpu_s / per_conn - 1e-9))
        rate = min(streams * per_conn, link)
        jobs = min(cores, max(1, math.ceil(compute_cpu / bound_s)))
        fill_s = largest / (rate / streams)  # the first session, on one stream
        drain_s = NSD_VOLUMES_PER_SESSION * cpu_per_volume  # the last session, on one worker
        one_stream_s = max(total_mb / min(per_conn, link), cpu_s)
        cases.append(
            {
                "case": name,
                "cores": cores,
                "link_mb_s": link,
                "per_connection_mb_s": per_conn,
                "binds": binds,
                "streams": streams,
                "jobs": jobs,
                "prefetch": streams,
                "hours": (bound_s + fill_s + drain_s) / 3600,
                "link_hours": link_s / 3600,
                "cpu_hours": cpu_s / 3600,
                "download_mb_s": rate,
                "fetch_cpu_cores": fetch_cpu_s_per_mb * rate,
                "one_stream_hours": one_stream_s / 3600,
                "disk_bound_gb": (jobs + streams) * largest / 1e3,
            }
        )
    return {
        "sizes_source": source,
        "sessions": len(mbs),
        "volumes": volumes,
        "total_gb": total_mb / 1e3,
        "largest_session_mb": largest,
        "cpu_s_per_volume": cpu_per_volume,
        "fetch_cpu_s_per_gb": fetch_cpu_s_per_mb * 1e3,
        "model": " ".join((projection_streams.__doc__ or "").split("\n\n", 1)[1].split()),
        "cases": cases,
    }


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
    mbs, source = nsd_sizes(args, mb_per_volume_synth)
    n_sessions = len(mbs)
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
    p.add_argument(
        "--streams-list", type=int, nargs="+", default=list(STREAM_COUNTS),
        help="stream counts whose download time is measured (default: 1 2 4 8)",
    )  # fmt: skip
    p.add_argument(
        "--per-connection", type=float, default=PER_CONNECTION_MB_S,
        help="mirror cap per connection for the streams runs, MB/s (default: 40)",
    )  # fmt: skip
    p.add_argument(
        "--total-rate", type=float, default=TOTAL_MB_S,
        help="mirror cap in total for the streams runs, MB/s (default: 200)",
    )  # fmt: skip
    p.add_argument(
        "--no-single-stream", action="store_true",
        help="skip the one-stream measurement at the balanced rate (and its JOBS=1 variant)",
    )  # fmt: skip
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
    variants: list[dict] = []
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

            def pipelined_runs(jobs: int, prefetch: int, streams: int, label: str) -> list:
                """``--repeats`` pipelined DROP runs, each from an empty annex."""
                runs = []
                for rep in range(args.repeats):
                    print(
                        f"pipelined DROP run {rep + 1}/{args.repeats}, JOBS={jobs} "
                        f"PREFETCH={prefetch} STREAMS={streams}, {label} ...",
                        file=sys.stderr,
                    )
                    runs.append(
                        run_child(env, "pipeline", str(nsd_ds), fresh_out(), str(jobs),
                                  str(prefetch), str(streams))
                    )  # fmt: skip
                    if runs[-1]["left_on_disk_bytes"]:
                        print("WARNING: content left in the annex after DROP", file=sys.stderr)
                    drop_all(nsd_ds, env)
                return runs

            def measure_streams() -> dict:
                """Download alone with each stream count, then the pipelined run at the best."""
                mirror.limit(args.total_rate, args.per_connection)
                caps = f"{args.per_connection:g} MB/s per connection, {args.total_rate:g} in total"
                by: dict[int, dict] = {}
                for n in args.streams_list:
                    print(f"download alone, STREAMS={n}, {caps} ...", file=sys.stderr)
                    cpu0 = _own_cpu()
                    by[n] = run_child(env, "fetch_streams", str(nsd_ds), str(n))
                    by[n]["server_cpu_seconds"] = _own_cpu() - cpu0
                    drop_all(nsd_ds, env)
                best = min(by, key=lambda n: (by[n]["seconds"], n))
                prefetch = max(args.prefetch, best)
                runs = pipelined_runs(args.jobs, prefetch, best, caps)
                mirror.limit(None)
                return {"by": by, "best": best, "prefetch": prefetch, "runs": runs}

            def measure(jobs: int) -> dict:
                """One stream: fetch alone and the pipelined run for ``jobs`` workers, at the
                balanced rate."""
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
                runs = pipelined_runs(jobs, args.prefetch, 1, label)
                mirror.limit(None)
                return {
                    "jobs": jobs,
                    "rate": rate,
                    "calibration": calibration,
                    "note": note,
                    "fetch": fetch,
                    "runs": runs,
                }

            streams = measure_streams()
            if not args.no_single_stream:
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

    volumes = compute[args.jobs]["volumes"]
    mb_per_volume = total_mb / volumes
    s_per_volume_jobs = compute_s / volumes
    by, best = streams["by"], streams["best"]
    runs = streams["runs"]
    run = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
    wall_s = statistics.median(r["seconds"] for r in runs)
    download_s = by[best]["seconds"]
    report: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.executable).name, "bench/bench_pipeline.py", *sys.argv[1:]]),
        "wall_seconds_benchmark": time.perf_counter() - t_start,
        "sessions": n_sessions,
        "volumes_per_session": args.volumes,
        "shape3d": [182, 218, 182],
        "mb_per_session": total_mb / n_sessions,
        "largest_session_mb": largest_mb,
        "s3_model": {
            "per_connection_mb_s": args.per_connection,
            "total_mb_s": args.total_rate,
            "note": "the loopback mirror caps each connection (one GET) and all of them together, "
            "as S3 delivers tens of MB/s per connection on a faster link",
        },
        "download_s_by_streams": {str(n): by[n]["seconds"] for n in by},
        "download_mb_s_by_streams": {str(n): total_mb / by[n]["seconds"] for n in by},
        "download_cpu_s_per_gb_by_streams": {
            str(n): by[n]["cpu_seconds"] / total_mb * 1e3 for n in by
        },
        "download_first_arrival_s_by_streams": {str(n): by[n]["first_arrival_s"] for n in by},
        "download_server_cpu_s_by_streams": {str(n): by[n]["server_cpu_seconds"] for n in by},
        "download_loadavg_after_by_streams": {str(n): by[n]["loadavg_after"] for n in by},
        "best_streams": best,
        "jobs": args.jobs,
        "prefetch": streams["prefetch"],
        "streams": best,
        "download_s": download_s,
        "compute_s": compute_s,
        "wall_s": wall_s,
        "wall_s_all": [r["seconds"] for r in runs],
        "overlap_ratio": wall_s / max(download_s, compute_s),
        "sum_ratio": wall_s / (download_s + compute_s),
        "peak_disk_mb": run["peak_disk_bytes_sampled"] / 1e6,
        "peak_disk_mb_at_fetch_end": run["peak_disk_bytes_at_fetch_end"] / 1e6,
        "peak_sessions_on_disk": run["peak_sessions_on_disk"],
        "peak_streams": run["peak_streams"],
        "disk_bound_mb": (args.jobs + streams["prefetch"]) * largest_mb,
        "disk_bound_rule": "(JOBS + PREFETCH) x largest session, partial downloads included",
        "left_on_disk_mb": run["left_on_disk_bytes"] / 1e6,
        "peak_rss_mb": run["worker_peak_rss_mb"],
        "cpu_bound_s": cpu_bound(compute[args.jobs], by[best]),
        "timeline": run["timeline"],
        "pipeline_summary": run["summary"],
        "pipeline_events": run["events"],
        "pipeline_cpu_seconds": run["cpu_seconds"],
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
        "fetch_no_cap": {
            "seconds": fetch_free["seconds"],
            "cpu_s_per_gb": fetch_free["cpu_seconds"] / total_mb * 1e3,
            "how": "one `datalad get` per session in order",
        },
        "s_per_volume_jobs": s_per_volume_jobs,
        "mb_per_volume": mb_per_volume,
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after_pipeline": [r["loadavg_after"] for r in runs],
            "loadavg_after": load_after,
            "platform": platform.platform(),
            "note": "shared machine: other processes compete for the CPUs (see loadavg)",
        },
        "versions": versions(),
    }
    if "1" in report["download_s_by_streams"] and "4" in report["download_s_by_streams"]:
        report["streams_speedup_4"] = by[1]["seconds"] / by[4]["seconds"]
    report["overlap_ratio_vs_cpu_bound"] = wall_s / max(
        download_s, compute_s, report["cpu_bound_s"]
    )
    if 1 in compute and args.jobs != 1:
        report["jobs_scaling"] = compute[1]["seconds"] / compute[args.jobs]["seconds"]
    # steady-state CPU cost of one volume on one worker. Two upper bounds, the smaller kept: the
    # median session of the JOBS=1 run in wall time (the first session also pays the worker's
    # GM-mask set-up; wall = CPU on an idle core, more on a busy one), and the JOBS=1 run's CPU
    # time over its volumes (imports and set-up included, whatever the load)
    per_session = compute[1]["session_seconds"]
    wall_per_volume = statistics.median(per_session) / (compute[1]["volumes"] / len(per_session))
    cpu_per_volume = min(wall_per_volume, compute[1]["cpu_seconds"] / compute[1]["volumes"])
    report["cpu_s_per_volume"] = cpu_per_volume
    report["cpu_s_per_volume_from"] = {
        "median_session_wall": wall_per_volume,
        "jobs1_cpu": compute[1]["cpu_seconds"] / compute[1]["volumes"],
    }
    # the downloads' own CPU per MB (git-annex's HTTP and checksum, datalad), at 4 streams or the
    # nearest count measured
    ref = min(by, key=lambda n: abs(n - 4))
    fetch_cpu_s_per_mb = by[ref]["cpu_seconds"] / total_mb
    mbs, source = nsd_sizes(args, mb_per_volume)
    report["projection"] = projection_streams(mbs, source, cpu_per_volume, fetch_cpu_s_per_mb)
    targets: dict[str, bool] = {}
    if "streams_speedup_4" in report:
        targets[f"streams_speedup_4>={MIN_STREAMS_SPEEDUP_4}"] = (
            report["streams_speedup_4"] >= MIN_STREAMS_SPEEDUP_4
        )
    targets[f"overlap_ratio<={MAX_OVERLAP_RATIO} (STREAMS={best})"] = (
        report["overlap_ratio"] <= MAX_OVERLAP_RATIO
    )
    targets["peak disk <= (JOBS+PREFETCH) x largest session"] = (
        report["peak_disk_mb"] <= report["disk_bound_mb"] * 1.001
    )
    targets[f"worker peak RSS<{MAX_WORKER_RSS_MB:g} MB"] = report["peak_rss_mb"] < MAX_WORKER_RSS_MB
    targets["nothing left on disk after the DROP run"] = run["left_on_disk_bytes"] == 0
    if "jobs_scaling" in report:
        targets[f"compute JOBS={args.jobs}/JOBS=1 >= {MIN_JOBS_SCALING}"] = (
            report["jobs_scaling"] >= MIN_JOBS_SCALING
        )
    if variants:
        single = single_stream_report(args, variants, compute, fetch_free, total_mb, largest_mb)
        single["projection"] = projection(
            args,
            cpu_per_volume,
            s_per_volume_jobs,
            mb_per_volume,
            (single["fetch"]["cpu_seconds"] + single["fetch"]["server_cpu_seconds"]) / total_mb,
        )
        report["single_stream"] = single
        targets.update({f"single stream: {k}": v for k, v in single["targets_met"].items()})
    report["targets_met"] = targets
    print_table(report)
    _shared.save_results("pipeline", report)
    return 0


def single_stream_report(
    args: argparse.Namespace,
    variants: list[dict],
    compute: dict[int, dict],
    fetch_free: dict,
    total_mb: float,
    largest_mb: float,
) -> dict:
    """The one-stream measurement at the balanced rate (STREAMS=1), as before STREAMS existed."""
    main_v = variants[0]
    runs, fetch, rate = main_v["runs"], main_v["fetch"], main_v["rate"]
    run = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
    wall_s = statistics.median(r["seconds"] for r in runs)
    download_s = fetch["seconds"]
    compute_s = compute[args.jobs]["seconds"]
    n_sessions = len(fetch["per_session_seconds"])
    out: dict[str, Any] = {
        "jobs": args.jobs,
        "prefetch": args.prefetch,
        "streams": 1,
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
        "fetch": {
            "no_cap_s": fetch_free["seconds"],
            "at_rate_s": download_s,
            "per_session_s": fetch["per_session_seconds"],
            "cpu_seconds": fetch["cpu_seconds"],
            "cpu_s_per_gb": fetch["cpu_seconds"] / total_mb * 1e3,
            "server_cpu_seconds": fetch["server_cpu_seconds"],
            "how": "one `datalad get` per session in order, content checksummed by git-annex",
        },
        "cpu_bound_s": cpu_bound(compute[args.jobs], fetch),
        "timeline": run["timeline"],
        "pipeline_summary": run["summary"],
        "loadavg_after_fetch": fetch["loadavg_after"],
        "loadavg_after_pipeline": [r["loadavg_after"] for r in runs],
    }
    out["overlap_ratio_vs_cpu_bound"] = wall_s / max(download_s, compute_s, out["cpu_bound_s"])
    out["variants"] = [summarise_variant(v, compute, total_mb) for v in variants]
    out["targets_met"] = {
        f"overlap_ratio<={MAX_OVERLAP_RATIO}": out["overlap_ratio"] <= MAX_OVERLAP_RATIO,
        f"sum_ratio<={MAX_SUM_RATIO}": out["sum_ratio"] <= MAX_SUM_RATIO,
        "peak disk <= (JOBS+PREFETCH) x largest session": out["peak_disk_mb"]
        <= out["disk_bound_mb"] * 1.001,
        "nothing left on disk after the DROP run": run["left_on_disk_bytes"] == 0,
    }
    return out


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
    s3 = r["s3_model"]
    print(
        f"\n3mm DROP=1 pipeline benchmark, {r['when']}, {m['cpus']} CPUs: {r['sessions']} sessions "
        f"x {r['volumes_per_session']} volumes (182x218x182 int16), {r['mb_per_session']:.0f} MB per "
        f"session; mirror capped at {s3['per_connection_mb_s']:g} MB/s per connection and "
        f"{s3['total_mb_s']:g} MB/s in total"
    )
    print("  download alone (the DROP mode's fetcher, no compute):")
    for n, secs in r["download_s_by_streams"].items():
        print(
            f"    STREAMS={n:<3}{secs:>8.1f} s  {r['download_mb_s_by_streams'][n]:>6.0f} MB/s  "
            f"{r['download_cpu_s_per_gb_by_streams'][n]:.1f} CPU s/GB  load after "
            f"{tuple(round(x, 2) for x in r['download_loadavg_after_by_streams'][n])}"
        )
    if "streams_speedup_4" in r:
        print(f"  streams_speedup_4 (1 stream / 4 streams): {r['streams_speedup_4']:.2f}")
    print(
        f"  pipelined DROP at the best count, JOBS={r['jobs']} PREFETCH={r['prefetch']} "
        f"STREAMS={r['streams']}: {r['wall_s']:.1f} s against download {r['download_s']:.1f} s and "
        f"compute {r['compute_s']:.1f} s -> overlap_ratio {r['overlap_ratio']:.2f}; CPU bound "
        f"{r['cpu_bound_s']:.1f} s (wall / max incl. it {r['overlap_ratio_vs_cpu_bound']:.2f})"
    )
    print(f"    {r['pipeline_summary']}")
    print(
        f"  peak disk {r['peak_disk_mb']:.0f} MB sampled ({r['peak_sessions_on_disk']} sessions at "
        f"download ends, up to {r['peak_streams']} downloads at once) <= bound "
        f"{r['disk_bound_mb']:.0f} MB; left after: {r['left_on_disk_mb']:.0f} MB; worker peak RSS "
        f"{r['peak_rss_mb']:.0f} MB"
    )
    for j, c in r["compute_jobs"].items():
        print(
            f"  compute JOBS={j}: {c['seconds']:.1f} s, {c['volumes_per_s']:.1f} volumes/s, "
            f"load after {tuple(round(x, 2) for x in c['loadavg_after'])}"
        )
    single = r.get("single_stream")
    if single:
        cap = "no cap" if single["rate_mb_s"] is None else f"{single['rate_mb_s']:.0f} MB/s"
        print(
            f"  one stream ({cap}, {single['rate_note']}): download {single['download_s']:.1f} s, "
            f"compute {single['compute_s']:.1f} s, pipelined {single['wall_s']:.1f} s -> "
            f"overlap_ratio {single['overlap_ratio']:.2f}, sum_ratio {single['sum_ratio']:.3f}"
        )
        for v in single["variants"][1:]:
            cap = "no cap" if v["rate_mb_s"] is None else f"{v['rate_mb_s']:.0f} MB/s"
            print(
                f"    JOBS={v['jobs']} ({cap}): download {v['download_s']:.1f} s, compute "
                f"{v['compute_s']:.1f} s, pipelined {v['wall_s']:.1f} s -> overlap_ratio "
                f"{v['overlap_ratio']:.2f}, sum_ratio {v['sum_ratio']:.2f}"
            )
    pr = r["projection"]
    print(
        f"projection for all NSD ({pr['sessions']} sessions, {pr['total_gb']:.0f} GB; "
        f"{pr['cpu_s_per_volume']:.4f} CPU s/volume, downloads {pr['fetch_cpu_s_per_gb']:.1f} CPU "
        "s/GB):"
    )
    for c in pr["cases"]:
        print(
            f"  {c['case']} ({c['cores']} cores, {c['per_connection_mb_s']:g} MB/s per "
            f"connection): {c['hours']:.2f} h, bound by the {c['binds']} (link "
            f"{c['link_hours']:.2f} h, CPU {c['cpu_hours']:.2f} h), reached with "
            f"STREAMS={c['streams']} JOBS={c['jobs']} PREFETCH={c['prefetch']}; disk <= "
            f"{c['disk_bound_gb']:.0f} GB; one stream: {c['one_stream_hours']:.1f} h"
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
