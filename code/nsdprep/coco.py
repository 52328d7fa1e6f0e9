"""COCO 2017 train+val merge and the per-NSD-image labels table.

Three modes (``LABELS=``):

* **default** (correct): ``instances_train2017.json`` and ``instances_val2017.json`` are merged
  *keeping every original id* (after checking that the splits' category tables are identical and
  their image and annotation ids disjoint). Each NSD image (``nsdId``, 0-based) is labelled from the
  annotations of its own ``cocoId`` in the split named by ``nsd_stim_info_merged.pkl``: all
  instance labels (``supercats``, ``cats``, ``areas``, in annotation order) plus the labels of the
  largest-area annotation (``supercat``, ``cat``; ties go to the first; ``"unknown"`` if none).
* **legacy** (``--legacy``): reproduces the original hand-made derivative, defects included. The
  original merge (``merge.py`` of mohamadmansourX/Merge_COCO_FILES) renumbers ids: train image ids
  become their list position ``i``; val image ids become ``i + max(original train image ids)``;
  annotation ids alike (train: position; val: ``i + max(original train annotation ids)``) and each
  annotation's ``image_id`` follows its image. Note that the original code adds no ``+ 1`` (it uses
  ``max`` of a dict, i.e. of the original ids, as the offset). Labels are then looked up in that
  merged file by the 1-based 73k id (``nsdId + 1``), which is neither a COCO id nor the renumbered
  id of the right image: the labels belong to unrelated COCO images. One row per image shown to
  any subject (``np.unique(subjectim[:, masterordering - 1])``), column ``id`` keeping the dtype of
  ``subjectim`` in ``nsd_expdesign.mat``.
* **crop** (``--crop``): the default table's annotations, labelled by the largest area *inside the
  square crop NSD showed* (``cropBox``), beside the default labels; see :mod:`nsdprep.coco_crop`.

The stim info is read from the pickle, or from ``nsd_stim_info_merged.csv`` when this pandas cannot
unpickle it (:func:`load_stim_info`); the summary TSV records which (``input stim_info ...``).

Outputs are deterministic: the JSON is written with fixed separators (sorted keys in default mode;
the original's ``json.dumps`` defaults in legacy mode), the tables are pickled with a fixed protocol
from data built in a fixed order.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nsdprep import nsd
from nsdprep._io import atomic_path, require_content
from nsdprep.coco_crop import crop_boxes, crop_label_table, object_column, parse_box_cell
from nsdprep.coco_instances import (
    MAX_SHOWN,
    annotation_arrays,
    category_lookup,
    group_by_image,
    ids_of,
    instances_members,
    merge_instances,
    merge_instances_legacy,
    read_instances,
    validate_splits,
    write_json,
)
from nsdprep.errors import FormatError, MissingInputError, UsageError
from nsdprep.nsd import UNKNOWN

log = logging.getLogger(__name__)

#: Pickle protocol of the labels tables (fixed so the bytes do not depend on Python defaults).
PICKLE_PROTOCOL = 5
#: Columns of the default labels table, in order.
LABEL_COLUMNS = ("nsdId", "cocoId", "cocoSplit", "supercats", "cats", "areas", "supercat", "cat")
#: Columns of the legacy labels table, in the original's order.
LEGACY_COLUMNS = ("id", "supercats", "cats", "areas", "supercat", "cat")


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


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


def read_stim_info(path: str | Path, csv: str | Path | None = None) -> pd.DataFrame:
    """The stim-info table of :func:`load_stim_info` (pickle, else CSV), normalized and checked."""
    return load_stim_info(path, csv).table


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


def label_table(
    data: dict[str, dict[str, Any]],
    stim_info: pd.DataFrame,
    sources: dict[str, str] | None = None,
) -> pd.DataFrame:
    """One row per NSD image (row = nsdId, 0-based) with the labels of its own COCO image.

    ``data`` are the split dicts (original ids), ``stim_info`` the NSD table (``cocoId``,
    ``cocoSplit``). A cocoId found in no split, or in a split other than its ``cocoSplit``, raises
    :class:`FormatError`. Areas are floats; ``supercat``/``cat`` are those of the first annotation
    with the largest area, ``"unknown"`` for an image without annotations.
    """
    sources = sources or {s: f"instances_{s}.json" for s in data}
    coco_ids = stim_info["cocoId"].to_numpy().astype(np.int64)
    coco_splits = stim_info["cocoSplit"].astype(object).to_numpy()
    n = len(stim_info)
    image_ids = {s: ids_of(d["images"], "id", sources[s], "image") for s, d in data.items()}
    found_in = np.full(n, "", dtype=object)
    for s, ids in image_ids.items():
        found_in[np.isin(coco_ids, ids) & (found_in == "")] = s
    nowhere = np.flatnonzero(found_in == "")
    if nowhere.size:
        raise FormatError(
            f"{nowhere.size} NSD images have a cocoId that is an image of no split "
            f"({', '.join(sources.values())}): nsdId {nowhere[:MAX_SHOWN].tolist()} -> cocoId "
            f"{coco_ids[nowhere[:MAX_SHOWN]].tolist()}. The stim info and the COCO zip do not match."
        )
    wrong = np.flatnonzero(found_in != coco_splits)
    if wrong.size:
        i = wrong[:MAX_SHOWN]
        raise FormatError(
            f"{wrong.size} NSD images are found in a COCO split other than their cocoSplit: "
            f"nsdId {i.tolist()}, cocoId {coco_ids[i].tolist()}, cocoSplit "
            f"{coco_splits[i].tolist()}, found in {found_in[i].tolist()}."
        )

    supercats: list[list[str]] = [[] for _ in range(n)]
    cats: list[list[str]] = [[] for _ in range(n)]
    areas: list[list[float]] = [[] for _ in range(n)]
    top_super = [UNKNOWN] * n
    top_cat = [UNKNOWN] * n
    for split, d in data.items():
        rows = np.flatnonzero(coco_splits == split)
        if rows.size == 0:
            continue
        ann = annotation_arrays(d["annotations"], sources[split])
        sup_of, name_of = category_lookup(d["categories"])
        groups = group_by_image(ann["image_id"], coco_ids[rows])
        for row, idx in zip(rows.tolist(), groups, strict=True):
            if idx.size == 0:
                continue
            cat_ids = ann["category_id"][idx].tolist()
            a = ann["area"][idx]
            supercats[row] = [sup_of[c] for c in cat_ids]
            cats[row] = [name_of[c] for c in cat_ids]
            areas[row] = a.tolist()
            k = int(np.argmax(a))  # first of the largest
            top_super[row] = supercats[row][k]
            top_cat[row] = cats[row][k]
    return pd.DataFrame(
        {
            "nsdId": np.arange(n, dtype=np.int64),
            "cocoId": coco_ids,
            "cocoSplit": pd.array(coco_splits.tolist(), dtype=object),
            "supercats": object_column(supercats),
            "cats": object_column(cats),
            "areas": object_column(areas),
            "supercat": pd.array(top_super, dtype=object),
            "cat": pd.array(top_cat, dtype=object),
        },
        columns=list(LABEL_COLUMNS),
    )


def legacy_label_table(merged_legacy: dict[str, Any], ids: np.ndarray) -> pd.DataFrame:
    """Reproduce the original labels table from the renumbered merge, looked up by 1-based 73k id.

    For each ``id`` the annotations whose (renumbered) ``image_id`` equals it, in merged order;
    ``supercat``/``cat`` of the first largest-area annotation, ``"unknown"`` if none. Areas are the
    values as read from the JSON. Columns: id, supercats, cats, areas, supercat, cat.
    """
    anns = merged_legacy["annotations"]
    image_id = np.fromiter((a["image_id"] for a in anns), dtype=np.int64, count=len(anns))
    sup_of, name_of = category_lookup(merged_legacy["categories"])
    ids = np.asarray(ids)
    if not np.all(np.mod(ids, 1) == 0):
        raise FormatError("legacy labels: the 73k ids of subjectim must be integers.")
    groups = group_by_image(image_id, ids.astype(np.int64))
    cols: dict[str, list[Any]] = {c: [] for c in LEGACY_COLUMNS[1:]}
    for idx in groups:
        sel = [anns[i] for i in idx.tolist()]
        supercats = [sup_of[a["category_id"]] for a in sel]
        cats = [name_of[a["category_id"]] for a in sel]
        areas = [a["area"] for a in sel]
        j = int(np.argmax(areas)) if areas else None  # first of the largest, as np.argmax
        cols["supercats"].append(supercats)
        cols["cats"].append(cats)
        cols["areas"].append(areas)
        cols["supercat"].append(UNKNOWN if j is None else supercats[j])
        cols["cat"].append(UNKNOWN if j is None else cats[j])
    return pd.DataFrame(
        {
            "id": ids,
            "supercats": object_column(cols["supercats"]),
            "cats": object_column(cols["cats"]),
            "areas": object_column(cols["areas"]),
            "supercat": pd.array(cols["supercat"], dtype=object),
            "cat": pd.array(cols["cat"], dtype=object),
        },
        columns=list(LEGACY_COLUMNS),
    )


def summary_tsv(table: pd.DataFrame, extra: Sequence[tuple[str, str, object]] = ()) -> str:
    """Small human-readable summary of a labels table: rows, unknown count, counts per label.

    TSV with columns ``kind``, ``label``, ``count``; labels sorted by count (desc) then name;
    ``extra`` rows (e.g. which stim-info file was read, what the crop rule changed) at the end.
    """
    lines = ["kind\tlabel\tcount", f"total\trows\t{len(table)}"]
    lines.append(f"total\tunknown\t{int((table['supercat'] == UNKNOWN).sum())}")
    for col in ("supercat", "cat"):
        counts = table[col].astype(object).value_counts()
        for label, count in sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0]))):
            lines.append(f"{col}\t{label}\t{int(count)}")
    lines += [f"{kind}\t{label}\t{value}" for kind, label, value in extra]
    return "\n".join(lines) + "\n"


def write_table(table: pd.DataFrame, path: str | Path) -> None:
    """Pickle ``table`` atomically with a fixed protocol (same table -> same bytes)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            pickle.dump(table, fh, protocol=PICKLE_PROTOCOL)


