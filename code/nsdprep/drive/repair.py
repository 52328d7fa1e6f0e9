"""Repair an input whose first download was damaged (``make repair``).

A VURL key records the checksum of whatever its first download brought. If that download was damaged
but had the right size, every good copy after it fails verification. The repair fetches a fresh copy
without that check, verifies it itself (size, the whole gzip stream and its CRC for ``.gz`` files, the
MD5 when the server's ETag is one), and re-keys the file to an MD5E key of the verified content
(``git annex rekey`` + ``registerurl``, the way git-annex changes a file's key), so it cannot be
poisoned again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from nsdprep.core import dataset, inventory, nsd
from nsdprep.core.errors import RemoteError
from nsdprep.stages.inputs import NSD_EXPERIMENT_KEYS, ensure_subdataset

log = logging.getLogger(__name__)


# -- repairing ------------------------------------------------------------------------------------
def repair_subjects(ds_root: str | Path, subjects: Iterable[int] | None) -> list[str]:
    """Check, and repair where needed, the input files of ``subjects`` and the experiment files.

    Each file ends present and verified. Present content is checked (size; the whole gzip stream
    and CRC of ``.gz`` files; the MD5 where the server's ETag is one); absent content is fetched the
    normal, verified way. A file that fails either way is repaired: its bad content is dropped, a
    fresh copy is fetched without the recorded checksum, checked, and the file re-keyed to an MD5E key
    of that verified copy (same URLs). One commit records the repairs. Returns the repaired files.
    A server that still sends a bad copy gets a :class:`RemoteError` naming the URL; nothing changes.
    """
    ds_root = Path(ds_root).resolve()
    nsd_ds = ensure_subdataset(ds_root, nsd.NSD_DATASET)
    dataset.clear_stale_index_lock(nsd_ds)
    chosen = inventory.select_subjects(nsd_ds, subjects)
    rels = [
        k for s in chosen for k in inventory.registered_keys(nsd_ds, nsd.subject_root_key(s) + "/")
    ]
    rels += [k for k in NSD_EXPERIMENT_KEYS if (nsd_ds / k).is_symlink()]
    repaired: list[tuple[str, str, str]] = []
    for rel in rels:
        fixed = _repair_file(nsd_ds, rel)
        if fixed is not None:
            repaired.append((rel, *fixed))
    if not repaired:
        log.info("repair: %d file(s) checked, all good; nothing to repair", len(rels))
        return []
    lines = "\n".join(f"  {rel}: {old} -> {new}" for rel, old, new in repaired)
    dataset.save(
        nsd_ds,
        f"Repair {len(repaired)} input file(s): re-keyed to the checksum of a verified copy\n\n"
        f"Their first download was damaged and its checksum recorded (VURL keys); a fresh copy "
        f"from the same URL passed the size, gzip/CRC and ETag checks:\n{lines}\n",
    )
    dataset.save(
        ds_root, f"Repair {len(repaired)} input file(s) in {nsd.NSD_DATASET}", paths=[nsd_ds]
    )
    log.info("repair: %d file(s) checked, %d repaired", len(rels), len(repaired))
    return [rel for rel, _, _ in repaired]


def _repair_file(repo: Path, rel: str) -> tuple[str, str] | None:
    """Make ``rel`` present and verified; ``(old key, new key)`` if it had to be re-keyed."""
    key = dataset.lookup_key(repo, rel)
    urls = dataset.key_urls(repo, key)
    problem = None
    if dataset.has_key(repo, key):
        problem = check_content(repo / rel, key, urls)
    else:
        ok, text = dataset.annex_get(repo, rel)
        if not ok and "Verification of content failed" not in text:
            raise RemoteError(
                f"cannot fetch {rel} (from {', '.join(urls) or 'no URL'}): {text[-400:]}. "
                "Run `make repair` again later; partial downloads resume."
            )
        problem = check_content(repo / rel, key, urls) if ok else "it failed verification"
    if problem is None:
        return None
    log.warning("%s: %s; fetching a fresh copy", rel, problem)
    dataset.drop_key(repo, key)
    if dataset.key_is_checksum(key):
        ok, text = dataset.annex_get(repo, rel)  # the checksum is in the key: nothing to forget
        if ok and check_content(repo / rel, key, urls) is None:
            return None
        dataset.drop_key(repo, key)
        raise RemoteError(
            f"{rel}: the copy at {', '.join(urls)} does not match its recorded checksum ({key}) "
            f"or is damaged: {text[-300:] or problem}. Nothing was kept; check the source."
        )
    ok, text = dataset.annex_get(repo, rel, verify=False)
    bad = check_content(repo / rel, key, urls) if ok else f"download failed: {text[-300:]}"
    if bad is not None:
        dataset.drop_key(repo, key)
        raise RemoteError(
            f"{rel}: the server still sends a bad copy ({bad}) at {', '.join(urls) or 'no URL'}; "
            "nothing was changed. Try `make repair` again later, or report it to the data provider."
        )
    new_key = _checksum_key(repo, rel)
    dataset.rekey(repo, rel, new_key, urls)
    dataset.drop_key(repo, key)
    log.info(
        "%s: re-keyed %s -> %s (verified copy of %s)", rel, key, new_key, urls[0] if urls else ""
    )
    return key, new_key


def check_content(path: Path, key: str, urls: Sequence[str]) -> str | None:
    """What is wrong with the content at ``path`` (``None`` if nothing found).

    Checks its size against the key, reads a ``.gz`` file to its end (zlib checks the CRC-32 and
    length of every gzip member) and compares the MD5 with the server's ETag when that is a plain
    MD5 (a single-part S3 upload; multipart ETags end in ``-N`` and are not content checksums).
    """
    size = dataset.key_size(key)
    actual = path.stat().st_size
    if size is not None and actual != size:
        return f"size {actual} bytes, the key says {size}"
    etag = _plain_md5_etag(urls[0]) if urls else None
    md5 = hashlib.md5(usedforsecurity=False)
    gz = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS) if path.name.endswith(".gz") else None
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                md5.update(block)
                while gz is not None and block:
                    gz.decompress(block, 1 << 22)
                    block = gz.unconsumed_tail
                    if gz.eof and gz.unused_data:  # another gzip member follows
                        block = gz.unused_data + block
                        gz = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    except zlib.error as exc:
        return f"the gzip stream is corrupted ({exc})"
    if gz is not None and not gz.eof:
        return "the gzip stream is truncated"
    if etag is not None and md5.hexdigest() != etag:
        return f"MD5 {md5.hexdigest()} differs from the server's ETag {etag}"
    return None


def _plain_md5_etag(url: str) -> str | None:
    """The ETag of ``url`` if it is a plain MD5 (``HEAD``; ``None`` if multipart or unreachable)."""
    req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "nsdprep"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310 (http(s) URLs only)
            etag = (resp.headers.get("ETag") or "").strip('"')
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return etag if re.fullmatch(r"[0-9a-f]{32}", etag) else None


def _checksum_key(repo: Path, rel: str) -> str:
    """MD5E key of ``rel``'s present content (``git annex calckey`` on a link with its name)."""
    tmp = dataset.git_dir(repo) / "annex" / "tmp" / "nsdprep-repair"
    tmp.mkdir(parents=True, exist_ok=True)
    link = tmp / Path(rel).name
    link.unlink(missing_ok=True)
    os.link((repo / rel).resolve(), link)
    try:
        return dataset.calc_key(repo, link)
    finally:
        link.unlink(missing_ok=True)
