"""The NSD domain: path templates, the experiment layout, the design file, labels' vocabulary.

Every NSD, COCO and derivative path is spelled here and nowhere else. Bucket keys follow the public
``natural-scenes-dataset`` S3 layout; derivative paths are relative to the superdataset root.
``subject`` and ``session`` are 1-based, as in NSD's file names; ``nsd_id`` is 0-based (the row of
``nsd_stim_info_merged``), the ids in ``nsd_expdesign.mat`` are 1-based.
"""

from __future__ import annotations

import numbers
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

if (
    TYPE_CHECKING
):  # numpy is imported where it is used: make reads this module before the venv exists
    import numpy as np

from nsdprep.core.errors import FormatError, MissingInputError, UsageError

# -- sources ----------------------------------------------------------------------------------------
#: Real public locations (defaults for real users; tests and the demo point at a loopback mirror).
NSD_BASE_URL = "https://natural-scenes-dataset.s3.amazonaws.com"
COCO_ANNOTATIONS_URL = "http://images.cocodataset.org/annotations/annotations_trainval2017.zip"

EXPDESIGN_KEY = "nsddata/experiments/nsd/nsd_expdesign.mat"
STIM_INFO_KEY = "nsddata/experiments/nsd/nsd_stim_info_merged.pkl"
#: The same table as CSV (``pd.read_csv(path, index_col=0)``, as tknapen/nsd_access reads it).
STIM_INFO_CSV_KEY = "nsddata/experiments/nsd/nsd_stim_info_merged.csv"
STIMULI_KEY = "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"
BETAS_ROOT_KEY = "nsddata_betas/ppdata/"
COCO_ZIP_NAME = "annotations_trainval2017.zip"
COCO_ZIP_KEY = f"annotations/{COCO_ZIP_NAME}"
COCO_SPLITS = ("train2017", "val2017")

#: The input subdatasets, relative to the superdataset root.
NSD_DATASET = "inputs/nsd"
COCO_DATASET = "inputs/coco"
#: Where ``make inputs`` keeps its addurls table inside each input subdataset (tracked in git).
ADDURLS_TABLE = ".nsdprep/addurls.csv"

# -- labels -----------------------------------------------------------------------------------------
#: Label of a picture without any COCO instance annotation.
UNKNOWN = "unknown"
#: The supercategory whose earliest trials are dropped to equalize subjects.
PERSON = "person"

# -- derivatives ------------------------------------------------------------------------------------
#: Base paths; the label rule and other output-changing options name the variants of each
#: (``derivatives/curated_3mm_crop``): :mod:`nsdprep.pipeline` derives them.
RESAMPLED_DIR = "derivatives/3mm"
COCO_CATEGORIES = "derivatives/coco_categories.pkl"
COCO_MERGED = "derivatives/coco/merged_instances_train_val_2017.json"
#: The merged JSON of the original, renumbering merge (``LABELS=legacy``).
COCO_MERGED_LEGACY = "derivatives/coco/legacy_merged_instances_train_val_2017.json"
CURATED_DIR = "derivatives/curated_3mm"
DECODING_DIR = "derivatives/decoding"

#: Label rules (``LABELS=``): largest annotation on the whole COCO picture (default), the
#: original defective lookup (legacy), largest annotation inside the crop NSD showed (crop).
LabelMode = Literal["default", "legacy", "crop"]
LABEL_MODES: tuple[str, ...] = get_args(LabelMode)

#: NSD's sessions per subject (subj01..subj08), as released in full (the data manual).
NSD_SESSIONS: tuple[int, ...] = (40, 40, 32, 30, 40, 32, 40, 30)
#: The last sessions of each subject were held out at first and released later (2023): papers
#: written before used 40 - 3 = 37 sessions of the complete subjects.
LATE_RELEASED = 3

_ROI_RE = re.compile(r"^nsddata/ppdata/subj(?P<subject>\d{2})/MNI/roi/(?P<atlas>[^/]+)\.nii\.gz$")
#: An ROI (atlas) name as the bucket spells it: ``nsdgeneral``, ``prf-visualrois``, ``lh.floc-faces``.
ROI_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

