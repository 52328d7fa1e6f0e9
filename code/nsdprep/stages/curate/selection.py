"""Which trials the curated set keeps: NSD's first N trials per subject, no "unknown" picture, equal counts.

The rules (see :mod:`nsdprep.stages.curate`) use only the registry, the experiment design and the labels, over
*all* registered subjects, before any betas are read, so a subset of subjects gives the same trials.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from nsdprep.core import inventory, nsd, tables
from nsdprep.core._io import require_content
from nsdprep.core.errors import FormatError, MissingInputError, NsdPrepError
from nsdprep.core.nsd import PERSON, TRIAL_COLUMNS, UNKNOWN, Layout
from nsdprep.stages.curate import split

#: The stim info as CSV, next to ``nsd_expdesign.mat`` in NSD's bucket.
_STIM_INFO_CSV = Path(nsd.STIM_INFO_CSV_KEY).name

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


@dataclass
class Selection:
    """Which trials every registered subject keeps, and why (all subjects, before any I/O of betas).

    ``trials`` maps subject -> trial table of the kept trials (columns ``TRIAL_COLUMNS``, trial order).
    """

    layout: nsd.Layout
    registered_sessions: dict[int, list[int]]
    n_sessions: int
    n_trials: int
    n_unknown: dict[int, int]
    n_person_dropped: dict[int, int]
    trials: dict[int, pd.DataFrame] = field(repr=False)
    #: subject -> kept trials whose supercategory differs under the default rule (crop labels only)
    n_label_changed: dict[int, int] = field(default_factory=dict)
    #: ``MAX_SESSION``: sessions 1..max_session at most (0: no cap)
    max_session: int = 0
    #: fewest sessions registered over all registered subjects (before ``max_session``)
    fewest_registered: int = 0
    #: 0-based nsdIds of the shared images (the test split), sorted
    shared: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)

    @property
    def sessions_used(self) -> tuple[int, ...]:
        """The sessions that feed the output, the same for every subject (1-based)."""
        return tuple(range(1, self.n_sessions + 1))

    @property
    def trials_per_subject(self) -> int:
        """Number of trials every subject keeps (identical across subjects)."""
        return int(next(iter(self.trials.values())).shape[0]) if self.trials else 0


def load_labels(path: str | os.PathLike[str], legacy: bool = False) -> pd.DataFrame:
    """Read a labels table from its TSV sidecar and index it by the id it is keyed on.

    ``path`` names the table (``derivatives/coco_categories.pkl``) or its sidecar; the sidecar
    (``coco_categories.tsv``, written by the same run) is read, never the pickle, which may come
    from a colleague's store and would run code when unpickled. Default table: keyed by ``nsdId``
    (0-based). Legacy table: keyed by ``id`` (1-based 73k id). Returns a frame indexed by that key
    with columns ``cocoId`` (``<NA>`` if the table has none), ``supercat``, ``cat``, and
    ``supercat_default`` when the table has it (crop labels).
    """
    path = Path(path)
    sidecar = tables.sidecar_path(path)
    target = "make coco-labels" + (" LABELS=legacy" if legacy else "")
    if not any(p.exists() or p.is_symlink() for p in (path, sidecar)):
        raise MissingInputError(f"labels table {path} is absent; run `{target}` first.")
    require_content(
        sidecar,
        "TSV copy of the labels table (read instead of the pickle, which is never unpickled)",
        f"`{target} FORCE=1` writes it next to {path.name}.",
    )
    table = tables.read_table_tsv(sidecar)
    path = sidecar  # messages below name the file read
    key = "id" if legacy else "nsdId"
    needed = [key, "supercat", "cat"]
    missing = [c for c in needed if c not in table.columns]
    if missing:
        kind = "legacy labels table (column 'id' = 1-based 73k id)" if legacy else "labels table"
        hint = "" if legacy else " (is it the legacy table? then pass --labels legacy)"
        raise FormatError(
            f"{path}: {kind} lacks column(s) {missing}; found {list(table.columns)}{hint}"
        )
    if table[key].duplicated().any():
        dup = table.loc[table[key].duplicated(), key].iloc[0]
        raise FormatError(f"{path}: column {key!r} must be unique, {dup!r} appears twice")
    coco = table["cocoId"] if "cocoId" in table.columns else pd.Series(pd.NA, index=table.index)
    out = pd.DataFrame(
        {
            "cocoId": pd.array(coco, dtype="Int64"),
            "supercat": table["supercat"].astype(str).to_numpy(),
            "cat": table["cat"].astype(str).to_numpy(),
        },
        index=pd.Index(table[key].astype(np.int64).to_numpy(), name=key),
    )
    if "supercat_default" in table.columns:
        out["supercat_default"] = table["supercat_default"].astype(str).to_numpy()
    return out


def lookup_labels(
    labels: pd.DataFrame, ids73k: np.ndarray, legacy: bool, source: str | os.PathLike[str]
) -> pd.DataFrame:
    """Label rows (``cocoId``, ``supercat``, ``cat``) of 1-based 73k ids, in the given order."""
    keys = ids73k if legacy else ids73k - 1
    missing = np.setdiff1d(keys, labels.index.to_numpy())
    if missing.size:
        kind = "id (1-based 73k id)" if legacy else "nsdId"
        raise FormatError(
            f"{source}: labels table lacks {missing.size} {kind}(s) used by the trials, e.g. "
            f"{missing[:5].tolist()}; rebuild it with `make coco-labels`"
        )
    return labels.loc[keys].reset_index(drop=True)


def equalize(supercats: dict[int, np.ndarray]) -> tuple[dict[int, np.ndarray], dict[int, int]]:
    """Apply rules 2-3: drop "unknown", then the earliest "person" trials until counts are equal.

    Parameters
    ----------
    supercats
        subject -> supercategory of each candidate trial (trial order).

    Returns
    -------
    kept, person_dropped
        subject -> 0-based indices of kept candidate trials (sorted); subject -> person trials dropped.
    """
    known = {s: np.flatnonzero(lab != UNKNOWN) for s, lab in supercats.items()}
    if not known:
        return {}, {}
    target = min(idx.size for idx in known.values())
    kept, dropped = {}, {}
    for s, idx in known.items():
        excess = idx.size - target
        person = idx[supercats[s][idx] == PERSON]
        if person.size < excess:
            raise NsdPrepError(
                f"cannot equalize trials: {nsd.subject_label(s)} has {idx.size} labelled trials, "
                f"{excess} more than the target {target}, but only {person.size} 'person' trials "
                "to drop (rule: drop the earliest 'person' trials)"
            )
        drop = person[:excess]
        kept[s] = np.setdiff1d(idx, drop)
        dropped[s] = int(excess)
    return kept, dropped


def select(
    nsd_ds: str | os.PathLike[str],
    expdesign: str | os.PathLike[str],
    labels_path: str | os.PathLike[str],
    layout: Layout,
    legacy: bool = False,
    *,
    stim_info_csv: str | os.PathLike[str] | None = None,
    max_session: int = 0,
) -> Selection:
    """Compute the selection for every subject registered in ``nsd_ds`` (no betas are read).

    ``stim_info_csv`` (default: ``nsd_stim_info_merged.csv`` next to ``expdesign``) cross-checks
    the shared images of the split; ``max_session`` caps the sessions used (0: no cap).
    """
    subjects = inventory.registered_subjects(nsd_ds)
    if not subjects:
        raise MissingInputError(f"no betas registered in {nsd_ds}; run `make inputs` first.")
    sessions = {s: inventory.registered_sessions(nsd_ds, s) for s in subjects}
    fewest_registered = min(len(v) for v in sessions.values())
    n_sessions = min(fewest_registered, max_session) if max_session else fewest_registered
    S = layout.trials_per_session
    n_trials = n_sessions * S
    fewest = [nsd.subject_label(s) for s, v in sessions.items() if len(v) == fewest_registered]
    log.info(
        "N = %d sessions (fewest registered: %s%s) x %d trials = %d trials per subject",
        n_sessions,
        ", ".join(fewest),
        f"; MAX_SESSION={max_session}" if max_session else "",
        S,
        n_trials,
    )
    design = nsd.read_expdesign(expdesign)
    table = load_labels(labels_path, legacy=legacy)

    rows: dict[int, pd.DataFrame] = {}
    changed: dict[int, np.ndarray] = {}
    for s in subjects:
        ids = design.trial_images(s, n_trials)
        lab = lookup_labels(table, ids, legacy, labels_path)
        if "supercat_default" in lab.columns:
            changed[s] = lab["supercat"].to_numpy(dtype=str) != lab["supercat_default"].to_numpy(
                dtype=str
            )
        t = np.arange(n_trials)
        k = t % S
        session = t // S + 1
        run_in_session = layout.run_in_session()[k]
        rows[s] = pd.DataFrame(
            {
                "subject": np.full(n_trials, s, dtype=np.int64),
                "session": session.astype(np.int64),
                "run_in_session": run_in_session.astype(np.int64),
                "run": ((session - 1) * layout.runs_per_session + run_in_session).astype(np.int64),
                "trial": (t + 1).astype(np.int64),
                "trial_in_session": (k + 1).astype(np.int64),
                "nsdId": (ids - 1).astype(np.int64),
                "cocoId": lab["cocoId"].to_numpy(),
                "supercat": lab["supercat"].to_numpy(dtype=str),
                "cat": lab["cat"].to_numpy(dtype=str),
            },
        )
    # The split, once the design's trial arrays are known to be sound.
    csv = Path(stim_info_csv) if stim_info_csv else Path(expdesign).with_name(_STIM_INFO_CSV)
    shared = split.shared_images(expdesign, csv)
    for df in rows.values():
        df["split"] = split.split_of(df["nsdId"].to_numpy(), shared)
        if list(df.columns) != list(TRIAL_COLUMNS):
            raise NsdPrepError(f"trial table columns {list(df.columns)} != {TRIAL_COLUMNS}")
    supercats = {s: df["supercat"].to_numpy(dtype=str) for s, df in rows.items()}
    kept, dropped = equalize(supercats)
    return Selection(
        layout=layout,
        registered_sessions=sessions,
        n_sessions=n_sessions,
        n_trials=n_trials,
        n_unknown={s: int(np.sum(v == UNKNOWN)) for s, v in supercats.items()},
        n_person_dropped=dropped,
        trials={s: rows[s].iloc[kept[s]].reset_index(drop=True) for s in subjects},
        n_label_changed={s: int(changed[s][kept[s]].sum()) for s in changed},
        max_session=max_session,
        fewest_registered=fewest_registered,
        shared=shared,
    )
