"""Faults of the world around the pipeline: a flaky network, a full disk, signals to the mirror.

The mirror's fault modes are checked on their own first; then ``make`` runs against them in copies
of one registered dataset. A full disk is injected in-process at each big write site (a 3 mm
session, the curated 4D file, the merged COCO JSON: ``ENOSPC`` from the file object) and, as root,
met for real on a small tmpfs mounted for the test.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import REPO_ROOT, git_out, register_as_before_etags
from nsdprep.core import nifti
from nsdprep.core._io import DiskFullError, describe_os_error, require_free_space
from nsdprep.core.nsd import Layout
from nsdprep.stages.labels import instances as coco_instances
from nsdprep.stages.resample import resample_session
from nsdprep.testing.demo import DemoSpec, user_clone
from nsdprep.testing.serve import Mirror
from nsdprep.testing.synth import make_synthetic

VENV = Path(sys.executable).parent.parent
SPEC = DemoSpec(sessions=(2, 1), layout=Layout(2, (4, 3)))
BETAS = "nsddata_betas/ppdata/subj{s:02d}/MNI/betas_fithrf/betas_session{n:02d}.nii.gz"


# ------------------------------------------------------------------------------------------------
# the mirror's flaky-network faults and its signal handling


@pytest.fixture
def small_tree(tmp_path: Path) -> Path:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "obj").write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    return tmp_path


def _get(mirror: Mirror, path: str, timeout: float = 10) -> bytes:
    host, port = mirror.url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().read()
    finally:
        conn.close()


def test_reset_after_n_bytes_for_the_first_k_downloads(small_tree: Path) -> None:
    data = (small_tree / "b" / "obj").read_bytes()
    with Mirror(small_tree) as mirror:
        mirror.reset_after("b/*", 100_000, times=2)
        for _ in range(2):
            with pytest.raises((ConnectionResetError, http.client.IncompleteRead)):
                _get(mirror, "/b/obj")
        assert _get(mirror, "/b/obj") == data  # the third download is served normally
        assert mirror.fault_hits() == 2


def test_stall_after_n_bytes_then_serves(small_tree: Path) -> None:
    data = (small_tree / "b" / "obj").read_bytes()
    with Mirror(small_tree) as mirror:
        mirror.stall_after("b/obj", 100_000, seconds=5, times=1)
        t0 = time.monotonic()
        with pytest.raises((TimeoutError, http.client.IncompleteRead)):
            _get(mirror, "/b/obj", timeout=1)
        assert time.monotonic() - t0 < 4  # the client gave up; the server was still silent
        assert _get(mirror, "/b/obj") == data
        assert mirror.fault_hits("b/obj") == 1


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_stops_on_signal_even_with_sigint_inherited_ignored(
    small_tree: Path, sig: signal.Signals
) -> None:
    """As a background job of a non-interactive shell starts it: SIGINT arrives ignored."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "code")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nsdprep", "serve", str(small_tree)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=_ignore_sigint,
    )  # fmt: skip
    try:
        assert proc.stdout.readline().startswith("NSD_URL=http://127.0.0.1:")
        t0 = time.monotonic()
        proc.send_signal(sig)
        rc = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0, proc.stderr.read()
    assert time.monotonic() - t0 < 5
    assert "Traceback" not in proc.stderr.read()


def test_background_job_of_a_non_interactive_shell_stops_the_mirror(small_tree: Path) -> None:
    """The real thing: ``bash -c 'nsdprep serve DIR & ...; kill -INT $!'``."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "code")}
    script = (
        f"{sys.executable} -m nsdprep serve {small_tree} > serve.log 2>&1 & pid=$!; "
        "for i in $(seq 100); do grep -q serving serve.log && break; sleep 0.1; done; "
        "kill -INT $pid; wait $pid"
    )
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", "-c", script], cwd=small_tree, env=env, timeout=30, capture_output=True
    )
    assert proc.returncode == 0, (small_tree / "serve.log").read_text()
    assert time.monotonic() - t0 < 20


# ------------------------------------------------------------------------------------------------
# a flaky network through make


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mirror]:
    root = tmp_path_factory.mktemp("faults-synth")
    make_synthetic(root, SPEC.synth_spec())
    with Mirror(root) as mirror:
        yield mirror


@pytest.fixture(scope="module")
def registered(env, served: Mirror, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's clone after ``make inputs`` (nothing fetched), shared read-only by the tests."""
    ds = user_clone(REPO_ROOT, tmp_path_factory.mktemp("faults") / "ds", env, overlay=True)
    os.utime(ds / "requirements.txt", (0, 0))
    rc, text = run_make(ds, env, "inputs", *urls(served))
    assert rc == 0, text
    return ds


