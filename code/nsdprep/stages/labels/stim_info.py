"""Read NSD's ``nsd_stim_info_merged`` table from its CSV; the pickle is never opened.

NSD ships the table twice, as a pandas pickle and as ``nsd_stim_info_merged.csv``. Unpickling runs
whatever code the file names, and the file comes from a mirror or a clone: the CSV is the source of
truth, read with ``pd.read_csv(path, index_col=0)`` (as tknapen/nsd_access reads it). The pickle
adds nothing the CSV lacks: the two hold the same table (``tests/data``: pickles of pandas 0.19,
0.24 and 1.5 against their CSV), a cross-check of two files from the same server proves nothing
about either, and a restricted unpickler would still have to admit pandas' and numpy's private
reconstructors (``_unpickle_block``, ``_reconstruct``, ``_new_Index``, ...; module paths that change
between versions), which accept shapes and arguments of the file's choosing. The table is
normalised so row position equals ``nsdId``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nsdprep.core import nsd
from nsdprep.core._io import require_content
from nsdprep.core.errors import FormatError
from nsdprep.stages.labels.crop import object_column, parse_box_cell
from nsdprep.stages.labels.instances import (
    MAX_SHOWN,
)

log = logging.getLogger(__name__)

#: The one reader of the stim info (recorded in the summary TSV).
READER = "csv"


@dataclass(frozen=True)
class StimInfo:
    """``nsd_stim_info_merged`` as read, and from which file."""

    table: pd.DataFrame
    path: Path
    #: always ``"csv"``: the pickle is never read
    reader: str = READER

    def describe(self) -> str:
        """One line for logs and the summary TSV."""
        return f"{self.path.name} via {self.reader}"


def stim_info_csv_path(path: str | Path, csv: str | Path | None = None) -> Path:
    """The CSV to read: ``csv`` if given, ``path`` itself if it is a CSV, else the CSV beside it.

    NSD keeps ``nsd_stim_info_merged.csv`` next to ``nsd_stim_info_merged.pkl``; a ``.pkl`` path is
    only ever used to find that neighbour.
    """
    if csv is not None:
        return Path(csv)
    path = Path(path)
    return path if path.suffix.lower() == ".csv" else path.with_suffix(".csv")


def load_stim_info(path: str | Path, csv: str | Path | None = None) -> StimInfo:
    """Read NSD's stim info from ``nsd_stim_info_merged.csv``, never from the pickle.

    ``path`` is the CSV, or the pickle whose neighbour ``.csv`` is read (see
    :func:`stim_info_csv_path`); ``csv`` names the CSV explicitly. The table is normalized (see
    :func:`normalize_stim_info`) and checked.
    """
    source = stim_info_csv_path(path, csv)
    _require(source, "nsd_stim_info_merged.csv (the stim info is read from the CSV only)")
    table = normalize_stim_info(_read_csv(source), source)
    log.info("stim info: %s read with pd.read_csv", source)
    return StimInfo(table, source)


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
    # One string object per split name, however the reader made them: pickles of tables built
    # from this one then do not depend on how pandas shares its strings.
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


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, index_col=0)
    except Exception as exc:  # noqa: BLE001 - the parser raises several types
        raise FormatError(f"{path} could not be read as CSV (pd.read_csv): {exc!r}") from exc
