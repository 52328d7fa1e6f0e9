"""Registering NSD/COCO inputs by URL (datalad addurls --fast) against the loopback mirror.

Most tests use a tiny bucket tree built here (a few small files in the real key layout; the inputs stage
never reads file contents) so faults can be injected and files changed; one test registers the shared
synthetic tree served by the ``mirror`` fixture.
"""

from __future__ import annotations

import csv
import hashlib
import random
import subprocess
from pathlib import Path

import pytest

from nsdprep.core import dataset, inventory
from nsdprep.core import nsd as nsdp
from nsdprep.core.errors import DatasetStateError, RemoteError
from nsdprep.stages import inputs
from nsdprep.testing.serve import Mirror

pytestmark = pytest.mark.datalad

#: sessions per subject in the tiny bucket (unequal on purpose)
SESSIONS = {1: 2, 2: 3}
BETAS_DIR = "nsd/nsddata_betas/ppdata/subj{s:02d}/MNI/betas_fithrf"


def _write(path: Path, n: int, rng: random.Random) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(rng.randbytes(n))


def build_bucket(root: Path, sessions: dict[int, int] = SESSIONS, seed: int = 0) -> Path:
    """NSD + COCO buckets with small random files; also files that must NOT be registered."""
    rng = random.Random(seed)
    for s, n in sessions.items():
        d = root / BETAS_DIR.format(s=s)
        for ses in range(1, n + 1):
            _write(d / f"betas_session{ses:02d}.nii.gz", 2000 + 10 * ses + s, rng)
            _write(d / f"valid_session{ses:02d}.nii.gz", 300 + ses, rng)
        _write(d / "R2.nii.gz", 50, rng)  # same folder, not a betas/valid file
        _write(d.parent / "betas_fithrf_GLMdenoise_RR" / "betas_session01.nii.gz", 60, rng)
        _write(d.parent.parent / "func1mm/betas_fithrf/betas_session01.nii.gz", 70, rng)
    for key, size in [
        (nsdp.EXPDESIGN_KEY, 500),
        (nsdp.STIM_INFO_KEY, 700),
        (nsdp.STIMULI_KEY, 900),
        (nsdp.STIM_INFO_CSV_KEY, 650),
    ]:
        _write(root / "nsd" / key, size, rng)
    _write(root / "coco" / nsdp.COCO_ZIP_KEY, 400, rng)
    return root


def bucket_betas_keys(root: Path) -> list[str]:
    """Independent truth: betas/valid files on disk, as bucket keys."""
    nsd = root / "nsd"
    return sorted(
        p.relative_to(nsd).as_posix()
        for p in nsd.glob("nsddata_betas/ppdata/subj*/MNI/betas_fithrf/*_session*.nii.gz")
        if p.name.startswith(("betas_", "valid_"))
    )


def git(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", "-C", str(cwd), *args], capture_output=True, text=True, check=check
    )


def present(ds: Path) -> list[str]:
    return sorted(git(ds, "annex", "find", "--in", "here").stdout.split())


def head(ds: Path) -> str:
    return git(ds, "rev-parse", "HEAD").stdout.strip()


def new_dataset(path: Path) -> Path:
    import datalad.api as dl

    dl.create(str(path), result_renderer="disabled")
    return path


class Setup:
    def __init__(self, bucket: Path, mirror: Mirror, ds: Path) -> None:
        self.bucket, self.mirror, self.ds = bucket, mirror, ds
        self.nsd_url = f"{mirror.url}/nsd"
        self.coco_url = f"{mirror.url}/coco/{nsdp.COCO_ZIP_KEY}"
        self.nsd = ds / nsdp.NSD_DATASET
        self.coco = ds / nsdp.COCO_DATASET

    def register(self, ds: Path | None = None, **kw) -> dict[str, int]:
        return inputs.register_inputs(ds or self.ds, self.nsd_url, self.coco_url, **kw)


