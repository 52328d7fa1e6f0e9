"""Write the environment's bytecode once, at install time: ``python -m nsdprep.drive.bytecode``.

Every nsdprep process imports datalad, numpy, scikit-learn, nilearn, ...; without bytecode each
would compile them from source again (the demo took 149 s instead of about 90 s). The Makefile runs
every command with ``PYTHONDONTWRITEBYTECODE=1``: Python 3.11 (CPython gh-126606) keeps a ``.pyc``
cut short by a disk that fills mid-write, and every later import fails with "marshal data too
short". So bytecode is written here only, at install time, for the modules nsdprep and its tests
import (found in their source, lazy imports included), and each file written is read back: one
that does not load is removed (that module is then compiled at each import, which is only slower).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import marshal
import os
import pkgutil
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

#: A .pyc file's header (magic, flags, source mtime and size) precedes the marshalled code.
_PYC_HEADER = 16


def imported_names(paths: Iterable[Path]) -> set[str]:
    """The absolute module names imported anywhere in the ``.py`` files under ``paths``."""
    names: set[str] = set()
    for root in paths:
        for path in sorted(Path(root).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
                if isinstance(node, ast.Import):
                    names.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module)
                    names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def import_all(names: Iterable[str], package: str) -> list[str]:
    """Import every name that is a module, then every module of ``package``.

    ``from x import y`` names a function as often as a module: what fails is skipped. Returns the
    top-level names that could not be imported (optional, or local to the tests).
    """
    for name in sorted(names):
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - not a module, or one that fails to import
            pass
    pkg = importlib.import_module(package)
    for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{package}."):
        if not info.name.endswith(".__main__"):  # runs the command line when imported
            importlib.import_module(info.name)
    return sorted({name.partition(".")[0] for name in names} - set(sys.modules))


def bytecode_files() -> list[Path]:
    """The ``.pyc`` file of every module imported in this process (written or read by the import)."""
    cached = (getattr(module, "__cached__", None) for module in list(sys.modules.values()))
    return sorted({Path(path) for path in cached if path})


def check_written(files: Iterable[Path], since: float) -> tuple[int, int]:
    """Read back each of ``files`` written after ``since``; remove those that do not load.

    Returns (files that load, files removed).
    """
    good = removed = 0
    for path in files:
        try:
            if path.stat().st_mtime < since:
                continue
            marshal.loads(path.read_bytes()[_PYC_HEADER:])
            good += 1
        except FileNotFoundError:
            continue  # not written (a read-only folder)
        except (EOFError, ValueError, TypeError, OSError):
            path.unlink(missing_ok=True)
            removed += 1
    return good, removed


def main(argv: Sequence[str] | None = None) -> int:
    """Import what the sources under the given folders import, then check what was written."""
    parser = argparse.ArgumentParser(prog="python -m nsdprep.drive.bytecode", description=__doc__)
    parser.add_argument("sources", nargs="+", type=Path, help="folders whose imports to compile")
    args = parser.parse_args(argv)
    if sys.dont_write_bytecode:
        parser.error("bytecode writing is off here (PYTHONDONTWRITEBYTECODE is set)")
    os.environ.setdefault("MPLBACKEND", "Agg")
    started = time.time()
    failed = import_all(imported_names(args.sources), "nsdprep")
    good, removed = check_written(bytecode_files(), since=started - 1)  # coarse mtimes
    print(
        f"bytecode: {good} modules compiled in {time.time() - started:.1f} s"
        + (f"; {removed} unreadable removed" if removed else "")
        + (f"; not available: {', '.join(failed)}" if failed else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
