"""A throw-away single-node SLURM cluster for tests, run from a temporary folder.

``SlurmCluster(workdir)`` installs the Debian packages if needed, writes ``slurm.conf`` into
``workdir`` (never ``/etc/slurm``), starts ``munged``, ``slurmctld -D`` and ``slurmd -D -N localhost``
in the background, waits for an idle node and stops, by PID, only what it started::

    with SlurmCluster(tmp_path) as cluster:
        subprocess.run(["sbatch", "--wait", "--wrap", "true"], env=cluster.environ(), check=True)

A ``munged`` that already runs (system-wide) is reused and left running. A foreign ``slurmctld``
or ``slurmd`` is left alone: this cluster listens on its own free ports and has its own state, so
both coexist; clients reach this one through ``SLURM_CONF`` (:attr:`SlurmCluster.env`).

Needs root (``slurmd`` runs jobs as root; ``munged`` is started as the ``munge`` user) and no
systemd. Check by hand (``PYTHONPATH=code``)::

    python -m nsdprep.testing.slurm.cluster --workdir /tmp/slurm --check
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

#: Debian packages providing the daemons and the client commands.
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
#: munge's default socket folder; a custom socket path is not honoured by every SLURM part.
MUNGE_RUN_DIR = Path("/run/munge")
MUNGE_KEY = Path("/etc/munge/munge.key")
NODE = "localhost"
PARTITION = "test"


class SlurmError(RuntimeError):
    """The test cluster could not be installed, started or used."""


def _run(
    cmd: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` and capture its output (no check)."""
    return subprocess.run(
        list(cmd), capture_output=True, text=True, env=env, timeout=timeout, check=False
    )


