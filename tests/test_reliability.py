"""Faults a user meets, seen through ``make`` in temporary clones: what they read, what is left on disk.

One small dataset is built once (``make inputs`` + ``make coco-labels`` against a loopback mirror of
synthetic data); every test works in its own ``datalad clone`` of it, as a collaborator would, and drives
``make`` as a subprocess. Each test checks both the message and the state afterwards: files, ``git status``,
``HEAD``, no ``*.part`` temporaries.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import REPO_ROOT, git_out, register_as_before_etags
from nsdprep.core.nsd import Layout
from nsdprep.testing.demo import DemoSpec, build_demo, clone_dataset
from nsdprep.testing.serve import Mirror

VENV = Path(sys.executable).parent.parent
#: Smallest layout the stages accept: 2 subjects (2 and 1 sessions), 2 runs of 4/3 trials.
LAYOUT = DemoSpec(sessions=(2, 1), layout=Layout(2, (4, 3)))
BETAS = "inputs/nsd/nsddata_betas/ppdata/subj{s:02d}/MNI/betas_fithrf/betas_session{n:02d}.nii.gz"
pytestmark = pytest.mark.datalad


def _status(ds: Path) -> str:
    return git_out(ds, "status", "--porcelain", "--untracked-files=all")


def _head(ds: Path) -> str:
    return git_out(ds, "rev-parse", "HEAD").strip()


def _parts(ds: Path) -> list[Path]:
    return sorted(p for p in (ds / "derivatives").rglob("*.part"))


@pytest.fixture(scope="module")
def origin(env, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared dataset: inputs registered, coco-labels made, no betas content fetched."""
    work = tmp_path_factory.mktemp("reliability")
    return build_demo(
        work, VENV, REPO_ROOT, LAYOUT, targets=("coco-labels",), overlay=True, env=env
    )


@pytest.fixture(scope="module")
def served(origin: Path) -> Iterator[Mirror]:
    """The mirror again, on the port the inputs were registered with (their URLs name it)."""
    url = git_out(origin / "inputs/nsd", "annex", "whereis", "--json", "--", _key(1, 1))
    port = int(re.search(r"http://127\.0\.0\.1:(\d+)/nsd/", url).group(1))
    with Mirror(origin.parent / "synth", port=port) as mirror:
        yield mirror


def _key(subject: int, session: int) -> str:
    return BETAS.format(s=subject, n=session).removeprefix("inputs/nsd/")


@pytest.fixture
def clone(origin: Path, served: Mirror, env, tmp_path: Path) -> Path:
    """A collaborator's clone of the shared dataset, subdatasets installed (content not fetched)."""
    return _clone(origin, tmp_path / "clone", env)


def _clone(origin: Path, dest: Path, env) -> Path:
    subprocess.run(["datalad", "clone", str(origin), str(dest)], check=True, env=env,
                   capture_output=True)  # fmt: skip
    subprocess.run(["datalad", "get", "-n", "inputs/nsd", "inputs/coco"], check=True, env=env,
                   cwd=dest, capture_output=True)  # fmt: skip
    _skip_pip(dest)
    return dest


def _skip_pip(ds: Path) -> None:
    """A fresh checkout's requirements.txt is newer than the venv stamp; the venv is current."""
    os.utime(ds / "requirements.txt", (0, 0))


def _make_cmd(ds: Path, *args: str) -> list[str]:
    return ["make", "--no-print-directory", "-C", str(ds), *args, f"VENV={VENV}",
            *LAYOUT.make_vars(), "JOBS=2"]  # fmt: skip


def make(ds: Path, env, *args: str) -> tuple[int, str]:
    """Run make like a user; return (exit code, everything printed)."""
    proc = subprocess.run(
        _make_cmd(ds, *args), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    return proc.returncode, proc.stdout


@contextlib.contextmanager
def popen_make(ds: Path, env, log: Path, *args: str) -> Iterator[subprocess.Popen]:
    """Start make in its own process group (so the whole tree can be signalled)."""
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            _make_cmd(ds, *args), env=env, stdout=fh, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            yield proc
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGCONT)
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def kill_at_first_output(ds: Path, env, log: Path, out: Path, *args: str) -> None:
    """Run ``make *args`` and SIGKILL its whole process group as soon as a file appears in ``out``."""
    seen: list[str] = []
    with popen_make(ds, env, log, *args) as proc:
        while proc.poll() is None:
            if out.is_dir():
                seen = [p.name for p in out.rglob("*") if p.is_file()]
                if seen:
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
            time.sleep(0.002)
        rc = proc.wait()
    assert seen, f"make {' '.join(args)} finished before any output appeared (rc {rc})"
    assert rc != 0


