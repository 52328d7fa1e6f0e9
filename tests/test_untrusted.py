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

from nsdprep.core import nsd
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
