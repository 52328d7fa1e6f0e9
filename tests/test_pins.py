"""Checksums pinned at registration (ETags from the listing) and every download checked against them.

A bucket of small files in NSD's layout is served by the loopback mirror with S3's ETags: objects up
to 5 MiB single-part (the ETag is their MD5), larger ones multipart in 5 MiB parts. The mirror can
tamper with chosen objects: same size, other bytes, the listing still showing the true ETag (and
``HEAD`` the ETag of the altered bytes, as a mirror that lies consistently would). Each subject is
used by one test only, so the tests can share one registered dataset.
"""

from __future__ import annotations

import gzip
import hashlib
import random
import subprocess
import time
from pathlib import Path

import pytest

from nsdprep.core import dataset, inventory, pins
from nsdprep.core import nsd as nsdp
from nsdprep.core.errors import RemoteError
from nsdprep.drive import repair
from nsdprep.stages import inputs
from nsdprep.testing.serve import Mirror, read_object

pytestmark = pytest.mark.datalad

MiB = 1024 * 1024
PART = 5 * MiB
#: betas sizes (before gzip) per subject: 12 MiB = 3 parts of 5 MiB, 6 MiB = 2; small: single-part
BETAS_SIZES = {
    1: 12 * MiB, 2: 3000, 3: 6 * MiB, 4: 6 * MiB, 5: 6 * MiB, 6: 4000, 7: 6 * MiB, 8: 6 * MiB,
}  # fmt: skip


def betas(subject: int) -> str:
    return nsdp.betas_key(subject, 1)


def s3_etag(data: bytes, part: int = PART, threshold: int = PART) -> str:
    """S3's ETag of ``data``, computed here independently of the code under test."""
    if len(data) <= threshold:
        return hashlib.md5(data).hexdigest()
    digests = [hashlib.md5(data[i : i + part]).digest() for i in range(0, len(data), part)]
    return f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(digests)}"


def git(cwd: Path, *args: str, check: bool = True) -> str:
    return subprocess.run(
        ["git", "-C", str(cwd), *args], capture_output=True, text=True, check=check
    ).stdout


def present(nsd: Path) -> list[str]:
    return sorted(git(nsd, "annex", "find", "--in", "here").split())


def leftovers(nsd: Path) -> list[Path]:
    """Downloads git-annex kept aside (to resume, or as bad content)."""
    annex = dataset.git_dir(nsd) / "annex"
    return [p for sub in ("tmp", "bad") for p in (annex / sub).rglob("*") if p.is_file()]


class Registered:
    def __init__(self, bucket: Path, mirror: Mirror, ds: Path) -> None:
        self.bucket, self.mirror, self.ds = bucket, mirror, ds
        self.nsd = ds / nsdp.NSD_DATASET

    def data(self, key: str) -> bytes:
        return (self.bucket / "nsd" / key).read_bytes()

    def tampered(self, key: str) -> bytes:
        path = self.bucket / "nsd" / key
        return b"".join(read_object(path, 0, path.stat().st_size, tampered=True))

    def key_of(self, rel: str) -> str:
        return git(self.nsd, "annex", "lookupkey", rel).strip()


@pytest.fixture(scope="module")
def reg(git_env, tmp_path_factory: pytest.TempPathFactory):
    import datalad.api as dl

    tmp = tmp_path_factory.mktemp("pins")
    rng = random.Random(7)
    bucket = tmp / "bucket"
    files = {betas(s): n for s, n in BETAS_SIZES.items()}
    files |= {nsdp.valid_key(s, 1): 200 + s for s in BETAS_SIZES}
    files |= {k: 500 for k in inputs.NSD_EXTRA_KEYS}
    for key, size in files.items():
        path = bucket / "nsd" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(size)  # .nii.gz files are gzip streams, as `make repair` checks
        path.write_bytes(gzip.compress(data, compresslevel=1) if key.endswith(".gz") else data)
    (bucket / "coco" / nsdp.COCO_ZIP_KEY).parent.mkdir(parents=True)
    (bucket / "coco" / nsdp.COCO_ZIP_KEY).write_bytes(rng.randbytes(300))
    with Mirror(bucket, multipart_threshold=PART, part_size=PART) as mirror:
        ds = tmp / "ds"
        dl.create(str(ds), result_renderer="disabled")
        inputs.register_inputs(ds, f"{mirror.url}/nsd", f"{mirror.url}/coco/{nsdp.COCO_ZIP_KEY}")
        yield Registered(bucket, mirror, ds)


