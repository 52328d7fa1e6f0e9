"""Write a 12-row NSD stim-info fixture with whatever pandas runs this script.

Meant to be run in a side environment with an OLD pandas (see README.md in this folder), never with
the project's own venv:

    python make_fixture.py OUTDIR          # writes OUTDIR/nsd_stim_info_merged.pkl and .csv
    python make_fixture.py OUTDIR --no-csv # the pickle only

The table has the NSD columns in the order of the NSD data manual (cocoId, cocoSplit, cropBox, loss,
nsdId, flagged, BOLD5000, shared1000, subject1..subject8, subject1_rep0 .. subject8_rep2) and a
default RangeIndex; row i has nsdId i. All values come from Python's own Mersenne Twister
(``random.Random(SEED).getrandbits``, the same stream in Python 2.7 and 3.x), so every
Python/numpy/pandas combination writes the same values. The script runs on Python 2.7 and 3.6+.

The pickle is ``DataFrame.to_pickle`` with that pandas's default protocol. The CSV is
``DataFrame.to_csv`` with the defaults (index written as a leading unnamed column, booleans as
True/False, each cropBox tuple as its ``str()``, e.g. "(0, 0, 0.1671875, 0.1671875)"), which is how
the released ``nsd_stim_info_merged.csv`` reads (``pd.read_csv(path, index_col=0)``).
"""

# ruff: noqa: UP010, UP031  -- this script must also run on Python 2.7 (see README.md)
from __future__ import division, print_function

import os
import pickle
import random
import sys

import numpy as np
import pandas as pd

SEED = 20190701
N = 12
N_SUBJECTS = 8
TRIALS = 30000  # trial ids are 1-based, 1..30000 (NSD design)
SHARED_ROWS = (2, 5, 9)  # shown to all 8 subjects
# (width, height) of the source COCO image; cropping is along the longer side only, so a cropBox
# (top, bottom, left, right) has two 0s (the manual); a square image has four.
SIZES = [
    (640, 426),
    (640, 480),
    (480, 640),
    (640, 427),
    (500, 375),
    (427, 640),
    (640, 640),
    (640, 480),
    (612, 612),
    (375, 500),
    (640, 428),
    (640, 360),
]


def below(rng, n):
    """Uniform integer in [0, n): rejection sampling on getrandbits (no randrange: it differs
    between Python 2 and 3)."""
    k = int(n).bit_length()
    r = rng.getrandbits(k)
    while r >= n:
        r = rng.getrandbits(k)
    return r


def crop_box(rng, width, height):
    """(top, bottom, left, right) as fractions of the image size, zeros as int 0."""
    if width == height:
        return (0, 0, 0, 0)
    long_side, short_side = max(width, height), min(width, height)
    extra = long_side - short_side
    first = extra // 2 if below(rng, 3) == 0 else 1 + below(rng, extra - 1)
    pair = (first / long_side, (extra - first) / long_side)
    return (0, 0) + pair if width > height else pair + (0, 0)


def build():
    rng = random.Random(SEED)
    coco_ids = []
    while len(coco_ids) < N:
        cid = 1 + below(rng, 581929)
        if cid not in coco_ids:
            coco_ids.append(cid)
    splits = ["val2017" if k in (3, 8) else "train2017" for k in range(N)]
    crops = [(0, 0, 0.1671875, 0.1671875)]  # 640x426 cut to 426x426, 107 px off each side
    crops += [crop_box(rng, w, h) for (w, h) in SIZES[1:]]
    losses = [0.0 if k == 6 else (1 + below(rng, 10**6 - 1)) / 2.0**21 for k in range(N)]

    seen = np.zeros((N, N_SUBJECTS), dtype=np.int64)
    reps = np.zeros((N, N_SUBJECTS, 3), dtype=np.int64)
    used = [set() for _ in range(N_SUBJECTS)]
    for row in range(N):
        subjects = range(N_SUBJECTS) if row in SHARED_ROWS else [below(rng, N_SUBJECTS)]
        for s in subjects:
            seen[row, s] = 1
            trials = set()
            while len(trials) < 3:
                t = 1 + below(rng, TRIALS)
                if t not in used[s]:
                    trials.add(t)
            used[s] |= trials
            reps[row, s, :] = sorted(trials)

    names = (
        ["cocoId", "cocoSplit", "cropBox", "loss", "nsdId", "flagged", "BOLD5000", "shared1000"]
        + ["subject%d" % (s + 1) for s in range(N_SUBJECTS)]
        + ["subject%d_rep%d" % (s + 1, r) for s in range(N_SUBJECTS) for r in range(3)]
    )
    columns = {
        "cocoId": np.array(coco_ids, dtype=np.int64),
        "cocoSplit": np.array(splits, dtype=object),
        "cropBox": None,  # set below: an object column of tuples
        "loss": np.array(losses, dtype=np.float64),
        "nsdId": np.arange(N, dtype=np.int64),
        "flagged": np.array([k == 7 for k in range(N)], dtype=bool),
        "BOLD5000": np.array([k in (1, 5) for k in range(N)], dtype=bool),
        "shared1000": np.array([k in SHARED_ROWS for k in range(N)], dtype=bool),
    }
    for s in range(N_SUBJECTS):
        columns["subject%d" % (s + 1)] = seen[:, s].copy()
    for s in range(N_SUBJECTS):
        for r in range(3):
            columns["subject%d_rep%d" % (s + 1, r)] = reps[:, s, r].copy()
    box = np.empty(N, dtype=object)
    for k, c in enumerate(crops):
        box[k] = c
    columns["cropBox"] = box
    df = pd.DataFrame(columns, columns=names)
    assert list(df.columns) == names
    assert list(df.index) == list(range(N))
    return df


def main(argv):
    if not argv or argv[0].startswith("-"):
        sys.exit("usage: make_fixture.py OUTDIR [--no-csv]")
    outdir = argv[0]
    if not os.path.isdir(outdir):
        os.makedirs(outdir)
    df = build()
    pkl = os.path.join(outdir, "nsd_stim_info_merged.pkl")
    df.to_pickle(pkl)
    print(
        "python %s, pandas %s, numpy %s, pickle.HIGHEST_PROTOCOL %d"
        % (sys.version.split()[0], pd.__version__, np.__version__, pickle.HIGHEST_PROTOCOL)
    )
    print(
        "wrote %s (%d bytes, pickle protocol %d)"
        % (pkl, os.path.getsize(pkl), bytearray(open(pkl, "rb").read(2))[1])
    )
    if "--no-csv" not in argv:
        csv = os.path.join(outdir, "nsd_stim_info_merged.csv")
        df.to_csv(csv)
        print("wrote %s (%d bytes)" % (csv, os.path.getsize(csv)))


if __name__ == "__main__":
    main(sys.argv[1:])
