"""Tests of nsdprep.stages.labels: id-preserving merge, labels table, legacy reproduction, input checks."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io
from pycocotools.coco import COCO

from nsdprep.core.errors import FormatError, MissingInputError
from nsdprep.stages import labels as coco

CATEGORIES = [
    {"supercategory": "person", "id": 1, "name": "person"},
    {"supercategory": "vehicle", "id": 3, "name": "car"},
    {"supercategory": "animal", "id": 17, "name": "cat"},
    {"supercategory": "animal", "id": 18, "name": "dog"},
    {"supercategory": "furniture", "id": 62, "name": "chair"},
]


def _split(rng: np.random.Generator, image_ids, ann_ids, split: str) -> dict:
    images = [
        {"license": 1, "file_name": f"{i:012d}.jpg", "height": 40, "width": 50, "id": int(i)}
        for i in image_ids
    ]
    anns = []
    cat_ids = [c["id"] for c in CATEGORIES]
    ann_iter = iter(ann_ids)
    for img in images:
        for _ in range(int(rng.integers(0, 4))):  # some images get none
            anns.append(
                {
                    "segmentation": [rng.uniform(0, 40, 6).round(2).tolist()],
                    "area": round(float(rng.uniform(1, 500)), 3),
                    "iscrowd": 0,
                    "image_id": img["id"],
                    "bbox": rng.uniform(0, 40, 4).round(2).tolist(),
                    "category_id": int(rng.choice(cat_ids)),
                    "id": int(next(ann_iter)),
                }
            )
    # shuffle annotation order so file order != image order
    order = rng.permutation(len(anns))
    anns = [anns[i] for i in order]
    return {
        "info": {"description": "COCO 2017 Dataset", "version": "1.0", "year": 2017},
        "licenses": [{"url": "http://x", "id": 1, "name": "lic"}],
        "images": images,
        "annotations": anns,
        "categories": copy.deepcopy(CATEGORIES),
    }


def make_coco(seed: int = 0) -> dict[str, dict]:
    """Small train/val with scattered original ids (so renumbering changes them)."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.arange(1, 3000), size=60, replace=False)
    train_ids, val_ids = ids[:45], ids[45:]
    ann_ids = rng.choice(np.arange(100, 10**6), size=400, replace=False)
    train = _split(rng, train_ids, ann_ids[:250], "train2017")
    val = _split(rng, val_ids, ann_ids[250:], "val2017")
    # a tie on the largest area: the first annotation (in file order) must win
    tie_img = train["images"][0]["id"]
    train["annotations"] = [a for a in train["annotations"] if a["image_id"] != tie_img]
    train["annotations"][:0] = [
        {"area": 10.0, "image_id": tie_img, "category_id": 1, "id": 11, "iscrowd": 0},
        {"area": 50.0, "image_id": tie_img, "category_id": 18, "id": 12, "iscrowd": 0},
        {"area": 50.0, "image_id": tie_img, "category_id": 3, "id": 13, "iscrowd": 0},
    ]
    return {"train2017": train, "val2017": val}


def write_zip(path: Path, data: dict[str, dict], extra: bool = True) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for split, d in data.items():
            zf.writestr(f"annotations/instances_{split}.json", json.dumps(d))
        if extra:
            zf.writestr("annotations/captions_train2017.json", "not json at all")
    return path


