"""Crop-aware labels: the largest annotation *inside the square crop NSD showed* (``LABELS=crop``).

NSD showed a square crop of each COCO picture, scaled to 425 x 425. ``cropBox`` in
``nsd_stim_info_merged`` holds ``(top, bottom, left, right)``: the fraction of the picture's height
(top, bottom) or width (left, right) cut from each side; NSD cropped along the longer side only, so two
entries are 0 (NSD data manual, Experiments page). The shown rectangle is therefore
``x in [left * W, (1 - right) * W)``, ``y in [top * H, (1 - bottom) * H)`` (as clane9/NSD-Flat applies
it). COCO areas are measured on the whole picture, so the default rule can pick an object that was
mostly cut away.

Area inside the crop, per annotation:

* from its segmentation mask, as pycocotools' ``COCO.annToRLE`` builds it (polygons rasterized with
  ``mask.frPyObjects`` and merged; uncompressed RLE converted; compressed RLE as is), intersected
  with the crop rectangle's RLE (``mask.merge(..., intersect=True)``) and counted
  (``mask.area``). A pixel counts when it is in the mask and its centre lies inside the crop
  rectangle (for real COCO sizes the crop edges are whole pixels, so this is exact; NSD's own
  rounding is not documented);
* from its ``bbox`` (intersected with the crop rectangle) only when it has no usable segmentation
  (missing, empty, or only polygons with fewer than 3 points; a 4-number polygon would otherwise be
  read as a box by ``frPyObjects``). Such annotations are counted in the summary.

The label is the supercategory/category of the first annotation with the largest area inside the
crop (ties: the first in annotation order, as the default rule); ``"unknown"`` when the picture has no
annotation or none reaches into the crop. For an uncropped (square) picture the crop rule compares mask
areas, which can differ a little from COCO's ``area`` field; such changes are counted apart.
"""

from __future__ import annotations

import ast
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nsdprep.core.errors import FormatError
from nsdprep.core.nsd import UNKNOWN
from nsdprep.stages.labels.instances import MAX_SHOWN, category_lookup, group_by_image

log = logging.getLogger(__name__)

#: Columns of the crop labels table, in order. ``supercat``/``cat`` follow the crop rule; the
#: ``*_default`` columns hold the default rule's labels for comparison.
CROP_COLUMNS = (
    "nsdId",
    "cocoId",
    "cocoSplit",
    "cropBox",
    "supercats",
    "cats",
    "areas",
    "areas_crop",
    "supercat",
    "cat",
    "supercat_default",
    "cat_default",
)


@dataclass(frozen=True)
class CropStats:
    """What the crop rule changed, for the summary TSV."""

    images: int
    changed_supercat: int
    changed_cat: int
    changed_supercat_uncropped: int
    unknown_only_in_crop: int
    bbox_fallback_annotations: int

    def rows(self) -> list[tuple[str, str, int]]:
        """``(kind, label, count)`` rows of the summary TSV."""
        return [
            ("crop", "changed_supercat", self.changed_supercat),
            ("crop", "changed_cat", self.changed_cat),
            ("crop", "changed_supercat_uncropped_pictures", self.changed_supercat_uncropped),
            ("crop", "unknown_only_in_crop", self.unknown_only_in_crop),
            ("crop", "bbox_fallback_annotations", self.bbox_fallback_annotations),
        ]


def crop_boxes(stim_info: pd.DataFrame, source: str | Path = "stim info") -> np.ndarray:
    """``cropBox`` of every row as an ``(n, 4)`` float array ``(top, bottom, left, right)``.

    Cells may be tuples, lists or their text form. Each fraction must be finite, in ``[0, 1)``,
    and ``top + bottom`` and ``left + right`` below 1.
    """
    if "cropBox" not in stim_info.columns:
        raise FormatError(
            f"{source}: no cropBox column; crop-aware labels need NSD's cropBox "
            "(top, bottom, left, right) for every image."
        )
    out = np.empty((len(stim_info), 4), dtype=np.float64)
    for i, cell in enumerate(stim_info["cropBox"].tolist()):
        value = parse_box_cell(cell, source, i)
        try:
            box = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            box = ()
        if len(box) != 4:
            raise FormatError(
                f"{source}: cropBox of row {i} is {cell!r}; expected four numbers "
                "(top, bottom, left, right)."
            )
        out[i] = box
    bad = ~np.all(np.isfinite(out) & (out >= 0) & (out < 1), axis=1)
    bad |= (out[:, 0] + out[:, 1] >= 1) | (out[:, 2] + out[:, 3] >= 1)
    if bad.any():
        rows = np.flatnonzero(bad)[:MAX_SHOWN]
        raise FormatError(
            f"{source}: cropBox must hold fractions in [0, 1) cutting less than the whole picture; "
            f"rows {rows.tolist()} hold {out[rows].tolist()}."
        )
    return out