def _readable(path: Path) -> bool:
    try:
        img = nib.load(path)
        np.asarray(img.dataobj)
    except Exception:
        return False
    return True


# ------------------------------------------------------------------------------------------------
# 1. interrupted run


@pytest.mark.slow
def test_interrupted_3mm_recovers_to_identical_outputs(
    origin: Path, clone: Path, env, tmp_path: Path
) -> None:
    head = _head(clone)
    out = clone / "derivatives/3mm"
    kill_at_first_output(clone, env, tmp_path / "make.log", out, "3mm", "SUBJECTS=01")
    # killed before datalad recorded anything
    assert _head(clone) == head
    # nothing unreadable under a final name; only the step's own leftovers are uncommitted
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    finals = [out / p for p in left if not p.endswith(".part")]
    assert all(_readable(p) for p in finals), left
    leftovers = _status(clone).splitlines()
    assert all(line.startswith("?? derivatives/3mm/subj01/") for line in leftovers), leftovers

    rc, text = make(clone, env, "3mm", "SUBJECTS=01")
    assert rc == 0, text
    if left:
        assert "leftover(s) of an interrupted or failed run" in text, text
    assert _status(clone) == ""
    assert not _parts(clone)
    assert git_out(clone, "log", "-1", "--format=%s").startswith(
        "[DATALAD RUNCMD] [nsdprep] 3mm subj01"
    )
    got = git_out(clone, "ls-files", "-s", "derivatives/3mm")

    # an uninterrupted run in another clone gives the same annex keys (MD5E: identical bytes)
    other = _clone(origin, tmp_path / "other", env)
    rc, text = make(other, env, "3mm", "SUBJECTS=01")
    assert rc == 0, text
    assert git_out(other, "ls-files", "-s", "derivatives/3mm") == got
    assert got.count("betas_session") == LAYOUT.sessions[0]


def _outputs(ds: Path, subject: int) -> list[str]:
    out = ds / f"derivatives/3mm/subj{subject:02d}"
    return sorted(p.name for p in out.rglob("*")) if out.exists() else []


def _assert_untouched(ds: Path, head: str) -> None:
    assert _head(ds) == head
    assert _status(ds) == ""
    assert not _parts(ds)


# ------------------------------------------------------------------------------------------------
# 2. corrupted input content


def _make_3mm_from_damaged_server(
    clone: Path, served: Mirror, env, target: str = "3mm"
) -> tuple[int, str, bytes]:
    """``make 3mm SUBJECTS=02`` while the server sends subj02's betas with 64 bytes flipped."""
    src = served.root / "nsd" / _key(2, 1)
    original = src.read_bytes()
    damaged = bytearray(original)
    mid = len(damaged) // 2
    damaged[mid : mid + 64] = bytes(b ^ 0xFF for b in damaged[mid : mid + 64])
    try:
        src.write_bytes(bytes(damaged))
        rc, text = make(clone, env, target, "SUBJECTS=02")
    finally:
        src.write_bytes(original)
    return rc, text, bytes(damaged)


def test_corrupted_betas_fail_naming_the_file(clone: Path, served: Mirror, env) -> None:
    """A file registered before ETags were recorded (a VURL key knows only the size): same-size
    damage on the server is accepted by the first download; reading the gzip stream must then fail
    with the file named and nothing recorded."""
    register_as_before_etags(clone, [_key(2, 1)])
    head = _head(clone)
    rc, text, damaged = _make_3mm_from_damaged_server(clone, served, env)
    assert rc != 0
    assert (clone / BETAS.format(s=2, n=1)).read_bytes() == damaged  # it was fetched
    line = next(x for x in text.splitlines() if "nsdprep resample: error:" in x)
    assert "betas_session01.nii.gz" in line, text
    assert "3mm subj02 failed" in text and "nothing was recorded" in text, text
    assert _outputs(clone, 2) == []
    _assert_untouched(clone, head)


