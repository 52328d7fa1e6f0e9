"""``make 3mm DROP=1`` pipelined: downloads ahead of the workers, disk bounded, interruptions clean.

One small dataset is registered once (``make inputs`` against a loopback mirror of synthetic data:
subject 01 with 5 sessions); each test works in its own ``datalad clone`` of it. The disk bound is
measured (annexed content files counted whenever a download ends, which is when the most sessions
are on disk), never taken from the pipeline's own bookkeeping.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REPO_ROOT, git_out
from nsdprep import options
from nsdprep.core import dataset
from nsdprep.core.errors import DatasetStateError, RemoteError, UsageError
from nsdprep.core.nsd import Layout
from nsdprep.drive import steps
from nsdprep.options import Options
from nsdprep.stages import resample
from nsdprep.testing.demo import DemoSpec, build_demo
from nsdprep.testing.serve import Mirror

VENV = Path(sys.executable).parent.parent
LAYOUT = DemoSpec(sessions=(5, 1), layout=Layout(2, (4, 3)))
SUBJ01 = "nsddata_betas/ppdata/subj01"
BETAS = SUBJ01 + "/MNI/betas_fithrf/betas_session{n:02d}.nii.gz"
pytestmark = pytest.mark.datalad


def _present(nsd: Path) -> list[str]:
    """Betas of subject 01 whose content is in the annex."""
    return git_out(nsd, "annex", "find", "--in", "here", SUBJ01).split()


def _annex_files(nsd: Path) -> int:
    """Content files on disk in the annex: objects plus partial downloads.

    git-annex's ``KEY.lck`` files (made next to an object while it is being dropped) hold no content.
    """
    annex = dataset.git_dir(nsd) / "annex"
    return sum(
        not name.endswith(".lck")
        for sub in ("objects", "tmp")
        for _r, _d, files in os.walk(annex / sub)
        for name in files
    )


def _journal(nsd: Path) -> Path:
    return dataset.git_dir(nsd) / resample.JOURNAL_NAME


@pytest.fixture(scope="module")
def origin(env, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Inputs registered, nothing fetched, no derivative made."""
    work = tmp_path_factory.mktemp("pipelined")
    return build_demo(work, VENV, REPO_ROOT, LAYOUT, targets=(), overlay=True, env=env)


@pytest.fixture(scope="module")
def served(origin: Path) -> Iterator[Mirror]:
    """The mirror again, on the port the inputs were registered with."""
    url = git_out(origin / "inputs/nsd", "annex", "whereis", "--json", "--", BETAS.format(n=1))
    port = int(re.search(r"http://127\.0\.0\.1:(\d+)/nsd/", url).group(1))
    with Mirror(origin.parent / "synth", port=port) as mirror:
        yield mirror


@pytest.fixture
def clone(origin: Path, served: Mirror, env, tmp_path: Path) -> Path:
    dest = tmp_path / "clone"
    subprocess.run(["datalad", "clone", str(origin), str(dest)], check=True, env=env,
                   capture_output=True)  # fmt: skip
    subprocess.run(["datalad", "get", "-n", "inputs/nsd", "inputs/coco"], check=True, env=env,
                   cwd=dest, capture_output=True)  # fmt: skip
    os.utime(dest / "requirements.txt", (0, 0))  # the venv is current: no pip run
    return dest


def _digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.nii.gz"))}


# ------------------------------------------------------------------------------------------------
# in-process: the bound, the overlap, the clean-up, the bytes


