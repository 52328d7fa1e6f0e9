"""The curated trials x voxels matrix: writer, exactness, atomicity, and ``load_curated`` errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nsdprep.core.errors import FormatError, MissingInputError, UsageError
from nsdprep.core.matrix import MatrixWriter, mask_columns, open_matrix, unmask


def _volumes(n: int, shape=(7, 8, 9), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-3000, 3000, size=(n, *shape), dtype=np.int16)


def test_rows_are_the_masked_volumes_in_c_order(tmp_path: Path) -> None:
    vols = _volumes(5)
    mask = np.random.default_rng(1).random(vols.shape[1:]) > 0.6
    with MatrixWriter(tmp_path / "X.npy", mask, len(vols)) as w:
        for v in vols:
            w.write(np.asfortranarray(v))  # memory order of the volume must not matter
    X = open_matrix(tmp_path / "X.npy")
    assert isinstance(X, np.memmap) and X.shape == (5, int(mask.sum())) and X.dtype == np.int16
    for k, v in enumerate(vols):
        np.testing.assert_array_equal(X[k], v[mask])
    # columns map back to voxels: (i, j, k) of column c holds X[:, c]
    ijk = mask_columns(mask)
    np.testing.assert_array_equal(X[:, 3], vols[:, ijk[3][0], ijk[3][1], ijk[3][2]])
    back = unmask(X[[1, 4]], mask)
    assert back.shape == (*mask.shape, 2)
    np.testing.assert_array_equal(back[..., 1], np.where(mask, vols[4], 0))


def test_failure_leaves_no_file(tmp_path: Path) -> None:
    mask = np.ones((7, 8, 9), bool)
    with pytest.raises(RuntimeError, match="boom"):
        with MatrixWriter(tmp_path / "X.npy", mask, 3) as w:
            w.write(_volumes(1)[0])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FormatError, match="1 rows written, 3 declared"):
        with MatrixWriter(tmp_path / "X.npy", mask, 3) as w:
            w.write(_volumes(1)[0])
    assert list(tmp_path.iterdir()) == []


def test_values_must_fit_int16(tmp_path: Path) -> None:
    mask = np.ones((2, 2, 2), bool)
    with pytest.raises(UsageError, match="not exact in int16"):
        with MatrixWriter(tmp_path / "X.npy", mask, 1) as w:
            w.write(np.full((2, 2, 2), 0.5, np.float32))


def test_same_input_same_bytes(tmp_path: Path) -> None:
    vols = _volumes(4)
    mask = vols[0] > 0
    for name in ("a.npy", "b.npy"):
        with MatrixWriter(tmp_path / name, mask, 4) as w:
            for v in vols:
                w.write(v)
    assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes()


def test_load_curated_names_the_build_command(tmp_path: Path) -> None:
    import nsdprep

    with pytest.raises(MissingInputError, match="make curated"):
        nsdprep.load_curated(3, dataset=tmp_path)
    with pytest.raises(UsageError, match="LABELS"):
        nsdprep.load_curated(3, dataset=tmp_path, labels="crops")  # type: ignore[arg-type]
