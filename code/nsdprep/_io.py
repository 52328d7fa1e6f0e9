"""Small I/O helpers shared by the stages: input presence checks and atomic writes."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from nsdprep.errors import MissingInputError

log = logging.getLogger(__name__)

#: Suffix of the temporaries of :func:`atomic_path` (ignored by git; see ``.gitignore``).
PART_SUFFIX = ".part"


def require_content(path: Path, what: str, if_missing: str) -> None:
    """Raise :class:`MissingInputError` unless ``path`` is a file whose content is here.

    An annexed file that is registered but not fetched is a dangling symlink: the message then says
    to ``datalad get`` it; otherwise it names what is missing and ``if_missing`` says what to do.
    """
    if path.is_file():
        return
    if path.is_symlink():
        raise MissingInputError(
            f"{path}: {what} is registered but its content is absent: `datalad get` it "
            f"(`datalad get {path}`)."
        )
    raise MissingInputError(f"{path}: missing {what}; {if_missing}")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` only on success.

    A crash or exception leaves no file at ``target`` (and removes the temporary), so a half-written
    output can never look like a finished one. The temporary shares the directory of ``target`` so
    the final ``os.replace`` is atomic.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=(suffix or "") + PART_SUFFIX, dir=target.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; give the file the permissions a normal open() would
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_parts(out: Path) -> list[Path]:
    """Remove the temporaries a killed run left in ``out`` (a crash skips their clean-up); return them."""
    removed = []
    with os.scandir(out) as it:
        for entry in it:
            if entry.name.endswith(PART_SUFFIX) and entry.is_file(follow_symlinks=False):
                Path(entry.path).unlink()
                removed.append(Path(entry.path))
    if removed:
        log.info("removed %d stale temporaries in %s", len(removed), out)
    return removed