@pytest.mark.slow
def test_corrupted_betas_recover_after_drop(clone: Path, served: Mirror, env) -> None:
    """The damaged first download recorded its checksum (VURL key); `make repair` recovers.

    (A plain drop + get, the old advice, fails verification against that checksum: see
    ``test_faults.py::test_repair_of_a_poisoned_key_whose_content_is_absent``.) `make repair` finds
    the damaged copy, drops it, fetches a fresh one without the recorded checksum, checks it (gzip
    stream and CRC; the file has no recorded ETag, and the server's word is not taken) and re-keys
    the file to MD5E of the good copy. The file is one registered before ETags were recorded: since
    then a single-part file has its MD5 key from the start and this cannot happen.
    """
    register_as_before_etags(clone, [_key(2, 1)])
    betas = BETAS.format(s=2, n=1)
    rc, text, damaged = _make_3mm_from_damaged_server(clone, served, env)
    assert rc != 0
    assert "`make repair SUBJECTS=" in text, text  # the failure says what to do
    assert (clone / betas).read_bytes() == damaged  # present, and its checksum recorded
    assert git_out(clone / "inputs/nsd", "annex", "lookupkey", _key(2, 1)).startswith("VURL-")

    head = _head(clone)
    rc, text = make(clone, env, "repair", "SUBJECTS=02")
    assert rc == 0, text
    assert "Traceback" not in text
    new_key = git_out(clone / "inputs/nsd", "annex", "lookupkey", _key(2, 1)).strip()
    good = (served.root / "nsd" / _key(2, 1)).read_bytes()
    assert new_key == f"MD5E-s{len(good)}--{hashlib.md5(good).hexdigest()}.nii.gz"
    assert (clone / betas).read_bytes() == good
    assert _head(clone) != head and _status(clone) == ""
    assert git_out(clone, "log", "-1", "--format=%s").startswith("Repair 1 input file(s)")
    git_out(clone / "inputs/nsd", "annex", "fsck", "--", _key(2, 1))  # verifies against MD5E

    rc, text = make(clone, env, "3mm", "SUBJECTS=02")
    assert rc == 0, text
    assert _readable(clone / "derivatives/3mm/subj02/betas_session01.nii.gz")
    # nothing left to repair: no new commit
    head = _head(clone)
    rc, text = make(clone, env, "repair", "SUBJECTS=02")
    assert rc == 0 and _head(clone) == head, text
    # the new key cannot be poisoned: a damaged server copy now fails verification at once
    subprocess.run(["datalad", "drop", betas], cwd=clone, env=env, check=True,
                   capture_output=True)  # fmt: skip
    rc, text, _ = _make_3mm_from_damaged_server(clone, served, env, target="get")
    assert rc != 0 and "Verification of content failed" in text, text
    assert not (clone / betas).exists()


# ------------------------------------------------------------------------------------------------
# 3. dirty dataset


def test_dirty_dataset_is_refused_and_left_alone(clone: Path, env) -> None:
    head = _head(clone)
    notes = clone / "my notes.txt"
    notes.write_text("work in progress\n")
    rc, text = make(clone, env, "3mm", "SUBJECTS=02")
    assert rc != 0
    assert "has uncommitted changes" in text and "?? my notes.txt" in text, text
    assert "datalad save" in text
    assert notes.read_text() == "work in progress\n"
    assert _head(clone) == head
    assert _status(clone) == '?? "my notes.txt"\n'
    assert _outputs(clone, 2) == []


# ------------------------------------------------------------------------------------------------
# 4. input content missing


