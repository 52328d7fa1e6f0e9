"""Synthetic NSD + COCO data in the real file formats and bucket layout, with a planted signal.

``make_synthetic(outdir, SynthSpec(...))`` writes::

    OUTDIR/nsd/nsddata_betas/ppdata/subjXX/MNI/betas_fithrf/{betas,valid}_sessionNN.nii.gz
    OUTDIR/nsd/nsddata/ppdata/subjXX/MNI/roi/nsdgeneral.nii.gz
    OUTDIR/nsd/nsddata/experiments/nsd/nsd_expdesign.mat
    OUTDIR/nsd/nsddata/experiments/nsd/nsd_stim_info_merged.pkl
    OUTDIR/nsd/nsddata/experiments/nsd/nsd_stim_info_merged.csv
    OUTDIR/nsd/nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5
    OUTDIR/coco/annotations/annotations_trainval2017.zip
    OUTDIR/synth_manifest.json        (spec + planted labels; for tests, never read by the pipeline)

Formats follow the real files (loaded with nibabel, ``scipy.io.loadmat``, ``pandas.read_pickle``,
h5py and pycocotools, exactly as users of the real data do); only the sizes are smaller.

Layout. The default experiment layout is the real one (12 runs per session, 63 trials in odd runs and
62 in even runs, 750 trials per session). A smaller layout (the tests use 4 runs of 8/7 trials) is
written only when asked for, and every downstream stage must then be told the same layout explicitly
(``--runs-per-session R --trials-per-run A,B``); it is never guessed from the data.

Grid. ``full=True`` writes NSD's 1 mm MNI grid, shape 182x218x182, with FSL's MNI152 1 mm affine
``[[-1,0,0,90],[0,1,0,-126],[0,0,1,-72]]`` (x flipped). ``full=False`` writes a brain-centred crop of
that grid (same spacing and orientation; the translation moves by whole voxels, so the crop lies ON the
1 mm grid). ``flip_x=False`` uses a non-flipped grid covering the same box,
``[[1,0,0,-91],[0,1,0,-126],[0,0,1,-72]]``, with its own noise. qform and sform codes are both 4 (MNI).

Header (``header=``, ``--header``). ``"fsl"`` (default): as above. ``"nsd"``: the header NSD's MATLAB
tools most likely wrote (cvnlab/nsdcode ``nsd_savenifti.m`` via the NIfTI toolbox's ``make_nii`` /
``save_nii``; inferred from the code, not read from a real file): the same world data stored with x
running left to right (voxel ``i`` of the full grid at ``x = i - 91``), affine
``[[1,0,0,-91],[0,1,0,-126],[0,0,1,-72]]`` in the sform with ``sform_code`` 1 and ``qform_code`` 0,
``scl_slope``/``scl_inter`` 0 (no scaling). Both headers hold the SAME values at the same world
positions (the nsd files are the fsl files flipped on axis 0), so every derivative must come out
identical.

Betas are int16, value = beta (% signal change) x 300, one volume per trial in chronological order.
Voxels outside a liberal brain mask (the MNI152 brain mask dilated by 4 mm), or outside a session's
field of view (``k = 3 * (session % 3)`` top slices of the generated grid, so sessions differ by whole
3 mm slices), are 0 in every
trial; ``valid_sessionNN.nii.gz`` (int16 0/1, 3D, same grid and header style, as NSD's MATLAB tools
write it: "not all betas are 0 in that voxel") marks the others. All
NIfTI files are written volume by volume with :class:`nsdprep.core.nifti.NiftiStreamWriter`, so even the
full grid never holds a 4D array in memory.

Planted signal. The label of an NSD image is the supercategory of the largest-area annotation of its
TRUE COCO image (``cocoId``; ties -> first in annotation order; "unknown" if none). Each subject has one
smooth spatial pattern per supercategory (a sum of plane waves with wavelengths 16-40 mm, unit variance,
so it survives a 3 mm resample and a grey-matter mask); a trial is
``amplitude * pattern[label] + noise_sd * N(0, 1)`` ("unknown" has no pattern), x300, rounded.

ROIs. ``nsdgeneral.nii.gz`` per subject on the betas' grid and header, int16 in NSD's convention
(-1 outside the brain, 0 not in the ROI, 1 in it): the posterior part of the MNI152 brain
(:func:`roi_volume`), which the planted patterns cover.

Design (``nsd_expdesign.mat``, all double, all 1-based as in NSD). ``subjectim`` rows start with the
``n_shared`` shared images (= ``sharedix``, sorted), then each subject's own images, all distinct;
``masterordering`` (one row, ``max(sessions) x trials_per_session`` entries) indexes columns of
``subjectim``; each image appears at least 3 times in the design (more when the design has more trials
than 3x ``images_per_subject``). ``stimpattern`` has ``max(trials_per_run) + 12`` trial slots per run
(NSD: 75) with 1 where a stimulus was shown; ``basiccnt[k, s]`` counts the trials of design session s
that are the (k+1)-th presentation of their image (row 3: 3rd or later; the real definition is
unconfirmed). ``nsd_stim_info_merged.pkl`` has NSD's columns, starting with the saved-CSV leftover
``Unnamed: 0``; ``subjectN_repK`` hold the 1-based trial number of the K-th presentation (0 = none). The same table is
written as ``nsd_stim_info_merged.csv`` the way the released CSV reads (``DataFrame.to_csv`` defaults:
a leading unnamed index column, ``True``/``False``, each cropBox tuple as its text), without the
``Unnamed: 0`` leftover. ``cropBox`` is ``(top, bottom, left, right)``: the square crop along the
longer side of the picture's real size, at a random position (a third of them centred), in whole
pixels.

COCO. The real 80 categories (ids 1..90 with gaps, 12 supercategories). Image ids are drawn from the
real range, train and val interleaved and disjoint; extra COCO images are not used by NSD; some NSD
images have no annotation, many have several of different areas, some have an exact area tie. Crop
disagreements are planted in shown images: in ``crop_planted`` the largest object is mostly cut away by
the crop and a smaller object of another supercategory lies wholly inside it (default and crop rules
disagree); in ``crop_gone`` the only object lies wholly in the cut-away margin (crop rule: "unknown").
The manifest holds the crop rule's labels computed from the rectangles' geometry. The
original broken merge (train ids renumbered to list positions, looked up by the 1-based 73k id) gives
labels of unrelated images here too.

Everything is deterministic in ``seed``: the same spec gives byte-identical files (gzip mtime 0, fixed
zip timestamps).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import math
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nsdprep.core import nsd
from nsdprep.core._io import atomic_path
from nsdprep.core.errors import NsdPrepError, UsageError
from nsdprep.core.nsd import UNKNOWN

log = logging.getLogger(__name__)

#: NSD / FSL MNI152 1 mm grid.
FULL_SHAPE: tuple[int, int, int] = (182, 218, 182)
FLIPPED_AFFINE = np.array(
    [[-1.0, 0, 0, 90], [0, 1.0, 0, -126], [0, 0, 1.0, -72], [0, 0, 0, 1]], dtype=np.float64
)
NONFLIPPED_AFFINE = np.array(
    [[1.0, 0, 0, -91], [0, 1.0, 0, -126], [0, 0, 1.0, -72], [0, 0, 0, 1]], dtype=np.float64
)
#: Beta scale of NSD's int16 betas: stored value = % signal change x 300.
BETA_SCALE = 300
#: Image size of NSD's stimulus brick.
STIM_SIZE = 425
#: Real COCO 2017 id ranges (images; non-crowd annotations).
COCO_MAX_IMAGE_ID = 581929
COCO_MAX_ANN_ID = 2232119

#: The real COCO 2017 instance categories: (id, name, supercategory); 80 names, ids 1..90 with gaps.
COCO_CATEGORIES: tuple[tuple[int, str, str], ...] = (
    (1, "person", "person"),
    (2, "bicycle", "vehicle"),
    (3, "car", "vehicle"),
    (4, "motorcycle", "vehicle"),
    (5, "airplane", "vehicle"),
    (6, "bus", "vehicle"),
    (7, "train", "vehicle"),
    (8, "truck", "vehicle"),
    (9, "boat", "vehicle"),
    (10, "traffic light", "outdoor"),
    (11, "fire hydrant", "outdoor"),
    (13, "stop sign", "outdoor"),
    (14, "parking meter", "outdoor"),
    (15, "bench", "outdoor"),
    (16, "bird", "animal"),
    (17, "cat", "animal"),
    (18, "dog", "animal"),
    (19, "horse", "animal"),
    (20, "sheep", "animal"),
    (21, "cow", "animal"),
    (22, "elephant", "animal"),
    (23, "bear", "animal"),
    (24, "zebra", "animal"),
    (25, "giraffe", "animal"),
    (27, "backpack", "accessory"),
    (28, "umbrella", "accessory"),
    (31, "handbag", "accessory"),
    (32, "tie", "accessory"),
    (33, "suitcase", "accessory"),
    (34, "frisbee", "sports"),
    (35, "skis", "sports"),
    (36, "snowboard", "sports"),
    (37, "sports ball", "sports"),
    (38, "kite", "sports"),
    (39, "baseball bat", "sports"),
    (40, "baseball glove", "sports"),
    (41, "skateboard", "sports"),
    (42, "surfboard", "sports"),
    (43, "tennis racket", "sports"),
    (44, "bottle", "kitchen"),
    (46, "wine glass", "kitchen"),
    (47, "cup", "kitchen"),
    (48, "fork", "kitchen"),
    (49, "knife", "kitchen"),
    (50, "spoon", "kitchen"),
    (51, "bowl", "kitchen"),
    (52, "banana", "food"),
    (53, "apple", "food"),
    (54, "sandwich", "food"),
    (55, "orange", "food"),
    (56, "broccoli", "food"),
    (57, "carrot", "food"),
    (58, "hot dog", "food"),
    (59, "pizza", "food"),
    (60, "donut", "food"),
    (61, "cake", "food"),
    (62, "chair", "furniture"),
    (63, "couch", "furniture"),
    (64, "potted plant", "furniture"),
    (65, "bed", "furniture"),
    (67, "dining table", "furniture"),
    (70, "toilet", "furniture"),
    (72, "tv", "electronic"),
    (73, "laptop", "electronic"),
    (74, "mouse", "electronic"),
    (75, "remote", "electronic"),
    (76, "keyboard", "electronic"),
    (77, "cell phone", "electronic"),
    (78, "microwave", "appliance"),
    (79, "oven", "appliance"),
    (80, "toaster", "appliance"),
    (81, "sink", "appliance"),
    (82, "refrigerator", "appliance"),
    (84, "book", "indoor"),
    (85, "clock", "indoor"),
    (86, "vase", "indoor"),
    (87, "scissors", "indoor"),
    (88, "teddy bear", "indoor"),
    (89, "hair drier", "indoor"),
    (90, "toothbrush", "indoor"),
)
#: The 12 supercategories in COCO's order.
SUPERCATEGORIES: tuple[str, ...] = tuple(dict.fromkeys(c[2] for c in COCO_CATEGORIES))
#: How often each supercategory is an image's dominant (largest) object (person-heavy, like NSD).
_SUPERCAT_WEIGHTS = {
    "person": 0.28,
    "vehicle": 0.10,
    "outdoor": 0.05,
    "animal": 0.12,
    "accessory": 0.04,
    "sports": 0.07,
    "kitchen": 0.06,
    "food": 0.10,
    "furniture": 0.09,
    "electronic": 0.04,
    "appliance": 0.03,
    "indoor": 0.02,
}
_IMAGE_SIZES = ((480, 640), (640, 480), (427, 640), (640, 427), (375, 500), (500, 375), (512, 512))
#: Fixed timestamp of every zip member (COCO 2017 release date).
_ZIP_DATE = (2017, 9, 1, 0, 0, 0)


@dataclass(frozen=True)
class SynthSpec:
    """What to generate. Defaults: the real experiment layout on a small brain-centred crop.

    Parameters
    ----------
    seed : int
        Seed of every random choice; same spec -> byte-identical files.
    sessions : tuple of int
        Sessions per subject (subj01, subj02, ...); unequal, as in NSD.
    layout : nsdprep.core.nsd.Layout
        Runs per session and trials in odd / even runs (real: 12, (63, 62)).
    n_images : int
        Rows of ``nsd_stim_info_merged.pkl`` (real: 73000); nsdId = row position (0-based).
    images_per_subject : int
        Columns of ``subjectim`` (real: 10000); the first ``n_shared`` are the shared images.
    n_shared : int
        Images shown to every subject (real: 1000).
    full : bool
        True: NSD's 182x218x182 grid, written volume by volume; False: ``crop_shape`` crop.
    flip_x : bool
        True: NSD/FSL x-flipped MNI affine; False: a non-flipped grid over the same box.
    header : {"fsl", "nsd"}
        ``"nsd"``: the same data as ``"fsl"``, stored as NSD's MATLAB tools write (see module doc).
    crop_shape : (int, int, int)
        Crop size in 1 mm voxels (unequal on purpose so axis mix-ups fail).
    amplitude, noise_sd : float
        Planted pattern amplitude and trial noise SD, in % signal change.
    n_extra_coco : int or None
        COCO images not used by NSD (None: ``n_images // 2``).
    val_fraction : float
        Fraction of COCO images in val2017.
    """

    seed: int = 0
    sessions: tuple[int, ...] = (3, 3, 2, 2)
    layout: nsd.Layout = nsd.Layout()  # noqa: RUF009 (frozen, immutable)
    n_images: int = 1000
    images_per_subject: int = 200
    n_shared: int = 50
    full: bool = False
    flip_x: bool = True
    header: str = "fsl"
    crop_shape: tuple[int, int, int] = (36, 42, 36)
    amplitude: float = 0.45
    noise_sd: float = 2.0
    n_extra_coco: int | None = None
    val_fraction: float = 0.2

    @property
    def n_subjects(self) -> int:
        """Number of subjects."""
        return len(self.sessions)

    @property
    def trials_per_session(self) -> int:
        """Trials per session: runs alternate ``trials_per_run[0]`` (odd) and ``[1]`` (even)."""
        return self.layout.trials_per_session

    @property
    def n_design_sessions(self) -> int:
        """Sessions in the experimental design (real: 40) = most sessions of any subject."""
        return max(self.sessions)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Written 3D grid shape."""
        return FULL_SHAPE if self.full else tuple(self.crop_shape)

    def affine(self) -> np.ndarray:
        """4x4 affine of the written grid (a whole-voxel translate of the 1 mm MNI grid)."""
        base = self.generation_affine()
        if self.header == "nsd":
            return base @ _x_flip(self.shape[0])
        return base

    def generation_affine(self) -> np.ndarray:
        """Affine of the grid the data are generated on (the nsd header writes it flipped)."""
        return grid_affine(self.full, self.flip_x, self.crop_shape)

    def writer_options(self) -> dict[str, Any]:
        """Header codes and scaling fields of the written NIfTI files."""
        if self.header == "nsd":
            return {"xform_code": 1, "qform_code": 0, "scl_fields": (0.0, 0.0)}
        return {}


def _x_flip(n0: int) -> np.ndarray:
    """Voxel map ``i -> n0 - 1 - i`` (an affine ``A`` becomes ``A @ flip`` for data ``[::-1]``)."""
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, n0 - 1.0
    return flip


def grid_affine(full: bool, flip_x: bool, crop_shape: Sequence[int]) -> np.ndarray:
    """Affine of the full 1 mm grid, or of a brain-centred crop of it on the same voxel lattice."""
    base = FLIPPED_AFFINE if flip_x else NONFLIPPED_AFFINE
    if full:
        return base.copy()
    # Brain centre (MNI mm, centre of mass of the MNI152 brain mask, rounded).
    centre_ijk = np.linalg.solve(base, np.array([0.0, -22.0, 9.0, 1.0]))[:3]
    offset = np.round(centre_ijk - np.asarray(crop_shape) / 2.0)
    shift = np.eye(4)
    shift[:3, 3] = offset
    return base @ shift


def make_synthetic(outdir: Path, spec: SynthSpec = SynthSpec()) -> Path:  # noqa: B008
    """Write the synthetic NSD + COCO tree for ``spec`` into ``outdir``; return ``outdir``."""
    _check_spec(spec)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    bucket = outdir / "nsd"

    design = _make_design(spec)
    coco = _make_coco(spec, design)
    labels = coco["labels"]  # supercategory per nsdId

    _write_expdesign(bucket / nsd.EXPDESIGN_KEY, design)
    _write_stim_info(bucket / nsd.STIM_INFO_KEY, bucket / nsd.STIM_INFO_CSV_KEY, spec, design, coco)
    _write_stimuli(bucket / nsd.STIMULI_KEY, spec)
    _write_coco_zip(outdir / "coco" / "annotations" / nsd.COCO_ZIP_NAME, coco)
    _write_betas(bucket, spec, design, labels)
    _write_rois(bucket, spec)
    _write_manifest(outdir / "synth_manifest.json", spec, design, coco)
    log.info("synthetic NSD + COCO written to %s", outdir)
    return outdir


# --------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``synth`` stage's arguments."""
    d = SynthSpec()
    parser.description = (
        "Write synthetic NSD + COCO data in the real formats and bucket layout. The default "
        "layout is NSD's (12 runs/session, 63/62 trials). A smaller layout, e.g. "
        "--runs-per-session 4 --trials-per-run 8,7, must be passed explicitly to every later "
        "stage too; it is never guessed from the data."
    )
    parser.add_argument("outdir", type=Path, metavar="OUTDIR", help="output directory")
    parser.add_argument(
        "--seed", type=int, default=d.seed, help="random seed (default %(default)s)"
    )
    parser.add_argument(
        "--sessions",
        type=_int_tuple,
        default=d.sessions,
        help="sessions per subject, comma-separated (default 3,3,2,2)",
    )
    parser.add_argument(
        "--runs-per-session",
        default=str(d.layout.runs_per_session),
        help="runs per session (default %(default)s, as in NSD)",
    )
    parser.add_argument(
        "--trials-per-run",
        default=",".join(map(str, d.layout.trials_per_run)),
        help="trials in odd,even runs (default %(default)s, as in NSD)",
    )
    parser.add_argument("--n-images", type=int, default=d.n_images, help="rows of the stim info")
    parser.add_argument(
        "--images-per-subject", type=int, default=d.images_per_subject, help="columns of subjectim"
    )
    parser.add_argument("--n-shared", type=int, default=d.n_shared, help="images shared by all")
    parser.add_argument(
        "--full", action="store_true", help="real 182x218x182 grid (large) instead of a crop"
    )
    parser.add_argument("--no-flip", action="store_true", help="use a non-flipped (x+) grid")
    parser.add_argument(
        "--header",
        choices=("fsl", "nsd"),
        default=d.header,
        help="fsl: x-flipped affine, codes 4 (default); nsd: the same data as NSD's MATLAB tools "
        "store it (x+ affine, sform_code 1, qform_code 0, no scaling)",
    )
    parser.add_argument(
        "--crop-shape", type=_int_tuple, default=d.crop_shape, help="crop size, e.g. 36,42,36"
    )
    parser.add_argument(
        "--amplitude", type=float, default=d.amplitude, help="pattern amplitude (%% change)"
    )
    parser.add_argument(
        "--noise-sd", type=float, default=d.noise_sd, help="trial noise SD (%% change)"
    )


def main(args: argparse.Namespace) -> int:
    """CLI entry: build the spec from ``args`` and write the tree."""
    if len(args.crop_shape) != 3:
        raise UsageError(f"--crop-shape needs three numbers, got {args.crop_shape}")
    spec = SynthSpec(
        seed=args.seed,
        sessions=tuple(args.sessions),
        layout=nsd.Layout.parse(args.runs_per_session, args.trials_per_run),
        n_images=args.n_images,
        images_per_subject=args.images_per_subject,
        n_shared=args.n_shared,
        full=args.full,
        flip_x=not args.no_flip,
        header=args.header,
        crop_shape=tuple(args.crop_shape),
        amplitude=args.amplitude,
        noise_sd=args.noise_sd,
    )
    make_synthetic(args.outdir, spec)
    print(
        f"synthetic data in {args.outdir}: {spec.n_subjects} subjects, sessions {spec.sessions}, "
        f"{spec.trials_per_session} trials/session ({spec.layout.runs_per_session} runs of "
        f"{spec.layout.trials_per_run[0]}/{spec.layout.trials_per_run[1]}), grid {spec.shape}, "
        f"{spec.header} header"
    )
    return 0


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return nsd.parse_int_list(text)
    except NsdPrepError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# ------------------------------------------------------------------------------------ spec checks


def _check_spec(spec: SynthSpec) -> None:
    if not spec.sessions or any(s < 1 for s in spec.sessions):
        raise UsageError(f"sessions must be >= 1 per subject, got {spec.sessions}")
    if len(spec.sessions) > 8:
        raise UsageError(f"NSD has at most 8 subjects, got {len(spec.sessions)}")
    if not 1 <= spec.n_shared < spec.images_per_subject:
        raise UsageError(
            f"need 1 <= n_shared < images_per_subject, got {spec.n_shared}, "
            f"{spec.images_per_subject}"
        )
    needed = spec.n_shared + spec.n_subjects * (spec.images_per_subject - spec.n_shared)
    if needed > spec.n_images:
        raise UsageError(
            f"n_images={spec.n_images} too small: {spec.n_subjects} subjects x "
            f"{spec.images_per_subject} images with {spec.n_shared} shared need {needed}; "
            "raise --n-images or lower --images-per-subject"
        )
    if spec.header not in ("fsl", "nsd"):
        raise UsageError(f"header must be 'fsl' or 'nsd', got {spec.header!r}")
    if spec.header == "nsd" and not spec.flip_x:
        raise UsageError(
            "header 'nsd' stores the fsl data flipped on axis 0; it does not combine with "
            "flip_x=False (--no-flip)"
        )
    if not spec.full and len(spec.crop_shape) != 3:
        raise UsageError(f"crop_shape must have 3 sizes, got {spec.crop_shape}")
    if not spec.full and any(
        not 6 <= c <= f for c, f in zip(spec.crop_shape, FULL_SHAPE, strict=True)
    ):
        raise UsageError(f"crop_shape must be within 6..{FULL_SHAPE}, got {spec.crop_shape}")


def _rng(spec: SynthSpec, *stream: int) -> np.random.Generator:
    """Independent generator per purpose/subject/session, so order of generation never matters."""
    return np.random.default_rng([spec.seed, *stream])


# ----------------------------------------------------------------------------------- design


def _make_design(spec: SynthSpec) -> dict[str, Any]:
    """Experimental design with NSD's conventions (1-based everything), as float arrays."""
    rng = _rng(spec, 1)
    n_sub, ips, n_shared = spec.n_subjects, spec.images_per_subject, spec.n_shared
    tps = spec.trials_per_session
    n_design = spec.n_design_sessions * tps

    # Distinct 73k images: shared + each subject's own; the rest of the n_images are unused.
    chosen = rng.permutation(spec.n_images)[: n_shared + n_sub * (ips - n_shared)]
    shared = np.sort(chosen[:n_shared])  # 0-based nsdIds
    own = chosen[n_shared:].reshape(n_sub, ips - n_shared)
    subjectim = np.concatenate([np.tile(shared, (n_sub, 1)), own], axis=1) + 1  # 1-based

    # masterordering: indices (1-based) into a subject's images; each image repeats (NSD: 3 times).
    reps = max(3, math.ceil(n_design / ips))
    pool = rng.permutation(np.repeat(np.arange(1, ips + 1), reps))
    masterordering = pool[:n_design]

    # stimpattern: per design session and run, which of the trial slots hold a stimulus
    # (NSD: 75 slots per run of which 63/62 stimuli; 3 leading and 3 trailing slots blank).
    lengths = spec.layout.run_lengths()
    n_slots = max(spec.layout.trials_per_run) + 12
    stimpattern = np.zeros((spec.n_design_sessions, spec.layout.runs_per_session, n_slots))
    for s in range(spec.n_design_sessions):
        for r, n in enumerate(lengths):
            slots = np.sort(rng.choice(np.arange(3, n_slots - 3), size=n, replace=False))
            stimpattern[s, r, slots] = 1

    # basiccnt: per design session, trials that are the 1st, 2nd, 3rd (or later) presentation.
    basiccnt = np.zeros((3, spec.n_design_sessions))
    seen: dict[int, int] = {}
    for t, idx in enumerate(masterordering):
        k = seen.get(int(idx), 0)
        seen[int(idx)] = k + 1
        basiccnt[min(k, 2), t // tps] += 1

    return {
        "masterordering": masterordering.astype(np.float64)[None, :],
        "subjectim": subjectim.astype(np.float64),
        "sharedix": (shared + 1).astype(np.float64)[None, :],
        "basiccnt": basiccnt,
        "stimpattern": stimpattern,
    }


def trial_nsd_ids(design: dict[str, Any], spec: SynthSpec, subject: int) -> np.ndarray:
    """0-based nsdIds of every trial a subject did (chronological), from the design arrays."""
    n = spec.sessions[subject - 1] * spec.trials_per_session
    mo = design["masterordering"][0, :n].astype(np.int64)
    return design["subjectim"][subject - 1, mo - 1].astype(np.int64) - 1


# ------------------------------------------------------------------------------------------ COCO


def _make_coco(spec: SynthSpec, design: dict[str, Any]) -> dict[str, Any]:
    """COCO train/val instances (real categories) for the NSD images plus extra images; labels."""
    rng = _rng(spec, 2)
    n_extra = spec.n_images // 2 if spec.n_extra_coco is None else spec.n_extra_coco
    n_total = spec.n_images + n_extra
    ids = rng.choice(np.arange(1, COCO_MAX_IMAGE_ID + 1), size=n_total, replace=False)
    is_val = rng.random(n_total) < spec.val_fraction
    # Both splits must contain NSD images and extra images.
    is_val[0], is_val[1] = True, False
    if n_extra >= 2:
        is_val[spec.n_images], is_val[spec.n_images + 1] = True, False

    used = np.unique(design["subjectim"].astype(np.int64) - 1)
    shared = design["sharedix"][0].astype(np.int64) - 1
    n_special = max(2, spec.n_images // 100)
    # Images with no annotation ("unknown") and with an exact area tie; some of them shown to all.
    special = rng.permutation(np.setdiff1d(used, shared))[: 2 * n_special].tolist()
    empty = set(special[:n_special]) | {int(shared[0])}
    ties = set(special[n_special:]) | {int(shared[1])}
    # Crop disagreements (own random stream, so the rest of the data does not move).
    prng = _rng(spec, 6)
    free = prng.permutation(np.setdiff1d(used, np.concatenate([shared, special])))
    n_gone = max(1, n_special // 2)
    planted = set(free[:n_special].tolist()) | ({int(shared[2])} if shared.size > 2 else set())
    gone = set(free[n_special : n_special + n_gone].tolist())
    crng = _rng(spec, 7)
    crop_px: list[tuple[int, int, int, int]] = []  # x0, x1, y0, y1 of each NSD image's crop

    cats_by_super: dict[str, list[int]] = {}
    for cid, _name, sup in COCO_CATEGORIES:
        cats_by_super.setdefault(sup, []).append(cid)
    supers = list(_SUPERCAT_WEIGHTS)
    weights = np.array([_SUPERCAT_WEIGHTS[s] for s in supers])
    weights = weights / weights.sum()
    all_cats = [c[0] for c in COCO_CATEGORIES]
    super_of = {c[0]: c[2] for c in COCO_CATEGORIES}

    images: list[dict[str, Any]] = []
    anns_by_image: list[list[dict[str, Any]]] = []
    for i in range(n_total):
        h, w = _IMAGE_SIZES[rng.integers(len(_IMAGE_SIZES))]
        if (i in planted or i in gone) and h == w:
            h, w = 480, 640  # a disagreement needs a crop
        if i < spec.n_images:
            extra = max(h, w) - min(h, w)
            if i in planted or i in gone:
                off = int(prng.choice([0, extra]))
            else:
                off = extra // 2 if crng.random() < 1 / 3 else int(crng.integers(0, extra + 1))
            crop_px.append(
                (off, off + h, 0, h) if w > h else (0, w, off, off + w) if h > w else (0, w, 0, h)
            )
        images.append(
            {
                "license": int(rng.integers(1, 9)),
                "file_name": f"{int(ids[i]):012d}.jpg",
                "coco_url": "http://images.cocodataset.org/"
                f"{'val' if is_val[i] else 'train'}2017/{int(ids[i]):012d}.jpg",
                "height": int(h),
                "width": int(w),
                "date_captured": "2013-11-14 11:18:45",
                "flickr_url": "",
                "id": int(ids[i]),
            }
        )
        if i in empty:
            anns_by_image.append([])
            continue
        if i in planted or i in gone:
            anns_by_image.append(
                _planted_anns(i in gone, int(ids[i]), h, w, crop_px[i], prng, cats_by_super)
            )
            continue
        sup = supers[rng.choice(len(supers), p=weights)]
        big_cat = int(rng.choice(cats_by_super[sup]))
        n_small = int(rng.integers(0, 5))
        big_wh = (
            int(rng.integers(int(0.3 * w), int(0.9 * w))),
            int(rng.integers(int(0.3 * h), int(0.9 * h))),
        )
        objs = [(big_cat, big_wh)]
        if i in ties:  # a second largest object of another supercategory, identical area
            other = [s for s in supers if s != sup]
            objs.append((int(rng.choice(cats_by_super[other[rng.integers(len(other))]])), big_wh))
        for _ in range(n_small):
            small_wh = (
                int(rng.integers(4, max(5, int(0.29 * w)))),
                int(rng.integers(4, max(5, int(0.29 * h)))),
            )
            objs.append((int(rng.choice(all_cats)), small_wh))
        order = rng.permutation(len(objs))
        anns = []
        for j in order:
            cat, (bw, bh) = objs[j]
            x0 = float(rng.integers(0, w - bw + 1))
            y0 = float(rng.integers(0, h - bh + 1))
            anns.append(
                {
                    "segmentation": [[x0, y0, x0 + bw, y0, x0 + bw, y0 + bh, x0, y0 + bh]],
                    "area": float(bw * bh),
                    "iscrowd": 0,
                    "image_id": int(ids[i]),
                    "bbox": [x0, y0, float(bw), float(bh)],
                    "category_id": cat,
                }
            )
        anns_by_image.append(anns)

    labels = [_largest_label(anns_by_image[i], super_of) for i in range(spec.n_images)]
    crop_labels = [
        _largest_label(anns_by_image[i], super_of, crop_px[i]) for i in range(spec.n_images)
    ]
    crop_boxes = [
        _crop_box(crop_px[i], images[i]["height"], images[i]["width"]) for i in range(spec.n_images)
    ]

    splits: dict[str, dict[str, Any]] = {}
    ann_ids = iter(
        rng.choice(
            np.arange(1, COCO_MAX_ANN_ID + 1), size=sum(map(len, anns_by_image)), replace=False
        ).tolist()
    )
    for split, mask in (("train2017", ~is_val), ("val2017", is_val)):
        idx = rng.permutation(np.flatnonzero(mask))  # image list order is not id order
        # Interleave annotations of different images while keeping each image's own order.
        keyed = []
        for i in idx:
            keys = np.sort(rng.random(len(anns_by_image[i])))
            keyed.extend(zip(keys.tolist(), [int(i)] * len(keys), anns_by_image[i], strict=True))
        keyed.sort(key=lambda k: k[0])
        anns = []
        for _k, _i, ann in keyed:
            anns.append({**ann, "id": int(next(ann_ids))})
        splits[split] = {
            "info": {
                "description": "COCO 2017 Dataset (synthetic stand-in)",
                "url": "http://cocodataset.org",
                "version": "1.0",
                "year": 2017,
                "contributor": "COCO Consortium",
                "date_created": "2017/09/01",
            },
            "licenses": [
                {"url": f"http://creativecommons.org/licenses/{n}/2.0/", "id": k, "name": n}
                for k, n in enumerate(
                    ["by-nc-sa", "by-nc", "by-nc-nd", "by", "by-sa", "by-nd", "pd", "gov"], start=1
                )
            ],
            "images": [images[i] for i in idx],
            "annotations": anns,
            "categories": [{"supercategory": s, "id": c, "name": n} for c, n, s in COCO_CATEGORIES],
        }
    return {
        "splits": splits,
        "coco_ids": ids[: spec.n_images].astype(np.int64),
        "is_val": is_val[: spec.n_images],
        "labels": labels,
        "empty": sorted(int(e) for e in empty),
        "ties": sorted(int(t) for t in ties),
        "crop_boxes": crop_boxes,
        "crop_labels": crop_labels,
        "crop_planted": sorted(int(t) for t in planted),
        "crop_gone": sorted(int(t) for t in gone),
    }


def _largest_label(
    anns: list[dict[str, Any]],
    super_of: dict[int, str],
    crop: tuple[int, int, int, int] | None = None,
) -> str:
    """Supercategory of the largest-area annotation (first on ties), "unknown" if none.

    With ``crop`` (pixels ``x0, x1, y0, y1``) the area is that of the annotation's rectangle inside
    the crop, from geometry (the synthetic annotations are whole-pixel rectangles), and an image
    whose objects all lie outside the crop is "unknown".
    """
    best, best_area = None, -1.0
    for ann in anns:
        if crop is None:
            area = ann["area"]
        else:
            x, y, bw, bh = ann["bbox"]
            area = max(0.0, min(x + bw, crop[1]) - max(x, crop[0])) * max(
                0.0, min(y + bh, crop[3]) - max(y, crop[2])
            )
        if area > best_area:
            best, best_area = ann, area
    if best is None or (crop is not None and best_area <= 0):
        return UNKNOWN
    return super_of[best["category_id"]]


def _crop_box(px: tuple[int, int, int, int], height: int, width: int) -> tuple[Any, ...]:
    """NSD's cropBox ``(top, bottom, left, right)`` of a pixel crop; the uncut axis as int 0s."""
    x0, x1, y0, y1 = px
    if width > height:
        return (0, 0, x0 / width, (width - x1) / width)
    if height > width:
        return (y0 / height, (height - y1) / height, 0, 0)
    return (0, 0, 0, 0)


def _planted_anns(
    gone: bool,
    image_id: int,
    height: int,
    width: int,
    crop: tuple[int, int, int, int],
    rng: np.random.Generator,
    cats_by_super: dict[str, list[int]],
) -> list[dict[str, Any]]:
    """Annotations of a planted crop disagreement (see the module docstring), whole-pixel boxes.

    Works along the long side ``L`` (crop ``[c0, c0 + S)``, cut-away margin ``E = L - S`` at one
    end). ``gone``: one object, wholly in the margin. Otherwise: a big object reaching ``0.6 E``
    into the crop from the margin (area ``(E + a) x 0.9 S``, ``a x 0.9 S`` of it inside), and an
    object of another supercategory wholly inside the crop with an area halfway between the two.
    """
    landscape = width > height
    long_, short = (width, height) if landscape else (height, width)
    c0 = crop[0] if landscape else crop[2]
    extra = long_ - short
    at_start = c0 == 0  # crop at the start, margin at the end
    supers = list(cats_by_super)
    first, second = rng.choice(len(supers), size=2, replace=False)

    def box(cat: int, lpos: int, llen: int, spos: int, slen: int) -> dict[str, Any]:
        x, y, bw, bh = (lpos, spos, llen, slen) if landscape else (spos, lpos, slen, llen)
        x, y, bw, bh = float(x), float(y), float(bw), float(bh)
        return {
            "segmentation": [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]],
            "area": bw * bh,
            "iscrowd": 0,
            "image_id": image_id,
            "bbox": [x, y, bw, bh],
            "category_id": cat,
        }

    def cat_of(k: int) -> int:
        return int(rng.choice(cats_by_super[supers[k]]))

    if gone:
        llen = max(1, extra // 2)
        lpos = (short if at_start else 0) + (extra - llen) // 2
        slen = max(1, round(0.5 * short))
        return [box(cat_of(first), lpos, llen, int(rng.integers(0, short - slen + 1)), slen)]
    inside = max(1, round(0.6 * extra))
    big_l, big_s = extra + inside, round(0.9 * short)
    big_pos = short - inside if at_start else 0
    big = box(cat_of(first), big_pos, big_l, int(rng.integers(0, short - big_s + 1)), big_s)
    target = (big_l * big_s + inside * big_s) // 2
    sec_s = round(0.8 * short)
    sec_l = min(short, max(1, target // sec_s))
    sec_pos = c0 + int(rng.integers(0, short - sec_l + 1))
    sec = box(cat_of(second), sec_pos, sec_l, int(rng.integers(0, short - sec_s + 1)), sec_s)
    return [sec, big] if rng.random() < 0.5 else [big, sec]


# ----------------------------------------------------------------------------------- writers


def _write_bytes(target: Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def _write_expdesign(target: Path, design: dict[str, Any]) -> None:
    from scipy.io import savemat

    buf = io.BytesIO()
    savemat(buf, design, format="5", do_compression=False, oned_as="row")
    data = bytearray(buf.getvalue())
    # The MATLAB v5 header text holds a creation time: make it fixed for byte-identical output.
    header = b"MATLAB 5.0 MAT-file Platform: posix, Created on: Fri Sep  1 00:00:00 2017"
    data[:116] = header.ljust(116, b" ")
    _write_bytes(target, bytes(data))


def _write_stim_info(
    target: Path, csv_target: Path, spec: SynthSpec, design: dict[str, Any], coco: dict[str, Any]
) -> None:
    import pandas as pd

    rng = _rng(spec, 3)
    n = spec.n_images
    shared = np.zeros(n, dtype=bool)
    shared[design["sharedix"][0].astype(np.int64) - 1] = True
    cols: dict[str, Any] = {
        "Unnamed: 0": np.arange(n, dtype=np.int64),
        "cocoId": coco["coco_ids"],
        "cocoSplit": np.where(coco["is_val"], "val2017", "train2017").astype(object),
        "cropBox": list(coco["crop_boxes"]),
        "loss": np.round(rng.random(n) * 0.2, 4),
        "nsdId": np.arange(n, dtype=np.int64),
        "flagged": rng.random(n) < 0.01,
        "BOLD5000": rng.random(n) < 0.02,
        "shared1000": shared,
    }
    reps: dict[str, np.ndarray] = {}
    for s in range(1, spec.n_subjects + 1):
        seen = np.zeros(n, dtype=np.int64)
        seen[design["subjectim"][s - 1].astype(np.int64) - 1] = 1
        cols[f"subject{s}"] = seen
        r = np.zeros((n, 3), dtype=np.int64)
        count = np.zeros(n, dtype=np.int64)
        for t, nsd_id in enumerate(trial_nsd_ids(design, spec, s)):
            if count[nsd_id] < 3:
                r[nsd_id, count[nsd_id]] = t + 1  # 1-based trial number of that subject
            count[nsd_id] += 1
        for k in range(3):
            reps[f"subject{s}_rep{k}"] = r[:, k]
    cols.update(reps)
    df = pd.DataFrame(cols)
    buf = io.BytesIO()
    df.to_pickle(buf, compression=None)
    _write_bytes(target, buf.getvalue())
    # The CSV as released: the index as a leading unnamed column, no saved-CSV leftover.
    text = df.drop(columns="Unnamed: 0").to_csv(lineterminator="\n")
    _write_bytes(csv_target, text.encode())


def _write_stimuli(target: Path, spec: SynthSpec) -> None:
    import h5py

    with atomic_path(target) as tmp:
        with h5py.File(tmp, "w", libver="earliest", track_order=False) as f:
            dset = f.create_dataset(
                "imgBrick",
                shape=(spec.n_images, STIM_SIZE, STIM_SIZE, 3),
                dtype=np.uint8,
                chunks=(1, STIM_SIZE, STIM_SIZE, 3),
                compression="gzip",
                compression_opts=4,
                track_times=False,
                fillvalue=0,
            )
            # A few simple images (a gradient with the nsdId in the red channel); the rest stay 0.
            yy, xx = np.mgrid[0:STIM_SIZE, 0:STIM_SIZE]
            for nsd_id in range(min(3, spec.n_images)):
                img = np.zeros((STIM_SIZE, STIM_SIZE, 3), dtype=np.uint8)
                img[..., 0] = nsd_id % 256
                img[..., 1] = (xx * 255 // (STIM_SIZE - 1)).astype(np.uint8)
                img[..., 2] = (yy * 255 // (STIM_SIZE - 1)).astype(np.uint8)
                dset[nsd_id] = img


def _write_coco_zip(target: Path, coco: dict[str, Any]) -> None:
    with atomic_path(target) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for split in ("train2017", "val2017"):
                data = coco["splits"][split]
                members = {
                    f"annotations/instances_{split}.json": data,
                    f"annotations/captions_{split}.json": {
                        "info": data["info"],
                        "licenses": data["licenses"],
                        "images": data["images"],
                        "annotations": [
                            {"image_id": im["id"], "id": k + 1, "caption": "A synthetic scene."}
                            for k, im in enumerate(data["images"][:20])
                        ],
                    },
                }
                for name, obj in members.items():
                    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
                    info.compress_type = zipfile.ZIP_DEFLATED
                    info.external_attr = 0o644 << 16
                    zf.writestr(info, json.dumps(obj, separators=(",", ":")))


def _write_manifest(
    target: Path, spec: SynthSpec, design: dict[str, Any], coco: dict[str, Any]
) -> None:
    manifest = {
        "spec": dataclasses.asdict(spec),
        "layout": {
            "runs_per_session": spec.layout.runs_per_session,
            "trials_per_run": list(spec.layout.trials_per_run),
            "run_lengths": spec.layout.run_lengths(),
            "trials_per_session": spec.trials_per_session,
            "sessions": list(spec.sessions),
            "n_design_sessions": spec.n_design_sessions,
        },
        "grid": {"shape": list(spec.shape), "affine": spec.affine().tolist()},
        "beta_scale": BETA_SCALE,
        "supercategories": list(SUPERCATEGORIES),
        "labels": coco["labels"],
        "unannotated_nsd_ids": coco["empty"],
        "crop_labels": coco["crop_labels"],
        "crop_planted_nsd_ids": coco["crop_planted"],
        "crop_gone_nsd_ids": coco["crop_gone"],
        "area_tie_nsd_ids": coco["ties"],
        "coco_images": {k: len(v["images"]) for k, v in coco["splits"].items()},
    }
    _write_bytes(target, (json.dumps(manifest, indent=1) + "\n").encode())


# ------------------------------------------------------------------------------------------ betas


def _brain_mask(spec: SynthSpec) -> np.ndarray:
    """MNI152 brain mask on the generated grid (nearest)."""
    from nilearn import datasets, image

    mni = datasets.load_mni152_brain_mask(resolution=1)
    res = image.resample_img(
        mni,
        target_affine=spec.generation_affine(),
        target_shape=spec.shape,
        interpolation="nearest",
        force_resample=True,
        copy_header=True,
    )
    return np.asarray(res.dataobj) > 0


def _liberal_mask(spec: SynthSpec) -> np.ndarray:
    """MNI152 brain mask on the written grid (nearest), dilated by 4 mm: a liberal brain mask."""
    from scipy import ndimage

    return ndimage.binary_dilation(_brain_mask(spec), iterations=4)


#: Synthetic ROIs, written for every subject (``nsddata/ppdata/subjXX/MNI/roi/<name>.nii.gz``).
ROI_NAMES = ("nsdgeneral",)


def roi_volume(spec: SynthSpec, subject: int, brain: np.ndarray | None = None) -> np.ndarray:
    """A subject's synthetic ``nsdgeneral`` on the generated grid, in NSD's value convention.

    -1 outside the (MNI152) brain, 1 in the ROI, 0 elsewhere in the brain (int16). The ROI is the
    posterior part of the brain, like NSD's visually responsive posterior cortex: the brain voxels
    whose y (mm) lies in the lowest 50 % (crop grid; 15 % on the full grid, about nsdgeneral's
    share of the grey matter) of the brain's y values, minus 3 points per subject number, so
    subjects differ. The planted patterns cover the whole brain, so the ROI holds signal.
    """
    brain = _brain_mask(spec) if brain is None else brain
    affine = spec.generation_affine()
    ijk = np.argwhere(brain)
    y = ijk @ affine[1, :3] + affine[1, 3]
    share = (15.0 if spec.full else 50.0) - 3.0 * (subject - 1)
    cut = np.percentile(y, share)
    vol = np.full(spec.shape, -1, dtype=np.int16)
    vol[brain] = 0
    inside = ijk[y < cut]
    vol[inside[:, 0], inside[:, 1], inside[:, 2]] = 1
    return vol


def _write_rois(bucket: Path, spec: SynthSpec) -> None:
    """Every subject's ROI volumes, in the betas' header style (NSD's MNI ROI key layout)."""
    from nsdprep.core.nifti import NiftiStreamWriter

    store = (lambda v: v[::-1]) if spec.header == "nsd" else (lambda v: v)
    brain = _brain_mask(spec)
    for subject in range(1, spec.n_subjects + 1):
        for name in ROI_NAMES:
            target = bucket / nsd.roi_key(subject, name)
            with NiftiStreamWriter(
                target, spec.shape, spec.affine(), np.int16, None, **spec.writer_options()
            ) as writer:
                writer.write(store(roi_volume(spec, subject, brain)))


def _patterns(spec: SynthSpec, subject: int, xyz: np.ndarray) -> np.ndarray:
    """(n_supercategories, n_voxels) float32 smooth unit-variance patterns at world coords ``xyz``.

    Each pattern is a sum of 8 plane waves (wavelengths 16-40 mm, random directions and phases);
    the set is then made orthonormal by symmetric (Loewdin) orthogonalisation, which keeps the
    patterns smooth (linear combinations of smooth fields) and makes every class equally separable.
    """
    rng = _rng(spec, 4, subject)
    n_waves = 8
    xyz32 = xyz.astype(np.float32)
    out = np.empty((len(SUPERCATEGORIES), xyz.shape[0]), dtype=np.float32)
    for c in range(len(SUPERCATEGORIES)):
        direction = rng.normal(size=(3, n_waves))
        direction /= np.linalg.norm(direction, axis=0, keepdims=True)
        k = direction * (2 * np.pi / rng.uniform(16.0, 40.0, size=n_waves))
        phase = rng.uniform(0, 2 * np.pi, size=n_waves)
        arg = xyz32 @ k.astype(np.float32)
        arg += phase.astype(np.float32)
        out[c] = np.cos(arg, out=arg).sum(axis=1)
    gram = (out.astype(np.float64) @ out.T.astype(np.float64)) / xyz.shape[0]
    evals, evecs = np.linalg.eigh(gram)
    whiten = (evecs / np.sqrt(evals)) @ evecs.T  # gram^(-1/2)
    return (whiten.astype(np.float32) @ out).astype(np.float32)


def _session_valid(spec: SynthSpec, liberal: np.ndarray, session: int) -> np.ndarray:
    """Valid voxels of a session: the liberal mask minus ``3 * (session % 3)`` top slices.

    A field of view that moves between sessions by at least one 3 mm slice, so some grey matter is
    valid in one session and not in another (what ``make curated VALID=1`` removes).
    """
    valid = liberal.copy()
    cut = 3 * (session % 3)
    if cut:
        valid[:, :, -cut:] = False
    return valid


def _write_betas(bucket: Path, spec: SynthSpec, design: dict[str, Any], labels: list[str]) -> None:
    """Write every subject's betas and valid files, one trial volume at a time."""
    from tqdm import tqdm

    from nsdprep.core.nifti import NiftiStreamWriter

    affine = spec.generation_affine()
    out_affine, opts = spec.affine(), spec.writer_options()
    # The nsd header stores the generated (x-flipped) grid with x running forward: data [::-1].
    store = (lambda v: v[::-1]) if spec.header == "nsd" else (lambda v: v)
    liberal = _liberal_mask(spec)
    ijk = np.argwhere(liberal)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    label_index = {s: i for i, s in enumerate(SUPERCATEGORIES)}
    tps = spec.trials_per_session
    vol = np.zeros(spec.shape, dtype=np.int16)
    for subject in range(1, spec.n_subjects + 1):
        patterns = _patterns(spec, subject, xyz)
        nsd_ids = trial_nsd_ids(design, spec, subject)
        subj_dir = bucket / nsd.subject_dir_key(subject)
        for session in range(1, spec.sessions[subject - 1] + 1):
            rng = _rng(spec, 5, subject, session)
            valid = _session_valid(spec, liberal, session)
            with NiftiStreamWriter(
                subj_dir / f"valid_session{session:02d}.nii.gz",
                spec.shape,
                out_affine,
                np.int16,
                None,
                **opts,
            ) as writer:
                writer.write(store(valid.astype(np.int16)))
            keep = valid[liberal]  # which liberal-mask voxels are valid this session
            trial_ids = nsd_ids[(session - 1) * tps : session * tps]
            volumes = _trial_volumes(spec, rng, patterns, trial_ids, labels, label_index, keep)
            target = subj_dir / f"betas_session{session:02d}.nii.gz"
            # Volume by volume: the full grid never holds a 4D array in memory.
            with NiftiStreamWriter(target, spec.shape, out_affine, np.int16, tps, **opts) as writer:
                for vals in tqdm(
                    volumes,
                    total=tps,
                    desc=f"subj{subject:02d} {target.name}",
                    disable=not spec.full,
                ):
                    vol[liberal] = vals
                    writer.write(store(vol))
            log.debug("wrote subj%02d session %02d", subject, session)


def _trial_volumes(
    spec: SynthSpec,
    rng: np.random.Generator,
    patterns: np.ndarray,
    trial_ids: np.ndarray,
    labels: list[str],
    label_index: dict[str, int],
    keep: np.ndarray,
) -> Iterator[np.ndarray]:
    """Yield per trial the int16 values of the liberal-mask voxels (0 where invalid)."""
    n_vox = patterns.shape[1]
    for nsd_id in trial_ids:
        beta = rng.standard_normal(n_vox, dtype=np.float32) * np.float32(spec.noise_sd)
        label = labels[int(nsd_id)]
        if label != UNKNOWN:
            beta += np.float32(spec.amplitude) * patterns[label_index[label]]
        vals = np.clip(np.rint(beta * BETA_SCALE), -32768, 32767).astype(np.int16)
        vals[~keep] = 0
        yield vals
