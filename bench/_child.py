"""Run a benchmark script's own ``--child`` mode in a fresh process.

Each measurement runs in its own interpreter so that its peak RSS (``wait4``'s ``ru_maxrss``) is its
own; the child prints its result as JSON on standard output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence


def run_child(
    script: str, args: Sequence[str], env: Mapping[str, str] | None = None
) -> tuple[dict, float]:
    """Run ``python script --child args...``; return its JSON result and its peak RSS in MB."""
    proc = subprocess.Popen(
        [sys.executable, script, "--child", *args], stdout=subprocess.PIPE, env=env
    )
    out = proc.stdout.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"benchmark child {' '.join(args)} failed ({code})")
    return json.loads(out), usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux
