"""The loopback S3-like mirror: object GET/HEAD/Range, errors, ListObjectsV2, faults, CLI."""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import os
import signal
import subprocess
import sys
import urllib.parse
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from nsdprep.core.errors import NsdPrepError
from nsdprep.testing.serve import S3_XMLNS, Mirror

NS = {"s3": S3_XMLNS}

# Keys chosen so that S3's global byte order differs from a per-directory walk order:
# '-' (0x2d) < '.' (0x2e) < '/' (0x2f) < 'b' (0x62), and upper case sorts before lower case.
KEYS = [
    "x/b/c.bin",
    "x/b.txt",
    "x/b-1",
    "x/bb",
    "x/B",
    "x/d/e/f.bin",
    "y.bin",
    "z/only",
]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("buckets")
    for i, key in enumerate(KEYS):
        path = root / "bkt" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes((j * 7 + i) % 256 for j in range(100 + 37 * i)))
    (root / "other").mkdir()
    (root / "other" / "file").write_bytes(b"0123456789")
    return root


@pytest.fixture(scope="module")
def server(tree: Path):
    with Mirror(tree) as m:
        yield m


def request(
    mirror: Mirror, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[http.client.HTTPResponse, bytes]:
    host, port = mirror.url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        return resp, body
    finally:
        conn.close()


def test_get_and_head_object(server: Mirror, tree: Path) -> None:
    data = (tree / "bkt/x/b.txt").read_bytes()
    resp, body = request(server, "GET", "/bkt/x/b.txt")
    assert resp.status == 200 and body == data
    assert resp.headers["Content-Length"] == str(len(data))
    assert resp.headers["Accept-Ranges"] == "bytes"
    assert resp.headers["ETag"] == f'"{hashlib.md5(data).hexdigest()}"'
    modified = email.utils.parsedate_to_datetime(resp.headers["Last-Modified"]).timestamp()
    assert modified == pytest.approx(int((tree / "bkt/x/b.txt").stat().st_mtime), abs=1)

    head, body = request(server, "HEAD", "/bkt/x/b.txt")
    assert head.status == 200 and body == b""
    assert head.headers["Content-Length"] == str(len(data))
    assert head.headers["ETag"] == resp.headers["ETag"]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("bytes=5-9", (5, 9)), ("bytes=10-", (10, None)), ("bytes=-4", (-4, None))],
)
def test_range_requests(server: Mirror, tree: Path, spec: str, expected: tuple) -> None:
    data = (tree / "bkt/y.bin").read_bytes()
    start, end = expected
    part = data[start:] if end is None else data[start : end + 1]
    resp, body = request(server, "GET", "/bkt/y.bin", {"Range": spec})
    assert resp.status == 206
    assert body == part
    first = start % len(data)
    assert resp.headers["Content-Range"] == f"bytes {first}-{first + len(part) - 1}/{len(data)}"
    assert resp.headers["Content-Length"] == str(len(part))


def test_unsatisfiable_range(server: Mirror, tree: Path) -> None:
    size = (tree / "bkt/y.bin").stat().st_size
    resp, body = request(server, "GET", "/bkt/y.bin", {"Range": f"bytes={size}-"})
    assert resp.status == 416
    assert resp.headers["Content-Range"] == f"bytes */{size}"
    assert b"<Code>InvalidRange</Code>" in body


def test_missing_key_bucket_and_traversal(server: Mirror) -> None:
    resp, body = request(server, "GET", "/bkt/x/nope")
    assert resp.status == 404
    err = ET.fromstring(body)
    assert err.tag == "Error" and err.findtext("Code") == "NoSuchKey"
    head, body = request(server, "HEAD", "/bkt/x/nope")
    assert head.status == 404 and body == b""
    resp, body = request(server, "GET", "/nobucket/x")
    assert resp.status == 404 and ET.fromstring(body).findtext("Code") == "NoSuchBucket"
    # A directory is not an object, and nothing outside the bucket is reachable.
    for path in ("/bkt/x/b", "/bkt/../other/file", "/bkt/x/%2e%2e/%2e%2e/other/file"):
        resp, _ = request(server, "GET", path)
        assert resp.status == 404, path


