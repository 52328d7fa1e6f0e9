"""Synthetic NSD + COCO data: real formats (loaded as real users load them), ids, planted labels."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import scipy.io
from pycocotools.coco import COCO

from conftest import RUNS_PER_SESSION, TRIALS_PER_RUN
from nsdprep.cli import main as cli_main
from nsdprep.core import nsd
from nsdprep.core.errors import NsdPrepError
from nsdprep.core.nsd import Layout
from nsdprep.testing.synth import SynthSpec, make_synthetic

SPEC = SynthSpec(seed=0, layout=Layout(RUNS_PER_SESSION, TRIALS_PER_RUN))
TPS = sum(TRIALS_PER_RUN[r % 2] for r in range(RUNS_PER_SESSION))  # 30, computed independently
NSD_AFFINE = np.array([[-1, 0, 0, 90], [0, 1, 0, -126], [0, 0, 1, -72], [0, 0, 0, 1]], float)
SUPERCATS = {
    "person",
    "vehicle",
    "outdoor",
    "animal",
    "accessory",
    "sports",
    "kitchen",
    "food",
    "furniture",
    "electronic",
    "appliance",
    "indoor",
}


def _betas(root: Path, subject: int, session: int, kind: str = "betas") -> Path:
    key = nsd.betas_key(subject, session) if kind == "betas" else nsd.valid_key(subject, session)
    return root / "nsd" / key


def _expdesign(root: Path) -> dict:
    return scipy.io.loadmat(root / "nsd" / nsd.EXPDESIGN_KEY)


def _trial_nsd_ids(design: dict, subject: int, n_trials: int) -> np.ndarray:
    """0-based nsdIds of a subject's first n_trials trials, straight from the NSD formula."""
    mo = design["masterordering"][0, :n_trials].astype(int)
    return design["subjectim"][subject - 1, mo - 1].astype(int) - 1


@pytest.fixture(scope="module")
def coco(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, COCO]:
    out = tmp_path_factory.mktemp("coco")
    with zipfile.ZipFile(synth_root / "coco" / "annotations" / nsd.COCO_ZIP_NAME) as zf:
        zf.extractall(out)
    return {s: COCO(str(out / "annotations" / f"instances_{s}.json")) for s in nsd.COCO_SPLITS}


def _label(c: COCO, image_id: int) -> str:
    """Largest-area annotation's supercategory (ties: first), 'unknown' if none (pycocotools)."""
    anns = c.loadAnns(c.getAnnIds(imgIds=[image_id]))
    if not anns:
        return "unknown"
    areas = [a["area"] for a in anns]
    best = anns[int(np.argmax(areas))]  # argmax returns the first maximum
    return c.loadCats([best["category_id"]])[0]["supercategory"]


# ------------------------------------------------------------------------------------------ tree


def test_tree_and_manifest(synth_root: Path) -> None:
    man = json.loads((synth_root / "synth_manifest.json").read_text())
    assert man["layout"]["trials_per_session"] == TPS
    assert man["layout"]["sessions"] == list(SPEC.sessions)
    for subject, n_sessions in enumerate(SPEC.sessions, start=1):
        for session in range(1, n_sessions + 1):
            assert _betas(synth_root, subject, session).is_file()
            assert _betas(synth_root, subject, session, "valid").is_file()
        assert not _betas(synth_root, subject, n_sessions + 1).exists()
    for key in (nsd.EXPDESIGN_KEY, nsd.STIM_INFO_KEY, nsd.STIMULI_KEY):
        assert (synth_root / "nsd" / key).is_file()
    assert len(man["labels"]) == SPEC.n_images


# ----------------------------------------------------------------------------------------- betas


