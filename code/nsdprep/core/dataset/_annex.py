"""git-annex: initialisation, transfer settings, keys and their content."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

from nsdprep.core.dataset._repo import annex, annex_json, git, git_dir
from nsdprep.core.errors import DatasetStateError

log = logging.getLogger(__package__)  # one logger for the whole adapter: nsdprep.core.dataset

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


# ------------------------------------------------------------------------------------------------
# one download that can be stopped (the parallel streams of ``make 3mm DROP=1``)

#: Seconds a stopped ``git annex get`` has to exit after SIGTERM before it is killed.
STOP_GRACE_SECONDS = 10.0


def get_file(
    repo: str | Path,
    rel: str,
    *,
    cancel: threading.Event | None = None,
    hint_403: str = "",
) -> bool:
    """``git annex get rel`` in ``repo`` as one transfer that ``cancel`` can stop.

    Returns True once the content is present, False if ``cancel`` was set first: the transfer is
    then stopped (SIGTERM, then SIGKILL after :data:`STOP_GRACE_SECONDS`) and its partial download
    stays in ``.git/annex/tmp`` (see :func:`discard_partial`). git-annex verifies the content as for
    any ``get`` (``annex.verify``: against the checksum recorded for the key, or, at a VURL key's
    first download, recording it) with the repository's retry and stall settings (else those of
    :data:`TRANSFER_SETTINGS`); a failure raises
    :class:`~nsdprep.core.errors.RemoteError` naming the file and its URL(s), one line per file.
    Each call is its own git-annex process, so several run at once (git-annex locks its own state).
    """
    from nsdprep.core.dataset._datalad import check_results, web_urls

    repo = Path(repo)
    if cancel is not None and cancel.is_set():
        return False
    # the retry and stall settings, where the repository has none of its own (as datalad does)
    defaults = [
        item
        for key, value in TRANSFER_SETTINGS.items()
        if not git(repo, "config", "--get", key, check=False).strip()
        for item in ("-c", f"{key}={value}")
    ]
    cmd = ["git", "-C", str(repo), *defaults, "annex", "get", "--json", "--json-error-messages"]
    proc = subprocess.Popen(
        [*cmd, "--", rel],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while True:
            try:
                out, err = proc.communicate(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                if cancel is not None and cancel.is_set():
                    _stop(proc)
                    return False
    except BaseException:  # interrupted (Ctrl-C in this thread): no orphaned transfer
        _stop(proc)
        raise
    if proc.returncode != 0 and cancel is not None and cancel.is_set():
        return False  # stopped from outside while it was being stopped here
    failed = []
    for line in out.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not rec.get("success", True):
            text = " / ".join(m.strip() for m in rec.get("error-messages", []) if m.strip())
            failed.append(text or "failed")
    path = str(repo / rel)
    if proc.returncode != 0 and not failed:
        failed.append(" / ".join(ln.strip() for ln in err.splitlines() if ln.strip()) or "failed")
    if failed:
        record = {"status": "error", "type": "file", "path": path, "message": " / ".join(failed)}
        check_results(
            [record], "git annex get", remote=True, hint_403=hint_403, urls=web_urls([path])
        )
    return True


def _stop(proc: subprocess.Popen[str]) -> None:
    """Stop a running git-annex (its partial download stays where git-annex resumes it)."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.communicate(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


def partial_downloads(repo: str | Path, rels: Sequence[str]) -> dict[str, Path]:
    """``{rel: path}``: where git-annex keeps a partial download of each annexed file ``rels``.

    ``.git/annex/tmp/<key file name>`` (the key escaped as in the object store; the file exists
    only while a download is under way or was interrupted).
    """
    if not rels:
        return {}
    records, _ = annex_json(repo, "find", "--include=*", "--", *rels)
    keys = {rec["file"]: rec["key"] for rec in records if rec.get("file") and rec.get("key")}
    if not keys:
        return {}
    order = list(keys)
    proc = subprocess.run(
        ["git", "-C", str(repo), "annex", "examinekey", "--batch", "--format=${objectpath}\\n"],
        input="".join(f"{keys[r]}\n" for r in order),
        capture_output=True,
        text=True,
    )
    paths = proc.stdout.splitlines()
    if proc.returncode != 0 or len(paths) != len(order):
        raise DatasetStateError(
            f"`git annex examinekey` failed in {repo}: {proc.stderr.strip() or 'unexpected output'}"
        )
    tmp = git_dir(repo) / "annex" / "tmp"
    return {rel: tmp / Path(objpath).name for rel, objpath in zip(order, paths, strict=True)}


def discard_partial(path: Path) -> int:
    """Remove the partial download ``path`` (from :func:`partial_downloads`); the bytes freed.

    Only for a download no git-annex process is working on any more (a stopped or failed one).
    """
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        return 0
    log.info("removed the partial download %s (%d bytes)", path.name, size)
    return size