@pytest.fixture(scope="module")
def setup(git_env, tmp_path_factory: pytest.TempPathFactory):
    """A modifiable bucket served on loopback and a superdataset registered from it."""
    tmp = tmp_path_factory.mktemp("inputs")
    bucket = build_bucket(tmp / "bucket")
    with Mirror(bucket) as mirror:
        s = Setup(bucket, mirror, new_dataset(tmp / "ds"))
        s.added = s.register()
        yield s
        mirror.clear_faults()


def test_list_bucket_paginates(setup: Setup) -> None:
    prefix = "nsddata_betas/ppdata/"
    every = sorted(
        (p.relative_to(setup.bucket / "nsd").as_posix(), p.stat().st_size)
        for p in (setup.bucket / "nsd" / prefix).rglob("*")
        if p.is_file()
    )
    assert len(every) > 5
    assert inputs.list_bucket(setup.nsd_url, prefix, max_keys=2) == every
    assert inputs.list_bucket(setup.nsd_url, prefix) == every
    assert inputs.list_prefixes(setup.nsd_url, prefix) == [
        f"{prefix}subj{s:02d}/" for s in sorted(SESSIONS)
    ]
    assert inputs.list_bucket(setup.nsd_url, "no/such/prefix/") == []


def test_register_matches_bucket_without_download(setup: Setup) -> None:
    nsd, coco = setup.nsd, setup.coco
    registered = inventory.registered_keys(nsd)
    assert registered == bucket_betas_keys(setup.bucket)
    for s, n in SESSIONS.items():
        assert inventory.registered_sessions(nsd, s) == list(range(1, n + 1))
        assert inventory.registered_sessions(nsd, s, kind="valid") == list(range(1, n + 1))
    tracked = set(git(nsd, "ls-files").stdout.split())
    for key in inputs.NSD_EXTRA_KEYS:
        assert key in tracked
    assert "nsddata_betas/ppdata/subj01/MNI/betas_fithrf/R2.nii.gz" not in tracked
    assert git(coco, "ls-files", nsdp.COCO_ZIP_NAME).stdout.strip() == nsdp.COCO_ZIP_NAME
    extra = len(inputs.NSD_EXTRA_KEYS)  # design, stim info (pkl and csv), stimuli
    assert setup.added == {nsdp.NSD_DATASET: len(registered) + extra, nsdp.COCO_DATASET: 1}

    # Nothing downloaded, and each annexed file knows its URL and its size.
    assert present(nsd) == [] and present(coco) == []
    stimuli = nsd / nsdp.STIMULI_KEY
    assert stimuli.is_symlink() and not stimuli.exists()
    whereis = git(nsd, "annex", "whereis", nsdp.STIMULI_KEY).stdout
    assert f"{setup.nsd_url}/{nsdp.STIMULI_KEY}" in whereis
    # a single-part ETag is the MD5: the file is registered with its MD5E key from the start
    key = git(nsd, "annex", "lookupkey", nsdp.STIMULI_KEY).stdout.strip()
    stimuli_md5 = hashlib.md5((setup.bucket / "nsd" / nsdp.STIMULI_KEY).read_bytes()).hexdigest()
    assert key == f"MD5E-s900--{stimuli_md5}.hdf5"
    coco_whereis = git(coco, "annex", "whereis", nsdp.COCO_ZIP_NAME).stdout
    assert setup.coco_url in coco_whereis

    # The table is in git (not annexed) and lists exactly what is registered.
    table = nsd / inputs.TABLE_PATH
    assert not table.is_symlink()
    assert git(nsd, "ls-files", inputs.TABLE_PATH).stdout.strip() == inputs.TABLE_PATH
    with table.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["filename"] for r in rows] == sorted(registered + list(inputs.NSD_EXTRA_KEYS))
    for r in rows:
        data = (setup.bucket / "nsd" / r["filename"]).read_bytes()
        assert r["url"] == f"{setup.nsd_url}/{r['filename']}"
        assert int(r["size"]) == len(data)
        assert r["etag"] == hashlib.md5(data).hexdigest()  # the listing's ETag, pinned
        assert r["annex_key"] == f"et:MD5-s{len(data)}--{r['etag']}"

    # How it was built is in the history; the superdataset is clean and records both subdatasets.
    message = git(nsd, "log", "-1", "--format=%B").stdout
    assert f"python -m nsdprep inputs --nsd-url {setup.nsd_url} --coco-url {setup.coco_url}" in (
        message
    )
    assert (
        "datalad addurls --fast --ifexists skip --key '{annex_key}' --exclude-autometa annex_key "
        "-d inputs/nsd inputs/nsd/.nsdprep/addurls.csv '{url}' '{filename}'" in message
    )
    assert git(setup.ds, "status", "--porcelain").stdout == ""
    subs = git(setup.ds, "config", "-f", ".gitmodules", "--get-regexp", "path").stdout
    assert nsdp.NSD_DATASET in subs and nsdp.COCO_DATASET in subs


