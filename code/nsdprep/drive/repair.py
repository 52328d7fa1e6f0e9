"""Repair an input whose first download was damaged (``make repair``).

Every file is checked against what was recorded, never against what the server says now: its
checksum key (MD5E), else the ETag recorded from the listing at registration
(:mod:`nsdprep.core.pins`), plus its size and, for ``.gz`` files, the whole gzip stream and its CRC.
A VURL key registered before ETags were recorded has only its size and gzip stream to go by.

A VURL key records the checksum of whatever its first download brought. If that download was damaged
but had the right size, every good copy after it fails verification. The repair fetches a fresh copy
without that check, verifies it itself against the record, and re-keys the file to an MD5E key of the
verified content (``git annex rekey`` + ``registerurl``, the way git-annex changes a file's key), so it
cannot be poisoned again. A copy that does not match is never kept, and nothing is recorded from it.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from nsdprep.core import dataset, inventory, nsd, pins
from nsdprep.core.bucket import NSD_403_HINT
from nsdprep.core.errors import RemoteError
from nsdprep.stages.inputs import NSD_EXPERIMENT_KEYS, ensure_subdataset

log = logging.getLogger(__name__)


# -- repairing ------------------------------------------------------------------------------------
def repair_subjects(ds_root: str | Path, subjects: Iterable[int] | None) -> list[str]:
    """Check, and repair where needed, the input files of ``subjects`` and the experiment files.

    Each file ends present and verified. Present content is checked (size; its checksum key or the
    ETag recorded at registration; the whole gzip stream and CRC of ``.gz`` files); absent content
    is fetched the normal, verified way. A file that fails either way is repaired: its bad content
    is dropped, a fresh copy is fetched without the checksum recorded from a damaged download,
    checked the same way, and the file re-keyed to an MD5E key of that verified copy (same URLs).
    One commit records the repairs. Returns the repaired files. A server that still sends a bad
    copy gets a one-line :class:`RemoteError` naming the file, the URL, and the expected and actual
    checksum; nothing changes.
    """
    ds_root = Path(ds_root).resolve()
    nsd_ds = ensure_subdataset(ds_root, nsd.NSD_DATASET)
    dataset.clear_stale_index_lock(nsd_ds)
    chosen = inventory.select_subjects(nsd_ds, subjects)
    rels = [
        k for s in chosen for k in inventory.registered_keys(nsd_ds, nsd.subject_root_key(s) + "/")
    ]
    rels += [k for k in NSD_EXPERIMENT_KEYS if (nsd_ds / k).is_symlink()]
    recorded = pins.read_pins(nsd_ds)
    unpinned = [
        r for r in rels if r not in recorded and not dataset.key_is_checksum(_key(nsd_ds, r))
    ]
    if unpinned:
        log.warning(
            "repair: %d file(s) have no ETag recorded (registered before ETags were): only their "
            "size and gzip stream can be checked, e.g. %s; `make inputs` records their ETags",
            len(unpinned),
            unpinned[0],
        )
    repaired: list[tuple[str, str, str]] = []
    for rel in rels:
        fixed = _repair_file(nsd_ds, rel, recorded.get(rel))
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
        f"from the same URL passed the size, recorded ETag and gzip/CRC checks:\n{lines}\n",
    )
    dataset.save(
        ds_root, f"Repair {len(repaired)} input file(s) in {nsd.NSD_DATASET}", paths=[nsd_ds]
    )
    log.info("repair: %d file(s) checked, %d repaired", len(rels), len(repaired))
    return [rel for rel, _, _ in repaired]


def _key(repo: Path, rel: str) -> str:
    return dataset.lookup_key(repo, rel)


def _repair_file(repo: Path, rel: str, pin: pins.Pin | None) -> tuple[str, str] | None:
    """Make ``rel`` present and verified; ``(old key, new key)`` if it had to be re-keyed."""
    key = dataset.lookup_key(repo, rel)
    urls = dataset.key_urls(repo, key)
    where = ", ".join(urls) or "no URL"
    problem = None
    if dataset.has_key(repo, key):
        problem = check_content(repo / rel, key, pin)
    else:
        ok, text = dataset.annex_get(repo, rel)
        if not ok and "Verification of content failed" not in text:
            raise RemoteError(
                f"cannot fetch {rel} (from {where}): {text[-400:]}. "
                "Run `make repair` again later; partial downloads resume."
            )
        problem = check_content(repo / rel, key, pin) if ok else "it failed verification"
    if problem is None:
        return None
    log.warning("%s: %s; fetching a fresh copy", rel, problem)
    _discard(repo, rel, key)
    if dataset.key_is_checksum(key):
        ok, text = dataset.annex_get(repo, rel)  # the checksum is in the key: nothing to forget
        if ok and check_content(repo / rel, key, pin) is None:
            return None
        bad = check_content(repo / rel, key, pin) if ok else _remote_verdict(urls, key, pin)
        _discard(repo, rel, key)
        raise RemoteError(
            f"{rel}: the copy at {where} does not match its recorded checksum ({bad or text[-300:]})"
            "; nothing was kept. Check the source."
        )
    ok, text = dataset.annex_get(repo, rel, verify=False)
    bad = check_content(repo / rel, key, pin) if ok else f"download failed: {text[-300:]}"
    if bad is not None:
        _discard(repo, rel, key)
        raise RemoteError(
            f"{rel}: the server still sends a bad copy ({bad}) at {where}; nothing was changed. "
            "Try `make repair` again later, or report it to the data provider."
        )
    new_key = _checksum_key(repo, rel)
    good = pins.judge(repo / rel, key, None).digests
    stale = [ek for ek in _recorded(repo, key) if not pins.ek_matches(ek, good)]
    if stale:  # checksums recorded from damaged downloads: no clone should verify against them
        dataset.update_equivalent_keys(repo, {key: ([], stale)})
    dataset.rekey(repo, rel, new_key, urls)
    dataset.drop_key(repo, key)
    log.info("%s: re-keyed %s -> %s (verified copy of %s)", rel, key, new_key, where)
    return key, new_key


def _recorded(repo: Path, key: str) -> list[str]:
    dataset.commit_annex_journal(repo)
    return dataset.equivalent_keys(repo, [key])[key]


def _discard(repo: Path, rel: str, key: str) -> None:
    """Drop the present content of ``key`` and what git-annex recorded from it (VURL checksums)."""
    if dataset.has_key(repo, key):
        digests = pins.judge(repo / rel, key, None).digests
        dataset.drop_key(repo, key)
        pins.forget_checksums_of(repo, key, digests)


def _remote_verdict(urls: list[str], key: str, pin: pins.Pin | None) -> str:
    """What the server sends now, judged against the record (hashed as it arrives, not kept)."""
    from nsdprep.core.bucket import read_url

    if not urls:
        return ""
    try:
        verdict = pins.judge(read_url(urls[0], hint=NSD_403_HINT), key, pin)
    except RemoteError as exc:
        return f"could not fetch it again: {exc}"
    return f"expected {verdict.expected}, got {verdict.actual}" if verdict.ok is False else ""


def check_content(path: Path, key: str, pin: pins.Pin | None) -> str | None:
    """What is wrong with the content at ``path`` (``None`` if nothing found).

    Checks its size against the key, its checksum against the key (MD5E and the like) or else the
    ETag recorded at registration (``pin``), and reads a ``.gz`` file to its end (zlib checks the
    CRC-32 and length of every gzip member), all in one read. The server is not asked.
    """
    size = dataset.key_size(key)
    actual = path.stat().st_size
    if size is not None and actual != size:
        return f"size {actual} bytes, the key says {size}"
    stream = _GzipCheck(path) if path.name.endswith(".gz") else None
    blocks = stream.blocks() if stream is not None else pins.read_blocks(path)
    verdict = pins.judge(blocks, key, pin)
    problems = []
    if verdict.ok is False:
        problems.append(f"expected {verdict.expected} (recorded), got {verdict.actual}")
    if stream is not None and stream.problem:
        problems.append(stream.problem)
    return "; ".join(problems) or None


class _GzipCheck:
    """Blocks of a file, decompressed on the way to check every gzip member's CRC and length."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problem: str | None = None

    def blocks(self) -> Iterator[bytes]:
        gz = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        for block in pins.read_blocks(self.path):
            yield block
            if self.problem is not None:
                continue
            try:
                data = block
                while data:
                    gz.decompress(data, 1 << 22)
                    data = gz.unconsumed_tail
                    if gz.eof and gz.unused_data:  # another gzip member follows
                        data = gz.unused_data + data
                        gz = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            except zlib.error as exc:
                self.problem = f"the gzip stream is corrupted ({exc})"
        if self.problem is None and not gz.eof:
            self.problem = "the gzip stream is truncated"


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
