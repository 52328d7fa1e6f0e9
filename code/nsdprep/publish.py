"""``make publish RIA=<url>``: share the dataset through a RIA store, with DataLad's own commands.

- The superdataset gets a git sibling and an ORA storage sibling in the store
  (``datalad create-sibling-ria``), and an alias so it can be cloned by name; its history and the
  derivatives' annexed content are pushed (``datalad push --data anything``).
- Each installed input subdataset gets a git sibling only (``--storage-sibling off``) and is pushed with
  ``--data nothing``: its history and file registrations travel, its content stays at its web URLs
  (the NSD bucket, the COCO site), so nobody re-hosts NSD.
- Running it again pushes only what is new (``datalad push`` compares with the sibling).

A clone from the store finds the subdatasets there by their dataset ID (DataLad configures the store as
a subdataset source when cloning from it), so ``datalad get -n inputs/nsd`` works from a clone.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

from nsdprep import nsd
from nsdprep.dataset import QUIET, check_results, ensure_annex, git
from nsdprep.errors import DatasetStateError, NsdPrepError

log = logging.getLogger(__name__)

DEFAULT_SIBLING = "ria"
DEFAULT_ALIAS = "nsdprep"
_RIA_RE = re.compile(r"^ria\+(file|ssh|http|https)://")


def clone_url(ria_url: str, alias: str) -> str:
    """The URL that clones the published dataset by its alias: ``<ria_url>#~<alias>``."""
    return f"{ria_url.rstrip('/')}#~{alias}"


def publish(
    ds: str | Path, ria_url: str, *, sibling: str = DEFAULT_SIBLING, alias: str = DEFAULT_ALIAS
) -> str:
    """Publish ``ds`` and its installed input subdatasets to the RIA store at ``ria_url``.

    Returns the URL a colleague clones from (``datalad clone <url> <folder>``).
    """
    import datalad.api as dl

    ds = Path(ds).resolve()
    if not _RIA_RE.match(ria_url):
        raise NsdPrepError(
            f"RIA={ria_url!r} is not a RIA URL; expected e.g. ria+file:///data/store or "
            "ria+ssh://server/path/store"
        )
    if not (ds / ".datalad").is_dir():
        raise DatasetStateError(f"{ds} is not a DataLad dataset (no .datalad/); run from its root")
    ensure_annex(ds)
    dirty = git(ds, "status", "--porcelain", "--untracked-files=normal").strip()
    if dirty:
        raise DatasetStateError(
            f"the dataset {ds} has uncommitted changes; only saved states are published:\n"
            f"{dirty}\nSave them (`datalad save -m '...'`) or remove them, then publish again."
        )
    subs = [ds / rel for rel in (nsd.NSD_DATASET, nsd.COCO_DATASET) if (ds / rel / ".git").exists()]
    for sub in subs:
        rel = sub.relative_to(ds).as_posix()
        _sibling(dl, sub, ria_url, sibling, storage="off", alias=f"{alias}-{rel.replace('/', '-')}")
        log.info("pushing %s (history and URL registrations; content stays at its web URLs)", rel)
        check_results(
            dl.push(dataset=str(sub), to=sibling, data="nothing", **QUIET), f"datalad push {rel}"
        )
    _sibling(dl, ds, ria_url, sibling, storage="on", alias=alias)
    log.info("pushing the dataset and its derivatives' content to %s", ria_url)
    check_results(dl.push(dataset=str(ds), to=sibling, data="anything", **QUIET), "datalad push")
    return clone_url(ria_url, alias)


def _sibling(dl: object, ds: Path, url: str, name: str, *, storage: str, alias: str) -> None:
    """Create the RIA sibling ``name`` of ``ds`` unless it exists (``existing='skip'``)."""
    known = dl.siblings(action="query", dataset=str(ds), **QUIET)  # type: ignore[attr-defined]
    if any(r.get("name") == name for r in known):
        return
    log.info("creating RIA sibling %r of %s in %s (alias %s)", name, ds, url, alias)
    results = dl.create_sibling_ria(  # type: ignore[attr-defined]
        url=url,
        name=name,
        dataset=str(ds),
        storage_sibling=storage,
        alias=alias,
        new_store_ok=True,
        existing="skip",
        **QUIET,
    )
    check_results(results, f"datalad create-sibling-ria in {ds}")


# -- CLI ------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``python -m nsdprep publish --ria URL [--sibling ria] [--alias nsdprep] [--dataset .]``."""
    parser.add_argument("--ria", required=True, help="RIA store URL, e.g. ria+file:///data/store")
    parser.add_argument("--sibling", default=DEFAULT_SIBLING, help="sibling name (default: ria)")
    parser.add_argument("--alias", default=DEFAULT_ALIAS, help="name to clone the dataset by")
    parser.add_argument("--dataset", type=Path, default=Path("."), help="superdataset root")


def main(args: argparse.Namespace) -> int:
    """Publish and print the clone command."""
    url = publish(args.dataset, args.ria, sibling=args.sibling, alias=args.alias)
    print(f"published. Clone it with:\n  datalad clone '{url}' nsd-decoding")
    return 0