def test_missing_content_named_by_stage_fetched_by_make(clone: Path, env) -> None:
    betas = BETAS.format(s=2, n=1)
    for action in ("get", "drop"):
        subprocess.run(["datalad", action, betas], cwd=clone, env=env, check=True,
                       capture_output=True)  # fmt: skip
    assert not (clone / betas).exists()  # a dangling annex symlink
    head = _head(clone)
    cmd = [sys.executable, "-m", "nsdprep", "resample", "--nsd", "inputs/nsd", "--subject", "2"]
    cmd += ["--out", "derivatives/3mm/subj02"]
    proc = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "content of 1 betas file(s) absent" in proc.stderr, proc.stderr
    assert "datalad get" in proc.stderr and "make get SUBJECTS=02" in proc.stderr
    assert _outputs(clone, 2) == []
    _assert_untouched(clone, head)

    rc, text = make(clone, env, "3mm", "SUBJECTS=02")  # make fetches the declared inputs
    assert rc == 0, text
    assert (clone / betas).is_file(), text  # fetched (and checked against its pin), then kept
    assert _outputs(clone, 2) == ["betas_session01.nii.gz"]
    assert _readable(clone / "derivatives/3mm/subj02/betas_session01.nii.gz")
    assert _status(clone) == ""
    assert git_out(clone, "log", "-1", "--format=%s").startswith(
        "[DATALAD RUNCMD] [nsdprep] 3mm subj02"
    )


@pytest.mark.slow
def test_bounded_disk_mode_gets_processes_and_drops(clone: Path, env) -> None:
    """make 3mm DROP=1: each session is fetched, processed and dropped; nothing stays in the annex."""
    nsd = clone / "inputs/nsd"
    subj01 = "nsddata_betas/ppdata/subj01"
    assert git_out(nsd, "annex", "find", "--in", "here", subj01).strip() == ""
    rc, text = make(clone, env, "3mm", "SUBJECTS=01", "DROP=1")
    assert rc == 0, text
    assert "datalad drop" in text, text
    assert git_out(nsd, "annex", "find", "--in", "here", subj01).strip() == ""  # dropped again
    outputs = _outputs(clone, 1)
    assert outputs == [f"betas_session{s:02d}.nii.gz" for s in range(1, LAYOUT.sessions[0] + 1)]
    for name in outputs:
        assert _readable(clone / "derivatives/3mm/subj01" / name)
    assert _status(clone) == ""
    # the same outputs as the ordinary mode (inputs fetched up front), byte for byte
    keys = git_out(clone, "ls-files", "-s", "derivatives/3mm/subj01")
    rc, text = make(clone, env, "3mm", "SUBJECTS=01", "FORCE=1")
    assert rc == 0, text
    assert git_out(clone, "ls-files", "-s", "derivatives/3mm/subj01") == keys


# ------------------------------------------------------------------------------------------------
# 5. two invocations at once


@pytest.mark.slow
def test_concurrent_make_is_refused(origin: Path, clone: Path, env, tmp_path: Path) -> None:
    lock = clone / ".git/nsdprep-run.holder"
    start = _head(clone)
    with popen_make(clone, env, tmp_path / "first.log", "3mm") as first:
        while first.poll() is None and not (lock.exists() and lock.read_text().strip()):
            time.sleep(0.01)
        assert first.poll() is None, (tmp_path / "first.log").read_text()
        holder = lock.read_text()
        # hold the first run still while the second one starts (as if suspended with Ctrl-Z)
        os.killpg(first.pid, signal.SIGSTOP)
        try:
            rc, text = make(clone, env, "curated")
        finally:
            os.killpg(first.pid, signal.SIGCONT)
        first_rc = first.wait()
    assert "make 3mm" in holder
    assert rc != 0
    line = next(x for x in text.splitlines() if "another nsdprep run is in progress" in x)
    assert holder in line
    assert first_rc == 0, (tmp_path / "first.log").read_text()
    subprocess.run(["git", "-C", str(clone), "fsck", "--no-progress"], check=True,
                   capture_output=True)  # fmt: skip
    assert _status(clone) == ""
    assert git_out(clone, "rev-list", "--merges", f"{start}..HEAD") == ""
    subjects = git_out(clone, "log", "--format=%s", f"{start}..HEAD").splitlines()
    # one run record per step, nothing from the refused invocation
    assert sorted(re.sub(r" \(inputs [0-9a-f]+\)$", "", x) for x in subjects) == [
        "[DATALAD RUNCMD] [nsdprep] 3mm subj01",
        "[DATALAD RUNCMD] [nsdprep] 3mm subj02",
    ]
    assert not _parts(clone)
    assert lock.read_text() == ""


