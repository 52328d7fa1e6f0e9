"""The field's preparations of the kept trials: per-session z-scoring and averaging an image's repeats.

``ZSCORE=session``: each voxel is z-scored within each session over *all* that session's trials
(before the selection drops any): ``z = (x - mean) / sd``, mean and population sd (ddof 0) over the
session's trials, in float64 from the int16 betas; a voxel whose values do not vary in a session
(e.g. 0 in every trial of a session where it is not valid) gets ``z = 0`` there.

``AVERAGE=1``: one row per image, the mean of its kept trials (after z-scoring when it is set), in
the order of each image's first kept trial. The image's row carries its label, ``split``,
``n_repeats`` (kept trials averaged), the trial numbers averaged, and the session and run of the
first of them (``runs.npy`` = that run).

Values are float32 (see the folder's README for why), one memory-mapped row at a time: memory holds
one session's voxels of the mask, not the subject.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from nsdprep.core import nsd
from nsdprep.core._io import atomic_path
from nsdprep.core.errors import FormatError
from nsdprep.core.nsd import AVERAGED_COLUMNS, TRIAL_COLUMNS

log = logging.getLogger(__name__)

#: Voxel columns per block of the z-score arithmetic (fixed: the float64 sums, hence the bytes,
#: do not depend on the machine).
ZSCORE_BLOCK = 4096


@dataclass(frozen=True)
class Prepared:
    """What :func:`write_prepared` wrote for one subject."""

    subject: int
    n_rows: int
    n_voxels: int
    #: (voxel, session) pairs whose values did not vary in the session (z = 0 there)
    n_constant: int


def zscore_rows(block: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, int]:
    """``rows`` of ``block`` (trials x voxels) z-scored per voxel over all trials of ``block``.

    Returns float32 values and the number of voxels that do not vary (z = 0 for them).
    """
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((rows.size, block.shape[1]), dtype=np.float32)
    constant = 0
    for c0 in range(0, block.shape[1], ZSCORE_BLOCK):
        b = block[:, c0 : c0 + ZSCORE_BLOCK].astype(np.float64)
        mean = b.mean(axis=0)
        sd = b.std(axis=0)
        flat = sd == 0
        constant += int(flat.sum())
        z = (b[rows] - mean) / np.where(flat, 1.0, sd)
        z[:, flat] = 0.0
        out[:, c0 : c0 + ZSCORE_BLOCK] = z
    return out, constant


def averaged_table(trials: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """One row per image of ``trials`` (first-kept order), and the output row of every trial."""
    ids = trials["nsdId"].to_numpy(dtype=np.int64)
    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # images in the order of their first kept trial
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    row_of = rank[inverse]
    firsts = trials.iloc[first[order]].reset_index(drop=True)
    n_repeats = np.bincount(row_of, minlength=order.size)
    numbers = trials["trial"].to_numpy(dtype=np.int64)
    joined = [",".join(map(str, numbers[row_of == r])) for r in range(order.size)]
    table = pd.DataFrame(
        {
            "subject": firsts["subject"].to_numpy(),
            "nsdId": firsts["nsdId"].to_numpy(),
            "cocoId": firsts["cocoId"].to_numpy(),
            "supercat": firsts["supercat"].to_numpy(dtype=str),
            "cat": firsts["cat"].to_numpy(dtype=str),
            "split": firsts["split"].to_numpy(dtype=str),
            "n_repeats": n_repeats.astype(np.int64),
            "trials": joined,
            "session": firsts["session"].to_numpy(),
            "run": firsts["run"].to_numpy(),
        },
        columns=list(AVERAGED_COLUMNS),
    )
    return table, row_of


def write_prepared(
    out: str | os.PathLike[str],
    sessions: dict[int, Path],
    subject: int,
    trials: pd.DataFrame,
    grid: object,
    mask: np.ndarray,
    *,
    zscore: bool,
    average: bool,
) -> Prepared:
    """Write one subject's prepared files (float32 matrix and 4D image, mask, labels, runs, table).

    ``sessions`` maps each used session to its 3 mm file (every volume is read, so the gzip CRC is
    checked); ``trials`` is the kept trials' table; ``mask`` the voxels kept (3D bool).
    """
    from tqdm import tqdm

    from nsdprep.core.matrix import FLOAT_DTYPE, RowMatrix, open_matrix, unmask
    from nsdprep.core.nifti import NiftiStreamWriter

    files = nsd.curated_files(subject, out)
    name = nsd.bids_subject_label(subject)
    mask = np.asarray(mask, dtype=bool)
    n_cols = int(mask.sum())
    if average:
        table, row_of = averaged_table(trials)
    else:
        table, row_of = trials.loc[:, list(TRIAL_COLUMNS)], np.arange(len(trials))
    n_rows = len(table)
    constant = 0
    sess = trials["session"].to_numpy(dtype=np.int64)
    in_session = trials["trial_in_session"].to_numpy(dtype=np.int64) - 1
    with (
        RowMatrix(files.matrix, n_rows, n_cols) as matrix,
        tqdm(total=len(trials), desc=name, unit="trial", disable=None) as bar,
    ):
        for ses in sorted(set(sess.tolist())):
            kept = np.flatnonzero(sess == ses)  # positions in ``trials``, in trial order
            block = _session_block(sessions[ses], mask)  # all its trials: the z-score needs them
            if zscore:
                values, n_flat = zscore_rows(block, in_session[kept])
                constant += n_flat
            else:
                values = block[in_session[kept]].astype(np.float32)
            if average:
                for j, i in enumerate(kept):
                    matrix.add(int(row_of[i]), values[j])
            else:
                matrix.set(row_of[kept], values)
            bar.update(kept.size)
        if average:
            matrix.divide(table["n_repeats"].to_numpy())
    X = open_matrix(files.matrix)
    with NiftiStreamWriter(
        files.betas, grid.shape, grid.affine, FLOAT_DTYPE, n_rows, header=grid.header
    ) as writer:
        for r in range(n_rows):
            writer.write(unmask(np.asarray(X[r]), mask)[..., 0])
    del X
    with NiftiStreamWriter(files.mask, grid.shape, grid.affine, np.uint8, None) as mask_out:
        mask_out.write(mask.astype(np.uint8))
    with atomic_path(files.labels) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.asarray(table["supercat"].to_numpy(dtype=str), dtype=str))
    with atomic_path(files.runs) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, table["run"].to_numpy(dtype=np.int64))
    with atomic_path(files.trials) as tmp:
        table.to_csv(tmp, sep="\t", index=False, lineterminator="\n", na_rep="n/a")
    return Prepared(subject, n_rows, n_cols, constant)


def _session_block(path: Path, mask: np.ndarray) -> np.ndarray:
    """Every volume of one 3 mm session, reduced to the voxels of ``mask`` (trials x voxels)."""
    from nsdprep.core.nifti import iter_volumes, read_header, volume_count

    hdr = read_header(path)
    block: np.ndarray | None = None
    for k, vol in enumerate(iter_volumes(path, header=hdr)):  # exhausted: the gzip CRC is checked
        if block is None:
            block = np.empty((volume_count(hdr), int(mask.sum())), dtype=vol.dtype)
        block[k] = vol[mask]
    if block is None:
        raise FormatError(f"{path}: no volume")
    return block
