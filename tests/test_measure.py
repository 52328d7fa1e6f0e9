"""A command's peak memory is its own, however large the process that started it."""

from __future__ import annotations

import os
import subprocess
import sys

from nsdprep.testing.measure import run_measured

BIG = 400 * 2**20


def test_peak_of_a_child_is_not_its_parents() -> None:
    ballast = bytearray(os.urandom(1024)) * (BIG // 1024)  # resident: written, not just reserved
    allocate = "import sys; b = bytearray(100 * 2**20); b[::4096] = b'x' * len(b[::4096])"
    small = run_measured([sys.executable, "-c", "pass"])
    child = run_measured([sys.executable, "-c", allocate])
    assert small.returncode == 0 and child.returncode == 0
    assert small.peak_bytes < 60 * 2**20, small
    assert 100 * 2**20 < child.peak_bytes < 180 * 2**20, child
    # what a plain wait4 reports for the same small child: this process's peak, carried over exec
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    _, _, usage = os.wait4(proc.pid, 0)
    assert usage.ru_maxrss * 1024 > BIG
    assert len(ballast) == BIG


def test_exit_code_and_output_are_the_commands() -> None:
    run = run_measured(
        [sys.executable, "-c", "import sys; print('out'); sys.exit(3)"], capture=True
    )
    assert (run.returncode, run.stdout) == (3, "out\n")
    killed = run_measured([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), 9)"])
    assert killed.returncode == 128 + 9
