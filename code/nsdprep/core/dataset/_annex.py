"""git-annex: initialisation, transfer settings, keys and their content."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from nsdprep.core.dataset._repo import annex, annex_json, git, git_dir
from nsdprep.core.errors import DatasetStateError

log = logging.getLogger(__package__)  # one logger for the whole adapter: nsdprep.core.dataset

#: git-annex transfer settings of the input subdatasets (see docs/troubleshooting.md, "A flaky network"):
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


# -- equivalent keys, metadata and failed downloads of keys --------------------------------------
def object_names(repo: str | Path, keys: Sequence[str]) -> dict[str, tuple[str, str]]:
    """``{key: (hashdirlower, object file name)}`` of ``keys`` (one ``examinekey --batch``)."""
    if not keys:
        return {}
    proc = subprocess.run(
        ["git", "-C", str(repo), "annex", "examinekey", "--batch", "--json"],
        input="".join(f"{k}\n" for k in keys), capture_output=True, text=True,
    )  # fmt: skip
    found = {}
    for line in proc.stdout.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "key" in rec and "objectpath" in rec:
            found[rec["key"]] = (rec.get("hashdirlower", ""), Path(rec["objectpath"]).name)
    missing = [k for k in keys if k not in found]
    if missing:
        raise DatasetStateError(
            f"`git annex examinekey` gave no answer for {missing[0]} in {repo}: "
            f"{proc.stderr.strip()[-300:]}"
        )
    return found


def _ek_log(names: tuple[str, str]) -> str:
    """Path, in the ``git-annex`` branch, of the log of a key's equivalent keys."""
    return f"{names[0]}{names[1]}.log.ek"


def _presence_log(text: str) -> dict[str, tuple[float, bool]]:
    """``{value: (timestamp, present)}``: the newest line of each value of a git-annex presence log."""
    state: dict[str, tuple[float, bool]] = {}
    for line in text.splitlines():
        fields = line.split(" ", 2)
        if len(fields) != 3 or not fields[0].endswith("s") or fields[1] not in ("0", "1"):
            continue
        try:
            ts = float(fields[0][:-1])
        except ValueError:
            continue
        if fields[2] not in state or ts >= state[fields[2]][0]:
            state[fields[2]] = (ts, fields[1] == "1")
    return state


def _branch_files(repo: str | Path, rev: str, paths: Sequence[str]) -> dict[str, str]:
    """``{path: text}`` of ``paths`` in ``rev`` (one ``git cat-file --batch``; absent ones "")."""
    if not paths:
        return {}
    proc = subprocess.run(
        ["git", "-C", str(repo), "cat-file", "--batch"],
        input="".join(f"{rev}:{p}\n" for p in paths).encode(), capture_output=True, check=True,
    )  # fmt: skip
    out, pos, texts = proc.stdout, 0, {}
    for path in paths:
        end = out.index(b"\n", pos)
        header = out[pos:end].split()
        pos = end + 1
        if len(header) == 3 and header[1] == b"blob":
            size = int(header[2])
            texts[path] = out[pos : pos + size].decode("utf-8", "replace")
            pos += size + 1
        else:
            texts[path] = ""
    return texts


def commit_annex_journal(repo: str | Path) -> None:
    """Commit git-annex's pending journal into the ``git-annex`` branch (``git annex merge``)."""
    git(repo, "annex", "merge")


def equivalent_keys(repo: str | Path, keys: Sequence[str]) -> dict[str, list[str]]:
    """``{key: [checksum keys]}`` git-annex recorded for VURL ``keys`` (the first download records one).

    git-annex verifies later downloads of a VURL key against these and has no command to list them:
    they are read from their logs in the ``git-annex`` branch (presence logs, ``*.log.ek``, see
    git-annex's internals page). Call :func:`commit_annex_journal` first.
    """
    names = object_names(repo, keys)
    texts = _branch_files(repo, "refs/heads/git-annex", [_ek_log(names[k]) for k in keys])
    return {
        k: sorted(v for v, (_, on) in _presence_log(texts[_ek_log(names[k])]).items() if on)
        for k in keys
    }