def test_register_is_idempotent_and_adds_new_sessions(setup: Setup) -> None:
    heads = [head(setup.ds), head(setup.nsd), head(setup.coco)]
    assert setup.register() == {nsdp.NSD_DATASET: 0, nsdp.COCO_DATASET: 0}
    assert [head(setup.ds), head(setup.nsd), head(setup.coco)] == heads

    # A session appears in the bucket later: it gets registered, nothing else changes.
    rng = random.Random(5)
    d = setup.bucket / BETAS_DIR.format(s=1)
    _write(d / "betas_session03.nii.gz", 2031, rng)
    _write(d / "valid_session03.nii.gz", 303, rng)
    before = set(git(setup.nsd, "ls-files").stdout.split())
    assert setup.register() == {nsdp.NSD_DATASET: 2, nsdp.COCO_DATASET: 0}
    after = set(git(setup.nsd, "ls-files").stdout.split())
    assert after - before == {
        "nsddata_betas/ppdata/subj01/MNI/betas_fithrf/betas_session03.nii.gz",
        "nsddata_betas/ppdata/subj01/MNI/betas_fithrf/valid_session03.nii.gz",
    }
    assert inventory.registered_sessions(setup.nsd, 1) == [1, 2, 3]
    assert head(setup.coco) == heads[2]
    assert head(setup.nsd) != heads[1] and head(setup.ds) != heads[0]
    # The superdataset records the subdataset's new commit.
    assert git(setup.ds, "ls-tree", "HEAD", nsdp.NSD_DATASET).stdout.split()[2] == head(setup.nsd)
    assert git(setup.ds, "status", "--porcelain").stdout == ""
    assert present(setup.nsd) == []