def make_stim_info(data: dict[str, dict], seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = [(img["id"], s) for s, d in data.items() for img in d["images"]]
    pick = rng.permutation(len(rows))[:40]
    ids = [rows[i] for i in pick]
    return pd.DataFrame(
        {
            "Unnamed: 0": np.arange(len(ids)),
            "cocoId": np.array([r[0] for r in ids], dtype=np.int64),
            "cocoSplit": [r[1] for r in ids],
            "nsdId": np.arange(len(ids)),
        }
    )


def write_stim(info: pd.DataFrame, path: Path) -> Path:
    """Write the stim info as NSD's CSV (index as a leading unnamed column); the stage reads it."""
    info.drop(columns="Unnamed: 0", errors="ignore").to_csv(path)
    return path


def make_expdesign(path: Path, n_images: int, seed: int = 2) -> Path:
    rng = np.random.default_rng(seed)
    subjectim = np.stack([rng.permutation(n_images)[:20] + 1 for _ in range(2)]).astype(float)
    masterordering = rng.integers(1, 21, size=(1, 30)).astype(float)
    scipy.io.savemat(path, {"subjectim": subjectim, "masterordering": masterordering})
    return path


@pytest.fixture
def inputs(tmp_path: Path) -> dict:
    data = make_coco()
    zp = write_zip(tmp_path / "annotations_trainval2017.zip", data)
    info = make_stim_info(data)
    sp = write_stim(info, tmp_path / "nsd_stim_info_merged.csv")
    ep = make_expdesign(tmp_path / "nsd_expdesign.mat", len(info))
    return {"data": data, "zip": zp, "stim": sp, "info": info, "exp": ep, "tmp": tmp_path}


def pycoco_labels(json_paths: dict[str, Path], info: pd.DataFrame) -> list[dict]:
    """Independent labels: pycocotools on each split's own file, by (cocoSplit, cocoId)."""
    apis = {s: COCO(str(p)) for s, p in json_paths.items()}
    out = []
    for coco_id, split in zip(info["cocoId"], info["cocoSplit"], strict=True):
        api = apis[split]
        anns = api.loadAnns(api.getAnnIds(imgIds=[int(coco_id)]))
        cats = api.loadCats([a["category_id"] for a in anns])
        row = {
            "supercats": [c["supercategory"] for c in cats],
            "cats": [c["name"] for c in cats],
            "areas": [a["area"] for a in anns],
        }
        if anns:
            best = max(range(len(anns)), key=lambda i: (anns[i]["area"], -i))
            row["supercat"], row["cat"] = row["supercats"][best], row["cats"][best]
        else:
            row["supercat"] = row["cat"] = "unknown"
        out.append(row)
    return out


def extract(zip_path: Path, dest: Path) -> dict[str, Path]:
    out = {}
    with zipfile.ZipFile(zip_path) as zf:
        for split in ("train2017", "val2017"):
            p = dest / f"instances_{split}.json"
            p.write_bytes(zf.read(f"annotations/instances_{split}.json"))
            out[split] = p
    return out


def run_build(inp: dict, legacy: bool = False, tag: str = "a") -> tuple[pd.DataFrame, Path, Path]:
    out = inp["tmp"] / tag / ("legacy.pkl" if legacy else "labels.pkl")
    merged = inp["tmp"] / tag / "merged.json"
    table = coco.build(
        inp["zip"],
        inp["stim"],
        merged,
        out,
        labels="legacy" if legacy else "default",
        expdesign=inp["exp"] if legacy else None,
    )
    return table, out, merged


def assert_matches_pycocotools(table: pd.DataFrame, json_paths, info: pd.DataFrame) -> None:
    expected = pycoco_labels(json_paths, info)
    assert list(table.columns) == list(coco.LABEL_COLUMNS)
    assert table["nsdId"].tolist() == list(range(len(info)))
    assert table["cocoId"].tolist() == info["cocoId"].tolist()
    assert table["cocoSplit"].tolist() == info["cocoSplit"].tolist()
    for row, exp in zip(table.to_dict("records"), expected, strict=True):
        for key in ("supercats", "cats", "areas", "supercat", "cat"):
            assert row[key] == exp[key], (row["nsdId"], key)


# ---------------------------------------------------------------------------------------------


def test_labels_match_pycocotools(inputs):
    table, out, merged = run_build(inputs)
    paths = extract(inputs["zip"], inputs["tmp"])
    assert_matches_pycocotools(table, paths, inputs["info"])
    assert pd.read_pickle(out).equals(table)
    # the test data really exercises both splits and images without annotations
    assert set(table["cocoSplit"]) == {"train2017", "val2017"}
    assert (table["supercat"] == "unknown").any() and (table["supercat"] != "unknown").any()
    summary = coco.default_summary_path(out).read_text().splitlines()
    assert summary[1] == f"total\trows\t{len(table)}"
    assert summary[2] == f"total\tunknown\t{(table['cat'] == 'unknown').sum()}"


def test_tie_goes_to_first(inputs):
    table, _, _ = run_build(inputs)
    tie_img = inputs["data"]["train2017"]["images"][0]["id"]
    row = table[(table["cocoId"] == tie_img) & (table["cocoSplit"] == "train2017")]
    if row.empty:  # make sure the tie image is labelled
        info = inputs["info"].copy()
        info.loc[0, ["cocoId", "cocoSplit"]] = [tie_img, "train2017"]
        write_stim(info, inputs["stim"])
        table, _, _ = run_build(inputs, tag="b")
        row = table[table["cocoId"] == tie_img]
    r = row.iloc[0]
    assert r["areas"] == [10.0, 50.0, 50.0]
    assert (r["supercat"], r["cat"]) == ("animal", "dog")


def test_merged_keeps_every_id(inputs):
    _, _, merged_path = run_build(inputs)
    merged = json.loads(merged_path.read_text())
    data = inputs["data"]
    assert merged["images"] == data["train2017"]["images"] + data["val2017"]["images"]
    assert (
        merged["annotations"] == data["train2017"]["annotations"] + data["val2017"]["annotations"]
    )
    assert merged["categories"] == CATEGORIES
    assert merged["info"] == data["train2017"]["info"]
    # pycocotools reads it, and labels looked up by cocoId in the merged file agree
    api = COCO(str(merged_path))
    table = pd.read_pickle(inputs["tmp"] / "a" / "labels.pkl")
    for r in table.itertuples():
        anns = api.loadAnns(api.getAnnIds(imgIds=[r.cocoId]))
        assert [a["area"] for a in anns] == r.areas


@pytest.mark.parametrize("legacy", [False, True])
def test_streaming_json_equals_json_dumps(tmp_path, legacy):
    data = make_coco(3)
    obj = coco.merge_instances(data)
    target = tmp_path / "m.json"
    coco.write_json(obj, target, legacy=legacy)
    expected = json.dumps(obj) if legacy else json.dumps(obj, sort_keys=True, separators=(",", ":"))
    assert target.read_text() == expected
    empty = {"images": [], "annotations": [], "categories": []}
    coco.write_json(empty, target, legacy=legacy)
    assert json.loads(target.read_text()) == empty


def original_merge(train: dict, val: dict) -> dict:
    """Independent re-statement of the original renumbering merge (mutating copies)."""
    d1, d2 = copy.deepcopy(train), copy.deepcopy(val)
    img1 = {}
    for pos, img in enumerate(d1["images"]):
        img1[img["id"]] = pos
    img2 = {img["id"]: pos + max(img1.keys()) for pos, img in enumerate(d2["images"])}
    ann1 = {a["id"]: pos for pos, a in enumerate(d1["annotations"])}
    ann2 = {a["id"]: pos + max(ann1.keys()) for pos, a in enumerate(d2["annotations"])}
    for d, im, an in ((d1, img1, ann1), (d2, img2, ann2)):
        for img in d["images"]:
            img["id"] = im[img["id"]]
        for a in d["annotations"]:
            a["id"] = an[a["id"]]
            a["image_id"] = im[a["image_id"]]
    out = d1.copy()
    out["images"] = d1["images"] + d2["images"]
    out["annotations"] = d1["annotations"] + d2["annotations"]
    return out


def test_legacy_reproduces_original(inputs):
    table, out, merged_path = run_build(inputs, legacy=True)
    data = inputs["data"]
    ref = original_merge(data["train2017"], data["val2017"])
    assert merged_path.read_text() == json.dumps(ref)  # byte-identical to the original's output
    # original labels: pycocotools on the renumbered merge, looked up by the 1-based 73k id
    mat = scipy.io.loadmat(inputs["exp"])
    ids = np.unique(mat["subjectim"][:, mat["masterordering"].astype(int) - 1].flatten())
    api = COCO(str(merged_path))
    assert list(table.columns) == list(coco.LEGACY_COLUMNS)
    assert table["id"].dtype == ids.dtype and table["id"].tolist() == ids.tolist()
    for r in table.itertuples():
        anns = api.imgToAnns[r.id]
        assert r.areas == [a["area"] for a in anns]
        assert r.cats == [api.cats[a["category_id"]]["name"] for a in anns]
        if anns:
            k = int(np.argmax([a["area"] for a in anns]))
            assert (r.supercat, r.cat) == (
                api.cats[anns[k]["category_id"]]["supercategory"],
                api.cats[anns[k]["category_id"]]["name"],
            )
        else:
            assert r.supercat == r.cat == "unknown"
    # and the legacy labels really are the wrong ones: they differ from the correct table
    correct, _, _ = run_build(inputs, tag="c")
    by_nsd = correct.set_index("nsdId")
    nsd = table["id"].astype(int) - 1
    diff = [(a, b) for a, b in zip(table["cats"], by_nsd.loc[nsd, "cats"], strict=True) if a != b]
    assert len(diff) > len(table) // 2
    # renumbering changed the ids: the merged file of legacy mode lost the original ids
    assert {i["id"] for i in json.loads(merged_path.read_text())["images"]} != {
        i["id"] for d in data.values() for i in d["images"]
    }


def test_legacy_needs_expdesign(inputs):
    with pytest.raises(MissingInputError, match="--labels legacy needs --expdesign"):
        coco.build(
            inputs["zip"],
            inputs["stim"],
            inputs["tmp"] / "m.json",
            inputs["tmp"] / "o.pkl",
            labels="legacy",
        )


# ---- crafted bad inputs ------------------------------------------------------------------------


def _rewrite(inputs: dict, data: dict) -> None:
    write_zip(inputs["zip"], data)


def _build(inputs: dict) -> None:
    coco.build(inputs["zip"], inputs["stim"], inputs["tmp"] / "m.json", inputs["tmp"] / "o.pkl")


def test_overlapping_image_ids(inputs):
    data = copy.deepcopy(inputs["data"])
    dup = data["train2017"]["images"][3]["id"]
    data["val2017"]["images"].append({"id": dup, "file_name": "x.jpg"})
    _rewrite(inputs, data)
    with pytest.raises(FormatError, match=rf"image ids overlap .*instances_train2017.*\[{dup}\]"):
        _build(inputs)
    assert not (inputs["tmp"] / "o.pkl").exists() and not (inputs["tmp"] / "m.json").exists()


def test_overlapping_annotation_ids(inputs):
    data = copy.deepcopy(inputs["data"])
    dup = data["train2017"]["annotations"][5]["id"]
    data["val2017"]["annotations"][0]["id"] = dup
    _rewrite(inputs, data)
    with pytest.raises(FormatError, match=rf"annotation ids overlap .*\[{dup}\]"):
        _build(inputs)


def test_differing_category_tables(inputs):
    data = copy.deepcopy(inputs["data"])
    data["val2017"]["categories"][2]["name"] = "kitten"
    _rewrite(inputs, data)
    with pytest.raises(FormatError, match=r"category tables differ .*differing: \[17\]"):
        _build(inputs)


def test_missing_split(inputs):
    data = {"train2017": inputs["data"]["train2017"]}
    _rewrite(inputs, data)
    with pytest.raises(FormatError, match=r"does not contain annotations/instances_val2017\.json"):
        _build(inputs)


def test_missing_zip_and_absent_content(inputs, tmp_path):
    with pytest.raises(MissingInputError, match="does not exist"):
        coco.instances_members(tmp_path / "nope.zip")
    link = tmp_path / "annexed.zip"
    link.symlink_to(tmp_path / ".git/annex/objects/XX")
    with pytest.raises(MissingInputError, match="datalad get"):
        coco.instances_members(link)


def test_orphan_annotation(inputs):
    data = copy.deepcopy(inputs["data"])
    data["val2017"]["annotations"][0]["image_id"] = 999999
    _rewrite(inputs, data)
    with pytest.raises(
        FormatError, match=r"instances_val2017.*not images of that file: \[999999\]"
    ):
        _build(inputs)


def test_coco_id_not_found(inputs):
    info = inputs["info"].copy()
    info.loc[4, "cocoId"] = 424242
    write_stim(info, inputs["stim"])
    with pytest.raises(FormatError, match=r"image of no split .*nsdId \[4\] -> cocoId \[424242\]"):
        _build(inputs)


def test_coco_split_disagrees(inputs):
    info = inputs["info"].copy()
    i = int(np.flatnonzero(info["cocoSplit"] == "val2017")[0])
    info.loc[i, "cocoSplit"] = "train2017"
    write_stim(info, inputs["stim"])
    with pytest.raises(FormatError, match=rf"other than their cocoSplit: nsdId \[{i}\]"):
        _build(inputs)


def test_stim_info_row_order_checked(inputs):
    info = inputs["info"].iloc[::-1].reset_index(drop=True)
    write_stim(info, inputs["stim"])
    with pytest.raises(FormatError, match="row position must equal nsdId"):
        _build(inputs)


# ---- determinism ------------------------------------------------------------------------------


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("legacy", [False, True])
def test_deterministic_bytes_across_processes(inputs, legacy):
    """Two CLI runs in fresh interpreters (different hash seeds) write identical bytes."""
    digests = []
    for seed in ("1", "2"):
        outdir = inputs["tmp"] / f"run{seed}"
        cmd = [
            sys.executable, "-m", "nsdprep", "coco", "--zip", str(inputs["zip"]),
            "--stim-info", str(inputs["stim"]), "--merged-out", str(outdir / "merged.json"),
            "--out", str(outdir / "labels.pkl"),
        ]  # fmt: skip
        if legacy:
            cmd += ["--labels", "legacy", "--expdesign", str(inputs["exp"])]
        env = {**os.environ, "PYTHONHASHSEED": seed}
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        assert "rows" in res.stdout
        digests.append(
            [_digest(outdir / n) for n in ("merged.json", "labels.pkl", "labels_summary.tsv")]
        )
    assert digests[0] == digests[1]


def test_cli_error_exit_code(inputs, capsys):
    from nsdprep.cli import main

    data = {"val2017": inputs["data"]["val2017"]}
    _rewrite(inputs, data)
    rc = main(
        [
            "coco",
            "--zip",
            str(inputs["zip"]),
            "--stim-info",
            str(inputs["stim"]),
            "--merged-out",
            str(inputs["tmp"] / "m.json"),
            "--out",
            str(inputs["tmp"] / "o.pkl"),
        ]  # fmt: skip
    )
    assert rc == 2
    assert "instances_train2017.json" in capsys.readouterr().err


# ---- on the shared synthetic data ---------------------------------------------------------------


def test_synthetic_labels_match_pycocotools(request, tmp_path):
    pytest.importorskip("nsdprep.testing.synth")
    synth_root = request.getfixturevalue("synth_root")
    zp = synth_root / "coco/annotations/annotations_trainval2017.zip"
    stim = synth_root / "nsd/nsddata/experiments/nsd/nsd_stim_info_merged.pkl"
    exp = synth_root / "nsd/nsddata/experiments/nsd/nsd_expdesign.mat"
    table = coco.build(zp, stim, tmp_path / "m.json", tmp_path / "labels.pkl")
    info = pd.read_csv(stim.with_suffix(".csv"), index_col=0)
    assert len(table) == len(info)
    assert_matches_pycocotools(table, extract(zp, tmp_path), info)
    manifest = json.loads((synth_root / "synth_manifest.json").read_text())
    assert table["supercat"].tolist() == manifest["labels"]
    empty = manifest.get("unannotated_nsd_ids", [])
    assert (table.loc[empty, "cat"] == "unknown").all()
    assert all(table.loc[empty, "areas"].map(len) == 0)
    for i in manifest.get("area_tie_nsd_ids", []):  # the planted ties really are ties
        areas = table.at[i, "areas"]
        assert areas.count(max(areas)) > 1
    legacy = coco.build(
        zp, stim, tmp_path / "ml.json", tmp_path / "legacy.pkl", labels="legacy", expdesign=exp
    )
    mat = scipy.io.loadmat(exp)
    shown = np.unique(mat["subjectim"][:, mat["masterordering"].astype(int).ravel() - 1])
    assert legacy["id"].tolist() == shown.tolist()
    correct = table.set_index("nsdId").loc[legacy["id"].astype(int) - 1]
    differ = (legacy["cats"].to_numpy() != correct["cats"].to_numpy()) | (
        legacy["cat"].to_numpy() != correct["cat"].to_numpy()
    )
    assert differ.any()
