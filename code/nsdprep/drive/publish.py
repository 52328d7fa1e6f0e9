"""``make publish RIA=<url>``: share the dataset through a RIA store, with DataLad's own commands.

- The superdataset gets a git sibling and an ORA storage sibling in the store
  (``datalad create-sibling-ria``), and an alias so it can be cloned by name; its history and the
  derivatives' annexed content are pushed (``datalad push --data anything``).
- Each installed input subdataset gets a git sibling only (no storage sibling) and is pushed with
  ``--data nothing``: its history and file registrations travel, its content stays at its web URLs
  (the NSD bucket, the COCO site), so nobody re-hosts NSD.
- Running it again pushes only what is new (``datalad push`` compares with the sibling).

It goes where it says, or nowhere:

- Everything goes to the one store named. If a sibling of that name (in the superdataset or in an
  input subdataset) already publishes to another store, nothing is done and one line names that
  store; publishing elsewhere takes another sibling name, moving the sibling takes ``reconfigure``
  (then the content is checked in the new store, not assumed from the old one's record).
- A store that cannot be created (its folder, or the nearest existing parent, is a file or cannot
  be written), a folder that is neither empty nor a store, or an alias that already names another
  dataset in the store is refused before anything is created.
- A sibling whose repository vanished from the store (a wiped store) is set up again there.
- An interrupt is an interrupt: if Ctrl-C reaches DataLad's children and their failure comes back
  as a result or an exception, it is raised as :class:`KeyboardInterrupt`, not as their text.

A clone from the store finds the subdatasets there by their dataset ID (DataLad configures the store as
a subdataset source when cloning from it), so ``datalad get -n inputs/nsd`` works from a clone.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shlex
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nsdprep import options
from nsdprep.core import dataset, nsd
from nsdprep.core.errors import DatasetStateError, NsdPrepError, UsageError

log = logging.getLogger(__name__)

DEFAULT_SIBLING = options.Options().ria_sibling
DEFAULT_ALIAS = options.Options().alias
#: How messages name the choices a user has (the make variables of ``make publish``).
SIBLING_OPTION = "RIA_SIBLING"
ALIAS_OPTION = "ALIAS"
RECONFIGURE_OPTION = "RIA_RECONFIGURE=1"
_RIA_RE = re.compile(r"^ria\+(file|ssh|http|https)://")
_FILE_PREFIX = "ria+file://"
#: A clone's ``origin`` may point at ``<store>/alias/<name>`` (a sibling at ``<store>/<id[:3]>/<id[3:]>``).
_ALIAS_TAIL_RE = re.compile(r"/alias/[^/]+$")


def clone_url(ria_url: str, alias: str) -> str:
    """The URL that clones the published dataset by its alias: ``<ria_url>#~<alias>``."""
    return f"{ria_url.rstrip('/')}#~{alias}"


@dataclass(frozen=True)
class _Member:
    """One dataset to publish: where it is, how, and where its sibling publishes to now."""

    path: Path
    rel: str  # "." for the superdataset
    storage: bool  # an ORA storage sibling for annexed content (the superdataset only)
    alias: str
    stores: tuple[str, ...]  # the stores its sibling (and storage sibling) point at; () if none
    configured: bool  # a sibling or storage sibling of that name exists here already

    @property
    def where(self) -> str:
        return "the dataset" if self.rel == "." else self.rel


# -- where a sibling publishes to ----------------------------------------------------------------
def _normalised(url: str) -> str:
    """``url`` for comparison: no trailing slash; a local store by its real path."""
    url = url.strip().rstrip("/")
    if url.startswith(_FILE_PREFIX):
        path = url[len(_FILE_PREFIX) :]
        if path.startswith("/"):
            return _FILE_PREFIX + os.path.realpath(path)
    return url


def same_store(a: str, b: str) -> bool:
    """True if the RIA URLs ``a`` and ``b`` name the same store."""
    return _normalised(a) == _normalised(b)


