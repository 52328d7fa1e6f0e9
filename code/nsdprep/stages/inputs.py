"""Register the NSD and COCO input files by URL in the subdatasets ``inputs/nsd`` and ``inputs/coco``.

Nothing is downloaded here: files are listed in the bucket (S3 ``ListObjectsV2`` over plain https with
``urllib``; the NSD bucket is an AWS Open Data bucket, readable without credentials) and registered with
``datalad addurls --fast``, which records each file's URL and size (git-annex VURL keys; the checksum is
recorded at the first ``datalad get`` and verified by ``git annex fsck`` from then on). The addurls table is
kept in each subdataset (``.nsdprep/addurls.csv``, in git) and the exact command lines are in the commit
message, so the registration can be redone or audited. Content is fetched per subject with
:func:`get_subjects` and freed again with :func:`drop_subjects`.

Transfers: each input subdataset gets git-annex's retry and stall-detection settings
(:data:`nsdprep.core.dataset.TRANSFER_SETTINGS`), so a reset or hung connection is retried and resumed.

A damaged first download is repaired by :mod:`nsdprep.drive.repair` (``make repair``). A killed
``make inputs`` is recovered by the next one (the subdatasets are put back to their last commit first).

The same listing code runs against the real bucket and the loopback mirror of :mod:`nsdprep.testing.serve`.
"""

from __future__ import annotations

import argparse
import csv
import ipaddress
import logging
import os
import re
import shlex
import shutil
import urllib.error
import urllib.parse
from collections.abc import Iterable, Sequence
from pathlib import Path

from nsdprep import options
from nsdprep.core import dataset, inventory, nsd, provenance
from nsdprep.core._io import atomic_path
from nsdprep.core.bucket import NSD_403_HINT, list_bucket, list_prefixes, object_url, remote_size
from nsdprep.core.errors import DatasetStateError, RemoteError
from nsdprep.core.provenance import command_line

log = logging.getLogger(__name__)

TABLE_PATH = nsd.ADDURLS_TABLE
TABLE_COLUMNS = ("filename", "url", "size")
BETAS_ROOT_KEY = nsd.BETAS_ROOT_KEY
#: NSD files registered besides the betas (never fetched by default; the stimuli are ~37 GB).
NSD_EXTRA_KEYS = (nsd.EXPDESIGN_KEY, nsd.STIM_INFO_KEY, nsd.STIM_INFO_CSV_KEY, nsd.STIMULI_KEY)
#: Small experiment files fetched together with any subject's betas.
NSD_EXPERIMENT_KEYS = (nsd.EXPDESIGN_KEY, nsd.STIM_INFO_KEY, nsd.STIM_INFO_CSV_KEY)

