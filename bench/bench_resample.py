"""Benchmark of the 3 mm stage on a full-geometry synthetic session (182x218x182, NSD affine, int16).

One run measures, each in its own subprocess (peak RSS of that process alone, from ``wait4``):

(a) the nilearn reference (``resample_img`` + GM mask + masker) on the first ``--ref-volumes`` volumes,
(b) ours (``nsdprep.resample.resample_session``) on the whole session,
(c) the floor: plain gzip decompression of the same file (isal igzip; zlib shown for comparison),

and reports seconds per volume, peak RSS, and max |ours - reference| on the reference's volumes.
``--rss-volumes 750`` additionally measures ours' peak RSS on a 750-volume session (a real session's
length; generating that file takes a while and ~6 GB of disk).

Synthetic sessions are cached under ``bench/data/`` (self-ignored by git); results go to
``bench/results/<timestamp>.json`` and ``bench/results/latest.json``.

    python bench/bench_resample.py [--volumes 40] [--ref-volumes 4] [--rss-volumes 750]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "code"))

DATA = REPO / "bench" / "data"
RESULTS = REPO / "bench" / "results"
SHAPE = (182, 218, 182)
NSD_AFFINE = np.array(
    [[-1.0, 0, 0, 90], [0, 1.0, 0, -126], [0, 0, 1.0, -72], [0, 0, 0, 1]], dtype=np.float64
)


def make_session(n_volumes: int, seed: int = 0) -> Path:
    """Write (once) a synthetic int16 session: noisy betas in a brain-sized ellipsoid, 0 outside."""
    from nsdprep.nifti import NiftiStreamWriter

    DATA.mkdir(parents=True, exist_ok=True)
    ignore = DATA / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# generated benchmark data, never committed\n*\n")
    path = DATA / f"betas_full_{n_volumes}v_seed{seed}.nii.gz"
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    grid = np.indices(SHAPE, dtype=np.float32)
    centre = np.array(SHAPE, dtype=np.float32)[:, None, None, None] / 2
    radii = np.array([70, 90, 75], dtype=np.float32)[:, None, None, None]
    inside = (((grid - centre) / radii) ** 2).sum(axis=0) <= 1
    del grid
    smooth = rng.normal(0, 150, size=SHAPE).astype(np.float32)
    t0 = time.perf_counter()
    with NiftiStreamWriter(path, SHAPE, NSD_AFFINE, np.int16, n_volumes) as w:
        for t in range(n_volumes):
            vol = smooth + rng.normal(0, 250, size=SHAPE).astype(np.float32)
            vol = np.clip(np.rint(vol), -32768, 32767).astype(np.int16)
            vol[~inside] = 0
            w.write(vol)
            if t % 10 == 0:
                print(f"  generating {path.name}: {t}/{n_volumes}", file=sys.stderr)
    print(f"  generated in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return path


# ---------------------------------------------------------------- measured children


def child_reference(src: str, n: int, out_npy: str) -> dict:
    import warnings

    import nibabel as nib
    from nilearn.datasets import load_mni152_gm_mask
    from nilearn.image import resample_img, resample_to_img
    from nilearn.maskers import NiftiMasker

    t0 = time.perf_counter()  # after the imports (ours is timed the same way)
    img = nib.load(src)
    img = nib.Nifti1Image(np.asanyarray(img.dataobj[..., :n]), img.affine, img.header)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Casting data from int16 to float32")
        img3 = resample_img(
            img,
            target_affine=np.diag((3, 3, 3)),
            interpolation="continuous",
            force_resample=True,
            copy_header=True,
        )
    gm = resample_to_img(
        load_mni152_gm_mask(),
        img3,
        interpolation="nearest",
        force_resample=True,
        copy_header=True,
    )
    masker = NiftiMasker(mask_img=gm, standardize=None).fit()
    out = masker.inverse_transform(masker.transform(img3))
    seconds = time.perf_counter() - t0
    np.save(out_npy, np.asarray(out.dataobj))
    return {"volumes": n, "seconds": seconds}


def child_ours(src: str, dst: str) -> dict:
    import nilearn.datasets  # noqa: F401  (imports outside the timing, as for the reference)
    import nilearn.image  # noqa: F401

    from nsdprep.resample import resample_session

    stamps: list[float] = []
    t0 = time.perf_counter()
    res = resample_session(src, dst, progress=lambda n: stamps.append(time.perf_counter()))
    total = time.perf_counter() - t0
    steady = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else float("nan")
    setup = stamps[0] - t0 - steady  # imports, header checks, GM mask
    return {
        "volumes": res.n_volumes,
        "seconds": total,
        "setup_seconds": setup,
        "steady_s_per_volume": steady,
        "projected_s_per_volume_750": (setup + 750 * steady) / 750,
        "fast_path": res.fast,
        "dtype": res.dtype,
    }


def child_generate(n: str, seed: str) -> dict:
    t0 = time.perf_counter()
    path = make_session(int(n), int(seed))
    return {"volumes": int(n), "seconds": time.perf_counter() - t0, "path": str(path)}


def child_floor(src: str, decoder: str) -> dict:
    if decoder == "isal":
        from isal import igzip as gz
    else:
        import gzip as gz
    from nsdprep.nifti import read_header, volume_count

    n = volume_count(read_header(src))
    t0 = time.perf_counter()
    total = 0
    buf = bytearray(1 << 20)
    with open(src, "rb", buffering=1 << 20) as raw, gz.GzipFile(fileobj=raw) as f:
        while got := f.readinto(buf):
            total += got
    return {"volumes": n, "seconds": time.perf_counter() - t0, "bytes": total}


def run_child(*args: str) -> dict:
    """Run this script as ``--child ...``; return its JSON plus its own peak RSS (wait4)."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", *args],
        stdout=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
    )
    out = proc.stdout.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child {args[0]} failed ({proc.returncode})")
    result = json.loads(out)
    result["peak_rss_mb"] = usage.ru_maxrss / 1024
    result["s_per_volume"] = result["seconds"] / result["volumes"]
    return result


