"""Thin command line: ``python -m nsdprep <stage> ...``; the Makefile calls it via ``datalad run``.

Each stage module defines ``add_arguments(parser)`` and ``run(args) -> int``. Only the chosen stage is
imported, so ``--help`` is fast and one stage's heavy imports never slow another.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from nsdprep.errors import NsdPrepError

#: stage name -> (module, one-line help)
STAGES: dict[str, tuple[str, str]] = {
    "synth": ("nsdprep.synth", "write synthetic NSD + COCO data in the real formats and layout"),
    "serve": ("nsdprep.serve", "serve a directory on 127.0.0.1 as a minimal S3-like HTTP mirror"),
    "inputs": (
        "nsdprep.inputs",
        "create/update inputs/nsd and inputs/coco by URL (datalad addurls)",
    ),
    "coco": (
        "nsdprep.coco",
        "merge COCO train+val (ids kept) and write derivatives/coco_categories.pkl",
    ),
    "resample": ("nsdprep.resample", "resample 1 mm betas to 3 mm + grey-matter mask, streaming"),
    "curate": ("nsdprep.curate", "build derivatives/curated_3mm (equalized trials, labels, runs)"),
    "decode": ("nsdprep.decode", "run-grouped cross-validated decoding baseline and report"),
    "publish": (
        "nsdprep.publish",
        "publish the dataset to a RIA store (datalad create-sibling-ria, push)",
    ),
    "run": ("nsdprep.steps", "make a derivative through `datalad run` (what the Makefile calls)"),
}


def build_parser(stage: str | None = None) -> argparse.ArgumentParser:
    """Return the top-level parser; with ``stage`` given, import it and add its arguments."""
    parser = argparse.ArgumentParser(prog="nsdprep", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, (module, help_) in STAGES.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == stage:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run one stage, turn expected errors into a one-line message and exit 2."""
    argv = sys.argv[1:] if argv is None else argv
    stage = next((a for a in argv if a in STAGES), None)
    args = build_parser(stage).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    module = importlib.import_module(STAGES[args.stage][0])
    try:
        return int(module.run(args) or 0)
    except NsdPrepError as exc:
        print(f"nsdprep {args.stage}: error: {exc}", file=sys.stderr)
        return 2
