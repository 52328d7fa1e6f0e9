"""Inputs from a mirror or a clone are data, never code, and never a memory bomb.

- a forged ``nsd_stim_info_merged.pkl`` whose unpickling runs code is never unpickled: the labels
  come from the CSV, and the pipeline's own readers of the labels table read its TSV sidecar;
- a COCO zip member that inflates beyond its declared size or the cap is refused while streaming;
- a NIfTI header that claims an impossible shape or offset is refused before anything is allocated,
  as a bad header (never with the advice to re-download).
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from nsdprep.core import nsd, tables
from nsdprep.core.errors import FormatError, MissingInputError, UsageError
from nsdprep.stages import labels as coco


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
    coco.build(merged_out=None, out=out / "crop.pkl", crop=True, **args)
    coco.build(merged_out=out / "ml.json", out=out / "legacy.pkl", legacy=True, **args)
    return {mode: out / f"{mode}.pkl" for mode in nsd.LABEL_MODES}


@pytest.mark.parametrize("mode", nsd.LABEL_MODES)
def test_sidecar_equals_the_pickled_table(label_tables: dict[str, Path], mode: str) -> None:
    pkl = label_tables[mode]
    sidecar = pkl.with_suffix(".tsv")
    assert tables.sidecar_path(pkl) == sidecar
    assert nsd.table_sidecar(nsd.labels_table_for(mode)) == nsd.labels_table_for(mode)[:-3] + "tsv"
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
        pkl = tmp_path / Path(nsd.labels_table_for(mode)).name
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
    import numpy as np

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
