"""Shared fixtures: isolated git identity/HOME, one seeded synthetic dataset, a loopback mirror.

Synthetic data is generated once per test session (small default layout, see ``nsdprep.testing.synth``)
and served read-only; tests that need to modify data copy it first.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nsdprep.core.nsd import Layout

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# Subprocesses (stage CLIs) import the package from this checkout, as the Makefile arranges.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(REPO_ROOT / "code"), *filter(None, [os.environ.get("PYTHONPATH")])]
)

# `make test &` from a script (a background job of a non-interactive shell) starts with SIGINT
# *ignored*, and every child inherits that: make, datalad, the stages and `nsdprep serve` would then
# ignore the SIGINT some tests send them, and those tests fail only in the background. A handled
# signal is reset to its default in an exec'd child, so installing Python's own handler here gives
# every child the SIGINT it would have in the foreground.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

#: Small synthetic layout used throughout the tests (documented in nsdprep.testing.synth).
RUNS_PER_SESSION = 4
TRIALS_PER_RUN = (8, 7)


@pytest.fixture(scope="session")
def git_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment with a throw-away HOME, a git identity and the venv's tools on PATH.

    Also sets it for this process so datalad/git-annex calls made in-process see it; the
    loopback address is allowed for git-annex in the isolated global git config only.
    """
    home = tmp_path_factory.mktemp("home")
    env = {
        "HOME": str(home),
        "GIT_AUTHOR_NAME": "nsdprep tests",
        "GIT_AUTHOR_EMAIL": "tests@nsdprep.invalid",
        "GIT_COMMITTER_NAME": "nsdprep tests",
        "GIT_COMMITTER_EMAIL": "tests@nsdprep.invalid",
        "GIT_CONFIG_NOSYSTEM": "1",
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(REPO_ROOT / "code"),
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
    }
    os.environ.update(env)
    for key, value in [
        ("user.name", "nsdprep tests"),
        ("user.email", "tests@nsdprep.invalid"),
        ("annex.security.allowed-ip-addresses", "127.0.0.1"),
        ("init.defaultBranch", "main"),
        ("protocol.file.allow", "always"),
    ]:
        subprocess.run(["git", "config", "--global", key, value], check=True, env={**os.environ})
    return dict(os.environ)


def git_out(ds: Path, *args: str) -> str:
    """The output of ``git -C ds args...`` (raises on failure)."""
    return subprocess.run(
        ["git", "-C", str(ds), *args], check=True, capture_output=True, text=True
    ).stdout


@pytest.fixture(scope="session")
def env(git_env) -> dict[str, str]:
    """``git_env`` for make targets: the loopback mirror allowed, the venv's tools first on PATH."""
    from nsdprep.testing.demo import loopback_env

    out = loopback_env(git_env)
    out["PATH"] = f"{VENV_BIN}{os.pathsep}{out['PATH']}"
    return out


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One seeded synthetic NSD + COCO tree (``nsd/`` bucket layout, ``coco/``), made once."""
    from nsdprep.testing.synth import SynthSpec, make_synthetic

    out = tmp_path_factory.mktemp("synth")
    make_synthetic(out, SynthSpec(seed=0, layout=Layout(RUNS_PER_SESSION, TRIALS_PER_RUN)))
    return out


@pytest.fixture(scope="session")
def mirror(synth_root: Path):
    """The synthetic tree served on 127.0.0.1 like the real bucket (see ``nsdprep.testing.serve``)."""
    from nsdprep.testing.serve import Mirror

    with Mirror(synth_root) as m:
        yield m


@pytest.fixture
def synth_copy(synth_root: Path, tmp_path: Path) -> Path:
    """A private, modifiable copy of the synthetic tree."""
    dst = tmp_path / "synth"
    shutil.copytree(synth_root, dst)
    return dst


@pytest.fixture(scope="session")
def demo_built(git_env, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo, once per session: a plain ``git clone`` of this checkout (working-tree code laid
    over it), the whole pipeline on synthetic data, published to a RIA store and cloned from there
    by a colleague with their own HOME (``<workdir>/colleague``, facts in ``<workdir>/share.json``).
    """
    from nsdprep.testing.demo import TEST_SPEC, build_demo

    work = tmp_path_factory.mktemp("e2e")
    venv = Path(sys.executable).parent.parent
    return build_demo(work, venv, REPO_ROOT, TEST_SPEC, overlay=True, env=git_env, share=True)


def register_as_before_etags(ds: Path, rels: list[str]) -> None:
    """Turn files of ``ds``'s ``inputs/nsd`` into what ``make inputs`` registered before it recorded
    ETags: a VURL key (URL and size only) and no ETag in the table, committed in the subdataset and
    the superdataset. For tests of datasets registered that way (a damaged first download gets
    recorded, and ``make repair`` is the way out)."""
    import csv

    nsd = ds / "inputs/nsd"
    table = nsd / ".nsdprep/addurls.csv"
    with table.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        if row["filename"] not in rels:
            continue
        rel, url = row["filename"], row["url"]
        vurl = f"VURL-s{row['size']}--{url}"
        git_out(nsd, "rm", "-q", "--cached", "--", rel)
        (nsd / rel).unlink()
        git_out(nsd, "annex", "fromkey", "--force", vurl, rel)
        git_out(nsd, "annex", "registerurl", vurl, url)
        row["etag"] = row["annex_key"] = ""
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    git_out(nsd, "add", "--", ".nsdprep/addurls.csv", *rels)
    git_out(nsd, "commit", "-q", "-m", "as registered before ETags were recorded")
    git_out(ds, "add", "inputs/nsd")
    git_out(ds, "commit", "-q", "-m", "inputs/nsd as registered before ETags were recorded")


#: The test files that use the shared end-to-end dataset (``demo_built``): one worker runs them all.
DEMO_FILES = frozenset(
    p.name for p in Path(__file__).parent.glob("test_*.py") if "demo_built" in p.read_text()
)


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Under ``make test`` (pytest-xdist): each test file runs on one worker, so its module fixtures
    are built once, and the files sharing the end-to-end dataset run on the same worker, so it is
    built once too."""
    from xdist.scheduler import LoadFileScheduling

    class FilesAndDemo(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "demo_built" if Path(path).name in DEMO_FILES else path

    return FilesAndDemo(config, log)
