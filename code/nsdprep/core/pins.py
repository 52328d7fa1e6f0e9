"""Checksums pinned at registration: each input's ETag from the listing, and downloads checked on it.

A VURL key holds a URL and a size; git-annex records a checksum from whatever a file's first download
brings, so a mirror or a broken transfer that delivers other bytes of the right size would be
believed, and its checksum would then refuse the real file. The bucket listing (S3
``ListObjectsV2``) gives each object's ETag; ``make inputs`` records it, with the size, in the input
subdataset's table (:data:`TABLE_PATH`, in git, so every clone has it), and:

- single-part upload (the ETag is the content's MD5): the file is registered with an MD5E key from
  the start (``datalad addurls --key 'et:MD5-s<size>--<md5>'``); git-annex verifies every download,
  in every clone, by itself;
- multipart upload (``md5(md5(part 1) + ... + md5(part N))-N``): the file keeps its VURL key and
  :func:`verify_fetched` checks its first download against the ETag, trying the part sizes upload
  tools use, and records the one that matched (git-annex metadata ``nsdprep-etag-partsize``). From
  then on the checksum git-annex recorded from that download (the VURL key's equivalent key, in the
  ``git-annex`` branch, which ``make publish`` pushes) pins the content in every clone.

A download that does not match is removed, whatever git-annex recorded from it is taken back, and
one line per file names it with the expected and the actual checksum. Nothing here asks the server
again: the server's word now is never the reference.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nsdprep.core import dataset, nsd
from nsdprep.core.errors import RemoteError

log = logging.getLogger(__name__)

#: The addurls table of an input subdataset, which holds the pins (tracked in git).
TABLE_PATH = nsd.ADDURLS_TABLE
#: Its columns: ``etag`` as listed (quotes removed), ``annex_key`` the key given to addurls
#: (``et:MD5-s<size>--<md5>`` for a single-part ETag, empty for a VURL key).
TABLE_COLUMNS = ("filename", "url", "size", "etag", "annex_key")
MiB = 1024 * 1024
#: Part sizes upload tools use, most likely first: aws cli and boto3 (8 MiB), rclone and the AWS
#: SDKs' minimum (5 MiB), MinIO's mc (16 MiB), s3cmd (15 MiB), then others seen in practice. Sizes
#: derived from the part count and the object's size are tried after these.
COMMON_PART_SIZES = tuple(
    n * MiB for n in (8, 5, 16, 15, 64, 32, 10, 25, 50, 100, 128, 256, 512, 1024)
)
#: At most this many part sizes are tried for one file (each costs an MD5 pass, done together).
MAX_PART_SIZES = 16
#: git-annex metadata of a VURL key checked here: the part size that reproduced its ETag, and the
#: equivalent keys (checksums git-annex verifies later downloads against) found to match it.
PART_SIZE_FIELD = "nsdprep-etag-partsize"
VERIFIED_FIELD = "nsdprep-etag-verified"

_ETAG_RE = re.compile(r"(?P<md5>[0-9a-f]{32})(?:-(?P<parts>[1-9][0-9]{0,4}))?")
_BLOCK = 8 * MiB


@dataclass(frozen=True)
class Pin:
    """What the listing said of one object: its size and its S3 ETag (lower case, no quotes)."""

    size: int
    etag: str

    @classmethod
    def parse(cls, size: int | str, etag: str) -> Pin | None:
        """A pin if ``etag`` has S3's form (``<md5>`` or ``<md5>-<parts>``), else ``None``.

        Weak or other servers' ETags (``W/...``, ``5e1f-5b8``) say nothing about the content.
        """
        text = etag.strip().strip('"').lower()
        if _ETAG_RE.fullmatch(text) is None or not str(size).isdigit():
            return None
        return cls(int(size), text)

    @property
    def parts(self) -> int:
        """Number of parts of a multipart upload; 0 for a single-part one."""
        m = _ETAG_RE.fullmatch(self.etag)
        return int(m["parts"]) if m and m["parts"] else 0

    @property
    def md5(self) -> str | None:
        """The content's MD5 (single-part uploads only)."""
        return None if self.parts else self.etag

    def annex_key_spec(self) -> str:
        """The ``datalad addurls --key`` value: an MD5 key migrated to MD5E, or "" (VURL)."""
        return f"et:MD5-s{self.size}--{self.md5}" if self.md5 else ""

    def describe(self) -> str:
        """``MD5 <hex>`` or ``ETag <hex>-N``, as messages name it."""
        return f"MD5 {self.md5}" if self.md5 else f"ETag {self.etag}"


