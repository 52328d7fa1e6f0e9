"""Register the NSD and COCO input files by URL in the subdatasets ``inputs/nsd`` and ``inputs/coco``.

Nothing is downloaded here: files are listed in the bucket (S3 ``ListObjectsV2`` over plain https with
``urllib``; the NSD bucket is an AWS Open Data bucket, readable without credentials) and registered with
``datalad addurls --fast``, which records each file's URL and size (git-annex VURL keys; the checksum is
recorded at the first ``datalad get`` and verified by ``git annex fsck`` from then on). The addurls table is
kept in each subdataset (``.nsdprep/addurls.csv``, in git) and the exact command lines are in the commit
message, so the registration can be redone or audited. Content is fetched per subject with
:func:`get_subjects` and freed again with :func:`drop_subjects`.

The same listing code runs against the real bucket and the loopback mirror of :mod:`nsdprep.serve`.
"""

from __future__ import annotations

import argparse
import csv
import ipaddress
import json
import logging
import re
import shlex
import subprocess
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from nsdprep import paths, registry
from nsdprep._io import atomic_path
from nsdprep.dataset import QUIET, check_results, ensure_annex
from nsdprep.errors import DatasetStateError, RemoteError

logger = logging.getLogger(__name__)

#: Where the addurls table is kept inside each input subdataset (tracked in git).
TABLE_PATH = ".nsdprep/addurls.csv"
TABLE_COLUMNS = ("filename", "url", "size")
BETAS_ROOT_KEY = "nsddata_betas/ppdata/"
#: NSD files registered besides the betas (never fetched by default; the stimuli are ~37 GB).
NSD_EXTRA_KEYS = (paths.EXPDESIGN_KEY, paths.STIM_INFO_KEY, paths.STIMULI_KEY)
#: Small experiment files fetched together with any subject's betas.
NSD_EXPERIMENT_KEYS = (paths.EXPDESIGN_KEY, paths.STIM_INFO_KEY)

NSD_403_HINT = (
    "The NSD bucket is public (AWS Open Data: anonymous reads and listing work), so a 403 means a "
    "restricted or not yet released object, or a wrong key or URL: check --nsd-url (the NSD base URL "
    f"is {paths.NSD_BASE_URL}). Accepting the NSD terms (http://naturalscenesdataset.org/) is a legal "
    "condition of using the data, not an S3 permission."
)
_TIMEOUT = 60.0
_KEY_SIZE_RE = re.compile(r"^[A-Z0-9]+-s(?P<size>\d+)--")


# -- listing the bucket ---------------------------------------------------------------------------
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
    keys, _ = _list(base_url, prefix, delimiter=None, max_keys=max_keys)
    return keys


def list_prefixes(base_url: str, prefix: str, delimiter: str = "/") -> list[str]:
    """The "folders" directly under ``prefix`` (S3 ``CommonPrefixes``), e.g. one per subject."""
    _, prefixes = _list(base_url, prefix, delimiter=delimiter, max_keys=None)
    return prefixes


def object_url(base_url: str, key: str) -> str:
    """URL of ``key`` in the bucket at ``base_url``."""
    return f"{base_url.rstrip('/')}/{urllib.parse.quote(key, safe='/')}"


def remote_size(url: str, *, hint: str = "") -> int:
    """``HEAD`` ``url`` and return its ``Content-Length`` (clear :class:`RemoteError` otherwise)."""
    with _open(url, method="HEAD", hint=hint) as resp:
        length = resp.headers.get("Content-Length")
    if length is None or not length.isdigit():
        raise RemoteError(f"{url}: the server sent no Content-Length; expected a downloadable file")
    return int(length)


def _list(
    base_url: str, prefix: str, delimiter: str | None, max_keys: int | None
) -> tuple[list[tuple[str, int]], list[str]]:
    keys: list[tuple[str, int]] = []
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


