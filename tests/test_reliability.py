"""Faults a user meets, seen through ``make`` in temporary clones: what they read, what is left on disk.

One small dataset is built once (``make inputs`` + ``make coco-labels`` against a loopback mirror of
synthetic data); every test works in its own ``datalad clone`` of it, as a collaborator would, and drives
``make`` as a subprocess. Each test checks both the message and the state afterwards: files, ``git status``,
``HEAD``, no ``*.part`` temporaries.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from nsdprep.demo import DemoLayout, build_demo, loopback_env
from nsdprep.serve import Mirror

VENV = Path(sys.executable).parent.parent
#: Smallest layout the stages accept: 2 subjects (2 and 1 sessions), 2 runs of 4/3 trials.
LAYOUT = DemoLayout(sessions=(2, 1), runs_per_session=2, trials_per_run=(4, 3))
BETAS = "inputs/nsd/nsddata_betas/ppdata/subj{s:02d}/MNI/betas_fithrf/betas_session{n:02d}.nii.gz"
pytestmark = pytest.mark.datalad


def _git(ds: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(ds), *args], check=True, capture_output=True, text=True
    ).stdout


def _status(ds: Path) -> str:
    return _git(ds, "status", "--porcelain", "--untracked-files=all")


def _head(ds: Path) -> str:
    return _git(ds, "rev-parse", "HEAD").strip()


def _parts(ds: Path) -> list[Path]:
    return sorted(p for p in (ds / "derivatives").rglob("*.part"))


@pytest.fixture(scope="module")
def env(git_env) -> dict[str, str]:
    out = loopback_env(git_env)
    out["PATH"] = f"{VENV / 'bin'}{os.pathsep}{out['PATH']}"
    return out


@pytest.fixture(scope="module")
def origin(env, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared dataset: inputs registered, coco-labels made, no betas content fetched."""
    work = tmp_path_factory.mktemp("reliability")
    return build_demo(work, VENV, LAYOUT, targets=("coco-labels",), overlay=True, env=env)


@pytest.fixture(scope="module")
def served(origin: Path) -> Iterator[Mirror]:
    """The mirror again, on the port the inputs were registered with (their URLs name it)."""
    url = _git(origin / "inputs/nsd", "annex", "whereis", "--json", "--", _key(1, 1))
    port = int(re.search(r"http://127\.0\.0\.1:(\d+)/nsd/", url).group(1))
    with Mirror(origin.parent / "synth", port=port) as mirror:
        yield mirror


def _key(subject: int, session: int) -> str:
    return BETAS.format(s=subject, n=session).removeprefix("inputs/nsd/")


@pytest.fixture
def clone(origin: Path, served: Mirror, env, tmp_path: Path) -> Path:
    """A collaborator's clone of the shared dataset, subdatasets installed (content not fetched)."""
    return _clone(origin, tmp_path / "clone", env)


def _clone(origin: Path, dest: Path, env) -> Path:
    subprocess.run(["datalad", "clone", str(origin), str(dest)], check=True, env=env,
                   capture_output=True)  # fmt: skip
    subprocess.run(["datalad", "get", "-n", "inputs/nsd", "inputs/coco"], check=True, env=env,
                   cwd=dest, capture_output=True)  # fmt: skip
    _skip_pip(dest)
    return dest


def _skip_pip(ds: Path) -> None:
    """A fresh checkout's requirements.txt is newer than the venv stamp; the venv is current."""
    os.utime(ds / "requirements.txt", (0, 0))


def _make_cmd(ds: Path, *args: str) -> list[str]:
    return ["make", "--no-print-directory", "-C", str(ds), *args, f"VENV={VENV}",
            *LAYOUT.make_vars(), "JOBS=2"]  # fmt: skip


def make(ds: Path, env, *args: str) -> tuple[int, str]:
    """Run make like a user; return (exit code, everything printed)."""
    proc = subprocess.run(
        _make_cmd(ds, *args), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    return proc.returncode, proc.stdout


@contextlib.contextmanager
def popen_make(ds: Path, env, log: Path, *args: str) -> Iterator[subprocess.Popen]:
    """Start make in its own process group (so the whole tree can be signalled)."""
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            _make_cmd(ds, *args), env=env, stdout=fh, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            yield proc
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGCONT)
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _readable(path: Path) -> bool:
    try:
        img = nib.load(path)
        np.asarray(img.dataobj)
    except Exception:
        return False
    return True


# ------------------------------------------------------------------------------------------------
# 1. interrupted run


def test_interrupted_3mm_recovers_to_identical_outputs(
    origin: Path, clone: Path, env, tmp_path: Path
) -> None:
    head = _head(clone)
    out = clone / "derivatives/3mm"
    seen: list[str] = []
    with popen_make(clone, env, tmp_path / "make.log", "3mm", "SUBJECTS=01") as proc:
        while proc.poll() is None:
            if out.is_dir():
                seen = [p.name for p in out.rglob("*") if p.is_file()]
                if seen:
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
            time.sleep(0.002)
        rc = proc.wait()
    assert seen, f"make 3mm finished before any output appeared (rc {rc})"
    assert rc != 0
    # killed before datalad recorded anything
    assert _head(clone) == head
    # nothing unreadable under a final name; only the step's own leftovers are uncommitted
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    finals = [out / p for p in left if not p.endswith(".part")]
    assert all(_readable(p) for p in finals), left
    leftovers = _status(clone).splitlines()
    assert all(line.startswith("?? derivatives/3mm/subj01/") for line in leftovers), leftovers
    print(f"after SIGKILL: files {left}; git status {leftovers}")

    rc, text = make(clone, env, "3mm", "SUBJECTS=01")
    assert rc == 0, text
    if left:
        assert "leftover(s) of an interrupted or failed run" in text, text
    assert _status(clone) == ""
    assert not _parts(clone)
    assert _git(clone, "log", "-1", "--format=%s").startswith(
        "[DATALAD RUNCMD] [nsdprep] 3mm subj01"
    )
    got = _git(clone, "ls-files", "-s", "derivatives/3mm")

    # an uninterrupted run in another clone gives the same annex keys (MD5E: identical bytes)
    other = _clone(origin, tmp_path / "other", env)
    rc, text = make(other, env, "3mm", "SUBJECTS=01")
    assert rc == 0, text
    assert _git(other, "ls-files", "-s", "derivatives/3mm") == got
    assert got.count("betas_session") == LAYOUT.sessions[0]