@pytest.fixture
def served(reg: Registered):
    yield reg
    reg.mirror.clear_faults()


# -- registration ---------------------------------------------------------------------------------
def test_registration_pins_every_listed_etag(reg: Registered) -> None:
    rows = pins.read_table(reg.nsd)
    assert sorted(rows) == sorted(inventory.registered_keys(reg.nsd) + list(inputs.NSD_EXTRA_KEYS))
    for name, row in rows.items():
        data = reg.data(name)
        assert row["etag"] == s3_etag(data), name
        key = reg.key_of(name)
        if len(data) <= PART:  # single-part: its MD5 key from the start, verified by git-annex
            md5 = hashlib.md5(data).hexdigest()
            assert row["annex_key"] == f"et:MD5-s{len(data)}--{md5}"
            assert key.startswith(f"MD5E-s{len(data)}--{md5}."), key
        else:  # multipart: a VURL key, checked against the ETag at its first download
            assert row["annex_key"] == ""
            assert key.startswith(f"VURL-s{len(data)}--http://"), key
    # the pins are in git, in the subdataset: every clone has them
    assert git(reg.nsd, "ls-files", pins.TABLE_PATH).strip() == pins.TABLE_PATH
    assert git(reg.nsd, "status", "--porcelain") == ""
    message = git(reg.nsd, "log", "-1", "--format=%B")
    n_md5 = sum(1 for name in rows if len(reg.data(name)) <= PART)
    assert f"{n_md5} with an MD5 key from their single-part ETag" in message
    assert present(reg.nsd) == []


def test_registering_again_keeps_the_pins(reg: Registered) -> None:
    heads = git(reg.nsd, "rev-parse", "HEAD"), git(reg.ds, "rev-parse", "HEAD")
    before = (reg.nsd / pins.TABLE_PATH).read_bytes()
    nsd_url, coco_url = f"{reg.mirror.url}/nsd", f"{reg.mirror.url}/coco/{nsdp.COCO_ZIP_KEY}"
    assert inputs.register_inputs(reg.ds, nsd_url, coco_url, subjects=[2]) == {
        nsdp.NSD_DATASET: 0,
        nsdp.COCO_DATASET: 0,
    }
    # one subject listed: the others' pins stay; nothing changed, nothing committed
    assert (reg.nsd / pins.TABLE_PATH).read_bytes() == before
    assert (git(reg.nsd, "rev-parse", "HEAD"), git(reg.ds, "rev-parse", "HEAD")) == heads


# -- downloads --------------------------------------------------------------------------------------
def test_untampered_downloads_pass_and_the_part_size_is_recorded(served: Registered) -> None:
    reg = served
    assert inputs.get_subjects(reg.ds, [1]) == [1]
    assert (reg.nsd / betas(1)).read_bytes() == reg.data(betas(1))
    key = reg.key_of(betas(1))
    meta = dataset.key_metadata(reg.nsd, [betas(1)])[key]
    assert meta[pins.PART_SIZE_FIELD] == [str(PART)]  # 5 MiB, found among the common sizes
    # the checksum git-annex recorded at that download is the checked one: it pins from now on
    sha256 = hashlib.sha256(reg.data(betas(1))).hexdigest()
    ek = f"SHA256E-s{len(reg.data(betas(1)))}--{sha256}"
    assert dataset.equivalent_keys(reg.nsd, [key])[key] == [ek]
    assert meta[pins.VERIFIED_FIELD] == [ek]
    # checked once: a second look trusts git-annex's record instead of hashing again
    again = pins.verify_fetched(reg.ds, [reg.nsd / betas(1)])
    assert again.checked == [] and again.trusted == [f"inputs/nsd/{betas(1)}"]
    git(reg.nsd, "annex", "fsck", "--", betas(1))
    inputs.drop_subjects(reg.ds, [1])


def _one_line(exc: pytest.ExceptionInfo[RemoteError]) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


