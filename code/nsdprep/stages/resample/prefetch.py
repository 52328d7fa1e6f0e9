"""The bounded-disk mode of the 3 mm stage (``make 3mm DROP=1``): fetch ahead, process, drop.

A fetcher starts the sessions' downloads in the order the workers need them, up to ``streams`` at
once (each its own ``git annex get``: one connection, content verified by git-annex, then checked
against the checksum recorded at registration, :func:`nsdprep.core.pins.verify_fetched`, before a
worker sees it), at most ``jobs + prefetch`` sessions on disk, partial downloads included; a
dropper frees each one once processed. A journal in the NSD git directory lists what was fetched and not yet dropped, so the
next run drops what a killed run left.
"""

from __future__ import annotations

import logging
import queue as queue_mod
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nsdprep import options
from nsdprep.core import dataset, pins
from nsdprep.core._io import atomic_path

log = logging.getLogger(__name__)

#: Sessions fetched ahead of the ones being processed in ``--drop`` mode (``PREFETCH``).
DEFAULT_PREFETCH = 1
#: Downloads at once in ``--drop`` mode (``STREAMS``; each is one connection).
DEFAULT_STREAMS: int = options.spec("streams").default
#: Journal of sessions fetched by ``--drop`` mode and not yet dropped (in the NSD git directory).
JOURNAL_NAME = "nsdprep-prefetched"


@dataclass
class PipelineStats:
    """What a ``drop`` run did, measured as it ran (filled in by :func:`resample_subject`).

    ``events`` are ``(seconds since start, kind, session)`` with kinds ``fetch``, ``fetched``,
    ``start`` (handed to a worker), ``done`` and ``dropped``. Disk figures are the sizes of the
    sessions' content files and partial downloads, taken when a download ends (when the most
    sessions are on disk).
    """

    jobs: int = 0
    prefetch: int = 0
    streams: int = 1
    #: most downloads running at once
    peak_streams: int = 0
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
            f"{self.jobs + self.prefetch}); up to {self.peak_streams} of STREAMS={self.streams} "
            "downloads at once"
        )