@pytest.mark.parametrize(
    ("jobs", "prefetch"),
    [(1, 0), (1, 1), (2, 1), pytest.param(1, 3, marks=pytest.mark.slow)],
)
def test_disk_bound_and_overlap(
    clone: Path, env, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, jobs: int, prefetch: int
) -> None:
    """One download at a time (STREAMS=1): the bound, the look-ahead, the same bytes."""
    nsd = clone / "inputs/nsd"
    seen: list[int] = []
    real_get = dataset.get_file

    def counting_get(ds, rel, **kw):  # type: ignore[no-untyped-def]
        result = real_get(ds, rel, **kw)
        seen.append(_annex_files(nsd))  # a download just ended: the most content on disk
        return result

    monkeypatch.setattr(dataset, "get_file", counting_get)
    stats = resample.PipelineStats()
    results = resample.resample_subject(
        nsd, 1, tmp_path / "drop", jobs=jobs, drop=True, prefetch=prefetch, streams=1,
        progress=False, stats=stats,
    )  # fmt: skip
    assert len(results) == LAYOUT.sessions[0]
    assert len(seen) == LAYOUT.sessions[0]  # every session fetched once
    assert max(seen) <= jobs + prefetch, seen
    assert stats.peak_sessions_on_disk <= jobs + prefetch
    assert _present(nsd) == [] and _annex_files(nsd) == 0  # everything dropped again
    assert not _journal(nsd).exists()

    t = {(kind, s): when for when, kind, s in stats.events}
    sessions = range(1, LAYOUT.sessions[0] + 1)
    if prefetch == 0 and jobs == 1:
        # no look-ahead: the next download starts only after the previous session is dropped
        assert all(t["fetch", s + 1] >= t["dropped", s] for s in sessions[:-1]), stats.events
    else:
        # look-ahead: the next download starts while the current session is still on disk
        # (being processed or waiting), whatever the speed of the machine
        assert all(t["fetch", s + 1] < t["dropped", s] for s in sessions[:-1]), stats.events

    # same bytes as the ordinary mode (content fetched up front)
    monkeypatch.setattr(dataset, "get_file", real_get)
    dataset.get(nsd, [nsd / BETAS.format(n=s) for s in sessions])
    resample.resample_subject(nsd, 1, tmp_path / "plain", jobs=2, progress=False)
    assert _digests(tmp_path / "drop") == _digests(tmp_path / "plain")
    assert len(_digests(tmp_path / "plain")) == LAYOUT.sessions[0]


def test_present_content_is_kept_and_journaled_content_is_dropped(clone: Path, env) -> None:
    """Content the user fetched stays; content an interrupted --drop run fetched goes."""
    nsd = clone / "inputs/nsd"
    mine, leftover = BETAS.format(n=2), BETAS.format(n=4)
    dataset.get(nsd, [nsd / mine, nsd / leftover])
    _journal(nsd).write_text(f"{leftover}\n{SUBJ01}/MNI/betas_fithrf/betas_session99.nii.gz\n")
    resample.resample_subject(nsd, 1, clone / "out", jobs=2, drop=True, progress=False)
    assert _present(nsd) == [mine]
    assert not _journal(nsd).exists()


def test_partial_download_of_an_interrupted_run_is_removed(clone: Path, env) -> None:
    """A session a killed run was downloading, and that this run does not need: its partial
    download goes too (git-annex keeps it in .git/annex/tmp under its key's file name)."""
    nsd = clone / "inputs/nsd"
    left = BETAS.format(n=4)
    partial = dataset.partial_downloads(nsd, [left])[left]
    assert partial.parent == dataset.git_dir(nsd) / "annex/tmp"
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(b"\0" * 1000)
    _journal(nsd).write_text(f"{left}\n")
    resample.resample_subject(
        nsd, 1, clone / "out", jobs=1, drop=True, sessions=[1], progress=False
    )
    assert not partial.exists()
    assert _annex_files(nsd) == 0 and not _journal(nsd).exists()


