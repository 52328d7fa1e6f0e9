"""COCO 2017 instances: read both splits from the annotations zip, check them, merge, write JSON.

The default merge keeps every original id, after checking that the splits' category tables are
identical and their image and annotation ids disjoint. The legacy merge reproduces the original
renumbering (``merge.py`` of mohamadmansourX/Merge_COCO_FILES, see :mod:`nsdprep.stages.labels`). JSON is
written deterministically (fixed separators; sorted keys in default mode) and streamed, so the merged
file is never built as one string.

The zip comes from a mirror: its members are inflated under bounds. Each instances member must be
deflated or stored (bzip2/lzma inflate a whole read at once), declare at most ``max_bytes``
(:data:`DEFAULT_MAX_JSON_BYTES`; the real ``instances_train2017.json`` is about 448 MB), and inflate
to exactly what it declares, counted while streaming. Before parsing, the JSON's values are counted
(``, : [ {``) for an upper estimate of what the parse takes: text over :data:`MAX_PARSE_FACTOR` times
its size is refused (``[[],[],...]`` takes over 20 times its size; a COCO-like 451 MB file estimates
at 11.4 and takes about 5.5).
"""

from __future__ import annotations

import json
import logging
import time
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from nsdprep.core import nsd
from nsdprep.core._io import atomic_path, require_content
from nsdprep.core.errors import FormatError

log = logging.getLogger(__name__)

MAX_SHOWN = 10  # ids named in an error message
_CHUNK = 20000  # items serialised per write

#: Largest inflated size of an instances JSON (``COCO_MAX_MB``); the real train file is ~448 MB.
DEFAULT_MAX_JSON_BYTES = 2 * 1024**3
#: Upper bound of the memory one JSON value (counted by its ``,``, ``:``, ``[`` or ``{``) takes
#: once parsed (measured worst cases: unique short strings and ``{"a":{}}`` ~64 bytes per count).
JSON_VALUE_BYTES = 72
#: A JSON whose estimated parse (text + values) exceeds this many times its size is refused; the
#: COCO-like files estimate at ~11 (a 451 MB one parsed to ~5.5 times its size).
MAX_PARSE_FACTOR = 20
_READ = 1 << 20  # inflated bytes per read
_INFLATABLE = (zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED)


def _require(path: Path, what: str) -> None:
    require_content(path, what, "it does not exist; run `make inputs` / check the path.")


def instances_members(
    zip_path: str | Path, *, max_bytes: int = DEFAULT_MAX_JSON_BYTES
) -> dict[str, str]:
    """Return ``{split: member name}`` of the two instances files in the COCO annotations zip.

    Cheap (reads the zip's central directory only), so it runs before any heavy work. Members are
    ``annotations/instances_{train,val}2017.json``; a unique member with that base name elsewhere
    in the archive is accepted too. Each must be deflated or stored and declare at most
    ``max_bytes`` once inflated (:class:`FormatError` otherwise, naming the zip, the member, the
    declared and the allowed size).
    """
    zip_path = Path(zip_path)
    _require(zip_path, "the COCO annotations zip (annotations_trainval2017.zip)")
    try:
        with zipfile.ZipFile(zip_path) as zf:
            infos = {i.filename: i for i in zf.infolist()}
    except (zipfile.BadZipFile, OSError) as exc:
        raise FormatError(f"{zip_path} is not a valid zip archive ({exc}).") from exc
    names = list(infos)
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
    for member in members.values():
        _check_member(zip_path, infos[member], max_bytes)
    return members


def read_instances(
    zip_path: str | Path, *, max_bytes: int = DEFAULT_MAX_JSON_BYTES
) -> dict[str, dict[str, Any]]:
    """Parse the train and val instances JSON straight from the zip (no other member is read).

    Returns ``{"train2017": {...}, "val2017": {...}}`` with the files' own content. Each member is
    inflated under the bounds of :func:`instances_members` and of the module docstring; the
    inflated bytes are freed once decoded, before the parse.
    """
    zip_path = Path(zip_path)
    members = instances_members(zip_path, max_bytes=max_bytes)
    out: dict[str, dict[str, Any]] = {}
    with zipfile.ZipFile(zip_path) as zf:
        for split, member in members.items():
            t0 = time.perf_counter()
            source = f"{zip_path}:{member}"
            text = _inflate_text(zf, zf.getinfo(member), source, max_bytes)
            try:
                data = json.loads(text)
            except RecursionError as exc:
                raise FormatError(f"{source} is not valid JSON (nested too deeply).") from exc
            except ValueError as exc:
                raise FormatError(f"{source} is not valid JSON ({exc}).") from exc
            del text
            _check_instances_dict(data, source)
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


def _check_member(zip_path: Path, info: zipfile.ZipInfo, max_bytes: int) -> None:
    """Refuse a member that cannot be inflated under bounds, from its central-directory entry."""
    source = f"{zip_path}:{info.filename}"
    if info.compress_type not in _INFLATABLE:
        raise FormatError(
            f"{source} is compressed with method {info.compress_type}; only deflate (8) or stored "
            "(0) members are inflated, as in the COCO zip: the zip is damaged or forged."
        )
    if info.file_size > max_bytes:
        raise FormatError(
            f"{source} declares {info.file_size} bytes once inflated, {max_bytes} allowed (the "
            "real instances_train2017.json has about 448 MB): the zip is damaged or forged, or "
            "raise the limit (COCO_MAX_MB)."
        )


