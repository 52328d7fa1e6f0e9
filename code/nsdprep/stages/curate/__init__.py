"""Build ``derivatives/curated_3mm``: equalized single trials per subject, labels, runs, trial table.

Per subject ``sub-XX`` (mapped from ``subjXX`` by number) the output directory holds

- ``sub-XX.nii.gz``: the kept trials' 3 mm volumes as one 4D image, in trial order, streamed volume by
  volume (memory does not grow with the number of trials);
- ``sub-XX_labels.npy``: COCO supercategory of each kept trial (plain unicode array);
- ``sub-XX_runs.npy``: run of each kept trial numbered across the experiment,
  ``(session - 1) * R + run_in_session`` (1-based);
- ``sub-XX_trials.tsv``: one row per kept trial (subject, session, run_in_session, run, trial,
  trial_in_session, nsdId, cocoId, supercat, cat);

plus ``README.md`` and ``dataset_description.json``, and with ``--valid`` (``make curated VALID=1``)
``sub-XX_mask.nii.gz``: the 3 mm voxels kept, grey matter valid in every session used (NSD's
``valid_sessionNN.nii.gz``, nearest-neighbour to 3 mm like the grey-matter mask); every other voxel is 0
in ``sub-XX.nii.gz``. Without ``--valid`` the data files are as before; the README reports per subject
the fraction of grey-matter voxels invalid in at least one session either way. Selection rules (all
computed from the inputs):

1. ``N`` = (fewest sessions registered in ``inputs/nsd`` over all registered subjects) x (trials per
   session); the first ``N`` trials of every subject are candidates;
2. trials whose picture is labelled ``"unknown"`` are dropped;
3. every subject keeps the same number of trials: subjects with more drop their earliest ``"person"``
   trials.

Rules 1-3 use only the registry, the experiment design and the labels, over *all* registered subjects,
so processing a subset of subjects gives byte-identical files for those subjects. Outputs are
deterministic: same inputs, same bytes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from nsdprep import options
from nsdprep.core import inventory, masks, nsd, provenance
from nsdprep.core._io import atomic_path, remove_stale_parts
from nsdprep.core.errors import FormatError, MissingInputError, NsdPrepError
from nsdprep.core.nsd import TRIAL_COLUMNS, Layout
from nsdprep.stages.curate import docs as curate_docs
from nsdprep.stages.curate import prepare
from nsdprep.stages.curate.selection import Selection, select

log = logging.getLogger(__name__)


def resampled_file(resampled: str | os.PathLike[str], subject: int, session: int) -> Path:
    """Path of one 3 mm session under the ``derivatives/3mm`` directory ``resampled``."""
    return (
        Path(resampled)
        / nsd.subject_label(subject)
        / Path(nsd.resampled_path(subject, session)).name
    )


@dataclass(frozen=True)
class Grid:
    """3D grid shared by every 3 mm file: shape, affine, on-disk dtype, and a template header."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    dtype: np.dtype
    header: object


