"""DataLad: get, drop, save, run, rerun, and one checker that turns failed results into our errors."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nsdprep.core import signals
from nsdprep.core.dataset._repo import annex_json
from nsdprep.core.errors import NsdPrepError, RemoteError

#: datalad.api keyword arguments: plain result records, no rendering, failures checked by us.
QUIET: dict[str, Any] = dict(
    result_renderer="disabled", on_failure="ignore", return_type="list", result_xfm=None
)


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
        # "403" as a status, not inside a number (a loopback port such as :40377 in a URL)
        if re.search(r"(?<![\d:])403(?!\d)|Forbidden|AccessDenied", message):
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


def get(
    ds: str | Path,
    paths: Sequence[str | Path],
    *,
    hint_403: str = "",
    check: bool = True,
    jobs: int = 1,
) -> list[dict[str, Any]]:
    """``datalad get`` ``paths`` of dataset ``ds`` (a failed download is a :class:`RemoteError`).

    The error names each failing file with the URL(s) it was fetched from. ``check=False``
    returns the result records unchecked (see :func:`check_get_results`). ``jobs`` > 1 downloads
    that many files at once (``datalad get -J``, i.e. git-annex's own parallel transfers, started
    in the order of the files).
    """
    import datalad.api as dl

    more = {"jobs": jobs} if jobs > 1 else {}
    results = dl.get(path=[os.path.abspath(p) for p in paths], dataset=str(ds), **more, **QUIET)
    if check:
        check_get_results(results, hint_403=hint_403)
    return results


def check_get_results(results: Sequence[dict[str, Any]], *, hint_403: str = "") -> None:
    """:func:`check_results` for ``datalad get`` results, naming the URLs of failing files."""
    failed = [
        str(r["path"])
        for r in results
        if r.get("status") in ("error", "impossible") and r.get("type") == "file" and "path" in r
    ]
    urls = web_urls(failed[:10]) if failed else {}
    check_results(results, "datalad get", remote=True, hint_403=hint_403, urls=urls)


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
    proc = subprocess.Popen(cmd, cwd=ds)
    try:
        return proc.wait() == 0
    except KeyboardInterrupt:
        signals.stop(proc)  # the command cleans up (or is ended) before anything else happens
        raise


def rerun(ds: str | Path, revision: str) -> bool:
    """``datalad rerun revision`` in ``ds`` (output on the terminal); True if it succeeded."""
    return subprocess.run(["datalad", "rerun", revision], cwd=ds).returncode == 0
