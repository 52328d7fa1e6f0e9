"""Submit a target's steps (login node, user's dataset); with ``WAIT=1``, wait for them."""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import nsdprep
from nsdprep import options, pipeline
from nsdprep.core import _io, dataset
from nsdprep.core.errors import DatasetStateError, NsdPrepError, RemoteError, UsageError
from nsdprep.drive import publish, steps
from nsdprep.drive.slurm.finish import finish_locked, log_tail, write_report
from nsdprep.drive.slurm.plan import (
    BRANCH_PREFIX,
    POLL_SECONDS,
    SLURM_TOOLS,
    STATE_DIR,
    Plan,
    Task,
    quiet_datalad,
)
from nsdprep.options import Options

log = logging.getLogger(__name__)


def submit(target: str, ds: Path, opts: Options) -> int:
    """Plan ``target``'s steps, submit those not up to date as one job array + finishing job.

    With ``WAIT=1``, wait for the finishing job, print its report and fail if a step did.
    """
    quiet_datalad()
    missing = [tool for tool in SLURM_TOOLS if shutil.which(tool) is None]
    if missing:
        raise UsageError(
            f"BACKEND=slurm needs the SLURM client commands; {', '.join(missing)} not found on PATH. "
            "Run make on a login node of the cluster (or use BACKEND=local)."
        )
    root = dataset.git_dir(ds) / STATE_DIR
    with dataset.lock(ds, f"make {target} BACKEND=slurm (submitting)"):
        queued = _settle_earlier(ds, root)
        todo: list[tuple[pipeline.Step, str]] = []
        plan = steps.steps_for(target, ds, opts)
        steps.clean_leftovers(ds, plan)
        for step in plan:
            fp = steps.to_run(ds, step, force=opts.force)
            if fp is None:
                continue
            if step.name in queued:
                job = queued[step.name]
                raise DatasetStateError(
                    f"{step.name} is already submitted (SLURM jobs {job}, still queued or running); "
                    f"wait for them (`squeue -j {job}`) or cancel them (`scancel {job}`) first."
                )
            todo.append((step, fp))
        if not todo:
            print(f"make {target}: every step is up to date; nothing to submit")
            return 0
        plan = _plan(target, ds, opts, todo)
        _submit_jobs(plan, opts)
    _print_submitted(plan)
    if not opts.wait:
        return 0
    return wait_and_report(plan)


def store_url(ds: Path, opts: Options) -> str:
    """The RIA store the jobs clone from and push to: the sibling's store, else ``RIA``."""
    # the same rule as `make publish`: the one store the dataset and its subdatasets go to
    url = publish.resolve_store(ds, opts.ria or None, sibling=opts.ria_sibling)
    if not url:
        raise UsageError(
            "BACKEND=slurm needs an output store that the compute nodes and this dataset both reach: "
            "give it once with RIA=ria+file:///shared/path/store (the dataset is published there, "
            f"as by `make publish`); later runs use the sibling {opts.ria_sibling!r}."
        )
    return url


def _plan(target: str, ds: Path, opts: Options, todo: Sequence[tuple[pipeline.Step, str]]) -> Plan:
    """Publish the dataset to the store and describe the submission (not yet submitted)."""
    store = store_url(ds, opts)
    branch, head = dataset.current_branch(ds), dataset.head(ds)
    if dataset.remote_head(ds, opts.ria_sibling, branch) == head:
        log.info(
            "the store %s has %s at %s already (the jobs clone it from there)",
            store,
            branch,
            head[:8],
        )
    else:
        log.info("publishing %s to %s (the jobs clone it from there)", ds, store)
        publish.publish(ds, store, sibling=opts.ria_sibling, alias=opts.alias)
    sub_id = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    tasks = tuple(
        Task(
            step=step,
            fingerprint=fp,
            branch=f"{BRANCH_PREFIX}/{sub_id}/task-{i}",
        )
        for i, (step, fp) in enumerate(todo)
    )
    return Plan(
        id=sub_id,
        target=target,
        dataset=str(ds),
        branch=branch,
        base=head,
        store=store,
        source=f"{store}#{dataset.dataset_id(ds)}",
        sibling=opts.ria_sibling,
        storage=f"{opts.ria_sibling}-storage",
        scratch=opts.scratch,
        opts=opts,
        tasks=tasks,
    )


_TASK_SCRIPT = """\
#!/bin/bash
# nsdprep submission {id}: `make {target} BACKEND=slurm`, one `datalad run` step per array task
# (FAIRly-big workflow: temporary clone, job branch, datalad run, push). See nsdprep/slurm/.
#SBATCH --job-name=nsdprep-{target}
#SBATCH --output={folder}/logs/%A_%a.out
#SBATCH --cpus-per-task={cpus}
set -eu
export PYTHONPATH={code}${{PYTHONPATH:+:$PYTHONPATH}}
exec {python} -m nsdprep.drive.slurm task {folder} "$SLURM_ARRAY_TASK_ID"
"""
_FINISH_SCRIPT = """\
#!/bin/bash
# nsdprep submission {id}: merge the job branches of `make {target} BACKEND=slurm` into {branch}
# of {dataset}, check the content in the store, report failed steps. See nsdprep/slurm/.
#SBATCH --job-name=nsdprep-{target}-finish
#SBATCH --output={folder}/logs/finish-%j.out
#SBATCH --cpus-per-task=1
set -eu
export PYTHONPATH={code}${{PYTHONPATH:+:$PYTHONPATH}}
cd {dataset}
exec {python} -m nsdprep.drive.slurm finish {folder}
"""


