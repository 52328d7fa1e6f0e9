"""Inputs from a mirror or a clone are data, never code, and never a memory bomb.

- a forged ``nsd_stim_info_merged.pkl`` whose unpickling runs code is never unpickled: the labels
  come from the CSV, and the pipeline's own readers of the labels table read its TSV sidecar;
- a COCO zip member that inflates beyond its declared size or the cap is refused while streaming;
- a NIfTI header that claims an impossible shape or offset is refused before anything is allocated,
  as a bad header (never with the advice to re-download).
"""

from __future__ import annotations

import gzip
import pickle
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nsdprep import pipeline
from nsdprep.core import nsd, tables
from nsdprep.core.errors import FormatError, HeaderError, MissingInputError, UsageError
from nsdprep.core.nifti import NiftiStreamWriter, check_betas_header, iter_volumes, read_header
from nsdprep.options import Options
from nsdprep.stages import labels as coco
from nsdprep.testing.measure import run_measured


def _forged_pickle(genuine: pd.DataFrame, marker: Path) -> bytes:
    """A pickle whose loading writes ``marker`` (pid and argv) and returns ``genuine``."""
    payload = pickle.dumps(genuine, protocol=5)
    expr = (
        f"(open({str(marker)!r}, 'w').write(repr((__import__('os').getpid(), "
        f"__import__('sys').argv))), __import__('pickle').loads({payload!r}))[1]"
    )

    class Forged:
        def __reduce__(self):  # noqa: ANN204 - the attack
            return (eval, (expr,))

    return pickle.dumps(Forged(), protocol=5)


# ------------------------------------------------------------------------------ no code from data


@pytest.mark.parametrize("entry", ["python", "cli"])
def test_forged_stim_info_pickle_runs_nothing_and_labels_stay_right(
    synth_copy: Path, tmp_path: Path, entry: str
) -> None:
    bucket = synth_copy / "nsd"
    zp = synth_copy / "coco/annotations" / nsd.COCO_ZIP_NAME
    pkl, csv = bucket / nsd.STIM_INFO_KEY, bucket / nsd.STIM_INFO_CSV_KEY
    want = coco.build(zp, pkl, tmp_path / "a.json", tmp_path / "a.pkl", stim_info_csv=csv)

    marker = tmp_path / "marker"
    genuine = pd.read_pickle(pkl)  # the synthetic table this test generated itself
    pkl.write_bytes(_forged_pickle(genuine, marker))
    # the forgery works: whoever unpickles it runs the code and gets the genuine table back
    probe = tmp_path / "probe"
    pd.testing.assert_frame_equal(pickle.loads(_forged_pickle(genuine, probe)), genuine)
    assert probe.exists()

    out = tmp_path / "b"
    if entry == "python":
        got = coco.build(zp, pkl, out / "m.json", out / "labels.pkl", stim_info_csv=csv)
        pd.testing.assert_frame_equal(got, want, check_exact=True)
    else:
        cmd = [sys.executable, "-m", "nsdprep", "coco", "--zip", str(zp), "--stim-info", str(pkl)]
        cmd += ["--stim-info-csv", str(csv), "--merged-out", str(out / "m.json")]
        cmd += ["--out", str(out / "labels.pkl")]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
    assert not marker.exists(), marker.read_text()
    assert (out / "labels.pkl").read_bytes() == (tmp_path / "a.pkl").read_bytes()
    assert (out / "m.json").read_bytes() == (tmp_path / "a.json").read_bytes()


def test_forged_pickle_alone_is_not_read(synth_copy: Path, tmp_path: Path) -> None:
    """With only ``--stim-info x.pkl``, the CSV beside it is read; the pickle never is."""
    bucket = synth_copy / "nsd"
    zp = synth_copy / "coco/annotations" / nsd.COCO_ZIP_NAME
    pkl = bucket / nsd.STIM_INFO_KEY
    want = coco.build(zp, pkl, tmp_path / "a.json", tmp_path / "a.pkl")
    marker = tmp_path / "marker"
    pkl.write_bytes(_forged_pickle(pd.read_pickle(pkl), marker))
    got = coco.build(zp, pkl, tmp_path / "b.json", tmp_path / "b.pkl")
    assert not marker.exists()
    pd.testing.assert_frame_equal(got, want, check_exact=True)


