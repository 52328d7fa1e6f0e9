"""The 3 mm stage: resample 1 mm betas to a 3 mm grid and zero voxels outside grey matter, streaming.

Reference semantics (the original processing, kept as the test oracle)::

    img3 = nilearn.image.resample_img(img, target_affine=np.diag((3, 3, 3)))      # continuous
    gm = nilearn.image.resample_to_img(load_mni152_gm_mask(), img3, interpolation="nearest")
    out = NiftiMasker(gm).inverse_transform(NiftiMasker(gm).fit_transform(img3))  # 0 outside GM

(``force_resample=True`` and ``copy_header=True``, nilearn 0.14's defaults, are passed explicitly.)
nilearn loads the whole session (10.8 GB as int16, twice that as float32). Here each volume is
streamed from the gzip file (:func:`nsdprep.nifti.iter_volumes`) and written at once
(:class:`nsdprep.nifti.NiftiStreamWriter`), so memory stays at a few volumes whatever the session size.

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

Bounded disk (``--drop``, ``make 3mm DROP=1``): a fetcher thread ``datalad get``s the sessions one at a
time, in order, ahead of the workers, and a session's content is ``datalad drop``ped as soon as its
worker is done. At most ``jobs + prefetch`` sessions are on disk at any time (the one downloading
included), so the link works while the CPUs do. Sessions this mode fetched are listed in a journal
in the NSD subdataset's git directory until dropped; a later ``--drop`` run drops what a killed run
left. Content that was present before is never dropped.
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
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nsdprep import dataset, masks, nsd
from nsdprep._io import atomic_path, remove_stale_parts
from nsdprep.errors import FormatError, MissingInputError, NsdPrepError, UsageError
from nsdprep.nifti import (
    MNI_XFORM_CODE,
    NiftiStreamWriter,
    check_betas_header,
    header_affine,
    iter_volumes,
    on_mni152_grid,
    volume_count,
)

log = logging.getLogger(__name__)

#: Target voxel axes (mm) of the original processing: ``target_affine=np.diag((3, 3, 3))``.
TARGET_AXES = np.diag((3.0, 3.0, 3.0))
#: How far (in source voxels) a target voxel centre may be from a source voxel centre and still
#: count as sampling it exactly. The spline error this allows is far below int16 rounding.
GRID_TOL = 1e-6
#: nilearn's spline order for ``interpolation="continuous"``.
SPLINE_ORDER = 3
#: Sessions fetched ahead of the ones being processed in ``--drop`` mode (see :func:`resample_subject`).
DEFAULT_PREFETCH = 1
#: Environment variable that sets ``--prefetch`` (how ``make 3mm PREFETCH=N`` reaches the stage
#: without changing the command ``datalad run`` records: it changes no output byte).
PREFETCH_ENV = "NSDPREP_PREFETCH"
#: Journal of sessions fetched by ``--drop`` mode and not yet dropped (in the NSD git directory).
JOURNAL_NAME = "nsdprep-prefetched"


@dataclass(frozen=True)
class GridMap:
    """Target grid and voxel map of one resample, computed from the input grid only.

    ``matrix``/``offset`` map target voxel indices to source voxel indices (nilearn's ``A``, ``b``);
    ``slices`` is set on the fast path: ``out[target] = vol[source]`` (tuples of slices).
    """

    in_shape: tuple[int, int, int]
    in_affine: np.ndarray
    shape: tuple[int, int, int]
    affine: np.ndarray
    matrix: np.ndarray
    offset: np.ndarray
    target_slices: tuple[slice, slice, slice] | None
    source_slices: tuple[slice, slice, slice] | None

    @property
    def fast(self) -> bool:
        """True when the target grid samples the source grid exactly (strided subsample)."""
        return self.target_slices is not None


def grid_map(
    in_shape: Sequence[int],
    in_affine: np.ndarray,
    target_axes: np.ndarray = TARGET_AXES,
    tol: float = GRID_TOL,
) -> GridMap:
    """Reproduce nilearn's target grid for a 3x3 ``target_affine`` and derive the voxel map.

    Same arithmetic as ``nilearn.image.resample_img`` (0.14.1): the bounding box of the input's
    corners in target voxel units gives the offset (``axes @ mins``) and the shape
    (``ceil(max - min) + 1``); ``A, b`` = ``inv(in_affine) @ target_affine``.
    """
    from nilearn.image.resampling import get_bounds
    from scipy import linalg

    in_shape = tuple(int(s) for s in in_shape[:3])
    affine = np.asarray(in_affine, dtype=np.float64)
    target = np.eye(4)
    target[:3, :3] = np.asarray(target_axes, dtype=np.float64)
    transform = np.linalg.inv(target).dot(affine)
    (xmin, xmax), (ymin, ymax), (zmin, zmax) = get_bounds(in_shape, transform)
    target[:3, 3] = target[:3, :3].dot([xmin, ymin, zmin])
    xmax, ymax, zmax = xmax - xmin, ymax - ymin, zmax - zmin
    shape = (int(np.ceil(xmax)) + 1, int(np.ceil(ymax)) + 1, int(np.ceil(zmax)) + 1)
    if np.all(target == affine):
        vox = np.eye(4)
    else:
        vox = np.dot(linalg.inv(affine), target)
    matrix, offset = vox[:3, :3].copy(), vox[:3, 3].copy()
    tslices, sslices = _strided_map(in_shape, shape, matrix, offset, tol)
    return GridMap(
        in_shape=in_shape,
        in_affine=affine,
        shape=shape,
        affine=target,
        matrix=matrix,
        offset=offset,
        target_slices=tslices,
        source_slices=sslices,
    )


def gm_mask(gmap: GridMap) -> np.ndarray:
    """MNI152 grey-matter mask on the target grid (see :func:`nsdprep.masks.gm_mask`)."""
    return masks.gm_mask(gmap.shape, gmap.affine)


def output_xform_code(hdr: Any) -> int:
    """The xform code of the 3 mm output: MNI (4) for NSD's MNI grid, whatever code the input says.

    NSD's MATLAB tools write its MNI files with ``sform_code`` 1; the world coordinates are MNI
    all the same (:func:`nsdprep.nifti.on_mni152_grid`). Other grids keep the input's code.
    """
    if on_mni152_grid(hdr.get_data_shape()[:3], header_affine(hdr)):
        return MNI_XFORM_CODE
    return int(hdr["sform_code"]) or int(hdr["qform_code"]) or MNI_XFORM_CODE


def nearest_on_grid(
    vol: np.ndarray, src_affine: np.ndarray, shape: Sequence[int], affine: np.ndarray
) -> np.ndarray:
    """Nearest-neighbour resample of a 3D volume onto the grid ``shape``/``affine`` (0 outside).

    The way the grey-matter mask goes to 3 mm (nilearn's ``resample_to_img``, nearest), with a
    shortcut: when target voxels land exactly on source voxels (the 3 mm grid of a 1 mm MNI
    file), it is a strided pick, which is what nilearn computes there too.
    """
    shape3 = tuple(int(s) for s in shape[:3])
    src_affine = np.asarray(src_affine, dtype=np.float64)
    affine = np.asarray(affine, dtype=np.float64)
    vox = np.linalg.inv(src_affine) @ affine
    tsl, ssl = _strided_map(tuple(vol.shape[:3]), shape3, vox[:3, :3], vox[:3, 3], GRID_TOL)
    if tsl is not None and ssl is not None:
        out = np.zeros(shape3, dtype=vol.dtype)
        out[tsl] = vol[ssl]
        return out
    import nibabel as nib
    from nilearn.image import resample_to_img

    data = vol.astype(np.uint8) if vol.dtype == bool else vol
    img = resample_to_img(
        nib.Nifti1Image(data, src_affine),
        nib.Nifti1Image(np.zeros(shape3, np.int8), affine),
        interpolation="nearest",
        force_resample=True,
        copy_header=True,
    )
    return np.asarray(img.dataobj).astype(vol.dtype)


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
    """Arguments of ``python -m nsdprep resample``."""
    parser.add_argument("--nsd", required=True, type=Path, help="NSD dataset (inputs/nsd)")
    parser.add_argument("--subject", required=True, type=int, help="subject number (1-based)")
    parser.add_argument("--out", required=True, type=Path, help="e.g. derivatives/3mm/subj01")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument(
        "--drop",
        action="store_true",
        help="bounded disk: `datalad get` each input ahead of the workers, `datalad drop` it "
        "when processed",
    )
    parser.add_argument(
        "--prefetch",
        type=int,
        default=None,
        help=f"with --drop: sessions fetched ahead of the ones being processed (default: "
        f"${PREFETCH_ENV} or {DEFAULT_PREFETCH}); disk holds at most jobs + prefetch sessions",
    )
    parser.add_argument(
        "--sessions", type=int, nargs="+", help="only these sessions (1-based; default: all)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def prefetch_from_env(value: int | None = None) -> int:
    """``value`` if given, else ``$NSDPREP_PREFETCH``, else :data:`DEFAULT_PREFETCH`; checked >= 0."""
    if value is None:
        text = os.environ.get(PREFETCH_ENV, "").strip()
        if not text:
            return DEFAULT_PREFETCH
        try:
            value = int(text)
        except ValueError:
            raise UsageError(
                f"${PREFETCH_ENV} must be an integer >= 0 (sessions fetched ahead), got {text!r}"
            ) from None
    if value < 0:
        raise UsageError(f"prefetch must be >= 0 (sessions fetched ahead), got {value}")
    return value


def main(args: argparse.Namespace) -> int:
    """Resample every registered (or selected) session of one subject; see module docstring."""
    # SIGTERM (a scheduler cancelling the job, `kill`) unwinds like Ctrl-C: temporaries are removed
    # and what --drop fetched is dropped, instead of dying on the spot.
    signal.signal(signal.SIGTERM, _interrupt)
    stats = PipelineStats()
    results = resample_subject(
        args.nsd,
        args.subject,
        args.out,
        jobs=args.jobs,
        drop=args.drop,
        prefetch=prefetch_from_env(args.prefetch),
        sessions=args.sessions,
        progress=not args.no_progress,
        stats=stats,
    )
    n = sum(r.n_volumes for r in results)
    print(
        f"resample: {nsd.subject_label(args.subject)}: {len(results)} sessions, "
        f"{n} volumes -> {args.out}"
    )
    if args.drop:
        print(f"resample: {stats.summary()}")
    return 0


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@dataclass
class PipelineStats:
    """What a ``drop`` run did, measured as it ran (filled in by :func:`resample_subject`).

    ``events`` are ``(seconds since start, kind, session)`` with kinds ``fetch``, ``fetched``,
    ``start`` (handed to a worker), ``done`` and ``dropped``. Disk figures are the sizes of the
    sessions' content files, taken when a download ends (when the most sessions are on disk).
    """

    jobs: int = 0
    prefetch: int = 0
    fetched: int = 0
    fetched_bytes: int = 0
    fetch_seconds: float = 0.0
    peak_sessions_on_disk: int = 0
    peak_bytes_on_disk: int = 0
    wall_seconds: float = 0.0
    events: list[tuple[float, str, int]] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)

    def event(self, kind: str, session: int) -> None:
        """Note that ``kind`` happened to ``session`` now (thread-safe: one list append)."""
        self.events.append((time.monotonic() - self.t0, kind, session))

    def summary(self) -> str:
        """One line for the log: what was fetched, how long, the peak on disk."""
        return (
            f"fetched {self.fetched} sessions ({self.fetched_bytes / 1e6:.0f} MB, "
            f"{self.fetch_seconds:.1f} s of downloads) while processing, in {self.wall_seconds:.1f} s; "
            f"peak on disk {self.peak_sessions_on_disk} sessions "
            f"({self.peak_bytes_on_disk / 1e6:.0f} MB; bound jobs + prefetch = "
            f"{self.jobs + self.prefetch})"
        )


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
) -> list[SessionResult]:
    """Resample the registered sessions of ``subject`` from ``nsd_ds`` into ``out`` with ``jobs`` workers.

    All headers are checked first (without ``drop``); a failing session stops the run with its file
    named, leaves no output for it and keeps the outputs of sessions already finished. With ``drop``
    the inputs are fetched ahead of the workers and dropped after them, at most ``jobs + prefetch``
    on disk (module docstring); on any failure or interruption what this run fetched is dropped.
    """
    from nsdprep.registry import registered_sessions

    nsd_ds, out = Path(nsd_ds), Path(out)
    if jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {jobs}")
    if prefetch < 0:
        raise UsageError(f"--prefetch must be >= 0, got {prefetch}")
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

    stats = stats if stats is not None else PipelineStats()
    stats.jobs, stats.prefetch = jobs, prefetch
    t_start = stats.t0 = time.monotonic()
    ctx = mp.get_context("fork")
    events = ctx.Queue()
    stop = ctx.Event()
    results: list[SessionResult] = []
    failure: BaseException | None = None
    futures: dict[Future[SessionResult], int] = {}
    fetcher: _Prefetcher | None = None
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
                fetcher = _Prefetcher(nsd_ds, [(s, srcs[s]) for s in todo], jobs + prefetch, stats)
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


class _Prefetcher:
    """Fetch sessions ahead of the workers and drop them after, never more than ``slots`` on disk.

    One fetch thread ``datalad get``s the sessions one at a time, in processing order: one download
    at a time gets the session needed next soonest (the link is shared; git-annex cannot split one
    file over connections), and a slot is taken before each download, so partial downloads count
    too. One drop thread ``datalad drop``s each processed session and frees its slot; drops never
    hold up the workers or the downloads. Content that was present before (and is not in the
    journal of an interrupted run) is processed but neither counted as fetched nor dropped.
    """

    def __init__(
        self,
        nsd_ds: Path,
        sessions: Sequence[tuple[int, Path]],
        slots: int,
        stats: PipelineStats,
    ) -> None:
        self.nsd_ds = nsd_ds
        self.sessions = list(sessions)
        self.stats = stats
        self.error: BaseException | None = None
        self._slots = threading.Semaphore(slots)
        self._ready: queue_mod.Queue[int | None] = queue_mod.Queue()
        self._drops: queue_mod.Queue[int | None] = queue_mod.Queue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._src = dict(self.sessions)
        self._ours: set[int] = set()  # fetched by this mode, not dropped yet
        self._on_disk: set[int] = set()  # holding a slot: downloading, waiting or processing
        self._delivering = True
        self._journal = _Journal(nsd_ds)
        self._fetch_thread = threading.Thread(target=self._fetch_loop, name="prefetch", daemon=True)
        self._drop_thread = threading.Thread(target=self._drop_loop, name="drop", daemon=True)

    def start(self) -> None:
        """Drop what an interrupted run left (not needed now), then start both threads."""
        wanted = {src.relative_to(self.nsd_ds).as_posix() for _s, src in self.sessions}
        stale = [rel for rel in self._journal.read() if rel not in wanted]
        present = [rel for rel in stale if (self.nsd_ds / rel).exists()]
        if present:
            log.info(
                "dropping %d input(s) an interrupted --drop run left: %s", len(present), present
            )
            dataset.drop(self.nsd_ds, [self.nsd_ds / rel for rel in present])
        if stale:
            self._journal.remove(*stale)
        self._fetch_thread.start()
        self._drop_thread.start()

    def active(self) -> bool:
        """True while sessions may still be handed over."""
        return self._delivering or not self._ready.empty()

    def ready(self, block: bool) -> list[int]:
        """Sessions whose content is present (waits up to 0.2 s for one if ``block``)."""
        got: list[int] = []
        try:
            item = self._ready.get(timeout=0.2) if block else self._ready.get_nowait()
            while True:
                if item is not None:
                    got.append(item)
                item = self._ready.get_nowait()
        except queue_mod.Empty:
            pass
        return got

    def release(self, session: int) -> None:
        """``session`` is processed (or abandoned): drop it if this mode fetched it, free its slot."""
        self._drops.put(session)

    def stop(self) -> None:
        """Start no further download (the current one finishes; :meth:`close` drops it)."""
        self._stop.set()

    def close(self) -> None:
        """Stop, wait for the threads, and drop every session this mode fetched and still holds."""
        self._stop.set()
        self._fetch_thread.join()
        with self._lock:
            left = sorted(self._ours)
        for s in left:
            self._drops.put(s)
        self._drops.put(None)
        self._drop_thread.join()
        with self._lock:
            still = sorted(self._ours)
        if still:
            log.error(
                "could not drop the content of session(s) %s; it stays listed in %s and the next "
                "--drop run drops it",
                still,
                self._journal.path,
            )

    # -- threads ------------------------------------------------------------------------------
    def _fetch_loop(self) -> None:
        try:
            journaled = set(self._journal.read())
            for s, src in self.sessions:
                while not self._slots.acquire(timeout=0.1):
                    if self._stop.is_set():
                        return
                if self._stop.is_set():
                    self._slots.release()
                    return
                rel = src.relative_to(self.nsd_ds).as_posix()
                with self._lock:
                    self._on_disk.add(s)
                if src.exists():
                    if rel in journaled:  # fetched by an interrupted run: ours to drop
                        with self._lock:
                            self._ours.add(s)
                else:
                    with self._lock:
                        self._ours.add(s)
                    self._journal.add(rel)
                    self.stats.event("fetch", s)
                    t0 = time.monotonic()
                    log.info("datalad get %s", src)
                    dataset.get(self.nsd_ds, [src])
                    self._fetched(s, src, time.monotonic() - t0)
                self._ready.put(s)
        except BaseException as exc:  # handed to the main thread, which stops the run
            self.error = exc
        finally:
            self._delivering = False
            self._ready.put(None)

    def _fetched(self, session: int, src: Path, seconds: float) -> None:
        st = self.stats
        st.event("fetched", session)
        with self._lock:
            st.fetched += 1
            st.fetched_bytes += src.stat().st_size
            st.fetch_seconds += seconds
            held = [self._src[s] for s in self._on_disk]
            st.peak_sessions_on_disk = max(st.peak_sessions_on_disk, len(held))
            on_disk = sum(p.stat().st_size for p in held if p.exists())
            st.peak_bytes_on_disk = max(st.peak_bytes_on_disk, on_disk)

    def _drop_loop(self) -> None:
        while (s := self._drops.get()) is not None:
            with self._lock:
                ours = s in self._ours
            if ours:
                src = self._src[s]
                try:
                    log.info("datalad drop %s", src)
                    dataset.drop(self.nsd_ds, [src])
                except BaseException as exc:
                    if self.error is None:
                        self.error = exc
                    self._stop.set()
                    continue
                self._journal.remove(src.relative_to(self.nsd_ds).as_posix())
                self.stats.event("dropped", s)
            with self._lock:
                self._ours.discard(s)
                held = s in self._on_disk
                self._on_disk.discard(s)
            if held:
                self._slots.release()


class _Journal:
    """Dataset-relative paths fetched by ``--drop`` mode and not dropped yet (one per line).

    Kept in the NSD subdataset's git directory (never part of the dataset), so a run killed before
    it could drop its inputs leaves a note that the next ``--drop`` run acts on.
    """

    def __init__(self, nsd_ds: Path) -> None:
        self.path = dataset.git_dir(nsd_ds) / JOURNAL_NAME
        self._lock = threading.Lock()

    def read(self) -> list[str]:
        with self._lock:
            return self._read()

    def _read(self) -> list[str]:
        if not self.path.exists():
            return []
        return [line for line in self.path.read_text().splitlines() if line]

    def add(self, rel: str) -> None:
        with self._lock:
            entries = self._read()
            if rel not in entries:
                self._write([*entries, rel])

    def remove(self, *rels: str) -> None:
        with self._lock:
            entries = [e for e in self._read() if e not in rels]
            self._write(entries)

    def _write(self, entries: list[str]) -> None:
        if not entries:
            self.path.unlink(missing_ok=True)
            return
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(f"{e}\n" for e in entries))


# ---------------------------------------------------------------- internals


class _Cancelled(NsdPrepError):
    """Another session failed; this one stopped without output."""


def _path_name(gmap: GridMap) -> str:
    return "fast (strided subsample)" if gmap.fast else "general (spline)"


def _strided_map(
    in_shape: tuple[int, int, int],
    out_shape: tuple[int, int, int],
    matrix: np.ndarray,
    offset: np.ndarray,
    tol: float,
) -> tuple[tuple[slice, slice, slice] | None, tuple[slice, slice, slice] | None]:
    """Slices with ``out[t] = vol[s]`` if target voxels land exactly on source voxels, else None."""
    if not np.allclose(matrix, np.diag(np.diag(matrix)), rtol=0, atol=tol):
        return None, None
    tsl, ssl = [], []
    for axis in range(3):
        step_f, off_f = matrix[axis, axis], offset[axis]
        step, off = int(round(step_f)), int(round(off_f))
        if step == 0 or abs(step_f - step) > tol or abs(off_f - off) > tol:
            return None, None
        n_in, n_out = in_shape[axis], out_shape[axis]
        src = off + step * np.arange(n_out)
        inside = np.flatnonzero((src >= 0) & (src <= n_in - 1))
        if inside.size == 0:  # no overlap on this axis: output all zeros
            tsl.append(slice(0, 0))
            ssl.append(slice(0, 0))
            continue
        t0, t1 = int(inside[0]), int(inside[-1]) + 1
        s0, s_last = int(src[t0]), int(src[t1 - 1])
        stop = s_last + (1 if step > 0 else -1)
        tsl.append(slice(t0, t1))
        ssl.append(slice(s0, None if stop < 0 else stop, step))
    return (tsl[0], tsl[1], tsl[2]), (ssl[0], ssl[1], ssl[2])


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
    global _EVENTS, _STOP
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
