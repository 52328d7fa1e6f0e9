"""The field's preparation of a full-size subject: time, peak RSS and disk of the curated stage.

Writes one synthetic subject at full size (default 30 sessions of 750 trials, the N of real NSD's
curated rule: 22,500 candidate trials) as the curated stage reads it: 3 mm sessions on NSD's 3 mm
grid (62x74x62, int16, grey matter only, a per-session offset per voxel so z-scoring matters), a
registry (plain git) with the 1 mm valid masks and the 1 mm MNI ``nsdgeneral`` of
:func:`nsdprep.testing.synth.roi_volume`, an experiment design with NSD's sizes (10,000 images per
subject shown 3 times, 1,000 shared), the stim info CSV and a labels table. Then runs the stage
command ``make curated`` records (``python -m nsdprep curate ...``), each variant in a fresh child
process (peak RSS of that child alone, imports included: ``run_measured``; the memory-mapped
output's pages count while they are mapped):

- ``default``: ``make curated`` (int16, grey matter), for comparison;
- ``zscore_avg_roi``: ``make curated ZSCORE=session AVERAGE=1 ROI=nsdgeneral``;
- with ``--all`` also ``zscore`` (``ZSCORE=session``: float32 trials x grey matter, the largest).

``datalad run``'s own work (``git annex add`` of the outputs, the commit) is not in these times.
Results: ``bench/results/conventions_latest.json`` (+ a dated copy). Data stay in
``bench/data/conventions/`` (git-ignored; ``--clean`` removes them afterwards).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "code"))

import _shared  # noqa: E402

VARIANTS = {
    "default": [],
    "zscore_avg_roi": ["--zscore", "session", "--average", "--roi", "nsdgeneral"],
    "zscore": ["--zscore", "session"],
}


def make_subject(data: Path, n_sessions: int, seed: int = 0) -> dict:
    """Write the registry, design, stim info, labels and the 3 mm sessions of subject 1."""
    import pandas as pd

    from nsdprep.core import masks, nsd
    from nsdprep.core.grid import grid_map
    from nsdprep.core.nifti import NiftiStreamWriter
    from nsdprep.testing import synth

    spec = synth.SynthSpec(
        seed=seed, sessions=(40,), n_images=73000, images_per_subject=10000, n_shared=1000,
        full=True,
    )  # fmt: skip
    t0 = time.perf_counter()
    reg = data / "nsd"
    if reg.exists():
        shutil.rmtree(reg)
    reg.mkdir(parents=True)
    design = synth._make_design(spec)
    synth._write_expdesign(reg / nsd.EXPDESIGN_KEY, design)
    shared = np.zeros(spec.n_images, dtype=bool)
    shared[design["sharedix"][0].astype(np.int64) - 1] = True
    rng = np.random.default_rng(seed)
    ids = np.arange(spec.n_images)
    pd.DataFrame({"cocoId": ids + 1, "nsdId": ids, "shared1000": shared}).to_csv(
        reg / nsd.STIM_INFO_CSV_KEY
    )
    supers = np.array(synth.SUPERCATEGORIES + ("unknown",))
    weights = np.r_[np.full(12, 0.99 / 12), 0.01]
    sc = rng.choice(supers, size=spec.n_images, p=weights)
    labels = data / "labels.pkl"
    pd.DataFrame({"nsdId": ids, "cocoId": ids + 1, "supercat": sc, "cat": sc}).to_pickle(labels)
    # the 1 mm valid masks (one file, a link per session) and the ROI
    valid = data / "valid_1mm.nii.gz"
    with NiftiStreamWriter(valid, spec.shape, spec.affine(), np.int16, None) as w:
        w.write(synth._liberal_mask(spec).astype(np.int16))
    betas_dir = reg / nsd.subject_dir_key(1)
    betas_dir.mkdir(parents=True)
    for ses in range(1, n_sessions + 1):
        (betas_dir / f"betas_session{ses:02d}.nii.gz").write_text("registered\n")
        (betas_dir / f"valid_session{ses:02d}.nii.gz").symlink_to(valid)
    roi = reg / nsd.roi_key(1, "nsdgeneral")
    with NiftiStreamWriter(roi, spec.shape, spec.affine(), np.int16, None) as w:
        w.write(synth.roi_volume(spec, 1))
    subprocess.run(["git", "init", "-q", str(reg)], check=True)
    subprocess.run(["git", "-C", str(reg), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(reg), "commit", "-q", "-m", "register"], check=True)
    # the 3 mm sessions
    gmap = grid_map(spec.shape, spec.affine())
    gm = masks.gm_mask(gmap.shape, gmap.affine)
    n_vox = int(gm.sum())
    out = data / "3mm" / nsd.subject_label(1)
    out.mkdir(parents=True, exist_ok=True)
    vol = np.zeros(gmap.shape, np.int16)
    tps = spec.trials_per_session
    for ses in range(1, n_sessions + 1):
        offset = rng.normal(0, 300, n_vox)  # a per-voxel level that changes between sessions
        path = out / f"betas_session{ses:02d}.nii.gz"
        with NiftiStreamWriter(path, gmap.shape, gmap.affine, np.int16, tps) as w:
            for _ in range(tps):
                vol[gm] = np.clip(np.rint(offset + rng.normal(0, 600, n_vox)), -32768, 32767)
                w.write(vol)
        print(f"  session {ses:02d}/{n_sessions} written", flush=True)
    return {
        "sessions": n_sessions,
        "trials_per_session": tps,
        "grid": list(gmap.shape),
        "grey_matter_voxels": n_vox,
        "input_3mm_bytes": sum(p.stat().st_size for p in out.iterdir()),
        "write_s": round(time.perf_counter() - t0, 1),
    }


def child(variant: str, data: str, out: str) -> dict:
    """Run the curated stage command of ``variant``; return its seconds."""
    import contextlib

    from nsdprep.cli import main
    from nsdprep.core import nsd

    data_p = Path(data)
    argv = [
        "curate", "--nsd", str(data_p / "nsd"), "--resampled", str(data_p / "3mm"),
        "--labels-table", str(data_p / "labels.pkl"),
        "--expdesign", str(data_p / "nsd" / nsd.EXPDESIGN_KEY),
        "--stim-info-csv", str(data_p / "nsd" / nsd.STIM_INFO_CSV_KEY),
        "--out", out, "--subjects", "1", *VARIANTS[variant],
    ]  # fmt: skip
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON answer
        rc = main(argv)
    if rc != 0:
        raise SystemExit(f"curate {variant} failed ({rc})")
    return {"s": round(time.perf_counter() - t0, 1)}


def _disk(folder: Path) -> dict:
    files = {p.name: p.stat().st_blocks * 512 for p in sorted(folder.iterdir())}
    return {"total_bytes": sum(files.values()), "files": files}


def main() -> int:
    """Write the subject (unless present), run the variants, save and print the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=30)
    parser.add_argument("--data", type=Path, default=ROOT / "bench/data/conventions")
    parser.add_argument("--all", action="store_true", help="also ZSCORE=session alone (largest)")
    parser.add_argument("--clean", action="store_true", help="remove the data afterwards")
    parser.add_argument("--write-only", action="store_true", help="write the data, measure nothing")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    _shared.add_make_options(parser)
    args = parser.parse_args()
    _shared.make_options(args)  # none changes this benchmark; a wrong one is refused
    if args.child:
        return _shared.answer_child({"curate": child}, ["curate", *args.child])
    info_file = args.data / "info.json"
    if info_file.exists() and json.loads(info_file.read_text())["sessions"] == args.sessions:
        info = json.loads(info_file.read_text())
    else:
        print(f"writing a full-size synthetic subject ({args.sessions} sessions) to {args.data}")
        info = make_subject(args.data, args.sessions)
        info_file.write_text(json.dumps(info))
    if args.write_only:
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "code")}
    results = {}
    for variant in ("default", "zscore_avg_roi", *(("zscore",) if args.all else ())):
        out = args.data / "out" / variant
        if out.exists():
            shutil.rmtree(out)
        load = os.getloadavg()
        res, rss = _shared.run_child(__file__, [variant, str(args.data), str(out)], env=env)
        desc = json.loads((out / "dataset_description.json").read_text())
        results[variant] = {
            **res,
            "peak_rss_mb": round(rss, 1),
            "load_before": [round(x, 2) for x in load],
            "disk": _disk(out),
            "rows": json.loads(json.dumps(desc["Split"]["Rows"])),
            "roi_voxels": desc["Preparation"].get("ROIVoxels"),
        }
        print(f"{variant}: {res['s']} s, peak RSS {rss:.0f} MB, "
              f"{results[variant]['disk']['total_bytes'] / 1e9:.2f} GB", flush=True)  # fmt: skip
    report = {
        "subject": info,
        "cores": os.cpu_count(),
        "results": results,
        "versions": _shared.versions(["numpy", "nibabel", "isal"]),
    }
    _shared.save_results("conventions", report)
    if args.clean:
        shutil.rmtree(args.data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