def test_tampered_single_part_download_is_refused_and_nothing_kept(served: Registered) -> None:
    reg, rel = served, betas(2)
    reg.mirror.tamper(f"nsd/{rel}")
    with pytest.raises(RemoteError) as info:
        inputs.get_subjects(reg.ds, [2])
    line = _one_line(info)
    assert line.startswith(f"inputs/nsd/{rel}: Verification of content failed"), line
    assert f"expected MD5 {hashlib.md5(reg.data(rel)).hexdigest()}" in line
    assert f"got MD5 {hashlib.md5(reg.tampered(rel)).hexdigest()}" in line
    assert rel not in present(reg.nsd) and leftovers(reg.nsd) == []
    # nothing recorded: no record of the key's content here
    assert "[here]" not in git(reg.nsd, "annex", "whereis", "--", rel)
    # the rest of the subject arrived
    assert nsdp.valid_key(2, 1) in present(reg.nsd)
    reg.mirror.clear_faults()
    inputs.get_subjects(reg.ds, [2])
    assert (reg.nsd / rel).read_bytes() == reg.data(rel)
    inputs.drop_subjects(reg.ds, [2])


def test_tampered_multipart_first_download_is_refused_and_nothing_recorded(
    served: Registered,
) -> None:
    reg, rel = served, betas(3)
    key = reg.key_of(rel)
    assert key.startswith("VURL-")
    reg.mirror.tamper(f"nsd/{rel}")
    with pytest.raises(RemoteError) as info:
        inputs.get_subjects(reg.ds, [3])
    line = _one_line(info)
    assert line.startswith(f"inputs/nsd/{rel}: Verification of content failed"), line
    assert f"expected ETag {s3_etag(reg.data(rel))} (recorded at registration)" in line
    assert f"got ETag {s3_etag(reg.tampered(rel))} (5 MiB parts" in line
    assert rel not in present(reg.nsd) and leftovers(reg.nsd) == []
    # the checksum git-annex recorded from the bad download was taken back; nothing noted
    assert dataset.equivalent_keys(reg.nsd, [key])[key] == []
    noted = dataset.key_metadata(reg.nsd, [rel])[key]
    assert pins.PART_SIZE_FIELD not in noted and pins.VERIFIED_FIELD not in noted
    # so the real file is accepted afterwards (not refused by a poisoned record)
    reg.mirror.clear_faults()
    inputs.get_subjects(reg.ds, [3])
    assert (reg.nsd / rel).read_bytes() == reg.data(rel)
    assert dataset.key_metadata(reg.nsd, [rel])[key][pins.PART_SIZE_FIELD] == [str(PART)]
    inputs.drop_subjects(reg.ds, [3])
    # from now on git-annex itself refuses other bytes (the checksum recorded at the checked get)
    reg.mirror.tamper(f"nsd/{rel}")
    with pytest.raises(RemoteError, match=f"{rel}: Verification of content failed"):
        inputs.get_subjects(reg.ds, [3])
    assert rel not in present(reg.nsd) and leftovers(reg.nsd) == []


def test_content_fetched_by_datalad_itself_is_checked_by_verify_fetched(
    served: Registered,
) -> None:
    """What ``datalad run`` fetches for its declared inputs, checked before the command starts."""
    import datalad.api as dl

    reg, rel = served, betas(4)
    key = reg.key_of(rel)
    reg.mirror.tamper(f"nsd/{rel}")
    # datalad's own fetch: git-annex accepts a first download of a VURL key, whatever it is
    dl.get(str(reg.nsd / rel), dataset=str(reg.ds), result_renderer="disabled")
    assert (reg.nsd / rel).read_bytes() == reg.tampered(rel)
    inputs_of_a_step = (f"inputs/nsd/{rel}", "derivatives/coco_categories.pkl", "no/such/*")
    with pytest.raises(RemoteError) as info:
        pins.verify_fetched(reg.ds, inputs_of_a_step)
    line = _one_line(info)
    assert f"inputs/nsd/{rel}: Verification of content failed: expected ETag" in line
    assert rel not in present(reg.nsd) and leftovers(reg.nsd) == []
    assert dataset.equivalent_keys(reg.nsd, [key])[key] == []
    reg.mirror.clear_faults()
    done = pins.fetch_verified(reg.ds, inputs_of_a_step)
    assert done.checked == [f"inputs/nsd/{rel}"] and done.part_sizes == {done.checked[0]: PART}
    inputs.drop_subjects(reg.ds, [4])


def test_prefetcher_refuses_a_tampered_session(served: Registered) -> None:
    from nsdprep.stages.resample.prefetch import PipelineStats, Prefetcher

    reg, rel = served, betas(5)
    reg.mirror.tamper(f"nsd/{rel}")
    fetcher = Prefetcher(reg.nsd, [(1, reg.nsd / rel)], slots=1, stats=PipelineStats())
    fetcher.start()
    deadline = time.monotonic() + 120
    while fetcher.active() and time.monotonic() < deadline:
        fetcher.ready(block=True)
    fetcher.close()
    assert isinstance(fetcher.error, RemoteError), fetcher.error
    assert f"{rel}: Verification of content failed" in str(fetcher.error)
    assert rel not in present(reg.nsd) and leftovers(reg.nsd) == []


