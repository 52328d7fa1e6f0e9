"""Small I/O helpers shared by the stages: input presence checks, atomic writes, disk space.

A full disk is met in two places: up front, where a stage or ``make`` can estimate what it will
write (:func:`require_free_space` refuses to start when the free space is clearly too small), and at
the write itself (:func:`atomic_path` turns ``ENOSPC`` into :class:`DiskFullError`, naming the folder,
what was written, what is free and, when the writer can estimate it, what the file needs). Either
way nothing is left under the final name and the temporary is removed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from nsdprep.core.errors import MissingInputError, NsdPrepError, UsageError

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


class DiskFullError(NsdPrepError, OSError):
    """The file system ran out of space (``ENOSPC``), or clearly has too little for a step."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.errno = errno.ENOSPC


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: sizes in messages, binary units."""
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TiB"


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes available to this user on the file system holding ``path`` (or its nearest parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def require_free_space(folder: str | os.PathLike[str], needed: int, what: str) -> None:
    """Raise :class:`DiskFullError` up front if ``folder``'s file system has less than ``needed``.

    ``needed`` is an estimate; callers pass what a step will certainly write (downloads of known
    size, outputs estimated from their inputs) so that a refusal means "clearly too small".
    """
    free = free_bytes(folder)
    if needed > free:
        raise DiskFullError(
            f"not enough free space in {folder} for {what}: it needs about "
            f"{format_bytes(needed)}, {format_bytes(free)} are free. Free at least "
            f"{format_bytes(needed - free)} there (or work in a clone on a larger disk), then run "
            "again; nothing was started.",
        )


def describe_os_error(exc: OSError) -> str:
    """One line for an ``OSError`` a user can act on (disk full, read-only, no permission)."""
    where = os.path.abspath(exc.filename) if isinstance(exc.filename, str) else ""
    folder = Path(where).parent if where else None
    if exc.errno == errno.ENOSPC:
        free = f" ({format_bytes(free_bytes(folder))} free)" if folder else ""
        return (
            f"no space left on the device while writing {where or 'a file'}{free}: free space in "
            f"{folder or 'that folder'} and run again (outputs of the failed step are not recorded)."
        )
    if exc.errno == errno.EROFS:
        return (
            f"{where or 'the target'} is on a read-only file system: work in a writable clone "
            "(`datalad clone <dataset> <folder>`) or get write access."
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: {where or exc}: check the folder's owner and permissions."
    if exc.errno == errno.EDQUOT:
        return f"disk quota exceeded while writing {where}: free space or ask for a larger quota."
    return f"{exc.strerror or type(exc).__name__}: {where or exc}"


@contextlib.contextmanager
def atomic_path(
    target: str | os.PathLike[str],
    suffix: str = "",
    *,
    expected_size: Callable[[int], int | None] | None = None,
) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` only on success.

    A crash or exception leaves no file at ``target`` (and removes the temporary), so a half-written
    output can never look like a finished one. The temporary shares the directory of ``target`` so
    the final ``os.replace`` is atomic. A full disk (``ENOSPC``) becomes :class:`DiskFullError`
    naming the folder; ``expected_size(bytes_written)`` may estimate the whole file's size for it.
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
    except BaseException as exc:
        written = _size(tmp_path)
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        full = _disk_full(exc)
        if full is not None and not isinstance(exc, DiskFullError):
            raise _disk_full_error(target, written, expected_size) from exc
        raise


def _disk_full(exc: BaseException) -> OSError | None:
    """The ``ENOSPC``/``EDQUOT`` error in ``exc`` or its causes, if any."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _disk_full_error(
    target: Path, written: int, expected_size: Callable[[int], int | None] | None
) -> DiskFullError:
    folder = target.absolute().parent
    free = free_bytes(folder)
    total = expected_size(written) if expected_size is not None else None
    need = (
        f"it needs up to about {format_bytes(total)} in all"
        if total
        else f"{format_bytes(written)} were written when the disk filled"
    )
    return DiskFullError(
        f"no space left in {folder} while writing {target.name}: {need}, "
        f"{format_bytes(free)} free after removing the partial file. Free space there (or work "
        "in a clone on a larger disk), then run again; the partial output was removed and nothing "
        "was recorded.",
    )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


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


def exact_cast(values: np.ndarray, dtype: np.dtype | type, where: object) -> np.ndarray:
    """``values`` as ``dtype``, or a :class:`UsageError` naming ``where`` if any value would change.

    The writers store what the stages computed, and never round or wrap it silently.
    """
    if values.dtype == dtype:
        return values
    with np.errstate(invalid="ignore", over="ignore"):
        cast = values.astype(dtype)
    if not np.array_equal(cast, values):
        raise UsageError(f"{where}: values of {values.dtype} not exact in {np.dtype(dtype)}")
    return cast