#: A 1 mm MNI betas or valid-mask key, matched whole (``fullmatch``: a ``$`` would also accept a
#: key that ends in a newline, which S3 allows). Digits are ASCII only.
_BETAS_RE = re.compile(
    r"nsddata_betas/ppdata/subj(?P<subject>[0-9]{2})/MNI/betas_fithrf/"
    r"(?P<kind>betas|valid)_session(?P<session>[0-9]{2})\.nii\.gz"
)
#: A subject folder under :data:`BETAS_ROOT_KEY`, as listed with the delimiter ``/``.
_SUBJECT_PREFIX_RE = re.compile(r"subj(?P<subject>[0-9]{2})/")


def _check_index(name: str, value: int, high: int = 99) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not 1 <= value <= high:
        raise UsageError(f"{name} must be an integer in 1..{high} (1-based), got {value!r}")
    return int(value)


def subject_dir_key(subject: int) -> str:
    """Bucket folder of one subject's 1 mm MNI ``betas_fithrf`` files."""
    return f"nsddata_betas/ppdata/{subject_label(subject)}/MNI/betas_fithrf"


def subject_root_key(subject: int) -> str:
    """Bucket folder of everything of one subject's betas (what ``make get`` fetches)."""
    return f"{BETAS_ROOT_KEY}{subject_label(subject)}"


def betas_key(subject: int, session: int) -> str:
    """Bucket key of one session's 1 mm MNI single-trial betas (4D int16, x300)."""
    _check_index("session", session)
    return f"{subject_dir_key(subject)}/betas_session{session:02d}.nii.gz"


def valid_key(subject: int, session: int) -> str:
    """Bucket key of one session's valid-voxel mask (3D)."""
    _check_index("session", session)
    return f"{subject_dir_key(subject)}/valid_session{session:02d}.nii.gz"


def parse_betas_key(key: str) -> tuple[str, int, int] | None:
    """Return ``(kind, subject, session)`` for a betas/valid key, or ``None`` for other keys.

    The whole key must match (subject and session 01..99); anything else, a key with a trailing
    newline or a ``..`` segment included, is not a betas key.
    """
    m = _BETAS_RE.fullmatch(key)
    if m is None or int(m["subject"]) == 0 or int(m["session"]) == 0:
        return None
    return m["kind"], int(m["subject"]), int(m["session"])


def roi_dir_key(subject: int) -> str:
    """Bucket folder of one subject's ROI volumes in MNI space (what nsd_access reads)."""
    return f"nsddata/ppdata/{subject_label(subject)}/MNI/roi"


def roi_key(subject: int, atlas: str) -> str:
    """Bucket key of one subject's MNI ROI volume, ``{ppdata}/subjXX/MNI/roi/{atlas}.nii.gz``.

    NSD's convention for the values: -1 outside the brain, 0 not in the ROI, positive in the ROI
    (the label number in a multi-label atlas).
    """
    if not ROI_NAME_RE.fullmatch(atlas) or atlas.endswith(".nii.gz"):
        raise UsageError(f"ROI name must be a bare atlas name such as nsdgeneral, got {atlas!r}")
    return f"{roi_dir_key(subject)}/{atlas}.nii.gz"


def parse_roi_key(key: str) -> tuple[int, str] | None:
    """Return ``(subject, atlas)`` for an MNI ROI key, or ``None`` for other keys."""
    m = _ROI_RE.match(key)
    return None if m is None else (int(m["subject"]), m["atlas"])


def late_sessions(subject: int) -> tuple[int, ...]:
    """The sessions of ``subject`` released late: the last :data:`LATE_RELEASED` of NSD's count.

    Subjects beyond NSD's eight (synthetic data only) have none.
    """
    _check_index("subject", subject)
    if subject > len(NSD_SESSIONS):
        return ()
    n = NSD_SESSIONS[subject - 1]
    return tuple(range(n - LATE_RELEASED + 1, n + 1))


