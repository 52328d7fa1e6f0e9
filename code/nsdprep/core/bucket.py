"""A minimal read-only S3 client over https: list a bucket (ListObjectsV2), HEAD an object.

Plain ``urllib``, no credentials: the NSD bucket is an AWS Open Data bucket, readable and listable
anonymously. The same code runs against the real bucket and the loopback mirror of
:mod:`nsdprep.testing.serve`. Every HTTP or connection failure becomes a :class:`RemoteError` that
names the URL and what to check.
"""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any, NamedTuple

from nsdprep.core import nsd
from nsdprep.core.errors import RemoteError

_TIMEOUT = 60.0

NSD_403_HINT = (
    "The NSD bucket is public (AWS Open Data: anonymous reads and listing work), so a 403 means a "
    "restricted or not yet released object, or a wrong key or URL: check --nsd-url (the NSD base URL "
    f"is {nsd.NSD_BASE_URL}). Accepting the NSD terms (http://naturalscenesdataset.org/) is a legal "
    "condition of using the data, not an S3 permission."
)


class ListedObject(NamedTuple):
    """One object of a listing: its key, size in bytes and ETag (quotes removed; "" if none)."""

    key: str
    size: int
    etag: str


def list_objects(base_url: str, prefix: str, *, max_keys: int | None = None) -> list[ListedObject]:
    """Like :func:`list_bucket`, with each object's ETag (S3: the MD5 of a single-part upload)."""
    objects, _ = _list(base_url, prefix, delimiter=None, max_keys=max_keys)
    return objects


def list_bucket(
    base_url: str, prefix: str, *, max_keys: int | None = None
) -> list[tuple[str, int]]:
    """List every object under ``prefix`` with S3 ``ListObjectsV2`` (paginated), as ``(key, size)``.

    Parameters
    ----------
    base_url
        Bucket URL, virtual-hosted (``https://natural-scenes-dataset.s3.amazonaws.com``) or path-style
        (``http://127.0.0.1:PORT/nsd``).
    prefix
        Key prefix, e.g. ``"nsddata_betas/ppdata/subj01/MNI/betas_fithrf/"``.
    max_keys
        Page size to ask for (the server caps it at 1000); ``None`` = the server's default.

    Returns
    -------
    list of (str, int)
        Keys in the server's order (S3: by UTF-8 bytes) with their sizes in bytes.
    """
    objects, _ = _list(base_url, prefix, delimiter=None, max_keys=max_keys)
    return [(o.key, o.size) for o in objects]


def list_prefixes(base_url: str, prefix: str, delimiter: str = "/") -> list[str]:
    """The "folders" directly under ``prefix`` (S3 ``CommonPrefixes``), e.g. one per subject."""
    _, prefixes = _list(base_url, prefix, delimiter=delimiter, max_keys=None)
    return prefixes


def object_url(base_url: str, key: str) -> str:
    """URL of ``key`` in the bucket at ``base_url``."""
    return f"{base_url.rstrip('/')}/{urllib.parse.quote(key, safe='/')}"


def remote_size(url: str, *, hint: str = "") -> int:
    """``HEAD`` ``url`` and return its ``Content-Length`` (clear :class:`RemoteError` otherwise)."""
    return remote_head(url, hint=hint)[0]


def remote_head(url: str, *, hint: str = "") -> tuple[int, str]:
    """``HEAD`` ``url``: its ``Content-Length`` and ``ETag`` (quotes removed; "" if none)."""
    with _open(url, method="HEAD", hint=hint) as resp:
        length = resp.headers.get("Content-Length")
        etag = resp.headers.get("ETag") or ""
    if length is None or not length.isdigit():
        raise RemoteError(f"{url}: the server sent no Content-Length; expected a downloadable file")
    return int(length), _unquote_etag(etag)


def read_url(url: str, *, hint: str = "", block: int = 8 << 20) -> Iterator[bytes]:
    """The body of ``url`` in blocks (``GET``; failures as :class:`RemoteError`)."""
    with _open(url, hint=hint) as resp:
        while chunk := resp.read(block):
            yield chunk


def _unquote_etag(text: str) -> str:
    """An ETag without its quotes (``"abc"`` -> ``abc``); a weak one (``W/...``) keeps its mark."""
    text = text.strip()
    weak = text.startswith("W/")
    text = text.removeprefix("W/").strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    return ("W/" if weak else "") + text


