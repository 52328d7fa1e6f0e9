"""COCO 2017 train+val merge and the per-NSD-image labels table.

Two modes:

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

Outputs are deterministic: the JSON is written with fixed separators (sorted keys in default mode;
the original's ``json.dumps`` defaults in legacy mode), the tables are pickled with a fixed protocol
from data built in a fixed order.
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import time
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

from nsdprep import nsd
from nsdprep._io import atomic_path, require_content
from nsdprep.errors import FormatError, MissingInputError
from nsdprep.nsd import UNKNOWN

log = logging.getLogger(__name__)

#: Pickle protocol of the labels tables (fixed so the bytes do not depend on Python defaults).
PICKLE_PROTOCOL = 5
#: Columns of the default labels table, in order.
LABEL_COLUMNS = ("nsdId", "cocoId", "cocoSplit", "supercats", "cats", "areas", "supercat", "cat")
#: Columns of the legacy labels table, in the original's order.
LEGACY_COLUMNS = ("id", "supercats", "cats", "areas", "supercat", "cat")

_MAX_SHOWN = 10  # ids named in an error message
_CHUNK = 20000  # items serialised per write


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def instances_members(zip_path: str | Path) -> dict[str, str]:
    """Return ``{split: member name}`` of the two instances files in the COCO annotations zip.

    Cheap (reads the zip's central directory only), so it runs before any heavy work. Members are
    ``annotations/instances_{train,val}2017.json``; a unique member with that base name elsewhere
    in the archive is accepted too.
    """
    zip_path = Path(zip_path)
    _require(zip_path, "the COCO annotations zip (annotations_trainval2017.zip)")
    try:
        with zipfile.ZipFile(zip_path) as zf:
            names = zf.namelist()
    except zipfile.BadZipFile as exc:
        raise FormatError(f"{zip_path} is not a valid zip archive ({exc}).") from exc
    members = {}
    for split in nsd.COCO_SPLITS:
        base = f"instances_{split}.json"
        exact = f"annotations/{base}"
        if exact in names:
            members[split] = exact
            continue
        found = [n for n in names if n.rsplit("/", 1)[-1] == base]
        if len(found) != 1:
            raise FormatError(
                f"{zip_path} does not contain {exact} (found {len(found)} members named {base}; "
                f"members: {sorted(names)[:20]}). Expected the COCO 2017 "
                f"annotations_trainval2017.zip with both instances files; re-download it."
            )
        members[split] = found[0]
    return members


def read_instances(zip_path: str | Path) -> dict[str, dict[str, Any]]:
    """Parse the train and val instances JSON straight from the zip (no other member is read).

    Returns ``{"train2017": {...}, "val2017": {...}}`` with the files' own content.
    """
    zip_path = Path(zip_path)
    members = instances_members(zip_path)
    out: dict[str, dict[str, Any]] = {}
    with zipfile.ZipFile(zip_path) as zf:
        for split, member in members.items():
            t0 = time.perf_counter()
            with zf.open(member) as fh:
                raw = fh.read()
            try:
                data = json.loads(raw)
            except ValueError as exc:
                raise FormatError(f"{zip_path}:{member} is not valid JSON ({exc}).") from exc
            del raw
            _check_instances_dict(data, f"{zip_path}:{member}")
            out[split] = data
            log.info(
                "read %s: %d images, %d annotations, %d categories (%.1f s)",
                member,
                len(data["images"]),
                len(data["annotations"]),
                len(data["categories"]),
                time.perf_counter() - t0,
            )
    return out


def validate_splits(data: dict[str, dict[str, Any]], sources: dict[str, str] | None = None) -> None:
    """Check the assumptions of an id-preserving merge; raise :class:`FormatError` if one fails.

    Checks: category tables identical (same entries, same order) with unique ids; image ids unique
    within and disjoint across the splits; annotation ids likewise; every annotation's ``image_id``
    is an image of its own split and its ``category_id`` a category of the table; areas finite.
    ``sources`` maps split -> file name used in messages.
    """
    sources = sources or {s: f"instances_{s}.json" for s in data}
    splits = list(data)
    cats0 = data[splits[0]]["categories"]
    for split in splits[1:]:
        cats = data[split]["categories"]
        if cats != cats0:
            a = {c.get("id"): c for c in cats0}
            b = {c.get("id"): c for c in cats}
            diff = sorted(
                {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}, key=lambda x: str(x)
            )
            what = f"category ids differing: {diff[:_MAX_SHOWN]}" if diff else "order differs"
            raise FormatError(
                f"category tables differ between {sources[splits[0]]} and {sources[split]} "
                f"({what}). An id-preserving merge needs one category table; check the zip."
            )
    cat_ids = np.array([_get(c, "id", sources[splits[0]], "category") for c in cats0])
    _check_unique(cat_ids, f"category ids in {sources[splits[0]]}")

    image_ids = {s: _ids(data[s]["images"], "id", sources[s], "image") for s in splits}
    ann = {s: _annotation_arrays(data[s]["annotations"], sources[s]) for s in splits}
    for s in splits:
        _check_unique(image_ids[s], f"image ids in {sources[s]}")
        _check_unique(ann[s]["id"], f"annotation ids in {sources[s]}")
        orphan = ~np.isin(ann[s]["image_id"], image_ids[s])
        if orphan.any():
            bad = np.unique(ann[s]["image_id"][orphan])
            raise FormatError(
                f"{sources[s]}: {orphan.sum()} annotations refer to image ids that are not images "
                f"of that file: {bad[:_MAX_SHOWN].tolist()}. The file is corrupt or truncated."
            )
        badcat = ~np.isin(ann[s]["category_id"], cat_ids)
        if badcat.any():
            raise FormatError(
                f"{sources[s]}: annotations with category ids not in the category table: "
                f"{np.unique(ann[s]['category_id'][badcat])[:_MAX_SHOWN].tolist()}."
            )
        if not np.isfinite(ann[s]["area"]).all():
            bad = ann[s]["id"][~np.isfinite(ann[s]["area"])]
            raise FormatError(
                f"{sources[s]}: annotations with a non-finite area: ids {bad[:_MAX_SHOWN].tolist()}."
            )
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            for what, xa, xb in (
                ("image ids", image_ids[a], image_ids[b]),
                ("annotation ids", ann[a]["id"], ann[b]["id"]),
            ):
                both = np.intersect1d(xa, xb)
                if both.size:
                    raise FormatError(
                        f"{what} overlap between {sources[a]} and {sources[b]}: {both.size} shared, "
                        f"e.g. {both[:_MAX_SHOWN].tolist()}. Merging while keeping the original "
                        f"ids is impossible; check that the zip holds the COCO 2017 files."
                    )


def merge_instances(data: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Merge the splits keeping every original id (call :func:`validate_splits` first).

    ``info`` and ``licenses`` come from the first split (train), ``categories`` is the common
    table, ``images`` and ``annotations`` are train's followed by val's, unchanged.
    """
    splits = list(data)
    first = data[splits[0]]
    merged: dict[str, Any] = {k: v for k, v in first.items() if k not in ("images", "annotations")}
    merged["images"] = [x for s in splits for x in data[s]["images"]]
    merged["annotations"] = [x for s in splits for x in data[s]["annotations"]]
    for s in splits[1:]:
        if data[s].get("licenses") != first.get("licenses"):
            log.warning("licenses differ between %s and %s; keeping %s's", splits[0], s, splits[0])
    return merged


def merge_instances_legacy(train: dict[str, Any], val: dict[str, Any]) -> dict[str, Any]:
    """Reproduce the original renumbering merge (see the module docstring); inputs are not changed.

    Everything but ``images`` and ``annotations`` comes from ``train`` (as in the original, which
    shallow-copied the train dict). Dict semantics of the original are kept (a duplicated id maps
    to its last position).
    """
    if not train["images"] or not train["annotations"]:
        raise FormatError(
            "legacy merge: the train split has no images or no annotations; the original merge "
            "takes the max of the train ids and cannot run on it."
        )
    b1 = {img["id"]: i for i, img in enumerate(train["images"])}
    off_img = max(b1)
    b2 = {img["id"]: i + off_img for i, img in enumerate(val["images"])}
    b3 = {a["id"]: i for i, a in enumerate(train["annotations"])}
    off_ann = max(b3)
    b4 = {a["id"]: off_ann + i for i, a in enumerate(val["annotations"])}
    try:
        images = [{**img, "id": b1[img["id"]]} for img in train["images"]]
        images += [{**img, "id": b2[img["id"]]} for img in val["images"]]
        anns = [
            {**a, "id": b3[a["id"]], "image_id": b1[a["image_id"]]} for a in train["annotations"]
        ]
        anns += [
            {**a, "id": b4[a["id"]], "image_id": b2[a["image_id"]]} for a in val["annotations"]
        ]
    except KeyError as exc:
        raise FormatError(
            f"legacy merge: an annotation refers to image id {exc.args[0]} absent from its split."
        ) from exc
    merged = dict(train)
    merged["images"] = images
    merged["annotations"] = anns
    clash = len({img["id"] for img in images}) != len(images)
    if clash:
        log.warning("legacy merge: renumbered image ids collide (reproduced as the original did)")
    return merged


def write_json(obj: dict[str, Any], path: str | Path, *, legacy: bool = False) -> None:
    """Write ``obj`` atomically and deterministically, streaming its big lists.

    Default: ``sort_keys=True``, separators ``(",", ":")``. ``legacy=True``: byte-identical to the
    original's ``json.dumps(obj)`` (insertion order, separators ``(", ", ": ")``). ASCII output.
    """
    opts: dict[str, Any] = (
        {"sort_keys": False, "separators": (", ", ": "), "allow_nan": True}
        if legacy
        else {"sort_keys": True, "separators": (",", ":"), "allow_nan": False}
    )
    try:
        with atomic_path(path) as tmp, open(tmp, "w", encoding="ascii", newline="\n") as fh:
            _dump_streaming(obj, fh, **opts)
    except ValueError as exc:  # NaN/Infinity: not valid JSON
        raise FormatError(f"cannot write {path} as strict JSON: {exc}") from exc


def read_stim_info(path: str | Path) -> pd.DataFrame:
    """Load ``nsd_stim_info_merged.pkl`` and check what the labels need.

    Needs columns ``cocoId`` (integer) and ``cocoSplit`` (``train2017``/``val2017``); if an
    ``nsdId`` column exists, row position must equal it (the table is indexed by 0-based nsdId).
    """
    path = Path(path)
    _require(path, "nsd_stim_info_merged.pkl")
    try:
        df = pd.read_pickle(path)
    except Exception as exc:  # unpickling can raise about anything
        raise FormatError(f"{path} could not be read as a pandas pickle: {exc!r}") from exc
    if not isinstance(df, pd.DataFrame):
        raise FormatError(f"{path}: expected a pandas DataFrame, found {type(df).__name__}.")
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
            f"{sorted({str(x) for x in splits[bad]})[:_MAX_SHOWN]} (rows "
            f"{np.flatnonzero(bad)[:_MAX_SHOWN].tolist()})."
        )
    if "nsdId" in df.columns:
        nsd_ids = df["nsdId"].to_numpy()
        wrong = np.flatnonzero(nsd_ids != np.arange(len(df)))
        if wrong.size:
            raise FormatError(
                f"{path}: row position must equal nsdId (0-based); rows {wrong[:_MAX_SHOWN].tolist()}"
                f" hold nsdId {nsd_ids[wrong[:_MAX_SHOWN]].tolist()}."
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
    image_ids = {s: _ids(d["images"], "id", sources[s], "image") for s, d in data.items()}
    found_in = np.full(n, "", dtype=object)
    for s, ids in image_ids.items():
        found_in[np.isin(coco_ids, ids) & (found_in == "")] = s
    nowhere = np.flatnonzero(found_in == "")
    if nowhere.size:
        raise FormatError(
            f"{nowhere.size} NSD images have a cocoId that is an image of no split "
            f"({', '.join(sources.values())}): nsdId {nowhere[:_MAX_SHOWN].tolist()} -> cocoId "
            f"{coco_ids[nowhere[:_MAX_SHOWN]].tolist()}. The stim info and the COCO zip do not match."
        )
    wrong = np.flatnonzero(found_in != coco_splits)
    if wrong.size:
        i = wrong[:_MAX_SHOWN]
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
        ann = _annotation_arrays(d["annotations"], sources[split])
        sup_of, name_of = _category_lookup(d["categories"])
        groups = _group_by_image(ann["image_id"], coco_ids[rows])
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
            "supercats": _object_column(supercats),
            "cats": _object_column(cats),
            "areas": _object_column(areas),
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
    sup_of, name_of = _category_lookup(merged_legacy["categories"])
    ids = np.asarray(ids)
    if not np.all(np.mod(ids, 1) == 0):
        raise FormatError("legacy labels: the 73k ids of subjectim must be integers.")
    groups = _group_by_image(image_id, ids.astype(np.int64))
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
            "supercats": _object_column(cols["supercats"]),
            "cats": _object_column(cols["cats"]),
            "areas": _object_column(cols["areas"]),
            "supercat": pd.array(cols["supercat"], dtype=object),
            "cat": pd.array(cols["cat"], dtype=object),
        },
        columns=list(LEGACY_COLUMNS),
    )


