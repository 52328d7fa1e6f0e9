"""Read NSD's ``nsd_stim_info_merged`` table: the pickle, or the CSV when this pandas cannot read it.

NSD ships the table twice. The pickle was written by an old pandas; a newer pandas may fail to read
it, so the CSV is the fallback, and when both are readable the columns the labels use (``cocoId``,
``cocoSplit``, ``cropBox``) must agree. The table is normalised so row position equals ``nsdId``.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nsdprep.core import nsd
from nsdprep.core._io import require_content
from nsdprep.core.errors import FormatError
from nsdprep.stages.labels.crop import crop_boxes, object_column, parse_box_cell
from nsdprep.stages.labels.instances import (
    MAX_SHOWN,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StimInfo:
    """``nsd_stim_info_merged`` as read, and how: which file and reader gave the table."""

    table: pd.DataFrame
    path: Path
    #: ``"pickle"``, ``"pickle (latin1)"`` (a Python 2 pickle) or ``"csv"`` (fallback)
    reader: str
    #: why the pickle was not used (empty when it was)
    fallback_reason: str = ""

    def describe(self) -> str:
        """One line for logs and the summary TSV."""
        reason = " ".join(self.fallback_reason.split())  # one line: it goes into a TSV cell
        why = f" (pickle unreadable: {reason})" if reason else ""
        return f"{self.path.name} via {self.reader}{why}"


def load_stim_info(path: str | Path, csv: str | Path | None = None) -> StimInfo:
    """Read ``nsd_stim_info_merged.pkl``, falling back to ``nsd_stim_info_merged.csv``.

    The released pickle was written by an old pandas. Readers tried in order: ``pd.read_pickle``;
    ``pickle.load(encoding="latin1")`` (reads Python 2 pickles, whose numpy buffers are byte
    strings); then, if ``csv`` is given, ``pd.read_csv(csv, index_col=0)`` (how tknapen/nsd_access
    reads it). When both files are readable, the columns the labels use (``cocoId``,
    ``cocoSplit``, ``cropBox``) must agree. Either way the table is normalized (see
    :func:`normalize_stim_info`) and checked.
    """
    path = Path(path)
    errors: list[str] = []
    table = reader = None
    if path.exists():
        try:
            table, reader = _read_pickle(path), "pickle"
        except Exception as exc:  # noqa: BLE001 - unpickling can raise about anything
            errors.append(f"pd.read_pickle: {exc!r}")
            try:
                with open(path, "rb") as fh:
                    table, reader = pickle.load(fh, encoding="latin1"), "pickle (latin1)"
            except Exception as exc2:  # noqa: BLE001
                errors.append(f"pickle.load(encoding='latin1'): {exc2!r}")
    else:
        errors.append("content absent" if path.is_symlink() else "no such file")
    csv = Path(csv) if csv is not None else None
    csv_table = None
    if csv is not None and table is None:
        _require(csv, "nsd_stim_info_merged.csv")
        csv_table = normalize_stim_info(_read_csv(csv), csv)
    elif csv is not None and csv.exists():  # only for the cross-check: the pickle was read
        try:
            csv_table = normalize_stim_info(_read_csv(csv), csv)
        except FormatError as exc:
            log.warning("%s; the pickle was read, so it is used without the cross-check", exc)
    if table is None:
        if csv_table is None:
            _require(path, "nsd_stim_info_merged.pkl")
            raise FormatError(
                f"{path} could not be read as a pandas pickle ({'; '.join(errors)}) and no CSV "
                f"was given; pass --stim-info-csv {nsd.STIM_INFO_CSV_KEY.rsplit('/', 1)[-1]}."
            )
        reason = "; ".join(errors)
        log.warning("%s could not be read (%s); using %s instead", path, reason, csv)
        return StimInfo(csv_table, csv, "csv", reason)
    table = normalize_stim_info(table, path)
    if csv_table is not None:
        _cross_check(table, path, csv_table, csv)
    log.info("stim info: %s read with %s", path, reader)
    return StimInfo(table, path, reader)


def normalize_stim_info(df: Any, path: str | Path) -> pd.DataFrame:
    """Check the stim-info table and give it one form, whichever file or pandas wrote it.

    A leading ``Unnamed: 0`` column equal to the row position (an index saved into a CSV and read
    back without ``index_col``) is dropped; text columns become ``object`` (pandas 3 reads CSV
    text as ``str``); ``cropBox`` cells written as text, ``"(0, 0, 0.1671875, 0.1671875)"``,
    become tuples; the index becomes a ``RangeIndex``. Needs columns ``cocoId`` (integer) and
    ``cocoSplit`` (``train2017``/``val2017``); if an ``nsdId`` column exists, row position must
    equal it (the table is indexed by 0-based nsdId).
    """
    path = Path(path)
    if not isinstance(df, pd.DataFrame):
        raise FormatError(f"{path}: expected a pandas DataFrame, found {type(df).__name__}.")
    df = df.copy()
    n = len(df)
    leftover = "Unnamed: 0"
    if leftover in df.columns and np.array_equal(df[leftover].to_numpy(), np.arange(n)):
        df = df.drop(columns=leftover)
    if not np.array_equal(np.asarray(df.index), np.arange(n)):
        raise FormatError(
            f"{path}: the rows must be indexed 0..{n - 1} (row = nsdId); found index "
            f"{list(df.index[:MAX_SHOWN])}."
        )
    df.index = pd.RangeIndex(n)
    df.columns = pd.Index([str(c) for c in df.columns], dtype=object)
    for col in df.columns:
        if pd.api.types.is_string_dtype(df[col].dtype) and df[col].dtype != object:
            df[col] = df[col].astype(object)
    if "cropBox" in df.columns:
        cells = [parse_box_cell(v, path, i) for i, v in enumerate(df["cropBox"].tolist())]
        df["cropBox"] = object_column(cells)
    missing = [c for c in ("cocoId", "cocoSplit") if c not in df.columns]
    if missing:
        raise FormatError(
            f"{path}: missing column(s) {missing}; columns found: {list(df.columns)[:30]}."
        )
    coco_id = df["cocoId"].to_numpy()
    if not np.issubdtype(coco_id.dtype, np.number) or not np.all(np.mod(coco_id, 1) == 0):
        raise FormatError(f"{path}: column cocoId must hold integers, found dtype {coco_id.dtype}.")
    splits = df["cocoSplit"].astype(object).to_numpy()
    bad = ~np.isin(splits, np.array(nsd.COCO_SPLITS, dtype=object))
    if bad.any():
        raise FormatError(
            f"{path}: cocoSplit must be one of {nsd.COCO_SPLITS}; found "
            f"{sorted({str(x) for x in splits[bad]})[:MAX_SHOWN]} (rows "
            f"{np.flatnonzero(bad)[:MAX_SHOWN].tolist()})."
        )
    # One string object per split name, whichever reader made them: pickles of tables built
    # from this one are then the same bytes whether the pickle or the CSV was read.
    canonical = {s: s for s in nsd.COCO_SPLITS}
    df["cocoSplit"] = object_column([canonical[x] for x in splits])
    if "nsdId" in df.columns:
        nsd_ids = df["nsdId"].to_numpy()
        wrong = np.flatnonzero(nsd_ids != np.arange(len(df)))
        if wrong.size:
            raise FormatError(
                f"{path}: row position must equal nsdId (0-based); rows {wrong[:MAX_SHOWN].tolist()}"
                f" hold nsdId {nsd_ids[wrong[:MAX_SHOWN]].tolist()}."
            )
    return df


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _require(path: Path, what: str) -> None:
    require_content(path, what, "it does not exist; run `make inputs` / check the path.")


def _read_pickle(path: Path) -> Any:
    return pd.read_pickle(path)


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, index_col=0)
    except Exception as exc:  # noqa: BLE001 - the parser raises several types
        raise FormatError(f"{path} could not be read as CSV (pd.read_csv): {exc!r}") from exc


#: Largest difference tolerated between the pickle's and the CSV's crop fractions (text rounding).
CROP_ATOL = 1e-4


def _cross_check(pkl: pd.DataFrame, pkl_path: Path, csv: pd.DataFrame, csv_path: Path) -> None:
    """The columns the labels use must agree between the pickle and the CSV."""
    if len(pkl) != len(csv):
        raise FormatError(
            f"{pkl_path} has {len(pkl)} rows but {csv_path} has {len(csv)}; they should be the "
            "same table. Get both files again (`datalad drop` then `datalad get`)."
        )
    for col in ("cocoId", "cocoSplit", "cropBox"):
        if (col in pkl.columns) != (col in csv.columns):
            raise FormatError(f"column {col!r} is in only one of {pkl_path} and {csv_path}.")
        if col not in pkl.columns:
            continue
        if col == "cropBox":
            a, b = crop_boxes(pkl, pkl_path), crop_boxes(csv, csv_path)
            differ = np.flatnonzero(np.any(np.abs(a - b) > CROP_ATOL, axis=1))
        else:
            differ = np.flatnonzero(pkl[col].to_numpy() != csv[col].to_numpy())
        if differ.size:
            i = differ[:MAX_SHOWN]
            raise FormatError(
                f"{pkl_path} and {csv_path} disagree on {col} in {differ.size} rows, e.g. nsdId "
                f"{i.tolist()}: {pkl[col].iloc[i].tolist()} vs {csv[col].iloc[i].tolist()}. "
                "They should be the same table; get both files again."
            )