def test_make_inputs_pins_files_registered_before_etags_were(
    served: Registered, caplog: pytest.LogCaptureFixture
) -> None:
    """A dataset registered by an older ``make inputs`` (VURL keys, no ETags): its first downloads
    were trusted as they came. ``make inputs`` now records the listed ETags for those files too,
    and a download that was taken from a tampered server is found out."""
    import datalad.api as dl

    from conftest import register_as_before_etags

    reg, rel = served, betas(8)
    register_as_before_etags(reg.ds, [rel])
    assert pins.read_pins(reg.nsd).get(rel) is None
    reg.mirror.tamper(f"nsd/{rel}")
    dl.get(str(reg.nsd / rel), dataset=str(reg.ds), result_renderer="disabled")
    caplog.set_level("WARNING")
    unchecked = pins.verify_fetched(reg.ds, [reg.nsd / rel])  # nothing to check it against
    assert unchecked.unpinned == [f"inputs/nsd/{rel}"] and unchecked.problems == []
    assert any("no ETag recorded" in r.getMessage() for r in caplog.records)
    key = reg.key_of(rel)
    nsd_url, coco_url = f"{reg.mirror.url}/nsd", f"{reg.mirror.url}/coco/{nsdp.COCO_ZIP_KEY}"
    inputs.register_inputs(reg.ds, nsd_url, coco_url, subjects=[8])
    assert reg.key_of(rel) == key  # the registration is kept, its ETag now recorded
    assert pins.read_pins(reg.nsd)[rel].etag == s3_etag(reg.data(rel))
    assert git(reg.ds, "status", "--porcelain") == ""
    with pytest.raises(RemoteError) as info:
        pins.verify_fetched(reg.ds, [reg.nsd / rel])
    assert f"inputs/nsd/{rel}: Verification of content failed" in _one_line(info)
    assert rel not in present(reg.nsd) and dataset.equivalent_keys(reg.nsd, [key])[key] == []
    reg.mirror.clear_faults()
    inputs.get_subjects(reg.ds, [8])
    assert (reg.nsd / rel).read_bytes() == reg.data(rel)
    inputs.drop_subjects(reg.ds, [8])


# -- make repair ----------------------------------------------------------------------------------
def _damage_present_copy(reg: Registered, rel: str) -> None:
    """Replace the local content by the bytes a tampered mirror sends (as a past download had)."""
    obj = (reg.nsd / rel).resolve()
    obj.chmod(0o644)
    obj.write_bytes(reg.tampered(rel))


def test_repair_checks_against_the_recorded_checksum_not_the_server(served: Registered) -> None:
    """A tampered mirror whose ``HEAD`` ETag matches its altered bytes: the damage is reported."""
    reg, rel = served, nsdp.EXPDESIGN_KEY  # not gzip: only a checksum can tell
    inputs.get_subjects(reg.ds, [6])
    _damage_present_copy(reg, rel)
    reg.mirror.tamper(f"nsd/{rel}")
    head = git(reg.ds, "rev-parse", "HEAD")
    with pytest.raises(RemoteError) as info:
        repair.repair_subjects(reg.ds, [6])
    line = _one_line(info)
    assert rel in line, line
    assert hashlib.md5(reg.data(rel)).hexdigest() in line  # the recorded checksum
    assert (reg.nsd / rel).exists() is False  # the damaged copy is not kept
    assert git(reg.ds, "rev-parse", "HEAD") == head and git(reg.nsd, "status", "--porcelain") == ""
    reg.mirror.clear_faults()
    assert repair.repair_subjects(reg.ds, [6]) == []  # the real file, fetched and verified
    assert (reg.nsd / rel).read_bytes() == reg.data(rel)
    inputs.drop_subjects(reg.ds, [6])