def summary_tsv(table: pd.DataFrame) -> str:
    """Small human-readable summary of a labels table: rows, unknown count, counts per label.

    TSV with columns ``kind``, ``label``, ``count``; labels sorted by count (desc) then name.
    """
    lines = ["kind\tlabel\tcount", f"total\trows\t{len(table)}"]
    lines.append(f"total\tunknown\t{int((table['supercat'] == UNKNOWN).sum())}")
    for col in ("supercat", "cat"):
        counts = table[col].astype(object).value_counts()
        for label, count in sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0]))):
            lines.append(f"{col}\t{label}\t{int(count)}")
    return "\n".join(lines) + "\n"


def write_table(table: pd.DataFrame, path: str | Path) -> None:
    """Pickle ``table`` atomically with a fixed protocol (same table -> same bytes)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            pickle.dump(table, fh, protocol=PICKLE_PROTOCOL)


def build(
    zip_path: str | Path,
    stim_info: str | Path,
    merged_out: str | Path,
    out: str | Path,
    *,
    legacy: bool = False,
    expdesign: str | Path | None = None,
    summary_out: str | Path | None = None,
) -> pd.DataFrame:
    """Run the whole stage: check inputs, merge, write the merged JSON, the table and its summary.

    Cheap checks (files present, zip members, stim info / expdesign content) run before the JSON
    is parsed. Returns the labels table written to ``out``.
    """
    t0 = time.perf_counter()
    zip_path = Path(zip_path)
    members = instances_members(zip_path)
    sources = {s: f"{zip_path}:{m}" for s, m in members.items()}
    info = read_stim_info(stim_info)
    if legacy:
        if expdesign is None:
            raise MissingInputError(
                "--legacy needs --expdesign (inputs/nsd/nsddata/experiments/nsd/nsd_expdesign.mat): "
                "the original table has one row per image shown to any subject."
            )
        ids = nsd.read_expdesign(expdesign).shown_images()
    data = read_instances(zip_path)
    validate_splits(data, sources)
    if legacy:
        merged = merge_instances_legacy(data["train2017"], data["val2017"])
        del data
        write_json(merged, merged_out, legacy=True)
        table = legacy_label_table(merged, ids)
        del merged
    else:
        table = label_table(data, info, sources)
        merged = merge_instances(data)
        write_json(merged, merged_out)
        del merged, data
    write_table(table, out)
    summary_out = Path(summary_out) if summary_out else default_summary_path(out)
    with atomic_path(summary_out) as tmp:
        tmp.write_text(summary_tsv(table), encoding="utf-8")
    log.info(
        "%s labels: %d rows, %d unknown -> %s, merged -> %s (%.1f s)",
        "legacy" if legacy else "default",
        len(table),
        int((table["supercat"] == UNKNOWN).sum()),
        out,
        merged_out,
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
        "--merged-out", required=True, type=Path, help=f"merged JSON (e.g. {nsd.COCO_MERGED})"
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
        expdesign=args.expdesign,
        summary_out=args.summary_out,
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


def _check_instances_dict(data: Any, source: str) -> None:
    if not isinstance(data, dict):
        raise FormatError(f"{source}: expected a JSON object, found {type(data).__name__}.")
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise FormatError(f"{source}: missing key(s) {missing}; keys found: {sorted(data)}.")
    for k in ("images", "annotations", "categories"):
        if not isinstance(data[k], list):
            raise FormatError(f"{source}: '{k}' must be a list, is {type(data[k]).__name__}.")


def _get(item: dict[str, Any], key: str, source: str, what: str) -> Any:
    try:
        return item[key]
    except (KeyError, TypeError) as exc:
        raise FormatError(f"{source}: a {what} entry has no '{key}': {str(item)[:200]}") from exc


def _ids(items: Sequence[dict[str, Any]], key: str, source: str, what: str) -> np.ndarray:
    try:
        return np.fromiter((x[key] for x in items), dtype=np.int64, count=len(items))
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"{source}: every {what} needs an integer '{key}' ({exc!r}).") from exc


def _annotation_arrays(anns: Sequence[dict[str, Any]], source: str) -> dict[str, np.ndarray]:
    n = len(anns)
    try:
        return {
            "id": np.fromiter((a["id"] for a in anns), dtype=np.int64, count=n),
            "image_id": np.fromiter((a["image_id"] for a in anns), dtype=np.int64, count=n),
            "category_id": np.fromiter((a["category_id"] for a in anns), dtype=np.int64, count=n),
            "area": np.fromiter((a["area"] for a in anns), dtype=np.float64, count=n),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(
            f"{source}: every annotation needs integer 'id', 'image_id', 'category_id' and a "
            f"numeric 'area' ({exc!r})."
        ) from exc


def _check_unique(ids: np.ndarray, what: str) -> None:
    uniq, counts = np.unique(ids, return_counts=True)
    dup = uniq[counts > 1]
    if dup.size:
        raise FormatError(f"duplicate {what}: {dup[:_MAX_SHOWN].tolist()}.")


def _category_lookup(categories: Iterable[dict[str, Any]]) -> tuple[dict[int, str], dict[int, str]]:
    sup = {}
    name = {}
    for c in categories:
        sup[c["id"]] = c["supercategory"]
        name[c["id"]] = c["name"]
    return sup, name


def _group_by_image(ann_image_id: np.ndarray, wanted: np.ndarray) -> list[np.ndarray]:
    """For each wanted image id, the positions of its annotations in ascending (file) order."""
    order = np.argsort(ann_image_id, kind="stable")
    sorted_ids = ann_image_id[order]
    lo = np.searchsorted(sorted_ids, wanted, side="left")
    hi = np.searchsorted(sorted_ids, wanted, side="right")
    return [order[a:b] for a, b in zip(lo.tolist(), hi.tolist(), strict=True)]


def _object_column(values: list[Any]) -> np.ndarray:
    col = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        col[i] = v
    return col


def _dump_streaming(
    obj: dict[str, Any],
    fh: IO[str],
    *,
    sort_keys: bool,
    separators: tuple[str, str],
    allow_nan: bool = True,
    stream_keys: tuple[str, ...] = ("images", "annotations"),
) -> None:
    """Write ``json.dumps(obj, sort_keys=..., separators=...)`` to ``fh`` without building it."""
    item_sep, key_sep = separators

    def dumps(x: Any) -> str:
        return json.dumps(x, sort_keys=sort_keys, separators=separators, allow_nan=allow_nan)

    keys = sorted(obj) if sort_keys else list(obj)
    fh.write("{")
    for i, key in enumerate(keys):
        if i:
            fh.write(item_sep)
        fh.write(dumps(key) + key_sep)
        value = obj[key]
        if key in stream_keys and isinstance(value, list):
            fh.write("[")
            for start in range(0, len(value), _CHUNK):
                if start:
                    fh.write(item_sep)
                fh.write(item_sep.join(dumps(x) for x in value[start : start + _CHUNK]))
            fh.write("]")
        else:
            fh.write(dumps(value))
    fh.write("}")


__all__ = [
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
    "read_stim_info",
    "summary_tsv",
    "validate_splits",
    "write_json",
    "write_table",
]
