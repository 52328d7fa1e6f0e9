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
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Literal

from nsdprep import paths, registry
from nsdprep.dataset import ensure_annex
from nsdprep.errors import DatasetStateError, NsdPrepError

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


@dataclass(frozen=True)
class Options:
    """What the Makefile passes to every target."""

    subjects: tuple[int, ...] = ()
    jobs: int = 2
    drop: bool = False
    force: bool = False
    labels: Literal["default", "legacy"] = "default"
    runs_per_session: int = paths.RUNS_PER_SESSION
    trials_per_run: tuple[int, ...] = paths.TRIALS_PER_RUN
    subsample: int = 0
    rev: str = "HEAD"


# ----------------------------------------------------------------------------------------------
# planning


def plan(target: str, ds: Path, opts: Options) -> list[Step]:
    """Return the ``datalad run`` steps that make ``target`` in dataset ``ds``."""
    nsd = ds / paths.NSD_DATASET
    py = ("python", "-m", "nsdprep")
    layout = (
        "--runs-per-session",
        str(opts.runs_per_session),
        "--trials-per-run",
        ",".join(str(n) for n in opts.trials_per_run),
    )
    legacy = opts.labels == "legacy"
    labels_pkl = paths.COCO_CATEGORIES_LEGACY if legacy else paths.COCO_CATEGORIES
    if target == "3mm":
        steps = []
        for subject in registry.select_subjects(nsd, opts.subjects):
            sessions = registry.registered_sessions(nsd, subject)
            out = f"derivatives/3mm/{paths.subject_label(subject)}"
            cmd = (*py, "resample", "--nsd", paths.NSD_DATASET, "--subject", str(subject))
            cmd += ("--out", out, "--jobs", str(opts.jobs)) + (("--drop",) if opts.drop else ())
            inputs = tuple(f"{paths.NSD_DATASET}/{paths.betas_key(subject, s)}" for s in sessions)
            name = f"3mm {paths.subject_label(subject)}"
            steps.append(Step(target, name, cmd, inputs, (out,), inputs_ready=opts.drop))
        return steps
    if target == "coco-labels":
        zip_in = f"{paths.COCO_DATASET}/{paths.COCO_ZIP_NAME}"
        stim = f"{paths.NSD_DATASET}/{paths.STIM_INFO_KEY}"
        expdesign = f"{paths.NSD_DATASET}/{paths.EXPDESIGN_KEY}"
        merged = paths.COCO_MERGED_LEGACY if legacy else paths.COCO_MERGED
        summary = paths.summary_path(labels_pkl)
        cmd = (*py, "coco", "--zip", zip_in, "--stim-info", stim, "--expdesign", expdesign)
        cmd += ("--merged-out", merged, "--out", labels_pkl) + (("--legacy",) if legacy else ())
        name = "coco-labels" + (" legacy" if legacy else "")
        return [Step(target, name, cmd, (zip_in, stim, expdesign), (merged, labels_pkl, summary))]
    if target == "curated":
        subjects = registry.select_subjects(nsd, opts.subjects)
        out = paths.CURATED_LEGACY_DIR if legacy else paths.CURATED_DIR
        cmd = (*py, "curate", "--nsd", paths.NSD_DATASET, "--resampled", "derivatives/3mm")
        cmd += ("--labels", labels_pkl, "--expdesign", f"{paths.NSD_DATASET}/{paths.EXPDESIGN_KEY}")
        cmd += ("--out", out, "--subjects", *map(str, subjects), *layout)
        cmd += ("--legacy-labels",) if legacy else ()
        inputs = tuple(f"derivatives/3mm/{paths.subject_label(s)}" for s in subjects)
        inputs += (labels_pkl, f"{paths.NSD_DATASET}/{paths.EXPDESIGN_KEY}")
        outputs = tuple(f"{out}/{paths.bids_subject_label(s)}*" for s in subjects)
        outputs += (f"{out}/README.md", f"{out}/dataset_description.json")
        # Which sessions are registered decides N (rule 1), so it is part of the inputs' identity.
        extra = tuple(registry.registered_keys(nsd))
        name = "curated" + (" legacy" if legacy else "")
        name += f" {' '.join(paths.bids_subject_label(s) for s in subjects)}"
        return [Step(target, name, cmd, inputs, outputs, extra_fingerprint=extra)]
    if target == "decode":
        curated = paths.CURATED_LEGACY_DIR if legacy else paths.CURATED_DIR
        out = paths.DECODING_DIR + ("_legacy" if legacy else "")
        subjects = registry.select_subjects(nsd, opts.subjects)
        cmd = (*py, "decode", "--curated", curated, "--out", out, "--jobs", str(opts.jobs))
        cmd += ("--subjects", *map(str, subjects), "--subsample", str(opts.subsample))
        inputs = tuple(f"{curated}/{paths.bids_subject_label(s)}*" for s in subjects)
        name = "decode" + (" legacy" if legacy else "")
        return [Step(target, name, cmd, inputs, (out,))]
    raise NsdPrepError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")