# ------------------------------------------------------------------- the labels table's sidecar


@pytest.fixture(scope="module")
def label_tables(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The labels table of every rule, built from the synthetic data: mode -> .pkl path."""
    out = tmp_path_factory.mktemp("tables")
    bucket = synth_root / "nsd"
    args = {
        "zip_path": synth_root / "coco/annotations" / nsd.COCO_ZIP_NAME,
        "stim_info": bucket / nsd.STIM_INFO_CSV_KEY,
        "expdesign": bucket / nsd.EXPDESIGN_KEY,
    }
    coco.build(merged_out=out / "m.json", out=out / "default.pkl", **args)
    coco.build(merged_out=None, out=out / "crop.pkl", labels="crop", **args)
    coco.build(merged_out=out / "ml.json", out=out / "legacy.pkl", labels="legacy", **args)
    return {mode: out / f"{mode}.pkl" for mode in nsd.LABEL_MODES}


@pytest.mark.parametrize("mode", nsd.LABEL_MODES)
def test_sidecar_equals_the_pickled_table(label_tables: dict[str, Path], mode: str) -> None:
    pkl = label_tables[mode]
    sidecar = pkl.with_suffix(".tsv")
    assert tables.sidecar_path(pkl) == sidecar
    table = pipeline.labels_table(Options(labels=mode))
    assert nsd.table_sidecar(table) == table[:-3] + "tsv"
    pickled = pd.read_pickle(pkl)  # written by this test run
    got = tables.read_table_tsv(sidecar)
    pd.testing.assert_frame_equal(got, pickled, check_exact=True)  # values, dtypes, index
    assert list(got.columns) == list(pickled.columns)
    for col in pickled.columns:  # types inside cells too: tuple vs list, 0 vs 0.0
        assert got[col].map(repr).tolist() == pickled[col].map(repr).tolist(), col
    assert {type(v) for v in got.get("cropBox", pd.Series([()]))} == {tuple}
    assert not list(pkl.parent.glob("*.part"))


def test_label_readers_never_unpickle(label_tables: dict[str, Path], tmp_path: Path) -> None:
    """A forged coco_categories.pkl beside a genuine sidecar: read, nothing runs."""
    from nsdprep.stages.curate.selection import load_labels

    for mode in nsd.LABEL_MODES:
        pkl = tmp_path / Path(pipeline.labels_table(Options(labels=mode))).name
        genuine = pd.read_pickle(label_tables[mode])
        tables.write_table_tsv(genuine, tables.sidecar_path(pkl))
        marker = tmp_path / f"marker-{mode}"
        pkl.write_bytes(_forged_pickle(genuine, marker))
        got = load_labels(pkl, legacy=mode == "legacy")
        assert not marker.exists(), marker.read_text()
        key = "id" if mode == "legacy" else "nsdId"
        assert got.index.tolist() == genuine[key].astype(int).tolist()
        assert got["supercat"].tolist() == genuine["supercat"].tolist()
        assert got["cat"].tolist() == genuine["cat"].tolist()


def test_missing_sidecar_is_named_not_unpickled(label_tables: dict[str, Path], tmp_path: Path):
    from nsdprep.stages.curate.selection import load_labels

    pkl = tmp_path / "coco_categories.pkl"
    marker = tmp_path / "marker"
    pkl.write_bytes(_forged_pickle(pd.read_pickle(label_tables["default"]), marker))
    with pytest.raises(MissingInputError, match=r"coco_categories\.tsv: missing .*never unpickled"):
        load_labels(pkl)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a\tb\nint64\tpickle\n1\t2\n", r"column 'b' has unknown type 'pickle'"),
        ("a\tb\nint64\tobject\n1\t2\t3\n", r"line 3 has 3 cells, the header 2"),
        ("a\nint64\n1.5\n", r"column 'a': type int64 but a cell holds 1.5"),
        ("a\nobject\n" + "[" * 100_000 + "]" * 100_000 + "\n", r"line 3 is not 1 JSON cells"),
        ("a\nint64\n1", r"truncated or not a table TSV"),
        ("a\ttuple\nint64\n[1]\n", r"2 column names .* need as many types"),
    ],
)
def test_a_hostile_sidecar_is_refused_in_one_line(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "t.tsv"
    p.write_text(text)
    with pytest.raises(FormatError, match=message) as info:
        tables.read_table_tsv(p)
    assert "\n" not in str(info.value)


def test_what_the_sidecar_cannot_hold_is_refused_on_writing(tmp_path: Path) -> None:
    for table, message in [
        (pd.DataFrame({"a": [[(1, 2)]]}), r"column 'a'.*tuple \(1, 2\), not a JSON value"),
        (
            pd.DataFrame({"a": [np.float64(1.5)]}, dtype=object),
            r"float64 np\.float64\(1\.5\), not a JSON",
        ),
        (pd.DataFrame({"a": [1]}, index=[5]), "indexed 0..n-1"),
        (pd.DataFrame({"a\tb": [1]}), "one-line string"),
        (pd.DataFrame({"a": pd.to_datetime(["2020-01-01"])}), "which the TSV cannot hold"),
    ]:
        with pytest.raises(UsageError, match=message):
            tables.write_table_tsv(table, tmp_path / "t.tsv")
        assert not (tmp_path / "t.tsv").exists()


# ------------------------------------------------------------------------ bounded decompression

TRAIN, VAL = "annotations/instances_train2017.json", "annotations/instances_val2017.json"
BOMB_PAD = 2_200_000_000  # inflates to ~2.2 GB (just above the 2 GiB default cap) from ~2.3 MB


def _deflate(text: bytes, pad: int = 0, block: int = 1 << 24) -> tuple[bytes, int, int]:
    """Raw deflate of ``text[:1] + b" " * pad + text[1:]``: ``(data, crc32, size)``, built fast.

    The padding is compressed once as one block, flushed to a byte boundary, and that block is
    repeated: in the middle of spaces it always inflates to the same spaces.
    """
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    if pad < 2 * block:
        data = c.compress(text[:1] + b" " * pad + text[1:]) + c.flush()
        return data, zlib.crc32(text[:1] + b" " * pad + text[1:]), len(text) + pad
    spaces = b" " * block
    head = c.compress(text[:1]) + c.compress(spaces) + c.flush(zlib.Z_SYNC_FLUSH)
    mid = c.compress(spaces) + c.flush(zlib.Z_SYNC_FLUSH)
    n_mid, rest = divmod(pad - block, block)
    last = c.compress(spaces[:rest]) + c.compress(text[1:]) + c.flush()
    crc = zlib.crc32(text[:1])
    for _ in range(n_mid + 1):
        crc = zlib.crc32(spaces, crc)
    crc = zlib.crc32(text[1:], zlib.crc32(spaces[:rest], crc))
    return head + mid * n_mid + last, crc, len(text) + pad


def _write_zip(path: Path, members: list[tuple[str, bytes, int, int]], method: int = 8) -> Path:
    """A zip of raw members ``(name, compressed data, crc32, declared size)``, written by hand
    so that the declared size can be anything."""
    out, central = bytearray(), bytearray()
    for name, data, crc, size in members:
        n = name.encode()
        offset = len(out)
        head = (20, 0, method, 0, 0x21, crc, len(data), size, len(n), 0)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, *head) + n + data
        entry = (20, 20, 0, method, 0, 0x21, crc, len(data), size, len(n), 0, 0, 0, 0, 0, offset)
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, *entry) + n
    n_members = len(members)
    end = (0, 0, n_members, n_members, len(central), len(out), 0)
    path.write_bytes(bytes(out + central + struct.pack("<IHHHHIIH", 0x06054B50, *end)))
    return path


def _genuine(synth_root: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(synth_root / "coco/annotations" / nsd.COCO_ZIP_NAME) as zf:
        return {TRAIN: zf.read(TRAIN), VAL: zf.read(VAL)}


@pytest.fixture(scope="module")
def bomb_zip(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The genuine synthetic instances, train padded with ~2.2 GB of spaces: valid JSON."""
    text = _genuine(synth_root)
    path = tmp_path_factory.mktemp("bomb") / nsd.COCO_ZIP_NAME
    return _write_zip(
        path, [(TRAIN, *_deflate(text[TRAIN], BOMB_PAD)), (VAL, *_deflate(text[VAL]))]
    )


def _run_coco(
    zip_path: Path, synth_root: Path, out: Path, *extra: str
) -> tuple[int, str, float, int]:
    """``python -m nsdprep coco`` in a child: (exit code, stderr, seconds, its own peak RSS)."""
    bucket = synth_root / "nsd"
    cmd = [sys.executable, "-m", "nsdprep", "coco", "--zip", str(zip_path)]
    cmd += ["--stim-info", str(bucket / nsd.STIM_INFO_CSV_KEY), "--merged-out", str(out / "m.json")]
    cmd += ["--out", str(out / "labels.pkl"), *extra]
    run = run_measured(cmd, capture=True)
    return run.returncode, run.stderr, run.seconds, run.peak_bytes


def test_zip_bomb_is_refused_quickly_in_little_memory(
    bomb_zip: Path, synth_root: Path, tmp_path: Path
) -> None:
    assert bomb_zip.stat().st_size < 2_500_000
    code, stderr, seconds, peak = _run_coco(bomb_zip, synth_root, tmp_path)
    print(f"bomb: exit {code} in {seconds:.1f} s, peak RSS {peak / 2**20:.0f} MiB: {stderr}")
    assert code == 2, stderr
    line = stderr.strip().splitlines()[-1]  # the error, one line (INFO lines before it)
    assert line.startswith("nsdprep coco: error: "), stderr
    assert f"{bomb_zip}:{TRAIN}" in line
    assert f"declares {BOMB_PAD + len(_genuine(synth_root)[TRAIN])} bytes" in line
    assert "2147483648 allowed" in line
    assert peak < 500 * 2**20
    assert seconds < 20
    assert not (tmp_path / "labels.pkl").exists()


def test_member_lying_about_its_size_is_caught_while_inflating(
    synth_root: Path, tmp_path: Path
) -> None:
    text = _genuine(synth_root)
    data, crc, _ = _deflate(text[TRAIN], BOMB_PAD)
    declared = len(text[TRAIN])  # a small size, while the data inflate to ~2.2 GB
    liar = _write_zip(
        tmp_path / "liar.zip", [(TRAIN, data, crc, declared), (VAL, *_deflate(text[VAL]))]
    )
    code, stderr, seconds, peak = _run_coco(liar, synth_root, tmp_path)
    print(f"liar: exit {code} in {seconds:.1f} s, peak RSS {peak / 2**20:.0f} MiB: {stderr}")
    assert code == 2, stderr
    line = stderr.strip().splitlines()[-1]  # the error, one line (INFO lines before it)
    assert line.startswith("nsdprep coco: error: "), stderr
    assert f"{liar}:{TRAIN}" in line and f"declared {declared} bytes" in line
    assert "2147483648 allowed" in line
    assert peak < 500 * 2**20


def test_the_cap_is_a_keyword(synth_root: Path, tmp_path: Path) -> None:
    zp = synth_root / "coco/annotations" / nsd.COCO_ZIP_NAME
    size = len(_genuine(synth_root)[TRAIN])
    with pytest.raises(FormatError, match=rf"{TRAIN} declares {size} bytes .* 500000 allowed"):
        coco.instances_members(zp, max_bytes=500_000)
    bucket = synth_root / "nsd"
    with pytest.raises(FormatError, match=rf"{TRAIN} declares {size} bytes .* 524288 allowed"):
        coco.build(zp, bucket / nsd.STIM_INFO_CSV_KEY, tmp_path / "m.json", tmp_path / "o.pkl",
                   max_json_mb=0.5)  # fmt: skip
    assert coco.instances_members(zp, max_bytes=size) == {"train2017": TRAIN, "val2017": VAL}


def test_json_that_would_explode_in_memory_is_refused_before_parsing(
    synth_root: Path, tmp_path: Path
) -> None:
    """~24 MB of ``[[],[],...]`` would take ~500 MB as Python objects (20x its size)."""
    dense = b'{"images":[],"annotations":[' + b"[]," * 8_000_000 + b'[]],"categories":[]}'
    text = _genuine(synth_root)
    zp = _write_zip(
        tmp_path / "dense.zip", [(TRAIN, *_deflate(dense)), (VAL, *_deflate(text[VAL]))]
    )
    pattern = rf"{TRAIN}: \d+ JSON values in {len(dense)} bytes would take about \d+ MiB once"
    with pytest.raises(FormatError, match=pattern):
        coco.read_instances(zp)


def test_deeply_nested_json_is_a_format_error(synth_root: Path, tmp_path: Path) -> None:
    deep = b'{"images":' + b"[" * 5000 + b"]" * 5000 + b',"annotations":[],"categories":[]}'
    deep += b" " * 100_000  # few values for its size: passes the memory estimate
    text = _genuine(synth_root)
    zp = _write_zip(tmp_path / "deep.zip", [(TRAIN, *_deflate(deep)), (VAL, *_deflate(text[VAL]))])
    with pytest.raises(FormatError, match=rf"{TRAIN} is not valid JSON \(nested too deeply"):
        coco.read_instances(zp)


def test_only_deflate_or_stored_members_are_inflated(synth_root: Path, tmp_path: Path) -> None:
    """bzip2 and lzma inflate a whole read at once: they cannot be bounded while streaming."""
    zp = tmp_path / "bz.zip"
    with zipfile.ZipFile(zp, "w", zipfile.ZIP_BZIP2) as zf:
        for name, text in _genuine(synth_root).items():
            zf.writestr(name, text)
    with pytest.raises(FormatError, match=rf"{TRAIN} is compressed with method 12; only deflate"):
        coco.instances_members(zp)


def test_the_inflate_counter_stops_a_reader_that_gives_more_than_declared(
    synth_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """zipfile itself stops at the declared size; the count does not rely on it."""
    import io

    from nsdprep.stages.labels import instances

    zp = synth_root / "coco/annotations" / nsd.COCO_ZIP_NAME
    with zipfile.ZipFile(zp) as zf:
        info = zf.getinfo(TRAIN)
        monkeypatch.setattr(zf, "open", lambda *a, **k: io.BytesIO(b" " * (info.file_size + 1)))
        with pytest.raises(FormatError, match=rf"{TRAIN} does not inflate to its declared"):
            instances._inflate_text(zf, info, f"{zp}:{TRAIN}", 1 << 30)


# ------------------------------------------------------------------------- NIfTI header sanity

NII_SHAPE = (23, 27, 21)  # a small grid over occipital cortex (as in test_resample)
NII_AFFINE = np.array([[-1.0, 0, 0, 22], [0, 1, 0, -90], [0, 0, 1, 0], [0, 0, 0, 1]])


def _betas_file(path: Path, n: int = 2, *, zeros: bool = False) -> Path:
    rng = np.random.default_rng(0)
    data = (
        np.zeros(NII_SHAPE + (n,), np.int16)
        if zeros
        else (rng.normal(0, 300, size=NII_SHAPE + (n,)).round().astype(np.int16))
    )
    with NiftiStreamWriter(path, NII_SHAPE, NII_AFFINE, np.int16, n) as w:
        for t in range(n):
            w.write(data[..., t])
    return path


def _patched(
    src: Path, dst: Path, *, dims: tuple[int, ...] | None = None, vox_offset: float | None = None
) -> Path:
    """``src`` with header fields overwritten in place (the data left as they are)."""
    raw = bytearray(gzip.decompress(src.read_bytes()))
    if dims is not None:
        raw[40:56] = struct.pack("<8h", len(dims), *dims, *[1] * (7 - len(dims)))
    if vox_offset is not None:
        raw[108:112] = struct.pack("<f", vox_offset)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(gzip.compress(bytes(raw), mtime=0))
    return dst


HUGE = (32767, 32767, 32767, 30)


def _assert_bad_header(exc: BaseException, path: Path, claim: str) -> None:
    text = str(exc)
    assert isinstance(exc, HeaderError), repr(exc)
    assert isinstance(exc, FormatError)
    assert "\n" not in text and str(path) in text and claim in text, text
    assert "repair" not in text and "truncated" not in text, text


@pytest.mark.parametrize(
    ("fields", "claim"),
    [({"dims": HUGE}, "shape (32767, 32767, 32767, 30)"), ({"vox_offset": 1e12}, "offset 1e+12")],
)
def test_an_impossible_header_is_refused_before_allocating(
    tmp_path: Path, fields: dict, claim: str
) -> None:
    from nsdprep.stages.resample import resample_session

    bad = _patched(_betas_file(tmp_path / "ok.nii.gz"), tmp_path / "betas_bad.nii.gz", **fields)
    for call in (read_header, check_betas_header, lambda p: list(iter_volumes(p))):
        with pytest.raises(FormatError) as info:
            call(bad)
        _assert_bad_header(info.value, bad, claim)
    dst = tmp_path / "out" / "o.nii.gz"
    with pytest.raises(FormatError) as info:
        resample_session(bad, dst)
    _assert_bad_header(info.value, bad, claim)
    assert not dst.exists()


@pytest.mark.parametrize(
    ("fields", "claim"),
    [({"dims": HUGE}, "shape (32767, 32767, 32767, 30)"), ({"vox_offset": 1e12}, "offset 1e+12")],
)
def test_the_resample_stage_reports_a_bad_header_in_one_line(
    tmp_path: Path, git_env: dict[str, str], fields: dict, claim: str
) -> None:
    nsd_ds = tmp_path / "inputs" / "nsd"
    good = _betas_file(tmp_path / "ok.nii.gz")
    bad = _patched(good, nsd_ds / nsd.betas_key(1, 1), **fields)
    subprocess.run(["git", "init", "-q", str(nsd_ds)], check=True)
    subprocess.run(["git", "-C", str(nsd_ds), "add", "."], check=True)
    cmd = [sys.executable, "-m", "nsdprep", "resample", "--nsd", str(nsd_ds), "--subject", "1"]
    t0 = time.monotonic()
    proc = subprocess.run(
        [*cmd, "--out", str(tmp_path / "out"), "--no-progress"], capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("nsdprep resample: error: "), proc.stderr
    assert str(bad) in line and claim in line and "bad NIfTI header" in line, line
    assert "repair" not in proc.stderr and "MemoryError" not in proc.stderr
    assert time.monotonic() - t0 < 30
    assert not list((tmp_path / "out").glob("*.nii.gz"))


def test_a_header_the_file_cannot_hold_is_bad_when_the_stream_is_intact(tmp_path: Path) -> None:
    """Within the caps, but more data than any deflate stream of this size can hold."""
    src = _betas_file(tmp_path / "ok.nii.gz")
    dims = (512, 512, 512, 200)  # 53 GB of int16 claimed by a ~9 KB file
    bad = _patched(src, tmp_path / "short.nii.gz", dims=dims)
    with pytest.raises(FormatError) as info:
        read_header(bad)
    _assert_bad_header(info.value, bad, "shape (512, 512, 512, 200)")
    assert "inflates to only" in str(info.value)
    # within what the file could hold: the intact stream ends early while streaming
    short = tmp_path / "short10.nii.gz"
    short.write_bytes(gzip.compress(gzip.decompress(src.read_bytes())[:-10], mtime=0))
    with pytest.raises(FormatError, match="data ends inside volume 1 of 2") as info:
        list(iter_volumes(short))
    _assert_bad_header(info.value, short, "shape (23, 27, 21, 2)")


def test_a_cut_file_is_damaged_content_and_keeps_the_repair_advice(tmp_path: Path) -> None:
    """The same 'more than the file can hold', from a file cut short: a damaged download."""
    src = _betas_file(tmp_path / "zeros.nii.gz", n=600, zeros=True)  # 15.6 MB in ~16 KB
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(src.read_bytes()[:2000])  # 2000 x 1032 bytes < what the header claims
    with pytest.raises(FormatError) as info:
        read_header(cut)
    assert not isinstance(info.value, HeaderError)
    assert "truncated or corrupted" in str(info.value) and "make repair" in str(info.value)
    # and a cut file that could still hold its data fails while streaming, as before
    mid = tmp_path / "mid.nii.gz"
    mid.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(FormatError, match="truncated or corrupted.*make repair") as info:
        list(iter_volumes(mid))
    assert not isinstance(info.value, HeaderError)


def test_load_curated_checks_the_mask_header(tmp_path: Path) -> None:
    from nsdprep.load import load_curated

    folder = tmp_path / nsd.CURATED_DIR
    files = nsd.curated_files(1, folder)
    folder.mkdir(parents=True)
    for p in (files.matrix, files.labels, files.runs, files.trials):
        p.write_bytes(b"")
    _patched(_betas_file(tmp_path / "m.nii.gz", n=1), files.mask, dims=(32767, 32767, 32767))
    with pytest.raises(FormatError) as info:
        load_curated(1, dataset=tmp_path)
    _assert_bad_header(info.value, files.mask, "shape (32767, 32767, 32767)")
