"""Ctrl-C and SIGTERM: one way to stop, whatever is running when they arrive.

:func:`install` makes SIGINT and SIGTERM raise :class:`KeyboardInterrupt` once; later signals are
noted and ignored, so the clean-up they started (temporaries removed, fetched content dropped,
unrecorded outputs restored) is not itself interrupted. :func:`received` tells the command line
that whatever error came out was caused by the signal, so it reports the interrupt, never the
child's exception text. :func:`stop` ends a child and everything it started, and waits for all
of it to end.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from types import FrameType

_received: list[int] = []


class Interrupted(KeyboardInterrupt):
    """An interrupt with what was done about it: ``detail`` ("nothing recorded; removed ...")."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail)
        self.detail = detail


def install() -> dict[int, object]:
    """SIGINT and SIGTERM raise :class:`KeyboardInterrupt` in the main thread, the first time.

    Signals noted by an earlier command in this process are forgotten, and this process adopts
    its orphaned descendants from now on (:func:`adopt_orphans`, for :func:`stop`). Returns the
    handlers it replaced, for :func:`restore`.
    """
    _received.clear()
    adopt_orphans()
    return {sig: signal.signal(sig, _handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def restore(previous: dict[int, object]) -> None:
    """Put back the handlers :func:`install` replaced (a command run inside a longer process)."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)  # type: ignore[arg-type]


def _handler(signum: int, _frame: FrameType | None) -> None:
    first = not _received
    _received.append(signum)
    if first:
        raise KeyboardInterrupt(signal.Signals(signum).name)


def received() -> str:
    """The name of the first signal received (``"SIGINT"``), or ``""``."""
    return signal.Signals(_received[0]).name if _received else ""


def stop(proc: subprocess.Popen, grace: float = 5.0, patience: float = 120.0) -> None:
    """End ``proc`` and everything it started after an interrupt, letting them clean up first.

    Returns only once all of them have ended, so that nothing the caller cleans up next is still
    being written. After SIGINT, which Ctrl-C in a terminal sends to the whole process group,
    they may be cleaning up already: if ``proc`` ends within ``grace`` seconds, the rest are
    waited for. Otherwise (only this process was signalled, or the signal was SIGTERM, whose
    second copy changes nothing for a process that got the first) they get SIGTERM at once, so
    that no more work is done and recorded. Either way, whatever is left after ``patience``
    seconds is killed. A descendant whose parent ended first is still waited for, once
    :func:`install` has made this process adopt such orphans.
    """
    import psutil

    family = _descendants(proc.pid)
    signalled_too = False
    if received() != "SIGTERM":
        try:
            proc.wait(timeout=grace)
            signalled_too = True
        except subprocess.TimeoutExpired:
            pass
    if not signalled_too:
        for p in family + _descendants(proc.pid):
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
    _outlast(proc.pid, patience, "kill")
    proc.wait()


def settle(grace: float = 5.0, patience: float = 30.0) -> None:
    """After an interrupt, leave no process behind; the command line calls it before it exits.

    Waits ``grace`` seconds for every descendant of this process (adopted orphans included) to
    end by itself, then SIGTERMs the rest, waits up to ``patience`` seconds, and kills what is left.
    """
    _outlast(-1, grace, "terminate")
    _outlast(-1, patience, "kill")


def _outlast(own: int, seconds: float, end: str) -> None:
    """Wait up to ``seconds`` for the descendants to end, then ``end`` the rest.

    ``end`` is ``"terminate"`` or ``"kill"``; ``own`` as in :func:`_descendants`.
    """
    import psutil

    deadline = time.monotonic() + seconds
    while _descendants(own) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in _descendants(own):
        with contextlib.suppress(psutil.NoSuchProcess):
            getattr(p, end)()


def adopt_orphans() -> None:
    """Become the parent of descendants whose own parent ends (Linux' child subreaper).

    So a stage still cleaning up after ``datalad run`` exited can be waited for. Elsewhere a no-op.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


_PR_SET_CHILD_SUBREAPER = 36


def _descendants(own: int) -> list:
    """The living descendants of this process; adopted orphans that have ended are reaped.

    ``own`` (a child that ``subprocess`` waits for itself) is left to it.
    """
    import psutil

    living = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                living.append(p)
            elif p.pid != own and p.ppid() == os.getpid():
                os.waitpid(p.pid, os.WNOHANG)
        except (psutil.NoSuchProcess, ChildProcessError):
            continue
    return living
