"""Scale-out in temporary clones (FAIRly-big workflow, see :mod:`nsdprep.drive.slurm`): clone, push, merge."""

from __future__ import annotations

import contextlib
import logging
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from nsdprep.core.dataset._datalad import api_call
from nsdprep.core.dataset._repo import annex_json, git, lock
from nsdprep.core.errors import DatasetStateError

log = logging.getLogger(__package__)  # one logger for the whole adapter: nsdprep.core.dataset


def dataset_id(ds: str | Path) -> str:
    """The DataLad dataset ID of ``ds`` (from ``.datalad/config``)."""
    found = git(ds, "config", "-f", ".datalad/config", "datalad.dataset.id", check=False).strip()
    if not found:
        raise DatasetStateError(f"{ds}/.datalad/config has no datalad.dataset.id: not a dataset?")
    return found


def current_branch(ds: str | Path) -> str:
    """The branch checked out in ``ds``; raises if HEAD is detached."""
    name = git(ds, "symbolic-ref", "--short", "-q", "HEAD", check=False).strip()
    if not name:
        raise DatasetStateError(
            f"{ds} has no branch checked out (detached HEAD); `git checkout <branch>` first."
        )
    return name


def clone(source: str, dest: str | Path, branch: str | None = None) -> None:
    """``datalad clone source dest`` (e.g. ``ria+file:///store#<dataset id>``), ``branch`` checked out."""
    opts = {"git_clone_opts": ["--branch", branch]} if branch else {}
    api_call("clone", f"datalad clone {source}", remote=True, source=source, path=str(dest), **opts)


def install_subdataset(ds: str | Path, rel: str) -> None:
    """Install the subdataset ``rel`` of ``ds`` without content (``datalad get -n``)."""
    api_call(
        "get", f"datalad get -n {rel}", remote=True,
        dataset=str(ds), path=[str(Path(ds) / rel)], get_data=False,
    )  # fmt: skip


def declare_dead_here(ds: str | Path) -> None:
    """``git annex dead here``: a throw-away clone never counts as a copy of any content."""
    git(ds, "annex", "dead", "here")


def new_branch(ds: str | Path, branch: str, start: str) -> None:
    """Check out a new branch ``branch`` at commit ``start``."""
    git(ds, "checkout", "-q", "-b", branch, start)


def changed_files(ds: str | Path, base: str, rev: str = "HEAD") -> list[str]:
    """Paths that differ between ``base`` and ``rev`` (added, modified or deleted)."""
    out = git(ds, "diff", "--name-only", "-z", "--no-renames", base, rev, "--")
    return sorted(p for p in out.split("\0") if p)


def is_ancestor(ds: str | Path, commit: str, of: str) -> bool:
    """True if ``commit`` is ``of`` or one of its ancestors."""
    proc = subprocess.run(
        ["git", "-C", str(ds), "merge-base", "--is-ancestor", commit, of], capture_output=True
    )
    return proc.returncode == 0


def annexed(ds: str | Path, paths: Sequence[str]) -> list[str]:
    """Those of ``paths`` (files or folders) that are annexed in ``ds`` (content here or not)."""
    if not paths:
        return []
    out = git(ds, "annex", "find", "--include=*", "--", *paths)
    return sorted(out.splitlines())


def storage_url(ds: str | Path, remote: str) -> str | None:
    """The ``url=`` of the special remote named ``remote`` (e.g. a RIA store's ORA remote), if any.

    Read from the ``git-annex`` branch (``remote.log``), where ``git annex initremote`` keeps it.
    """
    log_text = git(ds, "show", "git-annex:remote.log", check=False)
    for line in log_text.splitlines():
        fields = dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)
        if fields.get("name") == remote and "url" in fields:
            return fields["url"]
    return None