def test_fetcher_that_cannot_start_fails_with_its_own_error(
    clone: Path, env, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(repo, rels):  # type: ignore[no-untyped-def]
        raise DatasetStateError("examinekey failed on purpose")

    monkeypatch.setattr(dataset, "partial_downloads", broken)
    with pytest.raises(DatasetStateError, match="on purpose"):
        resample.resample_subject(clone / "inputs/nsd", 1, clone / "out", drop=True, progress=False)


def test_failed_session_stops_fetching_and_drops(
    clone: Path, env, monkeypatch: pytest.MonkeyPatch
) -> None:
    nsd = clone / "inputs/nsd"
    real = resample.resample_session

    def broken(src, dst, **kw):  # type: ignore[no-untyped-def]
        if Path(src).name == "betas_session02.nii.gz":
            raise resample.FormatError(f"{src}: damaged on purpose")
        return real(src, dst, **kw)

    monkeypatch.setattr(resample, "resample_session", broken)
    with pytest.raises(resample.FormatError, match="betas_session02"):
        resample.resample_subject(
            nsd, 1, clone / "out", jobs=1, drop=True, prefetch=1, progress=False
        )
    assert _present(nsd) == [] and _annex_files(nsd) == 0
    assert not _journal(nsd).exists()
    assert not list((clone / "out").glob("*.part"))
    assert not (clone / "out/betas_session02.nii.gz").exists()


def test_prefetch_option_checks() -> None:
    assert options.from_words(["PREFETCH=3"]).prefetch == 3
    for bad in ("-1", "two"):
        with pytest.raises(UsageError, match=r"^PREFETCH=.* PREFETCH takes a whole number >= 0"):
            options.from_words([f"PREFETCH={bad}"])
    with pytest.raises(UsageError, match="PREFETCH"):
        Options(prefetch=-1)


def test_prefetch_and_jobs_are_not_in_the_fingerprint(origin: Path) -> None:
    """PREFETCH, JOBS, DROP and STREAMS change no output byte: the step's identity must not depend
    on them."""
    plans = [
        steps.steps_for(
            "3mm", origin, Options(drop=d, prefetch=p, jobs=j, streams=n, subjects=(1,))
        )
        for p, j, d, n in ((0, 1, True, 1), (1, 2, True, 4), (4, 3, False, 4), (1, 2, True, 8))
    ]
    assert len({plan[0].command for plan in plans}) == 4  # each run records what it did
    assert len({tuple(plan[0].identity()) for plan in plans}) == 1
    assert "--prefetch" in plans[0][0].command
    assert "--streams" in plans[0][0].command


# ------------------------------------------------------------------------------------------------
# STREAMS: several downloads at once, in order of need, within the same disk bound


class DiskWatch:
    """Samples the NSD annex every few ms while a run goes: content files on disk (objects plus
    partial downloads) and partial downloads alone (= downloads under way), at their peak.
    """

    def __init__(self, nsd: Path) -> None:
        self.annex = dataset.git_dir(nsd) / "annex"
        self.peak_files = self.peak_partial = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _keys(self, sub: str) -> set[str]:
        """Content files under ``sub``, by key (git-annex's ``*.lck`` lock files, made while
        dropping, hold no content)."""
        return {
            name
            for _r, _d, files in os.walk(self.annex / sub)
            for name in files
            if not name.endswith(".lck")
        }

    def _run(self) -> None:
        while not self._done.is_set():
            partial = self._keys("tmp")
            self.peak_partial = max(self.peak_partial, len(partial))
            # by key: a download moving from tmp/ to objects/ between the two walks counts once
            self.peak_files = max(self.peak_files, len(partial | self._keys("objects")))
            time.sleep(0.003)

    def __enter__(self) -> DiskWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


@pytest.fixture
def slow_links(served: Mirror) -> Iterator[float]:
    """Each connection capped so that one session takes about a second: downloads overlap."""
    size = max(p.stat().st_size for p in (served.root / "nsd").rglob("betas_session*.nii.gz"))
    served.limit(None, connection_rate_mb_s=size / 1e6)
    yield size / 1e6
    served.limit(None)


@pytest.mark.parametrize(
    ("jobs", "prefetch", "streams"),
    [(1, 2, 4), (1, 3, 2)],
    ids=["bound-binds", "streams-bind"],
)
def test_streams_keep_the_disk_bound_counting_partial_downloads(
    clone: Path, env, slow_links: float, tmp_path: Path, jobs: int, prefetch: int, streams: int
) -> None:
    """Downloads under way count: at most JOBS + PREFETCH content files (objects + partial
    downloads) are ever on disk, and min(STREAMS, JOBS + PREFETCH) downloads do run at once."""
    nsd = clone / "inputs/nsd"
    stats = resample.PipelineStats()
    with DiskWatch(nsd) as watch:
        results = resample.resample_subject(
            nsd, 1, tmp_path / "out", jobs=jobs, drop=True, prefetch=prefetch, streams=streams,
            progress=False, stats=stats,
        )  # fmt: skip
    assert len(results) == LAYOUT.sessions[0]
    assert watch.peak_files <= jobs + prefetch, (watch.peak_files, stats.events)
    assert watch.peak_partial == min(streams, jobs + prefetch), (watch.peak_partial, stats.events)
    assert stats.peak_sessions_on_disk <= jobs + prefetch
    assert _present(nsd) == [] and _annex_files(nsd) == 0
    assert not _journal(nsd).exists()


def test_streams_start_in_order_of_need(
    clone: Path, env, slow_links: float, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Several downloads at once, each started only after every session needed before it (and
    seen so by the mirror); the outputs are the bytes of the one-at-a-time mode."""
    nsd = clone / "inputs/nsd"
    stats = resample.PipelineStats()
    caplog.set_level("DEBUG", logger="nsdprep.testing.serve")
    with DiskWatch(nsd) as watch:
        resample.resample_subject(
            nsd, 1, tmp_path / "streams", jobs=1, drop=True, prefetch=3, streams=3,
            progress=False, stats=stats,
        )  # fmt: skip
    sessions = list(range(1, LAYOUT.sessions[0] + 1))
    assert watch.peak_partial == 3, stats.events  # three downloads did run at once
    started = [s for _t, kind, s in stats.events if kind == "fetch"]
    assert started == sessions, stats.events
    requested = [
        int(m.group(1))
        for r in caplog.records
        if (m := re.search(r'"GET /nsd/\S*betas_session(\d\d)\.nii\.gz', r.getMessage()))
    ]
    # three git-annex processes started within milliseconds may reach the server in any order,
    # but no session is asked for before every session needed STREAMS places earlier was
    assert sorted(requested) == sessions, requested
    assert all(s <= i + 3 for i, s in enumerate(requested, start=1)), requested
    # each download started no later than any later session's
    t = {(kind, s): when for when, kind, s in stats.events}
    assert all(t["fetch", s] <= t["fetch", s + 1] for s in sessions[:-1])
    resample.resample_subject(
        nsd, 1, tmp_path / "one", jobs=1, drop=True, prefetch=1, streams=1, progress=False
    )
    assert _digests(tmp_path / "streams") == _digests(tmp_path / "one")
    assert len(_digests(tmp_path / "one")) == len(sessions)


def test_failed_stream_stops_the_others_and_drops_everything(
    clone: Path, env, served: Mirror, slow_links: float, tmp_path: Path
) -> None:
    """One of several downloads fails (403): the others are stopped, every fetched byte (content
    and partial downloads) is dropped, no output is left half-written, and the error is one line
    naming the file and its URL."""
    nsd = clone / "inputs/nsd"
    key = BETAS.format(n=3)
    git_out(nsd, "config", "annex.retry", "0")  # fail at once: the others are 10 s from the end
    served.limit(None, connection_rate_mb_s=slow_links / 10)
    served.deny(f"nsd/{key}")
    stats = resample.PipelineStats()
    try:
        with DiskWatch(nsd) as watch, pytest.raises(RemoteError) as err:
            resample.resample_subject(
                nsd, 1, tmp_path / "out", jobs=1, drop=True, prefetch=3, streams=4,
                progress=False, stats=stats,
            )  # fmt: skip
    finally:
        served.clear_faults()
    message = str(err.value)
    assert "\n" not in message, message
    assert key in message and f"{served.url}/nsd/{key}" in message, message
    assert "403" in message or "Forbidden" in message, message
    # the failure hit while the others were downloading: they were stopped, none completed
    assert watch.peak_partial >= 3, stats.events  # sessions 1, 2 and 4
    assert [s for _t, kind, s in stats.events if kind == "fetched"] == [], stats.events
    assert _present(nsd) == [] and _annex_files(nsd) == 0, os.listdir(
        dataset.git_dir(nsd) / "annex/tmp"
    )
    assert not _journal(nsd).exists()
    assert not list((tmp_path / "out").glob("*.part"))
    assert not (tmp_path / "out" / "betas_session03.nii.gz").exists()


def test_make_get_downloads_streams_at_once(clone: Path, env, slow_links: float) -> None:
    """make get: STREAMS files at once through git-annex's own parallel transfers, all verified."""
    from nsdprep.stages import inputs

    nsd = clone / "inputs/nsd"
    with DiskWatch(nsd) as watch:
        inputs.get_subjects(clone, [1], streams=3)
    assert watch.peak_partial == 3
    assert sum("betas_session" in f for f in _present(nsd)) == LAYOUT.sessions[0]
    git_out(nsd, "annex", "fsck", "--", SUBJ01)  # every file verified against its key


def test_streams_option_checks() -> None:
    assert options.from_words(["STREAMS=8"]).streams == 8
    assert Options().streams == resample.DEFAULT_STREAMS == 4
    for bad in ("0", "four"):
        with pytest.raises(UsageError, match=r"^STREAMS=.* STREAMS takes a whole number >= 1"):
            options.from_words([f"STREAMS={bad}"])
    assert not options.spec("streams").changes_output
    assert {"3mm", "get", "all"} <= set(options.spec("streams").targets)


# ------------------------------------------------------------------------------------------------
# through make, as a user: interrupted runs


def _make_cmd(ds: Path, *args: str) -> list[str]:
    return ["make", "--no-print-directory", "-C", str(ds), *args, f"VENV={VENV}",
            *LAYOUT.make_vars(), "JOBS=2"]  # fmt: skip


def _wait_group_gone(pgid: int, timeout: float = 120) -> None:
    """Wait until no process of group ``pgid`` is left (a stage may outlive make while cleaning)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.killpg(pgid, signal.SIGKILL)
    raise AssertionError(f"processes of group {pgid} still running after {timeout} s")


def _interrupt_when_fetching(ds: Path, env, log: Path, sig: int) -> int:
    """``make 3mm DROP=1``; send ``sig`` to its process group once a download has ended and the
    first output appeared; return make's exit code after every process of the group is gone."""
    nsd = ds / "inputs/nsd"
    out = ds / "derivatives/3mm/subj01"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            _make_cmd(ds, "3mm", "SUBJECTS=01", "DROP=1", "PREFETCH=1"), env=env, stdout=fh,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            while proc.poll() is None:
                if out.is_dir() and any(out.iterdir()) and _journal(nsd).exists():
                    os.killpg(proc.pid, sig)
                    break
                time.sleep(0.002)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
    _wait_group_gone(proc.pid)
    assert rc != 0, f"make finished before it was interrupted:\n{log.read_text()}"
    return rc


def _status(ds: Path) -> list[str]:
    return git_out(ds, "status", "--porcelain", "--untracked-files=all").splitlines()


def _finish_and_compare(clone: Path, env, head: str, plain: bool = True) -> None:
    """The next DROP run recovers: recorded, nothing left in the annex (``plain``: same keys as
    an ordinary run)."""
    nsd = clone / "inputs/nsd"
    proc = subprocess.run(_make_cmd(clone, "3mm", "SUBJECTS=01", "DROP=1", "PREFETCH=2"),
                          env=env, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert git_out(clone, "rev-parse", "HEAD~1").strip() == head
    record = git_out(clone, "log", "-1", "--format=%B")
    assert '"cmd": "python -m nsdprep resample --nsd inputs/nsd --subject 1' in record
    assert "--drop --prefetch 2" in record  # what ran; neither is part of the fingerprint
    assert _present(nsd) == [] and _annex_files(nsd) == 0
    assert not _journal(nsd).exists()
    assert _status(clone) == []
    keys = git_out(clone, "ls-files", "-s", "derivatives/3mm/subj01")
    assert keys.count("betas_session") == LAYOUT.sessions[0]
    if not plain:
        return
    proc = subprocess.run(_make_cmd(clone, "3mm", "SUBJECTS=01", "FORCE=1"), env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert git_out(clone, "ls-files", "-s", "derivatives/3mm/subj01") == keys


@pytest.mark.slow
def test_killed_pipelined_run_is_cleaned_by_the_next(clone: Path, env, tmp_path: Path) -> None:
    """SIGKILL (no clean-up possible): at most JOBS + PREFETCH sessions stay, journaled; the next
    DROP run drops them and gives the same outputs as an uninterrupted run."""
    nsd = clone / "inputs/nsd"
    head = git_out(clone, "rev-parse", "HEAD").strip()
    _interrupt_when_fetching(clone, env, tmp_path / "make.log", signal.SIGKILL)
    assert git_out(clone, "rev-parse", "HEAD").strip() == head
    assert all(line.startswith("?? derivatives/3mm/subj01/") for line in _status(clone))
    left = _present(nsd)
    assert _annex_files(nsd) <= 2 + 1  # JOBS + PREFETCH, partial downloads included
    assert set(left) <= set(_journal(nsd).read_text().split())
    _finish_and_compare(clone, env, head)


@pytest.mark.parametrize(
    "sig",
    [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)],
    ids=["SIGINT", "SIGTERM"],
)
def test_interrupted_pipelined_run_drops_what_it_fetched(
    clone: Path, env, tmp_path: Path, sig: int
) -> None:
    """Ctrl-C or SIGTERM to the whole job: nothing recorded, no content left, no temporaries."""
    nsd = clone / "inputs/nsd"
    head = git_out(clone, "rev-parse", "HEAD").strip()
    _interrupt_when_fetching(clone, env, tmp_path / "make.log", sig)
    log = (tmp_path / "make.log").read_text()
    assert git_out(clone, "rev-parse", "HEAD").strip() == head
    assert _present(nsd) == [], log
    assert _annex_files(nsd) == 0, log  # no partial download of a stopped stream either
    assert not _journal(nsd).exists(), log
    _assert_reported_interrupt(clone, log)
    _finish_and_compare(clone, env, head, plain=False)


def _assert_reported_interrupt(clone: Path, log: str) -> None:
    """One line says the interrupt and what it left; no child's error text; nothing left over."""
    lines = [ln for ln in log.splitlines() if ln.startswith("nsdprep build:")]
    assert len(lines) == 1 and lines[0].startswith("nsdprep build: interrupted; nothing recorded")
    for noise in ("resampling failed", "CommandError", "Traceback", "error:"):
        assert noise not in log, log
    assert _status(clone) == [], log
    assert not (clone / "derivatives").exists(), log  # no empty folder left behind


def _group_of(proc: subprocess.Popen, needle: str, timeout: float = 60) -> int:
    """The pid of the process under ``proc`` whose command line contains ``needle``."""
    import psutil

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if needle in " ".join(child.cmdline()):
                    return child.pid
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.01)
    raise AssertionError(f"no process running {needle!r} under make")


def test_interrupt_while_fetching_inputs_never_starts_the_command(
    clone: Path, served: Mirror, env, tmp_path: Path
) -> None:
    """Ctrl-C while `make 3mm` fetches its inputs: the stage never starts, nothing is recorded."""
    head = git_out(clone, "rev-parse", "HEAD").strip()
    tmp = dataset.git_dir(clone / "inputs/nsd") / "annex" / "tmp"
    log = tmp_path / "make.log"
    served.limit(0.05)  # slow enough to be caught in the middle of a download
    try:
        with open(log, "w") as fh:
            proc = subprocess.Popen(
                _make_cmd(clone, "3mm", "SUBJECTS=01"), env=env, stdout=fh,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            end = time.monotonic() + 120
            while not (tmp.is_dir() and any(tmp.iterdir())) and time.monotonic() < end:
                assert proc.poll() is None, log.read_text()
                time.sleep(0.01)
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=120)
    finally:
        served.limit(None)
    _wait_group_gone(proc.pid)
    text = log.read_text()
    assert "Command start" not in text, text  # datalad run never started the stage
    assert git_out(clone, "rev-parse", "HEAD").strip() == head
    _assert_reported_interrupt(clone, text)


def test_sigterm_to_the_build_alone_stops_its_children(clone: Path, env, tmp_path: Path) -> None:
    """SIGTERM to `nsdprep build` only (a scheduler, `kill PID`): it stops the stage it started,
    which drops what it fetched; the same one line; nothing left running or recorded."""
    nsd = clone / "inputs/nsd"
    head = git_out(clone, "rev-parse", "HEAD").strip()
    out = clone / "derivatives/3mm/subj01"
    log = tmp_path / "make.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            _make_cmd(clone, "3mm", "SUBJECTS=01", "DROP=1", "PREFETCH=1"), env=env, stdout=fh,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        build = _group_of(proc, "nsdprep build 3mm")
        while proc.poll() is None and not (out.is_dir() and any(out.iterdir())):
            time.sleep(0.002)
        os.kill(build, signal.SIGTERM)
        proc.wait(timeout=180)
    _wait_group_gone(proc.pid)
    text = log.read_text()
    assert git_out(clone, "rev-parse", "HEAD").strip() == head
    assert _present(nsd) == [] and not _journal(nsd).exists(), text
    _assert_reported_interrupt(clone, text)


# ------------------------------------------------------------------------------------------------
# the mirror's rate cap (lower bounds only: a loaded machine can be slower, never faster)


def test_rate_cap_total_and_per_connection(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    size = 600_000
    (tmp_path / "b/f").write_bytes(os.urandom(size))

    def fetch_all(url: str, n: int) -> float:
        got: list[int] = []
        threads = [
            threading.Thread(target=lambda: got.append(len(urllib.request.urlopen(url).read())))
            for _ in range(n)
        ]
        t0 = time.monotonic()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert got == [size] * n
        return time.monotonic() - t0

    # a token bucket may send its initial burst at once: max(50 ms worth, 64 KiB)
    with Mirror(tmp_path, rate_mb_s=2.0) as m:
        # two connections share 2 MB/s: 1.2 MB take >= 0.6 s, less the 0.05 s burst
        assert fetch_all(f"{m.url}/b/f", 2) >= (2 * size - 100_000) / 2e6 - 0.01
        m.limit(None)
        fast = fetch_all(f"{m.url}/b/f", 1)
        m.limit(None, connection_rate_mb_s=1.0)
        # per connection: each stream 1 MB/s, so two streams together still take >= 0.6 s,
        # less each stream's 64 KiB burst
        assert fetch_all(f"{m.url}/b/f", 2) >= (size - 65_536) / 1e6 - 0.01
        # both, as S3 over a link: each stream 1 MB/s, all of them 1.5 MB/s, so three streams
        # together take >= 1.2 s (the total cap binds), less its 0.05 s burst
        m.limit(1.5, connection_rate_mb_s=1.0)
        assert fetch_all(f"{m.url}/b/f", 3) >= (3 * size - 75_000) / 1.5e6 - 0.01
    assert fast < 0.5
    with pytest.raises(Exception, match="positive"):
        Mirror(tmp_path, rate_mb_s=0)
