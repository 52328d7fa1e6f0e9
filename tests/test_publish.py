"""``make publish`` goes where it says: one store for the dataset and its input subdatasets.

A small dataset stands in for the built one: a superdataset with ``inputs/nsd`` and ``inputs/coco``
subdatasets and one annexed derivative. Each test works on its own copy and its own stores. The
printed clone command is run as printed, by a colleague with their own HOME.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import git_out

pytestmark = pytest.mark.datalad

PUBLISH = [sys.executable, "-m", "nsdprep", "publish"]
SUBS = ("inputs/nsd", "inputs/coco")


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def template(git_env, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved superdataset with two input subdatasets and one annexed derivative, made once."""
    ds = tmp_path_factory.mktemp("publish-template") / "ds"
    env = dict(git_env)
    for cmd in (
        ["datalad", "create", str(ds)],
        ["datalad", "create", "-d", str(ds), str(ds / "inputs/nsd")],
        ["datalad", "create", "-d", str(ds), str(ds / "inputs/coco")],
    ):
        subprocess.run(cmd, check=True, env=env, capture_output=True)
    (ds / "derivatives").mkdir()
    (ds / "derivatives/result.bin").write_bytes(os.urandom(50_000))
    subprocess.run(
        ["datalad", "save", "-d", str(ds), "-m", "a derivative"],
        check=True, env=env, capture_output=True,
    )  # fmt: skip
    return ds


@pytest.fixture
def ds(template: Path, tmp_path: Path) -> Path:
    """A private copy of the template dataset."""
    dst = tmp_path / "ds"
    shutil.copytree(template, dst, symlinks=True)
    return dst


def ria(path: Path) -> str:
    return f"ria+file://{path}"


def publish_cli(
    ds: Path, url: str, env: dict[str, str], *extra: str
) -> subprocess.CompletedProcess[str]:
    """``nsdprep publish`` as ``make publish`` calls it."""
    return _run([*PUBLISH, "--ria", url, "--dataset", str(ds), *extra], ds, env)


def errors(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """The lines the command itself printed as its error (not DataLad's log lines)."""
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("nsdprep publish:")]


def remotes(ds: Path) -> dict[str, str]:
    """``{name: url}`` of the git remotes and enabled special remotes of every dataset under ``ds``."""
    found = {}
    for rel in (".", *SUBS):
        out = subprocess.run(
            ["git", "-C", str(ds / rel), "config", "--get-regexp", r"^remote\..*\.(url|annex-uuid)$"],
            capture_output=True, text=True,
        ).stdout  # fmt: skip
        found.update({f"{rel}:{ln.split()[0]}": ln.split()[1] for ln in out.splitlines()})
    return found


def push_super_only(ds: Path, store: Path, env: dict[str, str]) -> None:
    """Publish only the superdataset to ``store`` (a state older versions could leave behind)."""
    for cmd in (
        [
            "datalad", "create-sibling-ria", "-d", str(ds), "-s", "ria", "--new-store-ok",
            "--alias", "nsdprep", ria(store),
        ],
        ["datalad", "push", "-d", str(ds), "--to", "ria"],
    ):  # fmt: skip
        subprocess.run(cmd, check=True, env=env, capture_output=True)


def colleague_env(tmp_path: Path, git_env: dict[str, str]) -> dict[str, str]:
    """A colleague: own HOME, own identity, no configuration of ours."""
    home = tmp_path / "colleague-home"
    home.mkdir()
    env = {k: v for k, v in git_env.items() if not k.startswith(("GIT_AUTHOR_", "GIT_COMMITTER_"))}
    env["HOME"] = str(home)
    for key, value in (("user.name", "colleague"), ("user.email", "colleague@nsdprep.invalid")):
        subprocess.run(["git", "config", "--global", key, value], check=True, env=env)
    return env


