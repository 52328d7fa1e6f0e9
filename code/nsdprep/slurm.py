"""``BACKEND=slurm``: a target's ``datalad run`` steps as one SLURM job array (FAIRly-big workflow).

``make 3mm BACKEND=slurm`` plans exactly the steps a local run plans (:func:`nsdprep.steps.steps_for`;
3 mm: one per subject) and checks each as a local run would (leftovers, dirty dataset, "up to date",
changed inputs need ``FORCE=1``). The steps that have to run become one ``sbatch --array`` job, one
task per step, plus a finishing job that starts when every task has ended (``afterany``):

* **submit** (here, under the dataset's lock): publish the dataset to the output store, a RIA store
  (:func:`nsdprep.publish.publish`: history of the dataset and of its input subdatasets, derivative
  content), write the plan and the two job scripts into ``.git/nsdprep-slurm/<submission>/``, submit.
* **each task** (:func:`run_task`, on a compute node): a temporary clone from the store in job-local
  scratch (``SCRATCH``, else ``$TMPDIR``, else ``/tmp``), declared dead (it never counts as a copy), a
  job branch at the submitted commit, the input subdatasets installed without content, the step's
  inputs fetched (from their web URLs, or the store for derivatives), the very same ``datalad run``
  command and message as a local run (same input fingerprint), the new content pushed to the store's
  storage remote, the branch pushed to the store under an ``flock``, the inputs dropped, the clone
  removed. A failing step pushes nothing.
* **finishing job** (:func:`finish`): in the user's dataset, under its lock, fetch the job branches,
  octopus-merge them into the branch that was checked out at submission, check the content in the
  store (``git annex fsck --fast --from <storage>``, which also records where it is), get it (a local
  run leaves the outputs here too), push the merged history to the store, delete the job branches,
  and write a report: every step with its node and times; every failed step with its SLURM state, its
  error and the last lines of its log; and the command that resubmits only the failed steps.

The records are ordinary ``[DATALAD RUNCMD]`` commits, so ``datalad rerun`` of one works anywhere,
and the next ``make <target>`` (local or SLURM) finds them "up to date". Resubmitting the same make
command submits only what is missing. A submission whose finishing job never completed (cancelled,
dataset dirty or on another branch at that time) is finished by the next submission first.

Needs ``sbatch``/``squeue``/``scontrol`` (no accounting, no ``sacct``), the dataset and the store on
a file system that the compute nodes share, and datalad + git-annex on the nodes' ``PATH`` (``sbatch
--export=ALL`` passes the submitting environment on).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nsdprep
from nsdprep import _io, dataset, nsd, publish, steps
from nsdprep.errors import DatasetStateError, NsdPrepError, RemoteError, UsageError

log = logging.getLogger(__name__)

#: Folder under the dataset's git directory with one sub-folder per submission (plan, scripts, logs).
STATE_DIR = "nsdprep-slurm"
#: Job branches are ``<BRANCH_PREFIX>/<submission>/task-<index>`` in the store.
BRANCH_PREFIX = "nsdprep-slurm"
#: Exit status of the finishing job when some steps failed (0: all merged).
EXIT_FAILED = 3
#: How long the finishing job waits for the dataset's lock (a local target may be running).
LOCK_TIMEOUT = 3600.0
#: Seconds between two ``squeue`` calls while waiting (``WAIT=1``).
POLL_SECONDS = 0.5
#: Lines of a failed task's log shown in the report.
LOG_TAIL = 12
SLURM_TOOLS = ("sbatch", "squeue", "scontrol")


@dataclass(frozen=True)
class Task:
    """One array task: a planned step, its inputs' fingerprint and its job branch."""

    step: steps.Step
    fingerprint: str
    branch: str
    #: subjects the step covers, for the resubmit command (3 mm: one)
    subjects: tuple[int, ...] = ()