def _parse_listing(
    body: bytes, url: str
) -> tuple[list[tuple[str, int]], list[str], bool, str | None]:
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
            keys.append((key, int(size)))
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
                f"{paths.NSD_BASE_URL}, the COCO annotations are at {paths.COCO_ANNOTATIONS_URL})."
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


# -- what to register -----------------------------------------------------------------------------
def nsd_table(nsd_url: str, subjects: Iterable[int] | None = None) -> list[dict[str, str]]:
    """Rows ``filename, url, size`` for every NSD file to register, found by listing the bucket.

    Betas and valid masks of each subject's 1 mm MNI ``betas_fithrf`` folder (sessions as listed,
    never assumed) plus the experiment design, stimulus info and stimuli files. ``subjects`` limits the
    subjects (1-based); ``None`` = every ``subjXX`` folder in the bucket.
    """
    if subjects:
        wanted = sorted({int(s) for s in subjects})
    else:
        wanted = sorted(
            int(p[len(BETAS_ROOT_KEY) + 4 : -1])
            for p in list_prefixes(nsd_url, BETAS_ROOT_KEY)
            if p[len(BETAS_ROOT_KEY) :].startswith("subj")
            and p[len(BETAS_ROOT_KEY) + 4 : -1].isdigit()
        )
    rows: list[dict[str, str]] = []
    for subject in wanted:
        prefix = paths.subject_dir_key(subject) + "/"
        found: dict[str, set[int]] = {"betas": set(), "valid": set()}
        for key, size in list_bucket(nsd_url, prefix):
            parsed = paths.parse_betas_key(key)
            if parsed is None or parsed[1] != subject:
                continue
            found[parsed[0]].add(parsed[2])
            rows.append({"filename": key, "url": object_url(nsd_url, key), "size": str(size)})
        if not found["betas"]:
            raise RemoteError(
                f"no betas_sessionNN.nii.gz found under {object_url(nsd_url, prefix)} "
                f"for {paths.subject_label(subject)}; expected the 1 mm MNI betas_fithrf files. "
                "Check --nsd-url and the subject numbers."
            )
        unpaired = sorted(found["betas"] ^ found["valid"])
        if unpaired:
            logger.warning(
                "%s: sessions %s have a betas file or a valid mask but not both",
                paths.subject_label(subject),
                unpaired,
            )
    if not rows:
        raise RemoteError(
            f"no betas found under {object_url(nsd_url, BETAS_ROOT_KEY)}: expected folders "
            "subjXX/MNI/betas_fithrf/ with betas_sessionNN.nii.gz. Check --nsd-url."
        )
    for key in NSD_EXTRA_KEYS:
        listed = dict(list_bucket(nsd_url, key))
        if key not in listed:
            raise RemoteError(
                f"{object_url(nsd_url, key)} not found in the bucket listing; expected this NSD "
                "experiment file. Check --nsd-url."
            )
        rows.append({"filename": key, "url": object_url(nsd_url, key), "size": str(listed[key])})
    return sorted(rows, key=lambda r: r["filename"])


def coco_table(coco_url: str) -> list[dict[str, str]]:
    """The one COCO row: the annotations zip, checked to be reachable (``HEAD``)."""
    size = remote_size(coco_url, hint="Check --coco-url (a public COCO annotations zip URL).")
    return [{"filename": paths.COCO_ZIP_NAME, "url": coco_url, "size": str(size)}]