def _store_of_git_url(url: str, dataset_id: str) -> str:
    """The RIA store URL of a git sibling's ``url`` in it, else ``url`` itself (not a RIA layout).

    ``create-sibling-ria`` points the git remote at ``<store>/<id[:3]>/<id[3:]>`` (a plain path for
    a local store, ``ssh://``/``http(s)://`` otherwise); a clone's ``origin`` may use the alias.
    """
    base = url.strip().rstrip("/")
    tail = f"/{dataset_id[:3]}/{dataset_id[3:]}"
    if base.endswith(tail):
        base = base[: -len(tail)]
    elif _ALIAS_TAIL_RE.search(base):
        base = _ALIAS_TAIL_RE.sub("", base)
    else:
        return url
    if base.startswith("/"):
        return _FILE_PREFIX + base
    if base.startswith(("file://", "ssh://", "http://", "https://")):
        return "ria+" + base
    return url


def _special_remote_url(ds: Path, name: str) -> str | None:
    """The ``url=`` of the special remote ``name`` in the ``git-annex`` branch (newest record)."""
    found: tuple[float, str] | None = None
    for line in dataset.git(ds, "show", "git-annex:remote.log", check=False).splitlines():
        fields = dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)
        if fields.get("name") != name or "url" not in fields:
            continue
        stamp = float(fields.get("timestamp", "0").rstrip("s") or 0)
        if found is None or stamp >= found[0]:
            found = (stamp, fields["url"])
    return found[1] if found else None


def sibling_stores(
    ds: str | Path, sibling: str = DEFAULT_SIBLING, *, storage: bool = True
) -> list[str]:
    """The RIA stores the sibling ``sibling`` of ``ds`` publishes to (none if it has no such sibling).

    The git remote's URL is mapped back to its store; with ``storage``, the storage sibling
    ``<sibling>-storage`` (recorded in the ``git-annex`` branch, so also seen in clones) counts too.
    Two different entries mean the two disagree.
    """
    ds = Path(ds)
    stores: list[str] = []
    git_url = dataset.git(ds, "config", "--get", f"remote.{sibling}.url", check=False).strip()
    if git_url:
        stores.append(_store_of_git_url(git_url, dataset.dataset_id(ds)))
    if storage:
        url = _special_remote_url(ds, f"{sibling}-storage")
        if url and not any(same_store(url, s) for s in stores):
            stores.append(url)
    return stores


def _configured(ds: Path, sibling: str) -> bool:
    """True if a git remote ``sibling`` or a special remote ``<sibling>-storage`` is set up in ``ds``."""
    names = set(dataset.git(ds, "remote", check=False).split())
    return bool(names & {sibling, f"{sibling}-storage"}) or bool(
        _special_remote_url(ds, f"{sibling}-storage")
    )


def _members(ds: Path, sibling: str, alias: str) -> list[_Member]:
    """The installed input subdatasets, then the superdataset, with their siblings' stores."""
    members = []
    for rel in (nsd.NSD_DATASET, nsd.COCO_DATASET, "."):
        path = ds / rel if rel != "." else ds
        if rel != "." and not dataset.is_installed(path):
            continue
        storage = rel == "."
        members.append(
            _Member(
                path=path,
                rel=rel,
                storage=storage,
                alias=alias if storage else f"{alias}-{rel.replace('/', '-')}",
                stores=tuple(sibling_stores(path, sibling, storage=storage)),
                configured=_configured(path, sibling),
            )
        )
    return members


def resolve_store(
    ds: str | Path, ria_url: str | None, *, sibling: str = DEFAULT_SIBLING
) -> str | None:
    """The one store ``ds`` and its input subdatasets publish to through ``sibling``.

    ``ria_url`` if given, else the store the existing siblings point at; ``None`` if neither.
    Raises :class:`UsageError` (one line, nothing done) if ``ria_url`` differs from a store an
    existing sibling publishes to, or if the existing siblings disagree among themselves.
    """
    return _resolve(_members(Path(ds).resolve(), sibling, DEFAULT_ALIAS), ria_url, sibling)


