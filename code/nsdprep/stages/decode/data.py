"""What decoding reads from ``derivatives/curated_3mm``: the subjects, their labels and runs, and the data.

The data rows come from the curated matrix (``sub-XX_X.npy``, memory-mapped, only the chosen rows
read) when it is there, else streamed from the 4D NIfTI volume by volume; both give identical rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nsdprep.core import nsd
from nsdprep.core._io import require_content
from nsdprep.core.errors import FormatError, MissingInputError, NsdPrepError
from nsdprep.core.nsd import CuratedFiles

# ----------------------------------------------------------------------------------------------
# inputs


def find_subjects(curated_dir: str | Path) -> list[int]:
    """Subjects (1-based numbers) that have a ``sub-XX.nii.gz`` in ``curated_dir``, sorted."""
    curated_dir = Path(curated_dir)
    if not curated_dir.is_dir():
        raise MissingInputError(
            f"{curated_dir}: curated folder not found; expected sub-XX.nii.gz, sub-XX_labels.npy "
            "and sub-XX_runs.npy per subject. Build it first (`make curated`) or `datalad get` it."
        )
    subjects = sorted(
        int(m[1]) for p in curated_dir.iterdir() if (m := nsd.CURATED_BETAS_RE.match(p.name))
    )
    if not subjects:
        raise MissingInputError(
            f"{curated_dir}: no sub-XX.nii.gz found; build the curated stage first (`make curated`)"
        )
    return subjects


def subject_files(curated_dir: str | Path, subject: int) -> CuratedFiles:
    """Paths of one subject's curated files; :class:`MissingInputError` if any is absent."""
    label = nsd.bids_subject_label(subject)
    files = nsd.curated_files(subject, curated_dir)
    hint = "build it with `make curated` (or pick other --subjects)"
    for path in (files.betas, files.labels, files.runs):
        require_content(path, f"curated file of {label}", hint)
    return files


def load_labels_runs(files: CuratedFiles, n_volumes: int) -> tuple[np.ndarray, np.ndarray]:
    """Load and check the per-trial labels (unicode) and runs (integers) of one subject."""
    labels, runs = _load_npy(files.labels), _load_npy(files.runs)
    for path, arr in ((files.labels, labels), (files.runs, runs)):
        if arr.shape != (n_volumes,):
            raise FormatError(
                f"{path}: expected one entry per volume of {files.betas.name}, shape ({n_volumes},); "
                f"found shape {arr.shape}"
            )
    if labels.dtype.kind != "U":
        raise FormatError(f"{files.labels}: expected unicode labels, found dtype {labels.dtype}")
    if not np.issubdtype(runs.dtype, np.integer):
        raise FormatError(
            f"{files.runs}: expected integer run numbers, found dtype {runs.dtype} "
            f"(first values {runs[:3].tolist()}); labels saved as runs? Rebuild with `make curated`."
        )
    return labels, runs


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:  # object arrays need pickle: not the curated format
        raise FormatError(f"{path}: not a plain numpy array ({exc})") from exc
    except OSError as exc:
        raise FormatError(f"{path}: unreadable .npy file ({exc})") from exc


def select_trials(labels: np.ndarray, n: int) -> np.ndarray:
    """Indices of ``n`` trials, stratified by label and evenly spaced in time (deterministic).

    Each class keeps a share of ``n`` proportional to its size (largest remainder, ties to the
    earlier class in sorted order), taken at evenly spaced positions among its trials so that every
    part of the experiment (every run, roughly) stays represented. ``n <= 0`` or ``n >= len(labels)``
    selects all trials. Returned indices are sorted.
    """
    total = len(labels)
    if n <= 0 or n >= total:
        return np.arange(total)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n / total
    take = np.floor(exact).astype(int)
    order = np.argsort(-(exact - take), kind="stable")
    take[order[: n - take.sum()]] += 1
    chosen = []
    for cls, k in zip(classes, take, strict=True):
        idx = np.flatnonzero(labels == cls)
        if k > 0:
            pos = np.floor((np.arange(k) + 0.5) * len(idx) / k).astype(int)
            chosen.append(idx[pos])
    return np.sort(np.concatenate(chosen))


