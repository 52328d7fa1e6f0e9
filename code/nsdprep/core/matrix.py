"""The analysis-ready form of a curated subject: a trials x voxels int16 matrix that memory-maps.

``sub-XX_X.npy`` holds one row per kept trial (same order as ``sub-XX.nii.gz``, the labels and the
runs) and one column per voxel of ``sub-XX_mask.nii.gz`` (3 mm, 1 = a column), taken in C order of
the voxel indices ``(i, j, k)``. Values are the curated betas unchanged: int16, beta (% signal
change) x 300. Rows are contiguous, so any trial is one read of ``n_voxels * 2`` bytes;
``numpy.load(path, mmap_mode="r")`` opens it without reading it.

The matrix is written while the 4D file is streamed (one row per volume), into a temporary that is
renamed into place on success, so memory stays at one volume whatever the number of trials.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from nsdprep.core._io import atomic_path, exact_cast
from nsdprep.core.errors import FormatError, UsageError

#: On-disk dtype of the matrix (the curated betas' dtype; NSD units, beta x 300).
MATRIX_DTYPE = np.dtype("<i2")
#: On-disk dtype of a prepared matrix (z-scored or averaged values are not whole numbers).
FLOAT_DTYPE = np.dtype("<f4")


class MatrixWriter:
    """Write ``n_rows`` volumes, each reduced to the voxels of ``mask``, as one ``.npy`` matrix.

    Parameters
    ----------
    path
        Target ``.npy``; nothing appears there until the context exits successfully.
    mask
        3D boolean array on the volumes' grid; ``mask.sum()`` columns.
    n_rows
        Exact number of volumes that will be written.
    """

    def __init__(self, path: str | os.PathLike[str], mask: np.ndarray, n_rows: int) -> None:
        self.path = Path(path)
        self.mask = np.asarray(mask, dtype=bool)
        if self.mask.ndim != 3:
            raise UsageError(f"{self.path}: mask must be 3D, got shape {self.mask.shape}")
        if int(n_rows) < 0:
            raise UsageError(f"{self.path}: n_rows must be >= 0, got {n_rows}")
        self.n_rows = int(n_rows)
        self.n_cols = int(self.mask.sum())
        self.written = 0
        self._stack: contextlib.ExitStack | None = None
        self._out: np.memmap | None = None

    def __enter__(self) -> MatrixWriter:
        stack = contextlib.ExitStack()
        try:
            tmp = stack.enter_context(
                atomic_path(self.path, expected_size=lambda _written: self._nbytes())
            )
            self._out = np.lib.format.open_memmap(
                tmp, mode="w+", dtype=MATRIX_DTYPE, shape=(self.n_rows, self.n_cols)
            )
            _reserve(tmp)
        except BaseException:
            # unwind *with* the exception: a plain close() would let atomic_path rename the
            # partial temporary into place as if it were finished
            if not stack.__exit__(*sys.exc_info()):
                raise
            raise  # pragma: no cover (nothing in the stack suppresses exceptions)
        self._stack = stack
        return self

    def _nbytes(self) -> int:
        """Size of the finished file: the data plus an upper bound of the ``.npy`` header."""
        return self.n_rows * self.n_cols * MATRIX_DTYPE.itemsize + 128

    def write(self, vol: np.ndarray) -> None:
        """Append one volume's masked voxels as the next row (values must fit int16 exactly)."""
        if self._out is None:
            raise RuntimeError("MatrixWriter.write() outside its `with` block")
        if self.written >= self.n_rows:
            raise FormatError(f"{self.path}: more than the declared {self.n_rows} rows written")
        vol = np.asarray(vol)
        if vol.shape != self.mask.shape:
            raise UsageError(f"{self.path}: volume shape {vol.shape}, mask {self.mask.shape}")
        self._out[self.written] = exact_cast(vol[self.mask], MATRIX_DTYPE, self.path)
        self.written += 1

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        stack, self._stack = self._stack, None
        out, self._out = self._out, None
        if stack is None:
            return False
        if out is not None:
            out.flush()
            del out
        if exc_type is None and self.written != self.n_rows:
            err = FormatError(
                f"{self.path}: {self.written} rows written, {self.n_rows} declared; not created"
            )
            stack.__exit__(FormatError, err, None)
            raise err
        return bool(stack.__exit__(exc_type, exc, tb))