def test_repair_of_a_multipart_file_checks_the_recorded_etag(served: Registered) -> None:
    reg, rel = served, betas(7)
    inputs.get_subjects(reg.ds, [7])
    _damage_present_copy(reg, rel)
    reg.mirror.tamper(f"nsd/{rel}")
    with pytest.raises(RemoteError) as info:
        repair.repair_subjects(reg.ds, [7])
    line = _one_line(info)
    assert rel in line and s3_etag(reg.data(rel)) in line, line
    assert rel not in present(reg.nsd) and leftovers(reg.nsd) == []
    reg.mirror.clear_faults()
    assert repair.repair_subjects(reg.ds, [7]) in ([], [rel])
    assert (reg.nsd / rel).read_bytes() == reg.data(rel)
    git(reg.nsd, "annex", "fsck", "--", rel)
    inputs.drop_subjects(reg.ds, [7])


# -- computing ETags ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "part", "expected_first"),
    [
        (12 * MiB, 5 * MiB, 5 * MiB),  # a common size
        (20 * MiB, 8 * MiB, 8 * MiB),  # the aws cli default comes first
        (int(7.5 * MiB), 3 * MiB, 3 * MiB),  # derived from the part count
        (10_500_000, 3_500_000, 3_500_000),  # derived: ceil(size / parts)
    ],
)
def test_part_size_search(tmp_path: Path, size: int, part: int, expected_first: int) -> None:
    data = random.Random(size).randbytes(size)
    path = tmp_path / "object"
    path.write_bytes(data)
    pin = pins.Pin.parse(size, f'"{s3_etag(data, part, threshold=0)}"')
    assert pin is not None and pin.parts == -(-size // part)
    match = pins.check_against_pin(path, pin)
    assert match.ok and match.part_size == expected_first
    other = bytearray(data)
    other[size // 3] ^= 1
    path.write_bytes(bytes(other))
    assert not pins.check_against_pin(path, pin).ok


def test_etag_forms() -> None:
    assert pins.Pin.parse(10, '"0123456789abcdef0123456789ABCDEF"').md5 == (
        "0123456789abcdef0123456789abcdef"
    )
    multipart = pins.Pin.parse(10, "0123456789abcdef0123456789abcdef-12")
    assert multipart.parts == 12 and multipart.md5 is None and multipart.annex_key_spec() == ""
    for other in ("", 'W/"0123456789abcdef0123456789abcdef"', "5e1f-5b8", "xyz", "a" * 32 + "-0"):
        assert pins.Pin.parse(10, other) is None, other


# -- the pins travel ------------------------------------------------------------------------------
def test_published_clone_verifies_by_itself(served: Registered, tmp_path: Path) -> None:
    """``make publish`` pushes the table (git) and the git-annex branch (the checksum recorded at
    the checked first download): a colleague's git-annex refuses tampered bytes on its own."""
    import datalad.api as dl

    from nsdprep.drive import publish

    reg = served
    multipart, single = betas(1), nsdp.valid_key(1, 1)
    inputs.get_subjects(reg.ds, [1])  # the first download of the multipart file, checked
    inputs.drop_subjects(reg.ds, [1])
    url = publish.publish(reg.ds, f"ria+file://{tmp_path / 'store'}")
    mate = tmp_path / "mate"
    dl.clone(source=url, path=str(mate), result_renderer="disabled")
    dl.get(str(mate / nsdp.NSD_DATASET), dataset=str(mate), get_data=False,
           result_renderer="disabled")  # fmt: skip
    nsd = mate / nsdp.NSD_DATASET
    assert pins.read_table(nsd) == pins.read_table(reg.nsd)
    key = git(nsd, "annex", "lookupkey", multipart).strip()
    sha256 = hashlib.sha256(reg.data(multipart)).hexdigest()
    assert dataset.equivalent_keys(nsd, [key])[key] == [
        f"SHA256E-s{len(reg.data(multipart))}--{sha256}"
    ]
    assert dataset.key_metadata(nsd, [multipart])[key][pins.PART_SIZE_FIELD] == [str(PART)]
    reg.mirror.tamper(f"nsd/{multipart}")
    reg.mirror.tamper(f"nsd/{single}")
    for rel in (multipart, single):  # plain git-annex, no nsdprep code
        proc = subprocess.run(["git", "-C", str(nsd), "annex", "get", "--", rel],
                              capture_output=True, text=True)  # fmt: skip
        assert proc.returncode != 0 and "Verification of content failed" in proc.stderr, rel
        assert not (nsd / rel).exists()
    reg.mirror.clear_faults()
    proc = subprocess.run(["git", "-C", str(nsd), "annex", "get", "--", multipart, single],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (nsd / multipart).read_bytes() == reg.data(multipart)