def read_table(repo: str | Path) -> dict[str, dict[str, str]]:
    """The rows of an input subdataset's addurls table, by file name (``{}`` if it has none)."""
    path = Path(repo) / TABLE_PATH
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        return {row["filename"]: row for row in csv.DictReader(f) if row.get("filename")}


def read_pins(repo: str | Path) -> dict[str, Pin]:
    """``{file: Pin}`` recorded in an input subdataset's table.

    Files registered without one are absent: registered before ETags were recorded, or listed
    without an S3 ETag.
    """
    pins = {}
    for name, row in read_table(repo).items():
        pin = Pin.parse(row.get("size") or "", row.get("etag") or "")
        if pin is not None:
            pins[name] = pin
    return pins


# -- computing ETags --------------------------------------------------------------------------------
def candidate_part_sizes(size: int, parts: int, preferred: Iterable[int] = ()) -> list[int]:
    """Part sizes that split ``size`` bytes into exactly ``parts`` parts, most likely first.

    ``preferred`` (e.g. the size another file of the bucket matched) first, then
    :data:`COMMON_PART_SIZES`, then sizes derived from the count: whole MiB and whole MB between
    ``ceil(size / parts)`` and ``(size - 1) / (parts - 1)``, and ``ceil(size / parts)`` itself.
    At most :data:`MAX_PART_SIZES`.
    """
    if parts <= 1:
        return [max(size, 1)]

    def fits(p: int) -> bool:
        return p >= 1 and -(-size // p) == parts

    found: list[int] = []
    for p in (*preferred, *COMMON_PART_SIZES):
        if fits(p) and p not in found:
            found.append(p)
    low, high = -(-size // parts), (size - 1) // (parts - 1)
    for unit, count in ((MiB, 4), (1_000_000, 2)):
        p = -(-low // unit) * unit
        while p <= high and count > 0:
            if p not in found:
                found.append(p)
                count -= 1
            p += unit
    if fits(low) and low not in found:
        found.append(low)
    return found[:MAX_PART_SIZES]


class _PartHasher:
    """S3's multipart ETag of a stream cut into parts of ``part_size`` bytes."""

    def __init__(self, part_size: int) -> None:
        self.part_size = part_size
        self.digests: list[bytes] = []
        self._current = hashlib.md5(usedforsecurity=False)
        self._filled = 0

    def update(self, block: bytes) -> None:
        view = memoryview(block)
        while view:
            take = view[: self.part_size - self._filled]
            self._current.update(take)
            self._filled += len(take)
            view = view[len(take) :]
            if self._filled == self.part_size:
                self.digests.append(self._current.digest())
                self._current, self._filled = hashlib.md5(usedforsecurity=False), 0

    def etag(self) -> str:
        digests = self.digests + ([self._current.digest()] if self._filled else [])
        joined = hashlib.md5(b"".join(digests), usedforsecurity=False).hexdigest()
        return f"{joined}-{len(digests)}"


def file_digests(
    source: str | Path | Iterable[bytes],
    part_sizes: Sequence[int] = (),
    algorithms: Iterable[str] = (),
) -> tuple[dict[int, str], dict[str, str], int]:
    """In one read of a file (or of blocks): multipart ETags, ``hashlib`` digests, size in bytes."""
    parts = {p: _PartHasher(p) for p in part_sizes}
    whole = {a: hashlib.new(a, usedforsecurity=False) for a in dict.fromkeys(algorithms)}
    size = 0
    for block in _blocks(source):
        size += len(block)
        for h in whole.values():
            h.update(block)
        for ph in parts.values():
            ph.update(block)
    etags = {p: ph.etag() for p, ph in parts.items()}
    return etags, {a: h.hexdigest() for a, h in whole.items()}, size


def _blocks(source: str | Path | Iterable[bytes]) -> Iterator[bytes]:
    if isinstance(source, str | Path):
        yield from read_blocks(source)
    else:
        yield from source


def read_blocks(path: str | Path, block: int = _BLOCK) -> Iterator[bytes]:
    """The content of ``path`` in blocks of ``block`` bytes."""
    with open(path, "rb") as f:
        while chunk := f.read(block):
            yield chunk


@dataclass(frozen=True)
class Match:
    """The outcome of checking content against a pin."""

    ok: bool
    #: what was found, in the pin's terms: ``MD5 <hex>`` or ``ETag <hex>-N`` (with part size)
    actual: str
    #: the part size that reproduced a multipart ETag
    part_size: int | None = None
    #: ``hashlib`` digests of the whole content, by algorithm
    digests: dict[str, str] = field(default_factory=dict)


def check_against_pin(
    source: str | Path | Iterable[bytes],
    pin: Pin,
    *,
    algorithms: Iterable[str] = (),
    preferred: Iterable[int] = (),
) -> Match:
    """Does the content (a file, or blocks) have the listed ETag? (also ``algorithms`` digests)."""
    if not pin.parts:
        _, digests, size = file_digests(source, (), ("md5", *algorithms))
        ok = size == pin.size and digests["md5"] == pin.md5
        return Match(ok, f"MD5 {digests['md5']}", None, digests)
    candidates = candidate_part_sizes(pin.size, pin.parts, preferred)
    etags, digests, size = file_digests(source, candidates, algorithms)
    if size == pin.size:
        for p in candidates:
            if etags[p] == pin.etag:
                return Match(True, f"ETag {etags[p]}", p, digests)
    if not candidates:
        return Match(False, f"no part size splits {pin.size} bytes into {pin.parts}", None, digests)
    tried = ", ".join(_human(p) for p in candidates[:4]) + (" ..." if len(candidates) > 4 else "")
    first = candidates[0]
    return Match(
        False, f"ETag {etags[first]} ({_human(first)} parts; tried {tried})", None, digests
    )


def _human(n: int) -> str:
    return f"{n // MiB} MiB" if n % MiB == 0 else f"{n} bytes"


# -- equivalent keys ------------------------------------------------------------------------------
def _ek_algorithm(ek: str) -> tuple[str, str] | None:
    """``(hashlib name, hex)`` of a checksum key such as ``SHA256E-s10--<hex>``; None if unknown."""
    backend, sep, rest = ek.partition("--")
    if not sep:
        return None
    name = backend.split("-", 1)[0].removesuffix("E").lower()
    if name not in hashlib.algorithms_guaranteed:
        return None
    return name, rest.split(".", 1)[0].lower()


def ek_matches(ek: str, digests: dict[str, str]) -> bool | None:
    """True/False if ``ek`` is (not) the checksum in ``digests``; None if it cannot be told."""
    parsed = _ek_algorithm(ek)
    if parsed is None or parsed[0] not in digests:
        return None
    return digests[parsed[0]] == parsed[1]


# -- verifying fetched content --------------------------------------------------------------------
@dataclass
class Verification:
    """What :func:`verify_fetched` did."""

    #: checked against their pin now (dataset-relative paths)
    checked: list[str] = field(default_factory=list)
    #: present with a checksum key (git-annex verified them) or checked before: nothing to do
    trusted: list[str] = field(default_factory=list)
    #: VURL files without a recorded ETag: nothing to check them against
    unpinned: list[str] = field(default_factory=list)
    #: one line per file that did not match (its content removed)
    problems: list[str] = field(default_factory=list)
    #: absolute paths of those files
    problem_paths: list[str] = field(default_factory=list)
    #: the part size that reproduced each multipart ETag checked now
    part_sizes: dict[str, int] = field(default_factory=dict)

    def raise_problems(self) -> None:
        """Raise a :class:`RemoteError` with one line per file that did not match."""
        if self.problems:
            raise RemoteError("\n".join(self.problems))


def verify_fetched(
    ds: str | Path, paths: Sequence[str | Path], *, check: bool = True
) -> Verification:
    """Check the input content under ``paths`` against the ETags recorded at registration.

    ``ds`` is the dataset the (relative) ``paths`` start from: the superdataset or an input
    subdataset; paths that are not annexed files of an input subdataset are ignored (derivatives,
    glob patterns that match nothing), so a step's declared inputs can be passed as they are.

    - content with a checksum key: verified by git-annex when it arrived; nothing to do;
    - content with a VURL key and a recorded ETag: checked once (later downloads are verified by
      git-annex against the checksum recorded then, unless that record changed): on a match the
      part size is recorded; otherwise the content is dropped, the checksum git-annex recorded from
      it retracted, and a line names the file, the expected and the actual checksum;
    - a download git-annex refused and left complete in ``.git/annex/tmp``: removed, with the same
      line (its actual checksum is computed first).

    ``check``: raise a :class:`RemoteError` with those lines (else they are in the result).
    """
    ds = Path(os.path.abspath(ds))
    result = Verification()
    for repo, rels in _by_repository(ds, paths).items():
        if not read_table(repo):
            continue  # not an input subdataset
        _verify_repo(ds, repo, rels, read_pins(repo), result)
    if result.unpinned:
        log.warning(
            "%d input file(s) have no ETag recorded (registered before ETags were, or listed "
            "without one) and could not be checked, e.g. %s; `make inputs` records them",
            len(result.unpinned),
            result.unpinned[0],
        )
    if check:
        result.raise_problems()
    return result


def fetch_verified(
    ds: str | Path, paths: Sequence[str | Path], *, hint_403: str = "", jobs: int = 1
) -> Verification:
    """``datalad get`` ``paths`` of ``ds``, then :func:`verify_fetched` them (also after a failure).

    Only paths in (installed) input subdatasets are fetched; others (derivatives, glob patterns
    that match nothing) are left alone, so a step's declared inputs can be passed as they are. One
    line per file that does not match its recorded checksum; other failures as ``datalad get``
    reports them. What does not match is never left behind.
    """
    ds = Path(os.path.abspath(ds))
    wanted = [
        repo / rel for repo, rels in _by_repository(ds, paths).items() if read_table(repo)
        for rel in rels
    ]  # fmt: skip
    if not wanted:
        return Verification()
    results = dataset.get(ds, wanted, check=False, jobs=jobs)
    outcome = verify_fetched(ds, wanted, check=False)
    refused = [
        str(r["path"])
        for r in results
        if r.get("status") == "error"
        and "path" in r
        and str(r["path"]) not in outcome.problem_paths
        and "Verification of content failed" in f"{r.get('message')} {r.get('error_message')}"
    ]
    for path in refused:
        _name_discarded(Path(os.path.abspath(ds)), Path(path), outcome, hint_403)
    covered = set(outcome.problem_paths)
    rest = [r for r in results if not _covered(r, covered)]
    try:
        dataset.check_get_results(rest, hint_403=hint_403)
    except RemoteError as exc:
        if outcome.problems:
            raise RemoteError("\n".join([*outcome.problems, str(exc)])) from exc
        raise
    outcome.raise_problems()
    return outcome


def _covered(record: dict[str, object], covered: set[str]) -> bool:
    """True if a ``datalad get`` failure is said already: its file, or a folder of only such files."""
    path = str(record.get("path", ""))
    if path in covered:
        return True
    if record.get("type") == "file" or record.get("status") not in ("error", "impossible"):
        return False
    inside = [p for p in covered if p.startswith(path + os.sep)]
    named = [
        n
        for n in re.findall(r"'([^']+)'", str(record.get("message", "")))
        if n.startswith(path + os.sep)
    ]
    return bool(inside) and all(n in covered for n in named)


def _name_discarded(ds: Path, path: Path, outcome: Verification, hint: str) -> None:
    """A download git-annex refused and discarded: fetch it again into nothing but a checksum.

    Only to name its actual checksum in the one line (the bytes are hashed as they arrive, never
    stored); the expected one is the file's MD5 key or recorded ETag.
    """
    from nsdprep.core.bucket import read_url

    repo = _repository_of(path, ds)
    rel = os.path.relpath(path, repo)
    key = dataset.lookup_key(repo, rel)
    urls = dataset.key_urls(repo, key)
    pin = read_pins(repo).get(rel)
    if not urls:
        return
    log.info("%s: fetching it again (hashing only) to name the checksum it has", rel)
    try:
        verdict = judge(read_url(urls[0], hint=hint), key, pin)
    except RemoteError as exc:
        log.warning("%s: could not fetch it again to name its checksum: %s", rel, exc)
        return
    if verdict.ok is None:
        return
    _problem(outcome, repo, ds, rel, key, verdict.expected, verdict.actual, verdict.ok)


def _by_repository(ds: Path, paths: Sequence[str | Path]) -> dict[Path, list[str]]:
    """Group ``paths`` by the repository (dataset or subdataset) they are in, relative to it."""
    groups: dict[Path, list[str]] = {}
    for raw in paths:
        text = str(raw)
        full = text if os.path.isabs(text) else os.path.join(ds, text)
        found = sorted(glob.glob(full)) if glob.has_magic(full) else [full]
        for item in found:
            item = os.path.abspath(item)
            if not (
                os.path.lexists(item) and (item == str(ds) or item.startswith(str(ds) + os.sep))
            ):
                continue
            repo = _repository_of(Path(item), ds)
            rel = os.path.relpath(item, repo)
            groups.setdefault(repo, []).append("." if rel == "." else rel)
    return groups


def _repository_of(path: Path, ds: Path) -> Path:
    """The innermost repository (a folder with ``.git``) holding ``path``, at most ``ds``."""
    here = path if path.is_dir() and not path.is_symlink() else path.parent
    while here != ds and ds in here.parents:
        if (here / ".git").exists():
            return here
        here = here.parent
    return ds


def _verify_repo(
    ds: Path, repo: Path, rels: list[str], pins: dict[str, Pin], result: Verification
) -> None:
    present, _ = dataset.annex_json(repo, "find", "--in", "here", "--", *rels)
    absent, _ = dataset.annex_json(repo, "find", "--not", "--in", "here", "--", *rels)
    # present content with a VURL key and a pin: checked unless checked before
    todo = []
    for rec in present:
        rel, key = rec.get("file", ""), rec.get("key", "")
        shown = os.path.relpath(repo / rel, ds)
        if dataset.key_is_checksum(key):
            result.trusted.append(shown)
        elif rel not in pins:
            result.unpinned.append(shown)
        else:
            todo.append((rel, key))
    if todo:
        dataset.commit_annex_journal(repo)  # the checksum records are read from the branch
    eks = dataset.equivalent_keys(repo, [k for _, k in todo])
    meta = dataset.key_metadata(repo, [r for r, _ in todo])
    ek_changes: dict[str, tuple[list[str], list[str]]] = {}
    for rel, key in todo:
        shown = os.path.relpath(repo / rel, ds)
        done = sorted(meta.get(key, {}).get(VERIFIED_FIELD, []))
        if eks[key] and done == eks[key]:
            result.trusted.append(shown)  # git-annex verified it against a checked checksum
            continue
        pin = pins[rel]
        preferred = [int(v) for v in meta.get(key, {}).get(PART_SIZE_FIELD, []) if v.isdigit()]
        algorithms = {"sha256"} | {p[0] for ek in eks[key] if (p := _ek_algorithm(ek))}
        match = check_against_pin(repo / rel, pin, algorithms=algorithms, preferred=preferred)
        if match.ok:
            good = [ek for ek in eks[key] if ek_matches(ek, match.digests) is True]
            stale = [ek for ek in eks[key] if ek_matches(ek, match.digests) is False]
            add = [] if good else [f"SHA256E-s{pin.size}--{match.digests['sha256']}"]
            if add or stale:
                ek_changes[key] = (add, stale)
            if stale:
                log.warning(
                    "%s: matches its recorded %s; took back %d checksum(s) recorded from other "
                    "content at an earlier download",
                    shown, pin.describe(), len(stale),
                )  # fmt: skip
            fields = {VERIFIED_FIELD: sorted(good + add)}
            if match.part_size:
                fields[PART_SIZE_FIELD] = [str(match.part_size)]
                result.part_sizes[shown] = match.part_size
            dataset.set_key_metadata(repo, key, fields)
            result.checked.append(shown)
            log.info(
                "%s: matches the %s recorded at registration%s",
                shown, pin.describe(),
                f" ({_human(match.part_size)} parts)" if match.part_size else "",
            )  # fmt: skip
            continue
        bad = [ek for ek in eks[key] if ek_matches(ek, match.digests) is True]
        dataset.drop_key(repo, key)
        if bad:
            ek_changes[key] = ([], bad)
        _problem(result, repo, ds, rel, key, pin.describe(), match.actual)
    # downloads git-annex refused (complete, left in .git/annex/tmp)
    refused = dataset.failed_downloads(repo, [r.get("key", "") for r in absent if r.get("key")])
    for rec in absent:
        rel, key = rec.get("file", ""), rec.get("key", "")
        tmp = refused.get(key)
        if tmp is None:
            continue
        verdict = judge(tmp, key, pins.get(rel))
        if verdict.ok is None:
            continue  # nothing to judge it by: left for git-annex to resume
        tmp.unlink(missing_ok=True)
        _problem(result, repo, ds, rel, key, verdict.expected, verdict.actual, verdict.ok)
    if ek_changes:
        dataset.update_equivalent_keys(repo, ek_changes)


@dataclass(frozen=True)
class Judgement:
    """Content judged against what was recorded: its checksum key, else its pin."""

    #: ``MD5 <hex>`` / ``ETag <hex>-N``: what was recorded ("" if nothing was)
    expected: str
    #: the same of the content
    actual: str
    #: True/False; None if nothing was recorded to judge it by
    ok: bool | None
    #: ``hashlib`` digests of the whole content (to find the checksums git-annex took from it)
    digests: dict[str, str] = field(default_factory=dict)


def judge(source: str | Path | Iterable[bytes], key: str, pin: Pin | None) -> Judgement:
    """Judge content (a file, or blocks as they arrive) against ``key``'s checksum or ``pin``."""
    if dataset.key_is_checksum(key):
        parsed = _ek_algorithm(key)
        if parsed is None:
            return Judgement("", "", None)
        _, digests, _ = file_digests(source, (), (parsed[0], "sha256"))
        name = parsed[0].upper()
        return Judgement(
            f"{name} {parsed[1]}",
            f"{name} {digests[parsed[0]]}",
            digests[parsed[0]] == parsed[1],
            digests,
        )
    if pin is None:
        _, digests, _ = file_digests(source, (), ("sha256",))
        return Judgement("", "", None, digests)
    match = check_against_pin(source, pin, algorithms=("sha256",))
    return Judgement(pin.describe(), match.actual, match.ok, match.digests)


def forget_checksums_of(repo: str | Path, key: str, digests: dict[str, str]) -> list[str]:
    """Retract the checksums git-annex recorded for VURL ``key`` from content with ``digests``.

    For content found wrong: git-annex would otherwise verify later downloads against it. Returns
    the retracted checksum keys.
    """
    if dataset.key_is_checksum(key):
        return []
    dataset.commit_annex_journal(repo)
    bad = [ek for ek in dataset.equivalent_keys(repo, [key])[key] if ek_matches(ek, digests)]
    if bad:
        dataset.update_equivalent_keys(repo, {key: ([], bad)})
    return bad


def _problem(
    result: Verification,
    repo: Path,
    ds: Path,
    rel: str,
    key: str,
    expected: str,
    actual: str,
    refused_good: bool = False,
) -> None:
    shown = os.path.relpath(repo / rel, ds)
    urls = dataset.key_urls(repo, key)
    source = f" from {urls[0]}" if urls else ""
    if refused_good:
        line = (
            f"{shown}: the download{source} has the recorded {expected} but git-annex refused it: "
            "a checksum recorded from an earlier, damaged download stands in its way. Nothing "
            "was kept; `make repair` replaces that record."
        )
    else:
        line = (
            f"{shown}: Verification of content failed: expected {expected} (recorded at "
            f"registration), got {actual}; the download{source} was removed and nothing recorded. "
            "The server sends other bytes than it listed: check the source."
        )
    result.problems.append(line)
    result.problem_paths.append(str(repo / rel))