def check_resampled(
    resampled: str | os.PathLike[str],
    subjects: Sequence[int],
    n_sessions: int,
    layout: Layout,
) -> Grid:
    """Check the 3 mm files before any heavy work and return their common grid.

    Sessions ``1..n_sessions`` of every subject must exist, each with exactly ``S`` volumes (the
    layout), all on one grid and dtype. Only headers are read.
    """
    from nsdprep.core import nifti

    missing: dict[int, list[int]] = {}
    absent_content: list[Path] = []
    for s in subjects:
        for ses in range(1, n_sessions + 1):
            f = resampled_file(resampled, s, ses)
            if not f.exists():
                if f.is_symlink():
                    absent_content.append(f)
                else:
                    missing.setdefault(s, []).append(ses)
    if missing:
        listing = "; ".join(
            f"{nsd.subject_label(s)} session(s) {', '.join(f'{x:02d}' for x in v)}"
            for s, v in missing.items()
        )
        subj = " ".join(f"{s:02d}" for s in missing)
        raise MissingInputError(
            f"3 mm betas missing under {resampled}: {listing} (sessions 1..{n_sessions} are needed). "
            f'Run `make 3mm SUBJECTS="{subj}"` first.'
        )
    if absent_content:
        raise MissingInputError(
            f"3 mm betas registered but content absent: {', '.join(map(str, absent_content[:5]))}"
            + (" ..." if len(absent_content) > 5 else "")
            + "; run `datalad get` on them."
        )
    S = layout.trials_per_session
    grid: Grid | None = None
    first: Path | None = None
    for s in subjects:
        for ses in range(1, n_sessions + 1):
            f = resampled_file(resampled, s, ses)
            hdr = nifti.check_betas_header(
                f,
                dtype=None if grid is None else grid.dtype,
                ndim=4,
                shape3d=None if grid is None else grid.shape,
                affine=None if grid is None else grid.affine,
                atol=1e-5,
            )
            n_vol = nifti.volume_count(hdr)
            if n_vol != S:
                raise FormatError(
                    f"{f}: expected {S} volumes (layout: {layout.runs_per_session} runs of "
                    f"{layout.trials_per_run[0]}/{layout.trials_per_run[1]} trials), found {n_vol}. "
                    "Check --runs-per-session/--trials-per-run, or rebuild it with "
                    f'`make 3mm SUBJECTS="{s:02d}"`.'
                )
            if grid is None:
                first = f
                grid = Grid(
                    tuple(int(d) for d in hdr.get_data_shape()[:3]),
                    nifti.header_affine(hdr),
                    np.dtype(hdr.get_data_dtype()).newbyteorder("="),
                    hdr,
                )
    log.info("3 mm grid %s (from %s), %d volumes per session", grid and grid.shape, first, S)
    if grid is None:
        raise NsdPrepError("no 3 mm files to check (no subjects or no sessions)")
    return grid


@dataclass(frozen=True)
class ValidVoxels:
    """One subject's grey-matter voxels on the 3 mm grid and which are valid in every used session.

    ``valid_all`` is None when a used session has no registered ``valid_sessionNN.nii.gz``
    (``missing``).
    """

    subject: int
    sessions: tuple[int, ...]
    missing: tuple[int, ...]
    grey_matter: np.ndarray = field(repr=False)
    valid_all: np.ndarray | None = field(repr=False)

    @property
    def n_grey_matter(self) -> int:
        """Grey-matter voxels on the 3 mm grid."""
        return int(self.grey_matter.sum())

    @property
    def n_invalid(self) -> int | None:
        """Grey-matter voxels invalid in at least one used session (None if masks are missing)."""
        if self.valid_all is None:
            return None
        return int((self.grey_matter & ~self.valid_all).sum())

    @property
    def fraction_invalid(self) -> float | None:
        """``n_invalid / n_grey_matter`` (None if unknown or no grey matter on the grid)."""
        bad = self.n_invalid
        return None if bad is None or self.n_grey_matter == 0 else bad / self.n_grey_matter

    def mask(self) -> np.ndarray:
        """Grey matter valid in every used session (what ``--valid`` keeps)."""
        if self.valid_all is None:
            listing = ", ".join(nsd.valid_key(self.subject, s) for s in self.missing)
            raise MissingInputError(
                f"--valid needs the valid masks of every session used; not registered: {listing}. "
                "Run `make inputs` (or curate without VALID=1)."
            )
        return self.grey_matter & self.valid_all


