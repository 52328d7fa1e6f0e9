"""Peak memory of a command, its own: not the memory of the process that started it.

Linux carries a process's peak RSS across ``exec``: a child started by a 600 MB pytest process
reports at least 600 MB as its ``ru_maxrss``, whatever it used itself. :func:`run_measured` starts
the command from a small launcher interpreter instead and reads the peak of that launcher's
children, so the figure is the command's own (plus at most the launcher's ~10 MB baseline).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_LAUNCHER = """\
import resource, subprocess, sys
code = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code if code >= 0 else 128 - code)
"""


@dataclass(frozen=True)
class Measured:
    """What :func:`run_measured` saw: exit code, wall seconds, peak bytes, captured text.

    The exit code is 128+N when signal N ended the command.
    """

    returncode: int
    seconds: float
    peak_bytes: int
    stdout: str = ""
    stderr: str = ""

    @property
    def peak_mb(self) -> float:
        """The peak in MiB."""
        return self.peak_bytes / 2**20


def run_measured(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    capture: bool = False,
) -> Measured:
    """Run ``cmd`` to its end; return its exit code, wall time and its own peak RSS.

    With ``capture``, its standard output and error too (as text).
    """
    with tempfile.TemporaryDirectory(prefix="nsdprep-measure-") as tmp:
        report = Path(tmp) / "maxrss"
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-c", _LAUNCHER, str(report), *cmd],
            env=env, cwd=cwd, capture_output=capture, text=True, check=False,
        )  # fmt: skip
        seconds = time.monotonic() - t0
        kib = int(report.read_text()) if report.exists() else 0
    # ru_maxrss is in KiB on Linux
    return Measured(proc.returncode, seconds, kib * 1024, proc.stdout or "", proc.stderr or "")
