"""Benchmark of ``nsdprep coco`` on a fake COCO zip with the real 2017 counts.

Writes (in a temporary directory, removed afterwards unless ``--workdir`` is given) an
``annotations_trainval2017.zip`` holding instances_train2017.json (118287 images, 860001
annotations, ~450 MB like the real file) and instances_val2017.json (5000 images, 36781
annotations), a 73000-row stim info table and an expdesign file (8 x 10000 images, 30000 trials);
then runs ``python -m nsdprep coco`` (``--labels default``, ``legacy`` and ``crop``) in a subprocess each and
reports wall time and peak RSS (of that subprocess, from wait4). Every fake picture is 640 x 480 with a
square crop (``cropBox`` ``(0, 0, left, right)``, left + right = 0.25, at a random position) and
compact 22-point polygons (radius 4..150 px), so ``--crop`` rasterizes ~530k annotation masks (those
of the NSD images).
Nothing is written into the repository unless ``--results`` names a file.

    python bench/bench_coco.py [--workdir DIR] [--results FILE] [--modes default legacy crop]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.io

REPO = Path(__file__).resolve().parents[1]

# Real COCO 2017 instances counts.
N_TRAIN_IMAGES, N_VAL_IMAGES = 118287, 5000
N_TRAIN_ANNS, N_VAL_ANNS = 860001, 36781
N_NSD = 73000
MAX_IMAGE_ID, MAX_ANN_ID = 581929, 2232119
CATEGORIES = [
    (1, "person", "person"), (2, "bicycle", "vehicle"), (3, "car", "vehicle"),
    (17, "cat", "animal"), (18, "dog", "animal"), (44, "bottle", "kitchen"),
    (62, "chair", "furniture"), (63, "couch", "furniture"), (72, "tv", "electronic"),
    (90, "toothbrush", "indoor"),
]  # fmt: skip
CHUNK = 20000
COORDS_PER_POLYGON = 44  # ~450 MB train JSON with the fields below


def _write_split(zf: zipfile.ZipFile, split: str, image_ids, ann_ids, rng) -> None:
    n_ann = len(ann_ids)
    ann_image = np.sort(rng.choice(image_ids, size=n_ann))  # COCO files group roughly by image
    cat_ids = np.array([c[0] for c in CATEGORIES])
    with zf.open(f"annotations/instances_{split}.json", "w", force_zip64=True) as raw:
        w = lambda s: raw.write(s.encode())  # noqa: E731
        w('{"info": {"description": "COCO 2017 Dataset (benchmark stand-in)", "year": 2017}, ')
        w('"licenses": [{"url": "http://creativecommons.org/licenses/by/2.0/", "id": 1, ')
        w('"name": "Attribution License"}], "images": [')
        for start in range(0, len(image_ids), CHUNK):
            ids = image_ids[start : start + CHUNK].tolist()
            items = [
                json.dumps(
                    {
                        "license": 1,
                        "file_name": f"{i:012d}.jpg",
                        "coco_url": f"http://images.cocodataset.org/{split}/{i:012d}.jpg",
                        "height": 480,
                        "width": 640,
                        "date_captured": "2013-11-14 11:18:45",
                        "flickr_url": "http://farm4.staticflickr.com/1/1_1_z.jpg",
                        "id": i,
                    }
                )
                for i in ids
            ]
            w((", " if start else "") + ", ".join(items))
        w('], "annotations": [')
        for start in range(0, n_ann, CHUNK):
            stop = min(start + CHUNK, n_ann)
            n = stop - start
            seg, bbox, area = _polygons(rng, n)
            cats = rng.choice(cat_ids, size=n).tolist()
            img = ann_image[start:stop].tolist()
            aid = ann_ids[start:stop].tolist()
            items = [
                json.dumps(
                    {
                        "segmentation": [seg[k]],
                        "area": area[k],
                        "iscrowd": 0,
                        "image_id": img[k],
                        "bbox": bbox[k],
                        "category_id": cats[k],
                        "id": aid[k],
                    }
                )
                for k in range(n)
            ]
            w((", " if start else "") + ", ".join(items))
        cats_json = [{"supercategory": s, "id": c, "name": n} for c, n, s in CATEGORIES]
        w('], "categories": ' + json.dumps(cats_json) + "}")


def _polygons(rng: np.random.Generator, n: int) -> tuple[list, list, list]:
    """``n`` compact, star-shaped polygons in a 640 x 480 picture, like COCO's outlines.

    Centre anywhere in the picture, radius log-uniform 4..150 px (areas ~50..70000 px²), 22 points
    at sorted angles with the radius jittered; clipped to the picture. Returns the polygons, their
    bboxes ``[x, y, w, h]`` and areas (shoelace).
    """
    k = COORDS_PER_POLYGON // 2
    centre = rng.uniform([0, 0], [640, 480], size=(n, 1, 2))
    radius = np.exp(rng.uniform(np.log(4), np.log(150), size=(n, 1, 1)))
    angle = np.sort(rng.uniform(0, 2 * np.pi, size=(n, k)), axis=1)[..., None]
    jitter = rng.uniform(0.7, 1.0, size=(n, k, 1))
    pts = centre + radius * jitter * np.concatenate([np.cos(angle), np.sin(angle)], axis=2)
    pts = np.clip(pts, 0, [640, 480]).round(2)
    x, y = pts[..., 0], pts[..., 1]
    area = 0.5 * np.abs(np.sum(x * np.roll(y, -1, 1) - np.roll(x, -1, 1) * y, axis=1))
    lo, hi = pts.min(axis=1), pts.max(axis=1)
    bbox = np.concatenate([lo, hi - lo], axis=1).round(2)
    return pts.reshape(n, -1).tolist(), bbox.tolist(), area.round(5).tolist()


def make_inputs(workdir: Path, seed: int = 0) -> dict[str, Path]:
    rng = np.random.default_rng(seed)
    ids = rng.choice(
        np.arange(1, MAX_IMAGE_ID + 1), size=N_TRAIN_IMAGES + N_VAL_IMAGES, replace=False
    )
    train_ids, val_ids = np.sort(ids[:N_TRAIN_IMAGES]), np.sort(ids[N_TRAIN_IMAGES:])
    ann = rng.choice(np.arange(1, MAX_ANN_ID + 1), size=N_TRAIN_ANNS + N_VAL_ANNS, replace=False)
    zp = workdir / "annotations_trainval2017.zip"
    with zipfile.ZipFile(zp, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        _write_split(zf, "train2017", train_ids, ann[:N_TRAIN_ANNS], rng)
        _write_split(zf, "val2017", val_ids, ann[N_TRAIN_ANNS:], rng)
        zf.writestr("annotations/captions_train2017.json", '{"annotations": []}')
    pick = rng.choice(len(ids), size=N_NSD, replace=False)
    all_ids = np.concatenate([train_ids, val_ids])
    split = np.where(pick < N_TRAIN_IMAGES, "train2017", "val2017").astype(object)
    stim = workdir / "nsd_stim_info_merged.csv"  # the stage reads NSD's CSV, never the pickle
    left = rng.integers(0, 161, size=N_NSD)  # 640 x 480 pictures: 160 px cut in all
    crop = [(0, 0, int(a) / 640, (160 - int(a)) / 640) for a in left]
    pd.DataFrame(
        {"cocoId": all_ids[pick], "cocoSplit": split, "cropBox": crop, "nsdId": np.arange(N_NSD)}
    ).to_csv(stim)
    exp = workdir / "nsd_expdesign.mat"
    subjectim = np.stack([rng.permutation(N_NSD)[:10000] + 1 for _ in range(8)]).astype(float)
    masterordering = rng.integers(1, 10001, size=(1, 30000)).astype(float)
    scipy.io.savemat(exp, {"subjectim": subjectim, "masterordering": masterordering})
    return {"zip": zp, "stim": stim, "exp": exp}


def run_stage(inputs: dict[str, Path], workdir: Path, mode: str) -> dict[str, float]:
    out = workdir / f"coco_categories_{mode}.pkl"
    merged = workdir / f"merged_{mode}.json"
    cmd = [
        sys.executable, "-m", "nsdprep", "coco", "--zip", str(inputs["zip"]),
        "--stim-info", str(inputs["stim"]), "--out", str(out),
    ]  # fmt: skip
    if mode == "crop":
        cmd += ["--labels", "crop", "--expdesign", str(inputs["exp"])]
    else:
        cmd += ["--merged-out", str(merged)]
    if mode == "legacy":
        cmd += ["--labels", "legacy", "--expdesign", str(inputs["exp"])]
    env = {**os.environ, "PYTHONPATH": str(REPO / "code")}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"stage failed: {' '.join(cmd)}")
    return {
        "wall_s": round(wall, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 0),  # ru_maxrss is in KiB on Linux
        "merged_json_mb": round(merged.stat().st_size / 1e6, 1) if merged.exists() else None,
        "summary_tail": out.with_name(out.stem + "_summary.tsv").read_text().splitlines()[-8:],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, help="keep/reuse generated inputs here")
    ap.add_argument("--results", type=Path, help="also write the numbers as JSON here")
    ap.add_argument("--modes", nargs="+", default=["default", "legacy", "crop"])
    args = ap.parse_args()
    tmp = None
    if args.workdir:
        workdir = args.workdir
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="bench_coco_")
        workdir = Path(tmp)
    try:
        inputs = {k: workdir / v for k, v in (
            ("zip", "annotations_trainval2017.zip"), ("stim", "nsd_stim_info_merged.pkl"),
            ("exp", "nsd_expdesign.mat"))}  # fmt: skip
        t0 = time.perf_counter()
        if not all(p.exists() for p in inputs.values()):
            inputs = make_inputs(workdir)
        gen_s = time.perf_counter() - t0
        with zipfile.ZipFile(inputs["zip"]) as zf:
            sizes = {i.filename: round(i.file_size / 1e6, 1) for i in zf.infolist()}
        results = {
            "machine": f"{platform.node()} {os.cpu_count()} cpus, Python {platform.python_version()}",
            "generate_s": round(gen_s, 1),
            "zip_mb": round(inputs["zip"].stat().st_size / 1e6, 1),
            "members_mb": sizes,
        }
        for mode in args.modes:
            results[mode] = run_stage(inputs, workdir, mode)
        text = json.dumps(results, indent=1)
        print(text)
        if args.results:
            args.results.write_text(text + "\n")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
