"""Register the NSD and COCO input files by URL in the subdatasets ``inputs/nsd`` and ``inputs/coco``.

Nothing is downloaded here: files are listed in the bucket (S3 ``ListObjectsV2`` over plain https with
``urllib``; the NSD bucket is an AWS Open Data bucket, readable without credentials) and registered with
``datalad addurls``, which records each file's URL and size. Each object's ETag from the listing is
pinned (:mod:`nsdprep.core.pins`): a single-part upload's ETag is its MD5, so the file gets an MD5E key
(``--key '{annex_key}'``, a column holding ``et:MD5-s<size>--<md5>``: datalad migrates it to MD5E)
and git-annex verifies every download in every clone; a multipart upload keeps a VURL key (its
``annex_key`` is empty: ``--fast``) and its first download is checked against the ETag. One table
serves both because addurls falls back to ``--fast`` for a row whose ``--key`` fields are all empty. The addurls
table, with the ETags, is kept in each subdataset (``.nsdprep/addurls.csv``, in git) and the exact
command lines are in the commit message, so the registration can be redone or audited. Content is
fetched per subject with :func:`get_subjects` (verified) and freed again with :func:`drop_subjects`.

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
from nsdprep.core import dataset, inventory, nsd, pins, provenance
from nsdprep.core._io import atomic_path
from nsdprep.core.bucket import (
    NSD_403_HINT,
    list_bucket,  # noqa: F401 (re-exported: inputs.list_bucket)
    list_objects,
    list_prefixes,
    object_url,
    remote_head,
    remote_size,
)
from nsdprep.core.errors import DatasetStateError, RemoteError
from nsdprep.core.provenance import command_line

log = logging.getLogger(__name__)

TABLE_PATH = pins.TABLE_PATH
TABLE_COLUMNS = pins.TABLE_COLUMNS
#: The addurls ``--key`` format: the table's ``annex_key`` column (empty: a VURL key, ``--fast``).
KEY_FORMAT = "{annex_key}"
BETAS_ROOT_KEY = nsd.BETAS_ROOT_KEY
#: NSD files registered besides the betas (never fetched by default; the stimuli are ~37 GB).
NSD_EXTRA_KEYS = (nsd.EXPDESIGN_KEY, nsd.STIM_INFO_KEY, nsd.STIM_INFO_CSV_KEY, nsd.STIMULI_KEY)
#: Small experiment files fetched together with any subject's betas.
#: The experiment files ``make get`` fetches with the betas: the design and the stim info CSV
#: (the pickle beside it stays registered, never fetched: nothing here opens it).
NSD_EXPERIMENT_KEYS = (nsd.EXPDESIGN_KEY, nsd.STIM_INFO_CSV_KEY)

_KEY_SIZE_RE = re.compile(r"^[A-Z0-9]+-s(?P<size>\d+)--")
#: Files downloaded at once by ``make get`` (``STREAMS``).
DEFAULT_STREAMS: int = options.spec("streams").default


# -- what to register -----------------------------------------------------------------------------
def nsd_table(nsd_url: str, subjects: Iterable[int] | None = None) -> list[dict[str, str]]:
    """Rows of :data:`TABLE_COLUMNS` for every NSD file to register, found by listing the bucket.

    Betas and valid masks of each subject's 1 mm MNI ``betas_fithrf`` folder (sessions as listed,
    never assumed), its MNI ROI volumes (:func:`roi_rows`), plus the experiment design, stimulus
    info and stimuli files. ``subjects`` limits the subjects (1-based); ``None`` = every ``subjNN``
    folder in the bucket.

    Keys are matched whole (:func:`nsd.parse_betas_key`): a listed key or subject folder that looks
    like NSD's but does not fit exactly (a trailing newline, ``..`` or ``//`` segments, ``subj100/``,
    a subject folder without betas) is skipped, and one warning counts them, so one odd entry never
    stops the others. Only keys that fit become file names, so nothing is written outside ``inputs/``.
    """
    skipped: list[str] = []
    if subjects:
        wanted = sorted({int(s) for s in subjects})
    else:
        wanted = []
        for prefix in list_prefixes(nsd_url, BETAS_ROOT_KEY):
            subject = nsd.parse_subject_prefix(prefix)
            if subject is None:
                skipped.append(prefix)
            else:
                wanted.append(subject)
    rows: list[dict[str, str]] = []
    for subject in sorted(set(wanted)):
        prefix = nsd.subject_dir_key(subject) + "/"
        found: dict[str, set[int]] = {"betas": set(), "valid": set()}
        subject_rows = []
        for key, size, etag in list_objects(nsd_url, prefix):
            parsed = nsd.parse_betas_key(key)
            if parsed is None or parsed[1] != subject:
                if _looks_like_betas(key[len(prefix) :]):
                    skipped.append(key)
                continue
            found[parsed[0]].add(parsed[2])
            subject_rows.append(table_row(key, object_url(nsd_url, key), size, etag))
        if not found["betas"]:
            if subjects:  # asked for by name: say so
                raise RemoteError(
                    f"no betas_sessionNN.nii.gz found under {object_url(nsd_url, prefix)} "
                    f"for {nsd.subject_label(subject)}; expected the 1 mm MNI betas_fithrf files. "
                    "Check --nsd-url and the subject numbers."
                )
            skipped.append(prefix)
            continue
        rows += subject_rows
        rows += roi_rows(nsd_url, subject)
        unpaired = sorted(found["betas"] ^ found["valid"])
        if unpaired:
            log.warning(
                "%s: sessions %s have a betas file or a valid mask but not both",
                nsd.subject_label(subject),
                unpaired,
            )
    if skipped:
        shown = ", ".join(ascii(k) for k in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
        log.warning(
            "listing of %s: skipped %d listed key(s) that do not fit the NSD layout "
            "(nsddata_betas/ppdata/subjNN/MNI/betas_fithrf/{betas,valid}_sessionNN.nii.gz): %s",
            nsd_url,
            len(skipped),
            shown,
        )
    if not rows:
        raise RemoteError(
            f"no betas found under {object_url(nsd_url, BETAS_ROOT_KEY)}: expected folders "
            "subjXX/MNI/betas_fithrf/ with betas_sessionNN.nii.gz. Check --nsd-url."
        )
    for key in NSD_EXTRA_KEYS:
        listed = {o.key: o for o in list_objects(nsd_url, key)}
        if key not in listed:
            raise RemoteError(
                f"{object_url(nsd_url, key)} not found in the bucket listing; expected this NSD "
                "experiment file. Check --nsd-url."
            )
        rows.append(table_row(key, object_url(nsd_url, key), listed[key].size, listed[key].etag))
    for row in rows:
        _require_safe_filename(row["filename"])
    return sorted(rows, key=lambda r: r["filename"])


def roi_rows(nsd_url: str, subject: int) -> list[dict[str, str]]:
    """Rows of one subject's MNI ROI volumes (``nsddata/ppdata/subjXX/MNI/roi/<atlas>.nii.gz``).

    Every ROI the bucket lists there is registered (by URL: small files, fetched only by a
    ``make curated ROI=<atlas>``); a subject without any gets one warning line.
    """
    prefix = nsd.roi_dir_key(subject) + "/"
    rows = [
        table_row(key, object_url(nsd_url, key), size, etag)
        for key, size, etag in list_objects(nsd_url, prefix)
        if (parsed := nsd.parse_roi_key(key)) is not None and parsed[0] == subject
    ]
    if rows:
        names = sorted(nsd.parse_roi_key(r["filename"])[1] for r in rows)  # type: ignore[index]
        log.info(
            "%s: %d MNI ROI volumes (%s)", nsd.subject_label(subject), len(rows), ", ".join(names)
        )
    else:
        log.warning(
            "%s: no MNI ROI volumes under %s (ROI=... cannot be used for this subject)",
            nsd.subject_label(subject),
            object_url(nsd_url, prefix),
        )
    return rows


def _looks_like_betas(name: str) -> bool:
    """True for a key (below a subject's betas folder) that NSD's layout cannot explain.

    Other files of the folder (``R2.nii.gz`` and the like) are ignored silently; names that look
    like betas or valid files without being one, and names with path tricks or control characters,
    are reported.
    """
    parts = name.split("/")
    return (
        not name.isprintable()
        or any(p in ("", ".", "..") for p in parts)
        or re.search(r"(betas|valid)_session", name) is not None
    )


def _require_safe_filename(name: str) -> None:
    """Refuse a file name that could leave the subdataset (absolute, ``..``, ``//``, control chars).

    :func:`nsd_table` admits only names that fit NSD's layout, so this never fires; it keeps a
    future change from writing where no input belongs (``//`` is also addurls' subdataset mark).
    """
    parts = name.split("/")
    if (
        not name
        or not name.isprintable()
        or "\\" in name
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise RemoteError(
            f"refusing to register the listed key {ascii(name)}: it is not a plain relative path"
        )


def coco_table(coco_url: str) -> list[dict[str, str]]:
    """The one COCO row: the annotations zip, checked to be reachable (``HEAD``).

    A single URL has no listing: its size and ETag are what ``HEAD`` answers at registration.
    """
    size, etag = remote_head(coco_url, hint="Check --coco-url (a public COCO annotations zip URL).")
    return [table_row(nsd.COCO_ZIP_NAME, coco_url, size, etag)]


def table_row(filename: str, url: str, size: int, etag: str) -> dict[str, str]:
    """One addurls row: the ETag as listed and, for a single-part one, the MD5 key to register."""
    pin = pins.Pin.parse(size, etag)
    return {
        "filename": filename,
        "url": url,
        "size": str(size),
        "etag": etag,
        "annex_key": pin.annex_key_spec() if pin else "",
    }


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
        table_rows = _merge_table(sub, rows)
        new = [r["filename"] for r in table_rows if not os.path.lexists(sub / r["filename"])]
        table = sub / TABLE_PATH
        with atomic_path(table) as tmp, tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=TABLE_COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(table_rows)
        addurls_cmd = [
            "datalad", "addurls", "--fast", "--ifexists", "skip", "--key", KEY_FORMAT,
            "--exclude-autometa", "annex_key", "-d", rel, f"{rel}/{TABLE_PATH}", "{url}",
            "{filename}",
        ]  # fmt: skip
        try:
            dataset.api_call(
                "addurls",
                f"registering files in {rel} (datalad addurls)",
                urlfile=str(table),
                urlformat="{url}",
                filenameformat="{filename}",
                dataset=str(sub),
                fast=True,
                ifexists="skip",
                key=KEY_FORMAT,
                exclude_autometa="annex_key",
                save=False,
            )
            n_checksum = _check_keys(sub, table_rows, new)
        except BaseException:
            _undo_interrupted(sub)  # a failed registration leaves the subdataset as it was
            raise
        n_new = sum(1 for name in new if os.path.lexists(sub / name))
        added[rel] = n_new
        message = (
            f"Register {rel} files by URL (no download)\n\n"
            f"{len(table_rows)} files, table {TABLE_PATH} (columns {','.join(TABLE_COLUMNS)}): "
            f"{n_checksum} with an MD5 key from their single-part ETag, the others VURL keys "
            "checked against their ETag at the first download.\n"
            f"Command: {command}\n"
            f"Redo from the table (in the superdataset): {shlex.join(addurls_cmd)}\n"
        )
        dataset.save(sub, message)
        log.info(
            "%s: %d files listed, %d newly registered (%d with a checksum key)",
            rel, len(rows), n_new, n_checksum,
        )  # fmt: skip
    dataset.save(
        ds_root,
        f"Update input subdatasets by URL\n\nCommand: {command}\n",
        paths=[ds_root / rel for rel in tables],
    )
    return added


def _merge_table(sub: Path, listed: list[dict[str, str]]) -> list[dict[str, str]]:
    """The new addurls table: the listing, with the recorded rows of registered files kept.

    A registered file keeps the ETag it was registered with (its pin; if the bucket lists another
    one now, a warning says so and downloads are checked against the recorded one). A file
    registered before ETags were recorded gets the listing's ETag now. Rows of registered files
    that are not listed now (another ``SUBJECTS``, or gone from the bucket) are kept.
    """
    old = pins.read_table(sub)
    merged: dict[str, dict[str, str]] = {}
    changed, pinned_now = [], 0
    for row in listed:
        name = row["filename"]
        prev = old.get(name)
        registered = os.path.lexists(sub / name)
        if registered and prev and prev.get("etag"):
            merged[name] = {c: prev.get(c, "") for c in TABLE_COLUMNS}
            if (prev["etag"], prev.get("size")) != (row["etag"], row["size"]):
                changed.append(name)
            continue
        pinned_now += registered and bool(row["etag"])
        merged[name] = row
    for name, prev in old.items():
        if name not in merged and os.path.lexists(sub / name):
            merged[name] = {c: prev.get(c, "") for c in TABLE_COLUMNS}
    if changed:
        log.warning(
            "%s: %d registered file(s) are listed with another ETag or size than when they were "
            "registered (e.g. %s); the registered version is kept and downloads are checked "
            "against it. If the change is legitimate, `git rm` them in %s and run `make inputs`.",
            sub.name, len(changed), changed[0], sub,
        )  # fmt: skip
    if pinned_now:
        log.info(
            "%s: recorded the listed ETag of %d file(s) registered before ETags were",
            sub.name,
            pinned_now,
        )
    return [merged[name] for name in sorted(merged)]


def _check_keys(sub: Path, rows: list[dict[str, str]], new: list[str]) -> int:
    """Check each registered file's key against its row; return how many have a checksum key.

    A newly registered file must have the MD5E key of its single-part ETag, or a VURL key of its
    size; anything else raises. Files registered before ETags were recorded keep their VURL key
    (their downloads are checked against the recorded ETag instead).
    """
    records, proc = dataset.annex_json(sub, "find", "--include=*")
    if proc.returncode != 0:
        raise DatasetStateError(f"`git annex find` failed in {sub}: {proc.stderr.strip()[-300:]}")
    keys = {r.get("file"): r.get("key", "") for r in records}
    fresh, wrong, legacy, n_checksum = set(new), [], 0, 0
    for row in rows:
        name, key = row["filename"], keys.get(row["filename"], "")
        pin = pins.Pin.parse(row["size"], row["etag"])
        if pin is not None and pin.md5:
            ok = (
                key.startswith(f"MD5E-s{pin.size}--{pin.md5}")
                or key == f"MD5-s{pin.size}--{pin.md5}"
            )
        else:
            ok = key.startswith((f"VURL-s{row['size']}--", f"URL-s{row['size']}--"))
        n_checksum += dataset.key_is_checksum(key) and bool(key)
        if ok:
            continue
        if name in fresh or not key:
            wrong.append(f"{name}: {key or 'not registered'}")
        else:
            legacy += 1
    if wrong:
        raise DatasetStateError(
            f"{sub}: {len(wrong)} file(s) were not registered with the expected key, e.g. "
            f"{wrong[0]}; nothing was recorded. Run `make inputs` again; if it persists, report it."
        )
    if legacy:
        log.info(
            "%s: %d file(s) keep the VURL key they were registered with before ETags were "
            "recorded; their downloads are checked against the recorded ETag",
            sub.name,
            legacy,
        )
    return n_checksum


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
    MD5 keys and the checksum recorded at a VURL file's first download, and that first download is
    checked against the ETag recorded at registration (:func:`nsdprep.core.pins.fetch_verified`);
    afterwards ``fsck --fast`` checks sizes again. Content that fails is never left in place
    (partial downloads stay in ``.git/annex/tmp`` to resume).
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
        pins.fetch_verified(ds_root, [nsd_ds / r for r in rel], hint_403=NSD_403_HINT, jobs=streams)
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