def test_get_one_subject_fsck_and_drop(setup: Setup) -> None:
    assert inputs.get_subjects(setup.ds, [2]) == [2]
    subj02 = [k for k in bucket_betas_keys(setup.bucket) if "/subj02/" in k]
    expected = sorted(subj02 + list(inputs.NSD_EXPERIMENT_KEYS))
    assert present(setup.nsd) == expected
    for key in expected:
        assert (setup.nsd / key).read_bytes() == (setup.bucket / "nsd" / key).read_bytes()
    fsck = git(setup.nsd, "annex", "fsck", check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr

    assert inputs.drop_subjects(setup.ds, [2]) == [2]
    assert present(setup.nsd) == sorted(inputs.NSD_EXPERIMENT_KEYS)
    assert not (setup.nsd / subj02[0]).exists()
    assert git(setup.ds, "status", "--porcelain").stdout == ""


def test_unregistered_subject_is_named(setup: Setup) -> None:
    with pytest.raises(DatasetStateError, match=r"subj05.*registered: subj01, subj02"):
        inputs.get_subjects(setup.ds, [2, 5])
    with pytest.raises(DatasetStateError, match="subj07"):
        inputs.drop_subjects(setup.ds, [7])


def test_changed_source_after_first_get_fails_and_keeps_nothing(setup: Setup) -> None:
    """The MD5 key pinned at registration: later downloads must match it."""
    key = "nsddata_betas/ppdata/subj01/MNI/betas_fithrf/betas_session01.nii.gz"
    inputs.get_subjects(setup.ds, [1])
    inputs.drop_subjects(setup.ds, [1])
    source = setup.bucket / "nsd" / key
    original = source.read_bytes()
    tampered = bytearray(original)
    tampered[100] ^= 0xFF  # same size: only the checksum can tell
    source.write_bytes(bytes(tampered))
    try:
        fsck = git(setup.nsd, "annex", "fsck", "--from", "web", key, check=False)
        assert fsck.returncode != 0
        with pytest.raises(RemoteError, match="Verification of content failed") as info:
            inputs.get_subjects(setup.ds, [1])
        assert str(info.value).count("\n") == 0, str(info.value)
        assert f"expected MD5 {hashlib.md5(original).hexdigest()}" in str(info.value)
        assert f"got MD5 {hashlib.md5(bytes(tampered)).hexdigest()}" in str(info.value)
        assert key not in present(setup.nsd)
        assert not (setup.nsd / key).exists()
        assert list((setup.nsd / ".git/annex/tmp").glob("*")) == []  # nothing kept
        # The rest of the subject arrived and verifies.
        assert "nsddata_betas/ppdata/subj01/MNI/betas_fithrf/betas_session02.nii.gz" in present(
            setup.nsd
        )
    finally:
        source.write_bytes(original)
    inputs.get_subjects(setup.ds, [1])
    assert (setup.nsd / key).read_bytes() == original
    assert git(setup.nsd, "annex", "fsck", key, check=False).returncode == 0
    inputs.drop_subjects(setup.ds, [1])


def test_changed_on_server_before_first_get(setup: Setup) -> None:
    """A size change on the server is caught before anything is downloaded; same size, other
    bytes are refused by the MD5 key pinned from the listing (before, a VURL key took them)."""
    rng = random.Random(9)
    d = setup.bucket / BETAS_DIR.format(s=3)  # a subject that appears later, used only here
    _write(d / "betas_session01.nii.gz", 2044, rng)
    _write(d / "valid_session01.nii.gz", 304, rng)
    assert setup.register()[nsdp.NSD_DATASET] == 2
    assert inventory.registered_subjects(setup.nsd) == [1, 2, 3]
    bigger, same = (
        f"nsddata_betas/ppdata/subj03/MNI/betas_fithrf/{k}_session01.nii.gz"
        for k in ("betas", "valid")
    )
    originals = {k: (setup.bucket / "nsd" / k).read_bytes() for k in (bigger, same)}
    (setup.bucket / "nsd" / bigger).write_bytes(originals[bigger] + b"extra")
    (setup.bucket / "nsd" / same).write_bytes(originals[same][::-1])
    try:
        with pytest.raises(RemoteError, match=r"registered 2044 bytes, .* has 2049"):
            inputs.get_subjects(setup.ds, [3])
        assert not [k for k in present(setup.nsd) if "/subj03/" in k]
        (setup.bucket / "nsd" / bigger).write_bytes(originals[bigger])
        with pytest.raises(RemoteError, match=rf"{same}: Verification of content failed"):
            inputs.get_subjects(setup.ds, [3])
        assert same not in present(setup.nsd)
        assert (setup.nsd / bigger).read_bytes() == originals[bigger]
    finally:
        for k, data in originals.items():
            (setup.bucket / "nsd" / k).write_bytes(data)
    # nothing was recorded from the wrong bytes: the real file is accepted
    inputs.get_subjects(setup.ds, [3])
    assert (setup.nsd / same).read_bytes() == originals[same]
    assert git(setup.nsd, "annex", "fsck", same, check=False).returncode == 0
    inputs.drop_subjects(setup.ds, [3])


def test_size_check_after_get_moves_wrong_content_away(setup: Setup) -> None:
    """Safety net if the server changes between the check and the download."""
    key = "nsddata_betas/ppdata/subj02/MNI/betas_fithrf/valid_session01.nii.gz"
    obj = git(
        setup.nsd,
        "annex",
        "contentlocation",
        git(setup.nsd, "annex", "lookupkey", key).stdout.strip(),
        check=False,
    )
    assert obj.returncode != 0  # not present
    inputs.get_subjects(setup.ds, [2])
    # Make the local content the wrong size behind git-annex's back, as a bad download would.
    path = (setup.nsd / key).resolve()
    path.chmod(0o644)
    path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(RemoteError, match="does not match the registered size"):
        inputs._verify_sizes(setup.nsd, [key])
    assert key not in present(setup.nsd)
    inputs.drop_subjects(setup.ds, [2])


def test_download_cut_short_fails_and_keeps_nothing(setup: Setup) -> None:
    key = "nsddata_betas/ppdata/subj01/MNI/betas_fithrf/betas_session02.nii.gz"
    setup.mirror.truncate(f"nsd/{key}", 100)
    try:
        with pytest.raises(RemoteError, match="ResponseBodyTooShort"):
            inputs.get_subjects(setup.ds, [1])
        assert key not in present(setup.nsd)
        assert not (setup.nsd / key).exists()
    finally:
        setup.mirror.clear_faults()
    # Once the server behaves, the same call completes (the partial download is resumed).
    inputs.get_subjects(setup.ds, [1])
    assert (setup.nsd / key).read_bytes() == (setup.bucket / "nsd" / key).read_bytes()
    inputs.drop_subjects(setup.ds, [1])


def test_access_denied_names_the_likely_causes(setup: Setup) -> None:
    heads = [head(setup.ds), head(setup.nsd)]
    setup.mirror.deny("nsd/*")
    try:
        with pytest.raises(
            RemoteError,
            match=r"403.*public.*restricted or not yet released object, or a wrong key or URL",
        ):
            setup.register()
        setup.mirror.clear_faults()
        setup.mirror.deny("nsd/*/subj01/*/betas_session01.nii.gz")
        with pytest.raises(RemoteError, match=r"not an S3 permission"):
            inputs.get_subjects(setup.ds, [1])
    finally:
        setup.mirror.clear_faults()
    assert [head(setup.ds), head(setup.nsd)] == heads
    denied = "nsddata_betas/ppdata/subj01/MNI/betas_fithrf/betas_session01.nii.gz"
    assert denied not in present(setup.nsd) and not (setup.nsd / denied).exists()
    inputs.drop_subjects(setup.ds, [1])


def test_connection_refused_names_url(setup: Setup, tmp_path: Path) -> None:
    with Mirror(setup.bucket) as m:
        dead = m.url
    with pytest.raises(RemoteError, match=rf"cannot reach {dead}/nsd/.*connection refused"):
        inputs.register_inputs(setup.ds, f"{dead}/nsd", setup.coco_url)


def test_empty_listing_and_wrong_bucket(git_env, tmp_path: Path) -> None:
    bucket = tmp_path / "bucket"
    for key in inputs.NSD_EXTRA_KEYS:
        _write(bucket / "nsd" / key, 10, random.Random(1))
    _write(bucket / "coco" / nsdp.COCO_ZIP_KEY, 10, random.Random(2))
    ds = new_dataset(tmp_path / "ds")
    with Mirror(bucket) as m:
        coco = f"{m.url}/coco/{nsdp.COCO_ZIP_KEY}"
        with pytest.raises(RemoteError, match=r"no betas found under .*nsddata_betas/ppdata/"):
            inputs.register_inputs(ds, f"{m.url}/nsd", coco)
        with pytest.raises(RemoteError, match=r"HTTP 404.*NoSuchBucket"):
            inputs.register_inputs(ds, f"{m.url}/nsdx", coco)
        with pytest.raises(RemoteError, match=r"missing\.zip: HTTP 404"):
            inputs.coco_table(f"{m.url}/coco/annotations/missing.zip")
    # Nothing was created on failure.
    assert not (ds / "inputs").exists()


def test_get_in_fresh_clone_installs_subdataset(setup: Setup, tmp_path: Path) -> None:
    import datalad.api as dl

    clone = tmp_path / "clone"
    dl.clone(source=str(setup.ds), path=str(clone), result_renderer="disabled")
    assert not (clone / nsdp.NSD_DATASET / ".git").exists()
    inputs.get_subjects(clone, [1])
    nsd = clone / nsdp.NSD_DATASET
    assert present(nsd) == sorted(
        [k for k in bucket_betas_keys(setup.bucket) if "/subj01/" in k]
        + list(inputs.NSD_EXPERIMENT_KEYS)
    )


def test_register_synthetic_mirror(git_env, mirror, synth_root: Path, tmp_path: Path) -> None:
    """The shared synthetic tree registers completely, through the CLI as `make inputs` calls it."""
    from nsdprep.cli import main

    ds = new_dataset(tmp_path / "ds")
    nsd_url, coco_url = f"{mirror.url}/nsd", f"{mirror.url}/coco/{nsdp.COCO_ZIP_KEY}"
    rc = main(["inputs", "--nsd-url", nsd_url, "--coco-url", coco_url, "--dataset", str(ds)])
    assert rc == 0
    nsd = ds / nsdp.NSD_DATASET
    assert inventory.registered_keys(nsd) == bucket_betas_keys(synth_root)
    tracked = set(git(nsd, "ls-files").stdout.split())
    assert set(inputs.NSD_EXTRA_KEYS) <= tracked
    assert present(nsd) == [] and present(ds / nsdp.COCO_DATASET) == []


@pytest.mark.slow
def test_subdataset_killed_inside_git_init_is_created_again(
    git_env, mirror, synth_root: Path, tmp_path: Path
) -> None:
    """A ``.git`` without ``HEAD`` (``git init`` killed) is no repository: git would use the
    dataset above it. ``make inputs`` must create the subdataset again, not reset the dataset."""
    ds = new_dataset(tmp_path / "ds")
    nsd_url, coco_url = f"{mirror.url}/nsd", f"{mirror.url}/coco/{nsdp.COCO_ZIP_KEY}"
    inputs.register_inputs(ds, nsd_url, coco_url)
    coco = ds / nsdp.COCO_DATASET
    inputs._rmtree(coco)
    git(ds, "rm", "-q", "-r", "--cached", nsdp.COCO_DATASET)
    git(ds, "config", "-f", ".gitmodules", "--remove-section", f"submodule.{nsdp.COCO_DATASET}")
    git(ds, "commit", "-q", "-a", "-m", "as if inputs/coco had never been created")
    (coco / ".git" / "objects").mkdir(parents=True)  # what a kill inside `git init` leaves
    (ds / "notes.txt").write_text("the user's own file, not to be cleaned away\n")
    inputs.register_inputs(ds, nsd_url, coco_url)
    assert dataset.is_own_repository(coco)
    assert (coco / nsdp.COCO_ZIP_KEY.rsplit("/", 1)[-1]).is_symlink()
    assert (ds / "notes.txt").read_text() == "the user's own file, not to be cleaned away\n"


# ------------------------------------------------------------------------------------------------
# odd keys in the listing


def _odd_bucket(root: Path) -> Path:
    """The tiny bucket (subj01: 2 sessions, subj02: 3) plus ``root/ds``, a new dataset."""
    build_bucket(root / "bucket")
    new_dataset(root / "ds")
    return root / "bucket"


def _registered_betas(ds: Path) -> list[str]:
    return inventory.registered_keys(ds / nsdp.NSD_DATASET)


def _skip_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "do not fit" in r.getMessage()]


