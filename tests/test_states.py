"""Every make target in every wrong state: one clear line naming the fix, exit 2, never a traceback.

A new user's dataset can be in many states: nothing registered yet, registered but nothing fetched,
a derivative missing, a wrong or misspelt option, a read-only folder, git without an identity. Four
base datasets are built once (a fresh ``git clone`` of the project; + ``make inputs``; + ``make
coco-labels``; + ``make 3mm``); each state is a base plus options, an environment or a read-only
mount. For every (target, state) the expected result is written down in :func:`expected`:

- a refusal: ``make`` exits 2, the output has exactly one error line (``nsdprep ...: error: ...`` or
  make's ``*** ...``) matching the expected fix, no "Traceback", and the dataset is untouched
  (same ``HEAD``, clean ``git status``). These run in ``make test``.
- success: the state is not wrong for that target (it makes what is missing, or it does not use
  the option). These run the target for real in a private copy and are marked ``slow``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO_ROOT, git_out
from nsdprep.core.nsd import Layout
from nsdprep.testing.demo import DemoSpec, user_clone
from nsdprep.testing.serve import Mirror
from nsdprep.testing.synth import make_synthetic

pytestmark = pytest.mark.datalad

VENV = Path(sys.executable).parent.parent
SPEC = DemoSpec(sessions=(2, 1), layout=Layout(2, (4, 3)))
#: Every make target that acts on the dataset (help, venv, demo, test*, lint, format and bench do not).
TARGETS = (
    "inputs", "get", "drop", "3mm", "coco-labels", "curated", "decode", "all", "rerun", "publish",
    "repair",
)  # fmt: skip
#: Targets that run ``nsdprep build`` with the common options (SUBJECTS, JOBS, LABELS, ...).
BUILD = ("get", "drop", "3mm", "coco-labels", "curated", "decode", "all", "repair")


@dataclass(frozen=True)
class State:
    """A wrong state: a base dataset plus make options, an environment change or a read-only mount."""

    name: str
    base: str
    args: tuple[str, ...] = ()
    no_identity: bool = False
    readonly: bool = False


STATES = (
    State("no inputs", "fresh"),
    State("no content", "registered"),
    State("no 3mm", "labels"),
    State("no labels", "resampled"),
    State("SUBJECTS=09", "labels", ("SUBJECTS=09",)),
    State("SUBJECTS=abc", "labels", ("SUBJECTS=abc",)),
    State("JOBS=0", "labels", ("JOBS=0",)),
    State("LABELS=foo", "labels", ("LABELS=foo",)),
    State("unknown option", "labels", ("SUBJETCS=01",)),
    State("read-only folder", "labels", readonly=True),
    State("no git identity", "labels", no_identity=True),
)

RERUN_FIX = r"is not a `datalad run` record.*git log --oneline --grep='DATALAD RUNCMD'"


def expected(state: State, target: str) -> str | None:
    """The regular expression the one error line must match, or None if ``target`` must succeed."""
    name = state.name
    # Option values are checked before any target runs, the same way for every target.
    if name == "unknown option":
        return (
            r"\*\*\* SUBJETCS is not an option \(did you mean SUBJECTS\?\); `make help` lists them"
        )
    if name == "SUBJECTS=abc":
        return r"\*\*\* SUBJECTS='abc' is not allowed: SUBJECTS takes subject numbers 1\.\.99"
    if name == "JOBS=0":
        return r"\*\*\* JOBS='0' is not allowed: JOBS takes a whole number >= 1"
    if name == "LABELS=foo":
        return r"\*\*\* LABELS='foo' is not allowed: LABELS takes one of default, legacy, crop"
    if name == "read-only folder":
        return r"is read-only .*Work in a writable clone \(`datalad clone"
    if name == "no git identity":
        return r"git has no identity.*git config --global user\.name"
    if name == "no inputs":
        if target in (
            "inputs",
            "publish",
        ):  # the fix itself; publishing an empty dataset is allowed
            return None
        return RERUN_FIX if target == "rerun" else r"not registered\. Run `make inputs` first"
    if name in ("no content", "no 3mm", "no labels"):
        if target == "curated":
            fix = "make coco-labels" if name == "no labels" else "make 3mm SUBJECTS=01"
            return rf"its input derivatives/\S+ has not been made yet; run `{fix}` first"
        if target == "decode":
            return r"its input derivatives/curated_3mm/sub-01\* has not been made yet; run `make curated"
        return RERUN_FIX if (target == "rerun" and name == "no content") else None
    if target in ("rerun", "publish"):  # they take none of these options
        return None
    if name == "SUBJECTS=09":
        if target == "inputs":
            return r"no betas_sessionNN\.nii\.gz found under \S+subj09/.* for subj09"
        if target == "coco-labels":  # labels are made for every NSD image, whatever SUBJECTS says
            return None
        return r"subject\(s\) subj09 have no betas registered in \S+; registered: subj01, subj02"
    raise ValueError(f"no expectation for {state} x {target}")


CASES = [(s, t) for s in STATES for t in TARGETS]
REFUSED_CASES = [(s, t) for s, t in CASES if expected(s, t) is not None]
REFUSED = [pytest.param(s, t, id=f"{t}-{s.name}") for s, t in REFUSED_CASES]
ALLOWED = [
    pytest.param(s, t, id=f"{t}-{s.name}", marks=pytest.mark.slow)
    for s, t in CASES
    if expected(s, t) is None
]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mirror]:
    root = tmp_path_factory.mktemp("states-synth")
    make_synthetic(root, SPEC.synth_spec())
    with Mirror(root) as mirror:
        yield mirror


def make_cmd(ds: Path, target: str, *args: str) -> list[str]:
    return ["make", "--no-print-directory", "-C", str(ds), target, f"VENV={VENV}",
            *SPEC.make_vars(), *args]  # fmt: skip


def run_make(ds: Path, env: dict[str, str], target: str, *args: str) -> tuple[int, str]:
    proc = subprocess.run(
        make_cmd(ds, target, *args), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return proc.returncode, proc.stdout


def _urls(mirror: Mirror) -> tuple[str, str]:
    return (
        f"NSD_URL={mirror.url}/nsd",
        f"COCO_URL={mirror.url}/coco/annotations/annotations_trainval2017.zip",
    )


@pytest.fixture(scope="module")
def bases(
    env: dict[str, str], served: Mirror, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """The four base datasets, built once: fresh, registered, labels, resampled."""
    root = tmp_path_factory.mktemp("states")
    fresh = user_clone(REPO_ROOT, root / "fresh", env, overlay=True)
    os.utime(fresh / "requirements.txt", (0, 0))  # the venv is current: no pip run
    out = {"fresh": fresh}
    for name, parent, target, args in (
        ("registered", "fresh", "inputs", _urls(served)),
        ("labels", "registered", "coco-labels", ()),
        ("resampled", "registered", "3mm", ()),
    ):
        ds = copy_dataset(out[parent], root / name)
        rc, text = run_make(ds, env, target, *args)
        assert rc == 0, text
        out[name] = ds
    return out


def copy_dataset(src: Path, dst: Path) -> Path:
    """A byte-for-byte copy of a dataset (subdatasets and annexed content included)."""
    shutil.copytree(src, dst, symlinks=True)
    return dst


@contextlib.contextmanager
def read_only(ds: Path) -> Iterator[None]:
    """Make ``ds`` read-only: a read-only bind mount as root (root ignores permissions), else chmod."""
    if os.geteuid() != 0:
        subprocess.run(["chmod", "-R", "a-w", str(ds)], check=True)
        try:
            yield
        finally:
            subprocess.run(["chmod", "-R", "u+w", str(ds)], check=True)
        return
    mounted = subprocess.run(["mount", "--bind", str(ds), str(ds)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount as root here: {mounted.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ds)], check=True, capture_output=True)
        yield
    finally:
        subprocess.run(["umount", str(ds)], check=True)


def state_env(state: State, env: dict[str, str], home: Path) -> dict[str, str]:
    """The environment of a state (no identity: no GIT_AUTHOR_*/COMMITTER_*, an empty HOME)."""
    if not state.no_identity:
        return env
    home.mkdir(exist_ok=True)
    drop = ("GIT_AUTHOR_", "GIT_COMMITTER_", "EMAIL")
    out = {k: v for k, v in env.items() if not k.startswith(drop)}
    out["HOME"] = str(home)
    return out


def target_args(state: State, target: str, workdir: Path) -> tuple[str, ...]:
    """Options of one case: the state's, plus a store for publish and the URLs for inputs."""
    args = state.args
    if target == "publish":
        args += (f"RIA=ria+file://{workdir / 'store'}",)
    return args


