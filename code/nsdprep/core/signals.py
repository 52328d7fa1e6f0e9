"""Ctrl-C and SIGTERM: one way to stop, whatever is running when they arrive.

:func:`install` makes SIGINT and SIGTERM raise :class:`KeyboardInterrupt` once; later signals are
noted and ignored, so the clean-up they started (temporaries removed, fetched content dropped,
unrecorded outputs restored) is not itself interrupted. :func:`received` tells the command line
that whatever error came out was caused by the signal, so it reports the interrupt, never the
child's exception text. :func:`stop` passes the signal on to a child's process group and waits
for all of it to end.
"""

from __future__ import annotations

import os
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


def stop(proc: subprocess.Popen, patience: float = 120.0) -> None:
    """End ``proc``, started as the leader of its own process group, and everything in that group.

    The signal this process received is passed on to the group (a terminal's Ctrl-C reaches only
    the foreground group, and ``kill PID`` only one process), so each member cleans up as it would
    had it been signalled itself. Returns when the whole group has ended, so that nothing the
    caller cleans up next is still being written; members still there after ``patience`` seconds
    are killed.
    """
    import time

    sig = signal.SIGTERM if received() == "SIGTERM" else signal.SIGINT
    for current in (sig, signal.SIGKILL):
        _signal_group(proc.pid, current)
        end = time.monotonic() + (patience if current == sig else 10.0)
        while time.monotonic() < end:
            proc.poll()  # reap the leader; the others are reaped by whoever adopted them
            if not _signal_group(proc.pid, 0):
                proc.wait()
                return
            time.sleep(0.05)
    proc.wait()


def _signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to process group ``pgid`` (0: only check); False if the group is gone."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True
