"""Drive each derivative through ``datalad run``: plan the steps of a make target, then run them safely.

A *step* is one ``datalad run`` call: the exact stage command plus its declared inputs and outputs, so
every output carries its command and ``datalad rerun`` reproduces it. Around each call this module adds
what ``datalad run`` alone does not:

- a clear message when the dataset is dirty, instead of ``run(impossible)``;
- clean-up of the leftovers of an interrupted or failed run of the same step, so the next attempt
  starts from the last recorded state;
- "nothing to do" when the outputs were already made from identical inputs (a fingerprint of the
  inputs' git/annex keys and the command is stored in the run message); changed inputs need ``--force``;
- before anything starts: a clear message naming the make target to run when a prerequisite is
  missing (inputs not registered, 3 mm or labels not made), when the dataset is read-only, or when
  the disk clearly lacks the space the step needs (an estimate from the inputs' sizes);
- leftovers of a run killed at any moment (a stale ``.git/index.lock``, staged outputs) are undone.

:mod:`nsdprep.drive.build` calls these one target at a time per dataset (a lock file: two concurrent runs
would corrupt the history).
"""

from __future__ import annotations

import hashlib
import logging
import re
import shlex
import shutil
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Literal

from nsdprep.core import dataset, inventory, nsd
from nsdprep.core._io import require_free_space
from nsdprep.core.errors import DatasetStateError, NsdPrepError, UsageError

log = logging.getLogger(__name__)

Target = Literal["3mm", "coco-labels", "curated", "decode", "get", "drop", "rerun", "repair"]
TARGETS: tuple[str, ...] = (
    "3mm", "coco-labels", "curated", "decode", "get", "drop", "rerun", "repair",
)  # fmt: skip
TAG = "[nsdprep]"
#: Input subdatasets each target reads (installed on demand when a clone knows them).
NEEDS: dict[str, tuple[str, ...]] = {
    "3mm": (nsd.NSD_DATASET,),
    "coco-labels": (nsd.NSD_DATASET, nsd.COCO_DATASET),
    "curated": (nsd.NSD_DATASET,),
    "decode": (nsd.NSD_DATASET,),
    "get": (nsd.NSD_DATASET,),
    "drop": (nsd.NSD_DATASET,),
    "repair": (nsd.NSD_DATASET,),
}
#: Targets whose steps download input content (they get git-annex's retry settings first).
FETCHING = ("3mm", "coco-labels", "get", "repair")
#: Which make target makes a declared input (for "run `make X` first").
MADE_BY: tuple[tuple[str, str], ...] = (
    ("inputs/", "inputs"),
    (nsd.RESAMPLED_DIR, "3mm"),
    ("derivatives/coco", "coco-labels"),
    (nsd.CURATED_DIR, "curated"),
)


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
#: What running one step did.
Outcome = Literal["ran", "up-to-date"]
#: Targets that ``BACKEND=slurm`` can run on a cluster (the ones made of ``datalad run`` steps).
CLUSTER_TARGETS: tuple[str, ...] = ("3mm", "coco-labels", "curated", "decode")


@dataclass(frozen=True)
class SlurmOptions:
    """``BACKEND=slurm`` settings (see :mod:`nsdprep.drive.slurm`)."""

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
        for subject in inventory.select_subjects(nsd_ds, opts.subjects):
            sessions = inventory.registered_sessions(nsd_ds, subject)
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
        subjects = inventory.select_subjects(nsd_ds, opts.subjects)
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
            for ses in inventory.registered_sessions(nsd_ds, s, kind="valid")
        )
        outputs = tuple(f"{out}/{nsd.bids_subject_label(s)}*" for s in subjects)
        outputs += (f"{out}/README.md", f"{out}/dataset_description.json")
        # Which sessions are registered decides N (rule 1), so it is part of the inputs' identity.
        extra = tuple(inventory.registered_keys(nsd_ds))
        name = f"curated{suffix} {' '.join(nsd.bids_subject_label(s) for s in subjects)}"
        return [Step(target, name, cmd, inputs, outputs, extra_fingerprint=extra)]
    if target == "decode":
        curated = nsd.curated_dir_for(opts.labels)
        out = nsd.decoding_dir_for(opts.labels)
        subjects = inventory.select_subjects(nsd_ds, opts.subjects)
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