def _resolve(members: list[_Member], ria_url: str | None, sibling: str) -> str | None:
    known = [(m, s) for m in reversed(members) for s in m.stores]  # the superdataset first
    target = ria_url or (known[0][1] if known else None)
    if target is None:
        return None
    for member, store in known:
        if same_store(store, target):
            continue
        if ria_url is None:
            raise UsageError(
                f"the sibling {sibling!r} publishes {member.where} to {store} but "
                f"{known[0][0].where} to {known[0][1]}; name the store to use with RIA=<url>."
            )
        raise UsageError(
            f"RIA={ria_url} differs from the store {store} that the sibling {sibling!r} of "
            f"{member.where} publishes to; nothing was published. To publish there as well, name "
            f"another sibling ({SIBLING_OPTION}=<name>); to move {sibling!r} there, add "
            f"{RECONFIGURE_OPTION}; to update the existing store, give RIA={store}."
        )
    return target


# -- can the store be made -----------------------------------------------------------------------
def _local_path(ria_url: str) -> Path | None:
    """The folder of a ``ria+file://`` store, else ``None`` (a remote store is not checked here)."""
    if not ria_url.startswith(_FILE_PREFIX):
        return None
    path = ria_url[len(_FILE_PREFIX) :]
    return Path(path) if path.startswith("/") else None


def _write_error(folder: Path) -> str | None:
    """Why nothing can be created in ``folder`` (a probe folder is made and removed), else ``None``."""
    try:
        probe = tempfile.mkdtemp(prefix=".nsdprep-probe-", dir=folder)
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    os.rmdir(probe)
    return None


def check_store(ria_url: str) -> None:
    """Refuse, with one line, a local store that cannot be created or written, before anything.

    The store's folder must be a RIA store one can write, an empty folder, or a new folder whose
    nearest existing parent is a writable folder. Remote stores (ssh, http) are left to DataLad.
    """
    path = _local_path(ria_url)
    if path is None:
        return
    hint = "give RIA= a folder you can write (a new one, or an existing store)"
    if path.exists() and not path.is_dir():
        raise UsageError(f"cannot create the RIA store {path}: it is a file; {hint}.")
    if path.is_dir():
        is_store = (path / "ria-layout-version").is_file()
        if not is_store and any(path.iterdir()):
            raise UsageError(
                f"cannot create the RIA store {path}: the folder holds other files and is no RIA "
                f"store (no ria-layout-version); {hint}."
            )
        folder = path
    else:
        folder = next(p for p in path.parents if p.exists())
        if not folder.is_dir():
            raise UsageError(
                f"cannot create the RIA store {path}: {folder} is a file, not a folder; {hint}."
            )
    why = _write_error(folder)
    if why:
        raise UsageError(
            f"cannot create the RIA store {path}: {folder} cannot be written ({why}); {hint}."
        )


def check_alias(ria_url: str, alias: str, dataset_id: str) -> None:
    """Refuse an alias that a local store already gives to another dataset (clones would get it)."""
    path = _local_path(ria_url)
    if path is None:
        return
    link = path / "alias" / alias
    if not os.path.lexists(link):
        return
    target = Path(os.path.realpath(link))
    if target == Path(os.path.realpath(path / dataset_id[:3] / dataset_id[3:])):
        return
    other = target.parent.name + target.name
    raise UsageError(
        f"the store {ria_url} already gives the alias {alias!r} to another dataset ({other}); "
        f"nothing was published. Publish under another name ({ALIAS_OPTION}=<name>)."
    )


def _repository_missing(member: _Member, ria_url: str) -> bool:
    """True if ``member``'s repository is known to be absent from the local store (wiped)."""
    path = _local_path(ria_url)
    if path is None:
        return False
    dsid = dataset.dataset_id(member.path)
    return not (path / dsid[:3] / dsid[3:] / "config").is_file()


