"""Thin command line: ``python -m nsdprep <command> ...``; the Makefile calls it.

Pipeline stages are what ``datalad run`` records; ``build`` is what each make target calls (it plans
and runs those records); tools serve the demo and the tests. Each command's module defines
``add_arguments(parser)`` and ``main(args) -> int``; only the chosen one is imported, so ``--help`` is
fast and one stage's heavy imports never slow another.

Exit codes, each with one line on stderr and no traceback:

- 0: done;
- 2: an error this package raises on purpose (:mod:`nsdprep.core.errors`), a wrong option, or an
  operating-system error a user can act on (disk full, read-only folder, no permission);
- 3: anything else, i.e. a bug: the line names the exception; ``NSDPREP_DEBUG=1`` (or ``-v``) shows
  the traceback;
- 130: interrupted (SIGINT or SIGTERM): one line saying what was recorded and cleaned; whatever
  error a child raised because of the signal is not shown.

``make`` itself exits 2 whenever a target's command fails, whatever that command's code was.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from nsdprep import pipeline
from nsdprep.core import signals
from nsdprep.core._io import describe_os_error
from nsdprep.core.errors import NsdPrepError
from nsdprep.core.provenance import command_line

#: Set to a non-empty value to get the traceback of unexpected errors (also ``nsdprep -v``).
DEBUG_ENV = "NSDPREP_DEBUG"
EXIT_ERROR = 2
EXIT_BUG = 3
EXIT_INTERRUPTED = 130
#: Commands that write into the dataset they get as ``--dataset`` (refused at once if read-only).
WRITES_DATASET = ("inputs", "build", "publish")


def _modules() -> dict[str, tuple[str, str]]:
    """Every command: its module and help line, from the pipeline's records."""
    out = {
        s.command: (s.module, f"[stage; make {s.target}] {s.help}")
        for s in pipeline.STAGES.values()
    }
    out |= {
        a.command: (a.module, f"[make {a.target}] {a.help}")
        for a in pipeline.ACTIONS.values()
        if a.command
    }
    out["build"] = (
        "nsdprep.drive.build",
        "make a target (what the Makefile calls): nsdprep build 3mm SUBJECTS=01",
    )
    return out | {k: (m, f"[tool] {h}") for k, (m, h) in pipeline.TOOLS.items()}


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors in the same one-line form as ours."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Return the top-level parser; with ``command`` given, import it and add its arguments."""
    parser = _Parser(prog="nsdprep", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_) in _modules().items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run one command, turn expected errors into a one-line message and exit 2."""
    argv = sys.argv[1:] if argv is None else argv
    modules = _modules()
    command = next((a for a in argv if a in modules), None)
    args = build_parser(command).parse_args(argv)
    args.command_line = command_line(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    debug = args.verbose or bool(os.environ.get(DEBUG_ENV))
    prefix = f"nsdprep {args.command}"
    previous = signals.install()
    try:
        if args.command in WRITES_DATASET:
            from nsdprep.core.dataset import require_writable

            require_writable(args.dataset)
        module = importlib.import_module(modules[args.command][0])
        return int(module.main(args) or 0)
    except BaseException as exc:  # noqa: BLE001 - every outcome becomes one line and an exit code
        if isinstance(exc, SystemExit):
            raise
        if isinstance(exc, KeyboardInterrupt) or signals.received():
            # whatever failed after a signal failed because of it: report the interrupt only
            detail = exc.detail if isinstance(exc, signals.Interrupted) else ""
            signals.settle()  # e.g. a download's git-annex still ending: nothing outlives us
            print(f"{prefix}: interrupted{'; ' + detail if detail else ''}", file=sys.stderr)
            return EXIT_INTERRUPTED
        if isinstance(exc, NsdPrepError):
            print(f"{prefix}: error: {exc}", file=sys.stderr)
            return EXIT_ERROR
        if debug:
            raise
        if isinstance(exc, OSError):
            print(f"{prefix}: error: {describe_os_error(exc)}", file=sys.stderr)
            return EXIT_ERROR
        print(
            f"{prefix}: internal error: {type(exc).__name__}: {exc} (a bug; `{DEBUG_ENV}=1` shows "
            "the traceback: please report it)",
            file=sys.stderr,
        )
        return EXIT_BUG
    finally:
        signals.restore(previous)