def clone_as_printed(
    proc: subprocess.CompletedProcess[str], tmp_path: Path, git_env: dict[str, str]
) -> Path:
    """Run the ``datalad clone`` line ``proc`` printed, then get the derivative and the inputs."""
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(ln.strip() for ln in proc.stdout.splitlines() if "datalad clone" in ln)
    cmd = shlex.split(line)
    assert cmd[:2] == ["datalad", "clone"], line
    where = tmp_path / "colleague"
    where.mkdir()
    env = colleague_env(tmp_path, git_env)
    done = _run(cmd, where, env)
    assert done.returncode == 0, f"{line}: {done.stderr[-1500:]}"
    mate = where / cmd[-1]
    got = _run(["datalad", "get", "derivatives/result.bin"], mate, env)
    assert got.returncode == 0, got.stderr[-1500:]
    for sub in SUBS:
        got = _run(["datalad", "get", "-n", sub], mate, env)
        assert got.returncode == 0, got.stderr[-1500:]
    return mate


def assert_same_content(mate: Path, ds: Path) -> None:
    assert (mate / "derivatives/result.bin").read_bytes() == (
        ds / "derivatives/result.bin"
    ).read_bytes()
    for sub in SUBS:
        assert git_out(mate / sub, "rev-parse", "HEAD") == git_out(ds / sub, "rev-parse", "HEAD")


# -- where it goes --------------------------------------------------------------------------------
def test_fresh_publish_printed_clone_command_works(ds: Path, tmp_path: Path, git_env) -> None:
    store = tmp_path / "store"
    proc = publish_cli(ds, ria(store), git_env)
    mate = clone_as_printed(proc, tmp_path, git_env)
    assert_same_content(mate, ds)
    for sub in SUBS:  # found in the one store, by dataset ID
        assert git_out(mate / sub, "config", "remote.origin.url").startswith(str(store))
        # history only: no storage sibling for content that stays at its web URLs
        storage = _run(
            ["git", "config", "--get-regexp", r"^remote\.ria-storage\."], ds / sub, git_env
        )
        assert storage.stdout == "", storage.stdout


@pytest.mark.slow
def test_mixed_state_subdatasets_follow_the_superdataset(ds: Path, tmp_path: Path, git_env) -> None:
    store = tmp_path / "store"
    push_super_only(ds, store, git_env)
    proc = publish_cli(ds, ria(store), git_env)
    mate = clone_as_printed(proc, tmp_path, git_env)
    assert_same_content(mate, ds)
    for sub in SUBS:
        assert git_out(ds / sub, "config", "remote.ria.url").startswith(str(store))
        assert git_out(mate / sub, "config", "remote.origin.url").startswith(str(store))


def test_another_store_is_refused_naming_the_sibling_store(
    ds: Path, tmp_path: Path, git_env
) -> None:
    first, other = tmp_path / "store", tmp_path / "other"
    assert publish_cli(ds, ria(first), git_env).returncode == 0
    before = remotes(ds)
    proc = publish_cli(ds, ria(other), git_env)
    assert proc.returncode == 2, proc.stdout
    (line,) = errors(proc)
    assert ria(first) in line and "RIA_SIBLING=" in line, line
    assert not other.exists()
    assert remotes(ds) == before


def test_mixed_state_another_store_is_refused_before_anything(
    ds: Path, tmp_path: Path, git_env
) -> None:
    first, other = tmp_path / "store", tmp_path / "other"
    push_super_only(ds, first, git_env)
    before = remotes(ds)
    proc = publish_cli(ds, ria(other), git_env)
    assert proc.returncode == 2, proc.stdout
    (line,) = errors(proc)
    assert ria(first) in line and "RIA_SIBLING=" in line, line
    assert not other.exists()  # neither the subdatasets nor the superdataset went there
    assert remotes(ds) == before