def list_all(
    server: Mirror, bucket: str, prefix: str, max_keys: int, delimiter: str = ""
) -> tuple[list[str], list[str], list[ET.Element]]:
    import urllib.parse

    keys, prefixes, pages = [], [], []
    token = None
    while True:
        q = {"list-type": "2", "prefix": prefix, "max-keys": str(max_keys)}
        if delimiter:
            q["delimiter"] = delimiter
        if token:
            q["continuation-token"] = token
        resp, body = request(server, "GET", f"/{bucket}/?{urllib.parse.urlencode(q)}")
        assert resp.status == 200
        page = ET.fromstring(body)
        assert page.tag == f"{{{S3_XMLNS}}}ListBucketResult"
        pages.append(page)
        contents = page.findall("s3:Contents", NS)
        common = page.findall("s3:CommonPrefixes", NS)
        assert int(page.findtext("s3:KeyCount", namespaces=NS)) == len(contents) + len(common)
        assert len(contents) + len(common) <= max_keys
        for c in contents:
            key = c.findtext("s3:Key", namespaces=NS)
            path = server.root / bucket / key
            assert int(c.findtext("s3:Size", namespaces=NS)) == path.stat().st_size
            assert c.findtext("s3:ETag", namespaces=NS) == (
                f'"{hashlib.md5(path.read_bytes()).hexdigest()}"'
            )
            assert c.findtext("s3:LastModified", namespaces=NS).endswith("Z")
            keys.append(key)
        prefixes += [c.findtext("s3:Prefix", namespaces=NS) for c in common]
        if page.findtext("s3:IsTruncated", namespaces=NS) == "false":
            assert page.find("s3:NextContinuationToken", NS) is None
            return keys, prefixes, pages
        assert page.findtext("s3:IsTruncated", namespaces=NS) == "true"
        token = page.findtext("s3:NextContinuationToken", namespaces=NS)
        assert token


def test_list_objects_v2_paginates_in_s3_order(server: Mirror, tree: Path) -> None:
    on_disk = sorted(
        (p.relative_to(tree / "bkt").as_posix() for p in (tree / "bkt").rglob("*") if p.is_file()),
        key=lambda k: k.encode(),
    )
    assert on_disk == sorted(KEYS, key=str.encode)
    keys, _, pages = list_all(server, "bkt", "", max_keys=3)
    assert keys == on_disk
    assert len(pages) == 3  # 8 keys in pages of 3
    keys_x, _, _ = list_all(server, "bkt", "x/b", max_keys=2)
    assert keys_x == ["x/b-1", "x/b.txt", "x/b/c.bin", "x/bb"]
    keys_default, _, pages = list_all(server, "bkt", "", max_keys=1000)
    assert keys_default == on_disk and len(pages) == 1
    assert list_all(server, "bkt", "nothing/", max_keys=5)[0] == []


def test_list_objects_v2_delimiter(server: Mirror) -> None:
    keys, prefixes, _ = list_all(server, "bkt", "x/", max_keys=2, delimiter="/")
    assert keys == ["x/B", "x/b-1", "x/b.txt", "x/bb"]
    assert prefixes == ["x/b/", "x/d/"]
    keys, prefixes, _ = list_all(server, "bkt", "", max_keys=1000, delimiter="/")
    assert keys == ["y.bin"] and prefixes == ["x/", "z/"]


def test_default_page_is_1000_keys(tmp_path: Path) -> None:
    d = tmp_path / "b" / "k"
    d.mkdir(parents=True)
    for i in range(1005):
        (d / f"{i:05d}").write_bytes(b"")
    with Mirror(tmp_path) as m:
        resp, body = request(m, "GET", "/b/?list-type=2&prefix=k/")
        page = ET.fromstring(body)
        assert page.findtext("s3:KeyCount", namespaces=NS) == "1000"
        assert page.findtext("s3:IsTruncated", namespaces=NS) == "true"
        keys, _, _ = list_all(m, "b", "k/", max_keys=1000)
    assert keys == [f"k/{i:05d}" for i in range(1005)]


def test_deny_pattern_answers_access_denied(tree: Path) -> None:
    with Mirror(tree, deny=["bkt/x/*"]) as m:
        resp, body = request(m, "GET", "/bkt/x/b.txt")
        assert resp.status == 403
        assert ET.fromstring(body).findtext("Code") == "AccessDenied"
        resp, _ = request(m, "GET", "/bkt/?list-type=2&prefix=x/")
        assert resp.status == 403
        resp, _ = request(m, "GET", "/bkt/y.bin")
        assert resp.status == 200
        m.clear_faults()
        resp, _ = request(m, "GET", "/bkt/x/b.txt")
        assert resp.status == 200
        m.deny("bkt/y.*")
        assert request(m, "HEAD", "/bkt/y.bin")[0].status == 403


def test_truncate_cuts_download_short(tree: Path) -> None:
    size = (tree / "bkt/y.bin").stat().st_size
    with Mirror(tree, truncate={"bkt/y.bin": 10}) as m:
        with pytest.raises(http.client.IncompleteRead) as info:
            request(m, "GET", "/bkt/y.bin")
        assert len(info.value.partial) == 10
        assert info.value.expected == size - 10
        head, _ = request(m, "HEAD", "/bkt/y.bin")
        assert head.headers["Content-Length"] == str(size)
        # Other objects are unaffected; clearing the fault serves it whole again.
        assert request(m, "GET", "/bkt/x/bb")[0].status == 200
        m.clear_faults()
        assert len(request(m, "GET", "/bkt/y.bin")[1]) == size


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "example.org"])
def test_refuses_non_loopback_host(tree: Path, host: str) -> None:
    with pytest.raises(NsdPrepError, match="loopback"):
        Mirror(tree, host=host)


def test_url_requires_running_server(tree: Path) -> None:
    m = Mirror(tree)
    with pytest.raises(NsdPrepError, match="not running"):
        _ = m.url


