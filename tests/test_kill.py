"""A kill at any moment: SIGKILL every saving target at random times, and during DataLad's save.

For each saving target (``inputs`` during addurls, ``coco-labels``, ``3mm``, ``curated``, ``decode``)
an uninterrupted run in a copy of its starting dataset gives the reference keys and the duration D.
Then, in fresh copies, the target is killed (its whole session: make, datalad, git, git-annex, the
stage's workers) at 10 offsets drawn from a seeded RNG in (0, D), and once more as soon as a save
(``git annex add``/``git commit``) is seen running; a run that ends before its kill (faster than
the reference one) is repeated with half the offset. After each kill the same ``make`` target runs
again and must succeed, end with the same keys as the reference, a clean ``git status``, and clean
``git fsck`` and ``git annex fsck --fast`` in the dataset and its input subdatasets.

Slow (about a minute per target and more on a busy machine): ``make test-slow``.
"""

from __future__ import annotations

import difflib
import gzip
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, git_out
from nsdprep.core.nsd import Layout
from nsdprep.testing.demo import DemoSpec, user_clone
from nsdprep.testing.serve import Mirror
from nsdprep.testing.synth import make_synthetic

pytestmark = [pytest.mark.slow, pytest.mark.datalad]

VENV = Path(sys.executable).parent.parent
SPEC = DemoSpec(sessions=(2, 1), layout=Layout(2, (4, 3)))
#: The kill offsets' seed; another one (``NSDPREP_KILL_SEED=...``) tries other moments.
SEED = os.environ.get("NSDPREP_KILL_SEED", "20261127")
N_RANDOM = 10
#: target -> (starting dataset, paths whose keys must match the reference)
TARGETS = {
    "inputs": ("fresh", ("inputs/nsd", "inputs/coco")),
    "coco-labels": ("registered", ("derivatives/coco", "derivatives/coco_categories.pkl")),
    "3mm": ("registered", ("derivatives/3mm",)),
    "curated": ("labelled", ("derivatives/curated_3mm",)),
    "decode": ("curated", ("derivatives/decoding",)),
}
SUBS = ("inputs/nsd", "inputs/coco")
#: Files that differ between any two uninterrupted runs by design: a new subdataset's random
#: DataLad id (docs/determinism.md).
NOT_REPRODUCIBLE = (".datalad/config",)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("kill-synth")
    make_synthetic(root, SPEC.synth_spec())
    with Mirror(root) as mirror:
        yield mirror


def make_cmd(ds: Path, target: str, mirror: Mirror) -> list[str]:
    cmd = ["make", "--no-print-directory", "-C", str(ds), target, f"VENV={VENV}",
           *SPEC.make_vars()]  # fmt: skip
    if target == "inputs":
        cmd += [
            f"NSD_URL={mirror.url}/nsd",
            f"COCO_URL={mirror.url}/coco/annotations/annotations_trainval2017.zip",
        ]
    return cmd


