"""What make asks nsdprep before running anything: ``python -m nsdprep.makefile [NAME=value ...]``.

The Makefile owns no option: it hands the variables of its command line to this module, which
checks them against :mod:`nsdprep.options` and prints either ``targets: <the targets nsdprep
builds>`` or the one-line reason make must stop (an unknown variable, a bad value). ``--help``
prints ``make help``. Standard library only: make runs it with the system Python until the
environment exists (then with the environment's, which starts faster).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from nsdprep import options, pipeline


def help_text() -> str:
    """``make help``: every target and every option, each with its help line."""
    lines = ["nsdprep: NSD + COCO decoding dataset (DataLad). Targets:"]
    lines += [f"  {name:<15} {text}" for name, text in pipeline.target_help().items()]
    lines.append("Options (make VARIABLE=value; [default]):")
    lines += options.help_lines()
    lines.append(
        "Options that change no output byte (JOBS, DROP, PREFETCH, BACKEND, WAIT, ...) never make "
        "outputs look out of date."
    )
    lines.append(
        "A failing target prints one line 'nsdprep <command>: error: ...' and make exits 2 "
        "(docs/troubleshooting.md)."
    )
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    """Print the help, or check the words and print the build targets or the error."""
    if list(argv) == ["--help"]:
        print(help_text())
        return 0
    error = options.check_words(argv)
    print(error or "targets: " + " ".join(pipeline.build_targets()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