def clean_leftovers(ds: Path, plan: Sequence[Step]) -> list[str]:
    """Undo what an interrupted or failed run left in the outputs of *any* step of ``plan``.

    A target is several steps (``make 3mm``: one per subject). A run killed in its second step
    leaves that step's outputs behind; the next run starts with the first step, which must not
    take them for the user's uncommitted work. So the whole plan is cleaned before any step runs.
    """
    if not plan:
        return []
    outputs = tuple(o for step in plan for o in step.outputs)
    cleaned = restore_outputs(ds, outputs)
    if cleaned:
        log.warning(
            "%s: removed %d leftover(s) of an interrupted or failed run (never recorded): %s",
            plan[0].name if len(plan) == 1 else f"make {plan[0].target}",
            len(cleaned),
            ", ".join(cleaned[:5]) + (" ..." if len(cleaned) > 5 else ""),
        )
    return cleaned


def restore_outputs(ds: Path, outputs: Sequence[str]) -> list[str]:
    """Put the paths matching ``outputs`` back to their last committed state; return what was cleaned.

    Raises if anything *else* in the dataset is uncommitted: that is the user's work, never touched.
    A run killed during DataLad's save can leave outputs staged (even new ones, unknown to ``HEAD``):
    they are unstaged first, then removed or checked out like any other leftover.
    """
    dataset.clear_stale_index_lock(ds)
    dirty = dataset.dirty_paths(ds)
    foreign = [(s, p) for s, p in dirty if not _matches(p, outputs)]
    if foreign:
        listing = "\n  ".join(f"{s} {p}" for s, p in foreign[:10])
        more = f"\n  ... and {len(foreign) - 10} more" if len(foreign) > 10 else ""
        raise DatasetStateError(
            f"the dataset {ds} has uncommitted changes; `datalad run` needs a clean dataset:\n  "
            f"{listing}{more}\nSave them (`datalad save -m '...'`) or remove them, then run again."
        )
    staged = [p for s, p in dirty if s[0] not in " ?"]
    if staged:
        dataset.git(ds, "reset", "-q", "HEAD", "--", *staged)
        dirty = dataset.dirty_paths(ds)
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
    for pattern in outputs:
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
                f"{step.name}: its input {rel} has not been made yet; run "
                f"`{made_by(rel)}` first (see `make help` for the order)."
            )
        h.update(listing.encode())
    for extra in step.extra_fingerprint:
        h.update(extra.encode())
    return h.hexdigest()[:16]


def made_by(rel: str) -> str:
    """The make command that makes the dataset-relative path ``rel`` (``make 3mm SUBJECTS=01``)."""
    target = next((t for prefix, t in MADE_BY if rel.startswith(prefix)), "")
    if not target:
        return "the step that makes it"
    legacy = " LABELS=legacy" if "legacy" in rel else ""
    m = re.search(r"subj(\d{2})|sub-(\d{2})", rel)
    subject = f" SUBJECTS={m.group(1)}" if m and m.group(1) and target == "3mm" else ""
    return f"make {target}{subject}{legacy}"


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


#: Output size relative to input size, per target (upper estimates, for the up-front space check):
#: 3 mm keeps 1/27 of the 1 mm voxels (then masks); curated re-packs a subset of the 3 mm volumes.
OUTPUT_RATIO = {"3mm": 1 / 27, "curated": 1.0}


