"""What ``make curated`` writes about itself: ``dataset_description.json`` and ``README.md``.

Both are built from the selection and the grid only (no clock, no host), so a rerun writes the same
bytes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from nsdprep.core import nsd, provenance, tables
from nsdprep.core.nsd import TRIAL_COLUMNS
from nsdprep.stages.curate.selection import Selection

#: ``grid`` below is a :class:`nsdprep.stages.curate.Grid` (not imported: this module sits below the stage
#: that calls it).
Grid = Any


def description(
    sel: Selection,
    grid: Grid,
    labels: str | os.PathLike[str],
    expdesign: str | os.PathLike[str],
    legacy: bool,
    command: str,
    validity: dict[int, Any] | None = None,
    valid: bool = False,
) -> dict:
    """The machine-readable provenance, selection and counts (BIDS ``dataset_description.json``).

    ``validity`` maps subject -> :class:`nsdprep.stages.curate.ValidVoxels` (subjects written by this run);
    ``valid``: the data were restricted to those voxels (``--valid``).
    """
    label_counts = {
        nsd.bids_subject_label(s): {
            str(k): int(v) for k, v in df["supercat"].value_counts().sort_index().items()
        }
        for s, df in sorted(sel.trials.items())
    }
    lay = sel.layout
    rules = [
        "N = fewest sessions registered in inputs/nsd (over all registered subjects) x "
        "trials per session; keep the first N trials of every subject",
        "drop trials whose picture is labelled 'unknown'",
        "equalize: subjects with more trials drop their earliest 'person' trials",
    ]
    if valid:
        rules.append(
            "voxels: grey matter valid in every session used (valid_sessionNN.nii.gz, nearest "
            "neighbour to 3 mm); all other voxels are 0; the mask is sub-XX_mask.nii.gz"
        )
    desc = {
        "Name": "NSD single-trial betas, 3 mm, equalized trials with COCO supercategory labels"
        + (" (legacy labels)" if legacy else ""),
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [
            {
                "Name": "nsdprep curate",
                "Version": provenance.VERSION,
                "Command": command,
                "Dependencies": provenance.versions(
                    "numpy", "pandas", "nibabel", "scipy", python=True
                ),
            }
        ],
        "SourceDatasets": [
            {"Path": "inputs/nsd", "Description": "Natural Scenes Dataset (registered files)"},
            {
                "Path": "derivatives/3mm",
                "Description": "3 mm grey-matter masked single-trial betas",
            },
            {  # the file read: the table's TSV sidecar (the pickle is never read)
                "Path": tables.sidecar_path(labels).name,
                "Sha256": provenance.sha256(tables.sidecar_path(labels)),
                "Description": "legacy labels table (keyed by 1-based 73k id)"
                if legacy
                else "labels table (keyed by nsdId)",
            },
            {"Path": Path(expdesign).name, "Sha256": provenance.sha256(expdesign)},
        ],
        "Layout": {
            "RunsPerSession": lay.runs_per_session,
            "TrialsPerRun": list(lay.trials_per_run),
            "TrialsPerSession": lay.trials_per_session,
        },
        "Grid": {
            "Shape": list(grid.shape),
            "Affine": [[float(x) for x in row] for row in np.asarray(grid.affine)],
            "Dtype": str(grid.dtype),
        },
        "Selection": {
            "Rules": rules,
            "RegisteredSessions": {
                nsd.subject_label(s): len(v) for s, v in sorted(sel.registered_sessions.items())
            },
            "SessionsUsed": sel.n_sessions,
            "CandidateTrialsPerSubject": sel.n_trials,
            "UnknownDropped": {
                nsd.bids_subject_label(s): v for s, v in sorted(sel.n_unknown.items())
            },
            "PersonDropped": {
                nsd.bids_subject_label(s): v for s, v in sorted(sel.n_person_dropped.items())
            },
            "TrialsPerSubject": sel.trials_per_subject,
        },
        "Counts": {
            "Trials": {
                nsd.bids_subject_label(s): int(df.shape[0]) for s, df in sorted(sel.trials.items())
            },
            "Labels": label_counts,
        },
    }
    if sel.n_label_changed:
        desc["Counts"]["LabelChangedFromDefault"] = {
            nsd.bids_subject_label(s): v for s, v in sorted(sel.n_label_changed.items())
        }
    if validity:
        desc["ValidVoxels"] = {
            "Applied": valid,
            "Rule": "a 3 mm grey-matter voxel is valid when NSD's valid_sessionNN.nii.gz (nearest "
            "neighbour to 3 mm) marks it in every session used",
            "PerSubject": {
                nsd.bids_subject_label(s): {
                    "SessionsChecked": len(v.sessions),
                    "SessionsWithoutMask": list(v.missing),
                    "GreyMatterVoxels": v.n_grey_matter,
                    "InvalidInAnySession": v.n_invalid,
                    "FractionInvalid": None
                    if v.fraction_invalid is None
                    else round(v.fraction_invalid, 6),
                    "VoxelsKept": int(v.mask().sum()) if valid else None,
                }
                for s, v in sorted(validity.items())
            },
        }
    return desc


def readme(sel: Selection, desc: dict, out: Path) -> str:
    """The folder's README: files, selection rules and counts per subject, in words."""
    subs = [nsd.bids_subject_label(s) for s in sorted(sel.trials)]
    present = sorted(
        f"sub-{m[1]}" for p in out.iterdir() if (m := nsd.CURATED_BETAS_RE.match(p.name))
    )
    labels = sorted({k for counts in desc["Counts"]["Labels"].values() for k in counts})
    lay = sel.layout
    lines = [
        f"# {desc['Name']}",
        "",
        "Made by `nsdprep curate` (recorded with `datalad run`; reproduce with `datalad rerun`):",
        "",
        "```",
        desc["GeneratedBy"][0]["Command"],
        "```",
        "",
        "## Files (per subject `sub-XX`, mapped from NSD's `subjXX` by number)",
        "",
        "- `sub-XX.nii.gz`: kept trials' 3 mm single-trial betas (int16, beta x 300), one volume per "
        "trial, in trial order (sessions ascending, trials in file order).",
        "- `sub-XX_labels.npy`: COCO supercategory of each kept trial (unicode array; "
        "`np.load(f)` with no pickle).",
        f"- `sub-XX_runs.npy`: run of each kept trial across the experiment, "
        f"`(session - 1) * {lay.runs_per_session} + run_in_session` (1-based).",
        "- `sub-XX_trials.tsv`: one row per kept trial: "
        + ", ".join(f"`{c}`" for c in TRIAL_COLUMNS)
        + " (`trial`, `trial_in_session`, `session`, runs: 1-based; `nsdId`: 0-based).",
        "- `sub-XX_X.npy`: the same trials as a trials x voxels int16 matrix (rows in trial order, "
        "columns = the voxels of `sub-XX_mask.nii.gz` in C order of (i, j, k)); open it with "
        "`numpy.load(f, mmap_mode='r')` or `nsdprep.load_curated(XX)`: any trial is one read, "
        "nothing is decompressed. For a real subject (about 22.3k kept trials x about 64k "
        "grey-matter voxels) it is about 2.9 GB, against about 12.8 GB decompressed for the 4D "
        "file, which must be read from its first byte.",
        "- `sub-XX_mask.nii.gz`: the 3 mm mask of the matrix columns (uint8 0/1): grey matter as "
        "the 3 mm stage applied it; with `make curated VALID=1` only the grey-matter voxels valid "
        "in every session used (the others are 0 in `sub-XX.nii.gz` too). `make decode` uses it.",
        "- `dataset_description.json`: provenance, selection and counts (machine readable).",
        "",
        f"Subjects with files in this directory: {', '.join(present) if present else 'none'}.",
        "",
        "## Selection",
        "",
        f"Layout: {lay.runs_per_session} runs per session, {lay.trials_per_run[0]} trials in odd runs, "
        f"{lay.trials_per_run[1]} in even runs = {lay.trials_per_session} trials per session.",
        "",
        f"1. N = {sel.n_sessions} sessions (fewest registered over all registered subjects) x "
        f"{lay.trials_per_session} = {sel.n_trials} candidate trials per subject.",
        "2. Trials whose picture is labelled `unknown` are dropped.",
        "3. Subjects with more trials drop their earliest `person` trials, so that every subject "
        f"keeps {sel.trials_per_subject} trials.",
        "",
        "Rules use all registered subjects, so a run on a subset of subjects writes the same files.",
        "",
        "## Counts",
        "",
        "| subject | registered sessions | unknown dropped | person dropped | kept | "
        + " | ".join(labels)
        + " |",
        "|" + "---|" * (5 + len(labels)),
    ]
    for s, bids in zip(sorted(sel.trials), subs, strict=True):
        counts = desc["Counts"]["Labels"][bids]
        lines.append(
            f"| {bids} | {len(sel.registered_sessions[s])} | {sel.n_unknown[s]} | "
            f"{sel.n_person_dropped[s]} | {sel.trials[s].shape[0]} | "
            + " | ".join(str(counts.get(k, 0)) for k in labels)
            + " |"
        )
    changed = desc["Counts"].get("LabelChangedFromDefault")
    if changed:
        lines += [
            "",
            "## Crop-aware labels",
            "",
            "Labels follow the crop rule: the largest annotation inside the square crop NSD "
            "showed (`cropBox`). Kept trials whose supercategory differs under the default rule "
            "(largest annotation on the whole picture):",
            "",
            "| subject | kept | label differs from default | % |",
            "|---|---|---|---|",
        ]
        for s in sorted(sel.trials):
            bids = nsd.bids_subject_label(s)
            kept = sel.trials[s].shape[0]
            n = changed.get(bids, 0)
            lines.append(f"| {bids} | {kept} | {n} | {100 * n / kept if kept else 0:.1f} |")
    lines += _valid_section(desc.get("ValidVoxels"))
    lines += [
        "",
        "## Versions",
        "",
        ", ".join(f"{k} {v}" for k, v in sorted(desc["GeneratedBy"][0]["Dependencies"].items())),
        "",
    ]
    return "\n".join(lines)