@pytest.mark.slow
def test_another_sibling_name_publishes_there_too(ds: Path, tmp_path: Path, git_env) -> None:
    first, other = tmp_path / "store", tmp_path / "other"
    assert publish_cli(ds, ria(first), git_env).returncode == 0
    proc = publish_cli(ds, ria(other), git_env, "--ria-sibling", "other")
    mate = clone_as_printed(proc, tmp_path, git_env)
    assert_same_content(mate, ds)
    assert git_out(ds, "config", "remote.ria.url").startswith(str(first))


@pytest.mark.slow
def test_reconfigure_moves_everything_to_the_new_store(ds: Path, tmp_path: Path, git_env) -> None:
    from nsdprep.drive import publish

    first, other = tmp_path / "store", tmp_path / "other"
    assert publish_cli(ds, ria(first), git_env).returncode == 0
    url = publish.publish(ds, ria(other), reconfigure=True)
    assert url == f"{ria(other)}#~nsdprep"
    for rel in (".", *SUBS):
        assert git_out(ds / rel, "config", "remote.ria.url").startswith(str(other)), rel
    # the derivative's content is in the new store, not only recorded as being in the old one
    objects = [p for p in other.rglob("*") if p.is_file() and "/annex/objects/" in p.as_posix()]
    assert objects, sorted(p.relative_to(other).as_posix() for p in other.rglob("*"))
    shutil.rmtree(first)  # nothing is fetched from the old store any more
    fake = subprocess.CompletedProcess([], 0, f"  datalad clone '{url}' nsd-decoding\n", "")
    assert_same_content(clone_as_printed(fake, tmp_path, git_env), ds)


@pytest.mark.slow
def test_store_wiped_since_last_publish_is_recreated(ds: Path, tmp_path: Path, git_env) -> None:
    store = tmp_path / "store"
    assert publish_cli(ds, ria(store), git_env).returncode == 0
    shutil.rmtree(store)
    proc = publish_cli(ds, ria(store), git_env)
    assert errors(proc) == [], errors(proc)
    assert_same_content(clone_as_printed(proc, tmp_path, git_env), ds)


def test_alias_of_another_dataset_is_refused(ds: Path, tmp_path: Path, git_env) -> None:
    store = tmp_path / "store"
    other_ds = tmp_path / "unrelated"
    subprocess.run(
        ["datalad", "create", str(other_ds)], check=True, env=git_env, capture_output=True
    )
    push_super_only(other_ds, store, git_env)  # takes the alias "nsdprep" in the store
    proc = publish_cli(ds, ria(store), git_env)
    assert proc.returncode == 2, proc.stdout
    (line,) = errors(proc)
    assert "nsdprep" in line and "ALIAS=" in line, line
    assert git_out(ds, "remote").strip() == ""
    assert {p.name for p in store.iterdir() if p.is_dir()} == {
        git_out(other_ds, "config", "-f", ".datalad/config", "datalad.dataset.id")[:3],
        "alias",
        "error_logs",
    }