_KEY_SIZE_RE = re.compile(r"^[A-Z0-9]+-s(?P<size>\d+)--")
#: Files downloaded at once by ``make get`` (``STREAMS``).
DEFAULT_STREAMS: int = options.spec("streams").default


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
        prefix = nsd.subject_dir_key(subject) + "/"
        found: dict[str, set[int]] = {"betas": set(), "valid": set()}
        for key, size in list_bucket(nsd_url, prefix):
            parsed = nsd.parse_betas_key(key)
            if parsed is None or parsed[1] != subject:
                continue
            found[parsed[0]].add(parsed[2])
            rows.append({"filename": key, "url": object_url(nsd_url, key), "size": str(size)})
        if not found["betas"]:
            raise RemoteError(
                f"no betas_sessionNN.nii.gz found under {object_url(nsd_url, prefix)} "
                f"for {nsd.subject_label(subject)}; expected the 1 mm MNI betas_fithrf files. "
                "Check --nsd-url and the subject numbers."
            )
        unpaired = sorted(found["betas"] ^ found["valid"])
        if unpaired:
            log.warning(
                "%s: sessions %s have a betas file or a valid mask but not both",
                nsd.subject_label(subject),
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
    return [{"filename": nsd.COCO_ZIP_NAME, "url": coco_url, "size": str(size)}]


# -- registering ----------------------------------------------------------------------------------
def register_inputs(
    ds_root: str | Path,
    nsd_url: str,
    coco_url: str,
    subjects: Iterable[int] | None = None,
    command: str = "",
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
    ds_root = Path(ds_root).resolve()
    _require_dataset(ds_root)
    dataset.require_writable(ds_root)
    dataset.ensure_annex(ds_root)
    with dataset.lock(ds_root, "make inputs"):
        return _register(ds_root, nsd_url, coco_url, subjects, command)


def _register(
    ds_root: Path,
    nsd_url: str,
    coco_url: str,
    subjects: Iterable[int] | None,
    command: str,
) -> dict[str, int]:
    dataset.clear_stale_index_lock(ds_root)
    subjects = sorted({int(s) for s in subjects}) if subjects else None
    # List first: a remote error must leave the dataset untouched.
    tables = {
        nsd.NSD_DATASET: nsd_table(nsd_url, subjects),
        nsd.COCO_DATASET: coco_table(coco_url),
    }
    if not command:
        argv = ["inputs", "--nsd-url", nsd_url, "--coco-url", coco_url]
        argv += ["--subjects", *map(str, subjects)] if subjects else []
        command = command_line(argv)
    added: dict[str, int] = {}
    for rel, rows in tables.items():
        sub = ensure_subdataset(ds_root, rel)
        _undo_interrupted(sub)
        dataset.configure_transfers(sub)
        _allow_loopback(sub, nsd_url if rel == nsd.NSD_DATASET else coco_url)
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
        results = dataset.api_call(
            "addurls",
            f"registering files in {rel} (datalad addurls)",
            urlfile=str(table),
            urlformat="{url}",
            filenameformat="{filename}",
            dataset=str(sub),
            fast=True,
            ifexists="skip",
            save=False,
        )
        n_new = sum(
            1 for r in results if r.get("action") == "addurl" and r.get("status") == "ok"
        ) or sum(1 for r in results if r.get("action") == "addurls" and r.get("status") == "ok")
        added[rel] = n_new
        message = (
            f"Register {rel} files by URL (no download)\n\n"
            f"{len(rows)} files listed, table {TABLE_PATH} (columns {','.join(TABLE_COLUMNS)}).\n"
            f"Command: {command}\n"
            f"Redo from the table (in the superdataset): {shlex.join(addurls_cmd)}\n"
        )
        dataset.save(sub, message)
        log.info("%s: %d files listed, %d newly registered", rel, len(rows), n_new)
    dataset.save(
        ds_root,
        f"Update input subdatasets by URL\n\nCommand: {command}\n",
        paths=[ds_root / rel for rel in tables],
    )
    return added


def ensure_subdataset(ds_root: str | Path, rel: str) -> Path:
    """Return the installed subdataset ``rel`` of ``ds_root``: installed (``get -n``) or created."""
    ds_root = Path(ds_root).resolve()
    sub = ds_root / rel
    if dataset.is_installed(sub) and (
        not dataset.is_own_repository(sub) or dataset.resolve_commit(sub, "HEAD") is None
    ):
        # `datalad create` was killed before the subdataset's first commit (or inside its
        # `git init`, leaving a `.git` that git does not take for a repository): start it again
        log.warning("%s was left half-created by an interrupted run; creating it again", rel)
        _rmtree(sub)
    if dataset.is_installed(sub):
        return sub
    known = dataset.api_call("subdatasets", "listing subdatasets", dataset=str(ds_root))
    if any(Path(r.get("path", "")) == sub for r in known):
        log.info("installing subdataset %s (no file content)", rel)
        dataset.api_call(
            "get", f"installing {rel} (datalad get -n)",
            path=str(sub), dataset=str(ds_root), get_data=False,
        )  # fmt: skip
        return sub
    if sub.exists() and any(sub.iterdir()):
        raise DatasetStateError(
            f"{sub} exists but is not a dataset: expected the subdataset {rel} there or nothing. "
            "Move it away, then run `make inputs` again."
        )
    log.info("creating subdataset %s", rel)
    dataset.api_call(
        "create", f"creating {rel} (datalad create)",
        path=str(sub), dataset=str(ds_root), description=f"nsdprep {rel}",
    )  # fmt: skip
    return sub


# -- fetching and freeing -------------------------------------------------------------------------
def get_subjects(
    ds_root: str | Path, subjects: Iterable[int] | None, *, streams: int = DEFAULT_STREAMS
) -> list[int]:
    """``datalad get`` the betas of ``subjects`` (1-based; empty = all) and the experiment files.

    ``streams`` files download at once (``datalad get -J``: git-annex's own parallel transfers,
    started in path order, so sessions in the order they are processed).

    Installs ``inputs/nsd`` first if needed; raises :class:`DatasetStateError` naming subjects that are
    not registered and :class:`RemoteError` if a download fails or does not verify. Integrity: before
    downloading, the server's sizes are compared with the registered ones (``HEAD``); git-annex checks
    the checksum recorded at a file's first download; afterwards ``fsck --fast`` checks sizes again.
    Content that fails is never left in place (partial downloads stay in ``.git/annex/tmp`` to resume).
    """
    ds_root = Path(ds_root).resolve()
    nsd_ds = ensure_subdataset(ds_root, nsd.NSD_DATASET)
    chosen = inventory.select_subjects(nsd_ds, subjects)
    rel = [nsd.subject_root_key(s) for s in chosen]
    rel += [k for k in NSD_EXPERIMENT_KEYS if (nsd_ds / k).is_symlink()]
    log.info("getting %s", ", ".join(nsd.subject_label(s) for s in chosen))
    changed = _changed_on_server(nsd_ds, rel)
    if changed:
        raise RemoteError(
            f"{len(changed)} file(s) on the server differ in size from the ones registered in "
            f"{nsd_ds}; nothing was fetched:\n" + "\n".join(changed) + "\nCheck the source. If the "
            "change is legitimate, `git rm` those files in inputs/nsd and run `make inputs` again."
        )
    get_error: RemoteError | None = None
    try:
        dataset.get(ds_root, [nsd_ds / r for r in rel], hint_403=NSD_403_HINT, jobs=streams)
    except RemoteError as exc:
        get_error = exc
    try:  # also after a failed get: what did arrive must not stay if it is wrong
        _verify_sizes(nsd_ds, rel)
    except RemoteError as exc:
        if get_error is not None:
            raise RemoteError(f"{get_error}\n{exc}") from exc
        raise
    if get_error is not None:
        raise get_error
    return chosen


def drop_subjects(ds_root: str | Path, subjects: Iterable[int] | None) -> list[int]:
    """``datalad drop`` the betas content of ``subjects`` (still registered, fetchable again)."""
    ds_root = Path(ds_root).resolve()
    nsd_ds = ds_root / nsd.NSD_DATASET
    chosen = inventory.select_subjects(nsd_ds, subjects)
    dataset.drop(ds_root, [nsd_ds / nsd.subject_root_key(s) for s in chosen])
    return chosen


# -- helpers --------------------------------------------------------------------------------------
def _undo_interrupted(sub: Path) -> None:
    """Put a subdataset back to its last commit if a killed ``make inputs`` left changes in it.

    Everything in an input subdataset is made by ``make inputs`` (registrations and its table), so
    an uncommitted change there is a leftover of an interrupted registration: ``addurls`` skips
    files that exist, so a half-registered one must go before registering again.
    """
    dataset.clear_stale_index_lock(sub)
    dirty = dataset.dirty_paths(sub)
    if not dirty:
        return
    log.warning(
        "%s: undoing %d uncommitted change(s) left by an interrupted `make inputs`: %s",
        sub.name,
        len(dirty),
        ", ".join(p for _, p in dirty[:5]) + (" ..." if len(dirty) > 5 else ""),
    )
    dataset.git(sub, "reset", "-q", "--hard", "HEAD")
    dataset.git(sub, "clean", "-q", "-f", "-d")


def _rmtree(path: Path) -> None:
    """Remove a folder that may hold read-only annexed objects."""
    for root, dirs, _files in os.walk(path):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
    shutil.rmtree(path)


def _require_dataset(ds_root: Path) -> None:
    if not dataset.is_dataset(ds_root):
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
    current = dataset.git(sub, "config", "--get", key, check=False).split()
    addr = "127.0.0.1" if host == "localhost" else host
    if addr in current or "all" in current:
        return
    log.info("allowing git-annex in %s to download from the loopback address %s", sub, addr)
    dataset.git(sub, "config", "--local", key, " ".join([*current, addr]))


def _changed_on_server(nsd_ds: Path, rel_paths: Sequence[str]) -> list[str]:
    """Absent files whose size on the server (``HEAD``) differs from the size in their key.

    Checked before downloading because git-annex records a VURL key's checksum from whatever the
    first download brings, even content of the wrong size: fetching it would poison the key.
    """
    records, _ = dataset.annex_json(nsd_ds, "whereis", "--not", "--in", "here", "--", *rel_paths)
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


def _verify_sizes(nsd_ds: Path, rel_paths: Sequence[str]) -> None:
    """Check the size of present content against its key (``git annex fsck --fast``).

    ``git annex get`` of a VURL key whose checksum is not yet recorded accepts content of any size
    (checked with git-annex 10.20261026), so a changed or truncated file on the server would be kept.
    ``fsck --fast`` compares sizes without checksumming and moves wrong content to ``.git/annex/bad``.
    """
    records, proc = dataset.annex_json(
        nsd_ds, "fsck", "--fast", "--json-error-messages", "--", *rel_paths
    )
    bad = []
    for rec in records:
        if not rec.get("success", True):
            bad.append(f"  {rec.get('file')}: {' '.join(rec.get('error-messages', []))}".rstrip())
    if bad or proc.returncode != 0:
        detail = "\n".join(bad) or proc.stderr.strip()
        raise RemoteError(
            f"downloaded content in {nsd_ds} does not match the registered size; it was moved to "
            f".git/annex/bad and is not used:\n{detail}\nThe file on the server changed since it "
            "was registered: check the source, then re-register (`make inputs`) or report it."
        )


# -- CLI ------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``python -m nsdprep inputs [--nsd-url URL] [--coco-url URL] [--subjects 1 2] [--dataset .]``."""
    parser.add_argument("--dataset", default=".", help="superdataset root (default: .)")
    options.add_arguments(parser, [options.spec(n) for n in ("nsd_url", "coco_url", "subjects")])


def main(args: argparse.Namespace) -> int:
    """Register the inputs and print a one-line summary."""
    opts = options.from_args(args)
    added = register_inputs(
        args.dataset,
        opts.nsd_url,
        opts.coco_url,
        opts.subjects or None,
        provenance.command_of(args),
    )
    print("registered (new files): " + ", ".join(f"{k}: {v}" for k, v in added.items()))
    return 0
