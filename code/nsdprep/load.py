"""``nsdprep.load_curated(subject)``: one call from a curated subject to ``X, y, groups``.

Like nilearn's fetchers, it returns a :class:`sklearn.utils.Bunch`; unlike a 4D NIfTI, the matrix is
memory-mapped, so opening it costs nothing and any trial is one read. Example (run-grouped CV)::

    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, cross_val_score
    d = nsdprep.load_curated(1, dataset="path/to/dataset")
    scores = cross_val_score(LogisticRegression(C=0.01, max_iter=500), d.X[:, :5000], d.labels,
                             groups=d.runs, cv=GroupKFold(5), scoring="balanced_accuracy")

The field's preparation and its held-out test set (the shared images)::

    from nsdprep.stages.curate.split import train_test
    d = nsdprep.load_curated(1, zscore="session", average=True, roi="nsdgeneral")
    X_train, y_train, X_test, y_test = train_test(d)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from nsdprep import pipeline
from nsdprep.core import nsd
from nsdprep.core.errors import MissingInputError, UsageError
from nsdprep.options import Options


def load_curated(
    subject: int,
    dataset: str | os.PathLike[str] = ".",
    labels: nsd.LabelMode = "default",
    *,
    zscore: str = "none",
    average: bool = False,
    roi: str = "",
    max_session: int = 0,
    split: str | None = None,
) -> object:
    """Open one curated subject for analysis.

    Parameters
    ----------
    subject
        NSD subject number, 1-based (``1`` -> ``sub-01``).
    dataset
        Root of the nsdprep dataset (the folder holding ``derivatives/``).
    labels
        The label rule the curated folder was made with (``make curated LABELS=...``):
        ``"default"`` (``derivatives/curated_3mm``), ``"crop"`` (``curated_3mm_crop``) or
        ``"legacy"`` (``curated_3mm_legacy``).
    zscore, average, roi, max_session
        The other options the folder was made with (``make curated ZSCORE=session AVERAGE=1
        ROI=nsdgeneral MAX_SESSION=37``); they name the folder
        (``derivatives/curated_3mm_zscore-session_avg_roi-nsdgeneral_maxsession-37``).
    split
        ``"train"`` or ``"test"``: only the rows of that side of the shared1000 split (``test``:
        the images every subject saw); ``None``: every row.

    Returns
    -------
    sklearn.utils.Bunch
        ``X``: ``(n_rows, n_voxels)`` matrix; memory-mapped and read-only for all rows, read into
        memory for one ``split``. int16 betas (% signal change) x 300 as NSD stores them (divide
        by 300 for % change), or float32 for z-scored or averaged folders. Rows are trials, or
        images with ``average``; columns are the voxels of the mask (the ROI's with ``roi``).
        ``labels``: COCO supercategory per row; ``runs``: run per row (for averaged rows the run
        of the image's first trial; use as ``groups`` in cross-validation); ``trials``: the
        per-row table (DataFrame, with its ``split`` column); ``mask_img``: 3 mm mask of the
        columns; ``to_img(rows)``: rows of ``X`` back to a 4D image; ``subject``, ``files``.
    """
    import nibabel as nib
    import pandas as pd
    from sklearn.utils import Bunch

    from nsdprep.core.matrix import open_matrix, unmask
    from nsdprep.core.nifti import read_header
    from nsdprep.stages.curate.split import split_rows

    if split not in (None, nsd.SPLIT_TRAIN, nsd.SPLIT_TEST):
        raise UsageError(f"split must be None, 'train' or 'test', got {split!r}")
    # checked like LABELS=... ZSCORE=... on the command line
    opts = Options(labels=labels, zscore=zscore, average=average, roi=roi, max_session=max_session)
    rel = pipeline.curated_dir(opts)
    folder = Path(dataset) / rel
    files = nsd.curated_files(subject, folder)
    _require_all(files, Path(dataset), rel, subject, pipeline.STAGES["curated"].make_command(opts))
    read_header(files.mask)  # a cloned file: its header is checked before nibabel allocates
    X = open_matrix(files.matrix)
    lab = np.load(files.labels, allow_pickle=False)
    runs = np.load(files.runs, allow_pickle=False)
    trials = pd.read_csv(files.trials, sep="\t")
    mask_img = nib.load(files.mask)
    mask = np.asarray(mask_img.dataobj) != 0
    if not (X.shape[0] == lab.size == runs.size == len(trials)) or X.shape[1] != int(mask.sum()):
        raise MissingInputError(
            f"{folder}: the files of {nsd.bids_subject_label(subject)} disagree (matrix "
            f"{X.shape}, {lab.size} labels, {runs.size} runs, {len(trials)} trial rows, "
            f"{int(mask.sum())} mask voxels); rebuild with `make curated FORCE=1`."
        )

    if split is not None:
        rows = split_rows(trials, split)
        X = np.asarray(X[rows])
        lab, runs = lab[rows], runs[rows]
        trials = trials.iloc[rows].reset_index(drop=True)

    def to_img(rows: np.ndarray | slice | list[int] | int) -> nib.Nifti1Image:
        """The given trials (row indices of ``X``) as a 4D image on the mask's grid."""
        data = unmask(np.asarray(X[rows]).reshape(-1, X.shape[1]), mask)
        header = mask_img.header.copy()
        header.set_data_dtype(data.dtype)  # the mask's uint8 would truncate the values when saved
        return nib.Nifti1Image(data, mask_img.affine, header)

    return Bunch(
        X=X,
        labels=lab,
        runs=runs,
        trials=trials,
        mask_img=mask_img,
        to_img=to_img,
        subject=subject,
        files=files,
    )


def _require_all(files: nsd.CuratedFiles, dataset: Path, rel: str, subject: int, make: str) -> None:
    """Every file present with content, or one error naming the ``datalad get`` command."""
    absent = [p for p in (files.matrix, files.mask, files.labels, files.runs, files.trials)
              if not p.is_file()]  # fmt: skip
    if not absent:
        return
    label = nsd.bids_subject_label(subject)
    registered = [p for p in absent if p.is_symlink()]
    if registered:
        raise MissingInputError(
            f"{label}: content of {', '.join(p.name for p in registered)} is not here; fetch it "
            f"with `datalad get {rel}/{label}*` (in {dataset})."
        )
    raise MissingInputError(
        f"{label}: {', '.join(p.name for p in absent)} missing in {dataset / rel}; build the curated "
        f"derivative with `{make}` (or check the subject "
        "and the dataset path)."
    )
