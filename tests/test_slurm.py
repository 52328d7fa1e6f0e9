"""``BACKEND=slurm`` end to end on a throw-away single-node SLURM cluster (``make test-slurm``).

Two ``git clone``s of this checkout register the same synthetic inputs from one loopback mirror. One
makes every derivative locally (in a background thread, meanwhile); the other makes them with
``BACKEND=slurm WAIT=1`` through an output RIA store. Once the local run has fetched its inputs, the
mirror serves one session of subject 02 damaged (same size; the task refuses it against the checksum
pinned at registration, and the 3 mm step of subject 02 fails):

1. ``make coco-labels`` (no wait) and ``make 3mm WAIT=1``: subject 02's task fails, 01 is merged;
2. the mirror is repaired and the same ``make 3mm`` resubmits subject 02 alone;
3. ``make curated`` and ``make decode``;

then the checks: the failure report, nothing of the failed task anywhere, identical keys and run
records to the local run, merge commits, ``datalad rerun`` of a SLURM-made record, "up to date".
The cluster is started by the ``cluster`` fixture, which fails (never skips) if SLURM cannot start.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REPO_ROOT, git_out
from nsdprep import options
from nsdprep.core import nsd
from nsdprep.core.errors import UsageError
from nsdprep.core.nsd import Layout
from nsdprep.drive import build
from nsdprep.drive.slurm import plan as slurm_plan
from nsdprep.drive.slurm import submit as slurm_submit
from nsdprep.options import Options
from nsdprep.pipeline import Input, Step
from nsdprep.testing.demo import DemoSpec, loopback_env, user_clone
from nsdprep.testing.serve import Mirror
from nsdprep.testing.slurm.cluster import SlurmCluster
from nsdprep.testing.synth import make_synthetic

VENV = Path(sys.executable).parent.parent
#: 2 subjects (2 and 1 sessions): 2 array tasks for 3 mm, one of which fails on purpose.
SPEC = DemoSpec(sessions=(2, 1), layout=Layout(6, (8, 7)))
FAILING = 2
JOBS = "JOBS=1"
#: passed through to sbatch (checked in the job records)
SLURM_OPTS = "SLURM_OPTS=--time=10 --comment=nsdprep-test"
#: The end-to-end tests need the cluster: only `make test-slurm` selects them (`-m slurm`).
on_slurm = pytest.mark.slurm


def _make(ds: Path, env: dict[str, str], *args: str) -> tuple[int, str, float]:
    """``make args`` in ``ds``; return exit status, output and seconds."""
    began = time.monotonic()
    proc = subprocess.run(
        ["make", "--no-print-directory", "-C", str(ds), f"VENV={VENV}", *SPEC.make_vars(), JOBS,
         *args],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - began


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A single-node SLURM from Debian packages (installed if missing); stopped by PID at the end."""
    # 4 CPUs on 2 cores: the tasks spend much of their time in git and I/O, and coco-labels runs
    # beside the two 3 mm tasks.
    with SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=4) as running:
        yield running


def _submissions(ds: Path) -> list[dict]:
    root = ds / ".git" / "nsdprep-slurm"
    return [json.loads((p / "plan.json").read_text()) for p in sorted(root.iterdir())]


def _store_objects(store: Path) -> set[str]:
    """Names of the annexed objects in the RIA store (its datasets, not the alias links)."""
    return {
        p.name
        for d in store.glob("*/*")
        if not d.is_symlink()
        for p in d.glob("annex/objects/*/*/*/*")
        if p.is_file()
    }


