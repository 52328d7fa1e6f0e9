"""Proof of concept of the FAIRly-big workflow (DataLad handbook) for one SLURM job array.

On a throw-away cluster (:class:`~nsdprep.testing.slurm.cluster.SlurmCluster`):

1. a toy DataLad dataset (annex, one small input file) is published to a RIA store
   (``datalad create-sibling-ria`` + ``datalad push``);
2. ``sbatch --array`` runs ``fairlybig_job.sh``: per task a temporary clone from the store, a job
   branch, ``datalad run``, content pushed to ``ria-storage``, the branch to the store under ``flock``;
   some tasks can fail on purpose (``--fail``);
3. ``fairlybig_merge.sh`` (``--dependency=afterany``) lists the failed tasks, octopus-merges the job
   branches into the dataset's branch, runs ``git annex fsck --fast -f ria-storage`` and pushes;
4. the result is checked: one ``[DATALAD RUNCMD]`` record per successful task, nothing from the
   failed ones, content in the store, ``datalad rerun`` of one record reproduces its output.

Run (as root, datalad and git-annex on PATH)::

    PYTHONPATH=code python -m nsdprep.testing.slurm.fairlybig_poc --workdir /tmp/fb
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from nsdprep.testing.slurm.cluster import SlurmCluster, SlurmError

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
JOB_SCRIPT = HERE / "fairlybig_job.sh"
MERGE_SCRIPT = HERE / "fairlybig_merge.sh"
ALIAS = "toy"
IDENTITY = {
    "GIT_AUTHOR_NAME": "FAIRly-big PoC",
    "GIT_AUTHOR_EMAIL": "poc@example.org",
    "GIT_COMMITTER_NAME": "FAIRly-big PoC",
    "GIT_COMMITTER_EMAIL": "poc@example.org",
}
_TIMING = re.compile(r"^TIMING task=(\d+) (.*)$", re.M)
_FAILED = re.compile(r"^FAILED task=(\d+)", re.M)


class PocError(RuntimeError):
    """A step of the proof of concept did not do what it should."""


def _sh(cmd: Sequence[str], cwd: Path, env: dict[str, str]) -> str:
    """Run ``cmd`` in ``cwd``; return stdout, raise with its output on failure."""
    proc = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise PocError(f"`{' '.join(cmd)}` failed in {cwd}:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def _environment(workdir: Path) -> dict[str, str]:
    """Isolated HOME, a git identity, the venv's tools (datalad, git-annex) first on PATH."""
    env = dict(os.environ, HOME=str(workdir / "home"), **IDENTITY)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    (workdir / "home").mkdir(parents=True, exist_ok=True)
    return env


def _store_objects(store: Path) -> int:
    """Number of annexed objects in the RIA store (each dataset once, not again via its alias)."""
    datasets = (p for p in store.glob("*/*") if not p.is_symlink())  # skip alias/<name> links
    return sum(1 for d in datasets for p in d.glob("annex/objects/*/*/*/*") if p.is_file())


def run_poc(workdir: Path, *, tasks: int, fail: set[int]) -> dict[str, float]:
    """Run the proof of concept in ``workdir``; return the measured seconds; raise on any deviation."""
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    env = _environment(workdir)
    ds, store, logs = workdir / "ds", workdir / "store", workdir / "logs"
    logs.mkdir(exist_ok=True)
    times: dict[str, float] = {}
    with SlurmCluster(workdir / "slurm") as cluster:
        times["install"], times["to_idle"] = cluster.install_seconds, cluster.start_seconds
        for note in cluster.notes:
            print(f"note: {note}")

        began = time.monotonic()
        _sh(["datalad", "create", str(ds)], workdir, env)
        (ds / "input.txt").write_text("toy input\n")
        _sh(["datalad", "save", "-m", "Add the toy input"], ds, env)
        url = f"ria+file://{store}"
        _sh(
            ["datalad", "create-sibling-ria", "-s", "ria", "--new-store-ok", "--alias", ALIAS, url],
            ds,
            env,
        )
        _sh(["datalad", "push", "--to", "ria"], ds, env)
        times["dataset_and_store"] = time.monotonic() - began
        head_before = _sh(["git", "rev-parse", "HEAD"], ds, env).strip()
        objects_before = _store_objects(store)

        began = time.monotonic()
        array = cluster.submit(
            f"--array=0-{tasks - 1}",
            f"--output={logs}/job-%A_%a.out",
            str(JOB_SCRIPT),
            f"{url}#~{ALIAS}",
            str(workdir / "scratch"),
            str(workdir / "push.lock"),
            ",".join(map(str, sorted(fail))),
            env=env,
        )
        merge = cluster.submit(
            f"--dependency=afterany:{array}",
            f"--output={logs}/merge-%j.out",
            str(MERGE_SCRIPT),
            str(ds),
            str(tasks),
            array,
            env=env,
        )
        cluster.wait(merge, timeout=600)
        times["array_and_merge"] = time.monotonic() - began
        _check_jobs(cluster, array, merge, tasks, fail, logs, times)
        left = list((workdir / "scratch").glob("*"))
        if left:
            raise PocError(f"job clones left in scratch: {left}")

        began = time.monotonic()
        _check_dataset(ds, env, head_before, tasks, fail)
        if _store_objects(store) != objects_before + tasks - len(fail):
            raise PocError(
                f"the store holds {_store_objects(store)} objects, expected "
                f"{objects_before} + {tasks - len(fail)} (a failed task pushed content?)"
            )
        times["rerun_check"] = time.monotonic() - began
    return times