def test_betas_format_and_grid(synth_root: Path) -> None:
    img = nib.load(_betas(synth_root, 1, 1))
    valid = nib.load(_betas(synth_root, 1, 1, "valid"))
    assert img.shape == (*SPEC.crop_shape, TPS)
    assert img.get_data_dtype() == np.int16
    assert valid.shape == SPEC.crop_shape
    np.testing.assert_allclose(valid.affine, img.affine)
    assert int(img.header["qform_code"]) == 4 and int(img.header["sform_code"]) == 4
    np.testing.assert_allclose(img.header.get_zooms()[:3], (1, 1, 1))
    # Same orientation as NSD's grid, translated by whole voxels: stays on the 1 mm lattice.
    shift = np.linalg.solve(NSD_AFFINE, img.affine)
    np.testing.assert_allclose(shift[:3, :3], np.eye(3))
    np.testing.assert_allclose(shift[:3, 3], np.round(shift[:3, 3]))
    # Scaled ints, not floats with a slope.
    data = np.asarray(img.dataobj)
    assert data.dtype == np.int16
    assert 200 < data[data != 0].std() < 2000  # ~2 % noise x 300


def test_zero_outside_valid_and_sessions_differ(synth_root: Path) -> None:
    first = None
    for session in (1, 2):
        data = np.asarray(nib.load(_betas(synth_root, 1, session)).dataobj)
        valid = np.asarray(nib.load(_betas(synth_root, 1, session, "valid")).dataobj) > 0
        assert not np.any(data[~valid]), "voxels outside the valid mask must be 0 in every trial"
        assert (data[valid] != 0).mean() > 0.99
        if first is None:
            first = valid
    assert not np.array_equal(first, valid), "valid masks should differ between sessions"
    a = np.asarray(nib.load(_betas(synth_root, 1, 1)).dataobj)
    b = np.asarray(nib.load(_betas(synth_root, 2, 1)).dataobj)
    assert not np.array_equal(a, b)


def test_crop_holds_grey_matter(synth_root: Path) -> None:
    from nilearn import datasets, image

    img = nib.load(_betas(synth_root, 1, 1, "valid"))
    gm = image.resample_to_img(
        datasets.load_mni152_gm_mask(),
        img,
        interpolation="nearest",
        force_resample=True,
        copy_header=True,
    )
    frac = (np.asarray(gm.dataobj) > 0).mean()
    assert frac > 0.3, f"crop should be centred on the brain; grey-matter fraction {frac:.2f}"


# ---------------------------------------------------------------------------------- expdesign


def test_expdesign(synth_root: Path) -> None:
    d = _expdesign(synth_root)
    n_design = max(SPEC.sessions)
    ips, n_shared = SPEC.images_per_subject, SPEC.n_shared
    shapes = {
        "masterordering": (1, n_design * TPS),
        "subjectim": (len(SPEC.sessions), ips),
        "sharedix": (1, n_shared),
        "basiccnt": (3, n_design),
        "stimpattern": (n_design, RUNS_PER_SESSION, max(TRIALS_PER_RUN) + 12),
    }
    for name, shape in shapes.items():
        assert d[name].shape == shape, name
        assert d[name].dtype == np.float64, name
    mo, sim = d["masterordering"], d["subjectim"]
    assert mo.min() >= 1 and mo.max() <= ips  # 1-based columns of subjectim
    assert sim.min() >= 1 and sim.max() <= SPEC.n_images  # 1-based 73k ids
    for row in sim:  # shared images first, for every subject
        np.testing.assert_array_equal(row[:n_shared], d["sharedix"][0])
    assert len(np.unique(sim)) == n_shared + len(SPEC.sessions) * (ips - n_shared)
    np.testing.assert_array_equal(d["basiccnt"].sum(axis=0), TPS)
    run_sums = d["stimpattern"].sum(axis=2)
    expected = [TRIALS_PER_RUN[r % 2] for r in range(RUNS_PER_SESSION)]
    np.testing.assert_array_equal(run_sums, np.tile(expected, (n_design, 1)))
    shared0 = set(d["sharedix"][0].astype(int) - 1)
    for subject, n_sessions in enumerate(SPEC.sessions, start=1):
        ids = _trial_nsd_ids(d, subject, n_sessions * TPS)
        assert shared0 & set(ids), f"subject {subject} sees no shared image"
        assert len(set(ids)) < len(ids), f"subject {subject} has no repeated image"


# ----------------------------------------------------------------------------------- stim info