def parse_subject_prefix(prefix: str) -> int | None:
    """The subject of a listed folder ``nsddata_betas/ppdata/subjNN/`` (01..99), else ``None``."""
    if not prefix.startswith(BETAS_ROOT_KEY):
        return None
    m = _SUBJECT_PREFIX_RE.fullmatch(prefix[len(BETAS_ROOT_KEY) :])
    if m is None or int(m["subject"]) == 0:
        return None
    return int(m["subject"])


def subject_label(subject: int) -> str:
    """NSD's subject folder name, ``subj01``."""
    return f"subj{_check_index('subject', subject):02d}"


def bids_subject_label(subject: int) -> str:
    """Curated output name, ``sub-01`` (mapped from ``subj01`` by number, never by listing order)."""
    return f"sub-{_check_index('subject', subject):02d}"


def resampled_subject_dir(subject: int) -> str:
    """Derivative folder of one subject's 3 mm sessions."""
    return f"{RESAMPLED_DIR}/{subject_label(subject)}"


def resampled_path(subject: int, session: int) -> str:
    """Derivative path of one session resampled to 3 mm and grey-matter masked."""
    _check_index("session", session)
    return f"{resampled_subject_dir(subject)}/betas_session{session:02d}.nii.gz"


def summary_path(labels_pkl: str) -> str:
    """Human-readable summary written next to a labels table (``x.pkl`` -> ``x_summary.tsv``)."""
    if not labels_pkl.endswith(".pkl"):
        raise UsageError(f"labels table must be a .pkl file, got {labels_pkl!r}")
    return labels_pkl[: -len(".pkl")] + "_summary.tsv"


def table_sidecar(labels_pkl: str) -> str:
    """TSV copy of a labels table, what the pipeline reads (``x.pkl`` -> ``x.tsv``; never unpickled)."""
    if not labels_pkl.endswith(".pkl"):
        raise UsageError(f"labels table must be a .pkl file, got {labels_pkl!r}")
    return labels_pkl[: -len(".pkl")] + ".tsv"


def curated_mask_path(subject: int, folder: str | os.PathLike[str] = CURATED_DIR) -> Path:
    """``sub-XX_mask.nii.gz``: the 3 mm voxels of the matrix (grey matter; with VALID=1 also valid)."""
    return curated_files(subject, folder).mask


@dataclass(frozen=True)
class CuratedFiles:
    """The curated files of one subject, in a curated folder."""

    subject: int
    betas: Path
    labels: Path
    runs: Path
    trials: Path
    #: trials x voxels int16 matrix (memory-maps) and the 3 mm mask of its columns
    matrix: Path
    mask: Path


def curated_files(subject: int, folder: str | os.PathLike[str] = CURATED_DIR) -> CuratedFiles:
    """``sub-XX.nii.gz``, ``_labels.npy``, ``_runs.npy``, ``_trials.tsv``, ``_X.npy``, ``_mask.nii.gz``."""
    folder, name = Path(folder), bids_subject_label(subject)
    return CuratedFiles(
        subject=subject,
        betas=folder / f"{name}.nii.gz",
        labels=folder / f"{name}_labels.npy",
        runs=folder / f"{name}_runs.npy",
        trials=folder / f"{name}_trials.tsv",
        matrix=folder / f"{name}_X.npy",
        mask=folder / f"{name}_mask.nii.gz",
    )


#: Columns of ``sub-XX_trials.tsv``, in order.
TRIAL_COLUMNS = (
    "subject",
    "session",
    "run_in_session",
    "run",
    "trial",
    "trial_in_session",
    "nsdId",
    "cocoId",
    "supercat",
    "cat",
    "split",
)
#: Columns of ``sub-XX_trials.tsv`` of an averaged folder (``AVERAGE=1``): one row per image.
#: ``trials``: the 1-based trial numbers averaged, comma-separated; ``session``/``run``: those of
#: the image's first averaged trial.
AVERAGED_COLUMNS = (
    "subject",
    "nsdId",
    "cocoId",
    "supercat",
    "cat",
    "split",
    "n_repeats",
    "trials",
    "session",
    "run",
)
#: Values of the ``split`` column: the shared images (``sharedix``) are the test set.
SPLIT_TRAIN, SPLIT_TEST = "train", "test"


#: Names of the curated 4D files, ``sub-XX.nii.gz`` (subject number in group 1).
CURATED_BETAS_RE = re.compile(r"^sub-(\d{2})\.nii\.gz$")


