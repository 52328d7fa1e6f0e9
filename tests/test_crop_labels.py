"""Crop-aware labels (``LABELS=crop``): area of each annotation inside the crop NSD showed.

Oracles are independent of the code under test: pycocotools' own ``COCO.annToMask`` sliced with
numpy for the areas, ``mask.encode`` of a numpy rectangle for the crop's RLE, and the synthetic
data's manifest, whose crop labels come from rectangle geometry (no masks at all).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from nsdprep.cli import main as cli_main
from nsdprep.core import nsd
from nsdprep.core.errors import FormatError
from nsdprep.stages import labels as coco
from nsdprep.stages.labels import crop as coco_crop


def test_rect_rle_equals_encoded_mask() -> None:
    rng = np.random.default_rng(0)
    for _ in range(500):
        h, w = (int(v) for v in rng.integers(1, 40, size=2))
        x0, x1 = sorted(int(v) for v in rng.integers(0, w + 1, size=2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, h + 1, size=2))
        m = np.zeros((h, w), dtype=np.uint8, order="F")
        m[y0:y1, x0:x1] = 1
        got = coco_crop.rect_rle((x0, x1, y0, y1), h, w)
        assert got["counts"] == mask_utils.encode(m)["counts"], (h, w, x0, x1, y0, y1)
        assert int(mask_utils.area(got)) == int(m.sum())


@pytest.mark.parametrize(
    ("box", "h", "w", "rect"),
    [
        ((0, 0, 0.1671875, 0.1671875), 426, 640, (107, 533, 0, 426)),  # the manual's example
        ((0.125, 0.125, 0, 0), 640, 480, (0, 480, 80, 560)),
        ((0, 0, 0, 0), 512, 512, (0, 512, 0, 512)),
        ((0, 0, 0.0, 0.25), 480, 640, (0, 480, 0, 480)),
    ],
)
def test_crop_rect(box, h, w, rect) -> None:
    assert coco_crop.crop_rect(box, h, w) == rect
    x0, x1, y0, y1 = rect
    if box[2] or box[3] or box[0] or box[1]:
        assert x1 - x0 == y1 - y0  # NSD's crop is square


def _tiny_coco(tmp_path: Path) -> tuple[COCO, dict]:
    """One 30 x 40 picture with every kind of segmentation COCO uses, plus broken ones."""
    h, w = 30, 40
    blob = np.zeros((h, w), dtype=np.uint8, order="F")
    blob[5:25, 2:30] = 1
    blob[10:12, 30:38] = 1
    compressed = mask_utils.encode(blob)
    uncompressed_counts = []  # column-major runs, as COCO's iscrowd annotations store them
    flat = blob.flatten(order="F")
    value, run = 0, 0
    for v in flat:
        if v != value:
            uncompressed_counts.append(run)
            value, run = v, 0
        run += 1
    uncompressed_counts.append(run)
    anns = [
        {"segmentation": [[1, 1, 20, 1, 20, 20, 1, 20]], "bbox": [1, 1, 19, 19]},  # polygon
        {"segmentation": [[0, 0, 39, 0, 30, 29], [35, 2, 39, 2, 39, 8]], "bbox": [0, 0, 39, 29]},
        {"segmentation": {"counts": uncompressed_counts, "size": [h, w]}, "iscrowd": 1,
         "bbox": [2, 5, 36, 20]},
        {"segmentation": {"counts": compressed["counts"].decode(), "size": [h, w]},
         "bbox": [2, 5, 36, 20]},
        {"segmentation": [], "bbox": [30.5, 3.0, 8.0, 10.0]},  # no segmentation: bbox fallback
        {"segmentation": [[5, 5, 9, 9]], "bbox": [5, 5, 4, 4]},  # a 2-point "polygon": bbox
    ]  # fmt: skip
    for k, ann in enumerate(anns):
        ann.update({"id": k + 1, "image_id": 7, "category_id": 1, "area": 1.0})
        ann.setdefault("iscrowd", 0)
    data = {
        "images": [{"id": 7, "height": h, "width": w, "file_name": "x.jpg"}],
        "annotations": anns,
        "categories": [{"id": 1, "name": "person", "supercategory": "person"}],
    }
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(data))
    return COCO(str(path)), data


def test_areas_in_crop_match_pycocotools_masks(tmp_path: Path) -> None:
    api, data = _tiny_coco(tmp_path)
    anns = data["annotations"]
    for box in [(0, 0, 0.125, 0.125), (0, 0, 0.0, 0.25), (0.1, 0.2, 0, 0), (0, 0, 0, 0)]:
        x0, x1, y0, y1 = coco_crop.crop_rect(box, 30, 40)
        got, fallback = coco_crop.areas_in_crop(anns, 30, 40, box)
        assert fallback == 2
        for k, ann in enumerate(anns[:4]):  # with a segmentation: the mask inside the crop
            want = int(api.annToMask(api.anns[ann["id"]])[y0:y1, x0:x1].sum())
            assert got[k] == want, (box, k)
        for k in (4, 5):  # the bbox, cut to the crop
            bx, by, bw, bh = anns[k]["bbox"]
            want = max(0, min(bx + bw, x1) - max(bx, x0)) * max(0, min(by + bh, y1) - max(by, y0))
            assert got[k] == pytest.approx(want)


def test_crop_boxes_accept_text_and_reject_nonsense() -> None:
    table = pd.DataFrame({"cropBox": [(0, 0, 0.1, 0.2), "(0.1, 0.0, 0, 0)", [0, 0, 0, 0]]})
    np.testing.assert_array_equal(
        coco_crop.crop_boxes(table), [[0, 0, 0.1, 0.2], [0.1, 0, 0, 0], [0, 0, 0, 0]]
    )
    for bad in [(0, 0, 0.1), (0, 0, 1.0, 0), (0.6, 0.5, 0, 0), "(0, 0, x, 0)", (0, 0, -0.1, 0)]:
        with pytest.raises(FormatError, match="cropBox"):
            coco_crop.crop_boxes(pd.DataFrame({"cropBox": [(0, 0, 0, 0), bad]}), "stim.pkl")
    with pytest.raises(FormatError, match="no cropBox column"):
        coco_crop.crop_boxes(pd.DataFrame({"x": [1]}))
    huge = "(" + "0, " * 1_000_000 + "0)"  # a CSV cell is text from the server: not parsed
    with pytest.raises(FormatError, match=r"row 1 is 3000003 characters long \('\(0, 0, "):
        coco_crop.crop_boxes(pd.DataFrame({"cropBox": [(0, 0, 0, 0), huge]}), "stim.csv")


@pytest.fixture(scope="module")
def crop_built(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("crop")
    bucket = synth_root / "nsd"
    args = {
        "zip_path": synth_root / "coco/annotations" / nsd.COCO_ZIP_NAME,
        "stim_info": bucket / nsd.STIM_INFO_KEY,
        "stim_info_csv": bucket / nsd.STIM_INFO_CSV_KEY,
        "expdesign": bucket / nsd.EXPDESIGN_KEY,
    }
    crop = coco.build(merged_out=None, out=out / "crop.pkl", labels="crop", **args)
    default = coco.build(merged_out=out / "m.json", out=out / "default.pkl", **args)
    manifest = json.loads((synth_root / "synth_manifest.json").read_text())
    return {"crop": crop, "default": default, "manifest": manifest, "out": out, "args": args}


def test_crop_labels_match_geometry(crop_built: dict) -> None:
    crop, default, man = crop_built["crop"], crop_built["default"], crop_built["manifest"]
    assert list(crop.columns) == list(coco_crop.CROP_COLUMNS)
    assert crop["supercat"].tolist() == man["crop_labels"]
    assert crop["supercat_default"].tolist() == man["labels"] == default["supercat"].tolist()
    # the default rule's table is untouched by the crop mode
    pd.testing.assert_frame_equal(
        crop[["nsdId", "cocoId", "supercats", "cats", "areas"]],
        default[["nsdId", "cocoId", "supercats", "cats", "areas"]],
    )
    for nsd_id in man["crop_planted_nsd_ids"]:  # planted disagreements: another supercategory
        row = crop.iloc[nsd_id]
        assert row["supercat"] not in (row["supercat_default"], "unknown"), nsd_id
        assert max(row["areas_crop"]) < max(row["areas"])
    for nsd_id in man["crop_gone_nsd_ids"]:  # the only object is cut away
        row = crop.iloc[nsd_id]
        assert row["supercat"] == "unknown" != row["supercat_default"]
        assert row["areas_crop"] == [0.0]


def test_crop_summary_counts_changes(crop_built: dict) -> None:
    crop, man = crop_built["crop"], crop_built["manifest"]
    lines = (crop_built["out"] / "crop_summary.tsv").read_text().splitlines()
    rows = {tuple(line.split("\t")[:2]): line.split("\t")[2] for line in lines[1:]}
    pairs = zip(man["labels"], man["crop_labels"], strict=True)
    changed = [i for i, (a, b) in enumerate(pairs) if a != b]
    assert len(changed) >= len(man["crop_planted_nsd_ids"]) + len(man["crop_gone_nsd_ids"])
    assert int(rows[("crop", "changed_supercat")]) == len(changed)
    gone = [i for i in changed if man["crop_labels"][i] == "unknown"]
    assert int(rows[("crop", "unknown_only_in_crop")]) == len(gone)
    assert rows[("crop", "bbox_fallback_annotations")] == "0"
    import scipy.io

    d = scipy.io.loadmat(crop_built["args"]["expdesign"])
    shown = set((np.unique(d["subjectim"][:, d["masterordering"][0].astype(int) - 1]) - 1).tolist())
    assert int(rows[("crop", "changed_supercat_shown")]) == len(shown & set(changed))
    assert rows[("input", "stim_info")] == "nsd_stim_info_merged.csv via csv"
    assert int(rows[("total", "unknown")]) == int((crop["supercat"] == "unknown").sum())


def test_crop_cli_refuses_an_unknown_rule(synth_root: Path, tmp_path: Path) -> None:
    bucket = synth_root / "nsd"
    argv = ["coco", "--zip", str(synth_root / "coco/annotations" / nsd.COCO_ZIP_NAME)]
    argv += ["--stim-info", str(bucket / nsd.STIM_INFO_KEY), "--out", str(tmp_path / "o.pkl")]
    assert cli_main([*argv, "--labels", "crop,legacy"]) == 2
    assert cli_main(argv) == 2  # default mode needs --merged-out


def test_crop_without_cropbox_fails_before_parsing_json(synth_root: Path, tmp_path: Path) -> None:
    bucket = synth_root / "nsd"
    info = pd.read_csv(bucket / nsd.STIM_INFO_CSV_KEY, index_col=0).drop(columns="cropBox")
    stim = tmp_path / "stim.csv"
    info.to_csv(stim)
    broken_zip = tmp_path / "coco.zip"  # valid members list, JSON never parsed
    shutil.copy(synth_root / "coco/annotations" / nsd.COCO_ZIP_NAME, broken_zip)
    with pytest.raises(FormatError, match="no cropBox column"):
        coco.build(broken_zip, stim, None, tmp_path / "o.pkl", labels="crop")
