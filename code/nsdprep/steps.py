"""Drive each derivative through ``datalad run``: plan the steps of a make target, then run them safely.

A *step* is one ``datalad run`` call: the exact stage command plus its declared inputs and outputs, so
every output carries its command and ``datalad rerun`` reproduces it. Around each call this module adds
what ``datalad run`` alone does not:

- one step at a time per dataset (a lock file; two concurrent runs corrupt the history);
- a clear message when the dataset is dirty, instead of ``run(impossible)``;
- clean-up of the leftovers of an interrupted or failed run of the same step, so the next attempt
  starts from the last recorded state;
- "nothing to do" when the outputs were already made from identical inputs (a fingerprint of the
  inputs' git/annex keys and the command is stored in the run message); changed inputs need ``--force``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import shlex
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Literal

from nsdprep import dataset, nsd, registry
from nsdprep.errors import DatasetStateError, NsdPrepError, UsageError

log = logging.getLogger(__name__)

Target = Literal["3mm", "coco-labels", "curated", "decode", "get", "drop", "rerun"]
TARGETS: tuple[str, ...] = ("3mm", "coco-labels", "curated", "decode", "get", "drop", "rerun")
TAG = "[nsdprep]"


@dataclass(frozen=True)
class Step:
    """One ``datalad run``: a stage command with its declared inputs and outputs (dataset-relative)."""

    target: str
    name: str
    command: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    #: don't let datalad fetch the inputs up front (the stage gets and drops them one by one)
    inputs_ready: bool = False
    extra_fingerprint: tuple[str, ...] = field(default_factory=tuple)

    def message(self, fingerprint: str) -> str:
        """Run-record message; the fingerprint makes 'already up to date' decidable later."""
        return f"{TAG} {self.name} (inputs {fingerprint})"


Labels = Literal["default", "legacy", "crop"]
Backend = Literal["local", "slurm"]
#: Targets that ``BACKEND=slurm`` can run on a cluster (the ones made of ``datalad run`` steps).
CLUSTER_TARGETS: tuple[str, ...] = ("3mm", "coco-labels", "curated", "decode")


@dataclass(frozen=True)
class SlurmOptions:
    """``BACKEND=slurm`` settings (see :mod:`nsdprep.slurm`)."""

    #: extra ``sbatch`` arguments (``SLURM_OPTS``, split like a shell would)
    sbatch_args: tuple[str, ...] = ()
    #: ``WAIT=1``: wait for the finishing job and report its result
    wait: bool = False
    #: the output store (``RIA``); empty: the store the ``sibling`` already points at
    ria: str = ""
    sibling: str = "ria"
    alias: str = "nsdprep"
    #: job-local folder for the temporary clones (``SCRATCH``); empty: ``$TMPDIR``, else ``/tmp``
    scratch: str = ""


@dataclass(frozen=True)
class Options:
    """What the Makefile passes to every target."""

    subjects: tuple[int, ...] = ()
    jobs: int = 2
    drop: bool = False
    #: 3mm with ``drop``: sessions fetched ahead; passed by environment, never recorded (no byte
    #: of output depends on it, so changing it must not make the outputs look out of date)
    prefetch: int = 1
    force: bool = False
    labels: Labels = "default"
    #: curated: keep only voxels valid in every session (and write sub-XX_mask.nii.gz)
    valid: bool = False
    layout: nsd.Layout = field(default_factory=nsd.Layout)
    subsample: int = 0
    #: decode: label permutations per subject (smallest reachable p = 1/(permutations+1))
    permutations: int = 100
    rev: str = "HEAD"
    backend: Backend = "local"
    slurm: SlurmOptions = field(default_factory=SlurmOptions)

    def __post_init__(self) -> None:
        if self.jobs < 1:
            raise UsageError(f"JOBS must be a positive integer, got {self.jobs}")
        if self.prefetch < 0:
            raise UsageError(f"PREFETCH must be an integer >= 0, got {self.prefetch}")
        if self.subsample < 0:
            raise UsageError(f"SUBSAMPLE must be >= 0 (0 = all trials), got {self.subsample}")
        if self.permutations < 0:
            raise UsageError(f"PERMUTATIONS must be >= 0 (0 = none), got {self.permutations}")


# ----------------------------------------------------------------------------------------------
# planning


def steps_for(target: str, ds: Path, opts: Options) -> list[Step]:
    """Return the ``datalad run`` steps that make ``target`` in dataset ``ds``."""
    nsd_ds = ds / nsd.NSD_DATASET
    py = ("python", "-m", "nsdprep")
    legacy, crop = opts.labels == "legacy", opts.labels == "crop"
    labels_pkl = nsd.labels_table_for(opts.labels)
    expdesign = f"{nsd.NSD_DATASET}/{nsd.EXPDESIGN_KEY}"
    suffix = "" if opts.labels == "default" else f" {opts.labels}"
    if target == "3mm":
        steps = []
        for subject in registry.select_subjects(nsd_ds, opts.subjects):
            sessions = registry.registered_sessions(nsd_ds, subject)
            out = nsd.resampled_subject_dir(subject)
            cmd = (*py, "resample", "--nsd", nsd.NSD_DATASET, "--subject", str(subject))
            cmd += ("--out", out, "--jobs", str(opts.jobs)) + (("--drop",) if opts.drop else ())
            inputs = tuple(f"{nsd.NSD_DATASET}/{nsd.betas_key(subject, s)}" for s in sessions)
            name = f"3mm {nsd.subject_label(subject)}"
            steps.append(Step(target, name, cmd, inputs, (out,), inputs_ready=opts.drop))
        return steps
    if target == "coco-labels":
        zip_in = f"{nsd.COCO_DATASET}/{nsd.COCO_ZIP_NAME}"
        stim = f"{nsd.NSD_DATASET}/{nsd.STIM_INFO_KEY}"
        stim_csv = f"{nsd.NSD_DATASET}/{nsd.STIM_INFO_CSV_KEY}"
        summary = nsd.summary_path(labels_pkl)
        cmd = (*py, "coco", "--zip", zip_in, "--stim-info", stim, "--stim-info-csv", stim_csv)
        cmd += ("--expdesign", expdesign)
        if crop:  # the merged JSON is the default mode's; crop writes none
            cmd += ("--out", labels_pkl, "--crop")
            outputs: tuple[str, ...] = (labels_pkl, summary)
        else:
            merged = nsd.merged_json(legacy)
            cmd += ("--merged-out", merged, "--out", labels_pkl)
            cmd += ("--legacy",) if legacy else ()
            outputs = (merged, labels_pkl, summary)
        inputs = (zip_in, stim, stim_csv, expdesign)
        return [Step(target, "coco-labels" + suffix, cmd, inputs, outputs)]
    if target == "curated":
        subjects = registry.select_subjects(nsd_ds, opts.subjects)
        out = nsd.curated_dir_for(opts.labels)
        cmd = (*py, "curate", "--nsd", nsd.NSD_DATASET, "--resampled", nsd.RESAMPLED_DIR)
        cmd += ("--labels", labels_pkl, "--expdesign", expdesign)
        cmd += ("--out", out, "--subjects", *map(str, subjects), *opts.layout.cli_args())
        cmd += ("--legacy-labels",) if legacy else ()
        cmd += ("--valid",) if opts.valid else ()
        inputs = tuple(nsd.resampled_subject_dir(s) for s in subjects) + (labels_pkl, expdesign)
        # Valid masks: counted in the README always, applied with VALID=1.
        inputs += tuple(
            f"{nsd.NSD_DATASET}/{nsd.valid_key(s, ses)}"
            for s in subjects
            for ses in registry.registered_sessions(nsd_ds, s, kind="valid")
        )
        outputs = tuple(f"{out}/{nsd.bids_subject_label(s)}*" for s in subjects)
        outputs += (f"{out}/README.md", f"{out}/dataset_description.json")
        # Which sessions are registered decides N (rule 1), so it is part of the inputs' identity.
        extra = tuple(registry.registered_keys(nsd_ds))
        name = f"curated{suffix} {' '.join(nsd.bids_subject_label(s) for s in subjects)}"
        return [Step(target, name, cmd, inputs, outputs, extra_fingerprint=extra)]
    if target == "decode":
        curated = nsd.curated_dir_for(opts.labels)
        out = nsd.decoding_dir_for(opts.labels)
        subjects = registry.select_subjects(nsd_ds, opts.subjects)
        cmd = (*py, "decode", "--curated", curated, "--out", out, "--jobs", str(opts.jobs))
        cmd += ("--subjects", *map(str, subjects), "--subsample", str(opts.subsample))
        cmd += ("--n-permutations", str(opts.permutations))
        inputs = tuple(f"{curated}/{nsd.bids_subject_label(s)}*" for s in subjects)
        return [Step(target, "decode" + suffix, cmd, inputs, (out,))]
    raise UsageError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")


# ----------------------------------------------------------------------------------------------
# executing


def _matches(path: str, patterns: Sequence[str]) -> bool:
    for pat in patterns:
        pat = pat.rstrip("/")
        if path == pat or path.startswith(pat + "/") or fnmatch(path, pat):
            return True
    return False


def restore_outputs(ds: Path, step: Step) -> list[str]:
    """Put the step's outputs back to their last committed state; return what was cleaned.

    Raises if anything *else* in the dataset is uncommitted: that is the user's work, never touched.
    """
    dirty = dataset.dirty_paths(ds)
    foreign = [(s, p) for s, p in dirty if not _matches(p, step.outputs)]
    if foreign:
        listing = "\n  ".join(f"{s} {p}" for s, p in foreign[:10])
        more = f"\n  ... and {len(foreign) - 10} more" if len(foreign) > 10 else ""
        raise DatasetStateError(
            f"the dataset {ds} has uncommitted changes; `datalad run` needs a clean dataset:\n  "
            f"{listing}{more}\nSave them (`datalad save -m '...'`) or remove them, then run again."
        )
    cleaned = []
    for status, rel in dirty:
        target = ds / rel
        if status == "??":
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        else:
            dataset.restore_path(ds, rel)
        cleaned.append(rel)
    # A never-recorded output directory holding only ignored temporaries (``*.part`` of a killed
    # run) or nothing: `datalad run -o` fails on it ("File unknown to git"), so remove it too.
    for pattern in step.outputs:
        for target in sorted(ds.glob(pattern)):
            rel = target.relative_to(ds).as_posix()
            if target.is_dir() and not target.is_symlink() and not dataset.ls_files(ds, rel):
                shutil.rmtree(target)
                cleaned.append(rel)
    return cleaned


def fingerprint(ds: Path, step: Step) -> str:
    """Hash of the command and of the git/annex identity (keys) of every declared input."""
    h = hashlib.sha256()
    h.update("\0".join(step.command).encode())
    for rel in step.inputs:
        repo, inner = _repo_of(ds, rel)
        listing = "".join(line + "\n" for line in dataset.ls_files(repo, inner, stage=True))
        if not listing:
            raise DatasetStateError(
                f"declared input {rel} is not registered in {repo}; run the step that makes it first "
                "(see `make help`)."
            )
        h.update(listing.encode())
    for extra in step.extra_fingerprint:
        h.update(extra.encode())
    return h.hexdigest()[:16]


def _repo_of(ds: Path, rel: str) -> tuple[Path, str]:
    """Split a dataset-relative path into (repository holding it, path inside that repository)."""
    for sub in (nsd.NSD_DATASET, nsd.COCO_DATASET):
        if rel == sub or rel.startswith(sub + "/"):
            return ds / sub, rel[len(sub) + 1 :] or "."
    return ds, rel


def last_record(ds: Path, step: Step) -> tuple[str, str] | None:
    """``(commit, fingerprint)`` of the latest run record of this step, if any."""
    found = dataset.last_commit_with_subject(ds, f"{TAG} {step.name} (inputs ")
    if found is None:
        return None
    commit, subject = found
    m = re.search(r"\(inputs ([0-9a-f]+)\)", subject)
    return (commit, m.group(1)) if m else None


def outputs_present(ds: Path, step: Step) -> bool:
    """True if every declared output matches something committed."""
    for out in step.outputs:
        if not dataset.ls_files(ds, out):
            return False
    return True


def to_run(ds: Path, step: Step, *, force: bool = False) -> str | None:
    """The inputs' fingerprint if ``step`` has to run, None if it is up to date.

    Raises if the outputs were made from other inputs and ``force`` is not given.
    """
    fp = fingerprint(ds, step)
    record = last_record(ds, step)
    if record and outputs_present(ds, step) and not force:
        commit, old_fp = record
        if old_fp == fp:
            log.info(
                "%s: up to date (made by %s from identical inputs); nothing to do",
                step.name,
                commit[:8],
            )
            return None
        raise DatasetStateError(
            f"{step.name}: inputs changed since {commit[:8]} made {', '.join(step.outputs)} "
            "(the command's options count too, e.g. VALID). "
            f"Outputs are kept read-only; rebuild explicitly with FORCE=1 (e.g. `make {step.target} "
            "FORCE=1`)."
        )
    return fp


def execute(ds: Path, step: Step, *, force: bool = False) -> Literal["ran", "up-to-date"]:
    """Run one step with ``datalad run`` (see module docstring for the guarantees)."""
    cleaned = restore_outputs(ds, step)
    if cleaned:
        log.warning(
            "%s: removed %d leftover(s) of an interrupted or failed run (never recorded): %s",
            step.name,
            len(cleaned),
            ", ".join(cleaned[:5]) + (" ..." if len(cleaned) > 5 else ""),
        )
    fp = to_run(ds, step, force=force)
    if fp is None:
        return "up-to-date"
    log.info("%s: %s", step.name, shlex.join(step.command))
    ok = dataset.run(
        ds,
        step.command,
        message=step.message(fp),
        inputs=step.inputs,
        outputs=step.outputs,
        assume_inputs_ready=step.inputs_ready,
    )
    if not ok:
        cleaned = restore_outputs(ds, step)
        raise NsdPrepError(
            f"{step.name} failed (see the messages above); nothing was recorded"
            + (f", and {len(cleaned)} unrecorded output(s) were removed" if cleaned else "")
            + f". Outputs are as at the last commit. Command: {shlex.join(step.command)}"
        )
    left = dataset.dirty_paths(ds)
    if left:
        raise DatasetStateError(
            f"{step.name}: the run finished but left uncommitted changes in {ds}: "
            f"{left[:5]}; check `datalad status`."
        )
    return "ran"


def run_target(target: str, ds: Path, opts: Options) -> int:
    """Make ``target`` in ``ds``: its ``datalad run`` steps, or get/drop/rerun, under the lock."""
    dataset.ensure_annex(ds)
    if target == "3mm":
        from nsdprep.resample import PREFETCH_ENV

        os.environ[PREFETCH_ENV] = str(opts.prefetch)  # read by the stage, not in its record
    if opts.backend == "slurm":
        if target not in CLUSTER_TARGETS:
            raise UsageError(
                f"BACKEND=slurm runs {', '.join(CLUSTER_TARGETS)}; `make {target}` runs locally"
            )
        from nsdprep import slurm

        return slurm.submit(target, ds, opts)
    with dataset.lock(ds, f"make {target}"):
        if target == "rerun":
            if not dataset.rerun(ds, opts.rev):
                raise NsdPrepError(f"`datalad rerun {opts.rev}` failed (see the messages above)")
            return 0
        if target in ("get", "drop"):
            from nsdprep import inputs

            subjects = registry.select_subjects(ds / nsd.NSD_DATASET, opts.subjects)
            fn = inputs.get_subjects if target == "get" else inputs.drop_subjects
            fn(ds, subjects)
            return 0
        for step in steps_for(target, ds, opts):
            execute(ds, step, force=opts.force)
    return 0


# ----------------------------------------------------------------------------------------------
# CLI


def _subjects(text: str) -> tuple[int, ...]:
    return nsd.parse_int_list(text, "SUBJECTS")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``nsdprep build TARGET`` (what the Makefile passes)."""
    parser.add_argument("target", choices=TARGETS)
    parser.add_argument("--dataset", type=Path, default=Path.cwd(), help="superdataset root")
    parser.add_argument("--subjects", nargs="*", default=[], help="e.g. 01 02 (default: all)")
    parser.add_argument("--jobs", default="2", help="worker processes inside one step")
    parser.add_argument("--drop", action="store_true", help="3mm: get/drop each input session")
    parser.add_argument("--prefetch", default="1", help="3mm --drop: sessions fetched ahead")
    parser.add_argument("--force", action="store_true", help="rebuild even if inputs changed")
    parser.add_argument("--labels", default="default", help="default, legacy or crop")
    parser.add_argument(
        "--valid", action="store_true", help="curated: keep voxels valid in every session only"
    )
    parser.add_argument("--runs-per-session", default="12")
    parser.add_argument("--trials-per-run", default="63,62")
    parser.add_argument("--subsample", default="0")
    parser.add_argument("--permutations", default="100", help="decode: label permutations")
    parser.add_argument("--rev", default="HEAD", help="rerun: the commit (or range) to re-execute")
    parser.add_argument("--backend", default="local", help="local, or slurm (see nsdprep.slurm)")
    parser.add_argument("--slurm-opts", default="", help="slurm: extra sbatch arguments")
    parser.add_argument("--wait", action="store_true", help="slurm: wait for the result")
    parser.add_argument("--ria", default="", help="slurm: output store (RIA URL)")
    parser.add_argument("--ria-sibling", default="ria", help="slurm: the store's sibling name")
    parser.add_argument(
        "--alias", default="nsdprep", help="slurm: the dataset's alias in the store"
    )
    parser.add_argument("--scratch", default="", help="slurm: folder for job clones ($TMPDIR)")