# -- interrupts ----------------------------------------------------------------------------------
@contextlib.contextmanager
def _noting_interrupts() -> Iterator[Callable[[], bool]]:
    """Note a SIGINT while DataLad works, so a child's failure from it is not taken for an error.

    The previous handler still runs (Python's raises :class:`KeyboardInterrupt`); the note
    matters when a library in between catches that and reports the failed child instead.
    """
    seen = False
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous in (
        signal.SIG_IGN,
        None,
    ):
        yield lambda: False
        return

    def note(signum: int, frame: Any) -> None:
        nonlocal seen
        seen = True
        if callable(previous):
            previous(signum, frame)
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, note)
    try:
        yield lambda: seen
    finally:
        signal.signal(signal.SIGINT, previous)


def _one_line(text: str) -> str:
    """A child's error output on one line: its last few distinct lines, no traceback frames."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if any(ln.startswith("Traceback (most recent call last)") for ln in lines):
        lines = lines[-1:]
    unique = list(dict.fromkeys(lines))
    return " / ".join(unique[-3:])[-400:]


def _call(
    command: str, what: str, interrupted: Callable[[], bool], **kwargs: Any
) -> list[dict[str, Any]]:
    """:func:`dataset.api_call`, with an interrupt kept an interrupt and DataLad's exceptions on one line."""
    from datalad.runner.exception import CommandError

    try:
        return dataset.api_call(command, what, **kwargs)
    except (NsdPrepError, CommandError, OSError) as exc:
        if interrupted():
            raise KeyboardInterrupt from None
        if isinstance(exc, NsdPrepError):
            raise
        if isinstance(exc, CommandError):
            detail = _one_line(exc.stderr or exc.stdout or str(exc.msg or ""))
            raise DatasetStateError(
                f"{what} failed: `{shlex.join(map(str, exc.cmd or []))}` exited {exc.code}: "
                f"{detail}"
            ) from None
        raise UsageError(f"{what} failed: {exc.strerror or exc} ({exc.filename})") from None


# -- publishing ----------------------------------------------------------------------------------
def publish(
    ds: str | Path,
    ria_url: str,
    *,
    sibling: str = DEFAULT_SIBLING,
    alias: str = DEFAULT_ALIAS,
    reconfigure: bool = False,
) -> str:
    """Publish ``ds`` and its installed input subdatasets to the RIA store at ``ria_url``.

    Everything goes to that one store: if the sibling ``sibling`` of any of them publishes
    elsewhere, nothing is done (:class:`UsageError`) unless ``reconfigure`` moves it there.
    Returns the URL a colleague clones from (``datalad clone <url> <folder>``).
    """
    ds = Path(ds).resolve()
    if not _RIA_RE.match(ria_url):
        raise UsageError(
            f"RIA={ria_url!r} is not a RIA URL; expected e.g. ria+file:///data/store or "
            "ria+ssh://server/path/store"
        )
    if "#" in ria_url:
        raise UsageError(
            f"RIA={ria_url!r} names a dataset in a store (#...); give the store itself, e.g. "
            f"RIA={ria_url.split('#', 1)[0]}"
        )
    ria_url = ria_url.rstrip("/")
    if not dataset.is_dataset(ds):
        raise DatasetStateError(f"{ds} is not a DataLad dataset (no .datalad/); run from its root")
    dataset.ensure_annex(ds)
    dirty = dataset.dirty_paths(ds)
    if dirty:
        listing = "\n  ".join(f"{s} {p}" for s, p in dirty[:10])
        raise DatasetStateError(
            f"the dataset {ds} has uncommitted changes; only saved states are published:\n  "
            f"{listing}\nSave them (`datalad save -m '...'`) or remove them, then publish again."
        )
    members = _members(ds, sibling, alias)
    if not reconfigure:
        _resolve(members, ria_url, sibling)
    check_store(ria_url)
    check_alias(ria_url, alias, dataset.dataset_id(ds))
    with _noting_interrupts() as interrupted:
        recheck = set()
        for m in members:
            if _set_up(m, ria_url, sibling, interrupted):
                recheck.add(m.rel)
        for m in members:
            what = m.where
            force = "checkdatapresent" if m.rel in recheck else None
            if m.storage:
                log.info("pushing %s and its derivatives' content to %s", what, ria_url)
                data = "anything"
            else:
                log.info(
                    "pushing %s (history and URL registrations; content stays at its web URLs)",
                    what,
                )
                data = "nothing"
            _call(
                "push", f"datalad push of {what}", interrupted,
                dataset=str(m.path), to=sibling, data=data, force=force,
            )  # fmt: skip
    _check_published(ds, ria_url, alias)
    return clone_url(ria_url, alias)