def run_make(ds: Path, target: str, env, mirror: Mirror) -> tuple[int, str, float]:
    t0 = time.monotonic()
    proc = subprocess.run(
        make_cmd(ds, target, mirror), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    return proc.returncode, proc.stdout, time.monotonic() - t0


@pytest.fixture(scope="module")
def starts(env, served: Mirror, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The starting datasets: fresh clone, + inputs, + 3mm and labels, + curated."""
    root = tmp_path_factory.mktemp("kill-starts")
    fresh = user_clone(REPO_ROOT, root / "fresh", env, overlay=True)
    os.utime(fresh / "requirements.txt", (0, 0))
    out = {"fresh": fresh}
    for name, parent, targets in (
        ("registered", "fresh", ("inputs",)),
        ("labelled", "registered", ("3mm", "coco-labels")),
        ("curated", "labelled", ("curated",)),
    ):
        ds = copy(out[parent], root / name)
        for target in targets:
            rc, text, _ = run_make(ds, target, env, served)
            assert rc == 0, text
        out[name] = ds
    return out


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def keys(ds: Path, paths: tuple[str, ...]) -> str:
    """The git/annex identity of ``paths``: ``ls-files -s`` (annexed files: their key)."""
    out = []
    for rel in paths:
        repo, inner = (ds / rel, ".") if rel in SUBS else (ds, rel)
        listing = git_out(repo, "ls-files", "-s", "--", inner).splitlines()
        kept = [x for x in listing if not x.endswith(tuple("\t" + n for n in NOT_REPRODUCIBLE))]
        out.append(f"# {rel}\n" + "".join(x + "\n" for x in kept))
    return "".join(out)


def compare_content(ref: Path, ds: Path, expected: str, got: str) -> str:
    """For each file whose key differs: do the bytes differ only in their gzip coding, or in data?"""
    out = []
    for line in sorted(set(got.splitlines()) - set(expected.splitlines())):
        if "\t" not in line:
            continue
        rel = line.split("\t", 1)[1]
        try:
            a, b = (ref / rel).read_bytes(), (ds / rel).read_bytes()
        except OSError as exc:
            out.append(f"{rel}: content not readable ({exc})")
            continue
        if rel.endswith(".gz"):
            a, b = gzip.decompress(a), gzip.decompress(b)
            what = "decompressed"
        else:
            what = "raw"
        first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        out.append(
            f"{rel}: {what} sizes {len(a)} / {len(b)}, "
            + ("identical" if a == b else f"first difference at byte {first}")
        )
    return "\n" + "\n".join(out)


def session_pids(sid: int) -> list[int]:
    """Processes of session ``sid`` (make started with ``start_new_session``)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid:
            found.append(int(entry.name))
    return found


def kill_session(sid: int) -> None:
    for _ in range(5):
        pids = session_pids(sid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def saving(sid: int) -> bool:
    """True while a process of the session adds to the annex or commits (DataLad's save)."""
    for pid in session_pids(sid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = {w.rsplit(b"/", 1)[-1] for w in argv}
        if b"commit" in words or (words & {b"annex", b"git-annex"} and b"add" in words):
            return True
    return False


def kill_run(ds: Path, target: str, env, mirror: Mirror, offset: float | None) -> str:
    """Start ``make target``; SIGKILL its session after ``offset`` s (None: once it saves)."""
    proc = subprocess.Popen(
        make_cmd(ds, target, mirror), env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    t0 = time.monotonic()
    when = "finished first"
    try:
        while proc.poll() is None:
            now = time.monotonic() - t0
            if (offset is not None and now >= offset) or (offset is None and saving(proc.pid)):
                when = f"killed at {now:.2f} s"
                kill_session(proc.pid)
                break
            time.sleep(0.002 if offset is None else 0.01)
    finally:
        kill_session(proc.pid)
        proc.wait()
    return when


def check_clean(ds: Path) -> None:
    for repo in (ds, *(ds / s for s in SUBS if (ds / s / ".git").exists())):
        assert git_out(repo, "status", "--porcelain") == "", repo
        git_out(repo, "fsck", "--no-progress")
        proc = subprocess.run(["git", "-C", str(repo), "annex", "fsck", "--fast", "--quiet"],
                              capture_output=True, text=True)  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("target", list(TARGETS))
def test_kill_at_any_moment_recovers(
    target: str, starts: dict[str, Path], env, served: Mirror, tmp_path: Path
) -> None:
    start, paths = TARGETS[target]
    ref = copy(starts[start], tmp_path / "reference")
    rc, text, duration = run_make(ref, target, env, served)
    assert rc == 0, text
    expected = keys(ref, paths)
    assert expected.count("\n") > len(paths)  # the target made something
    rng = random.Random(f"{SEED}-{target}")
    offsets: list[float | None] = sorted(rng.uniform(0.05, 0.9 * duration) for _ in range(N_RANDOM))
    offsets.append(None)  # during DataLad's save
    report = []
    for i, offset in enumerate(offsets):
        ds = copy(starts[start], tmp_path / f"k{i}")
        when = kill_run(ds, target, env, served, offset)
        retries = 0
        while when == "finished first" and retries < 3:
            # this run was faster than the reference one (a busy machine slows either), or its
            # save was missed: again in a fresh copy, killed earlier, so no kill point is lost
            shutil.rmtree(ds)
            ds = copy(starts[start], tmp_path / f"k{i}")
            offset, retries = (None if offset is None else offset / 2), retries + 1
            when = kill_run(ds, target, env, served, offset)
        rc, text, _ = run_make(ds, target, env, served)
        label = (
            f"{target} kill {i} ({'during save' if offset is None else f'{offset:.2f} s'}, {when})"
        )
        assert rc == 0, f"{label}: the next run failed:\n{text}"
        assert "Traceback" not in text, f"{label}:\n{text}"
        got = keys(ds, paths)
        assert got == expected, (
            f"{label}: keys differ from the uninterrupted run:\n"
            + "".join(
                difflib.unified_diff(
                    expected.splitlines(True), got.splitlines(True), "reference", "rerun"
                )
            )
            + compare_content(ref, ds, expected, got)
        )
        check_clean(ds)
        report.append(label)
        shutil.rmtree(ds, ignore_errors=True)
    killed = [r for r in report[:-1] if "killed at" in r]
    print(f"\n{target}: uninterrupted {duration:.1f} s; " + "; ".join(report))
    # a run faster than the reference one is killed earlier instead: every kill lands inside a run
    assert len(killed) == N_RANDOM, report
    assert "killed at" in report[-1], report  # the save was caught and killed