def verify_special_remote(ds: str | Path, remote: str, expected_url: str) -> None:
    """Accept ``remote`` for writing in a fresh clone if its configuration points at ``expected_url``.

    git-annex 10.2026x refuses to write to a special remote that a clone enabled automatically
    ("Write prevented due to an unverified special remote") until ``git annex verifyremote
    <remote> --safe <id>`` is run; the ``<id>`` is printed by ``git annex verifyremote <remote>``
    together with the configuration, which is checked here first. Older git-annex has no such
    command and needs nothing.
    """
    proc = subprocess.run(
        ["git", "-C", str(ds), "annex", "verifyremote", remote],
        capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    text = proc.stdout + proc.stderr
    found = next((ln.split()[-1] for ln in text.splitlines() if f"{remote} --safe " in ln), None)
    if found is None:
        log.debug("no verification needed for %s: %s", remote, text.strip()[:200])
        return
    if f"url={expected_url}" not in text.split():
        raise DatasetStateError(
            f"the special remote {remote} of the clone {ds} does not point at the store "
            f"{expected_url}; refusing to write to it. `git annex verifyremote {remote}` says:\n{text}"
        )
    git(ds, "annex", "verifyremote", remote, "--safe", found)


def push(ds: str | Path, to: str, paths: Sequence[str] | None = None, data: str = "auto") -> None:
    """``datalad push --to <to>`` (``paths``: only those; ``data``: DataLad's ``--data`` mode)."""
    kwargs: dict[str, Any] = {"dataset": str(ds), "to": to, "data": data}
    if paths is not None:
        if not paths:
            return
        kwargs["path"] = [str(Path(ds) / p) for p in paths]
    api_call("push", f"datalad push --to {to}", remote=True, **kwargs)


def push_branch(ds: str | Path, remote: str, branch: str, lock_file: str | Path) -> None:
    """``git push remote branch`` holding an exclusive ``flock`` on ``lock_file``.

    Many array tasks push to one repository at once; git's ref locks make concurrent pushes fail,
    so they take turns (the lock file lives on the file system all nodes share).
    """
    import fcntl

    with open(lock_file, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            git(ds, "push", "-q", remote, f"refs/heads/{branch}:refs/heads/{branch}")
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fetch(ds: str | Path, remote: str) -> None:
    """``git fetch --prune remote``: the remote's branches as ``refs/remotes/<remote>/...``."""
    git(ds, "fetch", "-q", "--prune", remote)


def remote_head(ds: str | Path, remote: str, branch: str) -> str | None:
    """The commit of ``branch`` in ``remote`` right now (``git ls-remote``), None if unknown."""
    out = git(ds, "ls-remote", "--heads", remote, f"refs/heads/{branch}", check=False).split()
    return out[0] if out else None


def remote_branches(ds: str | Path, remote: str, prefix: str) -> list[str]:
    """Branch names (without ``<remote>/``) under ``prefix`` that ``remote`` had at the last fetch."""
    out = git(ds, "for-each-ref", "--format=%(refname)", f"refs/remotes/{remote}/{prefix}")
    return sorted(r.removeprefix(f"refs/remotes/{remote}/") for r in out.split())


def merge(ds: str | Path, refs: Sequence[str], message: str) -> None:
    """Merge ``refs`` into the checked-out branch in one commit (octopus merge for several).

    On a conflict the merge is aborted, leaving the branch as it was, and an error names the refs.
    """
    proc = subprocess.run(
        ["git", "-C", str(ds), "merge", "-q", "--no-ff", "--no-edit", "-m", message, *refs],
        capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode != 0:
        git(ds, "merge", "--abort", check=False)
        raise DatasetStateError(
            f"`git merge` of {', '.join(refs)} into {ds} failed and was aborted (the branch is "
            f"unchanged): {(proc.stdout + proc.stderr).strip()}"
        )


def fsck_remote(ds: str | Path, remote: str, paths: Sequence[str]) -> list[str]:
    """``git annex fsck --fast --from remote`` of ``paths``; return those the remote lacks.

    Also records in the ``git-annex`` branch where the content is (job clones never push theirs).
    """
    if not paths:
        return []
    records, proc = annex_json(ds, "fsck", "--fast", "--from", remote, "--", *paths)
    bad = sorted(r.get("file", "?") for r in records if not r.get("success", False))
    if proc.returncode != 0 and not bad:
        raise DatasetStateError(
            f"`git annex fsck --from {remote}` failed in {ds}: {proc.stderr.strip()[-500:]}"
        )
    return bad


def delete_remote_branches(ds: str | Path, remote: str, branches: Sequence[str]) -> None:
    """Delete ``branches`` in ``remote`` (after merging them) and forget them locally."""
    if branches:
        git(ds, "push", "-q", remote, "--delete", *branches)
        fetch(ds, remote)


@contextlib.contextmanager
def lock_waiting(ds: str | Path, what: str, timeout: float, poll: float = 2.0) -> Iterator[None]:
    """:func:`lock`, but wait up to ``timeout`` seconds for another holder to finish first.

    For batch jobs (the SLURM finishing job), which nobody watches: the user may be running a
    local target in the same dataset at that moment.
    """
    deadline = time.monotonic() + timeout
    with contextlib.ExitStack() as stack:
        while True:
            try:
                stack.enter_context(lock(ds, what))
                break
            except DatasetStateError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(poll)
        yield
