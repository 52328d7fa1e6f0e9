"""A loopback-only, read-only HTTP server that answers like S3 for a directory of buckets.

``root/<bucket>/<key>`` is served at ``http://127.0.0.1:PORT/<bucket>/<key>`` (path-style S3 URLs):
object ``GET``/``HEAD`` with ``Content-Length``, ``Last-Modified``, ``ETag``, ``Accept-Ranges`` and
single byte ranges (``206``), ``404 NoSuchKey`` XML for missing keys, and ``ListObjectsV2``
(``GET /<bucket>/?list-type=2&prefix=P&delimiter=D&continuation-token=T&max-keys=N``) with the real XML
schema, keys sorted by their UTF-8 bytes and pages of at most 1000 keys, as S3 does. That is what
``nsdprep.stages.inputs``, ``git-annex``'s web remote and ``curl`` need, so the demo and the tests run the same
client code against this mirror as against the public NSD bucket, offline.

Why a server of our own and not ``moto``: moto (``moto[server]``) would do as well and emulates far more of
S3; this one is a few hundred lines of standard library (no extra dependency in the pinned environment), gives
exact control of the faults the tests need (``403 AccessDenied`` for chosen keys, a download cut short
after N bytes, a connection reset or a stall in the middle of a transfer for the first K requests, a
bandwidth cap that models a real link) and its listing answers are the documented ListObjectsV2 XML,
so nothing in the client is written for the mirror.

ETags are S3's: the content MD5 for objects up to ``multipart_threshold`` (a single-part upload), and
above it the multipart form ``md5(md5(part 1) + ... + md5(part N))-N`` with parts of ``part_size``
(defaults: 8 MiB and 8 MiB, what ``aws s3 cp`` uses). A hostile mirror can be played with
:meth:`Mirror.tamper`: same size, other bytes, the listing still showing the true ETag.

Only loopback addresses are accepted: this is a test and demo tool, never a public server.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import email.utils
import fnmatch
import hashlib
import http.server
import ipaddress
import logging
import os
import signal
import socket
import struct
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any
from xml.sax.saxutils import escape

from nsdprep.core import nsd
from nsdprep.core.errors import NsdPrepError

log = logging.getLogger(__name__)

S3_XMLNS = "http://s3.amazonaws.com/doc/2006-03-01/"
MAX_KEYS = 1000
MiB = 1024 * 1024
#: ``aws s3 cp``'s defaults: objects above 8 MiB are uploaded in parts of 8 MiB.
DEFAULT_MULTIPART_THRESHOLD = 8 * MiB
DEFAULT_PART_SIZE = 8 * MiB
#: How many bytes :meth:`Mirror.tamper` alters (in the middle of the object).
TAMPER_BYTES = 64
_CHUNK = 1024 * 1024
#: Block size while a rate cap applies (small blocks keep the rate smooth).
_THROTTLED_CHUNK = 64 * 1024


class Mirror:
    """Serve ``root`` on a loopback address in a background thread, like a set of S3 buckets.

    Parameters
    ----------
    root
        Directory whose subdirectories are the buckets (``root/nsd``, ``root/coco``).
    host
        A loopback address (``127.0.0.1`` by default; ``localhost`` means ``127.0.0.1``).
    port
        TCP port; 0 picks a free one (read it back from :attr:`url`).
    deny
        Glob patterns (``fnmatch``, matched against ``"<bucket>/<key>"``) answered with
        ``403 AccessDenied``, also in listings of a denied prefix.
    truncate
        ``{pattern: n_bytes}``: object downloads matching ``pattern`` send the full ``Content-Length``
        header, then only ``n_bytes`` of the body, then close the connection.
    rate_mb_s
        Bandwidth cap of object bodies in MB/s (10^6 bytes), shared by all connections (a link);
        None = as fast as possible. See :meth:`limit`.
    connection_rate_mb_s
        Cap per connection in MB/s (one download stream, as S3 limits a single GET); None = only the
        shared cap applies (a single stream then gets all of it).
    multipart_threshold, part_size
        Objects larger than ``multipart_threshold`` bytes get a multipart ETag of ``part_size`` parts.
    objects
        ``{"<bucket>/<key>": bytes}`` served and listed besides the files, keys taken verbatim (S3
        keys are any text: ``../x``, a leading ``/``, a trailing newline), for hostile listings.
    tamper
        Glob patterns (as ``deny``) of objects served altered, see :meth:`tamper`.

    Flaky-network faults (:meth:`reset_after`, :meth:`stall_after`) hit only the first K downloads of
    a matching object, then it is served normally, as a transient network fault would be.
    Faults can also be changed while serving with :meth:`deny` / :meth:`truncate` / :meth:`clear_faults`.
    Use as a context manager (``with Mirror(root) as m: ... m.url``) or call :meth:`start`/:meth:`stop`.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        deny: Iterable[str] = (),
        truncate: dict[str, int] | None = None,
        rate_mb_s: float | None = None,
        connection_rate_mb_s: float | None = None,
        multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
        part_size: int = DEFAULT_PART_SIZE,
        objects: dict[str, bytes] | None = None,
        tamper: Iterable[str] = (),
    ) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise NsdPrepError(f"cannot serve {self.root}: expected a directory of buckets")
        self.host = _check_loopback(host)
        self.port = port
        self._lock = threading.Lock()
        self._deny: list[str] = list(deny)
        self._truncate: dict[str, int] = dict(truncate or {})
        self._flaky: list[_Flaky] = []
        if part_size < 1 or multipart_threshold < 0:
            raise NsdPrepError(
                f"part_size must be >= 1 and multipart_threshold >= 0 bytes, got {part_size} "
                f"and {multipart_threshold}"
            )
        self.multipart_threshold, self.part_size = int(multipart_threshold), int(part_size)
        self._objects: dict[str, bytes] = dict(objects or {})
        self._tamper: list[str] = list(tamper)
        self._etags: dict[tuple[str, int, int, bool], str] = {}
        self._rate: _Throttle | None = None
        self._connection_rate: float | None = None
        self.limit(rate_mb_s, connection_rate_mb_s)
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- fault control --------------------------------------------------------------------------
    def deny(self, pattern: str) -> None:
        """Answer ``403 AccessDenied`` for ``"<bucket>/<key>"`` matching ``pattern`` from now on."""
        with self._lock:
            self._deny.append(pattern)

    def truncate(self, pattern: str, n_bytes: int) -> None:
        """Cut downloads of objects matching ``pattern`` after ``n_bytes`` of body from now on."""
        with self._lock:
            self._truncate[pattern] = int(n_bytes)

    def tamper(self, pattern: str) -> None:
        """Serve objects matching ``pattern`` altered from now on: same size, other bytes.

        :data:`TAMPER_BYTES` bytes in the middle are inverted. Listings keep the true ETag (what
        the bucket lists), while ``GET``/``HEAD`` send the ETag of the altered bytes, as a mirror
        that lies consistently would: only a checksum recorded from the listing tells them apart.
        """
        with self._lock:
            self._tamper.append(pattern)

    def reset_after(self, pattern: str, n_bytes: int, times: int = 1) -> None:
        """Reset the connection (TCP RST) after ``n_bytes`` of body, for the next ``times`` downloads.

        ``times`` < 0: every download. Downloads of objects matching ``pattern`` count, including
        resumed ones (``Range``), whose ``n_bytes`` count from the start of the range.
        """
        with self._lock:
            self._flaky.append(_Flaky(pattern, "reset", int(n_bytes), int(times)))

    def stall_after(self, pattern: str, n_bytes: int, seconds: float, times: int = 1) -> None:
        """Stop sending for ``seconds`` after ``n_bytes`` of body, for the next ``times`` downloads.

        The connection stays open and silent (a hung transfer), then it is closed without the rest
        of the body; ``times`` < 0: every download.
        """
        with self._lock:
            self._flaky.append(_Flaky(pattern, "stall", int(n_bytes), int(times), float(seconds)))

    def fault_hits(self, pattern: str | None = None) -> int:
        """How many downloads the flaky-network faults (of ``pattern``, or all) have hit so far."""
        with self._lock:
            return sum(f.hits for f in self._flaky if pattern is None or f.pattern == pattern)

    def clear_faults(self) -> None:
        """Serve everything normally again."""
        with self._lock:
            self._deny.clear()
            self._truncate.clear()
            self._flaky.clear()
            self._tamper.clear()

    def limit(self, rate_mb_s: float | None, connection_rate_mb_s: float | None = None) -> None:
        """Cap object downloads at ``rate_mb_s`` in total and ``connection_rate_mb_s`` per connection.

        MB = 10^6 bytes; None lifts a cap. Applies to bodies sent from now on (running downloads
        included); listings and headers are not counted.
        """
        for value in (rate_mb_s, connection_rate_mb_s):
            if value is not None and not value > 0:
                raise NsdPrepError(f"a rate cap must be a positive number of MB/s, got {value}")
        with self._lock:
            self._rate = None if rate_mb_s is None else _Throttle(rate_mb_s * 1e6)
            self._connection_rate = (
                None if connection_rate_mb_s is None else connection_rate_mb_s * 1e6
            )

    def _throttles(self) -> tuple[_Throttle | None, float | None]:
        with self._lock:
            return self._rate, self._connection_rate

    def _denied(self, path: str) -> bool:
        with self._lock:
            return any(fnmatch.fnmatchcase(path, p) for p in self._deny)

    def _tampered(self, path: str) -> bool:
        with self._lock:
            return any(fnmatch.fnmatchcase(path, p) for p in self._tamper)

    def _cut_after(self, path: str) -> int | None:
        with self._lock:
            for pattern, n in self._truncate.items():
                if fnmatch.fnmatchcase(path, pattern):
                    return n
        return None

    def _take_flaky(self, path: str) -> _Flaky | None:
        """The flaky fault for this download, if one still applies (counts the hit)."""
        with self._lock:
            for fault in self._flaky:
                if fault.times != 0 and fnmatch.fnmatchcase(path, fault.pattern):
                    fault.times -= 1 if fault.times > 0 else 0
                    fault.hits += 1
                    return fault
        return None

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """Base URL, ``http://127.0.0.1:PORT`` (bucket URLs are ``{url}/<bucket>``)."""
        if self._server is None:
            raise NsdPrepError("the mirror is not running: use it as a context manager or start()")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._server.server_address[1]}"

    def start(self) -> Mirror:
        """Bind the port and serve in a daemon thread."""
        if self._server is not None:
            return self
        handler = type("_BoundHandler", (_Handler,), {"mirror": self})
        server_cls = _IPv6Server if ":" in self.host else _Server
        self._server = server_cls((self.host, self.port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"mirror:{self.root.name}", daemon=True
        )
        self._thread.start()
        log.debug("serving %s at %s", self.root, self.url)
        return self

    def stop(self) -> None:
        """Stop serving and release the port."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None
        self._thread = None

    def __enter__(self) -> Mirror:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- storage --------------------------------------------------------------------------------
    def object_path(self, bucket: str, key: str) -> Path | None:
        """Local file of ``bucket/key``, or ``None`` if absent (or outside the root)."""
        if not bucket or bucket.startswith(".") or "/" in bucket or not key:
            return None
        parts = key.split("/")
        if any(p in ("", ".", "..") for p in parts):
            return None
        path = self.root / bucket / Path(*parts)
        return path if path.is_file() and not path.is_symlink() else None

    def bucket_dir(self, bucket: str) -> Path | None:
        """Directory of ``bucket``, or ``None`` if there is no such bucket."""
        if not bucket or bucket.startswith(".") or "/" in bucket:
            return None
        path = self.root / bucket
        return path if path.is_dir() else None

    def memory_object(self, bucket: str, key: str) -> bytes | None:
        """The bytes of an object given in ``objects`` (keys verbatim), or ``None``."""
        return self._objects.get(f"{bucket}/{key}")

    def iter_keys(self, bucket: str, prefix: str) -> list[tuple[str, Path | bytes]]:
        """All ``(key, path or bytes)`` of ``bucket`` under ``prefix``, sorted like S3 (UTF-8 bytes)."""
        bdir = self.bucket_dir(bucket)
        if bdir is None:
            return []
        found: list[tuple[str, Path | bytes]] = [
            (k.partition("/")[2], data)
            for k, data in self._objects.items()
            if k.partition("/")[0] == bucket and k.partition("/")[2].startswith(prefix)
        ]
        # Walk only the directory part of the prefix (a large tree stays cheap to list).
        head = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = bdir / head if head else bdir
        if ".." not in head.split("/") and start.is_dir():
            for dirpath, dirnames, filenames in os.walk(start):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for name in filenames:
                    full = Path(dirpath) / name
                    key = full.relative_to(bdir).as_posix()
                    if key.startswith(prefix) and not full.is_symlink():
                        found.append((key, full))
        found.sort(key=lambda kp: kp[0].encode("utf-8"))
        return found

    def etag(self, obj: Path | bytes, *, tampered: bool = False) -> str:
        """Quoted S3 ETag of a file or in-memory object (``tampered``: of its altered bytes).

        Single-part (the content MD5) up to ``multipart_threshold`` bytes, multipart above
        (``md5(concatenated part MD5s)-N``, parts of ``part_size``); cached by size and mtime.
        """
        if isinstance(obj, bytes):
            return self._compute_etag(obj, len(obj), tampered)
        st = obj.stat()
        cache_key = (str(obj), st.st_size, st.st_mtime_ns, tampered)
        with self._lock:
            cached = self._etags.get(cache_key)
        if cached is not None:
            return cached
        tag = self._compute_etag(obj, st.st_size, tampered)
        with self._lock:
            self._etags[cache_key] = tag
        return tag

    def _compute_etag(self, obj: Path | bytes, size: int, tampered: bool) -> str:
        part = size if size <= self.multipart_threshold else self.part_size
        digests, whole = [], hashlib.md5(usedforsecurity=False)
        current, filled = hashlib.md5(usedforsecurity=False), 0
        for block in read_object(obj, 0, size, tampered=tampered):
            view = memoryview(block)
            while view:
                take = view[: part - filled]
                current.update(take)
                whole.update(take)
                filled += len(take)
                view = view[len(take) :]
                if filled == part:
                    digests.append(current.digest())
                    current, filled = hashlib.md5(usedforsecurity=False), 0
        if filled or not digests:
            digests.append(current.digest())
        if size <= self.multipart_threshold:
            return f'"{whole.hexdigest()}"'
        joined = hashlib.md5(b"".join(digests), usedforsecurity=False).hexdigest()
        return f'"{joined}-{len(digests)}"'


def tamper_window(size: int) -> tuple[int, int]:
    """``(start, end)`` of the bytes :meth:`Mirror.tamper` inverts in an object of ``size`` bytes."""
    start = max(size // 2 - TAMPER_BYTES // 2, 0)
    return start, min(start + TAMPER_BYTES, size)


def read_object(
    obj: Path | bytes, start: int, length: int, *, tampered: bool = False, chunk: int = _CHUNK
) -> Iterator[bytes]:
    """Blocks of ``length`` bytes of ``obj`` from ``start``.

    ``tampered``: as :meth:`Mirror.tamper` serves them (the same bytes inverted whatever range is
    asked for, so a resumed download gets the same altered object).
    """
    size = len(obj) if isinstance(obj, bytes) else obj.stat().st_size
    lo, hi = tamper_window(size) if tampered else (0, 0)
    with contextlib.ExitStack() as stack:
        f = None if isinstance(obj, bytes) else stack.enter_context(obj.open("rb"))
        if f is not None:
            f.seek(start)
        pos, end = start, start + length
        while pos < end:
            n = min(chunk, end - pos)
            block = obj[pos : pos + n] if f is None else f.read(n)
            if not block:
                return
            if hi > pos and lo < pos + len(block):
                altered = bytearray(block)
                for i in range(max(lo, pos), min(hi, pos + len(block))):
                    altered[i - pos] ^= 0xFF
                block = bytes(altered)
            yield block
            pos += len(block)


class _Flaky:
    """One flaky-network fault: ``kind`` "reset" or "stall" after ``n_bytes``, ``times`` left."""

    def __init__(
        self, pattern: str, kind: str, n_bytes: int, times: int, seconds: float = 0.0
    ) -> None:
        self.pattern, self.kind, self.n_bytes = pattern, kind, n_bytes
        self.times, self.seconds, self.hits = times, seconds, 0


class _Throttle:
    """Token bucket in bytes per second, shared by the threads that send through it.

    :meth:`take` books ``n`` bytes and sleeps until the bucket has paid for them, so the long-run
    rate never exceeds ``rate`` whatever the number of senders; bursts are at most 50 ms worth.
    """

    def __init__(self, rate: float) -> None:
        self.rate = float(rate)
        self.capacity = max(self.rate * 0.05, float(_THROTTLED_CHUNK))
        self._tokens = self.capacity
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        """Wait until ``n`` more bytes may be sent."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= n
            delay = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if delay > 0:
            time.sleep(delay)


class _Server(http.server.ThreadingHTTPServer):
    """A threading HTTP server that treats a client hanging up as ordinary, not as an error."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log clients that disconnect mid-request at debug level; report anything else."""
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionResetError | BrokenPipeError):
            log.debug("client %s disconnected: %s", client_address, exc)
            return
        super().handle_error(request, client_address)


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


