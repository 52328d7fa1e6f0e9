"""What ``make curated`` writes about itself: ``dataset_description.json`` and ``README.md``.

Both are built from the selection and the grid only (no clock, no host), so a rerun writes the same
bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nsdprep.core import nsd, provenance, tables
from nsdprep.core.nsd import AVERAGED_COLUMNS, TRIAL_COLUMNS
from nsdprep.stages.curate.selection import Selection

#: ``grid`` below is a :class:`nsdprep.stages.curate.Grid` (not imported: this module sits below the stage
#: that calls it).
Grid = Any


#: Why prepared values are float32 (README and dataset_description.json).
FLOAT32_WHY = (
    "float32, not int16 with a scale: z-scores and means of repeats are not whole numbers; at "
    "the resolution int16 allows over the z range (1/1000) the rounding alone moves a voxel's "
    "session mean and sd by about 1e-5, and a scale is one more thing a reader of the "
    "memory-mapped matrix must remember to apply. float32 keeps about 7 digits, memory-maps as "
    "it is, and costs twice the bytes of int16."
)
ZSCORE_RULE = (
    "each voxel is z-scored within each session over all that session's trials (before the "
    "selection drops any): z = (x - mean) / sd, mean and population sd (ddof 0) of the session's "
    "trials, computed in float64 from the int16 betas; a voxel that does not vary in a session "
    "gets z = 0 there"
)
AVERAGE_RULE = (
    "one row per image: the mean of its kept trials (after z-scoring when ZSCORE=session), in "
    "the order of each image's first kept trial; n_repeats = trials averaged"
)
ROI_RULE = (
    "NSD's MNI ROI volume (nsddata/ppdata/subjXX/MNI/roi/<roi>.nii.gz: -1 outside the brain, 0 "
    "not in the ROI, positive in it) resampled to the 3 mm grid by nearest neighbour; a voxel is "
    "kept when its value is positive and it is in the grey-matter mask (with VALID=1: grey matter "
    "valid in every session used)"
)
SPLIT_RULE = (
    "test: the row's image is one of the shared images (sharedix in nsd_expdesign.mat, 1-based "
    "73k ids; checked equal to the shared1000 column of nsd_stim_info_merged.csv); train: every "
    "other row. All rows of an image are on the same side."
)


@dataclass(frozen=True)
class Preparation:
    """The preparation options of a curated folder and what they gave per subject."""

    zscore: str = "none"
    average: bool = False
    roi: str = ""
    max_session: int = 0
    #: subject -> :class:`nsdprep.stages.curate.RoiVoxels`
    rois: dict[int, Any] = field(default_factory=dict)
    #: subject -> :class:`nsdprep.stages.curate.prepare.Prepared`
    prepared: dict[int, Any] = field(default_factory=dict)

    @property
    def is_float(self) -> bool:
        """The values are float32 (z-scored or averaged), not NSD's int16."""
        return self.zscore != "none" or self.average

    def words(self) -> list[str]:
        """What was done, for the dataset's name."""
        out = ["z-scored per session"] if self.zscore == "session" else []
        out += ["averaged per image"] if self.average else []
        out += [f"ROI {self.roi}"] if self.roi else []
        out += [f"sessions 1..{self.max_session} at most"] if self.max_session else []
        return out