def urls(mirror: Mirror) -> tuple[str, str]:
    return (
        f"NSD_URL={mirror.url}/nsd",
        f"COCO_URL={mirror.url}/coco/annotations/annotations_trainval2017.zip",
    )


def run_make(ds: Path, env, target: str, *args: str) -> tuple[int, str]:
    cmd = ["make", "--no-print-directory", "-C", str(ds), target, f"VENV={VENV}",
           *SPEC.make_vars(), *args]  # fmt: skip
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc.returncode, proc.stdout


@pytest.fixture
def ds(registered: Path, served: Mirror, tmp_path: Path) -> Iterator[Path]:
    copy = tmp_path / "ds"
    shutil.copytree(registered, copy, symlinks=True)
    yield copy
    served.clear_faults()


def test_inputs_sets_the_transfer_settings(ds: Path) -> None:
    for sub in ("inputs/nsd", "inputs/coco"):
        cfg = {
            k: git_out(ds / sub, "config", "--get", k).strip()
            for k in ("annex.retry", "annex.retry-delay", "annex.stalldetection")
        }
        assert cfg == {
            "annex.retry": "3",
            "annex.retry-delay": "1",
            "annex.stalldetection": "1MiB/60s",
        }


def test_get_survives_connection_resets(ds: Path, served: Mirror, env) -> None:
    served.reset_after("nsd/nsddata_betas/ppdata/subj01/*/betas_session*", 200_000, times=3)
    rc, text = run_make(ds, env, "get", "SUBJECTS=01")
    assert rc == 0, text
    assert served.fault_hits() == 3
    nsd = ds / "inputs/nsd"
    for n in (1, 2):
        assert (nsd / BETAS.format(s=1, n=n)).read_bytes() == (
            served.root / "nsd" / BETAS.format(s=1, n=n)
        ).read_bytes()
    git_out(nsd, "annex", "fsck", "--", "nsddata_betas/ppdata/subj01")


@pytest.mark.slow
def test_3mm_drop_survives_a_stalled_transfer(ds: Path, served: Mirror, env) -> None:
    # the project's stall threshold is 1 MiB per minute; a test cannot wait a minute
    git_out(ds / "inputs/nsd", "config", "annex.stalldetection", "1KiB/2s")
    served.stall_after(f"nsd/{BETAS.format(s=1, n=1)}", 200_000, seconds=30, times=1)
    t0 = time.monotonic()
    rc, text = run_make(ds, env, "3mm", "SUBJECTS=01", "DROP=1")
    assert rc == 0, text
    assert served.fault_hits() == 1
    assert time.monotonic() - t0 < 30  # the stall was cut short, not waited out
    assert sorted(p.name for p in (ds / "derivatives/3mm/subj01").iterdir()) == [
        "betas_session01.nii.gz",
        "betas_session02.nii.gz",
    ]
    assert git_out(ds, "status", "--porcelain") == ""


def test_persistent_failure_is_one_line_naming_the_url(ds: Path, served: Mirror, env) -> None:
    key = BETAS.format(s=1, n=1)
    # reset before any byte: a connection that resets after some bytes every time still completes,
    # as each retry resumes where the last one stopped
    served.reset_after(f"nsd/{key}", 0, times=-1)
    head = git_out(ds, "rev-parse", "HEAD")
    rc, text = run_make(ds, env, "get", "SUBJECTS=01")
    assert rc == 2, text
    assert "Traceback" not in text
    lines = [x for x in text.splitlines() if x.startswith("nsdprep build: error:")]
    assert len(lines) == 1, text
    assert f"{served.url}/nsd/{key}" in lines[0], text
    assert "Connection reset by peer" in lines[0] and "annex.retry" in lines[0], text
    assert served.fault_hits() >= 3  # retried (git-annex 10.20261026: 3 tries, 1 s and 2 s apart)
    assert git_out(ds, "rev-parse", "HEAD") == head
    assert not (ds / "inputs/nsd" / key).exists()  # nothing partial under the final name


# ------------------------------------------------------------------------------------------------
# a damaged first download, repaired with its content absent; a server that stays damaged


