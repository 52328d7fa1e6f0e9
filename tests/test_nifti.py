"""Streaming NIfTI reader/writer: round trip against nibabel, corruption detection, determinism."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from nsdprep.core.errors import FormatError, MissingInputError, UsageError
from nsdprep.core.nifti import (
    NiftiStreamWriter,
    check_betas_header,
    iter_volumes,
    read_header,
    volume_count,
)

SHAPE = (7, 8, 9)
AFFINE = np.array(
    [[-2.0, 0, 0, 90], [0, 2.0, 0, -126], [0, 0, 2.0, -72], [0, 0, 0, 1]], dtype=np.float64
)


def _data(n: int = 5, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-3000, 3000, size=SHAPE + (n,), dtype=np.int16)


def _write(path: Path, data: np.ndarray, **kw) -> Path:
    with NiftiStreamWriter(path, SHAPE, AFFINE, np.int16, data.shape[3], **kw) as w:
        for t in range(data.shape[3]):
            w.write(data[..., t])
    return path


def _nibabel_file(path: Path, data: np.ndarray, **hdr_fields) -> Path:
    img = nib.Nifti1Image(data, AFFINE)
    for k, v in hdr_fields.items():
        img.header[k] = v
    img.to_filename(path)
    return path


def test_writer_round_trip_via_nibabel(tmp_path: Path) -> None:
    data = _data()
    path = _write(tmp_path / "a.nii.gz", data)
    img = nib.load(path)
    assert isinstance(img, nib.Nifti1Image)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), data)
    assert img.get_data_dtype() == np.int16
    np.testing.assert_allclose(img.affine, AFFINE)
    hdr = img.header
    assert int(hdr["qform_code"]) == 4 and int(hdr["sform_code"]) == 4
    np.testing.assert_allclose(hdr.get_qform(), AFFINE, atol=1e-6)
    assert hdr.get_xyzt_units() == ("mm", "sec")
    assert not list(tmp_path.glob("*.part"))


def test_reader_matches_nibabel_written_file(tmp_path: Path) -> None:
    data = _data(4, seed=1)
    path = _nibabel_file(tmp_path / "b.nii.gz", data)
    vols = list(iter_volumes(path))
    assert len(vols) == 4
    for t, v in enumerate(vols):
        assert v.dtype == np.int16 and v.shape == SHAPE
        np.testing.assert_array_equal(v, data[..., t])
    sub = list(iter_volumes(path, start=1, stop=3))
    assert len(sub) == 2
    np.testing.assert_array_equal(sub[1], data[..., 2])
    assert volume_count(read_header(path)) == 4


def test_reader_big_endian_and_scaling_like_nibabel(tmp_path: Path) -> None:
    data = _data(3, seed=2)
    img = nib.Nifti1Image(data, AFFINE)
    hdr = img.header.as_byteswapped(">")
    be = nib.Nifti1Image(data, AFFINE, header=hdr)
    be.header.set_slope_inter(0.5, 3.0)
    path = tmp_path / "be.nii.gz"
    be.to_filename(path)
    ref = nib.load(path)
    assert ref.header.endianness == ">"
    expected = np.asanyarray(ref.dataobj)
    ours = np.stack(list(iter_volumes(path)), axis=-1)
    assert ours.dtype == expected.dtype
    np.testing.assert_array_equal(ours, expected)
    raw = np.stack(list(iter_volumes(path, scaled=False)), axis=-1)
    np.testing.assert_array_equal(raw, np.asanyarray(ref.dataobj.get_unscaled()))


def test_writer_is_deterministic(tmp_path: Path) -> None:
    data = _data()
    a = _write(tmp_path / "x" / "same.nii.gz", data)
    b = _write(tmp_path / "y" / "same.nii.gz", data)
    da, db = a.read_bytes(), b.read_bytes()
    assert hashlib.sha256(da).digest() == hashlib.sha256(db).digest()
    # gzip header: mtime 0 and no FNAME flag
    assert da[:2] == b"\x1f\x8b" and da[3] & 0x08 == 0 and da[4:8] == b"\0\0\0\0"


def test_writer_count_mismatch_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "short.nii.gz"
    data = _data(3)
    with pytest.raises(FormatError, match=r"2 volumes written, 3 declared"):
        with NiftiStreamWriter(target, SHAPE, AFFINE, np.int16, 3) as w:
            w.write(data[..., 0])
            w.write(data[..., 1])
    assert not target.exists() and not list(tmp_path.iterdir())
    with pytest.raises(FormatError, match=r"more than the declared 1"):
        with NiftiStreamWriter(target, SHAPE, AFFINE, np.int16, 1) as w:
            w.write(data[..., 0])
            w.write(data[..., 1])
    assert not list(tmp_path.iterdir())


def test_writer_refuses_values_its_dtype_cannot_hold(tmp_path: Path) -> None:
    target = tmp_path / "v.nii.gz"
    data = _data(2)
    exact = data[..., 0].astype(np.float64)  # integral floats are stored as they are
    for bad, what in ((exact + 0.5, "float64"), (exact + 70000, "float64")):
        with pytest.raises(UsageError, match=f"values of {what} not exact in int16"):
            with NiftiStreamWriter(target, SHAPE, AFFINE, np.int16, 2) as w:
                w.write(exact)
                w.write(bad)
        assert not list(tmp_path.iterdir())
    with NiftiStreamWriter(target, SHAPE, AFFINE, np.int16, 2) as w:
        w.write(exact)
        w.write(data[..., 1])
    np.testing.assert_array_equal(np.asarray(nib.load(target).dataobj), data)


def test_writer_error_in_body_removes_temporary(tmp_path: Path) -> None:
    target = tmp_path / "e.nii.gz"
    with pytest.raises(RuntimeError, match="boom"):
        with NiftiStreamWriter(target, SHAPE, AFFINE, np.int16, 2) as w:
            w.write(_data(1)[..., 0])
            raise RuntimeError("boom")
    assert not list(tmp_path.iterdir())


def test_writer_rejects_lossy_cast(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not exact"):
        with NiftiStreamWriter(tmp_path / "c.nii.gz", SHAPE, AFFINE, np.int16, 1) as w:
            w.write(np.full(SHAPE, 1.5))
    assert not list(tmp_path.iterdir())


BIG = (64, 64, 32)  # 256 KiB per int16 volume: larger than the decoder's read-ahead


def _write_big(path: Path, n: int, seed: int = 3) -> Path:
    rng = np.random.default_rng(seed)
    data = rng.integers(-30000, 30000, size=BIG + (n,), dtype=np.int16)  # incompressible
    with NiftiStreamWriter(path, BIG, AFFINE, np.int16, n, compresslevel=1) as w:
        for t in range(n):
            w.write(data[..., t])
    return path


def test_truncated_file_names_volume(tmp_path: Path) -> None:
    path = _write_big(tmp_path / "t.nii.gz", 6)
    raw = path.read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(raw[: int(len(raw) * 0.6)])  # damage inside volume 3
    got = []
    with pytest.raises(FormatError, match=r"cut\.nii\.gz.*truncated or corrupted in volume") as ei:
        for v in iter_volumes(cut):
            got.append(v)
    index = int(str(ei.value).split("in volume ")[1].split()[0])
    assert 1 <= index <= 3 and len(got) == index
    assert "of 6" in str(ei.value)


def test_missing_trailer_detected(tmp_path: Path) -> None:
    path = _write_big(tmp_path / "t.nii.gz", 4)
    cut = tmp_path / "notrailer.nii.gz"
    cut.write_bytes(path.read_bytes()[:-4])  # all data, no length field
    got = []
    # the decoder reads ahead: the missing trailer surfaces while reading the last volume
    with pytest.raises(FormatError, match=r"notrailer.*(in volume 3 of 4|end of the stream)"):
        for v in iter_volumes(cut):
            got.append(v)
    assert len(got) >= 3


def test_crc_mismatch_detected(tmp_path: Path) -> None:
    path = _write_big(tmp_path / "c.nii.gz", 4)
    raw = bytearray(path.read_bytes())
    raw[-8] ^= 0xFF  # CRC32 field of the gzip trailer
    bad = tmp_path / "crc.nii.gz"
    bad.write_bytes(bytes(raw))
    with pytest.raises(
        FormatError, match=r"crc\.nii\.gz.*(in volume 3 of 4|end of the stream).*CRC"
    ):
        list(iter_volumes(bad))
    # stopping early skips the check (documented): the first volumes still decode
    assert len(list(iter_volumes(bad, stop=1))) == 1


def test_small_file_corruption_detected(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.nii.gz", _data(2))
    raw = bytearray(path.read_bytes())
    raw[-8] ^= 0xFF
    bad = tmp_path / "small.nii.gz"
    bad.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match=r"small\.nii\.gz.*CRC"):
        list(iter_volumes(bad))


def test_bit_flip_detected(tmp_path: Path) -> None:
    data = _data(4)
    path = _write(tmp_path / "f.nii.gz", data)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    bad = tmp_path / "flip.nii.gz"
    bad.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match=r"flip\.nii\.gz.*(corrupted|truncated)"):
        list(iter_volumes(bad))


def test_short_data_in_valid_gzip(tmp_path: Path) -> None:
    good = _write(tmp_path / "g.nii.gz", _data(3))
    payload = gzip.decompress(good.read_bytes())
    short = tmp_path / "short.nii.gz"
    short.write_bytes(gzip.compress(payload[: len(payload) - 10], mtime=0))
    with pytest.raises(FormatError, match=r"short\.nii\.gz: data ends inside volume 2 of 3"):
        list(iter_volumes(short))


def test_check_betas_header(tmp_path: Path) -> None:
    good = _write(tmp_path / "ok.nii.gz", _data(2))
    hdr = check_betas_header(good, shape3d=SHAPE, affine=AFFINE)
    assert hdr.get_data_shape() == SHAPE + (2,)
    with pytest.raises(FormatError, match=r"expected data type int16, found float32"):
        check_betas_header(_nibabel_file(tmp_path / "f.nii.gz", _data(2).astype(np.float32)))
    with pytest.raises(FormatError, match=r"expected a 4D image, found shape \(7, 8, 9\)"):
        check_betas_header(_nibabel_file(tmp_path / "3d.nii.gz", _data(1)[..., 0]))
    with pytest.raises(FormatError, match=r"expected grid shape \(7, 8, 10\)"):
        check_betas_header(good, shape3d=(7, 8, 10))
    with pytest.raises(FormatError, match=r"expected affine"):
        check_betas_header(good, affine=np.eye(4))
    plain = tmp_path / "plain.nii.gz"
    plain.write_bytes(gzip.decompress(good.read_bytes()))
    with pytest.raises(FormatError, match=r"plain\.nii\.gz: not gzip-compressed"):
        check_betas_header(plain)
    with pytest.raises(MissingInputError, match=r"datalad get"):
        dangling = tmp_path / "absent.nii.gz"
        dangling.symlink_to(tmp_path / ".git" / "annex" / "objects" / "nope")
        read_header(dangling)


def test_reuse_buffer_yields_same_values(tmp_path: Path) -> None:
    data = _data(4, seed=5)
    path = _write(tmp_path / "r.nii.gz", data)
    copies = [v.copy() for v in iter_volumes(path, reuse_buffer=True)]
    assert len(copies) == 4
    for t, v in enumerate(copies):
        np.testing.assert_array_equal(v, data[..., t])