#: Longest ``cropBox`` text parsed (four floats written by ``repr`` take under 100).
MAX_BOX_TEXT = 200


def parse_box_cell(value: Any, source: str | Path, row: int) -> Any:
    """A ``cropBox`` cell as a tuple: tuples as they are, lists/arrays and text safely converted.

    The CSV holds the tuple's text, ``"(0, 0, 0.1671875, 0.1671875)"`` (``ast.literal_eval``, on
    at most :data:`MAX_BOX_TEXT` characters: a long or deeply nested text is refused unparsed).
    """
    if isinstance(value, str):
        if len(value) > MAX_BOX_TEXT:
            raise FormatError(
                f"{source}: cropBox of row {row} is {len(value)} characters long ({value[:40]!r}"
                f"...); expected a tuple such as (0, 0, 0.125, 0.125)."
            )
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError) as exc:
            raise FormatError(
                f"{source}: cropBox of row {row} is {value!r}; expected a tuple such as "
                "(0, 0, 0.125, 0.125)."
            ) from exc
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list):
        value = tuple(value)
    return value


def object_column(values: Sequence[Any]) -> np.ndarray:
    """A 1D object array holding ``values`` as they are (lists and tuples stay one cell each)."""
    col = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        col[i] = v
    return col


def crop_rect(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
    """Pixel columns ``x0:x1`` and rows ``y0:y1`` whose centres lie inside the shown crop.

    ``box`` is ``(top, bottom, left, right)`` in fractions of the picture's height/width.
    """
    top, bottom, left, right = (float(v) for v in box)

    def span(lo: float, hi: float, n: int) -> tuple[int, int]:
        # pixel c (covering [c, c + 1)) is inside when lo <= c + 0.5 < hi
        a = max(0, math.ceil(lo - 0.5))
        b = min(n, math.ceil(hi - 0.5))
        return a, max(a, b)

    x0, x1 = span(left * width, (1.0 - right) * width, width)
    y0, y1 = span(top * height, (1.0 - bottom) * height, height)
    return x0, x1, y0, y1


def rect_rle(rect: tuple[int, int, int, int], height: int, width: int) -> dict[str, Any]:
    """COCO RLE (compressed) of the pixel rectangle ``x0:x1, y0:y1`` of a ``height x width`` picture.

    Built from its runs (column-major, starting with a run of zeros) without allocating the mask.
    """
    from pycocotools import mask as mask_utils

    x0, x1, y0, y1 = rect
    segments: list[tuple[int, int]] = [(0, x0 * height)]  # (value, length), column-major
    for _ in range(x0, x1):
        segments += [(0, y0), (1, y1 - y0), (0, height - y1)]
    segments.append((0, (width - x1) * height))
    counts: list[int] = [0]  # RLE counts alternate zeros, ones, ... starting with zeros
    value = 0
    for v, length in segments:
        if length == 0:
            continue
        if v != value:
            counts.append(0)
            value = v
        counts[-1] += length
    rle = {"counts": counts, "size": [int(height), int(width)]}
    return mask_utils.frPyObjects(rle, int(height), int(width))


def annotation_rle(ann: dict[str, Any], height: int, width: int) -> dict[str, Any] | None:
    """The annotation's segmentation as one compressed RLE, as ``COCO.annToRLE``; None if unusable."""
    from pycocotools import mask as mask_utils

    seg = ann.get("segmentation")
    if isinstance(seg, list):
        polys = [p for p in seg if isinstance(p, list) and len(p) >= 6]
        if not polys:
            return None
        return mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if isinstance(seg["counts"], list):
            return mask_utils.frPyObjects(seg, height, width)
        counts = seg["counts"]
        return {
            "size": seg["size"],
            "counts": counts.encode() if isinstance(counts, str) else counts,
        }
    return None


def bbox_area_in_rect(bbox: Sequence[float], rect: tuple[int, int, int, int]) -> float:
    """Area of the box ``[x, y, w, h]`` inside the pixel rectangle ``x0:x1, y0:y1``."""
    x, y, w, h = (float(v) for v in bbox)
    x0, x1, y0, y1 = rect
    dx = max(0.0, min(x + w, x1) - max(x, x0))
    dy = max(0.0, min(y + h, y1) - max(y, y0))
    return dx * dy


def areas_in_crop(
    anns: Sequence[dict[str, Any]], height: int, width: int, box: Sequence[float]
) -> tuple[list[float], int]:
    """Area (pixels) of each annotation inside the crop, and how many used the bbox fallback."""
    from pycocotools import mask as mask_utils

    rect = crop_rect(box, height, width)
    crop = rect_rle(rect, height, width)
    out: list[float] = []
    fallback = 0
    for ann in anns:
        rle = annotation_rle(ann, height, width)
        if rle is None:
            bbox = ann.get("bbox")
            if not isinstance(bbox, list | tuple) or len(bbox) != 4:
                raise FormatError(
                    f"annotation {ann.get('id')!r} of image {ann.get('image_id')!r} has neither a "
                    "usable segmentation nor a bbox [x, y, w, h]."
                )
            out.append(bbox_area_in_rect(bbox, rect))
            fallback += 1
            continue
        out.append(float(mask_utils.area(mask_utils.merge([rle, crop], intersect=True))))
    return out, fallback


def crop_label_table(
    data: dict[str, dict[str, Any]],
    stim_info: pd.DataFrame,
    default: pd.DataFrame,
    sources: dict[str, str] | None = None,
    stim_source: str | Path = "stim info",
) -> tuple[pd.DataFrame, CropStats]:
    """Labels by the largest annotation inside the shown crop, beside the default rule's labels.

    ``default`` is :func:`nsdprep.stages.labels.label_table` of the same ``data`` and ``stim_info`` (its
    checks of cocoId/cocoSplit have run); its annotation lists and order are reused.
    """
    sources = sources or {s: f"instances_{s}.json" for s in data}
    boxes = crop_boxes(stim_info, stim_source)
    n = len(stim_info)
    coco_ids = default["cocoId"].to_numpy()
    splits = default["cocoSplit"].to_numpy()
    areas_crop: list[list[float]] = [[] for _ in range(n)]
    top_super = [UNKNOWN] * n
    top_cat = [UNKNOWN] * n
    fallback = 0
    for split, d in data.items():
        rows = np.flatnonzero(splits == split)
        if rows.size == 0:
            continue
        anns = d["annotations"]
        image_id = np.fromiter((a["image_id"] for a in anns), dtype=np.int64, count=len(anns))
        sizes = _image_sizes(d["images"], sources[split])
        sup_of, name_of = category_lookup(d["categories"])
        groups = group_by_image(image_id, coco_ids[rows])
        for row, idx in zip(rows.tolist(), groups, strict=True):
            if idx.size == 0:
                continue
            height, width = sizes[int(coco_ids[row])]
            sel = [anns[i] for i in idx.tolist()]
            a, fb = areas_in_crop(sel, height, width, boxes[row])
            fallback += fb
            areas_crop[row] = a
            k = int(np.argmax(a))  # first of the largest
            if a[k] > 0:
                top_super[row] = sup_of[sel[k]["category_id"]]
                top_cat[row] = name_of[sel[k]["category_id"]]
    table = pd.DataFrame(
        {
            "nsdId": default["nsdId"].to_numpy(),
            "cocoId": coco_ids,
            "cocoSplit": pd.array(splits.tolist(), dtype=object),
            "cropBox": object_column([tuple(b) for b in boxes.tolist()]),
            "supercats": default["supercats"].to_numpy(),
            "cats": default["cats"].to_numpy(),
            "areas": default["areas"].to_numpy(),
            "areas_crop": object_column(areas_crop),
            "supercat": pd.array(top_super, dtype=object),
            "cat": pd.array(top_cat, dtype=object),
            "supercat_default": default["supercat"].to_numpy(),
            "cat_default": default["cat"].to_numpy(),
        },
        columns=list(CROP_COLUMNS),
    )
    changed = table["supercat"].to_numpy() != table["supercat_default"].to_numpy()
    uncropped = ~np.any(boxes > 0, axis=1)
    stats = CropStats(
        images=n,
        changed_supercat=int(changed.sum()),
        changed_cat=int((table["cat"].to_numpy() != table["cat_default"].to_numpy()).sum()),
        changed_supercat_uncropped=int((changed & uncropped).sum()),
        unknown_only_in_crop=int(
            ((table["supercat"] == UNKNOWN) & (table["supercat_default"] != UNKNOWN)).sum()
        ),
        bbox_fallback_annotations=fallback,
    )
    if fallback:
        log.warning("%d annotations have no usable segmentation: their bbox was used", fallback)
    log.info(
        "crop rule: %d of %d images change supercategory (%d become unknown)",
        stats.changed_supercat,
        n,
        stats.unknown_only_in_crop,
    )
    return table, stats


def _image_sizes(images: Sequence[dict[str, Any]], source: str) -> dict[int, tuple[int, int]]:
    try:
        return {int(im["id"]): (int(im["height"]), int(im["width"])) for im in images}
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(
            f"{source}: every image needs integer 'id', 'height' and 'width' ({exc!r}); crop-aware "
            "labels need the picture size."
        ) from exc
