"""One array task on a compute node: clone, job branch, the step's ``datalad run``, push."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from nsdprep.core import dataset, nsd
from nsdprep.core.errors import DatasetStateError, NsdPrepError, UsageError
from nsdprep.drive import steps
from nsdprep.drive.slurm.plan import Plan, timed, write_json

log = logging.getLogger(__name__)


def _node() -> str:
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


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
    write_json(folder / "tasks" / f"{index}.json", state)
    scratch = Path(plan.scratch or os.environ.get("TMPDIR") or tempfile.gettempdir())
    scratch.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"nsdprep-{plan.id}-{index}-", dir=scratch))
    clone = work / "ds"
    print(f"task {index}: {step.name} on {state['node']}, temporary clone {clone}", flush=True)
    began = time.monotonic()
    try:
        with timed(timings, "clone"):
            dataset.clone(plan.source, clone, branch=plan.branch)
            dataset.declare_dead_here(clone)
            dataset.new_branch(clone, task.branch, plan.base)
            for sub in (nsd.NSD_DATASET, nsd.COCO_DATASET):
                if any(p == sub or p.startswith(sub + "/") for p in step.input_paths):
                    dataset.install_subdataset(clone, sub)
        fp = steps.fingerprint(clone, step)
        if fp != task.fingerprint:
            raise DatasetStateError(
                f"{step.name}: the inputs in the clone of {plan.base[:8]} have fingerprint {fp}, "
                f"planned {task.fingerprint}; the store does not hold what was submitted."
            )
        inputs = [] if step.inputs_ready else steps.expand(clone, step.input_paths)
        with timed(timings, "get"):
            if inputs:
                steps.fetch_inputs(clone, step)  # checked against the registered checksums
        # What the Makefile does for a local run: the dataset's own code runs the command.
        os.environ["PYTHONPATH"] = str(clone / "code")
        with timed(timings, "run"):
            steps.execute(clone, step, force=True)
        changed = [p for p in dataset.changed_files(clone, plan.base) if (clone / p).is_symlink()]
        with timed(timings, "push_data"):
            dataset.verify_special_remote(clone, plan.storage, plan.store)
            dataset.push(clone, plan.storage, dataset.annexed(clone, changed), data="anything")
        with timed(timings, "push_branch"):
            dataset.push_branch(clone, "origin", task.branch, folder / "push.lock")
        state["ok"] = True
        state["outputs"] = len(changed)
        with timed(timings, "drop"):
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
        with timed(timings, "cleanup"):
            subprocess.run(["chmod", "-R", "u+w", str(work)], capture_output=True, check=False)
            shutil.rmtree(work, ignore_errors=True)
        state["timings"] = timings
        state["seconds"] = round(time.monotonic() - began, 2)
        write_json(folder / "tasks" / f"{index}.json", state)
        print("TIMING " + " ".join(f"{k}={v:.2f}" for k, v in timings.items()), flush=True)
    return 0