@contextlib.contextmanager
def damaged(served: Mirror, key: str) -> Iterator[bytes]:
    """The server sends ``key`` with 64 bytes flipped in the middle (same size)."""
    src = served.root / "nsd" / key
    good = src.read_bytes()
    bad = bytearray(good)
    mid = len(bad) // 2
    bad[mid : mid + 64] = bytes(b ^ 0xFF for b in bad[mid : mid + 64])
    src.write_bytes(bytes(bad))
    try:
        yield good
    finally:
        src.write_bytes(good)


@pytest.mark.slow
def test_repair_of_a_poisoned_key_whose_content_is_absent(ds: Path, served: Mirror, env) -> None:
    """A file registered before ETags were recorded (VURL key, size only): a damaged first download
    is recorded; `make repair` is the way out. (Since ETags are recorded at `make inputs`, such a
    download is refused: ``test_pins.py``.)"""
    key = BETAS.format(s=1, n=2)
    nsd = ds / "inputs/nsd"
    register_as_before_etags(ds, [key])
    other = git_out(nsd, "annex", "lookupkey", BETAS.format(s=1, n=1))
    with damaged(served, key):
        rc, text = run_make(ds, env, "get", "SUBJECTS=01")  # accepted: only the size is known
        assert rc == 0, text
    git_out(nsd, "annex", "drop", "--", key)
    # the server is right again, but a plain get checks against the damaged copy's checksum
    rc, text = run_make(ds, env, "get", "SUBJECTS=01")
    assert rc == 2, text
    line = next(x for x in text.splitlines() if x.startswith("nsdprep build: error:"))
    assert "Verification of content failed" in line and "`make repair SUBJECTS=..`" in line
    assert f"{served.url}/nsd/{key}" in line
    head = git_out(ds, "rev-parse", "HEAD")
    # the server stays damaged: the repair refuses, naming the URL, and changes nothing
    with damaged(served, key):
        rc, text = run_make(ds, env, "repair", "SUBJECTS=01")
    assert rc == 2, text
    line = next(x for x in text.splitlines() if x.startswith("nsdprep build: error:"))
    assert "the server still sends a bad copy (the gzip stream is corrupted" in line, text
    assert f"{served.url}/nsd/{key}" in line
    assert git_out(ds, "rev-parse", "HEAD") == head and git_out(ds, "status", "--porcelain") == ""
    assert not (nsd / key).exists()
    # the server is right again. The refused repair took back the checksum git-annex had recorded
    # from the damaged download (the damaged bytes matched it): the good copy is fetched, checked
    # and its checksum recorded instead; nothing to commit
    rc, text = run_make(ds, env, "repair", "SUBJECTS=01")
    assert rc == 0, text
    good = (served.root / "nsd" / key).read_bytes()
    assert (nsd / key).read_bytes() == good
    assert git_out(ds, "rev-parse", "HEAD") == head and git_out(ds, "status", "--porcelain") == ""
    git_out(nsd, "annex", "fsck", "--", "nsddata_betas/ppdata/subj01")
    # every other file of the subject kept its key
    assert git_out(nsd, "annex", "lookupkey", BETAS.format(s=1, n=1)) == other
    # and the damaged copy is refused from now on
    git_out(nsd, "annex", "drop", "--", key)
    with damaged(served, key):
        rc, text = run_make(ds, env, "get", "SUBJECTS=01")
    assert rc == 2 and "Verification of content failed" in text, text
    assert not (nsd / key).exists()


# ------------------------------------------------------------------------------------------------
# a full disk, injected at the write sites


class _FullDisk(io.FileIO):
    """A file that takes ``limit`` bytes, then fails like a full disk."""

    limit = 0

    def write(self, b) -> int:  # noqa: ANN001
        if self.tell() + len(b) > self.limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)
        return super().write(b)