def build(
    zip_path: str | Path,
    stim_info: str | Path,
    merged_out: str | Path | None,
    out: str | Path,
    *,
    legacy: bool = False,
    crop: bool = False,
    expdesign: str | Path | None = None,
    summary_out: str | Path | None = None,
    stim_info_csv: str | Path | None = None,
) -> pd.DataFrame:
    """Run the whole stage: check inputs, merge, write the merged JSON, the table and its summary.

    Modes: default; ``legacy`` (the original renumbering merge and lookup); ``crop`` (largest
    annotation inside the shown crop, see :mod:`nsdprep.coco_crop`; writes no merged JSON, which is
    the default mode's). Cheap checks (files present, zip members, stim info / expdesign content)
    run before the JSON is parsed. Which stim-info file and reader were used goes to the log and to
    the summary TSV. Returns the labels table written to ``out``.
    """
    if legacy and crop:
        raise UsageError("--legacy and --crop are two different label rules; choose one.")
    if merged_out is None and not crop:
        raise UsageError("--merged-out is needed (only --crop writes no merged JSON).")
    mode = "legacy" if legacy else "crop" if crop else "default"
    t0 = time.perf_counter()
    zip_path = Path(zip_path)
    members = instances_members(zip_path)
    sources = {s: f"{zip_path}:{m}" for s, m in members.items()}
    stim = load_stim_info(stim_info, stim_info_csv)
    info = stim.table
    extra: list[tuple[str, str, object]] = [("input", "stim_info", stim.describe())]
    shown = None
    if legacy:
        if expdesign is None:
            raise MissingInputError(
                "--legacy needs --expdesign (inputs/nsd/nsddata/experiments/nsd/nsd_expdesign.mat): "
                "the original table has one row per image shown to any subject."
            )
        ids = nsd.read_expdesign(expdesign).shown_images()
    elif crop:
        crop_boxes(info, stim.path)  # checked before the big JSON is parsed
        if expdesign is not None:
            shown = nsd.read_expdesign(expdesign).shown_images().astype(np.int64) - 1
    data = read_instances(zip_path)
    validate_splits(data, sources)
    if legacy:
        merged = merge_instances_legacy(data["train2017"], data["val2017"])
        del data
        write_json(merged, merged_out, legacy=True)
        table = legacy_label_table(merged, ids)
        del merged
    elif crop:
        default = label_table(data, info, sources)
        table, stats = crop_label_table(data, info, default, sources, stim.path)
        del data, default
        extra += stats.rows()
        if shown is not None:
            shown = shown[(shown >= 0) & (shown < len(table))]
            changed = table["supercat"].to_numpy() != table["supercat_default"].to_numpy()
            extra.append(("crop", "changed_supercat_shown", int(changed[shown].sum())))
            extra.append(("crop", "images_shown", int(shown.size)))
    else:
        table = label_table(data, info, sources)
        merged = merge_instances(data)
        write_json(merged, merged_out)
        del merged, data
    write_table(table, out)
    summary_out = Path(summary_out) if summary_out else default_summary_path(out)
    with atomic_path(summary_out) as tmp:
        tmp.write_text(summary_tsv(table, extra), encoding="utf-8")
    log.info(
        "%s labels: %d rows, %d unknown -> %s%s (%.1f s)",
        mode,
        len(table),
        int((table["supercat"] == UNKNOWN).sum()),
        out,
        f", merged -> {merged_out}" if merged_out else "",
        time.perf_counter() - t0,
    )
    return table


