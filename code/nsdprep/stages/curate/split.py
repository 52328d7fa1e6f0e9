"""The shared1000 split: the images every subject saw are the test set, the others the train set.

NSD's ``nsd_expdesign.mat`` names the shared images (``sharedix``, 1-based 73k ids); the stim
info's ``shared1000`` column says the same per image (row = nsdId). Both are read (the stim info
from its CSV, never from the pickle) and must agree. A curated row is ``test`` when its image is a
shared one, so all repeats of a test image are on the test side: the split never separates the
repeats of an image.

:func:`train_test` gives a researcher the two sides of a subject opened with
:func:`nsdprep.load_curated`::

    d = nsdprep.load_curated(1, dataset=".", zscore="session", average=True, roi="nsdgeneral")
    X_train, y_train, X_test, y_test = train_test(d)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from nsdprep.core import nsd
from nsdprep.core._io import require_content
from nsdprep.core.errors import FormatError, UsageError

#: How many differing ids an error lists.
_SHOWN = 5


def read_shared1000(path: str | os.PathLike[str]) -> np.ndarray:
    """0-based nsdIds whose ``shared1000`` is true in ``nsd_stim_info_merged.csv``, sorted.

    Read as nsd_access reads the CSV (``pd.read_csv(path, index_col=0)``); rows are nsdIds.
    """
    import pandas as pd

    path = Path(path)
    require_content(path, "nsd_stim_info_merged.csv", "run `make inputs` / `datalad get` it.")
    try:
        table = pd.read_csv(path, index_col=0)
    except Exception as exc:  # noqa: BLE001 - the parser raises several types
        raise FormatError(f"{path} could not be read as CSV (pd.read_csv): {exc!r}") from exc
    if "shared1000" not in table.columns:
        raise FormatError(
            f"{path}: column 'shared1000' missing; columns found: {list(table.columns)[:30]}"
        )
    n = len(table)
    if not np.array_equal(np.asarray(table.index), np.arange(n)):
        raise FormatError(f"{path}: rows must be indexed 0..{n - 1} (row = nsdId)")
    if "nsdId" in table.columns and not np.array_equal(table["nsdId"].to_numpy(), np.arange(n)):
        raise FormatError(f"{path}: column nsdId must equal the row position (0-based)")
    flags = table["shared1000"]
    if flags.dtype == bool:
        values = flags.to_numpy()
    else:
        text = flags.astype(str).str.strip().str.lower()
        known = {"true": True, "1": True, "1.0": True, "false": False, "0": False, "0.0": False}
        unknown = sorted(set(text) - set(known))
        if unknown:
            raise FormatError(
                f"{path}: column 'shared1000' must be True/False, found {unknown[:_SHOWN]}"
            )
        values = text.map(known).to_numpy(dtype=bool)
    return np.flatnonzero(values).astype(np.int64)


def shared_images(
    expdesign: str | os.PathLike[str], stim_info_csv: str | os.PathLike[str]
) -> np.ndarray:
    """0-based nsdIds of the shared images: ``sharedix - 1``, checked against ``shared1000``."""
    from_design = nsd.read_sharedix(expdesign) - 1
    from_csv = read_shared1000(stim_info_csv)
    if not np.array_equal(from_design, from_csv):
        only_design = np.setdiff1d(from_design, from_csv)[:_SHOWN].tolist()
        only_csv = np.setdiff1d(from_csv, from_design)[:_SHOWN].tolist()
        raise FormatError(
            f"the shared images disagree: {expdesign} field 'sharedix' names {from_design.size} "
            f"images, {stim_info_csv} column 'shared1000' {from_csv.size}; nsdIds only in "
            f"sharedix: {only_design}, only in shared1000: {only_csv}. Get both files again "
            "(`datalad drop` then `datalad get`)."
        )
    return from_design


def split_of(nsd_ids: np.ndarray, shared: np.ndarray) -> np.ndarray:
    """``"test"`` where the 0-based nsdId is a shared image, else ``"train"`` (unicode array)."""
    is_test = np.isin(np.asarray(nsd_ids, dtype=np.int64), shared)
    return np.where(is_test, nsd.SPLIT_TEST, nsd.SPLIT_TRAIN)


def split_rows(trials: Any, split: str) -> np.ndarray:
    """Row indices (sorted) of ``split`` (``"train"`` or ``"test"``) in a curated trials table."""
    if split not in (nsd.SPLIT_TRAIN, nsd.SPLIT_TEST):
        raise UsageError(f"split must be 'train' or 'test', got {split!r}")
    if "split" not in trials.columns:
        raise FormatError(
            "the curated trials table has no 'split' column (made before it existed); rebuild "
            "it with `make curated FORCE=1`"
        )
    return np.flatnonzero(trials["split"].to_numpy(dtype=str) == split)


def train_test(d: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``X_train, y_train, X_test, y_test`` of a subject opened with :func:`nsdprep.load_curated`.

    Test = the rows whose image is one of the shared images (``split == "test"``), train = the
    others; no image has rows on both sides. ``X_*`` are read into memory (float32 for prepared
    folders, int16 for the default one), ``y_*`` are the labels of those rows.
    """
    train, test = split_rows(d.trials, nsd.SPLIT_TRAIN), split_rows(d.trials, nsd.SPLIT_TEST)
    X = d.X
    return np.asarray(X[train]), d.labels[train], np.asarray(X[test]), d.labels[test]
