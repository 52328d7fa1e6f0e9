"""Dense float32 linear algebra of the ridge decoder, split in fixed tiles: bit-identical with any worker count.

A multi-threaded BLAS call splits its work by the number of threads, and float32 results then differ
in their last bits from one thread count to another (seen here with OpenBLAS for ``sgemm``,
``ssyrk`` and ``spotrf``), which can flip a prediction and change ``results.json``. Here every
product is cut into tiles fixed by the matrix sizes alone; each tile is one single-threaded BLAS call
(numpy's ``matmul``, which releases the GIL), run by a pool of worker threads. Which worker runs a
tile, and how many there are, cannot change a bit of the result.

- :func:`gram`: ``K = Z Z^T`` summed over column chunks of ``Z`` (lower tiles only, then mirrored).
- :class:`BlockCholesky`: left-looking blocked Cholesky of a symmetric positive definite matrix kept
  as its lower block rows (half the memory of the square), and the solves ``A^-1 Y``.
- :func:`matmul`: ``A @ B`` by fixed column blocks of ``B``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from nsdprep.core.errors import NsdPrepError

#: Rows (and columns) of a tile of the Gram matrix.
GRAM_TILE = 2048
#: Rows of a block row of the Cholesky factor.
CHOL_TILE = 1024
#: Columns of a block of right-hand sides (solves) or of a product.
RHS_BLOCK = 128


class NotPositiveDefiniteError(NsdPrepError, ArithmeticError):
    """The regularized training kernel is not positive definite (alpha too small for float32)."""


class Workers:
    """A pool of ``n`` threads running single-threaded BLAS calls (the BLAS itself limited to 1 thread).

    Use as a context manager. :meth:`map` runs a function on every item and waits for all of them
    (re-raising the first error); :meth:`submit` starts them without waiting.
    """

    def __init__(self, n: int = 1) -> None:
        if n < 1:
            raise ValueError(f"workers must be >= 1, got {n}")
        self.n = int(n)
        self._stack = contextlib.ExitStack()
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> Workers:
        from threadpoolctl import threadpool_limits

        self._stack.enter_context(threadpool_limits(limits=1, user_api="blas"))
        self._pool = self._stack.enter_context(ThreadPoolExecutor(self.n, "decode-blas"))
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool = None
        self._stack.close()

    def submit(self, fn: Callable[..., Any], items: Iterable[Any]) -> list[Future[Any]]:
        """Start ``fn(item)`` for every item; return the futures."""
        if self._pool is None:
            raise RuntimeError("Workers used outside its `with` block")
        return [self._pool.submit(fn, item) for item in items]

    def map(self, fn: Callable[..., Any], items: Iterable[Any]) -> None:
        """Run ``fn(item)`` for every item on the pool and wait for all of them."""
        wait(self.submit(fn, items))


def wait(futures: Sequence[Future[Any]]) -> None:
    """Wait for every future (even after an error, so nothing still writes), then raise the first error."""
    errors = [f.exception() for f in futures]
    for err in errors:
        if err is not None:
            raise err


def edges(n: int, tile: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of consecutive tiles of ``tile`` rows covering ``0..n``."""
    return [(a, min(n, a + tile)) for a in range(0, n, tile)]


# ----------------------------------------------------------------------------------------------
# Gram matrix


def gram(
    chunks: Iterator[np.ndarray], n: int, workers: Workers, tile: int | None = None
) -> np.ndarray:
    """``K = sum over chunks of Z Z^T`` (float32, ``n x n``, exactly symmetric) for ``(n, c)`` chunks.

    The lower tiles of a chunk are computed on the workers while the next chunk is produced by the
    caller's iterator (reading and standardizing it), then the lower triangle is mirrored.
    """
    K = np.zeros((n, n), dtype=np.float32)
    parts = edges(n, tile or GRAM_TILE)
    pairs = [(i, j) for i in range(len(parts)) for j in range(i + 1)]
    pending: list[Future[Any]] = []
    for Z in chunks:
        if Z.shape[0] != n or Z.dtype != np.float32:
            raise ValueError(f"chunk of shape {Z.shape} {Z.dtype}, expected ({n}, c) float32")
        wait(pending)

        def tile_product(ij: tuple[int, int], Z: np.ndarray = Z) -> None:
            (a, b), (c, d) = parts[ij[0]], parts[ij[1]]
            K[a:b, c:d] += Z[a:b] @ Z[c:d].T

        pending = workers.submit(tile_product, pairs)
    wait(pending)
    for a, b in parts:  # mirror: lower tiles to the upper ones, the diagonal tiles' lower half up
        K[:a, a:b] = K[a:b, :a].T
        diag = K[a:b, a:b]
        upper = np.triu_indices(b - a, 1)
        diag[upper] = diag.T[upper]
    return K


# ----------------------------------------------------------------------------------------------
# Cholesky factor and solves


