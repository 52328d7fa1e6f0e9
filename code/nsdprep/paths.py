"""Every NSD, COCO and derivative path template, in one place, with argument checks.

Bucket keys follow the public ``natural-scenes-dataset`` S3 layout; derivative paths are relative to
the superdataset root. ``subject`` and ``session`` are 1-based, as in NSD's file names.
"""

from __future__ import annotations

import re

from nsdprep.errors import NsdPrepError

#: Real public locations (defaults for real users; tests and the demo point at a loopback mirror).
NSD_BASE_URL = "https://natural-scenes-dataset.s3.amazonaws.com"
COCO_ANNOTATIONS_URL = "http://images.cocodataset.org/annotations/annotations_trainval2017.zip"

EXPDESIGN_KEY = "nsddata/experiments/nsd/nsd_expdesign.mat"
STIM_INFO_KEY = "nsddata/experiments/nsd/nsd_stim_info_merged.pkl"
STIMULI_KEY = "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"
COCO_ZIP_NAME = "annotations_trainval2017.zip"
COCO_ZIP_KEY = f"annotations/{COCO_ZIP_NAME}"
COCO_SPLITS = ("train2017", "val2017")

NSD_DATASET = "inputs/nsd"
COCO_DATASET = "inputs/coco"

#: Real NSD experiment structure (defaults; smaller synthetic layouts are passed explicitly).
RUNS_PER_SESSION = 12
TRIALS_PER_RUN = (63, 62)  # odd runs, even runs


def run_lengths(runs_per_session: int, trials_per_run: tuple[int, ...] | list[int]) -> list[int]:
    """Trials of each run in a session: odd runs (1st, 3rd, ...) ``[0]``, even runs ``[1]``."""
    return [int(trials_per_run[r % 2]) for r in range(runs_per_session)]


_BETAS_RE = re.compile(
    r"^nsddata_betas/ppdata/subj(?P<subject>\d{2})/MNI/betas_fithrf/"
    r"(?P<kind>betas|valid)_session(?P<session>\d{2})\.nii\.gz$"
)


def _check_index(name: str, value: int, high: int = 99) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= high:
        raise NsdPrepError(f"{name} must be an integer in 1..{high} (1-based), got {value!r}")
    return value


def subject_dir_key(subject: int) -> str:
    """Bucket folder of one subject's 1 mm MNI ``betas_fithrf`` files."""
    _check_index("subject", subject)
    return f"nsddata_betas/ppdata/subj{subject:02d}/MNI/betas_fithrf"


def betas_key(subject: int, session: int) -> str:
    """Bucket key of one session's 1 mm MNI single-trial betas (4D int16, x300)."""
    _check_index("session", session)
    return f"{subject_dir_key(subject)}/betas_session{session:02d}.nii.gz"


def valid_key(subject: int, session: int) -> str:
    """Bucket key of one session's valid-voxel mask (3D)."""
    _check_index("session", session)
    return f"{subject_dir_key(subject)}/valid_session{session:02d}.nii.gz"


def parse_betas_key(key: str) -> tuple[str, int, int] | None:
    """Return ``(kind, subject, session)`` for a betas/valid key, or ``None`` for other keys."""
    m = _BETAS_RE.match(key)
    if m is None:
        return None
    return m["kind"], int(m["subject"]), int(m["session"])


def subject_label(subject: int) -> str:
    """NSD's subject folder name, ``subj01``."""
    return f"subj{_check_index('subject', subject):02d}"


def bids_subject_label(subject: int) -> str:
    """Curated output name, ``sub-01`` (mapped from ``subj01`` by number, never by listing order)."""
    return f"sub-{_check_index('subject', subject):02d}"


def resampled_path(subject: int, session: int) -> str:
    """Derivative path of one session resampled to 3 mm and grey-matter masked."""
    _check_index("session", session)
    return f"derivatives/3mm/{subject_label(subject)}/betas_session{session:02d}.nii.gz"


COCO_CATEGORIES = "derivatives/coco_categories.pkl"
COCO_CATEGORIES_LEGACY = "derivatives/coco_categories_legacy.pkl"
COCO_MERGED = "derivatives/coco/merged_instances_train_val_2017.json"
CURATED_DIR = "derivatives/curated_3mm"
CURATED_LEGACY_DIR = "derivatives/curated_3mm_legacy"
DECODING_DIR = "derivatives/decoding"
COCO_MERGED_LEGACY = "derivatives/coco/legacy_merged_instances_train_val_2017.json"


def summary_path(labels_pkl: str) -> str:
    """Human-readable summary written next to a labels table (``x.pkl`` -> ``x_summary.tsv``)."""
    if not labels_pkl.endswith(".pkl"):
        raise NsdPrepError(f"labels table must be a .pkl file, got {labels_pkl!r}")
    return labels_pkl[: -len(".pkl")] + "_summary.tsv"