@dataclass
class Plan:
    """One submission: what runs where, written to ``plan.json`` for the jobs."""

    id: str
    target: str
    dataset: str
    branch: str
    base: str
    store: str
    source: str
    sibling: str
    storage: str
    scratch: str
    make_vars: tuple[str, ...]
    tasks: tuple[Task, ...]
    array_job: str = ""
    finish_job: str = ""

    @property
    def folder(self) -> Path:
        """The submission's folder (plan, scripts, logs, task states, report)."""
        return dataset.git_dir(self.dataset) / STATE_DIR / self.id

    def save(self) -> None:
        """Write ``plan.json`` atomically."""
        _write_json(self.folder / "plan.json", dataclasses.asdict(self))

    @classmethod
    def load(cls, folder: Path) -> Plan:
        """Read ``folder/plan.json``."""
        try:
            raw = json.loads((folder / "plan.json").read_text())
        except (OSError, ValueError) as exc:
            raise DatasetStateError(
                f"cannot read the SLURM plan {folder}/plan.json: {exc}"
            ) from exc
        tasks = tuple(
            Task(
                step=steps.Step(**{k: _tuples(v) for k, v in t["step"].items()}),
                fingerprint=t["fingerprint"],
                branch=t["branch"],
                subjects=tuple(t["subjects"]),
            )
            for t in raw.pop("tasks")
        )
        return cls(**{k: _tuples(v) for k, v in raw.items()}, tasks=tasks)

    def resubmit_command(self, failed: Sequence[Task]) -> str:
        """The make command that submits the ``failed`` steps again (and nothing else)."""
        subjects = sorted({s for t in failed for s in t.subjects})
        words = ["make", self.target, *self.make_vars]
        if subjects:
            words.append(f'SUBJECTS="{" ".join(f"{s:02d}" for s in subjects)}"')
        return " ".join(words)


