"""Ctrl-C and SIGTERM: one way to stop, whatever is running when they arrive.

:func:`install` makes SIGINT and SIGTERM raise :class:`KeyboardInterrupt` once; later signals are
noted and ignored, so the clean-up they started (temporaries removed, fetched content dropped,
unrecorded outputs restored) is not itself interrupted. :func:`received` tells the command line
that whatever error came out was caused by the signal, so it reports the interrupt, never the
child's exception text. :func:`stop` ends a child process and everything it started.
"""

from __future__ import annotations

import signal
import subprocess
from types import FrameType

_received: list[int] = []


class Interrupted(KeyboardInterrupt):
    """An interrupt with what was done about it: ``detail`` ("nothing recorded; removed ...")."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail)
        self.detail = detail


def install() -> dict[int, object]:
    """SIGINT and SIGTERM raise :class:`KeyboardInterrupt` in the main thread, the first time.

    Signals noted by an earlier command in this process are forgotten. Returns the handlers it
    replaced, for :func:`restore`.
    """
    _received.clear()
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
    """End ``proc`` and its descendants after an interrupt, letting them clean up first.

    After SIGINT, which Ctrl-C in a terminal sends to the whole process group, they may be
    cleaning up already: wait ``grace`` seconds for ``proc`` to end by itself. Otherwise (only
    this process was signalled, or the signal was SIGTERM, whose second copy changes nothing for
    a process that got the first) send them SIGTERM at once, so that no more work is done and
    recorded, wait ``patience`` seconds for their clean-up, then kill.
    """
    import psutil

    if received() != "SIGTERM":
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            pass
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=patience)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