def test_cli_prints_urls_and_stops_on_ctrl_c(tree: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "code")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nsdprep", "serve", str(tree), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        nsd_line = proc.stdout.readline().strip()
        coco_line = proc.stdout.readline().strip()
        assert nsd_line.startswith("NSD_URL=http://127.0.0.1:") and nsd_line.endswith("/nsd")
        base = nsd_line.removeprefix("NSD_URL=").removesuffix("/nsd")
        assert coco_line == f"COCO_URL={base}/coco/annotations/annotations_trainval2017.zip"
        host, port = base.removeprefix("http://").rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", "/other/file")
        assert conn.getresponse().read() == b"0123456789"
        conn.close()
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=20)
    assert rc == 0, proc.stderr.read()


def _s3_multipart_etag(data: bytes, part: int) -> str:
    """S3's multipart ETag, computed here independently of the mirror."""
    digests = [hashlib.md5(data[i : i + part]).digest() for i in range(0, len(data), part)]
    return f'"{hashlib.md5(b"".join(digests)).hexdigest()}-{len(digests)}"'


def _listed_etags(m: Mirror, bucket: str, prefix: str) -> dict[str, str]:
    """``{key: ETag}`` of one listing page (the trees here hold fewer than 1000 keys)."""
    q = urllib.parse.urlencode({"list-type": "2", "prefix": prefix})
    resp, body = request(m, "GET", f"/{bucket}/?{q}")
    assert resp.status == 200
    page = ET.fromstring(body)
    assert page.findtext("s3:IsTruncated", namespaces=NS) == "false"
    return {
        c.findtext("s3:Key", namespaces=NS): c.findtext("s3:ETag", namespaces=NS)
        for c in page.findall("s3:Contents", NS)
    }


def test_multipart_etags_above_the_threshold(tree: Path) -> None:
    small, big = (tree / "bkt/x/b.txt").read_bytes(), (tree / "bkt/z/only").read_bytes()
    assert len(small) < 300 < len(big)
    with Mirror(tree, multipart_threshold=300, part_size=64) as m:
        listed = _listed_etags(m, "bkt", "")
        assert listed["x/b.txt"] == f'"{hashlib.md5(small).hexdigest()}"'
        assert listed["z/only"] == _s3_multipart_etag(big, 64)
        assert listed["z/only"].endswith(f'-{-(-len(big) // 64)}"')
        assert request(m, "HEAD", "/bkt/z/only")[0].headers["ETag"] == listed["z/only"]
    # An object exactly at the threshold is still one part; the default threshold is 8 MiB.
    with Mirror(tree, multipart_threshold=len(big), part_size=64) as m:
        assert _listed_etags(m, "bkt", "z/")["z/only"] == f'"{hashlib.md5(big).hexdigest()}"'
    with Mirror(tree) as m:
        assert (m.multipart_threshold, m.part_size) == (8 * 1024 * 1024, 8 * 1024 * 1024)


@pytest.mark.parametrize("threshold", [10_000, 100])  # single-part, multipart
def test_tamper_serves_other_bytes_of_the_same_size(tree: Path, threshold: int) -> None:
    true = (tree / "bkt/z/only").read_bytes()
    with Mirror(tree, multipart_threshold=threshold, part_size=64) as m:
        honest = _listed_etags(m, "bkt", "z/")["z/only"]
        m.tamper("bkt/z/*")
        resp, body = request(m, "GET", "/bkt/z/only")
        assert resp.status == 200 and len(body) == len(true) and body != true
        assert sum(a != b for a, b in zip(body, true, strict=True)) == 64
        # the listing keeps the true ETag; the object's own headers lie consistently
        assert _listed_etags(m, "bkt", "z/")["z/only"] == honest
        expected = (
            f'"{hashlib.md5(body).hexdigest()}"' if len(true) <= threshold
            else _s3_multipart_etag(body, 64)
        )  # fmt: skip
        assert resp.headers["ETag"] == expected != honest
        # a resumed download gets the same altered bytes
        resp, part = request(m, "GET", "/bkt/z/only", {"Range": "bytes=200-"})
        assert resp.status == 206 and part == body[200:]
        assert request(m, "GET", "/bkt/y.bin")[1] == (tree / "bkt/y.bin").read_bytes()
        m.clear_faults()
        assert request(m, "GET", "/bkt/z/only")[1] == true


def test_in_memory_objects_are_listed_verbatim(tree: Path) -> None:
    odd = {"bkt/x/../../up": b"1", "bkt/x/line\n": b"22", "bkt//lead": b"333"}
    with Mirror(tree, objects=odd) as m:
        listed = _listed_etags(m, "bkt", "")
        for k, data in odd.items():
            assert listed[k.partition("/")[2]] == f'"{hashlib.md5(data).hexdigest()}"'
        resp, body = request(m, "GET", "/bkt/" + urllib.parse.quote("x/line\n"))
        assert resp.status == 200 and body == b"22"