# ----------------------------------------------------------------------------------------------
# executing


def _git(ds: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(ds), *args], check=True, capture_output=True, text=True
    ).stdout


@contextlib.contextmanager
def dataset_lock(ds: Path, what: str) -> Iterator[None]:
    """Hold an exclusive per-dataset lock, or fail at once with a clear message."""
    lock_path = Path(_git(ds, "rev-parse", "--absolute-git-dir").strip()) / "nsdprep-run.lock"
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise DatasetStateError(
                f"another nsdprep run is in progress in {ds} ({holder}); wait for it to finish. "
                "Two `datalad run` at once in one dataset would corrupt its history."
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}: {what}")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()


def dirty_paths(ds: Path) -> list[tuple[str, str]]:
    """``(status, path)`` of everything not committed in ``ds`` (untracked included)."""
    out = _git(ds, "status", "--porcelain=v1", "-z", "--untracked-files=all")
    entries = []
    items = out.split("\0")
    i = 0
    while i < len(items):
        item = items[i]
        i += 1
        if not item:
            continue
        status, path = item[:2], item[3:]
        if status[0] in "RC":  # rename/copy: the next item is the source path
            i += 1
        entries.append((status, path))
    return entries


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
    dirty = dirty_paths(ds)
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
            _git(ds, "checkout", "HEAD", "--", rel)
        cleaned.append(rel)
    # A never-recorded output directory holding only ignored temporaries (``*.part`` of a killed
    # run) or nothing: `datalad run -o` fails on it ("File unknown to git"), so remove it too.
    for pattern in step.outputs:
        for target in sorted(ds.glob(pattern)):
            rel = target.relative_to(ds).as_posix()
            if target.is_dir() and not target.is_symlink() and not _git(ds, "ls-files", "--", rel):
                shutil.rmtree(target)
                cleaned.append(rel)
    return cleaned


def fingerprint(ds: Path, step: Step) -> str:
    """Hash of the command and of the git/annex identity (keys) of every declared input."""
    h = hashlib.sha256()
    h.update("\0".join(step.command).encode())
    for rel in step.inputs:
        repo, inner = _repo_of(ds, rel)
        listing = _git(repo, "ls-files", "-s", "--", inner)
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
    for sub in (paths.NSD_DATASET, paths.COCO_DATASET):
        if rel == sub or rel.startswith(sub + "/"):
            return ds / sub, rel[len(sub) + 1 :] or "."
    return ds, rel


def last_record(ds: Path, step: Step) -> tuple[str, str] | None:
    """``(commit, fingerprint)`` of the latest run record of this step, if any."""
    out = _git(ds, "log", "-F", f"--grep={TAG} {step.name} (inputs ", "--format=%H %s", "-n", "1")
    if not out.strip():
        return None
    commit, _, subject = out.strip().partition(" ")
    m = re.search(r"\(inputs ([0-9a-f]+)\)", subject)
    return (commit, m.group(1)) if m else None