def test_stim_info(synth_root: Path) -> None:
    df = pd.read_pickle(synth_root / "nsd" / nsd.STIM_INFO_KEY)
    d = _expdesign(synth_root)
    assert isinstance(df, pd.DataFrame) and len(df) == SPEC.n_images
    assert df.columns[0] == "Unnamed: 0"
    for col in ["cocoId", "cocoSplit", "cropBox", "loss", "nsdId", "flagged", "BOLD5000"]:
        assert col in df.columns
    np.testing.assert_array_equal(df["nsdId"].to_numpy(), np.arange(SPEC.n_images))
    assert set(df["cocoSplit"]) == {"train2017", "val2017"}
    assert df["cocoId"].is_unique and df["cocoId"].between(1, 581929).all()
    shared = set(d["sharedix"][0].astype(int) - 1)
    assert set(np.flatnonzero(df["shared1000"].to_numpy())) == shared
    for subject, n_sessions in enumerate(SPEC.sessions, start=1):
        seen = set(np.flatnonzero(df[f"subject{subject}"].to_numpy()))
        assert seen == set(d["subjectim"][subject - 1].astype(int) - 1)
        ids = _trial_nsd_ids(d, subject, n_sessions * TPS)
        for k in range(3):
            rep = df[f"subject{subject}_rep{k}"].to_numpy()
            for nsd_id in np.flatnonzero(rep):
                assert ids[rep[nsd_id] - 1] == nsd_id  # 1-based trial number
        first = df[f"subject{subject}_rep0"].to_numpy()
        assert set(np.flatnonzero(first)) == set(ids)
    assert f"subject{len(SPEC.sessions) + 1}" not in df.columns


def test_stimuli_hdf5(synth_root: Path) -> None:
    path = synth_root / "nsd" / nsd.STIMULI_KEY
    with h5py.File(path, "r") as f:
        brick = f["imgBrick"]
        assert brick.shape == (SPEC.n_images, 425, 425, 3)
        assert brick.dtype == np.uint8
        assert brick.chunks is not None and brick.compression == "gzip"
        assert brick[1].any() and not brick[SPEC.n_images - 1].any()
    assert path.stat().st_size < 5_000_000


# ---------------------------------------------------------------------------------------- COCO


def test_coco_zip_and_categories(synth_root: Path, coco: dict[str, COCO]) -> None:
    with zipfile.ZipFile(synth_root / "coco" / "annotations" / nsd.COCO_ZIP_NAME) as zf:
        names = zf.namelist()
        assert "annotations/instances_train2017.json" in names
        assert "annotations/instances_val2017.json" in names
        raw = json.load(io.TextIOWrapper(zf.open("annotations/instances_val2017.json")))
    assert set(raw) == {"info", "licenses", "images", "annotations", "categories"}
    for c in coco.values():
        cats = c.loadCats(c.getCatIds())
        assert len(cats) == 80
        assert {x["supercategory"] for x in cats} == SUPERCATS
        assert max(x["id"] for x in cats) == 90 and min(x["id"] for x in cats) == 1
        assert {x["name"] for x in cats} >= {"person", "toothbrush", "hair drier", "dining table"}
        assert c.loadCats([90])[0]["name"] == "toothbrush"
        for img in c.loadImgs(c.getImgIds()[:20]):
            assert img["file_name"] == f"{img['id']:012d}.jpg"
            assert img["height"] > 0 and img["width"] > 0
        for ann in c.loadAnns(c.getAnnIds()[:50]):
            assert {"segmentation", "area", "bbox", "iscrowd", "image_id", "category_id"} <= set(
                ann
            )
            assert isinstance(ann["area"], float) and 1 <= ann["id"] <= 2_300_000


