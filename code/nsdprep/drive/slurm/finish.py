"""The finishing job: merge the job branches in the user's dataset, check the store, report."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nsdprep.core import _io, dataset
from nsdprep.core.errors import DatasetStateError, NsdPrepError
from nsdprep.drive import steps
from nsdprep.drive.slurm.plan import (
    BRANCH_PREFIX,
    EXIT_FAILED,
    LOCK_TIMEOUT,
    LOG_TAIL,
    Plan,
    Task,
    timed,
    write_json,
)


@dataclass
class Outcome:
    """What the finishing step did: merged, failed and earlier-merged tasks, errors, times."""

    merged: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    earlier: list[int] = field(default_factory=list)
    missing_content: list[str] = field(default_factory=list)
    error: str = ""
    merge_commit: str = ""
    #: False when the job branches held nothing new (identical outputs make no run record)
    new_commits: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """True if every branch that existed was merged (failed tasks left none)."""
        return not self.error and not self.missing_content


def finish(folder: Path, *, lock_timeout: float = LOCK_TIMEOUT) -> int:
    """The finishing job: merge, check, report (see the module docstring); exit 3 if steps failed."""
    plan = Plan.load(folder)
    what = f"SLURM finishing job {plan.finish_job} (submission {plan.id})"
    try:
        with dataset.lock_waiting(plan.dataset, what, lock_timeout):
            outcome = finish_locked(plan)
    except DatasetStateError as exc:  # lock timeout
        outcome = Outcome(error=str(exc))
    print(write_report(plan, outcome), end="")
    return 0 if outcome.complete and not outcome.failed else EXIT_FAILED


def finish_locked(plan: Plan) -> Outcome:
    """Merge what the tasks pushed (the caller holds the dataset's lock); never raises."""
    ds = Path(plan.dataset)
    out = Outcome()
    t = out.timings
    try:
        with timed(t, "fetch"):
            dataset.fetch(ds, plan.sibling)
            pushed = set(dataset.remote_branches(ds, plan.sibling, f"{BRANCH_PREFIX}/{plan.id}/"))
        for i, task in enumerate(plan.tasks):
            if task.branch in pushed:
                out.merged.append(i)
            elif _recorded_since(ds, plan.base, task):
                out.earlier.append(i)
            else:
                out.failed.append(i)
        if not out.merged:
            return out
        branch = dataset.current_branch(ds)
        if branch != plan.branch:
            raise DatasetStateError(
                f"{ds} is on branch {branch}, the results belong to {plan.branch}; "
                f"`git checkout {plan.branch}`, then run the make command again to merge them."
            )
        dirty = dataset.dirty_paths(ds)
        if dirty:
            raise DatasetStateError(
                f"{ds} has uncommitted changes ({', '.join(p for _, p in dirty[:5])}); save them, "
                "then run the make command again to merge the results."
            )
        names = ", ".join(plan.tasks[i].step.name for i in out.merged)
        before = dataset.head(ds)
        with timed(t, "merge"):
            dataset.merge(
                ds,
                [f"{plan.sibling}/{plan.tasks[i].branch}" for i in out.merged],
                f"Merge SLURM job {plan.array_job} (`make {plan.target}`): {names}",
            )
        out.merge_commit = dataset.head(ds)
        out.new_commits = out.merge_commit != before
        if out.new_commits:
            new = [p for p in dataset.changed_files(ds, before) if (ds / p).is_symlink()]
            files = dataset.annexed(ds, new)
            with timed(t, "fsck"):
                out.missing_content = dataset.fsck_remote(ds, plan.storage, files)
            with timed(t, "get"):
                present = [ds / p for p in files if p not in out.missing_content]
                if present:
                    dataset.get(ds, present)
        with timed(t, "push"):
            dataset.push(ds, plan.sibling, data="nothing")
            dataset.delete_remote_branches(
                ds, plan.sibling, [plan.tasks[i].branch for i in out.merged]
            )
    except NsdPrepError as exc:
        out.error = str(exc)
    return out


def _recorded_since(ds: Path, base: str, task: Task) -> bool:
    """True if the task's step was recorded with the planned fingerprint after ``base``."""
    found = steps.last_record(ds, task.step)
    if found is None or found[1] != task.fingerprint:
        return False
    return not dataset.is_ancestor(ds, found[0], base)


def write_report(plan: Plan, outcome: Outcome) -> str:
    """Write ``report.txt`` and ``result.json`` of the submission; return the report."""
    folder = plan.folder
    failed = [plan.tasks[i] for i in outcome.failed]
    resubmit = plan.resubmit_command(failed or list(plan.tasks))
    lines = [
        f"SLURM job array {plan.array_job} of `make {plan.target}` ({len(plan.tasks)} task(s)): "
        f"{len(outcome.merged)} merged, {len(outcome.failed)} failed"
        + (f", {len(outcome.earlier)} merged earlier" if outcome.earlier else "")
    ]
    overheads, computes = [], []
    for i, task in enumerate(plan.tasks):
        info = _task_state(folder, i)
        tm = info.get("timings", {})
        status = "ok" if i in outcome.merged else "earlier" if i in outcome.earlier else "FAILED"
        line = f"  {status:<7} task {i:<3} {task.step.name:<22} node {info.get('node', '?')}"
        if tm and info.get("ok"):
            overhead = tm.get("clone", 0) + tm.get("push_data", 0) + tm.get("push_branch", 0)
            overheads.append(overhead)
            computes.append(tm.get("run", 0))
            line += (
                f"  run {tm.get('run', 0):.1f} s, inputs {tm.get('get', 0):.1f} s, overhead "
                f"{overhead:.1f} s (clone {tm.get('clone', 0):.1f} + push "
                f"{tm.get('push_data', 0) + tm.get('push_branch', 0):.1f})"
            )
        lines.append(line)
        if i in outcome.failed:
            lines.extend(_failure_details(plan, i, info))
    merge_s = sum(outcome.timings.values())
    timings = ", ".join(f"{k} {v:.1f}" for k, v in outcome.timings.items())
    if outcome.merged and outcome.new_commits:
        lines.append(
            f"merged into {plan.branch} as {outcome.merge_commit[:10]} in {merge_s:.1f} s ({timings})"
        )
    elif outcome.merged:
        lines.append(
            "nothing new to merge: the outputs are identical to the recorded ones, so (as locally) "
            f"no run record was made ({merge_s:.1f} s: {timings})"
        )
    if overheads:
        lines.append(
            f"per task: overhead (clone + push) mean {sum(overheads) / len(overheads):.1f} s, "
            f"max {max(overheads):.1f} s; run mean {sum(computes) / len(computes):.1f} s; "
            f"merge {merge_s / max(1, len(outcome.merged)):.1f} s per merged task"
        )
    if outcome.missing_content:
        lines.append(
            f"ERROR: the store {plan.store} lacks the content of "
            + ", ".join(outcome.missing_content[:10])
        )
    if outcome.error:
        lines.append(f"ERROR, not merged: {outcome.error}")
        lines.append(
            "The results stay on the job branches in the store; the next "
            f"`make {plan.target} BACKEND=slurm` merges them first."
        )
    if failed:
        lines.append(
            "Nothing of the failed step(s) was recorded or pushed. Resubmit only them with:\n"
            f"  {resubmit}\n(the same make command as before does the same: it submits only the "
            "steps that are not up to date)"
        )
    text = "\n".join(lines) + "\n"
    write_json(
        folder / "result.json",
        {
            "merged": [plan.tasks[i].step.name for i in outcome.merged],
            "failed": [plan.tasks[i].step.name for i in outcome.failed],
            "earlier": [plan.tasks[i].step.name for i in outcome.earlier],
            "complete": outcome.complete,
            "error": outcome.error,
            "merge_commit": outcome.merge_commit,
            "timings": outcome.timings,
            "resubmit": resubmit,
        },
    )
    with _io.atomic_path(folder / "report.txt") as tmp:
        tmp.write_text(text)
    return text


def _task_state(folder: Path, index: int) -> dict[str, Any]:
    try:
        return dict(json.loads((folder / "tasks" / f"{index}.json").read_text()))
    except (OSError, ValueError):
        return {}


def _failure_details(plan: Plan, index: int, info: dict[str, Any]) -> list[str]:
    """SLURM's view (state, exit code, node), the task's error and the end of its log."""
    out = []
    job = f"{plan.array_job}_{index}"
    try:
        proc = subprocess.run(
            ["scontrol", "-o", "show", "job", job], capture_output=True, text=True, check=False
        )
        fields = dict(f.split("=", 1) for f in proc.stdout.split() if "=" in f)
    except OSError:
        fields = {}
    if fields:
        out.append(
            f"      SLURM {job}: {fields.get('JobState', '?')}, exit {fields.get('ExitCode', '?')},"
            f" node {fields.get('NodeList', '?')}"
        )
    if not info:
        out.append("      the task never started (cancelled, or not scheduled)")
    elif "timings" not in info:
        out.append("      the task was killed (time or memory limit?) before it could report")
    if info.get("error"):
        out.append(f"      error: {info['error']}")
    log_file = plan.folder / "logs" / f"{job}.out"
    out.append(f"      last lines of {log_file}:")
    out.append(log_tail(log_file, LOG_TAIL, indent="        "))
    return out


def log_tail(path: Path, lines: int = LOG_TAIL, indent: str = "    ") -> str:
    """The last ``lines`` lines of a job log, indented for the report."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"{indent}({exc.strerror})"
    kept = [ln for ln in text if not ln.startswith("TIMING ")][-lines:]
    return "\n".join(f"{indent}{ln}" for ln in kept) or f"{indent}(empty)"