@pytest.fixture(scope="module")
def state_datasets(
    bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Path]]:
    """One copy of its base per state, shared by that state's refused cases (they change nothing)."""
    root = tmp_path_factory.mktemp("state-copies")
    out: dict[str, Path] = {}
    with contextlib.ExitStack() as stack:
        for i, state in enumerate(STATES):
            ds = copy_dataset(bases[state.base], root / f"s{i}")
            if state.readonly:
                stack.enter_context(read_only(ds))
            out[state.name] = ds
        yield out


def error_lines(text: str) -> list[str]:
    """The error lines a user reads (make's own "*** [Makefile:N: target] Error 2" trailer excluded)."""
    lines = []
    for line in text.splitlines():
        if re.match(r"^make(\[\d+\])?: \*\*\* \[", line):
            continue
        if re.search(r"^nsdprep( [a-z-]+)?: (error|internal error):|\*\*\* ", line):
            lines.append(line)
    return lines


@dataclass(frozen=True)
class Outcome:
    """What one refused case printed and did: exit code, output, HEAD and status before/after."""

    rc: int
    text: str
    before: tuple[str, str]
    after: tuple[str, str]


@pytest.fixture(scope="module")
def refused(
    state_datasets: dict[str, Path],
    served: Mirror,
    env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[tuple[str, str], Outcome]:
    """Every refused case, run once: the states in parallel, each state's targets one by one.

    (Two targets at once in one dataset would meet the dataset's lock instead of their error.)
    """
    work = tmp_path_factory.mktemp("refused")

    def snapshot(ds: Path) -> tuple[str, str]:
        return git_out(ds, "rev-parse", "HEAD"), git_out(ds, "status", "--porcelain")

    def run_state(state: State) -> dict[tuple[str, str], Outcome]:
        ds, out = state_datasets[state.name], {}
        for case_state, target in REFUSED_CASES:
            if case_state != state:
                continue
            case_dir = work / f"{STATES.index(state)}-{target}"
            case_dir.mkdir()
            args = target_args(state, target, case_dir)
            if target == "inputs":
                args += _urls(served)
            before = snapshot(ds)
            rc, text = run_make(ds, state_env(state, env, case_dir / "home"), target, *args)
            out[(state.name, target)] = Outcome(rc, text, before, snapshot(ds))
        return out

    results: dict[tuple[str, str], Outcome] = {}
    with ThreadPoolExecutor(max_workers=4) as pool:
        for part in pool.map(run_state, STATES):
            results.update(part)
    return results


@pytest.mark.parametrize(("state", "target"), REFUSED)
def test_refused_with_one_line(
    state: State, target: str, refused: dict[tuple[str, str], Outcome]
) -> None:
    got = refused[(state.name, target)]
    assert got.rc == 2, got.text
    assert "Traceback" not in got.text, got.text
    lines = error_lines(got.text)
    assert len(lines) == 1, got.text
    assert re.search(expected(state, target), lines[0]), got.text
    assert got.after == got.before  # refused before anything was recorded: same HEAD and status


@pytest.mark.parametrize(("state", "target"), ALLOWED)
def test_allowed_succeeds(
    state: State,
    target: str,
    bases: dict[str, Path],
    served: Mirror,
    env: dict[str, str],
    tmp_path: Path,
) -> None:
    ds = copy_dataset(bases[state.base], tmp_path / "ds")
    args = target_args(state, target, tmp_path)
    if target == "inputs":
        args += _urls(served)
    rc, text = run_make(ds, env, target, *args)
    assert rc == 0, text
    assert "Traceback" not in text, text
    assert git_out(ds, "status", "--porcelain") == ""


def test_matrix_covers_every_target_and_state() -> None:
    """The table is complete: every target x state has an expectation (121 cases)."""
    assert len(CASES) == len(TARGETS) * len(STATES) == len(REFUSED) + len(ALLOWED)
    assert len(REFUSED) > len(ALLOWED)