def space_needed(ds: Path, step: Step) -> tuple[int, str]:
    """``(bytes, folder)``: what ``step`` will write into ``ds`` (estimated), and where.

    Inputs whose content is absent are downloaded first (their size is in their keys; with
    ``--drop`` at most ``jobs + prefetch`` sessions at a time), and git-annex keeps ``annex.diskreserve`` free
    on top (it refuses a download otherwise); outputs are estimated from the inputs (3 mm: 1/27 of
    the input; curated: at most its 3 mm inputs; COCO: the JSON sizes in the zip).
    """
    first = step.outputs[0] if step.outputs else "."
    is_file = any(c in first for c in "*?[") or bool(Path(first).suffix)
    folder = str(Path(first).parent) if is_file else first
    sizes = _input_sizes(ds, step)
    absent = [size for size, present in sizes if not present]
    if step.inputs_ready:  # --drop: at most jobs + prefetch sessions on disk at a time
        from nsdprep.stages.resample.prefetch import prefetch_from_env

        jobs = (
            int(step.command[step.command.index("--jobs") + 1]) if "--jobs" in step.command else 1
        )
        fetch = sum(sorted(absent, reverse=True)[: jobs + prefetch_from_env()])
    else:
        fetch = sum(absent)
    if fetch:
        fetch += dataset.disk_reserve(ds)
    total_in = sum(size for size, _ in sizes)
    if step.target == "coco-labels":
        zip_in = ds / nsd.COCO_DATASET / nsd.COCO_ZIP_NAME
        out = _json_sizes(zip_in) if zip_in.is_file() else 0
    else:
        out = int(total_in * OUTPUT_RATIO.get(step.target, 0.0))
    return fetch + out, folder


def _input_sizes(ds: Path, step: Step) -> list[tuple[int, bool]]:
    """``(bytes, content present)`` of every annexed file among the step's declared inputs."""
    by_repo: dict[Path, list[str]] = {}
    for rel in step.inputs:
        repo, inner = _repo_of(ds, rel)
        by_repo.setdefault(repo, []).append(inner)
    sizes: list[tuple[int, bool]] = []
    for repo, paths in by_repo.items():
        for present, selector in ((True, ("--in", "here")), (False, ("--not", "--in", "here"))):
            records, _ = dataset.annex_json(repo, "find", *selector, "--", *paths)
            sizes += [
                (int(r["bytesize"]), present) for r in records if r.get("bytesize", "").isdigit()
            ]
    return sizes


def _json_sizes(zip_path: Path) -> int:
    """Uncompressed size of the COCO instances JSONs in the annotations zip (merged JSON estimate)."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            return sum(i.file_size for i in zf.infolist() if "instances_" in i.filename)
    except (OSError, zipfile.BadZipFile):
        return 0


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


def run_plan(ds: Path, plan: Sequence[Step], *, force: bool = False) -> list[Outcome]:
    """Run a target's steps in order, after cleaning what an interrupted run of any of them left.

    Each step ends with a clean dataset (or raises), so the one clean-up before the first suffices.
    """
    clean_leftovers(ds, plan)
    return [_run_step(ds, step, force=force) for step in plan]


def execute(ds: Path, step: Step, *, force: bool = False) -> Outcome:
    """Run one step with ``datalad run`` (see module docstring for the guarantees)."""
    return run_plan(ds, [step], force=force)[0]


def _run_step(ds: Path, step: Step, *, force: bool) -> Outcome:
    """One step on a dataset without leftovers: skip it if up to date, else ``datalad run`` it."""
    fp = to_run(ds, step, force=force)
    if fp is None:
        return "up-to-date"
    needed, folder = space_needed(ds, step)
    if needed:
        require_free_space(
            ds / folder, needed, f"{step.name} (inputs to fetch + outputs, estimated)"
        )
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
        cleaned = restore_outputs(ds, step.outputs)
        repair = ""
        if step.target == "3mm":
            m = re.search(r"subj(\d{2})", step.name)
            repair = (
                " If a message above says an input is truncated or corrupted, `make repair "
                f"SUBJECTS={m.group(1) if m else '..'}` fetches it again, checks it and records its "
                "checksum."
            )
        raise NsdPrepError(
            f"{step.name} failed (see the messages above); nothing was recorded"
            + (f", and {len(cleaned)} unrecorded output(s) were removed" if cleaned else "")
            + f". Outputs are as at the last commit.{repair} Command: {shlex.join(step.command)}"
        )
    left = dataset.dirty_paths(ds)
    if left:
        raise DatasetStateError(
            f"{step.name}: the run finished but left uncommitted changes in {ds}: "
            f"{left[:5]}; check `datalad status`."
        )
    return "ran"