def test_coco_ids_and_special_images(synth_root: Path, coco: dict[str, COCO]) -> None:
    train, val = (set(coco[s].getImgIds()) for s in nsd.COCO_SPLITS)
    assert not train & val
    assert min(val) < max(train) and min(train) < max(val), "ids should be interleaved"
    assert max(train | val) <= 581929
    df = pd.read_pickle(synth_root / "nsd" / nsd.STIM_INFO_KEY)
    for split, ids in (("train2017", train), ("val2017", val)):
        nsd_ids = set(df.loc[df["cocoSplit"] == split, "cocoId"])
        assert nsd_ids and nsd_ids <= ids
        assert ids - nsd_ids, f"{split} should also hold images NSD does not use"
    n_empty = n_multi = n_tie = 0
    for split, coco_id in zip(df["cocoSplit"], df["cocoId"], strict=True):
        anns = coco[split].loadAnns(coco[split].getAnnIds(imgIds=[int(coco_id)]))
        areas = sorted((a["area"] for a in anns), reverse=True)
        n_empty += not anns
        n_multi += len(set(areas)) > 1
        n_tie += len(areas) > 1 and areas[0] == areas[1]
    assert n_empty >= 2 and n_multi > 100 and n_tie >= 2
    man = json.loads((synth_root / "synth_manifest.json").read_text())
    for nsd_id in man["unannotated_nsd_ids"]:
        split, coco_id = df.loc[nsd_id, ["cocoSplit", "cocoId"]]
        assert not coco[split].getAnnIds(imgIds=[int(coco_id)])
        assert man["labels"][nsd_id] == "unknown"
    for nsd_id in man["area_tie_nsd_ids"]:
        split, coco_id = df.loc[nsd_id, ["cocoSplit", "cocoId"]]
        areas = sorted(
            (a["area"] for a in coco[split].loadAnns(coco[split].getAnnIds(imgIds=[int(coco_id)]))),
            reverse=True,
        )
        assert areas[0] == areas[1]


def test_planted_labels_match_independent_lookup(synth_root: Path, coco: dict[str, COCO]) -> None:
    man = json.loads((synth_root / "synth_manifest.json").read_text())
    df = pd.read_pickle(synth_root / "nsd" / nsd.STIM_INFO_KEY)
    d = _expdesign(synth_root)
    for subject, n_sessions in enumerate(SPEC.sessions, start=1):
        for nsd_id in _trial_nsd_ids(d, subject, n_sessions * TPS):
            row = df.iloc[nsd_id]
            expected = _label(coco[row["cocoSplit"]], int(row["cocoId"]))
            assert man["labels"][nsd_id] == expected
    shown = {int(i) for s in range(1, 5) for i in _trial_nsd_ids(d, s, SPEC.sessions[s - 1] * TPS)}
    assert "unknown" in {man["labels"][i] for i in shown}


def test_legacy_lookup_gives_other_labels(synth_root: Path, coco: dict[str, COCO]) -> None:
    """The original merge renumbered train images to list positions and looked up nsdId+1."""
    man = json.loads((synth_root / "synth_manifest.json").read_text())
    with zipfile.ZipFile(synth_root / "coco" / "annotations" / nsd.COCO_ZIP_NAME) as zf:
        raw = json.load(io.TextIOWrapper(zf.open("annotations/instances_train2017.json")))
    position_to_id = [img["id"] for img in raw["images"]]
    d = _expdesign(synth_root)
    shown = np.unique(d["subjectim"][:, d["masterordering"][0].astype(int) - 1].astype(int) - 1)
    differ = 0
    for nsd_id in shown:
        pos = nsd_id + 1  # the 1-based 73k id used as a merged (renumbered) image id
        legacy = (
            _label(coco["train2017"], position_to_id[pos]) if pos < len(position_to_id) else None
        )
        differ += legacy != man["labels"][nsd_id]
    assert differ / len(shown) > 0.6