# -- the experiment layout --------------------------------------------------------------------------
def parse_int_list(text: str | int, what: str = "value") -> tuple[int, ...]:
    """Parse ``"63,62"``, ``"01 02"`` or ``"1, 2"`` into integers; a clear error otherwise."""
    parts = [p for p in re.split(r"[,\s]+", str(text).strip()) if p]
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise UsageError(
            f"{what}: expected integers such as 1,2 or '01 02', got {text!r}"
        ) from None


@dataclass(frozen=True)
class Layout:
    """Experiment layout: runs per session and trials per run (odd runs, even runs).

    Real NSD: 12 runs of 63 (odd) / 62 (even) trials = 750 trials per session. Smaller synthetic
    layouts are passed explicitly to every stage; they are never guessed from the data.
    """

    runs_per_session: int = 12
    trials_per_run: tuple[int, int] = (63, 62)

    def __post_init__(self) -> None:
        r, tpr = self.runs_per_session, tuple(self.trials_per_run)
        ok = isinstance(r, int) and r >= 1 and len(tpr) == 2
        ok = ok and all(isinstance(v, int) and v >= 1 for v in tpr)
        if not ok:
            raise UsageError(
                "the experiment layout needs positive integers: runs per session, and trials per "
                f"run A,B (odd runs, even runs); got runs_per_session={r!r}, trials_per_run={tpr!r}"
            )
        object.__setattr__(self, "trials_per_run", tpr)

    @classmethod
    def parse(cls, runs_per_session: int | str, trials_per_run: str | tuple[int, ...]) -> Layout:
        """Layout from command-line text (``"12"``, ``"63,62"``)."""
        runs = parse_int_list(runs_per_session, "--runs-per-session")
        tpr = (
            parse_int_list(trials_per_run, "--trials-per-run")
            if isinstance(trials_per_run, str)
            else tuple(trials_per_run)
        )
        if len(runs) != 1:
            raise UsageError(f"--runs-per-session: expected one integer, got {runs_per_session!r}")
        return cls(runs[0], tpr)  # type: ignore[arg-type]

    def run_lengths(self) -> list[int]:
        """Trials of each run of a session: odd runs (1st, 3rd, ...) ``A``, even runs ``B``."""
        return [int(self.trials_per_run[r % 2]) for r in range(self.runs_per_session)]

    @property
    def trials_per_session(self) -> int:
        """Trials per session (sum over its runs)."""
        return sum(self.run_lengths())

    def run_in_session(self) -> np.ndarray:
        """1-based run of each trial of a session, indexed by ``trial_in_session - 1``."""
        import numpy as np

        return np.repeat(np.arange(1, self.runs_per_session + 1), self.run_lengths())

    def cli_args(self) -> tuple[str, ...]:
        """The stage arguments that pass this layout on."""
        return (
            "--runs-per-session",
            str(self.runs_per_session),
            "--trials-per-run",
            ",".join(map(str, self.trials_per_run)),
        )


# -- nsd_expdesign.mat ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExpDesign:
    """The two arrays of ``nsd_expdesign.mat`` the pipeline uses, checked, as 1-based int64.

    ``masterordering[t]`` (t 0-based across the experiment) is the 1-based column of ``subjectim``
    shown at trial t; ``subjectim[subject - 1, column - 1]`` is a 1-based 73k id (``nsd_id + 1``).
    ``subjectim_dtype`` is the dtype as stored in the file (double in NSD).
    """

    masterordering: np.ndarray
    subjectim: np.ndarray
    subjectim_dtype: np.dtype
    source: str

    def trial_images(self, subject: int, n_trials: int) -> np.ndarray:
        """1-based 73k ids of the first ``n_trials`` trials of ``subject`` (1-based)."""
        mo, si = self.masterordering, self.subjectim
        if mo.size < n_trials:
            raise FormatError(
                f"{self.source}: field 'masterordering' has {mo.size} entries, "
                f"{n_trials} trials needed"
            )
        if si.shape[0] < subject:
            raise FormatError(
                f"{self.source}: field 'subjectim' has {si.shape[0]} rows, subject {subject} needs "
                f"row {subject}"
            )
        return si[subject - 1, mo[:n_trials] - 1]

    def shown_images(self) -> np.ndarray:
        """Sorted unique 1-based 73k ids shown to any subject, in the file's dtype of ``subjectim``.

        As in the original processing: ``np.unique(subjectim[:, masterordering - 1])``.
        """
        import numpy as np

        shown = np.unique(self.subjectim[:, self.masterordering - 1].ravel())
        return shown.astype(self.subjectim_dtype)