def _set_up(m: _Member, ria_url: str, sibling: str, interrupted: Callable[[], bool]) -> bool:
    """Make ``m``'s sibling point at ``ria_url``; True if content must be checked, not assumed."""
    git_url = dataset.git(m.path, "config", "--get", f"remote.{sibling}.url", check=False).strip()
    in_place = (
        bool(git_url)
        and all(same_store(s, ria_url) for s in m.stores)
        and (not m.storage or _has_storage(m.path, sibling))
        and not _repository_missing(m, ria_url)
    )
    if in_place:
        return False
    existing = "reconfigure" if m.configured else "error"
    log.info(
        "%s RIA sibling %r of %s in %s (alias %s)",
        "setting up" if m.configured else "creating", sibling, m.where, ria_url, m.alias,
    )  # fmt: skip
    _call(
        "create_sibling_ria", f"datalad create-sibling-ria for {m.where}", interrupted,
        url=ria_url, name=sibling, dataset=str(m.path), storage_sibling=m.storage,
        alias=m.alias, new_store_ok=True, existing=existing,
    )  # fmt: skip
    if not m.storage:
        # a storage sibling left by older versions must not be pushed to along with the git one
        dataset.git(
            m.path, "config", "--unset-all", f"remote.{sibling}.datalad-publish-depends",
            check=False,
        )  # fmt: skip
    return m.configured


def _has_storage(ds: Path, sibling: str) -> bool:
    """True if the storage sibling is enabled here (not only recorded in the ``git-annex`` branch)."""
    return bool(
        dataset.git(
            ds, "config", "--get", f"remote.{sibling}-storage.annex-uuid", check=False
        ).strip()
    )


def _check_published(ds: Path, ria_url: str, alias: str) -> None:
    """For a local store: the clone URL's alias leads to this dataset, which has this commit."""
    path = _local_path(ria_url)
    if path is None:
        return
    repo = path / "alias" / alias
    head = dataset.head(ds)
    if not repo.exists() or not dataset.git(repo, "cat-file", "-t", head, check=False).strip():
        raise DatasetStateError(
            f"published, but {clone_url(ria_url, alias)} does not lead to commit {head[:8]} of {ds}; "
            "check the store and publish again."
        )


# -- CLI ------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``python -m nsdprep publish --ria URL [--ria-sibling ria] [--alias nsdprep] [--dataset .]``."""
    parser.add_argument("--dataset", type=Path, default=Path("."), help="superdataset root")
    names = ("ria", "ria_sibling", "alias", "ria_reconfigure")
    options.add_arguments(parser, [options.spec(n) for n in names])


def main(args: argparse.Namespace) -> int:
    """Publish and print the clone command."""
    opts = options.from_args(args)
    if not opts.ria:
        raise UsageError("publish needs --ria <store URL>, e.g. --ria ria+file:///data/ria-store")
    url = publish(
        args.dataset, opts.ria, sibling=opts.ria_sibling, alias=opts.alias,
        reconfigure=opts.ria_reconfigure,
    )  # fmt: skip
    print(f"published. Clone it with:\n  datalad clone {shlex.quote(url)} nsd-decoding")
    return 0