class BlockCholesky:
    """Cholesky factor ``L`` (``A = L L^T``) of a symmetric positive definite ``m x m`` float32 matrix.

    The matrix is given as its lower block rows: ``rows[i] = A[s_i:e_i, :e_i]`` for the tiles
    ``(s_i, e_i)`` of :func:`edges` ``(m, tile)`` (the strictly upper part is never stored), and is
    overwritten by ``L``. Left-looking: for each block column ``j`` one product per block row below
    it brings in every earlier column (a long inner dimension, efficient ``sgemm``), then the
    diagonal tile is factored (float64, serial, small) and the panel below it is multiplied by its
    inverse. The inverses of the diagonal tiles serve the solves.
    """

    def __init__(self, rows: list[np.ndarray], tile: int | None = None) -> None:
        m = rows[-1].shape[1] if rows else 0
        self.parts = edges(m, tile or CHOL_TILE)
        if len(rows) != len(self.parts) or any(
            r.shape != (e - s, e) or r.dtype != np.float32
            for r, (s, e) in zip(rows, self.parts, strict=True)
        ):
            raise ValueError(
                "rows must be the float32 lower block rows A[s:e, :e] of edges(m, tile)"
            )
        self.m = m
        self.rows = rows
        self.inv_diag: list[np.ndarray] = []

    def factor(self, workers: Workers) -> BlockCholesky:
        """Overwrite the block rows with ``L``; raise :class:`NotPositiveDefiniteError` if it fails."""
        rows, parts = self.rows, self.parts
        for j, (s, e) in enumerate(parts):
            if s:

                def update(i: int, s: int = s, e: int = e, j: int = j) -> None:
                    rows[i][:, s:e] -= rows[i][:, :s] @ rows[j][:, :s].T

                workers.map(update, range(j, len(parts)))
            diag = rows[j][:, s:e].astype(np.float64)
            try:
                low = np.linalg.cholesky(diag)
            except np.linalg.LinAlgError as exc:
                raise NotPositiveDefiniteError(
                    f"kernel block {s}:{e} is not positive definite in float32 ({exc}); raise alpha"
                ) from None
            inv = _lower_inverse(low)
            rows[j][:, s:e] = low
            self.inv_diag.append(inv.astype(np.float32))

            def panel(i: int, s: int = s, e: int = e, inv: np.ndarray = self.inv_diag[-1]) -> None:
                rows[i][:, s:e] = rows[i][:, s:e] @ inv.T

            workers.map(panel, range(j + 1, len(parts)))
        return self

    def solve(self, Y: np.ndarray, workers: Workers, block: int | None = None) -> np.ndarray:
        """``A^-1 Y`` for float32 ``Y`` (``m x k``), in place.

        Right-looking substitutions: once a block row of the solution is known (its diagonal tile's
        inverse times it, by fixed blocks of ``block`` columns), every later block row is updated
        by one wide product, the block rows shared out to the workers. Each row sees the same
        updates in the same order whatever the number of workers.
        """
        if Y.shape[0] != self.m or Y.dtype != np.float32 or Y.ndim != 2:
            raise ValueError(
                f"right-hand sides of shape {Y.shape} {Y.dtype}, expected ({self.m}, k) float32"
            )
        if len(self.inv_diag) != len(self.parts):
            raise RuntimeError("BlockCholesky.solve before factor")
        parts, rows, invs = self.parts, self.rows, self.inv_diag
        cols = edges(Y.shape[1], block or 4 * RHS_BLOCK)

        def diagonal(j: int, transpose: bool) -> None:
            (s, e), inv = parts[j], (invs[j].T if transpose else invs[j])

            def part(c: tuple[int, int]) -> None:
                Y[s:e, c[0] : c[1]] = inv @ Y[s:e, c[0] : c[1]]

            workers.map(part, cols)

        for j, (s, e) in enumerate(parts):  # forward: L Z = Y
            diagonal(j, transpose=False)

            def below(i: int, s: int = s, e: int = e) -> None:
                a, b = parts[i]
                Y[a:b] -= rows[i][:, s:e] @ Y[s:e]

            workers.map(below, range(j + 1, len(parts)))
        for j in reversed(range(len(parts))):  # backward: L^T X = Z
            diagonal(j, transpose=True)
            s, e = parts[j]

            def above(i: int, s: int = s, e: int = e, j: int = j) -> None:
                a, b = parts[i]
                Y[a:b] -= rows[j][:, a:b].T @ Y[s:e]

            workers.map(above, range(j))
        return Y


def _lower_inverse(low: np.ndarray) -> np.ndarray:
    """Inverse of a lower triangular float64 matrix (LAPACK ``trtri``)."""
    from scipy.linalg import lapack

    inv, info = lapack.dtrtri(low, lower=1)
    if info != 0:
        raise NotPositiveDefiniteError(
            f"singular Cholesky diagonal tile (trtri info {info}); raise alpha"
        )
    return np.tril(inv)


def matmul(A: np.ndarray, B: np.ndarray, workers: Workers, block: int | None = None) -> np.ndarray:
    """``A @ B`` computed by fixed blocks of ``block`` columns of ``B`` (default ``4 x RHS_BLOCK``)."""
    out = np.empty((A.shape[0], B.shape[1]), dtype=np.result_type(A, B))

    def columns(cols: tuple[int, int]) -> None:
        out[:, cols[0] : cols[1]] = A @ B[:, cols[0] : cols[1]]

    workers.map(columns, edges(B.shape[1], block or 4 * RHS_BLOCK))
    return out
