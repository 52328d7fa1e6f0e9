"""The one adapter to git, git-annex and DataLad: every call to them goes through here.

Keeping them in one module gives one way of checking results and one place that turns their failures
into this package's errors (:mod:`nsdprep.errors`).
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Sequence
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


def annex_initialised(ds: str | Path) -> bool:
    """True if git-annex is initialised in the repository at ``ds`` (it has an annex UUID)."""
    return bool(git(ds, "config", "--local", "--get", "annex.uuid", check=False).strip())


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


def check_results(
    results: Sequence[dict[str, Any]], what: str, remote: bool = False, hint_403: str = ""
) -> None:
    """Raise one of our errors if any DataLad result record failed (``remote``: a download failed).

    Names up to ten failing paths with DataLad's own message, plus what to do next.
    """
    bad = [r for r in results if r.get("status") in ("error", "impossible")]
    if not bad:
        return
    files = [r for r in bad if r.get("type") == "file"] or bad
    lines: list[str] = []
    for r in files[:10]:
        msg = r.get("message")
        if isinstance(msg, tuple):
            try:
                msg = msg[0] % msg[1:]
            except (TypeError, ValueError):
                msg = " ".join(map(str, msg))
        text = " ".join(str(x) for x in (msg, r.get("error_message")) if x)
        unique = list(dict.fromkeys(t.strip() for t in text.splitlines() if t.strip()))
        lines.append(f"  {r.get('path', '?')}: {' / '.join(unique[-3:])}")
    more = f"\n  ... and {len(files) - 10} more" if len(files) > 10 else ""
    message = f"{what} failed for {len(files)} item(s):\n" + "\n".join(lines) + more
    if remote:
        if any(s in message for s in ("403", "Forbidden", "AccessDenied")):
            message += "\n" + (hint_403 or "Access denied: check the URL.")
        elif "Verification of content failed" in message:
            message += (
                "\nThe file on the server differs from the one whose checksum was recorded at its "
                "first download: nothing was kept. Check the source before using it."
            )
        else:
            message += "\nRun it again to retry (partial downloads resume)."
        raise RemoteError(message)
    raise NsdPrepError(message)
