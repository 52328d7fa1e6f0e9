"""Drive each derivative through ``datalad run``: plan the steps of a make target, then run them safely.

A *step* is one ``datalad run`` call: the exact stage command plus its declared inputs and outputs, so
every output carries its command and ``datalad rerun`` reproduces it. Around each call this module adds
what ``datalad run`` alone does not:

- a clear message when the dataset is dirty, instead of ``run(impossible)``;
- clean-up of the leftovers of an interrupted or failed run of the same step, so the next attempt
  starts from the last recorded state;
- "nothing to do" when the outputs were already made from identical inputs (a fingerprint of the
  inputs' git/annex keys and of the options that change output bytes is stored in the run
  message); changed inputs or options need ``FORCE=1``;
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
import os
import re
import shlex
import shutil
from collections.abc import Sequence
from fnmatch import fnmatch
from pathlib import Path
from typing import Literal

from nsdprep import pipeline
from nsdprep.core import dataset, nsd, pins, signals
from nsdprep.core._io import require_free_space
from nsdprep.core.bucket import NSD_403_HINT
from nsdprep.core.errors import DatasetStateError, NsdPrepError
from nsdprep.options import Options
from nsdprep.pipeline import TAG, Step

log = logging.getLogger(__name__)

#: What running one step did.
Outcome = Literal["ran", "up-to-date"]


def steps_for(target: str, ds: Path, opts: Options) -> list[Step]:
    """Return the ``datalad run`` steps that make ``target`` in dataset ``ds``."""
    return pipeline.STAGES[target].plan(ds, opts)


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
    if cleaned:
        _prune_empty_parents(ds, outputs)
    return cleaned


def _prune_empty_parents(ds: Path, outputs: Sequence[str]) -> None:
    """Remove the now-empty folders above removed outputs (``derivatives/3mm/``), up to ``ds``."""
    for pattern in outputs:
        folder = (ds / pattern).parent
        while folder != ds and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent


def fingerprint(ds: Path, step: Step) -> str:
    """Hash of the step's identity and of the git/annex identity (keys) of every declared input.

    The identity is the stage, its own arguments and the options that change output bytes
    (:meth:`~nsdprep.pipeline.Step.identity`): byte-neutral options such as ``JOBS`` or ``DROP``
    never make outputs look out of date.
    """
    h = hashlib.sha256()
    h.update("\0".join(step.identity()).encode())
    for item in step.inputs:
        repo, inner = _repo_of(ds, item.path)
        listing = "".join(line + "\n" for line in dataset.ls_files(repo, inner, stage=True))
        if not listing:
            raise DatasetStateError(
                f"{step.name}: its input {item.path} has not been made yet; run "
                f"`{item.made_by}` first (see `make help` for the order)."
            )
        h.update(listing.encode())
    for extra in step.extra_fingerprint:
        h.update(extra.encode())
    return h.hexdigest()[:16]


def expand(ds: Path, patterns: Sequence[str]) -> list[Path]:
    """Paths in ``ds`` matching declared paths (which may be glob patterns)."""
    out: list[Path] = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            out.extend(sorted(ds.glob(pattern)))
        else:
            out.append(ds / pattern)
    return out


def fetch_inputs(ds: Path, step: Step) -> None:
    """Fetch the content of the step's declared inputs (what ``datalad run -i`` would fetch).

    Files of the input subdatasets are checked against the checksums recorded when they were
    registered (:func:`nsdprep.core.pins.fetch_verified`); derivatives come from the dataset's own
    siblings, where git-annex checks them against their keys.
    """
    paths = expand(ds, step.input_paths)
    if paths:
        pins.fetch_verified(ds, paths, hint_403=NSD_403_HINT)
        dataset.get(ds, paths)


def after_interrupt(ds: Path, step: Step, head: str) -> str:
    """Clean what an interrupted step left, and say what was (not) recorded and what was cleaned."""
    recorded = dataset.head(ds) != head
    cleaned = restore_outputs(ds, step.outputs)
    said = f"{step.name} was recorded before the interrupt" if recorded else "nothing recorded"
    if cleaned:
        shown = ", ".join(cleaned[:3]) + (" ..." if len(cleaned) > 3 else "")
        said += f"; removed {len(cleaned)} unrecorded output(s): {shown}"
    return said


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


def space_needed(
    ds: Path, step: Step, sizes: Sequence[tuple[int, bool]] | None = None
) -> tuple[int, str]:
    """``(bytes, folder)``: what ``step`` will write into ``ds`` (estimated), and where.

    Inputs whose content is absent are downloaded first (their size is in their keys; when the
    stage fetches them itself, ``make 3mm DROP=1``, at most ``JOBS + PREFETCH`` sessions at a
    time), and git-annex keeps ``annex.diskreserve`` free on top (it refuses a download
    otherwise); outputs are the stage's own estimate from its inputs.
    """
    first = step.outputs[0] if step.outputs else "."
    is_file = any(c in first for c in "*?[") or bool(Path(first).suffix)
    folder = str(Path(first).parent) if is_file else first
    sizes = _input_sizes(ds, step) if sizes is None else sizes
    absent = [size for size, present in sizes if not present]
    if step.inputs_ready:
        at_once = step.options.jobs + step.options.prefetch
        fetch = sum(sorted(absent, reverse=True)[:at_once])
    else:
        fetch = sum(absent)
    if fetch:
        fetch += dataset.disk_reserve(ds)
    out = step.stage.estimate(ds, step, sum(size for size, _ in sizes))
    return fetch + out, folder


def _input_sizes(ds: Path, step: Step) -> list[tuple[int, bool]]:
    """``(bytes, content present)`` of every annexed file among the step's declared inputs.

    ``git annex find --in here`` looks at the local object itself, so content removed behind
    git-annex's back counts as absent.
    """
    by_repo: dict[Path, list[str]] = {}
    for item in step.inputs:
        repo, inner = _repo_of(ds, item.path)
        by_repo.setdefault(repo, []).append(inner)
    sizes: list[tuple[int, bool]] = []
    for repo, paths in by_repo.items():
        for present, selector in ((True, ("--in", "here")), (False, ("--not", "--in", "here"))):
            records, _ = dataset.annex_json(repo, "find", *selector, "--", *paths)
            sizes += [
                (int(r["bytesize"]), present) for r in records if r.get("bytesize", "").isdigit()
            ]
    return sizes


def inputs_at_hand(ds: Path, step: Step, sizes: Sequence[tuple[int, bool]]) -> bool:
    """True if nothing is to fetch for ``step`` (``sizes``: :func:`_input_sizes`).

    That is: every declared input exists, in an installed repository, with the content of each of
    its annexed files. Then the step skips ``datalad get`` (about 2 s per step: imports and queries).
    """
    repos = {_repo_of(ds, path)[0] for path in step.input_paths}
    if not all((repo / ".git").exists() for repo in repos):
        return False
    if not all(os.path.lexists(p) for p in expand(ds, step.input_paths)):
        return False
    return all(present for _, present in sizes)


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
            "(the options that change output bytes count too, e.g. VALID). "
            "Outputs are kept read-only; rebuild explicitly with FORCE=1 (e.g. "
            f"`{step.stage.make_command(step.options, step.subjects)} FORCE=1`)."
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
    sizes = _input_sizes(ds, step)
    needed, folder = space_needed(ds, step, sizes)
    if needed:
        require_free_space(
            ds / folder, needed, f"{step.name} (inputs to fetch + outputs, estimated)"
        )
    log.info("%s: %s", step.name, shlex.join(step.command))
    head = dataset.head(ds)
    try:
        if not step.inputs_ready and not inputs_at_hand(ds, step, sizes):
            # fetched here, not by `datalad run`: an interrupt while fetching never starts the
            # command, and every fetch goes through the same checks
            fetch_inputs(ds, step)
        ok = dataset.run(
            ds,
            step.command,
            message=step.message(fp),
            inputs=step.input_paths,
            outputs=step.outputs,
            assume_inputs_ready=True,
        )
    except KeyboardInterrupt:
        raise signals.Interrupted(after_interrupt(ds, step, head)) from None
    if not ok:
        cleaned = restore_outputs(ds, step.outputs)
        # The stage's own line says what to do: `make repair` only for damaged content, never for
        # an impossible header (fetching the file again would not change it).
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
