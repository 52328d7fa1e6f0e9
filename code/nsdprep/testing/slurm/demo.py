"""``make 3mm BACKEND=slurm`` played on a throw-away single-node SLURM, with a failing task.

Synthetic data (the demo's 4 subjects), a loopback mirror, a scratch ``git clone`` of this checkout
with ``make inputs``; then, printing every command and what the user sees:

1. one session of subject 03 is served damaged (same size: accepted, then unreadable);
2. ``make 3mm BACKEND=slurm WAIT=1 RIA=...``: the report, the history, the store's branches;
3. the mirror repaired, the same command again: only subject 03 is submitted;
4. ``make all BACKEND=slurm``: 3 mm up to date, then coco-labels, curated, decode on SLURM;
5. ``git log --oneline --graph`` and ``make rerun`` of a record made on SLURM.

Run as root (``PYTHONPATH=code``, the venv's ``bin`` on ``PATH``)::

    python -m nsdprep.testing.slurm.demo --workdir /tmp/slurm-demo
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from nsdprep.core import nsd
from nsdprep.testing.demo import DemoSpec, ensure_identity, loopback_env, user_clone
from nsdprep.testing.serve import Mirror
from nsdprep.testing.slurm.cluster import SlurmCluster
from nsdprep.testing.synth import make_synthetic

log = logging.getLogger(__name__)

FAILING = (3, 2)  # subject, session


def _show(cmd: Sequence[str], cwd: Path, env: Mapping[str, str], *, check: bool = True) -> int:
    """Print ``$ cmd``, run it, print its output without DataLad's INFO chatter and the time."""
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    began = time.monotonic()
    proc = subprocess.run(list(cmd), cwd=cwd, env=dict(env), capture_output=True, text=True)
    for line in (proc.stdout + proc.stderr).splitlines():
        if not line.startswith(("[INFO]", "INFO datalad")):
            print(f"  {line}")
    print(f"  [exit {proc.returncode}, {time.monotonic() - began:.1f} s]", flush=True)
    if check and proc.returncode != 0:
        raise SystemExit(f"`{shlex.join(cmd)}` failed")
    return proc.returncode


def run_demo(workdir: Path, source: Path, venv: Path, overlay: bool) -> None:
    """Play the scenario of the module docstring in ``workdir``."""
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    home = workdir / "home"
    home.mkdir(exist_ok=True)
    env = loopback_env({**os.environ, "HOME": str(home)})
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(source / "code")
    ensure_identity(env)
    spec = DemoSpec()
    ds, store = workdir / "dataset", workdir / "ria-store"
    make = ["make", "--no-print-directory", f"VENV={venv}", *spec.make_vars()]
    slurm = ["BACKEND=slurm", f"RIA=ria+file://{store}", f"SCRATCH={workdir / 'scratch'}"]
    make_synthetic(workdir / "synth", spec.synth_spec())
    user_clone(source, ds, env, overlay)
    with SlurmCluster(workdir / "slurm") as cluster, Mirror(workdir / "synth") as mirror:
        env.update(cluster.env)
        print(f"SLURM: installed in {cluster.install_seconds:.1f} s, idle after "
              f"{cluster.start_seconds:.1f} s, {cluster.cpus} CPUs")  # fmt: skip
        _show([*make, "inputs", f"NSD_URL={mirror.url}/nsd",
               f"COCO_URL={mirror.url}/coco/annotations/annotations_trainval2017.zip"], ds, env)  # fmt: skip
        src = mirror.root / "nsd" / nsd.betas_key(*FAILING)
        original = src.read_bytes()
        damaged = bytearray(original)
        damaged[len(damaged) // 2 : len(damaged) // 2 + 64] = bytes(64)
        src.write_bytes(bytes(damaged))
        print(
            f"\n# the mirror now serves {src.name} of subject {FAILING[0]:02d} damaged (same size)"
        )
        _show([*make, "3mm", *slurm, "WAIT=1"], ds, env, check=False)
        _show(["git", "log", "--oneline", "-4"], ds, env)
        _show(["git", "ls-remote", "--heads", "ria"], ds, env)
        _show(["ls", "derivatives/3mm"], ds, env)
        _show(["git", "status", "--porcelain"], ds, env)
        src.write_bytes(original)
        print("\n# the mirror is repaired; the same command again")
        _show([*make, "3mm", *slurm, "WAIT=1"], ds, env)
        _show([*make, "all", *slurm], ds, env)
        _show(["git", "log", "--oneline", "--graph", "-n", "24"], ds, env)
        commit = subprocess.run(
            ["git", "log", "-F", "--grep=[nsdprep] 3mm subj03 (", "--format=%H", "-n1"],
            cwd=ds, env=env, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        _show([*make, "rerun", f"REV={commit}"], ds, env)
        _show(["git", "log", "--oneline", "-1"], ds, env)
        _show([*make, "3mm"], ds, env)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``--workdir`` (required), ``--source`` (default: this checkout)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--source", type=Path, default=Path(__file__).resolve().parents[4])
    parser.add_argument("--venv", type=Path, default=Path(sys.executable).parent.parent)
    parser.add_argument(
        "--committed", action="store_true", help="only committed code (default: working tree)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    began = time.monotonic()
    run_demo(args.workdir, args.source.resolve(), args.venv.resolve(), not args.committed)
    print(f"\ndemo finished in {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
