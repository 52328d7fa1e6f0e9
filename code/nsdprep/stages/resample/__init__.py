"""The 3 mm stage: resample 1 mm betas to a 3 mm grid and zero voxels outside grey matter, streaming.

Reference semantics (the original processing, kept as the test oracle)::

    img3 = nilearn.image.resample_img(img, target_affine=np.diag((3, 3, 3)))      # continuous
    gm = nilearn.image.resample_to_img(load_mni152_gm_mask(), img3, interpolation="nearest")
    out = NiftiMasker(gm).inverse_transform(NiftiMasker(gm).fit_transform(img3))  # 0 outside GM

(``force_resample=True`` and ``copy_header=True``, nilearn 0.14's defaults, are passed explicitly.)
nilearn loads the whole session (10.8 GB as int16, twice that as float32). Here each volume is
streamed from the gzip file (:func:`nsdprep.core.nifti.iter_volumes`) and written at once
(:class:`nsdprep.core.nifti.NiftiStreamWriter`), so memory stays at a few volumes whatever the session size.

Two paths, chosen from the affines (never from the data):

* **fast** -- the 3 mm grid samples the 1 mm grid exactly (the voxel-to-voxel map is diagonal with
  integer steps and integer offsets, e.g. NSD's x-flipped MNI grid: source ``i = 181 - 3 I``,
  ``j = 3 J``, ``k = 3 K``). Cubic-spline interpolation at the knots returns the input samples (up to
  ~1e-12 of floating-point noise), so the resample is a strided subsample; target voxels whose source
  lies outside the input are 0, as nilearn's ``cval``. Output dtype = input dtype (int16 for NSD:
  NSD units, beta x 300): nilearn's float32 values round (``np.rint``) to exactly these integers. Do
  not truncate nilearn's floats (``astype``) -- 299.99998 would become 299 -- and do not save them
  through nibabel with the copied int16 header, which rescales them with a lossy ``scl_slope``.
* **general** -- any other grid: per-volume ``scipy.ndimage.affine_transform`` with the same matrix,
  offset, spline order 3, ``cval=0`` and float output as nilearn, then nilearn's clip to
  ``[min(data, 0), max(data, 0)]`` over the whole 4D input (found in a first streaming pass).
  Output is float32 (nilearn's dtype for int16 input), bit-identical to nilearn.

Not reproduced: nilearn's NaN handling for float input with non-finite values (NSD betas are int16).

Bounded disk (``--drop``, ``make 3mm DROP=1``): a fetcher starts the sessions' downloads in order, ahead
of the workers, up to ``streams`` at once (each one ``git annex get``, one connection), and a
session's content is ``datalad drop``ped as soon as its worker is done. At most ``jobs + prefetch``
sessions are on disk at any time (the ones downloading included, partial downloads counted), so the
link works while the CPUs do. Sessions this mode fetched are listed in a journal in the NSD
subdataset's git directory until dropped; a later ``--drop`` run drops what a killed run left.
Content that was present before is never dropped.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing as mp
import os
import queue as queue_mod
import resource
import signal
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nsdprep import options
from nsdprep.core import masks, nsd
from nsdprep.core._io import remove_stale_parts
from nsdprep.core.errors import FormatError, MissingInputError, NsdPrepError, UsageError
from nsdprep.core.grid import SPLINE_ORDER, GridMap, grid_map, nearest_on_grid  # noqa: F401 (re-export)
from nsdprep.core.nifti import (
    MNI_XFORM_CODE,
    NiftiStreamWriter,
    check_betas_header,
    header_affine,
    iter_volumes,
    on_mni152_grid,
    volume_count,
)
from nsdprep.stages.resample.prefetch import (  # noqa: F401 (re-exported for users of the stage)
    DEFAULT_PREFETCH,
    DEFAULT_STREAMS,
    JOURNAL_NAME,
    PipelineStats,
    Prefetcher,
)

log = logging.getLogger(__name__)


def gm_mask(gmap: GridMap) -> np.ndarray:
    """MNI152 grey-matter mask on the target grid (see :func:`nsdprep.core.masks.gm_mask`)."""
    return masks.gm_mask(gmap.shape, gmap.affine)


def output_xform_code(hdr: Any) -> int:
    """The xform code of the 3 mm output: MNI (4) for NSD's MNI grid, whatever code the input says.

    NSD's MATLAB tools write its MNI files with ``sform_code`` 1; the world coordinates are MNI
    all the same (:func:`nsdprep.core.nifti.on_mni152_grid`). Other grids keep the input's code.
    """
    if on_mni152_grid(hdr.get_data_shape()[:3], header_affine(hdr)):
        return MNI_XFORM_CODE
    return int(hdr["sform_code"]) or int(hdr["qform_code"]) or MNI_XFORM_CODE


def output_dtype(gmap: GridMap, in_dtype: np.dtype[Any]) -> np.dtype[Any]:
    """Output data type: the input's on the fast path for integer data; else nilearn's float.

    nilearn resamples integer data ``intN`` into ``floatN`` (float32 at least) and keeps float data
    as is; on the fast path every output value is an input sample or 0, so the integer type is exact.
    """
    in_dtype = np.dtype(in_dtype).newbyteorder("=")
    if gmap.fast and in_dtype.kind in "iu":
        return in_dtype
    if in_dtype.kind == "i":
        return np.dtype(np.float32) if in_dtype.itemsize <= 4 else np.dtype(np.float64)
    if in_dtype.kind == "f":
        return in_dtype
    raise FormatError(
        f"cannot resample data of type {in_dtype} (expected signed integers or float)"
    )


def resample_volume(
    vol: np.ndarray,
    gmap: GridMap,
    mask: np.ndarray,
    dtype: np.dtype[Any],
    clip: tuple[float, float] | None = None,
) -> np.ndarray:
    """Resample one 3D volume to ``gmap``'s grid and zero it outside ``mask`` (Fortran order)."""
    out = np.zeros(gmap.shape, dtype=dtype, order="F")
    if gmap.fast:
        out[gmap.target_slices] = vol[gmap.source_slices]
    else:
        from scipy.ndimage import affine_transform

        matrix = gmap.matrix
        if np.all(np.diag(np.diag(matrix)) == matrix):
            matrix = np.diag(matrix)  # same call as nilearn (scipy's faster diagonal branch)
        affine_transform(
            vol,
            matrix,
            offset=gmap.offset,
            output_shape=gmap.shape,
            output=out,
            cval=0.0,
            order=SPLINE_ORDER,
        )
        if clip is not None:
            out.clip(clip[0], clip[1], out=out)
    out[~mask] = 0
    return out