def max_diff(ours_path: Path, ref_npy: Path) -> dict:
    from nsdprep.nifti import iter_volumes

    ref = np.load(ref_npy)
    n = ref.shape[3]
    ours = np.stack(list(iter_volumes(ours_path, stop=n)), axis=-1)
    return {
        "max_abs_diff_vs_reference": float(np.abs(ours.astype(np.float64) - ref).max()),
        "max_abs_diff_vs_rounded_reference": float(np.abs(ours - np.rint(ref)).max()),
        "compared_volumes": n,
        "ours_dtype": str(ours.dtype),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--volumes", type=int, default=40, help="volumes of the timed session")
    p.add_argument("--ref-volumes", type=int, default=4, help="volumes given to nilearn")
    p.add_argument(
        "--rss-volumes", type=int, default=0, help="also measure ours' RSS on N volumes (e.g. 750)"
    )
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        fn = {
            "reference": child_reference,
            "ours": child_ours,
            "floor": child_floor,
            "generate": child_generate,
        }[kind]
        if kind == "reference":
            rest[1] = int(rest[1])
        print(json.dumps(fn(*rest)))
        return 0

    load_before = os.getloadavg()
    # generated in a child: this process stays small, so it cannot inflate the children's
    # peak RSS (ru_maxrss survives fork + exec)
    src = Path(run_child("generate", str(args.volumes), "0")["path"])
    with tempfile.TemporaryDirectory(prefix="bench_resample_") as tmp:
        tmp_p = Path(tmp)
        ref_npy = tmp_p / "ref.npy"
        dst = tmp_p / "ours.nii.gz"
        res: dict = {}
        print("floor (isal) ...", file=sys.stderr)
        res["floor_isal"] = run_child("floor", str(src), "isal")
        print("floor (zlib) ...", file=sys.stderr)
        res["floor_zlib"] = run_child("floor", str(src), "zlib")
        print("ours ...", file=sys.stderr)
        res["ours"] = run_child("ours", str(src), str(dst))
        print("nilearn reference ...", file=sys.stderr)
        res["reference"] = run_child("reference", str(src), str(args.ref_volumes), str(ref_npy))
        diff = max_diff(dst, ref_npy)
        if args.rss_volumes:
            big = Path(run_child("generate", str(args.rss_volumes), "1")["path"])
            print(f"ours on {args.rss_volumes} volumes (RSS) ...", file=sys.stderr)
            res[f"ours_{args.rss_volumes}v"] = run_child(
                "ours", str(big), str(tmp_p / "big.nii.gz")
            )
    load_after = os.getloadavg()

    ours, ref, floor = res["ours"], res["reference"], res["floor_isal"]
    summary = {
        "speedup_vs_reference": ref["s_per_volume"] / ours["s_per_volume"],
        "ratio_to_decompression_floor": ours["s_per_volume"] / floor["s_per_volume"],
        "steady_ratio_to_decompression_floor": ours["steady_s_per_volume"] / floor["s_per_volume"],
        "projected_750_ratio_to_decompression_floor": ours["projected_s_per_volume_750"]
        / floor["s_per_volume"],
        **diff,
        "peak_rss_mb_max_ours": max(v["peak_rss_mb"] for k, v in res.items() if "ours" in k),
    }
    targets = {
        "speedup_vs_reference>=20": summary["speedup_vs_reference"] >= 20,
        "ratio_to_floor<=1.5 (whole run incl. setup)": summary["ratio_to_decompression_floor"]
        <= 1.5,
        "ratio_to_floor<=1.5 (projected 750 volumes)": summary[
            "projected_750_ratio_to_decompression_floor"
        ]
        <= 1.5,
        "max_diff==0": summary["max_abs_diff_vs_rounded_reference"] == 0,
        "peak_rss<1.5GB": summary["peak_rss_mb_max_ours"] < 1536,
    }
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "input": {"file": str(src.relative_to(REPO)), "shape": [*SHAPE, args.volumes]},
        "input_mb_compressed": src.stat().st_size / 2**20,
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "python": platform.python_version(),
            "note": "shared machine: other processes compete for the CPUs (see loadavg)",
        },
        "results": res,
        "summary": summary,
        "targets_met": targets,
    }
    print(f"\n{'what':<22}{'volumes':>8}{'s/volume':>11}{'peak RSS MB':>13}")
    for name, r in res.items():
        print(f"{name:<22}{r['volumes']:>8}{r['s_per_volume']:>11.4f}{r['peak_rss_mb']:>13.0f}")
    for k, v in summary.items():
        print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
    print("targets:", ", ".join(f"{k} {'OK' if v else 'MISSED'}" for k, v in targets.items()))
    print(f"load average before/after: {load_before} / {load_after} on {os.cpu_count()} CPUs")
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, default=float) + "\n"
    stamp = time.strftime("%Y%m%dT%H%M%S")
    (RESULTS / f"resample_{stamp}.json").write_text(text)
    (RESULTS / "resample_latest.json").write_text(text)
    print(f"written {RESULTS / f'resample_{stamp}.json'} and resample_latest.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