# -- registering ----------------------------------------------------------------------------------
def register_inputs(
    ds_root: str | Path,
    nsd_url: str,
    coco_url: str,
    subjects: Iterable[int] | None = None,
) -> dict[str, int]:
    """Create/update ``inputs/nsd`` and ``inputs/coco`` by URL (``datalad addurls --fast``).

    Lists the bucket, writes the full addurls table into each subdataset (``.nsdprep/addurls.csv``),
    registers the files that are not registered yet (no download), saves each subdataset with the
    command lines in the commit message, then saves the superdataset. Running it again with nothing new
    makes no commit; new sessions in the bucket are added.

    Returns
    -------
    dict
        Number of files newly registered, per subdataset path (``{"inputs/nsd": n, ...}``).
    """
    import datalad.api as dl

    ds_root = Path(ds_root).resolve()
    _require_dataset(ds_root)
    ensure_annex(ds_root)
    subjects = sorted({int(s) for s in subjects}) if subjects else None
    # List first: a remote error must leave the dataset untouched.
    tables = {
        paths.NSD_DATASET: nsd_table(nsd_url, subjects),
        paths.COCO_DATASET: coco_table(coco_url),
    }
    command = ["python", "-m", "nsdprep", "inputs", "--nsd-url", nsd_url, "--coco-url", coco_url]
    if subjects:
        command += ["--subjects", *map(str, subjects)]
    added: dict[str, int] = {}
    for rel, rows in tables.items():
        sub = ensure_subdataset(ds_root, rel)
        _allow_loopback(sub, nsd_url if rel == paths.NSD_DATASET else coco_url)
        _keep_table_in_git(sub)
        table = sub / TABLE_PATH
        with atomic_path(table) as tmp, tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=TABLE_COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        addurls_cmd = [
            "datalad", "addurls", "--fast", "--ifexists", "skip", "-d", rel,
            f"{rel}/{TABLE_PATH}", "{url}", "{filename}",
        ]  # fmt: skip
        results = dl.addurls(
            str(table),
            "{url}",
            "{filename}",
            dataset=str(sub),
            fast=True,
            ifexists="skip",
            save=False,
            **QUIET,
        )
        check_results(results, f"registering files in {rel} (datalad addurls)")
        n_new = sum(
            1 for r in results if r.get("action") == "addurl" and r.get("status") == "ok"
        ) or sum(1 for r in results if r.get("action") == "addurls" and r.get("status") == "ok")
        added[rel] = n_new
        message = (
            f"Register {rel} files by URL (no download)\n\n"
            f"{len(rows)} files listed, table {TABLE_PATH} (columns {','.join(TABLE_COLUMNS)}).\n"
            f"Command: {shlex.join(command)}\n"
            f"Redo from the table (in the superdataset): {shlex.join(addurls_cmd)}\n"
        )
        results = dl.save(
            dataset=str(sub),
            message=message,
            **QUIET,
        )
        check_results(results, f"saving {rel}")
        logger.info("%s: %d files listed, %d newly registered", rel, len(rows), n_new)
    results = dl.save(
        dataset=str(ds_root),
        path=[str(ds_root / rel) for rel in tables],
        message=f"Update input subdatasets by URL\n\nCommand: {shlex.join(command)}\n",
        **QUIET,
    )
    check_results(results, "saving the superdataset")
    return added


def ensure_subdataset(ds_root: str | Path, rel: str) -> Path:
    """Return the installed subdataset ``rel`` of ``ds_root``: installed (``get -n``) or created."""
    import datalad.api as dl

    ds_root = Path(ds_root).resolve()
    sub = ds_root / rel
    if (sub / ".git").exists():
        return sub
    known = dl.subdatasets(
        dataset=str(ds_root),
        **QUIET,
    )
    if any(Path(r.get("path", "")) == sub for r in known):
        logger.info("installing subdataset %s (no file content)", rel)
        results = dl.get(
            path=str(sub),
            dataset=str(ds_root),
            get_data=False,
            **QUIET,
        )
        check_results(results, f"installing {rel} (datalad get -n)")
        return sub
    if sub.exists() and any(sub.iterdir()):
        raise DatasetStateError(
            f"{sub} exists but is not a dataset: expected the subdataset {rel} there or nothing. "
            "Move it away, then run `make inputs` again."
        )
    logger.info("creating subdataset %s", rel)
    results = dl.create(
        path=str(sub),
        dataset=str(ds_root),
        description=f"nsdprep {rel}",
        **QUIET,
    )
    check_results(results, f"creating {rel} (datalad create)")
    return sub