def default_summary_path(out: str | Path) -> Path:
    """``derivatives/coco_categories.pkl`` -> ``derivatives/coco_categories_summary.tsv``."""
    out = Path(out)
    if out.suffix == ".pkl":
        return Path(nsd.summary_path(str(out)))
    return out.with_name(f"{out.name}_summary.tsv")


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m nsdprep coco``."""
    parser.add_argument(
        "--zip",
        required=True,
        type=Path,
        help=f"COCO annotations zip (e.g. {nsd.COCO_DATASET}/{nsd.COCO_ZIP_NAME})",
    )
    parser.add_argument(
        "--stim-info",
        required=True,
        type=Path,
        help=f"nsd_stim_info_merged.pkl (e.g. {nsd.NSD_DATASET}/{nsd.STIM_INFO_KEY})",
    )
    parser.add_argument(
        "--stim-info-csv",
        type=Path,
        default=None,
        help="nsd_stim_info_merged.csv, read when the pickle cannot be (e.g. "
        f"{nsd.NSD_DATASET}/{nsd.STIM_INFO_CSV_KEY})",
    )
    parser.add_argument(
        "--merged-out",
        type=Path,
        default=None,
        help=f"merged JSON (e.g. {nsd.COCO_MERGED}); not with --crop",
    )
    parser.add_argument(
        "--out", required=True, type=Path, help=f"labels table (e.g. {nsd.COCO_CATEGORIES})"
    )
    parser.add_argument(
        "--summary-out",
        type=Path,
        default=None,
        help="summary TSV (default: next to --out, <stem>_summary.tsv)",
    )
    parser.add_argument(
        "--legacy",
        action="store_true",
        help="reproduce the original derivative (renumbering merge, lookup by 73k id)",
    )
    parser.add_argument(
        "--crop",
        action="store_true",
        help="label by the largest annotation inside the square crop NSD showed (cropBox)",
    )
    parser.add_argument(
        "--expdesign",
        type=Path,
        default=None,
        help=f"nsd_expdesign.mat, needed with --legacy (e.g. {nsd.NSD_DATASET}/"
        f"{nsd.EXPDESIGN_KEY})",
    )


def main(args: argparse.Namespace) -> int:
    """CLI entry: build the merged JSON and the labels table, print a one-line summary."""
    table = build(
        args.zip,
        args.stim_info,
        args.merged_out,
        args.out,
        legacy=args.legacy,
        crop=args.crop,
        expdesign=args.expdesign,
        summary_out=args.summary_out,
        stim_info_csv=args.stim_info_csv,
    )
    print(
        f"nsdprep coco: {len(table)} rows, {int((table['supercat'] == UNKNOWN).sum())} unknown "
        f"-> {args.out}"
    )
    return 0


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


__all__ = [
    "LABEL_COLUMNS",
    "LEGACY_COLUMNS",
    "UNKNOWN",
    "build",
    "default_summary_path",
    "instances_members",
    "label_table",
    "load_stim_info",
    "normalize_stim_info",
    "legacy_label_table",
    "merge_instances",
    "merge_instances_legacy",
    "read_instances",
    "read_stim_info",
    "summary_tsv",
    "validate_splits",
    "write_json",
    "write_table",
]