def test_key_with_a_trailing_newline_is_skipped_with_one_warning(
    git_env, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``$`` matches before a final newline: such a key must not be taken for a betas file."""
    bucket = _odd_bucket(tmp_path)
    good = bucket_betas_keys(bucket)
    odd = bucket / BETAS_DIR.format(s=1) / "betas_session03.nii.gz\n"
    odd.write_bytes(b"not a betas file")
    caplog.set_level("WARNING")
    with Mirror(bucket) as m:
        inputs.register_inputs(tmp_path / "ds", f"{m.url}/nsd", f"{m.url}/coco/{nsdp.COCO_ZIP_KEY}")
    assert _registered_betas(tmp_path / "ds") == good
    warnings = _skip_warnings(caplog)
    assert len(warnings) == 1 and "skipped 1 listed key" in warnings[0], warnings
    assert "\n" not in warnings[0] and "betas_session03.nii.gz\\n" in warnings[0]
    for repo in (tmp_path / "ds", tmp_path / "ds" / nsdp.NSD_DATASET):
        assert git(repo, "status", "--porcelain").stdout == ""


#: Keys a hostile listing may hold: S3 keys are any UTF-8 text.
HOSTILE_KEYS = (
    "../../x",
    "/abs/betas_session01.nii.gz",
    "nsddata_betas/ppdata/subj01/../../../etc",
    "nsddata_betas/ppdata/subj01/MNI/betas_fithrf/../../../../../../x/betas_session04.nii.gz",
    "nsddata_betas/ppdata/subj01/MNI/betas_fithrf//betas_session05.nii.gz",
    "nsddata_betas/ppdata/subj01/MNI/betas_fithrf/./betas_session06.nii.gz",
    "nsddata_betas/ppdata/subj01/MNI/betas_fithrf/sub/betas_session07.nii.gz",
    "nsddata_betas/ppdata/subj01/MNI/betas_fithrf/betas_session08.nii.gz/../../../../x",
    "nsddata_betas/ppdata/../betas_session09.nii.gz",
    "nsddata_betas/ppdata/subj01\n/MNI/betas_fithrf/betas_session10.nii.gz",
)
#: How many of them lie where the listing looks: under ppdata/ (as a folder) or a betas folder.
HOSTILE_SEEN = 7


def test_odd_subjects_and_hostile_keys_never_stop_the_others_nor_leave_inputs(
    git_env, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``subj100/``, ``subj00/``, a folder without betas, and keys a hostile listing may hold:
    skipped with one warning that counts them; the real subjects are registered; nothing is
    written outside ``inputs/``."""
    bucket = _odd_bucket(tmp_path)
    good = bucket_betas_keys(bucket)
    for folder in ("subj100", "subjXY", "subj00", "subj03"):  # subj03: no betas files at all
        d = bucket / "nsd/nsddata_betas/ppdata" / folder / "MNI/betas_fithrf"
        d.mkdir(parents=True)
        (d / ("R2.nii.gz" if folder == "subj03" else "betas_session01.nii.gz")).write_bytes(b"x")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if ".git" not in p.parts)
    caplog.set_level("WARNING")
    with Mirror(bucket, objects={f"nsd/{k}": b"hostile" for k in HOSTILE_KEYS}) as m:
        listed = [k for k, _ in inputs.list_bucket(f"{m.url}/nsd", "")]
        assert set(HOSTILE_KEYS) <= set(listed)
        inputs.register_inputs(tmp_path / "ds", f"{m.url}/nsd", f"{m.url}/coco/{nsdp.COCO_ZIP_KEY}")
    assert _registered_betas(tmp_path / "ds") == good
    assert inventory.registered_subjects(tmp_path / "ds" / nsdp.NSD_DATASET) == [1, 2]
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if ".git" not in p.parts)
    new = [p for p in after if p not in before]
    outside = [p for p in new if p.parts[:2] != ("ds", "inputs") and p != Path("ds/.gitmodules")]
    assert new and outside == [], outside
    assert not (tmp_path / "x").exists() and not (tmp_path.parent / "x").exists()
    warnings = _skip_warnings(caplog)
    assert len(warnings) == 1 and f"skipped {4 + HOSTILE_SEEN} listed" in warnings[0], warnings
    assert "\n" not in warnings[0]
    assert git(tmp_path / "ds", "status", "--porcelain").stdout == ""