def _inflate_text(zf: zipfile.ZipFile, info: zipfile.ZipInfo, source: str, max_bytes: int) -> str:
    """Inflate one member, counting: never more than it declares; its JSON values counted too."""
    declared = info.file_size
    lying = (
        f"{source} does not inflate to its declared {declared} bytes ({max_bytes} allowed): the "
        "zip is damaged or forged; download it again."
    )
    buf = bytearray()
    values = 1
    try:
        with zf.open(info) as fh:
            while chunk := fh.read(_READ):
                if len(buf) + len(chunk) > declared:
                    raise FormatError(lying)
                buf += chunk
                values += sum(chunk.count(c) for c in (b",", b":", b"[", b"{"))
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise FormatError(f"{lying[:-1]} ({exc}).") from exc
    if len(buf) != declared:
        raise FormatError(lying)
    estimate = len(buf) + JSON_VALUE_BYTES * values
    if estimate > MAX_PARSE_FACTOR * max(len(buf), 1):
        raise FormatError(
            f"{source}: {values} JSON values in {len(buf)} bytes would take about "
            f"{estimate >> 20} MiB once parsed, over {MAX_PARSE_FACTOR} times the text (COCO's "
            "files: about 11): not an instances file; the zip is damaged or forged."
        )
    try:
        return buf.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{source} is not UTF-8 JSON ({exc}).") from exc


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
            what = f"category ids differing: {diff[:MAX_SHOWN]}" if diff else "order differs"
            raise FormatError(
                f"category tables differ between {sources[splits[0]]} and {sources[split]} "
                f"({what}). An id-preserving merge needs one category table; check the zip."
            )
    cat_ids = np.array([_get(c, "id", sources[splits[0]], "category") for c in cats0])
    _check_unique(cat_ids, f"category ids in {sources[splits[0]]}")

    image_ids = {s: ids_of(data[s]["images"], "id", sources[s], "image") for s in splits}
    ann = {s: annotation_arrays(data[s]["annotations"], sources[s]) for s in splits}
    for s in splits:
        _check_unique(image_ids[s], f"image ids in {sources[s]}")
        _check_unique(ann[s]["id"], f"annotation ids in {sources[s]}")
        orphan = ~np.isin(ann[s]["image_id"], image_ids[s])
        if orphan.any():
            bad = np.unique(ann[s]["image_id"][orphan])
            raise FormatError(
                f"{sources[s]}: {orphan.sum()} annotations refer to image ids that are not images "
                f"of that file: {bad[:MAX_SHOWN].tolist()}. The file is corrupt or truncated."
            )
        badcat = ~np.isin(ann[s]["category_id"], cat_ids)
        if badcat.any():
            raise FormatError(
                f"{sources[s]}: annotations with category ids not in the category table: "
                f"{np.unique(ann[s]['category_id'][badcat])[:MAX_SHOWN].tolist()}."
            )
        if not np.isfinite(ann[s]["area"]).all():
            bad = ann[s]["id"][~np.isfinite(ann[s]["area"])]
            raise FormatError(
                f"{sources[s]}: annotations with a non-finite area: ids {bad[:MAX_SHOWN].tolist()}."
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
                        f"e.g. {both[:MAX_SHOWN].tolist()}. Merging while keeping the original "
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


def ids_of(items: Sequence[dict[str, Any]], key: str, source: str, what: str) -> np.ndarray:
    """The integer ``key`` of every item, as int64 (a clear error naming ``what`` otherwise)."""
    try:
        return np.fromiter((x[key] for x in items), dtype=np.int64, count=len(items))
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"{source}: every {what} needs an integer '{key}' ({exc!r}).") from exc


def annotation_arrays(anns: Sequence[dict[str, Any]], source: str) -> dict[str, np.ndarray]:
    """``image_id``, ``category_id`` and ``area`` of every annotation, as arrays."""
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
        raise FormatError(f"duplicate {what}: {dup[:MAX_SHOWN].tolist()}.")


def category_lookup(categories: Iterable[dict[str, Any]]) -> tuple[dict[int, str], dict[int, str]]:
    """``(supercategory by id, name by id)`` of a COCO category table."""
    sup = {}
    name = {}
    for c in categories:
        sup[c["id"]] = c["supercategory"]
        name[c["id"]] = c["name"]
    return sup, name


def group_by_image(ann_image_id: np.ndarray, wanted: np.ndarray) -> list[np.ndarray]:
    """For each wanted image id, the positions of its annotations in ascending (file) order."""
    order = np.argsort(ann_image_id, kind="stable")
    sorted_ids = ann_image_id[order]
    lo = np.searchsorted(sorted_ids, wanted, side="left")
    hi = np.searchsorted(sorted_ids, wanted, side="right")
    return [order[a:b] for a, b in zip(lo.tolist(), hi.tolist(), strict=True)]


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