def _submit_jobs(plan: Plan, opts: Options) -> None:
    """Write the scripts and the plan, then ``sbatch`` the array and the finishing job."""
    folder = plan.folder
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    (folder / "tasks").mkdir(exist_ok=True)
    stage = pipeline.STAGES[plan.target]
    cpus = opts.jobs if any(s.name == "jobs" for s in options.passed_to(stage.target)) else 1
    fields = {
        "id": plan.id,
        "target": plan.target,
        "branch": plan.branch,
        "dataset": shlex.quote(plan.dataset),
        "folder": shlex.quote(str(folder)),
        "cpus": cpus,
        "code": shlex.quote(str(Path(nsdprep.__file__).resolve().parent.parent)),
        "python": shlex.quote(sys.executable),
    }
    for name, template in (("task.sh", _TASK_SCRIPT), ("finish.sh", _FINISH_SCRIPT)):
        with _io.atomic_path(folder / name) as tmp:
            tmp.write_text(template.format(**fields))
    plan.save()
    extra = list(opts.sbatch_args)
    plan.array_job = _sbatch(
        [f"--array=0-{len(plan.tasks) - 1}", *extra, str(folder / "task.sh")], plan.dataset
    )
    try:
        plan.finish_job = _sbatch(
            [
                f"--dependency=afterany:{plan.array_job}",
                "--kill-on-invalid-dep=yes",
                *extra,
                str(folder / "finish.sh"),
            ],
            plan.dataset,
        )
    except NsdPrepError:
        subprocess.run(["scancel", plan.array_job], capture_output=True, check=False)
        raise
    plan.save()


def _sbatch(args: Sequence[str], cwd: str) -> str:
    """``sbatch --parsable --export=ALL args`` in ``cwd``; return the job ID."""
    cmd = ["sbatch", "--parsable", "--export=ALL", *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RemoteError(
            f"`{shlex.join(cmd)}` failed ({proc.returncode}): "
            f"{proc.stderr.strip() or proc.stdout.strip()}. Check SLURM_OPTS and the cluster."
        )
    return proc.stdout.strip().split(";")[0]


def _print_submitted(plan: Plan) -> None:
    n = len(plan.tasks)
    print(
        f"submitted {n} step(s) of `make {plan.target}` to SLURM: job array {plan.array_job} "
        f"(tasks 0-{n - 1}), finishing job {plan.finish_job}"
    )
    for i, task in enumerate(plan.tasks):
        print(f"  task {i}: {task.step.name}")
    print(
        f"The finishing job merges the results into branch {plan.branch} and writes "
        f"{plan.folder / 'report.txt'} (logs in {plan.folder / 'logs'}).\n"
        f"Follow with `squeue -j {plan.array_job},{plan.finish_job}`.",
        flush=True,
    )


def wait_and_report(plan: Plan) -> int:
    """Wait until the submission's jobs have left the queue; print the report; raise on failure."""
    jobs = f"{plan.array_job},{plan.finish_job}"
    began, last = time.monotonic(), ""
    try:
        while True:
            states = _queued_states(jobs)
            if not states:
                break
            summary = ", ".join(f"{n} {s.lower()}" for s, n in sorted(_count(states).items()))
            if summary != last:
                print(
                    f"[{time.monotonic() - began:5.0f} s] SLURM jobs {jobs}: {summary}", flush=True
                )
                last = summary
            time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        print(
            f"\nstopped waiting; the jobs run on and the finishing job {plan.finish_job} merges the "
            f"results (report: {plan.folder / 'report.txt'})."
        )
        return 130
    report = plan.folder / "report.txt"
    if not report.exists():
        finish_log = plan.folder / "logs" / f"finish-{plan.finish_job}.out"
        raise NsdPrepError(
            f"the finishing job {plan.finish_job} ended without a report ({report}); its log "
            f"{finish_log}:\n{log_tail(finish_log)}\nRun the same make command again: it finishes "
            "this submission first, then submits what is missing."
        )
    print(report.read_text(), end="", flush=True)
    result = json.loads((plan.folder / "result.json").read_text())
    if result["failed"] or not result["complete"]:
        raise NsdPrepError(
            f"{len(result['failed'])} of {len(plan.tasks)} step(s) of `make {plan.target}` failed "
            f"or were not merged (report above, also in {report}); resubmit with: "
            f"{result['resubmit']}"
        )
    return 0


def _count(states: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for state in states:
        out[state] = out.get(state, 0) + 1
    return out


def _queued_states(jobs: str) -> list[str]:
    """States of the jobs (array tasks counted one by one) that ``squeue`` still lists."""
    proc = subprocess.run(
        ["squeue", "-h", "-r", "-j", jobs, "-o", "%T"], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:
            return []
        raise RemoteError(f"`squeue -j {jobs}` failed: {proc.stderr.strip()}")
    return proc.stdout.split()


def _settle_earlier(ds: Path, root: Path) -> dict[str, str]:
    """Earlier submissions of this dataset: finish those whose finishing job did not complete.

    Returns ``{step name: job IDs}`` of the submissions still queued or running.
    """
    queued: dict[str, str] = {}
    if not root.is_dir():
        return queued
    for folder in sorted(p for p in root.iterdir() if (p / "plan.json").is_file()):
        result = folder / "result.json"
        if result.is_file() and json.loads(result.read_text()).get("complete"):
            continue
        plan = Plan.load(folder)
        plan.dataset = str(ds)  # (in case the dataset was moved since)
        if not plan.finish_job:  # submission failed before the jobs existed
            continue
        jobs = f"{plan.array_job},{plan.finish_job}"
        if _queued_states(jobs):
            queued.update({t.step.name: jobs for t in plan.tasks})
            continue
        log.warning(
            "submission %s (SLURM jobs %s) was not finished; merging its results first",
            plan.id,
            jobs,
        )
        outcome = finish_locked(plan)
        print(write_report(plan, outcome), end="")
    return queued