# ------------------------------------------------------------------------------------------------
# 6. the bucket refuses access


def test_access_denied_at_inputs_names_the_likely_causes(origin: Path, env, tmp_path: Path) -> None:
    fresh = clone_dataset(REPO_ROOT, tmp_path / "fresh", env, overlay=True)
    _skip_pip(fresh)
    head = _head(fresh)
    with Mirror(origin.parent / "synth", deny=["nsd/*"]) as mirror:
        rc, text = make(fresh, env, "inputs", f"NSD_URL={mirror.url}/nsd",
                        f"COCO_URL={mirror.url}/coco/annotations/annotations_trainval2017.zip")  # fmt: skip
    assert rc != 0
    line = next((x for x in text.splitlines() if "nsdprep inputs: error:" in x), text)
    assert "HTTP 403 Forbidden (AccessDenied)" in line, text
    assert "restricted or not yet released object, or a wrong key or URL" in line, text
    assert not (fresh / "inputs").exists()  # nothing half-made: no subdataset, no registration
    assert _head(fresh) == head
    assert _status(fresh) == ""


# ------------------------------------------------------------------------------------------------
# 7. wrong geometry / data type


def test_float32_betas_fail_before_work(clone: Path, served: Mirror, env) -> None:
    """A new session on the server in float32 (NSD betas are int16): registered, then refused."""
    ref = nib.load(served.root / "nsd" / _key(2, 1))
    bad = served.root / "nsd" / _key(2, 2)
    img = nib.Nifti1Image(np.asarray(ref.dataobj).astype(np.float32), ref.affine)
    try:
        nib.save(img, bad)
        rc, text = make(clone, env, "inputs", f"NSD_URL={served.url}/nsd",
                        f"COCO_URL={served.url}/coco/annotations/annotations_trainval2017.zip")  # fmt: skip
    finally:
        bad_bytes = bad.read_bytes()
        bad.unlink()
    assert rc == 0, text
    head = _head(clone)
    assert _status(clone) == ""
    try:
        bad.write_bytes(bad_bytes)
        rc, text = make(clone, env, "3mm", "SUBJECTS=02")
    finally:
        bad.unlink()
    assert rc != 0
    line = next(x for x in text.splitlines() if "nsdprep resample: error:" in x)
    assert "betas_session02.nii.gz" in line and "int16" in line and "float32" in line, text
    assert "session/s" not in text  # refused at the header checks, before any worker started
    assert _outputs(clone, 2) == []
    _assert_untouched(clone, head)


@pytest.mark.slow
def test_interrupted_curated_recovers(clone: Path, env, tmp_path: Path) -> None:
    rc, text = make(clone, env, "3mm")
    assert rc == 0, text
    head = _head(clone)
    out = clone / "derivatives/curated_3mm"
    kill_at_first_output(clone, env, tmp_path / "make.log", out, "curated")
    assert _head(clone) == head
    left = sorted(p.name for p in out.rglob("*") if p.is_file())
    finals = [out / p for p in left if not p.endswith(".part")]
    assert all(_readable(p) for p in finals if p.name.endswith(".nii.gz")), left
    leftovers = _status(clone).splitlines()
    assert all(line.startswith("?? derivatives/curated_3mm/") for line in leftovers), leftovers

    rc, text = make(clone, env, "curated")
    assert rc == 0, text
    if leftovers:
        assert "leftover(s) of an interrupted or failed run" in text, text
    assert _status(clone) == ""
    assert not _parts(clone)
    got = git_out(clone, "ls-files", "-s", "derivatives/curated_3mm")
    assert got.count("sub-0") == 2 * 6  # data, matrix, mask, labels, runs, trials per subject
    # an uninterrupted rebuild gives identical content: same keys, no new commit
    head = _head(clone)
    rc, text = make(clone, env, "curated", "FORCE=1")
    assert rc == 0, text
    assert git_out(clone, "ls-files", "-s", "derivatives/curated_3mm") == got
    assert _head(clone) == head