# -- fetching and freeing -------------------------------------------------------------------------
def get_subjects(ds_root: str | Path, subjects: Iterable[int] | None) -> list[int]:
    """``datalad get`` the betas of ``subjects`` (1-based; empty = all) and the experiment files.

    Installs ``inputs/nsd`` first if needed; raises :class:`DatasetStateError` naming subjects that are
    not registered and :class:`RemoteError` if a download fails or does not verify. Integrity: before
    downloading, the server's sizes are compared with the registered ones (``HEAD``); git-annex checks
    the checksum recorded at a file's first download; afterwards ``fsck --fast`` checks sizes again.
    Content that fails is never left in place (partial downloads stay in ``.git/annex/tmp`` to resume).
    """
    import datalad.api as dl

    ds_root = Path(ds_root).resolve()
    nsd = ensure_subdataset(ds_root, paths.NSD_DATASET)
    chosen = registry.select_subjects(nsd, subjects)
    targets = [str(nsd / _subject_folder(s)) for s in chosen]
    targets += [str(nsd / k) for k in NSD_EXPERIMENT_KEYS if (nsd / k).is_symlink()]
    logger.info("getting %s", ", ".join(paths.subject_label(s) for s in chosen))
    changed = _changed_on_server(nsd, [Path(t).relative_to(nsd).as_posix() for t in targets])
    if changed:
        raise RemoteError(
            f"{len(changed)} file(s) on the server differ in size from the ones registered in "
            f"{nsd}; nothing was fetched:\n" + "\n".join(changed) + "\nCheck the source. If the "
            "change is legitimate, `git rm` those files in inputs/nsd and run `make inputs` again."
        )
    results = dl.get(
        path=targets,
        dataset=str(ds_root),
        **QUIET,
    )
    get_error: RemoteError | None = None
    try:
        check_results(results, "datalad get", remote=True, hint_403=NSD_403_HINT)
    except RemoteError as exc:
        get_error = exc
    try:  # also after a failed get: what did arrive must not stay if it is wrong
        _verify_sizes(nsd, [Path(t).relative_to(nsd).as_posix() for t in targets])
    except RemoteError as exc:
        if get_error is not None:
            raise RemoteError(f"{get_error}\n{exc}") from exc
        raise
    if get_error is not None:
        raise get_error
    return chosen


def drop_subjects(ds_root: str | Path, subjects: Iterable[int] | None) -> list[int]:
    """``datalad drop`` the betas content of ``subjects`` (still registered, fetchable again)."""
    import datalad.api as dl

    ds_root = Path(ds_root).resolve()
    nsd = ds_root / paths.NSD_DATASET
    chosen = registry.select_subjects(nsd, subjects)
    results = dl.drop(
        path=[str(nsd / _subject_folder(s)) for s in chosen],
        dataset=str(ds_root),
        **QUIET,
    )
    check_results(results, "datalad drop")
    return chosen


def _subject_folder(subject: int) -> str:
    return f"{BETAS_ROOT_KEY}{paths.subject_label(subject)}"


# -- helpers --------------------------------------------------------------------------------------
def _require_dataset(ds_root: Path) -> None:
    if not (ds_root / ".git").exists() or not (ds_root / ".datalad").is_dir():
        raise DatasetStateError(
            f"{ds_root} is not a DataLad dataset: expected the nsdprep superdataset root "
            "(run from the dataset's top directory, or pass --dataset)."
        )


def _keep_table_in_git(sub: Path) -> None:
    """Make ``.nsdprep/`` go to git (not the annex) in the subdataset."""
    attrs = sub / ".gitattributes"
    rule = "/.nsdprep/** annex.largefiles=nothing"
    text = attrs.read_text() if attrs.exists() else ""
    if rule not in text.splitlines():
        attrs.write_text(text + ("" if text.endswith("\n") or not text else "\n") + rule + "\n")


