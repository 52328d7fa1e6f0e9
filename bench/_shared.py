"""What the benchmark scripts share: a fresh process per measurement, and where results go.

Each measurement runs in its own interpreter (:func:`run_child`) so that its peak RSS is its own
(:func:`nsdprep.testing.measure.run_measured`); the child prints its result as JSON on standard output. Results are
written as ``bench/results/<kind>_<stamp>.json`` plus ``<kind>_latest.json`` (:func:`save_results`).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))  # as the Makefile sets it

from nsdprep import options  # noqa: E402
from nsdprep.options import Options  # noqa: E402
from nsdprep.testing.measure import run_measured  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def add_make_options(parser: argparse.ArgumentParser) -> None:
    """Accept make's options as ``NAME=value`` words (what ``make bench*`` passes on)."""
    parser.add_argument(
        "words", nargs="*", metavar="NAME=value", help="make's options, e.g. JOBS=2 PREFETCH=1"
    )


def make_options(args: argparse.Namespace) -> Options:
    """The options of the ``NAME=value`` words (checked as make checks them)."""
    return options.from_words(args.words)


def run_child(
    script: str, args: Sequence[str], env: Mapping[str, str] | None = None
) -> tuple[dict, float]:
    """Run ``python script --child args...``; return its JSON result and its own peak RSS in MB."""
    run = run_measured([sys.executable, script, "--child", *args], env=env, capture=True)
    sys.stderr.write(run.stderr)
    if run.returncode != 0:
        raise SystemExit(f"benchmark child {' '.join(args)} failed ({run.returncode})")
    return json.loads(run.stdout), run.peak_mb


def answer_child(children: Mapping[str, Callable[..., dict]], argv: Sequence[str]) -> int:
    """The ``--child kind args...`` side of :func:`run_child`: run ``children[kind]``, print its JSON."""
    kind, *rest = argv
    print(json.dumps(children[kind](*rest)))
    return 0


def save_results(kind: str, report: dict) -> Path:
    """Write ``report`` as ``<kind>_<stamp>.json`` and ``<kind>_latest.json``; return the dated one."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, default=float) + "\n"
    dated = RESULTS / f"{kind}_{time.strftime('%Y%m%dT%H%M%S')}.json"
    dated.write_text(text)
    (RESULTS / f"{kind}_latest.json").write_text(text)
    print(f"written bench/results/{dated.name} and {kind}_latest.json")
    return dated


def versions(packages: Sequence[str]) -> dict[str, str | None]:
    """Python's version and that of each installed package in ``packages`` (None if absent)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out