def test_signal_is_planted_by_label(synth_root: Path) -> None:
    """Trials sharing a label correlate more than trials with different labels."""
    man = json.loads((synth_root / "synth_manifest.json").read_text())
    d = _expdesign(synth_root)
    x = np.concatenate(
        [np.asarray(nib.load(_betas(synth_root, 2, s)).dataobj) for s in (1, 2, 3)], axis=3
    )
    x = x.reshape(-1, x.shape[-1]).T.astype(np.float32)
    x = x[:, x.any(axis=0)]
    labels = np.array(man["labels"])[_trial_nsd_ids(d, 2, 3 * TPS)]
    keep = labels != "unknown"
    x, labels = x[keep], labels[keep]
    x -= x.mean(axis=1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    r = x @ x.T
    same = labels[:, None] == labels[None, :]
    off = ~np.eye(len(labels), dtype=bool)
    within, between = r[same & off].mean(), r[~same].mean()
    assert within > between + 0.02, (within, between)


# ----------------------------------------------------------------------- determinism, variants


def test_deterministic_from_seed(synth_root: Path, tmp_path: Path) -> None:
    again = make_synthetic(tmp_path / "again", SPEC)
    files = sorted(p.relative_to(synth_root) for p in synth_root.rglob("*") if p.is_file())
    assert len(files) > 10
    for rel in files:
        assert (again / rel).read_bytes() == (synth_root / rel).read_bytes(), rel
    other = make_synthetic(
        tmp_path / "other",
        SynthSpec(seed=1, sessions=(1,), layout=Layout(1, (3, 3)), n_images=400),
    )
    assert (other / "nsd" / nsd.STIM_INFO_KEY).read_bytes() != (
        synth_root / "nsd" / nsd.STIM_INFO_KEY
    ).read_bytes()


def test_non_flipped_grid(tmp_path: Path) -> None:
    spec = SynthSpec(
        seed=3,
        sessions=(2, 1),
        layout=Layout(2, (4, 3)),
        n_images=300,
        images_per_subject=60,
        n_shared=20,
        flip_x=False,
        crop_shape=(20, 26, 22),
    )
    root = make_synthetic(tmp_path / "nf", spec)
    img = nib.load(_betas(root, 1, 2))
    assert img.shape == (20, 26, 22, 7)
    assert img.affine[0, 0] == 1.0 and np.allclose(np.diag(img.affine)[1:3], 1)
    np.testing.assert_allclose(img.affine[:3, 3], np.round(img.affine[:3, 3]))
    centre = img.affine @ np.array([*(np.array(img.shape[:3]) / 2), 1.0])
    assert np.all(np.abs(centre[:3] - np.array([0, -22, 9])) <= 2)
    # Same world box as the flipped variant: the voxel at world (0,-22,9) exists in both grids.
    flipped = SynthSpec(**{**spec.__dict__, "flip_x": True}).affine()
    assert flipped[0, 0] == -1.0
    d = _expdesign(root)
    assert d["masterordering"].shape == (1, 2 * 7)
    assert not (root / "nsd" / nsd.betas_key(2, 2)).exists()


def test_cli_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = ["synth", str(out), "--sessions", "1,2", "--runs-per-session", "2"]
    argv += ["--trials-per-run", "3,2", "--n-images", "200", "--images-per-subject", "50"]
    argv += ["--n-shared", "10", "--crop-shape", "16,18,20", "--no-flip"]
    assert cli_main(argv) == 0
    man = json.loads((out / "synth_manifest.json").read_text())
    assert man["layout"]["trials_per_session"] == 5 and man["layout"]["sessions"] == [1, 2]
    assert man["grid"]["affine"][0][0] == 1.0
    assert nib.load(_betas(out, 2, 2)).shape == (16, 18, 20, 5)
    assert "trials/session" in capsys.readouterr().out
    assert SynthSpec().trials_per_session == 750  # NSD's layout is the default
    with pytest.raises(NsdPrepError, match="n_images=100 too small"):
        make_synthetic(tmp_path / "bad", SynthSpec(n_images=100))
    assert cli_main(["synth", str(tmp_path / "bad2"), "--sessions", "0,1"]) == 2
    assert "sessions must be >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_full_grid_streamed(tmp_path: Path) -> None:
    spec = SynthSpec(sessions=(1,), layout=Layout(1, (2, 2)), full=True)
    root = make_synthetic(tmp_path / "full", spec)
    img = nib.load(_betas(root, 1, 1))
    assert img.shape == (182, 218, 182, 2)
    np.testing.assert_allclose(img.affine, NSD_AFFINE)
    data = np.asarray(img.dataobj)
    valid = np.asarray(nib.load(_betas(root, 1, 1, "valid")).dataobj) > 0
    assert not data[~valid].any() and data[valid].any()
    assert 0.15 < valid.mean() < 0.5  # a liberal brain mask, not the whole box