def _full_disk_open(limit: int):
    real = open

    def fake_open(file, mode="r", *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        if "w" not in mode:
            return real(file, mode, *args, **kwargs)
        raw = type("_Limited", (_FullDisk,), {"limit": limit})(file, "w")
        buffered = io.BufferedWriter(raw)
        if "b" in mode:
            return buffered
        return io.TextIOWrapper(
            buffered, encoding=kwargs.get("encoding"), newline=kwargs.get("newline")
        )

    return fake_open


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture(scope="module")
def betas_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("enospc-synth")
    make_synthetic(root, SPEC.synth_spec())
    return root / "nsd" / BETAS.format(s=1, n=1)


def test_full_disk_writing_a_3mm_session(betas_file: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "derivatives/3mm/subj01"
    out.mkdir(parents=True)
    size = resample_session(betas_file, tmp_path / "whole.nii.gz").dst.stat().st_size
    monkeypatch.setattr(nifti, "open", _full_disk_open(size // 2), raising=False)
    with pytest.raises(DiskFullError) as info:
        resample_session(betas_file, out / "betas_session01.nii.gz")
    msg = str(info.value)
    assert f"no space left in {out} while writing betas_session01.nii.gz" in msg
    n_vol = nib.load(betas_file).shape[3]
    assert re.search(r"it needs up to about \d+(\.\d)? KiB in all", msg), msg
    assert n_vol == 7
    assert "nothing was recorded" in msg
    assert _leftovers(out) == []  # no partial file, no temporary


def test_full_disk_writing_the_curated_4d_file(tmp_path: Path, monkeypatch, capsys) -> None:
    from test_curate import make_inputs, run_curate

    inp = make_inputs(tmp_path, {1: 2, 2: 2})
    whole = tmp_path / "derivatives/whole"
    assert run_curate(inp, whole) == 0
    size = (whole / "sub-01.nii.gz").stat().st_size
    out = tmp_path / "derivatives/curated_3mm"
    monkeypatch.setattr(nifti, "open", _full_disk_open(size // 2), raising=False)
    assert run_curate(inp, out) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("nsdprep ")]
    assert len(err) == 1 and err[0].startswith("nsdprep curate: error: no space left in "), err
    assert f"{out} while writing sub-01.nii.gz" in err[0]
    left = sorted(p.name for p in out.iterdir())
    # no partial file: the 4D file is absent and no temporary is left (files finished before it
    # are complete; `make curated` removes every unrecorded output after a failure)
    assert "sub-01.nii.gz" not in left and not any(n.endswith(".part") for n in left), left
    monkeypatch.undo()  # space freed: the same command now succeeds
    assert run_curate(inp, out) == 0
    assert (out / "sub-01.nii.gz").is_file()


def test_full_disk_writing_the_curated_matrix(tmp_path: Path, monkeypatch) -> None:
    """The memory-mapped ``sub-XX_X.npy``: space is reserved up front, so a full disk is a clear
    error, not a SIGBUS at the first write to an unallocated page."""
    from nsdprep.core import matrix

    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(matrix.os, "posix_fallocate", no_space)
    target = tmp_path / "derivatives/curated_3mm/sub-01_X.npy"
    mask = np.ones((13, 15, 13), dtype=bool)
    with pytest.raises(DiskFullError) as info:
        with matrix.MatrixWriter(target, mask, 700) as writer:
            writer.write(np.zeros(mask.shape, dtype=np.int16))
    msg = str(info.value)
    assert f"no space left in {target.parent} while writing sub-01_X.npy" in msg
    assert "it needs up to about 3.4 MiB in all" in msg, msg  # 700 x 2535 int16 + header
    assert _leftovers(target.parent) == []


def test_full_disk_writing_the_merged_coco_json(tmp_path: Path, monkeypatch) -> None:
    obj = {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in range(5000)]}
    target = tmp_path / "derivatives/coco/merged.json"
    monkeypatch.setattr(coco_instances, "open", _full_disk_open(30_000), raising=False)
    with pytest.raises(DiskFullError, match=rf"no space left in {target.parent} while writing "):
        coco_instances.write_json(obj, target)
    assert _leftovers(target.parent) == []


def test_clearly_too_small_is_refused_up_front(tmp_path: Path) -> None:
    with pytest.raises(DiskFullError) as info:
        require_free_space(tmp_path, 1 << 60, "3mm subj01")
    msg = str(info.value)
    assert f"not enough free space in {tmp_path} for 3mm subj01" in msg
    assert re.search(r"it needs about [\d.]+ TiB, [\d.]+ \w+ are free", msg), msg


def test_os_errors_become_one_actionable_line() -> None:
    full = OSError(errno.ENOSPC, "No space left on device", "/data/x/out.nii.gz")
    assert "free space in /data/x" in describe_os_error(full)
    ro = OSError(errno.EROFS, "Read-only file system", "/data/x")
    assert "read-only file system" in describe_os_error(ro)


# ------------------------------------------------------------------------------------------------
# a full disk for real: a small tmpfs (root only)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path, leave: int) -> Path:
    """Write a filler file so that about ``leave`` bytes stay free on ``folder``'s file system."""
    filler = folder / "filler.bin"
    free = shutil.disk_usage(folder).free
    with open(filler, "wb") as f:
        with contextlib.suppress(OSError):
            f.write(b"\0" * max(free - leave, 0))
    return filler


@pytest.mark.parametrize(
    ("target", "args", "out"),
    [
        # slow: the write sites are covered in-process above, the refusal up front below
        pytest.param("3mm", ("SUBJECTS=01",), "derivatives/3mm/subj01", marks=pytest.mark.slow),
        pytest.param("coco-labels", (), "derivatives/coco", marks=pytest.mark.slow),
        pytest.param("curated", (), "derivatives/curated_3mm", marks=pytest.mark.slow),
    ],
    ids=["3mm session", "merged COCO json", "curated 4D"],
)
def test_disk_fills_during_the_write(
    registered: Path, env, tmp_path: Path, target: str, args: tuple[str, ...], out: str
) -> None:
    """The disk fills once the stage has started (as another job would fill it): one line naming
    the folder, no partial output, no commit; once space is freed the same command succeeds."""
    with tmpfs(tmp_path / "disk", "300m") as disk:
        ds = disk / "ds"
        shutil.copytree(registered, ds, symlinks=True)
        if target == "curated":
            for prereq in ("3mm", "coco-labels"):
                rc, text = run_make(ds, env, prereq)
                assert rc == 0, text
        else:  # fetch the inputs first, so that only the outputs are left to write
            rc, text = run_make(ds, env, "get", "SUBJECTS=01")
            assert rc == 0, text
        head = git_out(ds, "rev-parse", "HEAD")
        cmd = ["make", "--no-print-directory", "-C", str(ds), target, f"VENV={VENV}",
               *SPEC.make_vars(), *args]  # fmt: skip
        filler: list[Path] = []
        lines: list[str] = []
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)  # fmt: skip

        def reader() -> None:
            for line in proc.stdout:
                lines.append(line)
                if "Command start" in line and not filler:
                    os.killpg(proc.pid, signal.SIGSTOP)  # hold the stage before its first write
                    filler.append(fill(disk, 16 << 10))
                    os.killpg(proc.pid, signal.SIGCONT)

        thread = threading.Thread(target=reader)
        thread.start()
        rc = proc.wait(timeout=300)
        thread.join(timeout=10)
        text = "".join(lines)
        assert filler, text  # the stage was reached
        assert rc == 2, text
        assert "Traceback" not in text, text
        errors = [x for x in text.splitlines() if re.match(r"nsdprep \S+: error: no space left", x)]
        assert errors, text
        assert str(ds / out) in errors[0], text
        assert git_out(ds, "rev-parse", "HEAD") == head
        assert git_out(ds, "status", "--porcelain") == ""
        assert not list((ds / "derivatives").rglob("*.part"))
        filler[0].unlink()
        rc, text = run_make(ds, env, target, *args)
        assert rc == 0, text
        assert git_out(ds, "status", "--porcelain") == ""


def test_clearly_too_small_disk_refuses_to_start(registered: Path, env, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "300m") as disk:
        ds = disk / "ds"
        shutil.copytree(registered, ds, symlinks=True)
        head = git_out(ds, "rev-parse", "HEAD")
        # subj01's two sessions are about 1.2 MB, and git-annex keeps annex.diskreserve (100 MB) free
        filler = fill(disk, 50 << 20)
        rc, text = run_make(ds, env, "3mm", "SUBJECTS=01")
        assert rc == 2, text
        line = next(x for x in text.splitlines() if x.startswith("nsdprep build: error:"))
        assert f"not enough free space in {ds}/derivatives/3mm/subj01 for 3mm subj01" in line
        assert re.search(r"it needs about 9\d\.\d MiB, [45]\d\.\d MiB are free", line), line
        assert "Command start" not in text  # refused before datalad run started
        assert (
            git_out(ds, "rev-parse", "HEAD") == head and git_out(ds, "status", "--porcelain") == ""
        )
        filler.unlink()
        rc, text = run_make(ds, env, "3mm", "SUBJECTS=01")
        assert rc == 0, text