def valid_voxels(
    nsd_ds: str | os.PathLike[str], subject: int, n_sessions: int, grid: Grid
) -> ValidVoxels:
    """Read the 1 mm valid masks of sessions ``1..n_sessions`` and put them on the 3 mm grid.

    Each ``valid_sessionNN.nii.gz`` (3D, nonzero = valid) goes to the 3 mm grid by nearest
    neighbour (:func:`nsdprep.stages.resample.nearest_on_grid`), as the grey-matter mask does; a voxel
    counts as valid when it is valid in every session.
    """
    from nsdprep.core import nifti
    from nsdprep.stages.resample import nearest_on_grid

    registered = set(inventory.registered_sessions(nsd_ds, subject, kind="valid"))
    sessions = tuple(s for s in range(1, n_sessions + 1) if s in registered)
    missing = tuple(s for s in range(1, n_sessions + 1) if s not in registered)
    valid_all: np.ndarray | None = np.ones(grid.shape, dtype=bool)
    for ses in sessions:
        path = Path(nsd_ds) / nsd.valid_key(subject, ses)
        hdr = nifti.read_header(path)
        if nifti.volume_count(hdr) != 1:
            raise FormatError(
                f"{path}: expected a 3D valid-voxel mask, found shape {hdr.get_data_shape()}"
            )
        (vol,) = nifti.iter_volumes(path, header=hdr)  # exhausted: the gzip CRC is checked
        on_grid = nearest_on_grid(vol != 0, nifti.header_affine(hdr), grid.shape, grid.affine)
        valid_all &= on_grid
    if missing:
        log.warning(
            "%s: no valid mask registered for session(s) %s",
            nsd.subject_label(subject),
            ", ".join(f"{s:02d}" for s in missing),
        )
        valid_all = None
    gm = np.asarray(masks.gm_mask(grid.shape, grid.affine), dtype=bool)
    return ValidVoxels(subject, sessions, missing, gm, valid_all)


def write_subject(
    out: str | os.PathLike[str],
    resampled: str | os.PathLike[str],
    subject: int,
    trials: pd.DataFrame,
    grid: Grid,
    keep: np.ndarray | None = None,
) -> nsd.CuratedFiles:
    """Write one subject's curated files; the 4D image and the matrix in one streaming pass.

    ``sub-XX.nii.gz``, ``sub-XX_X.npy`` (trials x voxels of the mask), ``sub-XX_mask.nii.gz``
    (uint8 0/1), ``_labels.npy``, ``_runs.npy``, ``_trials.tsv``. The mask is the grey-matter mask
    of the grid, or ``keep`` (3D bool, ``--valid``: grey matter valid in every session), in which
    case voxels outside it are also written as 0 in the 4D image.
    """
    from tqdm import tqdm

    from nsdprep.core.matrix import MatrixWriter
    from nsdprep.core.nifti import NiftiStreamWriter, iter_volumes

    name = nsd.bids_subject_label(subject)
    files = nsd.curated_files(subject, out)
    n = int(trials.shape[0])
    by_session = {
        int(ses): set((grp["trial_in_session"] - 1).tolist())
        for ses, grp in trials.groupby("session", sort=True)
    }
    mask = keep if keep is not None else masks.gm_mask(grid.shape, grid.affine)
    outside = 0  # kept volumes with nonzero voxels outside the mask (none after `make 3mm`)
    with (
        NiftiStreamWriter(
            files.betas, grid.shape, grid.affine, grid.dtype, n, header=grid.header
        ) as writer,
        MatrixWriter(files.matrix, mask, n) as matrix,
        tqdm(total=n, desc=name, unit="vol", disable=None) as bar,
    ):
        for ses in sorted(by_session):
            wanted = by_session[ses]
            src = resampled_file(resampled, subject, ses)
            # Read every volume (not only up to the last kept one) so the gzip CRC is verified.
            for k, vol in enumerate(iter_volumes(src)):
                if k in wanted:
                    if keep is not None:
                        vol[~keep] = 0  # a fresh array per volume: safe to change
                    outside += bool(np.any(vol[~mask]))
                    writer.write(vol)
                    matrix.write(vol)
                    bar.update(1)
    if outside:
        log.warning(
            "%s: %d of %d volumes have nonzero voxels outside the mask; those voxels are in %s "
            "but not in the matrix %s (the 3 mm stage zeroes them)",
            name, outside, n, files.betas.name, files.matrix.name,
        )  # fmt: skip
    with NiftiStreamWriter(files.mask, grid.shape, grid.affine, np.uint8, None) as mask_out:
        mask_out.write(mask.astype(np.uint8))
    with atomic_path(files.labels) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.asarray(trials["supercat"].to_numpy(dtype=str), dtype=str))
    with atomic_path(files.runs) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, trials["run"].to_numpy(dtype=np.int64))
    with atomic_path(files.trials) as tmp:
        trials.loc[:, list(TRIAL_COLUMNS)].to_csv(
            tmp, sep="\t", index=False, lineterminator="\n", na_rep="n/a"
        )
    return files


