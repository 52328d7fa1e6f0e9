"""COCO 2017 train+val merge and the per-NSD-image labels table.

Three modes (``LABELS=``):

* **default** (correct): ``instances_train2017.json`` and ``instances_val2017.json`` are merged
  *keeping every original id* (after checking that the splits' category tables are identical and
  their image and annotation ids disjoint). Each NSD image (``nsdId``, 0-based) is labelled from the
  annotations of its own ``cocoId`` in the split named by ``nsd_stim_info_merged``: all
  instance labels (``supercats``, ``cats``, ``areas``, in annotation order) plus the labels of the
  largest-area annotation (``supercat``, ``cat``; ties go to the first; ``"unknown"`` if none).
* **legacy** (``--labels legacy``): reproduces the original hand-made derivative, defects included. The
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
  square crop NSD showed* (``cropBox``), beside the default labels; see :mod:`nsdprep.stages.labels.crop`.

The stim info is read from ``nsd_stim_info_merged.csv``; the pickle beside it is never opened, since
unpickling a downloaded file runs whatever code it names (:mod:`nsdprep.stages.labels.stim_info`). The
summary TSV records the file read (``input stim_info ...``).

Outputs are deterministic: the JSON is written with fixed separators (sorted keys in default mode;
the original's ``json.dumps`` defaults in legacy mode), the tables are pickled with a fixed protocol
from data built in a fixed order. Each table is also written as a TSV sidecar (``x.pkl`` -> ``x.tsv``,
:mod:`nsdprep.core.tables`): the pipeline's own readers load that, never the pickle.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nsdprep import options
from nsdprep.core import nsd, tables
from nsdprep.core._io import atomic_path
from nsdprep.core.errors import FormatError, MissingInputError, UsageError
from nsdprep.core.nsd import UNKNOWN
from nsdprep.stages.labels.crop import crop_boxes, crop_label_table, object_column
from nsdprep.stages.labels.instances import (
    DEFAULT_MAX_JSON_BYTES,
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
from nsdprep.stages.labels.stim_info import load_stim_info

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


def write_table(table: pd.DataFrame, path: str | Path) -> Path:
    """Write ``table`` as a pickle and as its TSV sidecar, each atomically; return the sidecar.

    The pickle (fixed protocol: same table -> same bytes) is what users load with
    ``pd.read_pickle``; the sidecar (:func:`nsdprep.core.tables.sidecar_path`, ``x.pkl`` ->
    ``x.tsv``) holds the same table for the pipeline's own readers, which never unpickle.
    """
    sidecar = tables.sidecar_path(path)
    tables.write_table_tsv(table, sidecar)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            pickle.dump(table, fh, protocol=PICKLE_PROTOCOL)
    return sidecar


def build(
    zip_path: str | Path,
    stim_info: str | Path,
    merged_out: str | Path | None,
    out: str | Path,
    *,
    labels: nsd.LabelMode = "default",
    expdesign: str | Path | None = None,
    summary_out: str | Path | None = None,
    stim_info_csv: str | Path | None = None,
    max_json_mb: float = DEFAULT_MAX_JSON_BYTES / 2**20,
) -> pd.DataFrame:
    """Run the whole stage: check inputs, merge, write the merged JSON, the table and its summary.

    Label rules (``labels``): default; ``legacy`` (the original renumbering merge and lookup); ``crop`` (largest
    annotation inside the shown crop, see :mod:`nsdprep.stages.labels.crop`; writes no merged JSON, which is
    the default mode's). Cheap checks (files present, zip members, stim info / expdesign content)
    run before the JSON is parsed. Which stim-info file and reader were used goes to the log and to
    the summary TSV. ``max_json_mb`` (MiB, ``COCO_MAX_MB``) bounds the inflated size of each
    instances JSON (see :mod:`nsdprep.stages.labels.instances`). Returns the labels table written
    to ``out``.
    """
    if labels not in nsd.LABEL_MODES:
        raise UsageError(f"LABELS={labels!r}: expected one of {', '.join(nsd.LABEL_MODES)}")
    legacy, crop = labels == "legacy", labels == "crop"
    if merged_out is None and not crop:
        raise UsageError("--merged-out is needed (only LABELS=crop writes no merged JSON).")
    t0 = time.perf_counter()
    zip_path = Path(zip_path)
    if not max_json_mb > 0:
        raise UsageError(f"the COCO JSON size limit must be positive, got {max_json_mb!r} MiB.")
    max_bytes = int(max_json_mb * 2**20)
    members = instances_members(zip_path, max_bytes=max_bytes)
    sources = {s: f"{zip_path}:{m}" for s, m in members.items()}
    stim = load_stim_info(stim_info, stim_info_csv)
    info = stim.table
    extra: list[tuple[str, str, object]] = [("input", "stim_info", stim.describe())]
    shown = None
    if legacy:
        if expdesign is None:
            raise MissingInputError(
                "--labels legacy needs --expdesign (inputs/nsd/nsddata/experiments/nsd/nsd_expdesign.mat): "
                "the original table has one row per image shown to any subject."
            )
        ids = nsd.read_expdesign(expdesign).shown_images()
    elif crop:
        crop_boxes(info, stim.path)  # checked before the big JSON is parsed
        if expdesign is not None:
            shown = nsd.read_expdesign(expdesign).shown_images().astype(np.int64) - 1
    data = read_instances(zip_path, max_bytes=max_bytes)
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
        labels,
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
        help=f"NSD's stim info, read from its CSV (e.g. {nsd.NSD_DATASET}/{nsd.STIM_INFO_CSV_KEY}); "
        "a .pkl path means the CSV beside it: no pickle is ever opened",
    )
    parser.add_argument(
        "--stim-info-csv",
        type=Path,
        default=None,
        help="the stim-info CSV, when it is not beside --stim-info",
    )
    parser.add_argument(
        "--merged-out",
        type=Path,
        default=None,
        help=f"merged JSON (e.g. {nsd.COCO_MERGED}); not with --labels crop",
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
        "--expdesign",
        type=Path,
        default=None,
        help=f"nsd_expdesign.mat, needed with --labels legacy (e.g. {nsd.NSD_DATASET}/"
        f"{nsd.EXPDESIGN_KEY})",
    )

    options.add_arguments(parser, options.passed_to("coco-labels"))


def main(args: argparse.Namespace) -> int:
    """CLI entry: build the merged JSON and the labels table, print a one-line summary."""
    opts = options.from_args(args)
    table = build(
        args.zip,
        args.stim_info,
        args.merged_out,
        args.out,
        labels=opts.labels,
        max_json_mb=opts.coco_max_mb,
        expdesign=args.expdesign,
        summary_out=args.summary_out,
        stim_info_csv=args.stim_info_csv,
    )
    print(
        f"nsdprep coco: {len(table)} rows, {int((table['supercat'] == UNKNOWN).sum())} unknown "
        f"-> {args.out}"
    )
    return 0


__all__ = [
    "DEFAULT_MAX_JSON_BYTES",
    "LABEL_COLUMNS",
    "LEGACY_COLUMNS",
    "UNKNOWN",
    "build",
    "default_summary_path",
    "instances_members",
    "label_table",
    "legacy_label_table",
    "merge_instances",
    "merge_instances_legacy",
    "read_instances",
    "summary_tsv",
    "validate_splits",
    "write_json",
    "write_table",
]