def _tuples(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _write_json(path: Path, data: Any) -> None:
    with _io.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------------
# submit (on the login node, in the user's dataset)


def submit(target: str, ds: Path, opts: steps.Options) -> int:
    """Plan ``target``'s steps, submit those not up to date as one job array + finishing job.

    With ``opts.slurm.wait``, wait for the finishing job, print its report and fail if a step did.
    """
    settings = opts.slurm
    _quiet_datalad()
    missing = [tool for tool in SLURM_TOOLS if shutil.which(tool) is None]
    if missing:
        raise UsageError(
            f"BACKEND=slurm needs the SLURM client commands; {', '.join(missing)} not found on PATH. "
            "Run make on a login node of the cluster (or use BACKEND=local)."
        )
    root = dataset.git_dir(ds) / STATE_DIR
    with dataset.lock(ds, f"make {target} BACKEND=slurm (submitting)"):
        queued = _settle_earlier(ds, root)
        todo: list[tuple[steps.Step, str]] = []
        for step in steps.steps_for(target, ds, opts):
            cleaned = steps.restore_outputs(ds, step)
            if cleaned:
                log.warning(
                    "%s: removed %d leftover(s) of an interrupted run", step.name, len(cleaned)
                )
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
    if not settings.wait:
        return 0
    return wait_and_report(plan)


def _quiet_datalad() -> None:
    """DataLad's progress messages (clone, push) only at WARNING: the logs show the steps' output.

    Set after importing DataLad, which sets its logger's level when imported.
    """
    import datalad  # noqa: F401

    logging.getLogger("datalad").setLevel(logging.WARNING)


def _store_url(ds: Path, settings: steps.SlurmOptions) -> str:
    """The RIA store the jobs clone from and push to: the sibling's store, else ``RIA``."""
    known = dataset.storage_url(ds, f"{settings.sibling}-storage")
    if known and settings.ria and known.rstrip("/") != settings.ria.rstrip("/"):
        raise UsageError(
            f"RIA={settings.ria} differs from the store {known} of the sibling {settings.sibling!r}; "
            "leave RIA out to use that store, or name another sibling (RIA_SIBLING=...)."
        )
    url = known or settings.ria
    if not url:
        raise UsageError(
            "BACKEND=slurm needs an output store that the compute nodes and this dataset both reach: "
            "give it once with RIA=ria+file:///shared/path/store (the dataset is published there, "
            f"as by `make publish`); later runs use the sibling {settings.sibling!r}."
        )
    return url


def _plan(
    target: str, ds: Path, opts: steps.Options, todo: Sequence[tuple[steps.Step, str]]
) -> Plan:
    """Publish the dataset to the store and describe the submission (not yet submitted)."""
    settings = opts.slurm
    store = _store_url(ds, settings)
    branch, head = dataset.current_branch(ds), dataset.head(ds)
    if dataset.remote_head(ds, settings.sibling, branch) == head:
        log.info(
            "the store %s has %s at %s already (the jobs clone it from there)",
            store,
            branch,
            head[:8],
        )
    else:
        log.info("publishing %s to %s (the jobs clone it from there)", ds, store)
        publish.publish(ds, store, sibling=settings.sibling, alias=settings.alias)
    sub_id = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    tasks = tuple(
        Task(
            step=step,
            fingerprint=fp,
            branch=f"{BRANCH_PREFIX}/{sub_id}/task-{i}",
            subjects=_subjects(step, opts),
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
        sibling=settings.sibling,
        storage=f"{settings.sibling}-storage",
        scratch=settings.scratch,
        make_vars=tuple(_make_vars(opts)),
        tasks=tasks,
    )


def _subjects(step: steps.Step, opts: steps.Options) -> tuple[int, ...]:
    """Subjects of a step for the resubmit command: 3 mm's ``--subject``, else the selection."""
    cmd = step.command
    if "--subject" in cmd:
        return (int(cmd[cmd.index("--subject") + 1]),)
    return tuple(opts.subjects)


def _make_vars(opts: steps.Options) -> list[str]:
    """The make variables (other than SUBJECTS) that reproduce this plan's commands."""
    default = steps.Options()
    out = ["BACKEND=slurm"]
    if opts.jobs != default.jobs:
        out.append(f"JOBS={opts.jobs}")
    if opts.drop:
        out.append("DROP=1")
    if opts.force:
        out.append("FORCE=1")
    if opts.labels != default.labels:
        out.append(f"LABELS={opts.labels}")
    if opts.layout != default.layout:
        out.append(f"RUNS_PER_SESSION={opts.layout.runs_per_session}")
        out.append(f"TRIALS_PER_RUN={','.join(map(str, opts.layout.trials_per_run))}")
    if opts.subsample != default.subsample:
        out.append(f"SUBSAMPLE={opts.subsample}")
    s, d = opts.slurm, steps.SlurmOptions()
    for name, value, dflt in (
        ("SLURM_OPTS", shlex.join(s.sbatch_args), ""),
        ("RIA", s.ria, ""),
        ("RIA_SIBLING", s.sibling, d.sibling),
        ("ALIAS", s.alias, d.alias),
        ("SCRATCH", s.scratch, ""),
    ):
        if value != dflt:
            out.append(f"{name}={shlex.quote(value)}")
    if s.wait:
        out.append("WAIT=1")
    return out


_TASK_SCRIPT = """\
#!/bin/bash
# nsdprep submission {id}: `make {target} BACKEND=slurm`, one `datalad run` step per array task
# (FAIRly-big workflow: temporary clone, job branch, datalad run, push). See nsdprep/slurm.py.
#SBATCH --job-name=nsdprep-{target}
#SBATCH --output={folder}/logs/%A_%a.out
#SBATCH --cpus-per-task={cpus}
set -eu
export PYTHONPATH={code}${{PYTHONPATH:+:$PYTHONPATH}}
exec {python} -m nsdprep.slurm task {folder} "$SLURM_ARRAY_TASK_ID"
"""
_FINISH_SCRIPT = """\
#!/bin/bash
# nsdprep submission {id}: merge the job branches of `make {target} BACKEND=slurm` into {branch}
# of {dataset}, check the content in the store, report failed steps. See nsdprep/slurm.py.
#SBATCH --job-name=nsdprep-{target}-finish
#SBATCH --output={folder}/logs/finish-%j.out
#SBATCH --cpus-per-task=1
set -eu
export PYTHONPATH={code}${{PYTHONPATH:+:$PYTHONPATH}}
cd {dataset}
exec {python} -m nsdprep.slurm finish {folder}
"""


def _submit_jobs(plan: Plan, opts: steps.Options) -> None:
    """Write the scripts and the plan, then ``sbatch`` the array and the finishing job."""
    folder = plan.folder
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    (folder / "tasks").mkdir(exist_ok=True)
    cpus = opts.jobs if any("--jobs" in t.step.command for t in plan.tasks) else 1
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
    extra = list(opts.slurm.sbatch_args)
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
            f"{finish_log}:\n{_tail(finish_log)}\nRun the same make command again: it finishes "
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
        outcome = _finish_locked(plan)
        print(_write_report(plan, outcome), end="")
    return queued


# ------------------------------------------------------------------------------------------------
# one array task (on a compute node)


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    began = time.monotonic()
    try:
        yield
    finally:
        timings[name] = round(time.monotonic() - began, 2)


def _node() -> str:
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def _expand(clone: Path, patterns: Sequence[str]) -> list[Path]:
    """Paths in ``clone`` matching the step's declared paths (which may be glob patterns)."""
    out: list[Path] = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            out.extend(sorted(clone.glob(pattern)))
        else:
            out.append(clone / pattern)
    return out


def run_task(folder: Path, index: int) -> int:
    """One array task: the FAIRly-big workflow for step ``index`` of the plan in ``folder``."""
    plan = Plan.load(folder)
    if not 0 <= index < len(plan.tasks):
        raise UsageError(
            f"task index {index} is not in the plan {folder} (0-{len(plan.tasks) - 1})"
        )
    task = plan.tasks[index]
    step = task.step
    timings: dict[str, float] = {}
    state: dict[str, Any] = {
        "index": index,
        "step": step.name,
        "node": _node(),
        "job": os.environ.get("SLURM_JOB_ID", ""),
        "ok": False,
    }
    _write_json(folder / "tasks" / f"{index}.json", state)
    scratch = Path(plan.scratch or os.environ.get("TMPDIR") or tempfile.gettempdir())
    scratch.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"nsdprep-{plan.id}-{index}-", dir=scratch))
    clone = work / "ds"
    print(f"task {index}: {step.name} on {state['node']}, temporary clone {clone}", flush=True)
    began = time.monotonic()
    try:
        with _timed(timings, "clone"):
            dataset.clone(plan.source, clone, branch=plan.branch)
            dataset.declare_dead_here(clone)
            dataset.new_branch(clone, task.branch, plan.base)
            for sub in (nsd.NSD_DATASET, nsd.COCO_DATASET):
                if any(p == sub or p.startswith(sub + "/") for p in step.inputs):
                    dataset.install_subdataset(clone, sub)
        fp = steps.fingerprint(clone, step)
        if fp != task.fingerprint:
            raise DatasetStateError(
                f"{step.name}: the inputs in the clone of {plan.base[:8]} have fingerprint {fp}, "
                f"planned {task.fingerprint}; the store does not hold what was submitted."
            )
        inputs = [] if step.inputs_ready else _expand(clone, step.inputs)
        with _timed(timings, "get"):
            if inputs:
                dataset.get(clone, inputs)
        # What the Makefile does for a local run: the dataset's own code runs the command.
        os.environ["PYTHONPATH"] = str(clone / "code")
        with _timed(timings, "run"):
            steps.execute(clone, step, force=True)
        changed = [p for p in dataset.changed_files(clone, plan.base) if (clone / p).is_symlink()]
        with _timed(timings, "push_data"):
            dataset.verify_special_remote(clone, plan.storage, plan.store)
            dataset.push(clone, plan.storage, dataset.annexed(clone, changed), data="anything")
        with _timed(timings, "push_branch"):
            dataset.push_branch(clone, "origin", task.branch, folder / "push.lock")
        state["ok"] = True
        state["outputs"] = len(changed)
        with _timed(timings, "drop"):
            try:
                if inputs:
                    dataset.drop(clone, inputs)
            except NsdPrepError as exc:  # the clone is removed anyway
                log.warning("could not drop the inputs in %s: %s", clone, exc)
    except BaseException as exc:
        lines = str(exc).strip().splitlines()
        state["error"] = lines[-1] if lines else type(exc).__name__
        raise
    finally:
        with _timed(timings, "cleanup"):
            subprocess.run(["chmod", "-R", "u+w", str(work)], capture_output=True, check=False)
            shutil.rmtree(work, ignore_errors=True)
        state["timings"] = timings
        state["seconds"] = round(time.monotonic() - began, 2)
        _write_json(folder / "tasks" / f"{index}.json", state)
        print("TIMING " + " ".join(f"{k}={v:.2f}" for k, v in timings.items()), flush=True)
    return 0


