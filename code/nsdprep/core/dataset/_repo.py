"""git and git-annex plumbing: commands, status, the dataset lock, stale index locks."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from nsdprep.core.errors import DatasetStateError

log = logging.getLogger(__package__)  # one logger for the whole adapter: nsdprep.core.dataset


def git(ds: str | Path, *args: str, check: bool = True) -> str:
    """Run ``git -C ds args`` and return its standard output (``check``: raise on failure)."""
    proc = subprocess.run(["git", "-C", str(ds), *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise DatasetStateError(
            f"`git {' '.join(args)}` failed in {ds}: {proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc.stdout


def annex_json(
    repo: str | Path, *args: str
) -> tuple[list[dict[str, Any]], subprocess.CompletedProcess[str]]:
    """Run ``git annex <args> --json`` in ``repo``; return its JSON records and the process."""
    proc = subprocess.run(
        ["git", "-C", str(repo), "annex", *args[:1], "--json", *args[1:]],
        capture_output=True,
        text=True,
    )
    records = []
    for line in proc.stdout.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records, proc


def annex(repo: str | Path, *args: str, what: str = "", config: Sequence[str] = ()) -> str:
    """Run ``git [-c k=v ...] annex <args>`` in ``repo``; return stdout, raise naming ``what``."""
    cfg = [item for kv in config for item in ("-c", kv)]
    proc = subprocess.run(
        ["git", "-C", str(repo), *cfg, "annex", *args], capture_output=True, text=True
    )
    if proc.returncode != 0:
        detail = " / ".join(
            line.strip() for line in (proc.stderr + proc.stdout).splitlines() if line.strip()
        )
        raise DatasetStateError(
            f"`git annex {' '.join(args[:2])}` failed in {repo}"
            + (f" ({what})" if what else "")
            + f": {detail[-600:]}"
        )
    return proc.stdout


def is_dataset(ds: str | Path) -> bool:
    """True if ``ds`` is the root of an installed DataLad dataset."""
    ds = Path(ds)
    return (ds / ".git").exists() and (ds / ".datalad").is_dir()


def is_installed(repo: str | Path) -> bool:
    """True if ``repo`` is an installed git repository (e.g. a subdataset after ``get -n``)."""
    return (Path(repo) / ".git").exists()


def is_own_repository(repo: str | Path) -> bool:
    """True if git, run in ``repo``, works in ``repo`` itself and not in a repository above it.

    A ``.git`` that a killed ``git init`` left without its ``HEAD`` is no repository to git: it
    silently uses the enclosing one, where a reset or clean would act on the wrong dataset.
    """
    out = git(repo, "rev-parse", "--show-toplevel", check=False).strip()
    return bool(out) and Path(out).resolve() == Path(repo).resolve()


def ls_files(repo: str | Path, *paths: str, stage: bool = False) -> list[str]:
    """Tracked paths under ``paths`` in ``repo`` (``stage``: git's ``ls-files -s`` lines)."""
    if stage:
        return git(repo, "ls-files", "-s", "--", *paths).splitlines()
    return sorted(p for p in git(repo, "ls-files", "-z", "--", *paths).split("\0") if p)


def head(ds: str | Path) -> str:
    """The commit checked out in ``ds``."""
    return git(ds, "rev-parse", "HEAD").strip()


def git_dir(ds: str | Path) -> Path:
    """Absolute path of the repository's git directory."""
    return Path(git(ds, "rev-parse", "--absolute-git-dir").strip())


def dirty_paths(ds: str | Path) -> list[tuple[str, str]]:
    """``(status, path)`` of everything not committed in ``ds`` (untracked included)."""
    out = git(ds, "status", "--porcelain=v1", "-z", "--untracked-files=all")
    entries = []
    items = out.split("\0")
    i = 0
    while i < len(items):
        item = items[i]
        i += 1
        if not item:
            continue
        status, path = item[:2], item[3:]
        if status[0] in "RC":  # rename/copy: the next item is the source path
            i += 1
        entries.append((status, path))
    return entries


def restore_path(ds: str | Path, rel: str) -> None:
    """Put one tracked path back to its committed state."""
    git(ds, "checkout", "HEAD", "--", rel)


def last_commit_with_subject(ds: str | Path, text: str) -> tuple[str, str] | None:
    """``(commit, subject)`` of the newest commit whose message contains ``text``."""
    out = git(ds, "log", "-F", f"--grep={text}", "--format=%H %s", "-n", "1").strip()
    if not out:
        return None
    commit, _, subject = out.partition(" ")
    return commit, subject


@contextlib.contextmanager
def lock(ds: str | Path, what: str) -> Iterator[None]:
    """Hold the dataset's exclusive lock (fasteners, as DataLad uses), or fail at once.

    Two ``datalad run`` at once in one dataset corrupt its history, so targets never wait: the
    second one is refused with the holder's description (``what`` and its pid).
    """
    import fasteners

    path = git_dir(ds) / "nsdprep-run.lock"
    info = path.with_suffix(".holder")
    held = fasteners.InterProcessLock(str(path))
    if not held.acquire(blocking=False):
        holder = info.read_text().strip() if info.exists() else ""
        raise DatasetStateError(
            f"another nsdprep run is in progress in {ds} ({holder or 'another process'}); wait for "
            "it to finish. Two `datalad run` at once in one dataset would corrupt its history."
        )
    try:
        info.write_text(f"pid {os.getpid()}: {what}")
        yield
    finally:
        info.write_text("")
        held.release()


def require_writable(ds: str | Path) -> None:
    """Raise :class:`DatasetStateError` unless ``ds`` and its git directory can be written.

    ``os.access`` also reports a read-only mount (``EROFS``), even to root, so a read-only dataset
    is refused before anything (``git annex init``, the lock file, ``datalad run``) tries to write.
    """
    ds = Path(ds)
    for folder in (ds, ds / ".git"):
        target = folder.resolve() if folder.exists() else folder
        if target.exists() and not os.access(target, os.W_OK):
            raise DatasetStateError(
                f"the dataset folder {ds} is read-only ({target} cannot be written); every target "
                "records its outputs and history there. Work in a writable clone "
                f"(`datalad clone {ds} <folder>`) or get write access, then run again."
            )


def resolve_commit(ds: str | Path, rev: str) -> str | None:
    """The commit ``rev`` names in ``ds``, or ``None`` if it names none."""
    out = git(ds, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False).strip()
    return out or None


def is_run_record(ds: str | Path, commit: str) -> bool:
    """True if ``commit`` carries a ``datalad run`` record (what ``datalad rerun`` re-executes)."""
    return "[DATALAD RUNCMD]" in git(ds, "log", "-1", "--format=%B", commit, check=False)


def clear_stale_index_lock(ds: str | Path) -> bool:
    """Remove index locks left by a killed git or git-annex command; True if one was removed.

    ``.git/index.lock`` (git) and ``.git/annex/index.lock`` (the git-annex branch's index) make
    every later command fail while they exist. Called under the dataset's nsdprep lock, so no other
    nsdprep run owns them; a lock while a live git, git-annex or DataLad process works in the
    dataset (a user's command) is left alone and reported instead.
    """
    ds = Path(ds)
    gd = git_dir(ds)
    stale = [p for p in (gd / "index.lock", gd / "annex" / "index.lock") if p.exists()]
    if not stale:
        return False
    users = _processes_in(ds)
    if users:
        raise DatasetStateError(
            f"{stale[0]} exists and process(es) {', '.join(map(str, users[:5]))} are working in "
            f"{ds}: a git command is running there. Wait for it to finish, then run again."
        )
    for path in stale:
        log.warning("removing %s left by an interrupted git command", path)
        path.unlink(missing_ok=True)
    return True


def _processes_in(ds: Path) -> list[int]:
    """PIDs of git, git-annex or DataLad processes working inside ``ds`` (Linux ``/proc``).

    This process and its ancestors (make, the user's shell) are not counted.
    """
    mine, pid = set(), os.getpid()
    while pid > 1 and pid not in mine:
        mine.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    root, found = str(ds.resolve()), []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cwd = os.readlink(entry / "cwd")
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(entry.name) in mine or not (cwd == root or cwd.startswith(root + os.sep)):
            continue
        if any(word in b" ".join(argv[:3]) for word in (b"git", b"datalad")):
            found.append(int(entry.name))
    return found
