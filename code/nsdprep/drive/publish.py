"""``make publish RIA=<url>``: share the dataset through a RIA store, with DataLad's own commands.

- The superdataset gets a git sibling and an ORA storage sibling in the store
  (``datalad create-sibling-ria``), and an alias so it can be cloned by name; its history and the
  derivatives' annexed content are pushed (``datalad push --data anything``).
- Each installed input subdataset gets a git sibling only (no storage sibling) and is pushed with
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

from nsdprep.core import dataset, nsd
from nsdprep.core.errors import DatasetStateError, UsageError

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
    ds = Path(ds).resolve()
    if not _RIA_RE.match(ria_url):
        raise UsageError(
            f"RIA={ria_url!r} is not a RIA URL; expected e.g. ria+file:///data/store or "
            "ria+ssh://server/path/store"
        )
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
    subs = [
        ds / rel for rel in (nsd.NSD_DATASET, nsd.COCO_DATASET) if dataset.is_installed(ds / rel)
    ]
    for sub in subs:
        rel = sub.relative_to(ds).as_posix()
        _sibling(sub, ria_url, sibling, storage=False, alias=f"{alias}-{rel.replace('/', '-')}")
        log.info("pushing %s (history and URL registrations; content stays at its web URLs)", rel)
        dataset.api_call(
            "push", f"datalad push {rel}", dataset=str(sub), to=sibling, data="nothing"
        )
    _sibling(ds, ria_url, sibling, storage=True, alias=alias)
    log.info("pushing the dataset and its derivatives' content to %s", ria_url)
    dataset.api_call("push", "datalad push", dataset=str(ds), to=sibling, data="anything")
    return clone_url(ria_url, alias)


def _sibling(ds: Path, url: str, name: str, *, storage: bool, alias: str) -> None:
    """Create the RIA sibling ``name`` of ``ds`` unless it exists."""
    known = dataset.api_call("siblings", "datalad siblings", action="query", dataset=str(ds))
    if any(r.get("name") == name for r in known):
        return
    log.info("creating RIA sibling %r of %s in %s (alias %s)", name, ds, url, alias)
    dataset.api_call(
        "create_sibling_ria",
        f"datalad create-sibling-ria in {ds}",
        url=url,
        name=name,
        dataset=str(ds),
        storage_sibling=storage,
        alias=alias,
        new_store_ok=True,
        existing="skip",
    )


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