@pytest.fixture(scope="module")
def run(cluster: SlurmCluster, git_env, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Build both datasets (local and SLURM, see the module docstring); return what was seen."""
    work = tmp_path_factory.mktemp("slurm-e2e")
    env = loopback_env(git_env)
    env["PATH"] = f"{VENV / 'bin'}{os.pathsep}{env['PATH']}"
    env.update(cluster.env)
    facts: dict = {"began": time.monotonic(), "seconds": {}, "local": []}
    store, scratch = work / "store", work / "scratch"
    slurm = ("BACKEND=slurm", f"RIA=ria+file://{store}", f"SCRATCH={scratch}", SLURM_OPTS)
    ds, ref = work / "slurm-ds", work / "local-ds"
    make_synthetic(work / "synth", SPEC.synth_spec())
    with Mirror(work / "synth") as mirror:
        local_has_inputs = threading.Event()

        def local_pipeline() -> None:
            try:
                _register_inputs(ref, mirror, env)
                rc, out, _ = _make(ref, env, "get", f"SUBJECTS={FAILING:02d}")
                assert rc == 0, out
                local_has_inputs.set()  # the betas to be damaged are here: the mirror may break
                for target in ("coco-labels", "3mm", "curated", "decode"):
                    facts["local"].append(_make(ref, env, target))
                    if facts["local"][-1][0]:
                        return
            finally:
                local_has_inputs.set()

        thread = threading.Thread(target=local_pipeline)
        thread.start()
        _register_inputs(ds, mirror, env)
        facts["seconds"]["inputs registered"] = time.monotonic() - facts["began"]

        rc, out, _ = _make(ds, env, "coco-labels", *slurm)  # no WAIT: runs beside 3mm
        assert rc == 0, out
        # 1. one session of the failing subject damaged on the server (same size: refused by its pin)
        local_has_inputs.wait(timeout=300)
        src = mirror.root / "nsd" / nsd.betas_key(FAILING, 1)
        original = src.read_bytes()
        damaged = bytearray(original)
        mid = len(damaged) // 2
        damaged[mid : mid + 64] = bytes(b ^ 0xFF for b in damaged[mid : mid + 64])
        src.write_bytes(bytes(damaged))
        facts["head_before_3mm"] = git_out(ds, "rev-parse", "HEAD").strip()
        facts["3mm_first"] = _make(ds, env, "3mm", *slurm, "WAIT=1")
        facts["after_failure"] = {
            "tree": git_out(ds, "ls-files", "derivatives/3mm"),
            "log": git_out(ds, "log", "--format=%s", f"{facts['head_before_3mm']}..HEAD"),
            "status": git_out(ds, "status", "--porcelain"),
            "store_branches": git_out(ds, "ls-remote", "--heads", "ria"),
            "store_objects": _store_objects(store),
            "keys": git_out(
                ds, "annex", "find", "--include=*", "--format=${key}\\n", "derivatives/3mm"
            ),
            "scratch": sorted(p.name for p in scratch.iterdir()),
        }
        first = next(p for p in _submissions(ds) if p["target"] == "3mm")
        facts["sbatch_fields"] = cluster.states(first["array_job"])
        coco = next(p for p in _submissions(ds) if p["target"] == "coco-labels")
        cluster.wait(coco["finish_job"], timeout=300)

        # 2. repaired; the same make command again
        src.write_bytes(original)
        facts["3mm_again"] = _make(ds, env, "3mm", *slurm, "WAIT=1")
        # 3. curated without WAIT, and its finishing job cancelled (a user's scancel, say): the
        #    next submission, decode's, merges it first
        facts["curated"] = _make(ds, env, "curated", *slurm)
        assert facts["curated"][0] == 0, facts["curated"][1]
        curated = next(p for p in _submissions(ds) if p["target"] == "curated")
        cluster.run("scancel", curated["finish_job"])
        cluster.wait(f"{curated['array_job']},{curated['finish_job']}", timeout=300)
        facts["decode"] = _make(ds, env, "decode", *slurm, "WAIT=1")
        assert facts["decode"][0] == 0, facts["decode"][1]
        facts["seconds"]["SLURM pipeline"] = time.monotonic() - facts["began"]
        facts["3mm_third"] = _make(ds, env, "3mm", *slurm)
        facts["3mm_local_after"] = _make(ds, env, "3mm")
        # datalad rerun of a record made on SLURM, here (its inputs come from the mirror)
        grep = "--grep=[nsdprep] 3mm subj02 ("
        facts["rerun_commit"] = git_out(ds, "log", "-F", grep, "--format=%H", "-n1").strip()
        facts["head_before_rerun"] = git_out(ds, "rev-parse", "HEAD").strip()
        facts["rerun"] = _make(ds, env, "rerun", f"REV={facts['rerun_commit']}")
        facts["head_after_rerun"] = git_out(ds, "rev-parse", "HEAD").strip()
        # 5. a step that fails on the nodes under output-changing options (its job scratch
        #    cannot be made): the resubmit command it prints carries every option
        blocked = work / "not-a-folder"
        blocked.write_text("a file where the job scratch should go\n")
        facts["curated_valid"] = _make(
            ds, env, "curated", *slurm, "VALID=1", "FORCE=1", "WAIT=1", f"SCRATCH={blocked}/x"
        )
        facts["blocked_scratch"] = f"{blocked}/x"
        thread.join(timeout=600)
    facts["seconds"]["both pipelines"] = time.monotonic() - facts["began"]
    facts.update(ds=ds, ref=ref, store=store, scratch=scratch, env=env)
    return facts


def _register_inputs(ds: Path, mirror: Mirror, env: dict[str, str]) -> None:
    """A new user's ``git clone`` of this checkout, then ``make inputs`` from ``mirror``."""
    user_clone(REPO_ROOT, ds, env, overlay=True)
    url = mirror.url
    rc, out, _ = _make(
        ds, env, "inputs", f"NSD_URL={url}/nsd",
        f"COCO_URL={url}/coco/annotations/annotations_trainval2017.zip",
    )  # fmt: skip
    assert rc == 0, out


@on_slurm
def test_failing_task_is_reported_with_node_log_and_resubmit_command(run: dict) -> None:
    rc, out, _ = run["3mm_first"]
    assert rc != 0
    assert "(2 task(s)): 1 merged, 1 failed" in out, out
    failed = next(ln for ln in out.splitlines() if "FAILED" in ln and "task" in ln)
    assert "3mm subj02" in failed and "node localhost" in failed, out
    assert re.search(r"SLURM \d+_1: FAILED, exit 2:0, node localhost", out), out
    # the task's own error, from the end of its log: the download does not match its pin
    assert re.search(
        r"nsdprep slurm task: error: .*subj02/.*betas_session01.nii.gz: Verification of content "
        r"failed: expected MD5 [0-9a-f]{32} \(recorded at registration\), got MD5 [0-9a-f]{32}",
        out,
    ), out
    again = options.from_words(_resubmit_words(out, "3mm"))
    assert again.subjects == (FAILING,) and again.jobs == 1 and again.backend == "slurm", out
    assert again.layout == SPEC.layout and again.slurm_opts == "--time=10 --comment=nsdprep-test"
    # SLURM_OPTS reached sbatch: one task per step, each with the requested limit and comment
    fields = run["sbatch_fields"]
    assert sorted(fields) == ["0", "1"], fields
    assert {(f["TimeLimit"], f["Comment"], f["NumCPUs"]) for f in fields.values()} == {
        ("00:10:00", "nsdprep-test", "1")
    }, fields


def _resubmit_words(out: str, target: str) -> list[str]:
    """The words after ``make <target>`` of the resubmit line the report printed."""
    lines = out.splitlines()
    line = lines[lines.index("Nothing of the failed step(s) was recorded or pushed. Resubmit only "
                             "them with:") + 1]  # fmt: skip
    words = shlex.split(line)
    assert words[:2] == ["make", target], line
    return words[2:]


@on_slurm
def test_resubmit_of_a_failed_curated_keeps_its_options(run: dict) -> None:
    """``make curated VALID=1 BACKEND=slurm`` failed on the node: its resubmit has VALID=1 too."""
    rc, out, _ = run["curated_valid"]
    assert rc != 0 and "(1 task(s)): 0 merged, 1 failed" in out, out
    words = _resubmit_words(out, "curated")
    assert "VALID=1" in words and "FORCE=1" in words, words
    again = options.from_words(words)
    expected = Options(
        subjects=(1, 2), jobs=1, force=True, valid=True, runs_per_session=6,
        trials_per_run=(8, 7), backend="slurm", slurm_opts="--time=10 --comment=nsdprep-test",
        wait=True, scratch=run["blocked_scratch"], ria=f"ria+file://{run['store']}",
    )  # fmt: skip
    assert again == expected, words


@on_slurm
def test_failing_task_left_nothing_behind(run: dict) -> None:
    seen = run["after_failure"]
    assert "subj02" not in seen["tree"] and "subj01" in seen["tree"]
    assert "3mm subj02" not in seen["log"] and "3mm subj01" in seen["log"]
    assert seen["status"] == ""
    # merged branches deleted, the failed one never pushed; only the coco-labels submission, which
    # runs beside 3mm without WAIT, may still have its branch in the store at this moment
    for sub in re.findall(r"refs/heads/nsdprep-slurm/(\S+)/task-\d+", seen["store_branches"]):
        plan = json.loads((run["ds"] / ".git/nsdprep-slurm" / sub / "plan.json").read_text())
        assert plan["target"] == "coco-labels", seen["store_branches"]
    keys = set(seen["keys"].split())
    assert len(keys) == SPEC.sessions[0]  # subj01's sessions only
    assert keys <= seen["store_objects"]
    assert seen["scratch"] == []  # every job clone was removed, the failed one too


@on_slurm
def test_resubmit_runs_only_the_failed_step(run: dict) -> None:
    rc, out, _ = run["3mm_again"]
    assert rc == 0, out
    assert "submitted 1 step(s) of `make 3mm`" in out and "task 0: 3mm subj02" in out, out
    assert "(1 task(s)): 1 merged, 0 failed" in out, out
    rc, out, _ = run["3mm_third"]
    assert rc == 0 and "nothing to submit" in out, out
    # the records made on SLURM have the fingerprints a local run computes: up to date
    rc, out, _ = run["3mm_local_after"]
    assert rc == 0 and out.count("up to date") == len(SPEC.sessions), out


@on_slurm
def test_unfinished_submission_is_merged_by_the_next_one(run: dict) -> None:
    rc, out, _ = run["curated"]
    assert "submitted 1 step(s) of `make curated`" in out and "merged into" not in out, out
    rc, out, _ = run["decode"]
    assert re.search(r"submission \S+ \(SLURM jobs \d+,\d+\) was not finished", out), out
    merged = out.index("`make curated` (1 task(s)): 1 merged, 0 failed")
    assert merged < out.index("submitted 1 step(s) of `make decode`"), out


@on_slurm
def test_slurm_outputs_have_the_keys_of_the_local_run(run: dict) -> None:
    assert [rc for rc, _, _ in run["local"]] == [0, 0, 0, 0], run["local"][-1][1]
    ds, ref = run["ds"], run["ref"]
    mine, theirs = _derivatives(ds), _derivatives(ref)
    assert len(mine) > 20 and set(mine) == set(theirs)
    differ = sorted(p for p in mine if mine[p] != theirs[p])
    assert differ == [], differ  # every file: the same annex key or git blob
    # the same run records: identical messages (step name + inputs' fingerprint) and commands
    grep = ["log", "--format=%B", "--grep=^\\[DATALAD RUNCMD\\]"]
    records = [_records(git_out(d, *grep)) for d in (ds, ref)]
    assert len(records[0]) == 3 + len(SPEC.sessions) and records[0] == records[1]
    # the content is here, as after a local run
    assert git_out(ds, "annex", "find", "--not", "--in", "here", "derivatives") == ""


def _derivatives(ds: Path) -> dict[str, str]:
    """``{path: git object}`` of every derivative (for annexed files the object names the key)."""
    lines = git_out(ds, "ls-files", "-s", "derivatives").splitlines()
    return {ln.split("\t")[1]: ln.split()[1] for ln in lines}


def _records(log: str) -> set[tuple[str, str]]:
    subjects = re.findall(r"^\[DATALAD RUNCMD\] (.*)$", log, re.M)
    cmds = re.findall(r'^ "cmd": "(.*)",$', log, re.M)
    return set(zip(subjects, cmds, strict=True))


@on_slurm
def test_history_holds_run_records_and_merges(run: dict) -> None:
    log = git_out(run["ds"], "log", "--format=%p|%s", f"{run['head_before_3mm']}~1..HEAD")
    commits = [ln.split("|", 1) for ln in log.splitlines()]
    merges = [(subject, parents.split()) for parents, subject in commits if " " in parents]
    assert len(merges) == 5, log  # coco-labels, 3mm twice, curated, decode
    assert all(s.startswith("Merge SLURM job") and len(p) == 2 for s, p in merges), log
    runs = [s for _, s in commits if s.startswith("[DATALAD RUNCMD] [nsdprep] 3mm")]
    assert len(runs) == len(SPEC.sessions), log


@on_slurm
def test_datalad_rerun_of_a_slurm_record_reproduces_it(run: dict) -> None:
    assert run["rerun_commit"]
    rc, out, _ = run["rerun"]
    assert rc == 0, out
    assert run["head_after_rerun"] == run["head_before_rerun"]  # identical outputs: no new commit
    assert git_out(run["ds"], "status", "--porcelain") == ""


@on_slurm
def test_summary(run: dict, capsys: pytest.CaptureFixture[str]) -> None:
    """Print what the issue asks to show: tasks, wall times, overhead next to compute, keys."""
    lines = []
    for key in ("3mm_first", "3mm_again", "decode"):
        rc, out, seconds = run[key]
        tasks = re.search(r"submitted (\d+) step", out)
        assert tasks, out
        lines.append(f"make {key.split('_')[0]} BACKEND=slurm WAIT=1 (exit {rc}): "
                     f"{tasks.group(1)} array task(s), {seconds:.1f} s wall")  # fmt: skip
        report = [ln for ln in out.splitlines() if ln.startswith(("  ok", "per task", "merged"))]
        overhead = re.search(r"overhead \(clone \+ push\) mean ([\d.]+) s", "\n".join(report))
        assert overhead and float(overhead.group(1)) > 0, out
        lines += report
    ours, theirs = _derivatives(run["ds"]), _derivatives(run["ref"])
    same = sum(ours.get(p) == k for p, k in theirs.items())
    lines.append(
        f"derivatives: {same} of {len(theirs)} files have the local run's annex key / git blob"
    )
    lines += [f"{key}: {value:.1f} s" for key, value in run["seconds"].items()]
    with capsys.disabled():
        print("\n" + "\n".join(lines))


# ------------------------------------------------------------------------------------------------
# without a cluster (part of `make test`)


def _git_init(path: Path) -> Path:
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    return path


def test_submit_without_slurm_commands_says_where_to_run(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(slurm_submit.shutil, "which", lambda tool: None)
    with pytest.raises(UsageError, match=r"sbatch, squeue, scontrol not found on PATH.*login node"):
        slurm_submit.submit("3mm", tmp_path, Options(backend="slurm"))


def test_backend_slurm_runs_only_datalad_run_targets(git_env, tmp_path: Path) -> None:
    ds = _git_init(tmp_path / "ds")
    with pytest.raises(UsageError, match="BACKEND=slurm runs coco-labels, 3mm, curated, decode"):
        build.run_target("rerun", ds, Options(backend="slurm"))
    proc = subprocess.run(
        [sys.executable, "-m", "nsdprep", "build", "3mm", "BACKEND=cloud"],
        cwd=ds, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2 and "BACKEND takes one of local, slurm" in proc.stderr


def test_an_output_store_is_required(tmp_path: Path) -> None:
    ds = _git_init(tmp_path / "ds")
    with pytest.raises(UsageError, match=r"needs an output store.*RIA=ria\+file://"):
        slurm_submit.store_url(ds, Options())
    url = "ria+file:///shared/store"
    assert slurm_submit.store_url(ds, Options(ria=url)) == url


def _plan(ds: Path, opts: Options) -> slurm_plan.Plan:
    tasks = tuple(
        slurm_plan.Task(
            step=Step("3mm", (s,), opts, (Input("in", "make inputs"),), ("out",), ("x",)),
            fingerprint=f"{s:016x}",
            branch=f"nsdprep-slurm/x/task-{i}",
        )
        for i, s in enumerate((1, 3))
    )
    return slurm_plan.Plan(
        id="x", target="3mm", dataset=str(ds), branch="main", base="0" * 40, store="ria+file:///s",
        source="ria+file:///s#id", sibling="ria", storage="ria-storage", scratch="",
        opts=opts, tasks=tasks, array_job="7", finish_job="8",
    )  # fmt: skip


def test_resubmit_command_names_the_failed_subjects_and_the_options(tmp_path: Path) -> None:
    opts = Options(
        jobs=1,
        drop=True,
        runs_per_session=6,
        trials_per_run=(8, 7),
        backend="slurm",
        slurm_opts="--time=1:00:00 --mem=4G",
        ria="ria+file:///s",
        wait=True,
    )
    plan = _plan(tmp_path, opts)
    assert plan.resubmit_command([plan.tasks[1]]) == (
        "make 3mm SUBJECTS=03 JOBS=1 DROP=1 RUNS_PER_SESSION=6 TRIALS_PER_RUN=8,7 BACKEND=slurm "
        "'SLURM_OPTS=--time=1:00:00 --mem=4G' WAIT=1 RIA=ria+file:///s"
    )
    default = _plan(tmp_path, Options(backend="slurm"))
    assert default.resubmit_command(default.tasks) == "make 3mm 'SUBJECTS=01 03' BACKEND=slurm"


def test_plan_survives_its_json_file(tmp_path: Path) -> None:
    plan = _plan(_git_init(tmp_path / "ds"), Options(backend="slurm", valid=True, permutations=20))
    plan.save()
    assert (tmp_path / "ds/.git/nsdprep-slurm/x/plan.json").is_file()
    assert slurm_plan.Plan.load(plan.folder) == plan