# -- stores that cannot be made -------------------------------------------------------------------
def _read_only(folder: Path, cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run ``cmd`` with ``folder`` read-only: a permission for users, a read-only mount for root."""
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            return _run(cmd, folder.parent, env)
        finally:
            folder.chmod(0o755)
    if not shutil.which("unshare"):
        pytest.skip("root needs `unshare` to make a read-only mount")
    script = f"mount -t tmpfs -o ro tmpfs {shlex.quote(str(folder))} && exec {shlex.join(cmd)}"
    probe = _run(["unshare", "-m", "--propagation", "private", "true"], folder.parent, env)
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace here: {probe.stderr.strip()}")
    return _run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script], folder.parent, env
    )


@pytest.mark.parametrize("published", [False, True], ids=["fresh", "published"])
@pytest.mark.parametrize("fault", ["parent-is-a-file", "read-only-parent"])
def test_store_that_cannot_be_created_is_refused_leaving_nothing(
    ds: Path, tmp_path: Path, git_env, fault: str, published: bool
) -> None:
    if published:
        assert publish_cli(ds, ria(tmp_path / "store"), git_env).returncode == 0
    before = remotes(ds)
    annex_log = git_out(ds, "show", "git-annex:remote.log") if published else ""
    parent = tmp_path / "parent"
    store = parent / "store"
    cmd = [*PUBLISH, "--ria", ria(store), "--dataset", str(ds)]
    if fault == "parent-is-a-file":
        parent.write_text("not a folder\n")
        proc = _run(cmd, ds, git_env)
        assert parent.read_text() == "not a folder\n"
    else:
        proc = _read_only(parent, cmd, git_env)
        assert list(parent.iterdir()) == []
    assert proc.returncode == 2, proc.stdout
    (line,) = errors(proc)
    assert str(parent) in line and "store" in line, line
    assert "clone" not in line  # the dataset is fine; the store's place is not
    assert remotes(ds) == before
    if published:
        assert git_out(ds, "show", "git-annex:remote.log") == annex_log


def test_uncreatable_store_with_reconfigure_changes_nothing(
    ds: Path, tmp_path: Path, git_env
) -> None:
    from nsdprep.core.errors import NsdPrepError
    from nsdprep.drive import publish

    assert publish_cli(ds, ria(tmp_path / "store"), git_env).returncode == 0
    before = remotes(ds)
    (tmp_path / "afile").write_text("")
    with pytest.raises(NsdPrepError, match="afile"):
        publish.publish(ds, ria(tmp_path / "afile/store"), reconfigure=True)
    assert remotes(ds) == before


# -- interrupts -----------------------------------------------------------------------------------
def test_interrupt_inside_datalad_is_an_interrupt_not_its_error_text(
    ds: Path, tmp_path: Path, git_env, monkeypatch, capsys
) -> None:
    """A child killed by the Ctrl-C leaves its traceback in a failed result; that is no error."""
    import datalad.api

    from nsdprep import cli

    def push(**kwargs):
        try:
            signal.raise_signal(signal.SIGINT)  # the terminal's Ctrl-C reaches us too
        except KeyboardInterrupt:
            pass  # ...but a library in between caught it and carried on
        return [
            {
                "action": "publish",
                "status": "error",
                "path": kwargs["dataset"],
                "type": "dataset",
                "message": 'Traceback (most recent call last):\n  File "ora_remote.py", line '
                "12, in <module>\nKeyboardInterrupt",
            }
        ]

    monkeypatch.setattr(datalad.api, "push", push)
    code = cli.main(["publish", "--ria", ria(tmp_path / "store"), "--dataset", str(ds)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("nsdprep publish:")]
    assert code == 130, err[-1500:]
    assert len(lines) == 1 and "interrupted" in lines[0], lines
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


@pytest.mark.slow
def test_ctrl_c_during_publish_one_line_then_resumes(ds: Path, tmp_path: Path, git_env) -> None:
    """SIGINT to the whole process group (what the terminal sends) while the content is pushed."""
    (ds / "derivatives/big.bin").write_bytes(os.urandom(64 * 1024 * 1024))
    subprocess.run(
        ["datalad", "save", "-d", str(ds), "-m", "big"],
        check=True,
        env=git_env,
        capture_output=True,
    )
    store = tmp_path / "store"
    proc = subprocess.Popen(
        [*PUBLISH, "--ria", ria(store), "--dataset", str(ds)],
        cwd=ds, env=git_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    seen: list[str] = []
    started = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            seen.append(line)
            if "derivatives' content" in line:
                started.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert started.wait(180), "".join(seen)[-2000:]
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(120)
    reader.join()
    ours = [ln for ln in seen if ln.startswith("nsdprep publish:")]
    assert proc.returncode == 130, "".join(seen)[-2000:]
    assert len(ours) == 1 and "interrupted" in ours[0], ours
    assert not any("Traceback" in ln or "Error:" in ln for ln in ours), ours
    again = publish_cli(ds, ria(store), git_env)
    assert_same_content(clone_as_printed(again, tmp_path, git_env), ds)