def _valid_section(valid: dict | None) -> list[str]:
    """README lines about NSD's valid-voxel masks (None: nothing to say)."""
    if not valid:
        return []
    applied = valid["Applied"]
    lines = [
        "",
        "## Valid voxels",
        "",
        "NSD stores voxels without valid data in a session as 0, which looks like a measurement. "
        + (
            "This folder keeps only grey-matter voxels valid in every session used (`VALID=1`); "
            "`sub-XX_mask.nii.gz` is the mask and every other voxel is 0."
            if applied
            else "This folder keeps every grey-matter voxel (`make curated VALID=1` keeps only "
            "those valid in every session used)."
        ),
        "",
        "| subject | sessions checked | grey-matter voxels | invalid in >= 1 session | fraction | "
        "voxels kept |",
        "|---|---|---|---|---|---|",
    ]
    for bids, v in valid["PerSubject"].items():
        frac = "n/a" if v["FractionInvalid"] is None else f"{v['FractionInvalid']:.4f}"
        bad = "n/a" if v["InvalidInAnySession"] is None else str(v["InvalidInAnySession"])
        if v["SessionsWithoutMask"]:
            bad += f" (no mask for session(s) {', '.join(map(str, v['SessionsWithoutMask']))})"
        kept = str(v["VoxelsKept"]) if applied else f"{v['GreyMatterVoxels']} (VALID=0)"
        lines.append(
            f"| {bids} | {v['SessionsChecked']} | {v['GreyMatterVoxels']} | {bad} | {frac} | "
            f"{kept} |"
        )
    return lines
