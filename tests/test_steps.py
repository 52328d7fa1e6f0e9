"""The datalad-run driver: lock, clean-state checks, leftovers, up-to-date detection, rerun."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import git_out
from nsdprep import pipeline
from nsdprep.core import dataset
from nsdprep.core.errors import DatasetStateError, NsdPrepError
from nsdprep.drive import steps
from nsdprep.options import Options
from nsdprep.pipeline import Input, Step


@pytest.fixture
def ds(git_env, tmp_path: Path) -> Path:
    """A fresh dataset with one committed input file."""
    root = tmp_path / "ds"
    subprocess.run(["datalad", "create", "-c", "text2git", str(root)], check=True, env=git_env)
    (root / "in.txt").write_text("1\n2\n3\n")
    subprocess.run(["datalad", "save", "-d", str(root), "-m", "input"], check=True, env=git_env)
    return root


@pytest.fixture(autouse=True)
def _own_stages():
    """The stages these tests register are gone afterwards."""
    before = dict(pipeline.STAGES)
    yield
    pipeline.STAGES.clear()
    pipeline.STAGES.update(before)


def script_step(name: str, program: tuple[str, ...], inputs: tuple[str, ...], out: str) -> Step:
    """A step of a one-off stage ``name`` that runs ``program`` (registered for this test only)."""
    pipeline.STAGES[name] = pipeline.Stage(
        target=name, command=name, module="", help="", needs=(), fetches=False, cut="none",
        variant=lambda opts: "", args=lambda step: (), inputs=lambda ds, opts, subjects: (),
        outputs=lambda opts, subjects: (out,), estimate=lambda ds, step, total: 0,
        program=program,
    )  # fmt: skip
    return Step(name, (), Options(), tuple(Input(p, "make it") for p in inputs), (out,))


def _step(code: str = "", name: str = "sum") -> Step:
    script = (
        "import pathlib,sys;"
        "n=sum(int(x) for x in pathlib.Path('in.txt').read_text().split());"
        f"{code}"
        "pathlib.Path('out').mkdir(exist_ok=True);"
        "pathlib.Path('out/sum.txt').write_text(str(n))"
    )
    return script_step(name, (sys.executable, "-c", script), ("in.txt",), "out")


def _n_commits(ds: Path) -> int:
    return int(git_out(ds, "rev-list", "--count", "HEAD"))


def test_run_records_and_second_call_does_nothing(ds: Path) -> None:
    step = _step()
    assert steps.execute(ds, step) == "ran"
    assert (ds / "out/sum.txt").read_text() == "6"
    msg = git_out(ds, "log", "-1", "--format=%B")
    assert "[DATALAD RUNCMD]" in msg and "[nsdprep] sum (inputs " in msg
    n = _n_commits(ds)
    assert steps.execute(ds, step) == "up-to-date"
    assert _n_commits(ds) == n


def test_changed_inputs_need_force(ds: Path, git_env) -> None:
    step = _step()
    steps.execute(ds, step)
    (ds / "in.txt").write_text("10\n")
    subprocess.run(["datalad", "save", "-d", str(ds), "-m", "new input"], check=True, env=git_env)
    with pytest.raises(DatasetStateError, match="inputs changed since .* FORCE=1"):
        steps.execute(ds, step)
    assert (ds / "out/sum.txt").read_text() == "6"
    assert steps.execute(ds, step, force=True) == "ran"
    assert (ds / "out/sum.txt").read_text() == "10"


def test_dirty_dataset_is_refused_with_what_to_do(ds: Path) -> None:
    (ds / "notes.txt").write_text("mine")
    with pytest.raises(
        DatasetStateError, match=r"(?s)uncommitted changes.*notes\.txt.*datalad save"
    ):
        steps.execute(ds, _step())
    assert (ds / "notes.txt").read_text() == "mine"  # the user's file is never touched
    assert not (ds / "out").exists()


def test_failed_run_leaves_last_recorded_state(ds: Path) -> None:
    steps.execute(ds, _step())
    before = git_out(ds, "rev-parse", "HEAD")
    # writes a partial output, then fails
    bad = _step(
        "pathlib.Path('out').mkdir(exist_ok=True);pathlib.Path('out/half.txt').write_text('x');"
        "sys.exit('boom');"
    )
    with pytest.raises(NsdPrepError, match="failed .* nothing was recorded"):
        steps.execute(ds, bad, force=True)
    assert git_out(ds, "rev-parse", "HEAD") == before
    assert not (ds / "out/half.txt").exists()
    assert (ds / "out/sum.txt").read_text() == "6"
    assert dataset.dirty_paths(ds) == []


def test_leftovers_of_an_interrupted_run_are_removed(ds: Path) -> None:
    step = _step()
    (ds / "out").mkdir()
    (ds / "out" / "sum.txt").write_text("partial")  # as if killed before datalad saved
    assert steps.execute(ds, step) == "ran"
    assert (ds / "out/sum.txt").read_text() == "6"


def _writer(out: str) -> Step:
    script = (
        f"import pathlib;pathlib.Path('{out}').mkdir();pathlib.Path('{out}/a.txt').write_text('a')"
    )
    return script_step(f"write-{out}", (sys.executable, "-c", script), ("in.txt",), out)


def test_run_killed_in_a_later_step_is_resumed_from_the_first(ds: Path) -> None:
    # `make 3mm` is one step per subject; a kill in the second leaves its outputs behind, and the
    # next run, which starts with the (up-to-date) first step, must clean them, not refuse them.
    plan = [_writer("one"), _writer("two")]
    steps.execute(ds, plan[0])
    (ds / "two").mkdir()
    (ds / "two" / "a.txt").write_text("partial")  # never recorded
    (ds / "two" / "b.nii.gz.part").write_text("partial")
    head = git_out(ds, "rev-parse", "HEAD").strip()
    steps.run_plan(ds, plan)
    assert (ds / "two/a.txt").read_text() == "a"
    assert not (ds / "two/b.nii.gz.part").exists()
    assert git_out(ds, "rev-list", "--count", f"{head}..HEAD").strip() == "1"  # only step two ran
    assert dataset.dirty_paths(ds) == []


def test_concurrent_run_is_refused(ds: Path) -> None:
    # another process holds the dataset's lock (POSIX locks are per process, so not this one)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys,time; from nsdprep.core import dataset\n"
         "with dataset.lock(sys.argv[1], 'make 3mm'):\n print('held', flush=True); time.sleep(60)",
         str(ds)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DatasetStateError, match=r"in progress .*\(pid \d+: make 3mm\)"):
            with dataset.lock(ds, "test"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with dataset.lock(ds, "test"):  # free again once the holder is gone
        pass


def test_rerun_reproduces_identical_output(ds: Path, git_env) -> None:
    steps.execute(ds, _step())
    key_before = git_out(ds, "ls-files", "-s", "out")
    subprocess.run(["datalad", "rerun"], cwd=ds, check=True, env=git_env)
    assert git_out(ds, "ls-files", "-s", "out") == key_before
    assert dataset.dirty_paths(ds) == []


def test_unregistered_input_is_a_clear_error(ds: Path) -> None:
    step = script_step("x", ("true",), ("missing.txt",), "out")
    with pytest.raises(DatasetStateError, match="input missing.txt has not been made yet"):
        steps.execute(ds, step)


def _annexed_input_step(ds: Path, git_env) -> Step:
    """A step whose one input, ``blob.bin``, is an annexed (binary) file of ``ds``."""
    (ds / "blob.bin").write_bytes(bytes(range(256)) * 4)
    subprocess.run(["datalad", "save", "-d", str(ds), "-m", "blob"], check=True, env=git_env)
    assert (ds / "blob.bin").is_symlink()  # annexed, locked
    copy = "import shutil; shutil.copy('blob.bin', 'copy.bin')"
    return script_step("copy", (sys.executable, "-c", copy), ("blob.bin",), "copy.bin")


def test_inputs_at_hand_skip_the_fetch_absent_content_is_fetched(
    ds: Path, git_env, monkeypatch: pytest.MonkeyPatch
) -> None:
    step = _annexed_input_step(ds, git_env)
    fetched: list[str] = []
    real_fetch = steps.fetch_inputs
    monkeypatch.setattr(steps, "fetch_inputs", lambda d, s: fetched.append(s.name))
    assert steps.inputs_at_hand(ds, step, steps._input_sizes(ds, step))
    assert steps.execute(ds, step) == "ran"
    assert fetched == []  # content present: no `datalad get`

    # content gone from this clone (git-annex knows it): the step fetches before it runs
    subprocess.run(["git", "annex", "drop", "--force", "blob.bin"], cwd=ds, check=True, env=git_env)
    assert not steps.inputs_at_hand(ds, step, steps._input_sizes(ds, step))
    with pytest.raises(NsdPrepError):
        steps.execute(ds, step, force=True)  # fake fetch: the content stays absent, the copy fails
    assert fetched == ["copy"]
    monkeypatch.setattr(steps, "fetch_inputs", real_fetch)
    with pytest.raises(Exception, match="blob.bin"):
        steps.execute(ds, step, force=True)  # no copy anywhere: a real fetch says which file


def test_content_removed_behind_git_annex_is_not_at_hand(ds: Path, git_env) -> None:
    step = _annexed_input_step(ds, git_env)
    obj = (ds / "blob.bin").resolve()
    obj.parent.chmod(0o755)
    obj.unlink()  # the location log still says here; the link no longer resolves
    sizes = steps._input_sizes(ds, step)
    assert [present for _, present in sizes] == [False]
    assert not steps.inputs_at_hand(ds, step, sizes)


def test_missing_input_subdataset_or_path_is_not_at_hand(ds: Path, git_env) -> None:
    step = _annexed_input_step(ds, git_env)
    sizes = steps._input_sizes(ds, step)
    assert steps.inputs_at_hand(ds, step, sizes)
    nowhere = script_step("copy2", ("true",), ("blob.bin", "absent.bin"), "copy2.bin")
    assert not steps.inputs_at_hand(ds, nowhere, steps._input_sizes(ds, nowhere))
    (ds / "inputs" / "nsd").mkdir(parents=True)  # an input subdataset not installed: empty folder
    uninstalled = script_step("copy3", ("true",), ("inputs/nsd/x.nii.gz",), "copy3.bin")
    assert not steps.inputs_at_hand(ds, uninstalled, [])
