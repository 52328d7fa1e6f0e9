"""The plan of one SLURM submission (``plan.json``) and what its jobs share."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shlex
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nsdprep import options, pipeline
from nsdprep.core import _io, dataset
from nsdprep.core.errors import DatasetStateError

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

    step: pipeline.Step
    fingerprint: str
    branch: str

    def to_json(self) -> dict[str, Any]:
        """The task as plain JSON (the step's options as make words, read back exactly)."""
        step = self.step
        return {
            "step": {
                "target": step.target,
                "subjects": list(step.subjects),
                "options": options.to_words(step.options),
                "inputs": [[i.path, i.made_by] for i in step.inputs],
                "outputs": list(step.outputs),
                "extra_fingerprint": list(step.extra_fingerprint),
            },
            "fingerprint": self.fingerprint,
            "branch": self.branch,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Task:
        """The task :meth:`to_json` wrote."""
        s = raw["step"]
        step = pipeline.Step(
            target=s["target"],
            subjects=tuple(s["subjects"]),
            options=options.from_words(s["options"]),
            inputs=tuple(pipeline.Input(path, made_by) for path, made_by in s["inputs"]),
            outputs=tuple(s["outputs"]),
            extra_fingerprint=tuple(s["extra_fingerprint"]),
        )
        return cls(step=step, fingerprint=raw["fingerprint"], branch=raw["branch"])


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
    #: the options of the make command that submitted it
    opts: options.Options
    tasks: tuple[Task, ...]
    array_job: str = ""
    finish_job: str = ""

    @property
    def folder(self) -> Path:
        """The submission's folder (plan, scripts, logs, task states, report)."""
        return dataset.git_dir(self.dataset) / STATE_DIR / self.id

    def save(self) -> None:
        """Write ``plan.json`` atomically."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["opts"] = options.to_words(self.opts)
        data["tasks"] = [t.to_json() for t in self.tasks]
        write_json(self.folder / "plan.json", data)

    @classmethod
    def load(cls, folder: Path) -> Plan:
        """Read ``folder/plan.json``."""
        try:
            raw = json.loads((folder / "plan.json").read_text())
            tasks = tuple(Task.from_json(t) for t in raw.pop("tasks"))
            opts = options.from_words(raw.pop("opts"))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DatasetStateError(
                f"cannot read the SLURM plan {folder}/plan.json: {exc}"
            ) from exc
        return cls(**raw, opts=opts, tasks=tasks)

    def resubmit_command(self, failed: Sequence[Task]) -> str:
        """The make command that submits the ``failed`` steps again (and nothing else).

        Every option of the submitting command is repeated (:func:`nsdprep.options.to_words`,
        which reads back to the same options); ``SUBJECTS`` becomes the failed steps' subjects.
        """
        subjects = tuple(sorted({s for t in failed for s in t.step.subjects}))
        opts = self.opts.replace(subjects=subjects)
        words = options.to_words(opts)
        return " ".join(["make", self.target, *(shlex.quote(w) for w in words)])


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
