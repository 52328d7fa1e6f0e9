r"""Pandas tables as TSV with typed JSON cells: what the pipeline reads instead of a pickle.

A pickle runs code when it is loaded, and a labels table may come from a colleague's store, so the
stages that consume a table read this sidecar, written by the same run as the pickle users load.
The format is lossless for plain-column tables (values, dtypes, column order):

* line 1: the column names, tab-separated;
* line 2: each column's type: a numpy dtype (``int64``, ``float64``, ``bool``, ...), ``object``
  (cells are JSON values: strings, numbers, lists, ``null``), ``tuple`` (an object column whose
  every cell is a tuple, stored as a JSON array) or ``str[python]`` (pandas' string dtype);
* then one line per row, each cell one JSON value (floats written as ``repr``, so they read back
  bit for bit; ``NaN``/``Infinity`` as Python's ``json`` writes them). JSON escapes tabs and line
  breaks inside strings, so a tab or a newline is always a separator.

The index must be the default ``RangeIndex`` (row position). Reading with pandas directly:
``pd.read_csv(path, sep="\t", skiprows=[1], quoting=3)`` gives the cells as JSON text.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nsdprep.core import nsd
from nsdprep.core._io import atomic_path, require_content
from nsdprep.core.errors import FormatError, UsageError

#: numpy dtypes a column may have (anything else is refused, on writing and on reading).
NUMPY_DTYPES = (
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float32",
    "float64",
)
OBJECT, TUPLE = "object", "tuple"
_STR_RE = re.compile(r"str\[(python|pyarrow)\]")
_SCALARS = (str, int, float, bool, type(None))


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """The TSV sidecar of a pickled table: ``x.pkl`` -> ``x.tsv`` (a ``.tsv`` path is itself)."""
    path = Path(path)
    if path.suffix == ".pkl":
        return Path(nsd.table_sidecar(str(path)))
    if path.suffix == ".tsv":
        return path
    return path.with_name(f"{path.name}.tsv")


def write_table_tsv(table: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write ``table`` atomically in the sidecar format (same table -> same bytes).

    Raises :class:`UsageError` for what the format cannot hold losslessly: an index other than the
    default ``RangeIndex``, a column name that is not a plain string, a dtype outside
    :data:`NUMPY_DTYPES`/object/string, or an object cell that is not a JSON value (a tuple inside
    a list, a numpy scalar, a dict with non-string keys...).
    """
    path = Path(path)
    if not isinstance(table.index, pd.RangeIndex) or not table.index.equals(
        pd.RangeIndex(len(table))
    ):
        first = [str(x) for x in table.index[:5]]
        raise UsageError(
            f"{path}: only a table indexed 0..n-1 can be written; its index starts {first} "
            f"({type(table.index).__name__}); reset it first."
        )
    names = list(table.columns)
    for name in names:
        if not isinstance(name, str) or not name or any(c in name for c in "\t\n\r"):
            raise UsageError(f"{path}: column name {name!r} must be a non-empty one-line string")
    kinds = [_kind(table[name], path) for name in names]
    columns = [
        _encode_column(table[name].tolist(), kind, f"{path}: column {name!r}")
        for name, kind in zip(names, kinds, strict=True)
    ]
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        fh.write("\t".join(names) + "\n")
        fh.write("\t".join(kinds) + "\n")
        for row in zip(*columns, strict=True):
            fh.write("\t".join(row) + "\n")