def outputs_present(ds: Path, step: Step) -> bool:
    """True if every declared output matches something committed."""
    for out in step.outputs:
        if not _git(ds, "ls-files", "--", out).strip():
            return False
    return True


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
            return "up-to-date"
        raise DatasetStateError(
            f"{step.name}: inputs changed since {commit[:8]} made {', '.join(step.outputs)}. "
            f"Outputs are kept read-only; rebuild explicitly with FORCE=1 (e.g. `make {step.target} "
            "FORCE=1`)."
        )
    cmd = ["datalad", "run", "-m", step.message(fp)]
    for i in step.inputs:
        cmd += ["-i", i]
    for o in step.outputs:
        cmd += ["-o", o]
    if step.inputs_ready:
        cmd += ["--assume-ready", "inputs"]
    cmd.append(shlex.join(step.command))
    log.info("%s: %s", step.name, shlex.join(step.command))
    proc = subprocess.run(cmd, cwd=ds)
    if proc.returncode != 0:
        cleaned = restore_outputs(ds, step)
        raise NsdPrepError(
            f"{step.name} failed (see the messages above); nothing was recorded"
            + (f", and {len(cleaned)} unrecorded output(s) were removed" if cleaned else "")
            + f". Outputs are as at the last commit. Command: {shlex.join(step.command)}"
        )
    left = dirty_paths(ds)
    if left:
        raise DatasetStateError(
            f"{step.name}: the run finished but left uncommitted changes in {ds}: "
            f"{left[:5]}; check `datalad status`."
        )
    return "ran"


def run_target(target: str, ds: Path, opts: Options) -> int:
    """Plan and execute a make target; ``get``/``drop`` manage input content instead."""
    ensure_annex(ds)
    with dataset_lock(ds, f"make {target}"):
        if target == "rerun":
            proc = subprocess.run(["datalad", "rerun", opts.rev], cwd=ds)
            if proc.returncode != 0:
                raise NsdPrepError(f"`datalad rerun {opts.rev}` failed (see the messages above)")
            return 0
        if target in ("get", "drop"):
            from nsdprep import inputs

            subjects = registry.select_subjects(ds / paths.NSD_DATASET, opts.subjects)
            fn = inputs.get_subjects if target == "get" else inputs.drop_subjects
            fn(ds, subjects)
            return 0
        for step in plan(target, ds, opts):
            execute(ds, step, force=opts.force)
    return 0


# ----------------------------------------------------------------------------------------------
# CLI


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.split(r"[,\s]+", text.strip()) if x)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``nsdprep run TARGET`` (what the Makefile passes)."""
    parser.add_argument("target", choices=TARGETS)
    parser.add_argument("--dataset", type=Path, default=Path.cwd(), help="superdataset root")
    parser.add_argument("--subjects", nargs="*", default=[], help="e.g. 01 02 (default: all)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--drop", action="store_true", help="3mm: get/drop each input session")
    parser.add_argument("--force", action="store_true", help="rebuild even if inputs changed")
    parser.add_argument("--labels", choices=("default", "legacy"), default="default")
    parser.add_argument("--runs-per-session", type=int, default=paths.RUNS_PER_SESSION)
    parser.add_argument("--trials-per-run", type=_int_list, default=paths.TRIALS_PER_RUN)
    parser.add_argument("--subsample", type=int, default=0)
    parser.add_argument("--rev", default="HEAD", help="rerun: the commit (or range) to re-execute")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``nsdprep run``."""
    subjects = tuple(s for item in args.subjects for s in _int_list(item))
    opts = Options(
        subjects=subjects,
        jobs=args.jobs,
        drop=args.drop,
        force=args.force,
        labels=args.labels,
        runs_per_session=args.runs_per_session,
        trials_per_run=tuple(args.trials_per_run),
        subsample=args.subsample,
        rev=args.rev,
    )
    ds = args.dataset.resolve()
    if not (ds / ".datalad").is_dir():
        raise DatasetStateError(
            f"{ds} is not a DataLad dataset (no .datalad/); run make from its root"
        )
    return run_target(args.target, ds, opts)