class Prefetcher:
    """Fetch sessions ahead of the workers and drop them after, never more than ``slots`` on disk.

    One fetch thread starts the downloads in processing order, up to ``streams`` at once: a
    session's download starts only after every session before it has started, and only once it
    holds one of the ``slots`` (taken before the download, so partial downloads count too) and one
    of the ``streams``. Each download is its own ``git annex get`` (one connection; a single S3
    connection is slow, several fill a fast link; git-annex cannot split one file over
    connections), run by a thread of its own so that it can be stopped. One drop thread ``datalad
    drop``s each processed session and frees its slot; drops never hold up the workers or the
    downloads. On a failed download, :meth:`stop` or :meth:`close` the running downloads are
    stopped and their partial downloads removed. Content that was present before (and is not in
    the journal of an interrupted run) is processed but neither counted as fetched nor dropped.
    """

    def __init__(
        self,
        nsd_ds: Path,
        sessions: Sequence[tuple[int, Path]],
        slots: int,
        stats: PipelineStats,
        streams: int = 1,
    ) -> None:
        self.nsd_ds = nsd_ds
        self.sessions = list(sessions)
        self.stats = stats
        self.error: BaseException | None = None
        self._slots = threading.Semaphore(slots)
        self._streams = threading.Semaphore(streams)
        self._cancel = threading.Event()  # stops the running downloads
        self._downloads: list[threading.Thread] = []
        self._downloading = 0
        self._partial: dict[int, Path] = {}
        self._ready: queue_mod.Queue[int | None] = queue_mod.Queue()
        self._drops: queue_mod.Queue[int | None] = queue_mod.Queue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._src = dict(self.sessions)
        self._ours: set[int] = set()  # fetched by this mode, not dropped yet
        self._on_disk: set[int] = set()  # holding a slot: downloading, waiting or processing
        self._delivering = True
        self._journal = Journal(nsd_ds)
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
            partial = dataset.partial_downloads(self.nsd_ds, stale)
            for path in partial.values():
                dataset.discard_partial(path)
            self._journal.remove(*stale)
        rels = {s: src.relative_to(self.nsd_ds).as_posix() for s, src in self.sessions}
        where = dataset.partial_downloads(self.nsd_ds, list(rels.values()))
        self._partial = {s: where[rel] for s, rel in rels.items() if rel in where}
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
        """Start no further download and stop the running ones (:meth:`close` cleans up)."""
        self._stop.set()
        self._cancel.set()

    def close(self) -> None:
        """Stop, wait for the threads, and drop what this mode fetched (content and partials)."""
        self.stop()
        if self._fetch_thread.ident is None or self._drop_thread.ident is None:
            return  # :meth:`start` failed before fetching anything
        # an interrupt arriving meanwhile waits until the drops are done (then it is raised):
        # the clean-up it asks for is this one
        pending = _uninterrupted(self._fetch_thread.join)
        with self._lock:
            left = sorted(self._ours)
        for s in left:
            self._drops.put(s)
        self._drops.put(None)
        pending = _uninterrupted(self._drop_thread.join) or pending
        with self._lock:
            still = sorted(self._ours)
        if still:
            log.error(
                "could not drop the content of session(s) %s; it stays listed in %s and the next "
                "--drop run drops it",
                still,
                self._journal.path,
            )
        if pending is not None:
            raise pending

    # -- threads ------------------------------------------------------------------------------
    def _take(self, sem: threading.Semaphore) -> bool:
        """Acquire ``sem`` unless the run stops first (False)."""
        while not sem.acquire(timeout=0.1):
            if self._stop.is_set():
                return False
        if self._stop.is_set():
            sem.release()
            return False
        return True

    def _fetch_loop(self) -> None:
        try:
            journaled = set(self._journal.read())
            for s, src in self.sessions:
                if not self._take(self._slots):
                    return
                rel = src.relative_to(self.nsd_ds).as_posix()
                if src.exists():
                    with self._lock:
                        self._on_disk.add(s)
                        if rel in journaled:  # fetched by an interrupted run: ours to drop
                            self._ours.add(s)
                    pins.verify_fetched(self.nsd_ds, [src.absolute()])  # checked once, if never
                    self._ready.put(s)
                    continue
                if not self._take(self._streams):
                    self._slots.release()
                    return
                with self._lock:
                    self._on_disk.add(s)
                    self._ours.add(s)
                self._journal.add(rel)
                self.stats.event("fetch", s)  # here, so that the events keep the start order
                thread = threading.Thread(
                    target=self._download, args=(s, src, rel), name=f"get-{s}", daemon=True
                )
                self._downloads.append(thread)
                thread.start()
        except BaseException as exc:  # handed to the main thread, which stops the run
            self._fail(exc)
        finally:
            for thread in self._downloads:
                thread.join()
            self._delivering = False
            self._ready.put(None)

    def _download(self, session: int, src: Path, rel: str) -> None:
        """One stream: ``git annex get`` one session, hand it over, free the stream."""
        try:
            with self._lock:
                self._downloading += 1
                self.stats.peak_streams = max(self.stats.peak_streams, self._downloading)
            t0 = time.monotonic()
            log.info("git annex get %s", src)
            if dataset.get_file(self.nsd_ds, rel, cancel=self._cancel):
                # a mismatch with the pinned checksum is removed and raised (absolute path:
                # ``src`` may be relative to the working directory)
                pins.verify_fetched(self.nsd_ds, [src.absolute()])
                self._fetched(session, src, time.monotonic() - t0)
                self._ready.put(session)
        except BaseException as exc:  # the first failure stops the run and every other stream
            self._fail(exc)
        finally:
            with self._lock:
                self._downloading -= 1
            self._streams.release()

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = exc
        self.stop()

    def _fetched(self, session: int, src: Path, seconds: float) -> None:
        st = self.stats
        st.event("fetched", session)
        with self._lock:
            st.fetched += 1
            st.fetched_bytes += src.stat().st_size
            st.fetch_seconds += seconds
            held = list(self._on_disk)
            st.peak_sessions_on_disk = max(st.peak_sessions_on_disk, len(held))
            on_disk = sum(self._bytes_on_disk(s) for s in held)
            st.peak_bytes_on_disk = max(st.peak_bytes_on_disk, on_disk)

    def _bytes_on_disk(self, session: int) -> int:
        """Bytes of ``session``'s content, or of its partial download."""
        for path in (self._src[session], self._partial.get(session)):
            try:
                if path is not None:
                    return path.stat().st_size
            except FileNotFoundError:
                continue
        return 0

    def _drop_loop(self) -> None:
        while (s := self._drops.get()) is not None:
            with self._lock:
                ours = s in self._ours
            if ours:
                src = self._src[s]
                try:
                    if src.exists():
                        log.info("datalad drop %s", src)
                        dataset.drop(self.nsd_ds, [src])
                    if s in self._partial:  # a stopped or failed download
                        dataset.discard_partial(self._partial[s])
                except BaseException as exc:
                    self._fail(exc)
                    continue
                self._journal.remove(src.relative_to(self.nsd_ds).as_posix())
                self.stats.event("dropped", s)
            with self._lock:
                self._ours.discard(s)
                held = s in self._on_disk
                self._on_disk.discard(s)
            if held:
                self._slots.release()


def _uninterrupted(wait: Callable[[], None]) -> KeyboardInterrupt | None:
    """Call ``wait`` until it returns; an interrupt meanwhile is returned, not raised."""
    pending = None
    while True:
        try:
            wait()
            return pending
        except KeyboardInterrupt as exc:
            pending = exc


class Journal:
    """Dataset-relative paths fetched by ``--drop`` mode and not dropped yet (one per line).

    Kept in the NSD subdataset's git directory (never part of the dataset), so a run killed before
    it could drop its inputs leaves a note that the next ``--drop`` run acts on.
    """

    def __init__(self, nsd_ds: Path) -> None:
        self.path = dataset.git_dir(nsd_ds) / JOURNAL_NAME
        self._lock = threading.Lock()

    def read(self) -> list[str]:
        """The paths noted, in the order they were fetched."""
        with self._lock:
            return self._read()

    def _read(self) -> list[str]:
        if not self.path.exists():
            return []
        return [line for line in self.path.read_text().splitlines() if line]

    def add(self, rel: str) -> None:
        """Note that ``rel`` was fetched (before the download starts)."""
        with self._lock:
            entries = self._read()
            if rel not in entries:
                self._write([*entries, rel])

    def remove(self, *rels: str) -> None:
        """Forget ``rels`` (dropped again)."""
        with self._lock:
            entries = [e for e in self._read() if e not in rels]
            self._write(entries)

    def _write(self, entries: list[str]) -> None:
        if not entries:
            self.path.unlink(missing_ok=True)
            return
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(f"{e}\n" for e in entries))