def _check_loopback(host: str) -> str:
    if host == "localhost":
        return "127.0.0.1"
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        addr = None
    if addr is None or not addr.is_loopback:
        raise NsdPrepError(
            f"refusing to serve on {host!r}: the mirror only listens on a loopback address "
            "(127.0.0.1, ::1); it is a test and demo tool, not a public server"
        )
    return str(addr)


def _size_mtime(path: Path) -> tuple[int, float]:
    st = path.stat()
    return st.st_size, st.st_mtime


def _xml_text(text: str) -> str:
    """``text`` escaped for XML, line breaks as character references (kept by any XML parser)."""
    return escape(text, {"\n": "&#10;", "\r": "&#13;"})


def _http_date(ts: float) -> str:
    return email.utils.formatdate(ts, usegmt=True)


def _iso_date(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(ts))


def _error_xml(code: str, message: str, resource: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
        f"<Resource>{escape(resource)}</Resource><RequestId>0</RequestId></Error>"
    ).encode()


def _parse_range(header: str, size: int) -> tuple[int, int] | None | str:
    """``(start, end)`` inclusive for one ``bytes=`` range; None = ignore (serve all); "bad" = 416."""
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None  # S3 serves the whole object for unsupported or multiple ranges
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            n = int(last)
            if n <= 0:
                return "bad"
            return max(size - n, 0), size - 1
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size or end < start:
        return "bad"
    return start, min(end, size - 1)