def _list(
    base_url: str, prefix: str, delimiter: str | None, max_keys: int | None
) -> tuple[list[ListedObject], list[str]]:
    keys: list[ListedObject] = []
    prefixes: list[str] = []
    token: str | None = None
    seen_tokens: set[str] = set()
    while True:
        query = {"list-type": "2", "prefix": prefix}
        if delimiter:
            query["delimiter"] = delimiter
        if max_keys is not None:
            query["max-keys"] = str(max_keys)
        if token is not None:
            query["continuation-token"] = token
        url = f"{base_url.rstrip('/')}/?{urllib.parse.urlencode(query)}"
        with _open(url, hint=NSD_403_HINT) as resp:
            body = resp.read()
        page_keys, page_prefixes, truncated, token = _parse_listing(body, url)
        keys.extend(page_keys)
        prefixes.extend(page_prefixes)
        if not truncated:
            return keys, prefixes
        if not token or token in seen_tokens:
            raise RemoteError(
                f"{url}: listing is truncated but gives no new continuation token; "
                "expected an S3 ListObjectsV2 answer"
            )
        seen_tokens.add(token)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child_text(elem: ET.Element, name: str) -> str | None:
    for child in elem:
        if _local(child.tag) == name:
            return child.text or ""
    return None


def _parse_listing(body: bytes, url: str) -> tuple[list[ListedObject], list[str], bool, str | None]:
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise RemoteError(
            f"{url}: answer is not XML ({exc}); expected an S3 ListObjectsV2 listing. "
            "Is the URL the bucket's base URL (e.g. https://natural-scenes-dataset.s3.amazonaws.com)?"
        ) from exc
    if _local(root.tag) != "ListBucketResult":
        raise RemoteError(
            f"{url}: expected an S3 <ListBucketResult>, got <{_local(root.tag)}>; "
            "is the URL the bucket's base URL?"
        )
    keys, prefixes = [], []
    for child in root:
        name = _local(child.tag)
        if name == "Contents":
            key, size = _child_text(child, "Key"), _child_text(child, "Size")
            if key is None or size is None or not size.isdigit():
                raise RemoteError(f"{url}: <Contents> without Key/Size in the listing")
            etag = _unquote_etag(_child_text(child, "ETag") or "")
            keys.append(ListedObject(key, int(size), etag))
        elif name == "CommonPrefixes":
            p = _child_text(child, "Prefix")
            if p:
                prefixes.append(p)
    truncated = (_child_text(root, "IsTruncated") or "false").strip().lower() == "true"
    return keys, prefixes, truncated, _child_text(root, "NextContinuationToken")


def _open(url: str, method: str = "GET", hint: str = "") -> Any:
    """Open ``url``; translate HTTP and connection failures into :class:`RemoteError`."""
    req = urllib.request.Request(url, method=method, headers={"User-Agent": "nsdprep"})
    try:
        return urllib.request.urlopen(req, timeout=_TIMEOUT)  # noqa: S310 (http(s) URLs only)
    except urllib.error.HTTPError as exc:
        code = _s3_error_code(exc)
        what = f"{url}: HTTP {exc.code} {exc.reason}" + (f" ({code})" if code else "")
        if exc.code == 403:
            raise RemoteError(
                f"{what}: access denied. {hint or 'Check that the URL is public.'}"
            ) from exc
        if exc.code == 404:
            raise RemoteError(
                f"{what}: no such bucket or key. Check the URL (the NSD base URL is "
                f"{nsd.NSD_BASE_URL}, the COCO annotations are at {nsd.COCO_ANNOTATIONS_URL})."
            ) from exc
        raise RemoteError(f"{what}: the server refused the request; try again later.") from exc
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ConnectionRefusedError):
            msg = "connection refused (is the server or mirror running, and the port right?)"
        else:
            msg = str(reason)
        raise RemoteError(f"cannot reach {url}: {msg}") from exc
    except (TimeoutError, ConnectionError) as exc:
        raise RemoteError(f"cannot reach {url}: {exc}") from exc


def _s3_error_code(exc: urllib.error.HTTPError) -> str | None:
    try:
        body = exc.read()
        return _child_text(ET.fromstring(body), "Code") if body else None
    except (ET.ParseError, OSError):
        return None