def _check_jobs(
    cluster: SlurmCluster,
    array: str,
    merge: str,
    tasks: int,
    fail: set[int],
    logs: Path,
    times: dict[str, float],
) -> None:
    """Task states, the merge job's exit status and its list of failed tasks; collect timings."""
    states = cluster.states(array)
    for task in range(tasks):
        want = "FAILED" if task in fail else "COMPLETED"
        got = states.get(str(task), {}).get("JobState")
        if got != want:
            out = logs / f"job-{array}_{task}.out"
            raise PocError(f"task {task} is {got}, expected {want}; log {out}:\n{out.read_text()}")
    merge_log = (logs / f"merge-{merge}.out").read_text()
    exit_code = cluster.states(merge)[merge].get("ExitCode")
    if exit_code != ("3:0" if fail else "0:0") or set(map(int, _FAILED.findall(merge_log))) != fail:
        raise PocError(f"merge job exit {exit_code}, log:\n{merge_log}")
    print(f"merge job listed the failed task(s): {sorted(fail)}")
    per_task: dict[str, list[float]] = {}
    for task in set(range(tasks)) - fail:
        text = (logs / f"job-{array}_{task}.out").read_text()
        match = _TIMING.search(text)
        if not match:
            raise PocError(f"no TIMING line in the log of task {task}:\n{text}")
        for item in match.group(2).split():
            key, value = item.split("=")
            per_task.setdefault(key, []).append(float(value))
    overhead = [
        c + d + g
        for c, d, g in zip(
            per_task["clone"], per_task["push_data"], per_task["push_git"], strict=True
        )
    ]
    for key, values in [*per_task.items(), ("clone+push", overhead)]:
        times[f"task_{key}_mean"] = statistics.mean(values)
        times[f"task_{key}_max"] = max(values)
    merged = re.search(r"^MERGED .* seconds=([\d.]+)$", merge_log, re.M)
    if not merged:
        raise PocError(f"no MERGED line in the merge job's log:\n{merge_log}")
    times["merge"] = float(merged.group(1))


def _check_dataset(ds: Path, env: dict[str, str], base: str, tasks: int, fail: set[int]) -> None:
    """History, content location and ``datalad rerun`` of one record in the user's dataset."""
    ok = sorted(set(range(tasks)) - fail)
    parents = _sh(["git", "log", "-1", "--format=%P"], ds, env).split()
    if len(parents) != 1 + len(ok) or parents[0] != base:
        raise PocError(f"HEAD is not an octopus merge of {len(ok)} job branches onto {base}")
    records = _sh(["git", "log", "--format=%H %s", f"{base}..HEAD"], ds, env).splitlines()
    runs = {
        int(m.group(2)): m.group(1)
        for r in records
        if (m := re.match(r"(\w+) \[DATALAD RUNCMD\] .* task (\d+)$", r))
    }
    if sorted(runs) != ok:
        raise PocError(f"run records for tasks {sorted(runs)}, expected {ok}")
    in_store = _sh(["git", "annex", "find", "--in", "ria-storage", "out"], ds, env).split()
    if set(in_store) != {f"out/{t}.txt" for t in ok}:
        raise PocError(f"content in ria-storage: {in_store}")
    for t in fail:
        if (ds / "out" / f"{t}.txt").exists() or (ds / "out" / f"{t}.txt").is_symlink():
            raise PocError(f"out/{t}.txt of the failed task {t} is in the dataset")
    head = _sh(["git", "rev-parse", "HEAD"], ds, env).strip()
    _sh(["datalad", "rerun", runs[ok[0]]], ds, env)
    if _sh(["git", "rev-parse", "HEAD"], ds, env).strip() != head:
        raise PocError("datalad rerun made a new commit: the output was not reproduced identically")
    if _sh(["git", "status", "--porcelain"], ds, env).strip():
        raise PocError("the dataset is dirty after datalad rerun")
    text = (ds / "out" / f"{ok[0]}.txt").read_text()
    if text != f"toy input\nresult of task {ok[0]}\n":
        raise PocError(f"unexpected rerun output: {text!r}")
    print(f"datalad rerun {runs[ok[0]][:10]} (task {ok[0]}) reproduced out/{ok[0]}.txt")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run the proof of concept and print the timings."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="folder for everything")
    parser.add_argument("--tasks", type=int, default=5, help="array size (default 5)")
    parser.add_argument(
        "--fail", default="4", help="comma-separated task IDs that exit 1 on purpose ('' = none)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    fail = {int(t) for t in args.fail.split(",") if t.strip()}
    if not set(range(args.tasks)) - fail or not fail <= set(range(args.tasks)):
        parser.error("--fail must name some, not all, of the task IDs 0..tasks-1")
    began = time.monotonic()
    try:
        times = run_poc(args.workdir, tasks=args.tasks, fail=fail)
    except (PocError, SlurmError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for key, value in times.items():
        print(f"{key}: {value:.2f} s")
    print(f"total: {time.monotonic() - began:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