def main(args: argparse.Namespace) -> int:
    """Entry point of ``nsdprep build``: check the options, then make the target."""
    if args.labels not in nsd.LABEL_MODES:
        raise UsageError(f"LABELS must be one of {', '.join(nsd.LABEL_MODES)}, got {args.labels!r}")
    if args.backend not in ("local", "slurm"):
        raise UsageError(f"BACKEND must be 'local' or 'slurm', got {args.backend!r}")
    (jobs,) = _one_int(args.jobs, "JOBS")
    (subsample,) = _one_int(args.subsample, "SUBSAMPLE")
    (prefetch,) = _one_int(args.prefetch, "PREFETCH")
    (permutations,) = _one_int(args.permutations, "PERMUTATIONS")
    opts = Options(
        subjects=tuple(s for item in args.subjects for s in _subjects(item)),
        jobs=jobs,
        drop=args.drop,
        prefetch=prefetch,
        force=args.force,
        labels=args.labels,
        valid=args.valid,
        layout=nsd.Layout.parse(args.runs_per_session, args.trials_per_run),
        subsample=subsample,
        permutations=permutations,
        rev=args.rev,
        backend=args.backend,
        slurm=SlurmOptions(
            sbatch_args=tuple(shlex.split(args.slurm_opts)),
            wait=args.wait,
            ria=args.ria,
            sibling=args.ria_sibling,
            alias=args.alias,
            scratch=args.scratch,
        ),
    )
    for s in opts.subjects:
        nsd.subject_label(s)  # 1..99, or a clear error
    ds = args.dataset.resolve()
    if not dataset.is_dataset(ds):
        raise DatasetStateError(
            f"{ds} is not a DataLad dataset (no .datalad/); run make from its root"
        )
    return run_target(args.target, ds, opts)


def _one_int(text: str, what: str) -> tuple[int]:
    values = nsd.parse_int_list(text, what)
    if len(values) != 1:
        raise UsageError(f"{what}: expected one integer, got {text!r}")
    return values  # type: ignore[return-value]