def read_expdesign(path: str | os.PathLike[str]) -> ExpDesign:
    """Read and check ``masterordering`` and ``subjectim`` from ``nsd_expdesign.mat`` (MATLAB v5)."""
    import numpy as np
    import scipy.io

    path = Path(path)
    if not path.exists():
        raise MissingInputError(
            f"experiment design {path} is absent (content not fetched?); "
            f"run `datalad get {path}` or `make get`."
        )
    try:
        mat = scipy.io.loadmat(path, variable_names=["masterordering", "subjectim"])
    except Exception as exc:  # noqa: BLE001 - scipy raises several types for a bad file
        raise FormatError(f"cannot read {path} as a MATLAB v5 file: {exc!r}") from exc
    arrays = {}
    for name in ("masterordering", "subjectim"):
        if name not in mat:
            raise FormatError(
                f"{path}: field {name!r} missing; expected NSD's nsd_expdesign.mat with "
                "masterordering (1x30000) and subjectim (8x10000)"
            )
        arrays[name] = np.asarray(mat[name])
    mo, si = arrays["masterordering"], arrays["subjectim"]
    if mo.ndim != 2 or 1 not in mo.shape:
        raise FormatError(f"{path}: field 'masterordering' must be 1xT, found {mo.shape}")
    if si.ndim != 2:
        raise FormatError(
            f"{path}: field 'subjectim' must be 2D (subjects x 10000), found {si.shape}"
        )
    for name, arr in (("masterordering", mo), ("subjectim", si)):
        if arr.size and (
            not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)) or np.any(arr < 1)
        ):
            raise FormatError(f"{path}: field {name!r} must hold 1-based integers")
    mo = mo.reshape(-1).astype(np.int64)
    if mo.size and mo.max() > si.shape[1]:
        raise FormatError(
            f"{path}: field 'masterordering' refers to column {mo.max()} but field 'subjectim' "
            f"has only {si.shape[1]} columns"
        )
    return ExpDesign(mo, si.astype(np.int64), si.dtype, str(path))


def read_sharedix(path: str | os.PathLike[str]) -> np.ndarray:
    """The shared images of ``nsd_expdesign.mat`` (``sharedix``, 1-based 73k ids), sorted, int64.

    NSD: 1x1000, the images every subject was shown; the field's test set.
    """
    import numpy as np
    import scipy.io

    path = Path(path)
    if not path.exists():
        raise MissingInputError(
            f"experiment design {path} is absent (content not fetched?); "
            f"run `datalad get {path}` or `make get`."
        )
    try:
        mat = scipy.io.loadmat(path, variable_names=["sharedix"])
    except Exception as exc:  # noqa: BLE001 - scipy raises several types for a bad file
        raise FormatError(f"cannot read {path} as a MATLAB v5 file: {exc!r}") from exc
    if "sharedix" not in mat:
        raise FormatError(
            f"{path}: field 'sharedix' missing; expected NSD's nsd_expdesign.mat with sharedix "
            "(1x1000, 1-based 73k ids of the shared images)"
        )
    arr = np.asarray(mat["sharedix"])
    if arr.ndim != 2 or 1 not in arr.shape or arr.size == 0:
        raise FormatError(f"{path}: field 'sharedix' must be 1xN, found {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)) or np.any(arr < 1):
        raise FormatError(f"{path}: field 'sharedix' must hold 1-based integers")
    ids = arr.reshape(-1).astype(np.int64)
    if np.unique(ids).size != ids.size:
        raise FormatError(f"{path}: field 'sharedix' repeats an image id")
    return np.sort(ids)