def load_masked(
    files: CuratedFiles, trials: np.ndarray, *, desc: str = ""
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stream the selected volumes of a subject's 4D file into a float32 ``(n_trials, n_voxels)`` matrix.

    Reads the rows of ``sub-XX_X.npy`` (the curated matrix) when it is there, else
    streams the 4D file in two passes (the mask, then the rows). Either way the columns are the
    voxels of ``sub-XX_mask.nii.gz`` (when present) that are nonzero in at least one selected
    trial, so both give the same matrix. Memory: the matrix plus one volume (or row block). Returns
    ``X`` (rows in the order of ``trials``, voxel columns in numpy's boolean-mask order, as
    ``volume[mask]`` and nilearn's ``apply_mask`` give), the 3D boolean mask and the file's
    voxel-to-world affine.
    """
    from tqdm.auto import tqdm

    from nsdprep.core.nifti import header_affine, iter_volumes, read_header, volume_count

    betas, mask_file, matrix_file = files.betas, files.mask, files.matrix
    hdr = read_header(betas)
    shape = hdr.get_data_shape()
    if len(shape) != 4:
        raise FormatError(f"{betas}: expected a 4D image (x, y, z, trial), found shape {shape}")
    n_vol = volume_count(hdr)
    trials = np.asarray(trials)
    if trials.size == 0 or trials.min() < 0 or trials.max() >= n_vol:
        raise NsdPrepError(f"{betas}: trial indices outside 0..{n_vol - 1}")
    stop = int(trials.max()) + 1
    wanted = np.zeros(stop, dtype=bool)
    wanted[trials] = True

    written = None
    if mask_file.is_file():  # the curated mask: grey matter (VALID=1: valid in every session)
        (written,) = (v != 0 for v in iter_volumes(mask_file))
        if written.shape != tuple(shape[:3]):
            raise FormatError(f"{mask_file}: grid {written.shape}, betas grid {tuple(shape[:3])}")
    if written is not None and matrix_file.is_file():
        X, mask = _rows_from_matrix(matrix_file, written, trials, n_vol)
        return X, mask, header_affine(hdr)

    mask = np.zeros(shape[:3], dtype=bool)
    vols = iter_volumes(betas, 0, stop, header=hdr, reuse_buffer=True)
    for i, vol in enumerate(
        tqdm(vols, total=stop, desc=f"{desc} mask", unit="vol", leave=False, disable=None)
    ):
        if wanted[i]:
            mask |= vol != 0
    if written is not None:
        mask &= written
    n_voxels = int(mask.sum())
    if n_voxels == 0:
        raise FormatError(f"{betas}: every selected trial is 0 everywhere; nothing to decode")

    row_of = np.full(stop, -1, dtype=np.int64)
    row_of[trials] = np.arange(trials.size)
    X = np.empty((trials.size, n_voxels), dtype=np.float32)
    vols = iter_volumes(betas, 0, stop, header=hdr, reuse_buffer=True)
    for i, vol in enumerate(
        tqdm(vols, total=stop, desc=f"{desc} load", unit="vol", leave=False, disable=None)
    ):
        if row_of[i] >= 0:
            X[row_of[i]] = vol[mask]
    return X, mask, header_affine(hdr)


def _rows_from_matrix(
    path: Path, written: np.ndarray, trials: np.ndarray, n_vol: int, block: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """The rows of ``trials`` from the curated matrix, columns nonzero in at least one of them.

    Two passes over blocks of rows of the memory-mapped matrix (no 4D decompression); the result
    equals what streaming the 4D file gives (same voxels, same C order, same values).
    """
    from nsdprep.core.matrix import open_matrix

    M = open_matrix(path)
    if M.shape != (n_vol, int(written.sum())):
        raise FormatError(
            f"{path}: shape {M.shape}, expected ({n_vol} trials, {int(written.sum())} mask voxels); "
            "rebuild it with `make curated FORCE=1`."
        )
    used = np.zeros(M.shape[1], dtype=bool)
    for i in range(0, trials.size, block):
        used |= np.any(np.asarray(M[trials[i : i + block]]) != 0, axis=0)
    if not used.any():
        raise FormatError(f"{path}: every selected trial is 0 everywhere; nothing to decode")
    X = np.empty((trials.size, int(used.sum())), dtype=np.float32)
    for i in range(0, trials.size, block):
        X[i : i + block] = np.asarray(M[trials[i : i + block]])[:, used]
    mask = np.zeros(written.shape, dtype=bool)
    mask[written] = used
    return X, mask


# ----------------------------------------------------------------------------------------------
# what the ridge decoder reads: sessions, and the data as blocks of columns


def load_sessions(files: CuratedFiles, n_volumes: int) -> np.ndarray:
    """Session (1-based, integer) of every trial, from the ``session`` column of ``sub-XX_trials.tsv``."""
    import pandas as pd

    require_content(files.trials, "curated trial table", "build it with `make curated`")
    try:
        table = pd.read_csv(files.trials, sep="\t", usecols=["session"])
    except ValueError as exc:  # no such column, or not a table
        raise FormatError(
            f"{files.trials}: expected a tab-separated table with a `session` column ({exc}); "
            "rebuild it with `make curated`"
        ) from None
    sessions = table["session"].to_numpy()
    if sessions.shape != (n_volumes,) or not np.issubdtype(sessions.dtype, np.integer):
        raise FormatError(
            f"{files.trials}: expected {n_volumes} integer sessions (one per volume of "
            f"{files.betas.name}), found {sessions.shape[0]} of dtype {sessions.dtype}"
        )
    return sessions.astype(np.int64)


def load_split(files: CuratedFiles, n_volumes: int) -> np.ndarray:
    """``train``/``test`` of every row, from the ``split`` column of ``sub-XX_trials.tsv``."""
    import pandas as pd

    require_content(files.trials, "curated trial table", "build it with `make curated`")
    try:
        split = pd.read_csv(files.trials, sep="\t", usecols=["split"])["split"].to_numpy(str)
    except ValueError as exc:
        raise FormatError(
            f"{files.trials}: expected a `split` column ({exc}); rebuild it with `make curated`"
        ) from None
    allowed = {nsd.SPLIT_TRAIN, nsd.SPLIT_TEST}
    if split.shape != (n_volumes,) or not set(split.tolist()) <= allowed:
        raise FormatError(
            f"{files.trials}: expected {n_volumes} rows of {sorted(allowed)} in `split`, found "
            f"{split.shape[0]} with {sorted(set(split.tolist()) - allowed)[:3]}"
        )
    return split


class ColumnReader:
    """The selected trials of a subject, read as blocks of voxel columns (``reader(a, b)``).

    From the curated matrix (``sub-XX_X.npy``, int16) when it is there: each trial's columns
    ``a:b`` are one ``pread`` of the file, so the process maps none of it (a memory map would add
    every page it touches, up to the whole 2.5 GB matrix, to the resident memory). Else the rows are
    streamed from the 4D file once into memory (float32, the same values, :func:`load_masked`; 5 GB
    for a real-size subject: the memory bound of the ridge decoder assumes the matrix, which
    ``make curated`` writes), in the matrix's columns when the mask is there, so that the kernel
    is summed over the same chunks, to the same bits. ``n_cols`` is the number of columns.
    """

    def __init__(self, files: CuratedFiles, trials: np.ndarray, n_volumes: int) -> None:
        import os

        self.trials = np.asarray(trials)
        self._fd: int | None = None
        self._X: np.ndarray | None = None
        if files.mask.is_file() and files.matrix.is_file():
            offset, shape, self._dtype = _npy_layout(files.matrix)
            if shape[0] != n_volumes:
                raise FormatError(
                    f"{files.matrix}: {shape[0]} rows, expected one per volume of "
                    f"{files.betas.name} ({n_volumes}); rebuild it with `make curated FORCE=1`"
                )
            self._fd = os.open(files.matrix, os.O_RDONLY)
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_WILLNEED)
            self._offset, self.n_cols = offset, shape[1]
            self.path = files.matrix
        else:
            X, used, _ = load_masked(files, self.trials)
            if files.mask.is_file():  # the matrix's columns (zero where unused): the same chunks
                from nsdprep.core.nifti import iter_volumes

                (written,) = (v != 0 for v in iter_volumes(files.mask))
                self._X = np.zeros((X.shape[0], int(written.sum())), dtype=np.float32)
                self._X[:, used[written]] = X
                del X
            else:
                self._X = X
            self.n_cols = self._X.shape[1]
            self.path = files.betas
        self.n_rows = self.trials.size

    def __call__(self, a: int, b: int) -> np.ndarray:
        """Columns ``a:b`` of the selected trials, ``(n_rows, b - a)`` (int16 or float32)."""
        import os

        if self._X is not None:
            return self._X[:, a:b]
        if self._fd is None:
            raise RuntimeError(f"{self.path}: reader closed")
        size = self._dtype.itemsize
        out = np.empty((self.n_rows, b - a), dtype=self._dtype)
        row_bytes, want = self.n_cols * size, (b - a) * size
        start = self._offset + a * size
        for k, r in enumerate(self.trials.tolist()):
            if os.preadv(self._fd, [out[k]], start + r * row_bytes) != want:
                raise FormatError(
                    f"{self.path}: truncated (row {r}); rebuild it with `make curated`"
                )
        return out

    def close(self) -> None:
        """Close the matrix file (if open)."""
        import os

        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ColumnReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _npy_layout(path: Path) -> tuple[int, tuple[int, int], np.dtype]:
    """Data offset, shape and dtype of a 2D C-order ``.npy`` (the curated matrix).

    int16 (betas x 300, as NSD stores them) or float32 (z-scored or averaged, ``make curated
    ZSCORE=session`` / ``AVERAGE=1``), little-endian.
    """
    from numpy.lib import format as npy

    try:
        with open(path, "rb") as fh:
            version = npy.read_magic(fh)
            read_header = (
                npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(fh)
            offset = fh.tell()
    except ValueError as exc:
        raise FormatError(f"{path}: not a .npy matrix ({exc})") from None
    if len(shape) != 2 or fortran or dtype not in (np.dtype("<i2"), np.dtype("<f4")):
        raise FormatError(
            f"{path}: expected a 2D C-order int16 or float32 matrix, found {shape} {dtype}"
        )
    return offset, (int(shape[0]), int(shape[1])), dtype