@dataclass(frozen=True)
class RoiVoxels:
    """One subject's ROI on the 3 mm grid (nearest neighbour, positive values) and its counts."""

    subject: int
    roi: str
    #: 3 mm voxels in the ROI, and those of them in the mask before the ROI (grey matter, or
    #: grey matter valid in every session with ``VALID=1``)
    n_roi: int
    n_kept: int
    voxels: np.ndarray = field(repr=False)


def roi_voxels(
    nsd_ds: str | os.PathLike[str], subject: int, roi: str, grid: Grid, base: np.ndarray
) -> RoiVoxels:
    """The ROI ``roi`` of ``subject`` (``inputs/nsd``, MNI space) on the 3 mm grid, within ``base``."""
    from nsdprep.core._io import require_content

    path = Path(nsd_ds) / nsd.roi_key(subject, roi)
    require_content(
        path,
        f"ROI {roi} of {nsd.subject_label(subject)}",
        f"`make inputs` registers the ROI volumes the bucket has under {nsd.roi_dir_key(subject)}/.",
    )
    in_roi = masks.roi_on_grid(path, grid.shape, grid.affine)
    kept = in_roi & np.asarray(base, dtype=bool)
    if not kept.any():
        raise NsdPrepError(
            f"{nsd.subject_label(subject)}: no voxel of ROI {roi} is in the grey-matter mask on "
            "the 3 mm grid; check the ROI file"
        )
    return RoiVoxels(subject, roi, int(in_roi.sum()), int(kept.sum()), kept)


