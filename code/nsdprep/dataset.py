"""The one adapter to git, git-annex and DataLad: every call to them goes through here.

Keeping them in one module gives one way of checking results and one place that turns their failures
into this package's errors (:mod:`nsdprep.errors`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from nsdprep.errors import DatasetStateError, NsdPrepError, RemoteError

log = logging.getLogger(__name__)

#: datalad.api keyword arguments: plain result records, no rendering, failures checked by us.
QUIET: dict[str, Any] = dict(
    result_renderer="disabled", on_failure="ignore", return_type="list", result_xfm=None
)


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


#: git-annex transfer settings of the input subdatasets (see README, "A flaky network"):
#: retry a failed download 3 times, waiting 1 s then doubling (1, 2, 4 s), each retry resuming what
#: already arrived; cancel (and so retry) a download that moves less than 1 MiB in 60 s.
TRANSFER_SETTINGS: dict[str, str] = {
    "annex.retry": "3",
    "annex.retry-delay": "1",
    "annex.stalldetection": "1MiB/60s",
}


def configure_transfers(repo: str | Path, settings: dict[str, str] | None = None) -> list[str]:
    """Set git-annex's retry and stall-detection settings in ``repo`` unless it has its own.

    Written to the repository's own ``.git/config`` (``git annex config`` cannot store these), so
    every clone sets them again (``make inputs``, ``make get`` and the targets that fetch do). A
    value the user configured (any scope) is kept. Returns the names that were set now.
    """
    changed = []
    for key, value in (settings or TRANSFER_SETTINGS).items():
        if git(repo, "config", "--get", key, check=False).strip():
            continue
        git(repo, "config", "--local", key, value)
        changed.append(key)
    if changed:
        log.info("%s: set git-annex transfer settings %s", repo, ", ".join(changed))
    return changed


#: git-annex's default ``annex.diskreserve`` (it keeps this much free when downloading).
DEFAULT_DISK_RESERVE = 100_000_000
_SIZE_UNITS = {
    "": 1, "b": 1, "byte": 1, "bytes": 1,
    "k": 1000, "kb": 1000, "kilobyte": 1000, "kilobytes": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "megabyte": 1000**2, "megabytes": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gigabyte": 1000**3, "gigabytes": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "terabyte": 1000**4, "terabytes": 1000**4, "tib": 1024**4,
}  # fmt: skip


def disk_reserve(repo: str | Path) -> int:
    """``annex.diskreserve`` of ``repo`` in bytes (git-annex's default, 100 MB, if unset/unreadable)."""
    text = git(repo, "config", "--get", "annex.diskreserve", check=False).strip().lower()
    m = re.fullmatch(r"([\d.]+)\s*([a-z]*)", text)
    if not m or m.group(2) not in _SIZE_UNITS:
        return DEFAULT_DISK_RESERVE
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


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


def lookup_key(repo: str | Path, rel: str) -> str:
    """The annex key of the file ``rel`` of ``repo`` (content present or not)."""
    return annex(repo, "lookupkey", "--", rel, what=rel).strip()


def key_size(key: str) -> int | None:
    """The size recorded in an annex key (``...-s<bytes>--...``), if it has one."""
    head = key.split("--", 1)[0]
    for field in head.split("-")[1:]:
        if field.startswith("s") and field[1:].isdigit():
            return int(field[1:])
    return None


def key_is_checksum(key: str) -> bool:
    """True for keys that carry a content checksum (MD5E, SHA256E, ...), not URL/VURL/WORM keys."""
    return not key.startswith(("URL-", "VURL-", "WORM-"))


def has_key(repo: str | Path, key: str) -> bool:
    """True if the content of ``key`` is present in ``repo`` (``git annex contentlocation``)."""
    proc = subprocess.run(
        ["git", "-C", str(repo), "annex", "contentlocation", key], capture_output=True, text=True
    )
    return proc.returncode == 0 and bool(proc.stdout.strip())


def key_urls(repo: str | Path, key: str) -> list[str]:
    """The web URLs registered for ``key`` in ``repo``."""
    records, _ = annex_json(repo, "whereis", "--key", key)
    return [u for rec in records for w in rec.get("whereis", []) for u in w.get("urls", [])]


def annex_get(repo: str | Path, rel: str, *, verify: bool = True) -> tuple[bool, str]:
    """``git annex get rel`` in ``repo`` (retry settings apply); ``(succeeded, messages)``.

    ``verify=False`` skips git-annex's check against the recorded checksum: only for a repair,
    whose caller then checks the content itself.
    """
    cfg = [] if verify else ["-c", "annex.verify=false"]
    proc = subprocess.run(
        ["git", "-C", str(repo), *cfg, "annex", "get", "--", rel], capture_output=True, text=True
    )
    text = " / ".join(ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip())
    return proc.returncode == 0, text


def drop_key(repo: str | Path, key: str) -> None:
    """Remove the local content of ``key`` (``git annex dropkey --force``), whatever it is."""
    if has_key(repo, key):
        annex(repo, "dropkey", "--force", "--", key, what=key)


def calc_key(repo: str | Path, path: str | Path, backend: str = "MD5E") -> str:
    """The ``backend`` key of the file at ``path`` (``git annex calckey``; the extension from its name)."""
    return annex(repo, "calckey", f"--backend={backend}", "--", str(path)).strip()


def rekey(repo: str | Path, rel: str, new_key: str, urls: Sequence[str]) -> None:
    """Point ``rel`` at ``new_key`` (its present content moves along) and register ``urls`` for it.

    ``git annex rekey`` is git-annex's plumbing for changing a file's key; ``registerurl`` makes the
    web remote serve the new key from the same URLs. The change is staged, not committed.
    """
    annex(repo, "rekey", "--", rel, new_key, what=rel)
    for url in urls:
        annex(repo, "registerurl", new_key, url, what=url)


def annex_initialised(ds: str | Path) -> bool:
    """True if git-annex is initialised in the repository at ``ds`` (annex UUID and version set).

    A ``git annex init`` killed half-way leaves the UUID without the version, a state git-annex
    refuses to work in; running ``git annex init`` again completes it (same UUID).
    """
    local = [git(ds, "config", "--local", "--get", k, check=False).strip() for k in
             ("annex.uuid", "annex.version")]  # fmt: skip
    return all(local)


def ensure_annex(ds: str | Path) -> bool:
    """Initialise git-annex in ``ds`` unless it is already; return True if it was done now.

    A plain ``git clone`` of the project carries no ``git-annex`` branch, so nothing initialises the
    annex; DataLad then treats the clone as a plain git dataset and ``datalad run``/``save`` commit
    every derivative into git. Every target that saves calls this first (idempotent, one
    ``git config`` call when done).
    """
    ds = Path(ds)
    if annex_initialised(ds):
        return False
    if not (ds / ".git").exists():
        raise DatasetStateError(f"{ds} is not a git repository; run from the dataset's top folder.")
    log.info("initialising git-annex in %s (once per clone)", ds)
    proc = subprocess.run(
        ["git", "-C", str(ds), "annex", "init", "--quiet"], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise DatasetStateError(
            f"`git annex init` failed in {ds}: {proc.stderr.strip() or proc.stdout.strip()}. "
            "Is git-annex installed (`make venv`) and the folder writable?"
        )
    return True


def _record_text(r: dict[str, Any]) -> str:
    """DataLad's message of one result record, on one line (repeated lines dropped)."""
    msg = r.get("message")
    if isinstance(msg, tuple):
        try:
            msg = msg[0] % msg[1:]
        except (TypeError, ValueError):
            msg = " ".join(map(str, msg))
    text = " ".join(str(x) for x in (msg, r.get("error_message")) if x)
    unique = list(dict.fromkeys(t.strip() for t in text.splitlines() if t.strip()))
    return " / ".join(unique[-3:])


def check_results(
    results: Sequence[dict[str, Any]],
    what: str,
    remote: bool = False,
    hint_403: str = "",
    urls: dict[str, list[str]] | None = None,
) -> None:
    """Raise one of our errors if any DataLad result record failed (``remote``: a download failed).

    Names up to ten failing paths with DataLad's own message (and their URLs, from ``urls``), plus
    what to do next. One failing file gives one line.
    """
    bad = [r for r in results if r.get("status") in ("error", "impossible")]
    if not bad:
        return
    files = [r for r in bad if r.get("type") == "file"] or bad
    lines: list[str] = []
    for r in files[:10]:
        path = str(r.get("path", "?"))
        where = (urls or {}).get(path)
        source = f" (from {', '.join(where)})" if where else ""
        lines.append(f"{path}{source}: {_record_text(r)}")
    more = f"\n  ... and {len(files) - 10} more" if len(files) > 10 else ""
    if len(files) == 1:
        message = f"{what} failed for {lines[0]}."
    else:
        message = f"{what} failed for {len(files)} item(s):\n  " + "\n  ".join(lines) + more + "\n"
    if remote:
        if any(s in message for s in ("403", "Forbidden", "AccessDenied")):
            message += " " + (hint_403 or "Access denied: check the URL.")
        elif "Verification of content failed" in message:
            message += (
                " The file on the server differs from the checksum recorded at its first download; "
                "nothing was kept. If that first download was the damaged one, `make repair "
                "SUBJECTS=..` fetches it again, checks it and records the good checksum."
            )
        else:
            message += (
                " Transfers were retried (annex.retry) and partial downloads resume: run it again "
                "later, and check that the URL is reachable if it keeps failing."
            )
        raise RemoteError(message)
    raise NsdPrepError(message)


def web_urls(paths: Sequence[str | Path]) -> dict[str, list[str]]:
    """``{path: [url, ...]}``: the web URLs git-annex knows for annexed ``paths`` (absolute)."""
    found: dict[str, list[str]] = {}
    for path in paths:
        path = Path(path)
        records, _ = annex_json(path.parent, "whereis", "--", path.name)
        urls = [u for rec in records for w in rec.get("whereis", []) for u in w.get("urls", [])]
        if urls:
            found[str(path)] = urls
    return found


def api_call(
    command: str, what: str, /, *, remote: bool = False, hint_403: str = "", **kwargs: Any
) -> list[dict[str, Any]]:
    """Call ``datalad.api.<command>(**kwargs)`` quietly and check its results (:func:`check_results`)."""
    import datalad.api as dl

    results = getattr(dl, command)(**kwargs, **QUIET)
    check_results(results, what, remote=remote, hint_403=hint_403)
    return results


def get(ds: str | Path, paths: Sequence[str | Path], *, hint_403: str = "") -> list[dict[str, Any]]:
    """``datalad get`` ``paths`` of dataset ``ds`` (a failed download is a :class:`RemoteError`).

    The error names each failing file with the URL(s) it was fetched from.
    """
    import datalad.api as dl

    results = dl.get(path=[os.path.abspath(p) for p in paths], dataset=str(ds), **QUIET)
    failed = [
        str(r["path"])
        for r in results
        if r.get("status") in ("error", "impossible") and r.get("type") == "file" and "path" in r
    ]
    urls = web_urls(failed[:10]) if failed else {}
    check_results(results, "datalad get", remote=True, hint_403=hint_403, urls=urls)
    return results


def drop(ds: str | Path, paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """``datalad drop`` the content of ``paths`` (still registered, fetchable again)."""
    paths = [
        os.path.abspath(p) for p in paths
    ]  # relative to the working directory (no link resolved)
    return api_call("drop", "datalad drop", path=paths, dataset=str(ds))


def save(ds: str | Path, message: str, paths: Sequence[str | Path] | None = None) -> None:
    """``datalad save`` ``paths`` (default: everything) of ``ds`` with ``message``."""
    kwargs: dict[str, Any] = {"dataset": str(ds), "message": message}
    if paths is not None:
        kwargs["path"] = [str(p) for p in paths]
    api_call("save", f"saving {ds}", **kwargs)


def run(
    ds: str | Path,
    command: Sequence[str],
    *,
    message: str,
    inputs: Sequence[str] = (),
    outputs: Sequence[str] = (),
    assume_inputs_ready: bool = False,
) -> bool:
    """``datalad run`` ``command`` in ``ds`` with its output on the terminal; True if it succeeded."""
    cmd = ["datalad", "run", "-m", message]
    for i in inputs:
        cmd += ["-i", i]
    for o in outputs:
        cmd += ["-o", o]
    if assume_inputs_ready:
        cmd += ["--assume-ready", "inputs"]
    cmd.append(shlex.join(command))
    return subprocess.run(cmd, cwd=ds).returncode == 0


def rerun(ds: str | Path, revision: str) -> bool:
    """``datalad rerun revision`` in ``ds`` (output on the terminal); True if it succeeded."""
    return subprocess.run(["datalad", "rerun", revision], cwd=ds).returncode == 0


# ------------------------------------------------------------------------------------------------
# Scale-out in temporary clones (FAIRly-big workflow, see nsdprep.slurm)


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