class _Handler(http.server.BaseHTTPRequestHandler):
    mirror: Mirror
    protocol_version = "HTTP/1.1"
    server_version = "nsdprep-mirror"
    sys_version = ""

    def version_string(self) -> str:
        """``Server`` header value."""
        return self.server_version

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib signature)
        """Route the access log to ``logging`` (debug) instead of stderr."""
        log.debug("%s " + format, self.address_string(), *args)

    def do_HEAD(self) -> None:  # noqa: N802 (stdlib naming)
        """Object metadata (no body)."""
        self._dispatch(head=True)

    def do_GET(self) -> None:  # noqa: N802 (stdlib naming)
        """Object download or bucket listing."""
        self._dispatch(head=False)

    # -- responses ------------------------------------------------------------------------------
    def _send(
        self, status: int, body: bytes, head: bool, ctype: str = "application/xml", **headers: str
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, resource: str, head: bool) -> None:
        self._send(status, _error_xml(code, message, resource), head)

    def _dispatch(self, head: bool) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        path = urllib.parse.unquote(url.path)
        bucket, _, key = path.lstrip("/").partition("/")
        if not bucket:
            self._list_buckets(head)
        elif self.mirror.bucket_dir(bucket) is None:
            self._error(404, "NoSuchBucket", "The specified bucket does not exist", path, head)
        elif not key:
            self._list_objects(bucket, query, head)
        elif self.mirror._denied(f"{bucket}/{key}"):
            self._error(403, "AccessDenied", "Access Denied", path, head)
        else:
            self._object(bucket, key, head)

    def _list_buckets(self, head: bool) -> None:
        names = sorted(
            p.name for p in self.mirror.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        items = "".join(f"<Bucket><Name>{escape(n)}</Name></Bucket>" for n in names)
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<ListAllMyBucketsResult xmlns="{S3_XMLNS}">'
            f"<Buckets>{items}</Buckets></ListAllMyBucketsResult>"
        ).encode()
        self._send(200, body, head)

    def _list_objects(self, bucket: str, query: dict[str, list[str]], head: bool) -> None:
        def arg(name: str, default: str = "") -> str:
            return query.get(name, [default])[0]

        resource = f"/{bucket}/"
        if arg("list-type") != "2":
            self._error(
                501,
                "NotImplemented",
                "only ListObjectsV2 (list-type=2) is implemented",
                resource,
                head,
            )
            return
        prefix, delimiter = arg("prefix"), arg("delimiter")
        try:
            max_keys = min(int(arg("max-keys", str(MAX_KEYS))), MAX_KEYS)
            if max_keys < 0:
                raise ValueError
        except ValueError:
            self._error(
                400, "InvalidArgument", "max-keys must be a non-negative integer", resource, head
            )
            return
        token = arg("continuation-token")
        after = arg("start-after")
        if token:
            try:
                after = base64.urlsafe_b64decode(token.encode()).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                self._error(400, "InvalidArgument", "invalid continuation token", resource, head)
                return
        if self.mirror._denied(f"{bucket}/{prefix}"):
            self._error(403, "AccessDenied", "Access Denied", resource, head)
            return

        # Entries in S3 order: keys and (with a delimiter) rolled-up common prefixes.
        entries: list[tuple[str, Path | bytes | None]] = []
        seen_prefixes: set[str] = set()
        for key, p in self.mirror.iter_keys(bucket, prefix):
            if delimiter:
                cut = key.find(delimiter, len(prefix))
                if cut >= 0:
                    common = key[: cut + len(delimiter)]
                    if common not in seen_prefixes:
                        seen_prefixes.add(common)
                        entries.append((common, None))
                    continue
            entries.append((key, p))
        after_b = after.encode("utf-8")
        entries = [e for e in entries if e[0].encode("utf-8") > after_b]
        page, truncated = entries[:max_keys], len(entries) > max_keys

        parts = [
            f'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="{S3_XMLNS}">',
            f"<Name>{escape(bucket)}</Name><Prefix>{escape(prefix)}</Prefix>",
            f"<KeyCount>{len(page)}</KeyCount><MaxKeys>{max_keys}</MaxKeys>",
        ]
        if delimiter:
            parts.append(f"<Delimiter>{escape(delimiter)}</Delimiter>")
        parts.append(f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>")
        if token:
            parts.append(f"<ContinuationToken>{escape(token)}</ContinuationToken>")
        if arg("start-after"):
            parts.append(f"<StartAfter>{escape(arg('start-after'))}</StartAfter>")
        if truncated:
            nxt = base64.urlsafe_b64encode(page[-1][0].encode("utf-8")).decode()
            parts.append(f"<NextContinuationToken>{nxt}</NextContinuationToken>")
        for name, p in page:
            if p is None:
                parts.append(f"<CommonPrefixes><Prefix>{_xml_text(name)}</Prefix></CommonPrefixes>")
                continue
            size, mtime = (len(p), 0.0) if isinstance(p, bytes) else _size_mtime(p)
            parts.append(
                f"<Contents><Key>{_xml_text(name)}</Key>"
                f"<LastModified>{_iso_date(mtime)}</LastModified>"
                f"<ETag>{escape(self.mirror.etag(p))}</ETag><Size>{size}</Size>"
                "<StorageClass>STANDARD</StorageClass></Contents>"
            )
        parts.append("</ListBucketResult>")
        self._send(200, "".join(parts).encode("utf-8"), head)

    def _object(self, bucket: str, key: str, head: bool) -> None:
        resource = f"/{bucket}/{key}"
        obj: Path | bytes | None = self.mirror.memory_object(bucket, key)
        if obj is None:
            obj = self.mirror.object_path(bucket, key)
        if obj is None:
            self._error(404, "NoSuchKey", "The specified key does not exist.", resource, head)
            return
        size, mtime = (len(obj), 0.0) if isinstance(obj, bytes) else _size_mtime(obj)
        tampered = self.mirror._tampered(f"{bucket}/{key}")
        start, end, status = 0, size - 1, 200
        range_header = self.headers.get("Range")
        if range_header and size > 0:
            rng = _parse_range(range_header, size)
            if rng == "bad":
                self._send(
                    416,
                    _error_xml("InvalidRange", "The requested range is not satisfiable", resource),
                    head,
                    Content_Range=f"bytes */{size}",
                )
                return
            if isinstance(rng, tuple):
                start, end, status = rng[0], rng[1], 206
        length = end - start + 1 if size else 0
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Last-Modified", _http_date(mtime))
        self.send_header("ETag", self.mirror.etag(obj, tampered=tampered))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        cut = None if head else self.mirror._cut_after(f"{bucket}/{key}")
        flaky = None if head else self.mirror._take_flaky(f"{bucket}/{key}")
        if cut is not None:
            self.send_header("Connection", "close")
        self.end_headers()
        if head:
            return
        if flaky is not None:
            self._send_flaky(obj, start, length, flaky, tampered)
            return
        remaining = length if cut is None else min(length, cut)
        total, per_connection = self.mirror._throttles()
        own = None if per_connection is None else _Throttle(per_connection)
        blocks = read_object(obj, start, remaining, tampered=tampered, chunk=_THROTTLED_CHUNK)
        pending = b""
        while remaining > 0:
            total, _ = self.mirror._throttles()
            limited = total is not None or own is not None
            want = min(_THROTTLED_CHUNK if limited else _CHUNK, remaining)
            while len(pending) < want:
                more = next(blocks, b"")
                if not more:
                    break
                pending += more
            block, pending = pending[:want], pending[want:]
            if not block:
                break
            for throttle in (own, total):
                if throttle is not None:
                    throttle.take(len(block))
            self.wfile.write(block)
            remaining -= len(block)
        if cut is not None and cut < length:
            log.debug("cut %s short after %d of %d bytes", resource, cut, length)
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _send_flaky(
        self, obj: Path | bytes, start: int, length: int, fault: _Flaky, tampered: bool
    ) -> None:
        """Send ``fault.n_bytes`` of the body, then reset the connection or stall and close it."""
        for block in read_object(obj, start, min(fault.n_bytes, length), tampered=tampered):
            self.wfile.write(block)
        self.wfile.flush()
        path = "<in-memory object>" if isinstance(obj, bytes) else obj
        self.close_connection = True
        if fault.kind == "stall":
            log.debug("stalling %s for %.1f s", path, fault.seconds)
            time.sleep(fault.seconds)
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        log.debug("resetting the connection during %s", path)
        # SO_LINGER with a zero timeout makes close() send a TCP RST instead of a FIN.
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()


# -- CLI ----------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``python -m nsdprep serve DIR [--port 0] [--host 127.0.0.1] [--rate MB/S] [--tamper P]``."""
    parser.add_argument(
        "root", metavar="DIR", help="directory of buckets (e.g. synth output: nsd/, coco/)"
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port (default 0: a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind")
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        metavar="MB/S",
        help="cap downloads at MB/s (10^6 bytes) in total, like a link (default: no cap)",
    )
    parser.add_argument(
        "--rate-per-connection",
        type=float,
        default=None,
        metavar="MB/S",
        help="cap each connection at MB/s too (default: only the total cap)",
    )
    parser.add_argument(
        "--multipart-threshold",
        type=float,
        default=DEFAULT_MULTIPART_THRESHOLD / MiB,
        metavar="MiB",
        help="objects above this size get a multipart ETag, as S3 gives them (default: 8)",
    )
    parser.add_argument(
        "--part-size",
        type=float,
        default=DEFAULT_PART_SIZE / MiB,
        metavar="MiB",
        help="part size of multipart ETags (default: 8, as `aws s3 cp`)",
    )
    parser.add_argument(
        "--tamper",
        action="append",
        default=[],
        metavar="PATTERN",
        help="serve objects matching <bucket>/<key> glob PATTERN altered (same size, true ETag "
        "listed); repeatable",
    )


def main(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM, after printing the NSD and COCO base URLs.

    Both signals get explicit handlers: a process started as a background job of a non-interactive
    shell inherits SIGINT as *ignored*, and Python then installs no KeyboardInterrupt handler, so
    relying on the default would leave the server deaf to Ctrl-C (``kill -INT``).
    """
    stop = threading.Event()
    received: list[int] = []

    def _stop(signum: int, _frame: object) -> None:
        received.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with Mirror(
            args.root,
            host=args.host,
            port=args.port,
            rate_mb_s=args.rate,
            connection_rate_mb_s=args.rate_per_connection,
            multipart_threshold=int(args.multipart_threshold * MiB),
            part_size=int(args.part_size * MiB),
            tamper=args.tamper,
        ) as mirror:
            print(f"NSD_URL={mirror.url}/nsd", flush=True)
            print(f"COCO_URL={mirror.url}/coco/{nsd.COCO_ZIP_KEY}", flush=True)
            print("serving; Ctrl-C to stop", flush=True)
            while not stop.wait(3600):
                pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("stopping on %s", signal.Signals(received[0]).name if received else "request")
    return 0