def curate(
    nsd_ds: str | os.PathLike[str],
    resampled: str | os.PathLike[str],
    labels: str | os.PathLike[str],
    out: str | os.PathLike[str],
    subjects: Iterable[int] | None = None,
    layout: Layout | None = None,
    expdesign: str | os.PathLike[str] | None = None,
    label_mode: nsd.LabelMode = "default",
    command: str = "",
    valid: bool = False,
    *,
    stim_info_csv: str | os.PathLike[str] | None = None,
    zscore: str = "none",
    average: bool = False,
    roi: str = "",
    max_session: int = 0,
) -> Selection:
    """Build the curated derivative for ``subjects`` (default: all registered) into ``out``.

    Checks every input (registry, design, stim info, labels, 3 mm files and grids, valid masks,
    ROIs) before writing anything. ``labels`` is the table ``make coco-labels`` wrote under
    ``label_mode`` (the legacy table is keyed by the 1-based 73k id). ``valid``: keep only
    grey-matter voxels valid in every session used. ``stim_info_csv``: the split's cross-check
    (default: next to ``expdesign``). ``zscore`` (``"none"``/``"session"``), ``average``,
    ``roi`` (an NSD MNI ROI name, ``""``: none) and ``max_session`` (0: no cap): see
    :mod:`nsdprep.stages.curate.prepare` and the folder's README.
    """
    if zscore not in ("none", "session"):
        raise NsdPrepError(f"zscore must be 'none' or 'session', got {zscore!r}")
    legacy = label_mode == "legacy"
    layout = layout or Layout()
    expdesign = Path(expdesign) if expdesign else Path(nsd_ds) / nsd.EXPDESIGN_KEY
    chosen = inventory.select_subjects(nsd_ds, list(subjects) if subjects else None)
    selection = select(
        nsd_ds,
        expdesign,
        labels,
        layout,
        legacy=legacy,
        stim_info_csv=stim_info_csv,
        max_session=max_session,
    )
    grid = check_resampled(resampled, chosen, selection.n_sessions, layout)
    validity = {s: valid_voxels(nsd_ds, s, selection.n_sessions, grid) for s in chosen}
    keep = {s: validity[s].mask() for s in chosen} if valid else {}
    rois: dict[int, RoiVoxels] = {}
    if roi:
        for s in chosen:
            base = keep[s] if valid else validity[s].grey_matter
            rois[s] = roi_voxels(nsd_ds, s, roi, grid, base)
            keep[s] = rois[s].voxels
    prepared_run = zscore != "none" or average

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_parts(out)
    prepared: dict[int, prepare.Prepared] = {}
    for s in chosen:
        log.info(
            "%s: writing %d trials from %d sessions",
            nsd.bids_subject_label(s),
            selection.trials[s].shape[0],
            selection.n_sessions,
        )
        if valid:
            log.info(
                "%s: keeping %d of %d grey-matter voxels (valid in every session)",
                nsd.bids_subject_label(s),
                int(validity[s].mask().sum()),
                validity[s].n_grey_matter,
            )
        if roi:
            log.info(
                "%s: ROI %s: %d voxels at 3 mm, %d of them kept (in the mask)",
                nsd.bids_subject_label(s), roi, rois[s].n_roi, rois[s].n_kept,
            )  # fmt: skip
        if prepared_run:
            mask = keep[s] if s in keep else validity[s].grey_matter
            files = {ses: resampled_file(resampled, s, ses) for ses in selection.sessions_used}
            prepared[s] = prepare.write_prepared(
                out,
                files,
                s,
                selection.trials[s],
                grid,
                mask,
                zscore=zscore == "session",
                average=average,
            )
        else:
            write_subject(out, resampled, s, selection.trials[s], grid, keep.get(s))

    preparation = curate_docs.Preparation(
        zscore=zscore,
        average=average,
        roi=roi,
        max_session=max_session,
        rois=rois,
        prepared=prepared,
    )
    description = curate_docs.description(
        selection, grid, labels, expdesign, legacy, command, validity, valid, preparation
    )
    with atomic_path(out / "dataset_description.json") as tmp:
        tmp.write_text(json.dumps(description, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    with atomic_path(out / "README.md") as tmp:
        tmp.write_text(
            curate_docs.readme(selection, description, out, preparation), encoding="utf-8"
        )
    return selection


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``curate`` stage's arguments (``LABELS``, ``VALID`` and the layout from the spec)."""
    parser.add_argument("--nsd", required=True, help="NSD subdataset (inputs/nsd)")
    parser.add_argument("--resampled", required=True, help="3 mm betas directory (derivatives/3mm)")
    parser.add_argument(
        "--labels-table", required=True, help="labels table (derivatives/coco_categories.pkl)"
    )
    parser.add_argument(
        "--expdesign",
        default=None,
        help=f"experiment design (default: NSD/{nsd.EXPDESIGN_KEY})",
    )
    parser.add_argument(
        "--stim-info-csv",
        default=None,
        help="stim info CSV, the split's cross-check (default: next to the experiment design)",
    )
    parser.add_argument("--out", required=True, help="output directory (derivatives/curated_3mm)")
    parser.add_argument(
        "--subjects", nargs="*", type=int, default=None, help="subjects (default: all registered)"
    )
    options.add_arguments(parser, options.passed_to("curated"))


def main(args: argparse.Namespace) -> int:
    """CLI entry: ``python -m nsdprep curate ...``."""
    opts = options.from_args(args)
    selection = curate(
        nsd_ds=args.nsd,
        resampled=args.resampled,
        labels=args.labels_table,
        out=args.out,
        subjects=args.subjects,
        layout=opts.layout,
        expdesign=args.expdesign,
        label_mode=opts.labels,
        command=provenance.command_of(args),
        valid=opts.valid,
        stim_info_csv=args.stim_info_csv,
        zscore=opts.zscore,
        average=opts.average,
        roi=opts.roi,
        max_session=opts.max_session,
    )
    print(
        f"curated: {selection.trials_per_subject} trials per subject "
        f"(N = {selection.n_trials} candidates) -> {args.out}"
    )
    return 0