def _tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of ``path`` (indented), or a note that it does not exist."""
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError as exc:
        return f"    ({exc.strerror})"
    return "\n".join(f"    {line}" for line in text) or "    (empty)"


def _processes(name: str) -> list[int]:
    """PIDs of the live (not zombie) processes whose command name is ``name`` (from ``/proc``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # "pid (comm) state ...": comm may contain spaces or parentheses
            comm, state = stat[stat.find("(") + 1 : stat.rfind(")")], stat[stat.rfind(")") + 2]
            if comm == name and state != "Z":
                pids.append(int(entry.name))
    return pids


def _free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on the loopback interface right now."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def install(packages: Sequence[str] = PACKAGES, *, timeout: float = 600) -> float:
    """Install ``packages`` with apt-get unless ``slurmctld``, ``slurmd``, ``sbatch`` and ``munged`` exist.

    Returns
    -------
    float
        Seconds spent (0 when nothing had to be installed).
    """
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged")):
        return 0.0
    if os.geteuid() != 0:
        raise SlurmError(f"SLURM is not installed and installing {' '.join(packages)} needs root")
    start = time.monotonic()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
    ):
        log.info("running %s", " ".join(cmd))
        try:
            proc = _run(cmd, env=env, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SlurmError(f"`{' '.join(cmd)}` failed: {exc}") from exc
        if proc.returncode != 0:
            out = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise SlurmError(
                f"`{' '.join(cmd)}` exited with {proc.returncode}; cannot install SLURM:\n{out}"
            )
    return time.monotonic() - start


def slurm_conf(workdir: Path, *, cpus: int, ports: Sequence[int]) -> str:
    """The text of a ``slurm.conf`` keeping all state and logs in ``workdir``."""
    return f"""\
# Throw-away single-node test cluster (nsdprep.testing.slurm.cluster); all state under {workdir}.
ClusterName=nsdpreptest
SlurmctldHost={NODE}
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# Trust CPUs= below even if it exceeds the machine's cores (tests oversubscribe on purpose).
SlurmdParameters=config_overrides
# The default starts a couple of batch jobs every 3 s; this starts them at once.
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
StateSaveLocation={workdir}/state
SlurmdSpoolDir={workdir}/spool
SlurmctldPidFile={workdir}/slurmctld.pid
SlurmdPidFile={workdir}/slurmd.pid
SlurmctldLogFile={workdir}/slurmctld.log
SlurmdLogFile={workdir}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName={NODE} NodeHostname={NODE} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """Single-node SLURM cluster living in ``workdir``; a context manager.

    Parameters
    ----------
    workdir
        Folder for ``slurm.conf``, state, spool and logs (created if missing).
    cpus
        CPUs of the node; default ``os.cpu_count()``. More than the machine has is accepted
        (``SlurmdParameters=config_overrides``): tasks that mostly wait on I/O then overlap.
    timeout
        Seconds to wait for the node to become idle.

    Attributes
    ----------
    env : dict[str, str]
        Variables every client command (sbatch, squeue, scontrol, scancel) needs.
    pids : dict[str, int]
        The daemons this object started (``munged`` is absent when one was already running).
    install_seconds, start_seconds : float
        Time spent installing packages and from start to an idle node.
    """

    def __init__(self, workdir: Path, *, cpus: int | None = None, timeout: float = 60) -> None:
        self.workdir = Path(workdir).resolve()
        self.cpus = cpus or os.cpu_count() or 1
        self.timeout = timeout
        self.conf = self.workdir / "slurm.conf"
        self.env: dict[str, str] = {"SLURM_CONF": str(self.conf)}
        self.pids: dict[str, int] = {}
        self.notes: list[str] = []
        self.install_seconds = 0.0
        self.start_seconds = 0.0
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    # -- public API --------------------------------------------------------------------------
    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def environ(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """``os.environ``, then ``extra``, then :attr:`env`: the environment for client commands."""
        return {**os.environ, **(extra or {}), **self.env}

    def run(
        self,
        *cmd: str,
        check: bool = True,
        timeout: float = 120,
        env: Mapping[str, str] | None = None,
    ) -> str:
        """Run a client command (e.g. ``"sinfo"``) against this cluster; return its output.

        ``env`` adds variables; ``sbatch`` passes the whole environment on to the job.
        """
        proc = _run(cmd, env=self.environ(env), timeout=timeout)
        if check and proc.returncode != 0:
            raise SlurmError(
                f"`{' '.join(cmd)}` exited with {proc.returncode}: "
                f"{proc.stderr.strip() or proc.stdout.strip()}"
            )
        return proc.stdout

    def submit(self, *args: str, env: Mapping[str, str] | None = None) -> str:
        """``sbatch --parsable args``; return the job ID."""
        return self.run("sbatch", "--parsable", *args, env=env).strip().split(";")[0]

    def wait(self, job: str, *, timeout: float = 300, poll: float = 0.2) -> float:
        """Wait until ``squeue`` no longer lists ``job`` (all its array tasks); return seconds.

        Polls every ``poll`` seconds: ``sbatch --wait`` sleeps 2 s, then 8 s, ... between checks.
        """
        began = time.monotonic()
        while True:
            proc = _run(["squeue", "-h", "-j", job, "-o", "%i"], env=self.environ(), timeout=10)
            if proc.returncode == 0 and not proc.stdout.strip():
                return time.monotonic() - began
            if proc.returncode != 0 and "Invalid job id" in proc.stderr:
                return time.monotonic() - began
            if time.monotonic() - began > timeout:
                raise SlurmError(f"job {job} still queued after {timeout:.0f} s:\n{proc.stdout}")
            time.sleep(poll)

    def states(self, job: str) -> dict[str, dict[str, str]]:
        """``scontrol show job``: fields of ``job`` (one entry per array task, keyed by task ID).

        Available for ``MinJobAge`` (300 s) after the end; there is no accounting database.
        """
        records: dict[str, dict[str, str]] = {}
        for line in self.run("scontrol", "-o", "show", "job", job).splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            records[fields.get("ArrayTaskId", fields.get("JobId", ""))] = fields
        return records

    def start(self) -> None:
        """Install if needed, configure, start the daemons and wait for an idle node."""
        if os.geteuid() != 0:
            raise SlurmError("the test cluster needs root (slurmd runs jobs as any user)")
        self.install_seconds = install()
        began = time.monotonic()
        try:
            self._check_foreign()
            self._configure()
            self._start_munge()
            self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)])
            self._spawn("slurmd", ["slurmd", "-D", "-N", NODE, "-f", str(self.conf)])
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        log.info("SLURM node idle after %.1f s (SLURM_CONF=%s)", self.start_seconds, self.conf)

    def stop(self, timeout: float = 10) -> None:
        """Cancel this cluster's jobs and stop the daemons this object started, by PID."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            self._cancel_jobs(timeout)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.pop(name, None)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.warning("%s (pid %d) ignored SIGTERM; killing it", name, proc.pid)
                    proc.kill()
                    proc.wait(timeout)
            self.pids.pop(name, None)
        for pid in self._leftovers():
            log.warning("killing leftover job process or slurmstepd (pid %d) of this cluster", pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # -- steps -------------------------------------------------------------------------------
    def _check_foreign(self) -> None:
        """Note daemons running from elsewhere; they are never touched."""
        for name in ("slurmctld", "slurmd"):
            pids = _processes(name)
            if pids:
                self.notes.append(
                    f"a {name} not started by this test is running (pid {', '.join(map(str, pids))}); "
                    "it is left alone: this cluster uses its own ports, state and SLURM_CONF"
                )
                log.warning(self.notes[-1])

    def _configure(self) -> None:
        for sub in ("state", "spool"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(slurm_conf(self.workdir, cpus=self.cpus, ports=_free_ports(2)))

    def _munge_works(self) -> bool:
        encoded = _run(["munge", "-n"], timeout=10)
        if encoded.returncode != 0:
            return False
        proc = subprocess.run(
            ["unmunge"], input=encoded.stdout, capture_output=True, text=True, check=False
        )
        return proc.returncode == 0

    def _start_munge(self) -> None:
        """Start ``munged`` as the ``munge`` user, or reuse one that already answers."""
        running = _processes("munged")
        if running:
            if self._munge_works():
                self.notes.append(
                    f"munged already runs (pid {', '.join(map(str, running))}); reusing it, "
                    "it will not be stopped"
                )
                log.info(self.notes[-1])
                return
            raise SlurmError(
                f"a munged (pid {', '.join(map(str, running))}) runs but `munge -n | unmunge` "
                f"fails; it was not started by this test and is left alone. Fix or stop it "
                f"(socket folder {MUNGE_RUN_DIR})."
            )
        MUNGE_RUN_DIR.mkdir(parents=True, exist_ok=True)
        shutil.chown(MUNGE_RUN_DIR, "munge", "munge")
        MUNGE_RUN_DIR.chmod(0o755)
        if not MUNGE_KEY.exists():
            log.info("creating %s", MUNGE_KEY)
            MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
            MUNGE_KEY.write_bytes(os.urandom(1024))
            shutil.chown(MUNGE_KEY, "munge", "munge")
            MUNGE_KEY.chmod(0o400)
        self._spawn("munged", ["munged", "--foreground"], user="munge")
        self._wait(self._munge_works, "munged to answer (munge -n | unmunge)", 15)

    def _spawn(self, name: str, cmd: list[str], *, user: str | None = None) -> None:
        """Start ``cmd`` in the background, output to ``workdir/<name>.out``; keep its PID."""
        out = self.workdir / f"{name}.out"
        with out.open("ab") as fh:
            self._procs[name] = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=self.environ(),
                cwd=self.workdir,
                start_new_session=True,
                user=user,
                group=user,
                extra_groups=[] if user else None,
            )
        self.pids[name] = self._procs[name].pid
        log.info("started %s (pid %d)", name, self.pids[name])

    def _node_state(self) -> str:
        proc = _run(["sinfo", "-h", "-N", "-n", NODE, "-o", "%T"], env=self.environ(), timeout=10)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    def _wait_idle(self) -> None:
        self._wait(lambda: self._node_state() == "idle", "the node to become idle", self.timeout)

    def _wait(self, ready: Callable[[], bool], what: str, timeout: float) -> None:
        """Poll ``ready()`` until true; raise naming the logs if a daemon dies or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            dead = [n for n, p in self._procs.items() if p.poll() is not None]
            if dead:
                raise SlurmError(
                    f"{', '.join(dead)} exited while waiting for {what}\n{self._logs()}"
                )
            if ready():
                return
            if time.monotonic() > deadline:
                raise SlurmError(
                    f"timed out after {timeout:.0f} s waiting for {what}\n{self._logs()}"
                )
            time.sleep(0.2)

    def _logs(self) -> str:
        """Last lines of each daemon's output (which includes its log) and the log files' names."""
        parts = [
            f"--- {self.workdir / f'{name}.out'}:\n{_tail(self.workdir / f'{name}.out')}"
            for name in self._procs
        ]
        logs = sorted(map(str, self.workdir.glob("*.log")))
        parts.append(f"full logs: {', '.join(logs) or '(none yet)'}")
        parts.extend(self.notes)
        return "\n".join(parts)

    def _cancel_jobs(self, timeout: float) -> None:
        """Cancel every job of this (private) cluster and wait for the queue to drain."""
        jobs = self.run("squeue", "-h", "-o", "%A", check=False, timeout=10).split()
        if not jobs:
            return
        log.info("cancelling %d job(s) still queued", len(jobs))
        self.run("scancel", *sorted(set(jobs)), check=False, timeout=10)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.run("squeue", "-h", "-o", "%A", check=False, timeout=10).strip():
                return
            time.sleep(0.2)

    def _leftovers(self) -> list[int]:
        """``slurmstepd`` and job processes of this cluster still alive (e.g. after a crash).

        Recognised by our ``SLURM_CONF`` in their environment (a job's processes also carry a
        ``SLURM_JOB_ID``); this process and its ancestors are never included.
        """
        marker = f"SLURM_CONF={self.conf}".encode()
        spared = {0, os.getpid()}
        pid = os.getpid()
        while pid > 1:
            try:
                pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                break
            spared.add(pid)
        stepds = set(_processes("slurmstepd"))
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in spared:
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker in environ and (
                int(entry.name) in stepds or any(v.startswith(b"SLURM_JOB_ID=") for v in environ)
            ):
                found.append(int(entry.name))
        return found


def _check(cluster: SlurmCluster, tasks: int) -> None:
    """Submit a trivial ``--array`` job with ``sbatch --wait`` and verify every task's output."""
    out = cluster.workdir / "check"
    out.mkdir(exist_ok=True)
    began = time.monotonic()
    job = cluster.run(
        "sbatch",
        "--parsable",
        "--wait",
        f"--array=0-{tasks - 1}",
        f"--output={out}/task-%a.out",
        "--wrap",
        "echo task $SLURM_ARRAY_TASK_ID on $(hostname)",
        timeout=300,
    ).strip()
    seconds = time.monotonic() - began
    missing = [i for i in range(tasks) if not (out / f"task-{i}.out").is_file()]
    if missing:
        raise SlurmError(f"array tasks {missing} left no output in {out}")
    records = cluster.states(job).values()
    bad = [r.get("JobId") for r in records if r.get("JobState") != "COMPLETED"]
    if bad:
        raise SlurmError(f"array tasks did not complete: {bad}")
    stamps = [
        time.mktime(time.strptime(r[k], "%Y-%m-%dT%H:%M:%S"))
        for r in records
        for k in ("SubmitTime", "EndTime")
    ]
    print(
        f"array of {tasks} tasks: sbatch --wait returned after {seconds:.1f} s; "
        f"the controller's submit to last end: {max(stamps) - min(stamps):.0f} s (1 s resolution)"
    )
    began = time.monotonic()
    job = cluster.submit(f"--array=0-{tasks - 1}", f"--output={out}/poll-%a.out", "--wrap", "true")
    print(f"same array, squeue polled every 0.2 s: {cluster.wait(job):.1f} s")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: start the cluster, run the check or wait for Ctrl-C, stop it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="folder for config and state")
    parser.add_argument("--check", action="store_true", help="run a trivial array job and stop")
    parser.add_argument("--tasks", type=int, default=8, help="array size for --check")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    def _terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _terminate)
    try:
        with SlurmCluster(args.workdir) as cluster:
            print(f"install: {cluster.install_seconds:.1f} s")
            print(f"start to idle node: {cluster.start_seconds:.1f} s")
            for note in cluster.notes:
                print(f"note: {note}")
            if args.check:
                _check(cluster, args.tasks)
            else:
                print(f"export SLURM_CONF={cluster.conf}\nrunning; Ctrl-C stops it", flush=True)
                signal.pause()
    except SlurmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
