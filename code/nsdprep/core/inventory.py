"""What is registered in ``inputs/nsd``: subjects and sessions, read from git, content present or not.

Registered files are the ones tracked in the subdataset's git tree (annexed symlinks); their content may
be absent (not yet ``datalad get``). Sessions are always returned sorted numerically.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from nsdprep.core import dataset, nsd
from nsdprep.core.errors import DatasetStateError


def registered_keys(nsd_ds: str | Path, prefix: str = nsd.BETAS_ROOT_KEY) -> list[str]:
    """Return the tracked file paths under ``prefix`` in the NSD subdataset (bucket key layout)."""
    nsd_ds = Path(nsd_ds)
    if not dataset.is_installed(nsd_ds):
        raise DatasetStateError(
            f"{nsd_ds} is not an installed dataset: expected the NSD subdataset there. "
            "Run `make inputs` (or `datalad get -n inputs/nsd` in a clone)."
        )
    return dataset.ls_files(nsd_ds, prefix)


def registered_sessions(nsd_ds: str | Path, subject: int, kind: str = "betas") -> list[int]:
    """Sessions (1-based, sorted numerically) of ``subject`` whose ``kind`` file is registered."""
    sessions = set()
    for key in registered_keys(nsd_ds, nsd.subject_dir_key(subject) + "/"):
        parsed = nsd.parse_betas_key(key)
        if parsed is not None and parsed[0] == kind and parsed[1] == subject:
            sessions.add(parsed[2])
    return sorted(sessions)


def registered_subjects(nsd_ds: str | Path) -> list[int]:
    """Subjects (1-based, sorted) with at least one registered betas file."""
    subjects = set()
    for key in registered_keys(nsd_ds):
        parsed = nsd.parse_betas_key(key)
        if parsed is not None and parsed[0] == "betas":
            subjects.add(parsed[1])
    return sorted(subjects)


def select_subjects(nsd_ds: str | Path, subjects: Iterable[int] | None) -> list[int]:
    """Check requested subjects against the registered ones; ``None``/empty means all registered."""
    available = registered_subjects(nsd_ds)
    if not available:
        raise DatasetStateError(
            f"no betas registered in {nsd_ds}; run `make inputs` first (see `make help`)."
        )
    if not subjects:
        return available
    wanted = sorted(set(int(s) for s in subjects))
    missing = [s for s in wanted if s not in available]
    if missing:
        raise DatasetStateError(
            f"subject(s) {', '.join(nsd.subject_label(s) for s in missing)} have no betas "
            f"registered in {nsd_ds}; registered: "
            f"{', '.join(nsd.subject_label(s) for s in available)}."
        )
    return wanted


def registered_rois(nsd_ds: str | Path, subject: int) -> list[str]:
    """Names (sorted) of the MNI ROI volumes registered for ``subject`` (``nsdgeneral``, ...)."""
    names = set()
    for key in registered_keys(nsd_ds, nsd.roi_dir_key(subject) + "/"):
        parsed = nsd.parse_roi_key(key)
        if parsed is not None and parsed[0] == subject:
            names.add(parsed[1])
    return sorted(names)