def read_table_tsv(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a table written by :func:`write_table_tsv`, with its dtypes and column order.

    Nothing in the file is executed: cells are parsed as JSON and the column types come from a
    fixed list. Any deviation raises :class:`FormatError` naming the file and the line.
    """
    path = Path(path)
    require_content(path, "table (TSV)", "it does not exist; check the path.")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path}: not UTF-8 text ({exc}); expected a table TSV.") from exc
    if len(lines) < 3 or lines[-1] != "":
        raise FormatError(
            f"{path}: expected a header line, a type line and rows ending in a newline; the file "
            "is truncated or not a table TSV."
        )
    names, kinds = lines[0].split("\t"), lines[1].split("\t")
    if len(set(names)) != len(names) or len(kinds) != len(names) or "" in names:
        raise FormatError(
            f"{path}: {len(names)} column names (unique, non-empty) need as many types; found "
            f"names {names[:12]} and types {kinds[:12]}."
        )
    for name, kind in zip(names, kinds, strict=True):
        if kind not in NUMPY_DTYPES and kind not in (OBJECT, TUPLE) and not _STR_RE.fullmatch(kind):
            raise FormatError(f"{path}: column {name!r} has unknown type {kind!r}.")
    body = lines[2:-1]
    cells: list[list[Any]] = [[] for _ in names]
    for row in _rows(body, len(names), path):
        for col, value in zip(cells, row, strict=True):
            col.append(value)
    data = {
        name: _decode_column(values, kind, f"{path}: column {name!r}")
        for name, values, kind in zip(names, cells, kinds, strict=True)
    }
    return pd.DataFrame(data, columns=names, index=pd.RangeIndex(len(body)))


# ----------------------------------------------------------------------------------------------
# encoding


def _kind(col: pd.Series, path: Path) -> str:
    dtype = col.dtype
    if isinstance(dtype, pd.StringDtype):
        if not (isinstance(dtype.na_value, float) and np.isnan(dtype.na_value)):
            raise UsageError(
                f"{path}: column {col.name!r}: string dtype with pd.NA is not supported"
            )
        return f"str[{dtype.storage}]"
    if isinstance(dtype, np.dtype) and dtype.kind == "O":
        values = col.tolist()
        return TUPLE if values and all(type(v) is tuple for v in values) else OBJECT
    if isinstance(dtype, np.dtype) and dtype.name in NUMPY_DTYPES and dtype.isnative:
        return dtype.name
    raise UsageError(f"{path}: column {col.name!r} has dtype {dtype}, which the TSV cannot hold")


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=True, separators=(",", ":"))


def _encode_column(values: list[Any], kind: str, where: str) -> list[str]:
    if kind in NUMPY_DTYPES:  # tolist() gave Python scalars
        return [_dumps(v) for v in values]
    if kind == TUPLE:
        for v in values:
            _check_json_value(list(v), where)
        return [_dumps(list(v)) for v in values]
    if kind != OBJECT:  # str[storage]: missing values are NaN
        values = [None if isinstance(v, float) and np.isnan(v) else v for v in values]
    for v in values:
        _check_json_value(v, where)
    return [_dumps(v) for v in values]


def _check_json_value(value: Any, where: str) -> None:
    """Refuse what JSON would not give back as it was (tuples, numpy scalars, odd dict keys)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if type(v) in _SCALARS:
            continue
        if type(v) is list:
            stack.extend(v)
        elif type(v) is dict and all(type(k) is str for k in v):
            stack.extend(v.values())
        else:
            raise UsageError(
                f"{where}: a cell holds {type(v).__name__} {v!r:.80}, not a JSON value"
            )


# ----------------------------------------------------------------------------------------------
# decoding


def _rows(body: list[str], n: int, path: Path) -> Iterator[list[Any]]:
    for i, line in enumerate(body, start=3):
        try:
            # a tab never occurs inside a JSON value: the cells, comma-joined, are one JSON array
            row = json.loads("[" + line.replace("\t", ",") + "]")
        except (ValueError, RecursionError) as exc:
            raise FormatError(f"{path}: line {i} is not {n} JSON cells ({exc}).") from exc
        if len(row) != n:
            raise FormatError(f"{path}: line {i} has {len(row)} cells, the header {n}.")
        yield row


def _decode_column(values: list[Any], kind: str, where: str) -> Any:
    if kind in NUMPY_DTYPES:
        dtype = np.dtype(kind)
        want: tuple[type, ...] = (
            (bool,) if kind == "bool" else (int,) if dtype.kind in "iu" else (int, float)
        )
        bad = [v for v in values if type(v) not in want]
        if bad:
            raise FormatError(f"{where}: type {kind} but a cell holds {bad[0]!r:.80}.")
        try:
            return np.array(values, dtype=dtype)
        except OverflowError as exc:
            raise FormatError(f"{where}: a value does not fit {kind} ({exc}).") from exc
    if kind == TUPLE:
        if not all(type(v) is list for v in values):
            raise FormatError(f"{where}: type tuple but a cell is not a JSON array.")
        values = [tuple(v) for v in values]
    elif kind != OBJECT:  # str[storage]
        if not all(type(v) is str or v is None for v in values):
            raise FormatError(f"{where}: type {kind} but a cell is not a string.")
        storage = _STR_RE.fullmatch(kind)[1]  # type: ignore[index]
        return pd.array(
            [np.nan if v is None else v for v in values],
            dtype=pd.StringDtype(storage, na_value=np.nan),
        )
    col = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        col[i] = v
    return pd.Series(col, dtype=object, copy=False)
