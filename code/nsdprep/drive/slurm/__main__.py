"""``python -m nsdprep.drive.slurm task|finish``: the command line of the job scripts."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from nsdprep.core.errors import NsdPrepError
from nsdprep.drive.slurm.finish import finish
from nsdprep.drive.slurm.plan import LOCK_TIMEOUT, quiet_datalad
from nsdprep.drive.slurm.task import run_task


def _terminated(signum: int, frame: object) -> None:
    raise NsdPrepError(
        f"terminated by signal {signum} (time limit reached or job cancelled; SLURM_OPTS=--time=...)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the job scripts (``task FOLDER INDEX``, ``finish FOLDER``)."""
    parser = argparse.ArgumentParser(
        prog="nsdprep.drive.slurm", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    task = sub.add_parser("task", help="run one array task")
    task.add_argument("folder", type=Path)
    task.add_argument("index", type=int)
    fin = sub.add_parser("finish", help="merge the job branches and report")
    fin.add_argument("folder", type=Path)
    fin.add_argument("--lock-timeout", type=float, default=LOCK_TIMEOUT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_datalad()
    try:
        if args.command == "task":
            # SLURM sends SIGTERM at the time limit and on scancel: clean up and report, then exit.
            signal.signal(signal.SIGTERM, _terminated)
            return run_task(args.folder.resolve(), args.index)
        return finish(args.folder.resolve(), lock_timeout=args.lock_timeout)
    except NsdPrepError as exc:
        print(f"nsdprep slurm {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