def description(
    sel: Selection,
    grid: Grid,
    labels: str | os.PathLike[str],
    expdesign: str | os.PathLike[str],
    legacy: bool,
    command: str,
    validity: dict[int, Any] | None = None,
    valid: bool = False,
    prep: Preparation | None = None,
) -> dict:
    """The machine-readable provenance, selection and counts (BIDS ``dataset_description.json``).

    ``validity`` maps subject -> :class:`nsdprep.stages.curate.ValidVoxels` (subjects written by this run);
    ``valid``: the data were restricted to those voxels (``--valid``); ``prep``: the preparation.
    """
    prep = prep or Preparation()
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
    if sel.max_session:
        rules[0] += f", at most MAX_SESSION = {sel.max_session} sessions"
    if prep.roi:
        rules.append("voxels: " + ROI_RULE.replace("<roi>", prep.roi))
    if prep.zscore == "session":
        rules.append("values: " + ZSCORE_RULE)
    if prep.average:
        rules.append("rows: " + AVERAGE_RULE)
    words = prep.words()
    desc = {
        "Name": "NSD single-trial betas, 3 mm, equalized trials with COCO supercategory labels"
        + (" (legacy labels)" if legacy else "")
        + (f"; {', '.join(words)}" if words else ""),
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
            "MaxSession": sel.max_session,
            "FewestRegisteredSessions": sel.fewest_registered,
        },
        "Sessions": {
            "Rule": "Every subject's output is made from its sessions 1..N (N = SessionsUsed); "
            f"the late-released sessions are the last {nsd.LATE_RELEASED} of each subject's "
            "NSD sessions (40, 40, 32, 30, 40, 32, 40, 30 for subj01..subj08), released in 2023",
            "PerSubject": {
                nsd.bids_subject_label(s): {
                    "Used": list(sel.sessions_used),
                    "LateReleased": list(nsd.late_sessions(s)),
                    "LateReleasedUsed": bool(set(nsd.late_sessions(s)) & set(sel.sessions_used)),
                }
                for s in sorted(sel.trials)
            },
        },
        "Split": {
            "Rule": SPLIT_RULE,
            "SharedImages": int(sel.shared.size),
            "Rows": {
                nsd.bids_subject_label(s): _split_rows(sel, prep, s) for s in sorted(sel.trials)
            },
        },
        "Preparation": {
            "ZScore": prep.zscore,
            "Average": prep.average,
            "ROI": prep.roi or None,
            "Values": {
                "Dtype": "float32" if prep.is_float else "int16",
                "Units": "z-score" if prep.zscore == "session" else "beta (% signal change) x 300",
                "Why": FLOAT32_WHY if prep.is_float else "NSD's int16 betas, unchanged",
            },
        },
        "Counts": {
            "Trials": {
                nsd.bids_subject_label(s): int(df.shape[0]) for s, df in sorted(sel.trials.items())
            },
            "Labels": label_counts,
        },
    }
    if prep.zscore == "session":
        desc["Preparation"]["ZScoreRule"] = ZSCORE_RULE
        desc["Preparation"]["ConstantVoxelSessions"] = {
            nsd.bids_subject_label(s): p.n_constant for s, p in sorted(prep.prepared.items())
        }
    if prep.average:
        desc["Preparation"]["AverageRule"] = AVERAGE_RULE
        desc["Counts"]["AveragedRows"] = {
            nsd.bids_subject_label(s): len(_rows(sel, prep, s)) for s in sorted(sel.trials)
        }
    if prep.roi:
        desc["Preparation"]["ROIRule"] = ROI_RULE.replace("<roi>", prep.roi)
        desc["Preparation"]["ROIVoxels"] = {
            nsd.bids_subject_label(s): {"InROI": r.n_roi, "Kept": r.n_kept}
            for s, r in sorted(prep.rois.items())
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


def _rows(sel: Selection, prep: Preparation, subject: int) -> Any:
    """One subject's rows: the kept trials' table, or the images' table when averaged."""
    from nsdprep.stages.curate.prepare import averaged_table

    trials = sel.trials[subject]
    return averaged_table(trials)[0] if prep.average else trials


def _split_rows(sel: Selection, prep: Preparation, subject: int) -> dict[str, int]:
    """Rows per split of one subject: its kept trials, or its images when averaged."""
    split = _rows(sel, prep, subject)["split"].to_numpy(dtype=str)
    return {k: int(np.sum(split == k)) for k in (nsd.SPLIT_TRAIN, nsd.SPLIT_TEST)}


def readme(sel: Selection, desc: dict, out: Path, prep: Preparation | None = None) -> str:
    """The folder's README: files, selection rules and counts per subject, in words."""
    prep = prep or Preparation()
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
        *_file_lines(sel, prep),
        "- `dataset_description.json`: provenance, selection and counts (machine readable).",
        "",
        f"Subjects with files in this directory: {', '.join(present) if present else 'none'}.",
        "",
        "## Selection",
        "",
        f"Layout: {lay.runs_per_session} runs per session, {lay.trials_per_run[0]} trials in odd runs, "
        f"{lay.trials_per_run[1]} in even runs = {lay.trials_per_session} trials per session.",
        "",
        f"1. N = {sel.n_sessions} sessions (fewest registered over all registered subjects"
        + (f", at most MAX_SESSION = {sel.max_session}" if sel.max_session else "")
        + f") x {lay.trials_per_session} = {sel.n_trials} candidate trials per subject.",
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
    lines += _split_section(sel, desc, prep)
    lines += _sessions_section(desc)
    lines += _preparation_section(desc, prep)
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


def _file_lines(sel: Selection, prep: Preparation) -> list[str]:
    """The README's list of the per-subject files (the default folder's words when unprepared)."""
    lay = sel.layout
    runs = f"`(session - 1) * {lay.runs_per_session} + run_in_session` (1-based)"
    roi = f", the voxels of ROI `{prep.roi}` only" if prep.roi else ""
    mask = (
        "- `sub-XX_mask.nii.gz`: the 3 mm mask of the matrix columns (uint8 0/1): grey matter as "
        "the 3 mm stage applied it; with `make curated VALID=1` only the grey-matter voxels valid "
        "in every session used (the others are 0 in `sub-XX.nii.gz` too). `make decode` uses it."
    )
    if prep.roi:
        mask = (
            f"- `sub-XX_mask.nii.gz`: the 3 mm mask of the matrix columns (uint8 0/1): the voxels "
            f"of NSD's ROI `{prep.roi}` (nearest neighbour to 3 mm, value > 0) that are in the "
            "grey-matter mask (with `VALID=1`: grey matter valid in every session used); every "
            "other voxel is 0 in `sub-XX.nii.gz`."
        )
    if not prep.is_float:
        return [
            "- `sub-XX.nii.gz`: kept trials' 3 mm single-trial betas (int16, beta x 300), one "
            "volume per trial, in trial order (sessions ascending, trials in file order)"
            + (f"; 0 outside ROI `{prep.roi}`." if prep.roi else "."),
            "- `sub-XX_labels.npy`: COCO supercategory of each kept trial (unicode array; "
            "`np.load(f)` with no pickle).",
            f"- `sub-XX_runs.npy`: run of each kept trial across the experiment, {runs}.",
            "- `sub-XX_trials.tsv`: one row per kept trial: "
            + ", ".join(f"`{c}`" for c in TRIAL_COLUMNS)
            + " (`trial`, `trial_in_session`, `session`, runs: 1-based; `nsdId`: 0-based; "
            "`split`: `test` for the shared images, see Split).",
            f"- `sub-XX_X.npy`: the same trials as a trials x voxels int16 matrix{roi} (rows in "
            "trial order, columns = the voxels of `sub-XX_mask.nii.gz` in C order of (i, j, k)); "
            "open it with `numpy.load(f, mmap_mode='r')` or `nsdprep.load_curated(XX)`: any trial "
            "is one read, nothing is decompressed. For a real subject (about 22.3k kept trials x "
            "about 64k grey-matter voxels) it is about 2.9 GB, against about 12.8 GB decompressed "
            "for the 4D file, which must be read from its first byte.",
            mask,
        ]
    what = (
        "float32 z-scores, see Preparation" if prep.zscore == "session" else "float32, beta x 300"
    )
    if prep.average:
        row = "image (the mean of its kept trials)"
        order = "images in the order of their first kept trial"
        table = (
            "- `sub-XX_trials.tsv`: one row per image: "
            + ", ".join(f"`{c}`" for c in AVERAGED_COLUMNS)
            + " (`nsdId`: 0-based; `n_repeats`: kept trials averaged; `trials`: their 1-based "
            "trial numbers; `session`, `run`: those of the first of them; `split`: `test` for "
            "the shared images)."
        )
        run_line = (
            f"- `sub-XX_runs.npy`: for each image, the run of its first kept trial, {runs}. "
            "An averaged row mixes trials of up to three runs, so it belongs to no single run; "
            "with one row per image, any grouping of the rows (these runs, `GroupKFold`, the "
            "`split` column) keeps all repeats of an image on one side of a split."
        )
    else:
        row = "kept trial"
        order = "trial order (sessions ascending, trials in file order)"
        table = (
            "- `sub-XX_trials.tsv`: one row per kept trial: "
            + ", ".join(f"`{c}`" for c in TRIAL_COLUMNS)
            + " (`trial`, `trial_in_session`, `session`, runs: 1-based; `nsdId`: 0-based; "
            "`split`: `test` for the shared images)."
        )
        run_line = f"- `sub-XX_runs.npy`: run of each kept trial across the experiment, {runs}."
    return [
        f"- `sub-XX.nii.gz`: one 3 mm volume per {row} ({what}), {order}; 0 outside the mask.",
        f"- `sub-XX_labels.npy`: COCO supercategory of each {row.split(' (')[0]} (unicode array; "
        "`np.load(f)` with no pickle).",
        run_line,
        table,
        f"- `sub-XX_X.npy`: the same rows as a float32 matrix, rows x voxels{roi} (columns = the "
        "voxels of `sub-XX_mask.nii.gz` in C order of (i, j, k)); open it with "
        "`numpy.load(f, mmap_mode='r')` or `nsdprep.load_curated(XX, ...)`. " + FLOAT32_WHY,
        mask,
    ]


def _split_section(sel: Selection, desc: dict, prep: Preparation) -> list[str]:
    """README lines of the shared1000 split: the rule and the rows per side, per subject."""
    unit = "images (averaged rows)" if prep.average else "trials"
    lines = [
        "",
        "## Split (shared1000)",
        "",
        f"The `split` column of `sub-XX_trials.tsv`: {SPLIT_RULE} "
        f"{desc['Split']['SharedImages']} shared images. "
        '`nsdprep.load_curated(XX, ..., split="train")` (or `"test"`) returns those rows.',
        "",
        f"| subject | train {unit} | test {unit} |",
        "|---|---|---|",
    ]
    for bids, rows in desc["Split"]["Rows"].items():
        lines.append(f"| {bids} | {rows['train']} | {rows['test']} |")
    return lines


def _sessions_section(desc: dict) -> list[str]:
    """README lines of the sessions that fed the output and whether late-released ones did."""
    lines = ["", "## Sessions used", "", desc["Sessions"]["Rule"] + ".", ""]
    lines += [
        "| subject | sessions used | late-released sessions | any used |",
        "|---|---|---|---|",
    ]
    for bids, v in desc["Sessions"]["PerSubject"].items():
        used = v["Used"]
        span = f"{used[0]}-{used[-1]}" if len(used) > 1 else ",".join(map(str, used))
        late = ", ".join(map(str, v["LateReleased"])) or "none"
        lines.append(f"| {bids} | {span} | {late} | {'yes' if v['LateReleasedUsed'] else 'no'} |")
    return lines


def _preparation_section(desc: dict, prep: Preparation) -> list[str]:
    """README lines of the z-scoring, averaging and ROI (nothing for an unprepared folder)."""
    if not (prep.is_float or prep.roi):
        return []
    lines = ["", "## Preparation", ""]
    if prep.zscore == "session":
        lines += [f"- z-score: {ZSCORE_RULE}.", ""]
    if prep.average:
        lines += [f"- Average: {AVERAGE_RULE}.", ""]
    if prep.roi:
        lines += [
            f"- ROI: {ROI_RULE.replace('<roi>', prep.roi)}.",
            "",
            f"| subject | 3 mm voxels in {prep.roi} | of them in the mask (kept) |",
            "|---|---|---|",
        ]
        for bids, v in desc["Preparation"]["ROIVoxels"].items():
            lines.append(f"| {bids} | {v['InROI']} | {v['Kept']} |")
        lines.append("")
    values = desc["Preparation"]["Values"]
    lines.append(f"Values: {values['Dtype']}, {values['Units']}.")
    return lines