@dataclass(frozen=True)
class SessionResult:
    """What :func:`resample_session` wrote."""

    src: Path
    dst: Path
    n_volumes: int
    fast: bool
    dtype: str
    seconds: float
    #: peak resident memory of the process that ran it (a worker), MB
    peak_rss_mb: float = 0.0


def resample_session(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    expect_dtype: np.dtype[Any] | type | None = np.int16,
    progress: Callable[[int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
    compresslevel: int = 1,
) -> SessionResult:
    """Resample one 4D betas file to 3 mm + GM mask and write ``dst`` atomically.

    Written with ISA-L gzip level ``compresslevel`` (1: fast; the output is
    mostly zeros and level 6 would cost more time than it saves space). ``progress(n)`` is called
    after every ``n`` volumes; ``cancelled()`` is polled per volume and
    aborts (no output) when true. Any read error leaves no ``dst``.
    """
    src, dst = Path(src), Path(dst)
    t0 = time.perf_counter()
    hdr = check_betas_header(src, dtype=expect_dtype)
    gmap = grid_map(hdr.get_data_shape()[:3], header_affine(hdr))
    n_vol = volume_count(hdr)
    probe = next(iter_volumes(src, stop=1, header=hdr))  # dtype after nibabel-style scaling
    dtype = output_dtype(gmap, probe.dtype)
    del probe
    mask = gm_mask(gmap)
    clip = None if gmap.fast else _value_range(src, hdr, cancelled)
    code = output_xform_code(hdr)
    log.debug("%s -> %s: %s path, %s, %d volumes", src, dst, _path_name(gmap), dtype, n_vol)
    with NiftiStreamWriter(
        dst,
        gmap.shape,
        gmap.affine,
        dtype,
        n_vol,
        header=hdr,
        xform_code=code,
        compresslevel=compresslevel,
    ) as writer:
        for vol in iter_volumes(src, header=hdr, reuse_buffer=True):
            if cancelled is not None and cancelled():
                raise _Cancelled(str(src))
            writer.write(resample_volume(vol, gmap, mask, dtype, clip))
            if progress is not None:
                progress(1)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return SessionResult(
        src, dst, n_vol, gmap.fast, str(dtype), time.perf_counter() - t0, peak_rss_mb=rss_mb
    )


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m nsdprep resample`` (``JOBS``, ``DROP``, ``PREFETCH`` from the spec)."""
    parser.add_argument("--nsd", required=True, type=Path, help="NSD dataset (inputs/nsd)")
    parser.add_argument("--subject", required=True, type=int, help="subject number (1-based)")
    parser.add_argument("--out", required=True, type=Path, help="e.g. derivatives/3mm/subj01")
    options.add_arguments(parser, options.passed_to("3mm"))
    parser.add_argument(
        "--sessions", type=int, nargs="+", help="only these sessions (1-based; default: all)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    """Resample every registered (or selected) session of one subject; see module docstring."""
    # SIGTERM (a scheduler cancelling the job, `kill`) unwinds like Ctrl-C (nsdprep.core.signals,
    # installed by the command line): temporaries are removed and what --drop fetched is dropped.
    stats = PipelineStats()
    opts = options.from_args(args)
    results = resample_subject(
        args.nsd,
        args.subject,
        args.out,
        jobs=opts.jobs,
        drop=opts.drop,
        prefetch=opts.prefetch,
        streams=opts.streams,
        sessions=args.sessions,
        progress=not args.no_progress,
        stats=stats,
    )
    n = sum(r.n_volumes for r in results)
    print(
        f"resample: {nsd.subject_label(args.subject)}: {len(results)} sessions, "
        f"{n} volumes -> {args.out}"
    )
    if opts.drop:
        print(f"resample: {stats.summary()}")
    return 0


def resample_subject(
    nsd_ds: str | os.PathLike[str],
    subject: int,
    out: str | os.PathLike[str],
    *,
    jobs: int = 2,
    drop: bool = False,
    prefetch: int = DEFAULT_PREFETCH,
    sessions: Sequence[int] | None = None,
    progress: bool = True,
    stats: PipelineStats | None = None,
    streams: int = DEFAULT_STREAMS,
) -> list[SessionResult]:
    """Resample the registered sessions of ``subject`` from ``nsd_ds`` into ``out`` with ``jobs`` workers.

    All headers are checked first (without ``drop``); a failing session stops the run with its file
    named, leaves no output for it and keeps the outputs of sessions already finished. With ``drop``
    the inputs are fetched ahead of the workers and dropped after them, up to ``streams`` downloads
    at once and at most ``jobs + prefetch`` sessions on disk (module docstring); on any failure or
    interruption what this run fetched is dropped, partial downloads included.
    """
    from nsdprep.core.inventory import registered_sessions

    nsd_ds, out = Path(nsd_ds), Path(out)
    if jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {jobs}")
    if prefetch < 0:
        raise UsageError(f"--prefetch must be >= 0, got {prefetch}")
    if streams < 1:
        raise UsageError(f"--streams must be >= 1, got {streams}")
    registered = registered_sessions(nsd_ds, subject)
    if not registered:
        raise MissingInputError(
            f"no betas of {nsd.subject_label(subject)} registered in {nsd_ds} "
            f"(expected {nsd.subject_dir_key(subject)}/betas_sessionNN.nii.gz); run `make inputs`."
        )
    if sessions:
        unknown = sorted(set(sessions) - set(registered))
        if unknown:
            raise MissingInputError(
                f"session(s) {unknown} of {nsd.subject_label(subject)} not registered in {nsd_ds}; "
                f"registered: {registered}"
            )
        todo = sorted(set(sessions))
    else:
        todo = registered
    srcs = {s: nsd_ds / nsd.betas_key(subject, s) for s in todo}
    dsts = {s: out / f"betas_session{s:02d}.nii.gz" for s in todo}
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_parts(out)

    n_volumes: dict[int, int] = {}
    if not drop:
        missing = [s for s in todo if not srcs[s].exists()]
        if missing:
            listed = "\n  ".join(str(srcs[s]) for s in missing)
            raise MissingInputError(
                f"content of {len(missing)} betas file(s) absent (registered, not fetched):\n  "
                f"{listed}\nFetch them with `datalad get <path>` (e.g. `datalad get -d {nsd_ds} "
                f"{srcs[missing[0]].relative_to(nsd_ds)}`) or "
                f"`make get SUBJECTS={subject:02d}`, or pass --drop to fetch/drop one at a time."
            )
        for s in todo:
            hdr = check_betas_header(srcs[s])
            gmap = grid_map(hdr.get_data_shape()[:3], header_affine(hdr))
            log.info(
                "%s: %d volumes, grid %s -> %s (%s path)",
                srcs[s],
                volume_count(hdr),
                gmap.in_shape,
                gmap.shape,
                _path_name(gmap),
            )
            n_volumes[s] = volume_count(hdr)
            gm_mask(gmap)  # made once here (cached): the forked workers inherit it

    stats = stats if stats is not None else PipelineStats()
    stats.jobs, stats.prefetch, stats.streams = jobs, prefetch, streams
    if drop and streams > jobs + prefetch:
        log.info(
            "up to %d downloads at once, not STREAMS=%d: at most JOBS + PREFETCH = %d sessions "
            "are on disk, downloads included (PREFETCH=%d lets %d streams run while the workers "
            "compute)",
            jobs + prefetch, streams, jobs + prefetch, streams, streams,
        )  # fmt: skip
    t_start = stats.t0 = time.monotonic()
    ctx = mp.get_context("fork")
    events = ctx.Queue()
    stop = ctx.Event()
    results: list[SessionResult] = []
    failure: BaseException | None = None
    futures: dict[Future[SessionResult], int] = {}
    fetcher: Prefetcher | None = None
    bars = _Bars(len(todo), sum(n_volumes.values()) or None, enabled=progress)
    try:
        with ProcessPoolExecutor(
            max_workers=min(jobs, len(todo)),
            mp_context=ctx,
            initializer=_worker_init,
            initargs=(events, stop),
        ) as pool:

            def submit(s: int) -> None:
                fut = pool.submit(_worker_session, str(srcs[s]), str(dsts[s]), drop)
                futures[fut] = s
                pending.add(fut)
                stats.event("start", s)

            pending: set[Future[SessionResult]] = set()
            if drop:
                # Fork every worker now, before the fetcher's threads exist.
                pool.submit(int).result()
                fetcher = Prefetcher(
                    nsd_ds, [(s, srcs[s]) for s in todo], jobs + prefetch, stats, streams=streams
                )
                fetcher.start()
            else:
                for s in todo:
                    submit(s)
            try:
                while pending or (fetcher is not None and fetcher.active()):
                    if fetcher is not None:
                        for s in fetcher.ready(block=not pending):
                            if failure is None:
                                submit(s)
                        if fetcher.error is not None and failure is None:
                            failure = fetcher.error
                    done, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
                    bars.drain(events)
                    for fut in sorted(done, key=futures.__getitem__):  # drops in session order
                        stats.event("done", futures[fut])
                        if fetcher is not None:
                            fetcher.release(futures[fut])
                        exc = fut.exception() if not fut.cancelled() else None
                        if fut.cancelled() or isinstance(exc, _Cancelled):
                            continue
                        if exc is None:
                            results.append(fut.result())
                            bars.session_done()
                        elif failure is None:
                            failure = exc
                    if failure is not None and not stop.is_set():
                        stop.set()
                        if fetcher is not None:
                            fetcher.stop()
                        for fut in pending:
                            fut.cancel()
            except BaseException:  # Ctrl-C, SIGTERM: stop the workers at their next volume
                stop.set()
                if fetcher is not None:
                    fetcher.stop()
                for fut in pending:
                    fut.cancel()
                raise
            bars.drain(events)
    finally:
        if fetcher is not None:
            fetcher.close()
        stats.wall_seconds = time.monotonic() - t_start
        bars.close()
    if failure is not None:
        kept = sorted(
            futures[f] for f in futures if f.done() and not f.cancelled() and f.exception() is None
        )
        log.error("stopped; outputs of finished sessions kept: %s", kept or "none")
        if isinstance(failure, NsdPrepError):
            raise failure
        raise NsdPrepError(f"resampling failed: {type(failure).__name__}: {failure}") from failure
    return sorted(results, key=lambda r: str(r.dst))


class _Cancelled(NsdPrepError):
    """Another session failed; this one stopped without output."""


def _path_name(gmap: GridMap) -> str:
    return "fast (strided subsample)" if gmap.fast else "general (spline)"


def _value_range(src: Path, hdr: Any, cancelled: Callable[[], bool] | None) -> tuple[float, float]:
    """The clip range of nilearn over the whole 4D input: ``(min(data, 0), max(data, 0))``."""
    lo, hi = 0, 0
    for vol in iter_volumes(src, header=hdr, reuse_buffer=True):
        if cancelled is not None and cancelled():
            raise _Cancelled(str(src))
        lo, hi = min(lo, np.nanmin(vol)), max(hi, np.nanmax(vol))
    return lo, hi


_EVENTS: Any = None
_STOP: Any = None


def _worker_init(events: Any, stop: Any) -> None:
    """A worker's set-up: its queues, and signals left to the parent.

    Ctrl-C and SIGTERM reach the workers too (the process group, or :func:`signals.stop`); the
    parent answers them by setting ``stop``, which a worker checks at every volume, so a worker
    itself ignores them instead of dying with a traceback in the middle of a write.
    """
    global _EVENTS, _STOP
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _EVENTS, _STOP = events, stop


def _worker_session(src: str, dst: str, count_total: bool) -> SessionResult:
    """One session in a worker process (its content is present).

    ``count_total``: add its volumes to the progress bar's total (not known up front when the
    inputs are fetched on the way).
    """
    src_p = Path(src)
    pending = [0]
    last = [time.monotonic()]

    def progress(n: int) -> None:
        pending[0] += n
        now = time.monotonic()
        if now - last[0] > 0.2:
            _EVENTS.put(("vol", pending[0]))
            pending[0], last[0] = 0, now

    hdr_total = volume_count(check_betas_header(src_p))
    _EVENTS.put(("total", hdr_total if count_total else 0))
    result = resample_session(src_p, dst, progress=progress, cancelled=_STOP.is_set)
    _EVENTS.put(("vol", pending[0]))
    return result


class _Bars:
    """tqdm bars over sessions and volumes, fed by worker events."""

    def __init__(self, n_sessions: int, n_volumes: int | None, enabled: bool) -> None:
        from tqdm import tqdm

        self.sessions = tqdm(total=n_sessions, unit="session", disable=not enabled, position=0)
        self.volumes = tqdm(total=n_volumes, unit="vol", disable=not enabled, position=1)

    def drain(self, events: Any) -> None:
        with contextlib.suppress(queue_mod.Empty):
            while True:
                kind, n = events.get_nowait()
                if kind == "vol":
                    self.volumes.update(n)
                elif kind == "total" and n:
                    self.volumes.total = (self.volumes.total or 0) + n
                    self.volumes.refresh()

    def session_done(self) -> None:
        self.sessions.update(1)

    def close(self) -> None:
        self.volumes.close()
        self.sessions.close()