# ------------------------------------------------------------------------------------------------
# the finishing job (in the user's dataset)


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
            outcome = _finish_locked(plan)
    except DatasetStateError as exc:  # lock timeout
        outcome = Outcome(error=str(exc))
    print(_write_report(plan, outcome), end="")
    return 0 if outcome.complete and not outcome.failed else EXIT_FAILED


def _finish_locked(plan: Plan) -> Outcome:
    """Merge what the tasks pushed (the caller holds the dataset's lock); never raises."""
    ds = Path(plan.dataset)
    out = Outcome()
    t = out.timings
    try:
        with _timed(t, "fetch"):
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
        with _timed(t, "merge"):
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
            with _timed(t, "fsck"):
                out.missing_content = dataset.fsck_remote(ds, plan.storage, files)
            with _timed(t, "get"):
                present = [ds / p for p in files if p not in out.missing_content]
                if present:
                    dataset.get(ds, present)
        with _timed(t, "push"):
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


def _write_report(plan: Plan, outcome: Outcome) -> str:
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
    _write_json(
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
    out.append(_tail(log_file, LOG_TAIL, indent="        "))
    return out


def _tail(path: Path, lines: int = LOG_TAIL, indent: str = "    ") -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"{indent}({exc.strerror})"
    kept = [ln for ln in text if not ln.startswith("TIMING ")][-lines:]
    return "\n".join(f"{indent}{ln}" for ln in kept) or f"{indent}(empty)"


# ------------------------------------------------------------------------------------------------
# command line of the jobs: python -m nsdprep.slurm task|finish FOLDER [INDEX]


def _terminated(signum: int, frame: object) -> None:
    raise NsdPrepError(
        f"terminated by signal {signum} (time limit reached or job cancelled; SLURM_OPTS=--time=...)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the job scripts (``task FOLDER INDEX``, ``finish FOLDER``)."""
    parser = argparse.ArgumentParser(prog="nsdprep.slurm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    task = sub.add_parser("task", help="run one array task")
    task.add_argument("folder", type=Path)
    task.add_argument("index", type=int)
    fin = sub.add_parser("finish", help="merge the job branches and report")
    fin.add_argument("folder", type=Path)
    fin.add_argument("--lock-timeout", type=float, default=LOCK_TIMEOUT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _quiet_datalad()
    try:
        if args.command == "task":
            # SLURM sends SIGTERM at the time limit and on scancel: clean up and report, then exit.
            signal.signal(signal.SIGTERM, _terminated)
            return run_task(args.folder.resolve(), args.index)
        return finish(args.folder.resolve(), lock_timeout=args.lock_timeout)
    except NsdPrepError as exc:
        print(f"nsdprep slurm {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