def _allow_loopback(sub: Path, url: str) -> None:
    """Let git-annex download from a loopback mirror (local repo config only; never for real hosts)."""
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        return
    key = "annex.security.allowed-ip-addresses"
    current = subprocess.run(
        ["git", "-C", str(sub), "config", "--get", key], capture_output=True, text=True
    ).stdout.split()
    addr = "127.0.0.1" if host == "localhost" else host
    if addr in current or "all" in current:
        return
    logger.info("allowing git-annex in %s to download from the loopback address %s", sub, addr)
    subprocess.run(
        ["git", "-C", str(sub), "config", "--local", key, " ".join([*current, addr])], check=True
    )


def _changed_on_server(nsd: Path, rel_paths: Sequence[str]) -> list[str]:
    """Absent files whose size on the server (``HEAD``) differs from the size in their key.

    Checked before downloading because git-annex records a VURL key's checksum from whatever the
    first download brings, even content of the wrong size: fetching it would poison the key.
    """
    records, _ = _annex_json(nsd, "whereis", "--json", "--not", "--in", "here", "--", *rel_paths)
    changed = []
    for rec in records:
        m = _KEY_SIZE_RE.match(rec.get("key", ""))
        urls = [u for w in rec.get("whereis", []) for u in w.get("urls", [])]
        if m is None or not urls:
            continue
        size = remote_size(urls[0], hint=NSD_403_HINT)
        if size != int(m["size"]):
            changed.append(
                f"  {rec.get('file')}: registered {m['size']} bytes, {urls[0]} has {size}"
            )
    return changed


def _verify_sizes(nsd: Path, rel_paths: Sequence[str]) -> None:
    """Check the size of present content against its key (``git annex fsck --fast``).

    ``git annex get`` of a VURL key whose checksum is not yet recorded accepts content of any size
    (checked with git-annex 10.20261026), so a changed or truncated file on the server would be kept.
    ``fsck --fast`` compares sizes without checksumming and moves wrong content to ``.git/annex/bad``.
    """
    records, proc = _annex_json(
        nsd, "fsck", "--fast", "--json", "--json-error-messages", "--", *rel_paths
    )
    bad = []
    for rec in records:
        if not rec.get("success", True):
            bad.append(f"  {rec.get('file')}: {' '.join(rec.get('error-messages', []))}".rstrip())
    if bad or proc.returncode != 0:
        detail = "\n".join(bad) or proc.stderr.strip()
        raise RemoteError(
            f"downloaded content in {nsd} does not match the registered size; it was moved to "
            f".git/annex/bad and is not used:\n{detail}\nThe file on the server changed since it "
            "was registered: check the source, then re-register (`make inputs`) or report it."
        )


def _annex_json(
    nsd: Path, *args: str
) -> tuple[list[dict[str, Any]], subprocess.CompletedProcess[str]]:
    """Run ``git annex <args>`` (with ``--json``) in ``nsd``; return its JSON records and the process."""
    proc = subprocess.run(["git", "-C", str(nsd), "annex", *args], capture_output=True, text=True)
    records = []
    for line in proc.stdout.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records, proc


# -- CLI ------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``python -m nsdprep inputs --nsd-url URL --coco-url URL [--dataset .] [--subjects 1 2]``."""
    parser.add_argument("--nsd-url", default=paths.NSD_BASE_URL, help="NSD bucket base URL")
    parser.add_argument("--coco-url", default=paths.COCO_ANNOTATIONS_URL, help="COCO zip URL")
    parser.add_argument("--dataset", default=".", help="superdataset root (default: .)")
    parser.add_argument(
        "--subjects", nargs="+", type=int, default=None, help="only these subjects (default: all)"
    )


def run(args: argparse.Namespace) -> int:
    """Register the inputs and print a one-line summary."""
    added = register_inputs(args.dataset, args.nsd_url, args.coco_url, args.subjects)
    print("registered (new files): " + ", ".join(f"{k}: {v}" for k, v in added.items()))
    return 0