def _reserve(path: Path) -> None:
    """Allocate the whole (sparse) memory-mapped file now, so a full disk fails here as ``ENOSPC``.

    Without it the first write to an unallocated page of a full file system kills the process
    with SIGBUS, with no message. File systems without ``fallocate`` are left as they are.
    """
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OSError(exc.errno, exc.strerror, str(path)) from None
            # EOPNOTSUPP/EINVAL: no fallocate here; the pages are allocated as they are written


class RowMatrix:
    """An ``n_rows x n_cols`` float32 ``.npy`` matrix filled row by row in any order, then renamed.

    Rows start at 0; :meth:`set` writes a row, :meth:`add` adds to it (a mean is summed, then
    :meth:`divide`). The file is memory-mapped, so memory stays at what is being written; nothing
    appears at ``path`` until the context exits without error.
    """

    def __init__(self, path: str | os.PathLike[str], n_rows: int, n_cols: int) -> None:
        self.path = Path(path)
        if int(n_rows) < 0 or int(n_cols) < 0:
            raise UsageError(f"{self.path}: shape must be >= 0, got ({n_rows}, {n_cols})")
        self.shape = (int(n_rows), int(n_cols))
        self._stack: contextlib.ExitStack | None = None
        self._out: np.memmap | None = None

    def __enter__(self) -> RowMatrix:
        stack = contextlib.ExitStack()
        try:
            size = self.shape[0] * self.shape[1] * FLOAT_DTYPE.itemsize + 128
            tmp = stack.enter_context(atomic_path(self.path, expected_size=lambda _w: size))
            self._out = np.lib.format.open_memmap(
                tmp, mode="w+", dtype=FLOAT_DTYPE, shape=self.shape
            )
            _reserve(tmp)
        except BaseException:
            if not stack.__exit__(*sys.exc_info()):
                raise
            raise  # pragma: no cover
        self._stack = stack
        return self

    @property
    def out(self) -> np.memmap:
        """The matrix being written (only inside the ``with`` block)."""
        if self._out is None:
            raise RuntimeError("RowMatrix used outside its `with` block")
        return self._out

    def set(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Write ``values`` (``len(rows) x n_cols``) into ``rows``."""
        self.out[np.asarray(rows)] = values

    def add(self, row: int, values: np.ndarray) -> None:
        """Add ``values`` (``n_cols``) to ``row``."""
        self.out[row] += values

    def divide(self, counts: np.ndarray) -> None:
        """Divide each row by its count (``n_rows`` positive numbers)."""
        counts = np.asarray(counts, dtype=FLOAT_DTYPE)
        for r in range(self.shape[0]):  # row by row: memory stays at one row
            self.out[r] /= counts[r]

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        stack, self._stack = self._stack, None
        out, self._out = self._out, None
        if stack is None:
            return False
        if out is not None:
            out.flush()
            del out
        return bool(stack.__exit__(exc_type, exc, tb))


def open_matrix(path: str | os.PathLike[str]) -> np.memmap:
    """Memory-map a curated matrix read-only (no data is read until rows are indexed).

    int16 (NSD units, the default folder) or float32 (z-scored or averaged folders).
    """
    try:
        X = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise FormatError(f"{path}: not a .npy matrix ({exc})") from exc
    if X.ndim != 2 or X.dtype not in (MATRIX_DTYPE, FLOAT_DTYPE):
        raise FormatError(
            f"{path}: expected a 2D int16 or float32 matrix, found {X.ndim}D {X.dtype}"
        )
    return X


def mask_columns(mask: np.ndarray) -> np.ndarray:
    """``(n_voxels, 3)`` voxel indices of the matrix columns, in column order."""
    return np.argwhere(np.asarray(mask, dtype=bool))


def unmask(rows: np.ndarray, mask: np.ndarray, dtype: Any = None) -> np.ndarray:
    """Put matrix rows back on the grid: ``(n, n_voxels)`` -> ``(*mask.shape, n)``, 0 outside."""
    rows = np.atleast_2d(np.asarray(rows))
    mask = np.asarray(mask, dtype=bool)
    if rows.shape[1] != int(mask.sum()):
        raise UsageError(f"rows have {rows.shape[1]} columns, the mask {int(mask.sum())} voxels")
    out = np.zeros((*mask.shape, rows.shape[0]), dtype=dtype or rows.dtype)
    out[mask] = rows.T
    return out
