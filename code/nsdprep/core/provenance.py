"""Provenance written into outputs: library versions, input checksums, the exact command.

The command is the one the command line received (``nsdprep.cli`` hands it down as
``args.command_line``), never rebuilt from parsed arguments, so it cannot drift from what ran.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import os
import platform
import shlex
from collections.abc import Sequence

#: The package's version, recorded in every output's provenance (``nsdprep.__version__``).
VERSION = "0.1.0"

#: How the Makefile (through ``datalad run``) invokes a stage.
COMMAND_PREFIX = ("python", "-m", "nsdprep")


def command_line(argv: Sequence[str]) -> str:
    """The command as run: ``python -m nsdprep <argv>``, shell-quoted."""
    return shlex.join([*COMMAND_PREFIX, *argv])


def command_of(args: argparse.Namespace) -> str:
    """The command recorded by the CLI in ``args`` (empty when a stage is called from Python)."""
    return str(getattr(args, "command_line", "") or "")


def versions(*packages: str, python: bool = False) -> dict[str, str]:
    """Installed versions of ``packages`` (distribution names), plus nsdprep (and Python)."""
    out = {"nsdprep": VERSION}
    if python:
        out["python"] = platform.python_version()
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
