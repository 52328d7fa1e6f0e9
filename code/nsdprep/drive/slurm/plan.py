"""The plan of one SLURM submission (``plan.json``) and what its jobs share."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nsdprep.core import _io, dataset
from nsdprep.core.errors import DatasetStateError
from nsdprep.drive import steps

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
        write_json(self.folder / "plan.json", dataclasses.asdict(self))

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


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as sorted, indented JSON, atomically (plan, task states)."""
    with _io.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


@contextlib.contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Record the seconds the ``with`` block took as ``timings[name]`` (for the report)."""
    began = time.monotonic()
    try:
        yield
    finally:
        timings[name] = round(time.monotonic() - began, 2)


def quiet_datalad() -> None:
    """DataLad's progress messages (clone, push) only at WARNING: the logs show the steps' output.

    Set after importing DataLad, which sets its logger's level when imported.
    """
    import datalad  # noqa: F401

    logging.getLogger("datalad").setLevel(logging.WARNING)