def update_equivalent_keys(
    repo: str | Path, changes: dict[str, tuple[Sequence[str], Sequence[str]]]
) -> None:
    """Record and retract checksum keys of VURL keys: ``{key: (add, remove)}``, in one commit.

    git-annex records the checksum of whatever a VURL key's first download brings and has no
    command to take it back; a download found wrong afterwards must not stay the reference. One
    commit on the ``git-annex`` branch appends the lines (the newest line of a value wins in a
    presence log; git-annex merges the branch as usual); the ref is updated compare-and-swap, so a
    concurrent git-annex commit is never lost (retried instead).
    """
    changes = {k: (list(a), list(r)) for k, (a, r) in changes.items() if a or r}
    if not changes:
        return
    repo = Path(repo)
    logs = {k: _ek_log(n) for k, n in object_names(repo, list(changes)).items()}
    for _attempt in range(5):
        commit_annex_journal(repo)
        old = git(repo, "rev-parse", "--verify", "refs/heads/git-annex").strip()
        texts = _branch_files(repo, old, list(logs.values()))
        with tempfile.TemporaryDirectory(dir=git_dir(repo) / "annex") as tmp:
            env = {**os.environ, "GIT_INDEX_FILE": str(Path(tmp) / "index")}
            _git_env(repo, env, "read-tree", old)
            for key, (add, remove) in changes.items():
                text = texts[logs[key]]
                newest = max((ts for ts, _ in _presence_log(text).values()), default=0.0)
                stamp = max(int(time.time()), int(newest) + 1)
                lines = [f"{stamp}s 0 {ek}" for ek in remove] + [f"{stamp}s 1 {ek}" for ek in add]
                body = (
                    (text if not text or text.endswith("\n") else text + "\n")
                    + "\n".join(lines)
                    + "\n"
                )
                blob = _git_env(repo, env, "hash-object", "-w", "--stdin", stdin=body)
                _git_env(repo, env, "update-index", "--add", "--cacheinfo",
                         f"100644,{blob},{logs[key]}")  # fmt: skip
            tree = _git_env(repo, env, "write-tree")
        what = "; ".join(
            f"{k}: " + " ".join([*(f"-{e}" for e in r), *(f"+{e}" for e in a)])
            for k, (a, r) in changes.items()
        )
        commit = git(repo, "commit-tree", tree, "-p", old, "-m", f"equivalent keys: {what}")
        proc = subprocess.run(
            ["git", "-C", str(repo), "update-ref", "refs/heads/git-annex", commit.strip(), old],
            capture_output=True, text=True,
        )  # fmt: skip
        if proc.returncode == 0:
            return
    raise DatasetStateError(
        f"could not update the checksum records in {repo}: its git-annex branch kept changing; "
        "run again when no other git-annex command works in this dataset"
    )


def _git_env(repo: Path, env: dict[str, str], *args: str, stdin: str | None = None) -> str:
    proc = subprocess.run(
        ["git", "-C", str(repo), *args], env=env, input=stdin, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise DatasetStateError(f"`git {' '.join(args[:2])}` failed in {repo}: {proc.stderr}")
    return proc.stdout.strip()


def key_metadata(repo: str | Path, files: Sequence[str]) -> dict[str, dict[str, list[str]]]:
    """``{key: {field: [values]}}``: git-annex metadata of the keys of annexed ``files``."""
    if not files:
        return {}
    records, _ = annex_json(repo, "metadata", "--", *files)
    return {
        r["key"]: {
            k: list(v) for k, v in r.get("fields", {}).items() if not k.endswith("lastchanged")
        }
        for r in records
        if "key" in r
    }


def set_key_metadata(repo: str | Path, key: str, fields: dict[str, Sequence[str]]) -> None:
    """Set git-annex metadata fields of ``key`` (each field's values replaced; none: removed)."""
    args: list[str] = []
    for name, values in fields.items():
        if not values:
            args += ["-r", name]
            continue
        args += ["-s", f"{name}={values[0]}"]  # replaces the field's values
        args += [a for v in values[1:] for a in ("-s", f"{name}+={v}")]
    if args:
        annex(repo, "metadata", "--key", key, *args, what=key)


def failed_downloads(repo: str | Path, keys: Sequence[str]) -> dict[str, Path]:
    """``{key: file}``: complete-size downloads of ``keys`` git-annex left in ``.git/annex/tmp``.

    git-annex keeps a failed download there to resume it; one that has the key's full size
    failed its checksum verification: it must not stay, nor be resumed from.
    """
    tmp = git_dir(repo) / "annex" / "tmp"
    if not tmp.is_dir() or not keys:
        return {}
    found = {}
    for key, (_, name) in object_names(repo, keys).items():
        path, size = tmp / name, key_size(key)
        if path.is_file() and (size is None or path.stat().st_size == size):
            found[key] = path
    return found


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
