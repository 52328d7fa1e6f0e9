"""Thin command line: ``python -m nsdprep <command> ...``; the Makefile calls it.

Pipeline stages are what ``datalad run`` records; ``build`` is what each make target calls (it plans
and runs those records); tools serve the demo and the tests. Each command's module defines
``add_arguments(parser)`` and ``main(args) -> int``; only the chosen one is imported, so ``--help`` is
fast and one stage's heavy imports never slow another. Every error this package raises on purpose,
and every wrong option, ends as one line on stderr and exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from nsdprep.errors import NsdPrepError
from nsdprep.provenance import command_line

#: Pipeline stages (recorded by ``datalad run``): command -> (module, make target, one-line help).
STAGES: dict[str, tuple[str, str, str]] = {
    "inputs": ("nsdprep.inputs", "inputs", "register inputs/nsd and inputs/coco by URL"),
    "coco": ("nsdprep.coco", "coco-labels", "merge COCO train+val (ids kept), label NSD images"),
    "resample": ("nsdprep.resample", "3mm", "resample 1 mm betas to 3 mm + grey-matter mask"),
    "curate": ("nsdprep.curate", "curated", "equalized trials, labels and runs per subject"),
    "decode": ("nsdprep.decode", "decode", "run-grouped cross-validated decoding and report"),
}
#: Commands around the stages: command -> (module, one-line help).
COMMANDS: dict[str, tuple[str, str]] = {
    "build": ("nsdprep.steps", "make a target through `datalad run` (what the Makefile calls)"),
    "publish": ("nsdprep.publish", "publish the dataset to a RIA store (create-sibling-ria, push)"),
}
#: Tools for the demo and the tests (synthetic data, a loopback mirror), not pipeline stages.
TOOLS: dict[str, tuple[str, str]] = {
    "synth": ("nsdprep.testing.synth", "write synthetic NSD + COCO data in the real formats"),
    "serve": ("nsdprep.testing.serve", "serve a folder on 127.0.0.1 as a minimal S3-like mirror"),
}


def _modules() -> dict[str, tuple[str, str]]:
    stages = {
        name: (mod, f"[stage; make {target}] {h}") for name, (mod, target, h) in STAGES.items()
    }
    return {**stages, **COMMANDS, **{k: (m, f"[tool] {h}") for k, (m, h) in TOOLS.items()}}


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
    module = importlib.import_module(modules[args.command][0])
    try:
        return int(module.main(args) or 0)
    except NsdPrepError as exc:
        print(f"nsdprep {args.command}: error: {exc}", file=sys.stderr)
        return 2
