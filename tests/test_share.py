"""Sharing: ``make publish`` to a RIA store, then a colleague (own folder, own HOME) clones it.

The colleague flow is played once by the demo driver (``demo_built``); these tests check what it left:
what the colleague has, what the store holds, and that a second publish adds nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import git_out
from nsdprep.core import nsd as nsd_keys
from nsdprep.testing.demo import PIPELINE, loopback_env

VENV = Path(sys.executable).parent.parent
pytestmark = pytest.mark.datalad


@pytest.fixture(scope="module")
def origin(demo_built: Path) -> Path:
    return demo_built


@pytest.fixture(scope="module")
def mate(demo_built: Path) -> Path:
    return demo_built.parent / "colleague"


@pytest.fixture(scope="module")
def facts(demo_built: Path) -> dict:
    return json.loads((demo_built.parent / "share.json").read_text())


def _present(ds: Path, where: str = ".") -> set[str]:
    return set(git_out(ds, "annex", "find", "--", where).splitlines())


def test_colleague_got_only_subject_02_curated(mate: Path) -> None:
    wanted = {
        f"derivatives/curated_3mm/sub-02{suffix}"
        for suffix in (
            ".nii.gz",
            "_X.npy",
            "_mask.nii.gz",
            "_labels.npy",
            "_runs.npy",
            "_trials.tsv",
        )
    } | {f"derivatives/3mm/subj01/betas_session0{n}.nii.gz" for n in (1, 2, 3)}
    got = _present(mate, "derivatives")
    assert wanted <= got
    # anything else present shares its annex key (same content) with a fetched file, e.g. the
    # grey-matter mask, identical for every subject on one grid
    keys = dict(
        line.split(" ", 1)[::-1]
        for line in git_out(
            mate, "annex", "find", "--format=${key} ${file}\n", "derivatives"
        ).splitlines()
    )
    assert {keys[p] for p in got - wanted} <= {keys[p] for p in wanted}, got - wanted
    # the rest is registered, not present
    assert (mate / "derivatives/curated_3mm/sub-01.nii.gz").is_symlink()
    assert not (mate / "derivatives/curated_3mm/sub-01.nii.gz").exists()


def test_colleague_fetched_subject_01_inputs_from_the_web_urls(mate: Path, origin: Path) -> None:
    nsd = mate / "inputs/nsd"
    got = _present(nsd)
    betas = {p for p in got if p.startswith("nsddata_betas/")}
    ours = {p for p in betas if "/subj01/" in p}
    assert ours, got
    # another subject's file is present only if its content is one of subject 01's (same key:
    # the synthetic valid masks of a session are alike across subjects)
    keys = dict(
        line.split(" ", 1)[::-1]
        for line in git_out(nsd, "annex", "find", "--format=${key} ${file}\n").splitlines()
    )
    assert {keys[p] for p in betas - ours} <= {keys[p] for p in ours}, betas - ours
    assert nsd_keys.EXPDESIGN_KEY in got and nsd_keys.STIM_INFO_CSV_KEY in got
    assert nsd_keys.STIM_INFO_KEY not in got  # the pickle is never fetched
    # the store holds no input content: the subdataset's only source is the web (the mirror)
    whereis = json.loads(
        git_out(nsd, "annex", "whereis", "--json", "--", sorted(betas)[0]).splitlines()[0]
    )
    remotes = {w["description"] for w in whereis["whereis"]}
    assert "web" in remotes and not any("ria" in r for r in remotes), remotes
    assert git_out(nsd, "config", "remote.origin.url").startswith(str(mate.parent / "ria-store"))


def test_colleague_rerun_reproduced_identical_keys(mate: Path, origin: Path, facts: dict) -> None:
    assert facts["rerun_commit"]
    assert not facts["rerun_new_commit"]
    # nothing committed on top of what was cloned from the store
    assert git_out(mate, "rev-parse", "HEAD") == git_out(mate, "rev-parse", "@{upstream}")
    keys = git_out(mate, "ls-files", "-s", "--", "derivatives/3mm/subj01")
    assert keys and keys == git_out(origin, "ls-files", "-s", "--", "derivatives/3mm/subj01")
    assert facts["curated_up_to_date"]
    assert git_out(mate, "status", "--porcelain") == ""


def test_clone_is_small_until_content_is_fetched(facts: dict) -> None:
    # git history only; the fetched curated files of one subject are what grows .git
    assert facts["git_du_before_get"] < 5_000_000
    assert facts["git_du_after_get"] > facts["git_du_before_get"]


def test_demo_times_every_step(demo_built: Path) -> None:
    """``timings.json``: one row per step the demo took, in order, each with its seconds."""
    rows = json.loads((demo_built.parent / "timings.json").read_text())
    steps = [r["step"] for r in rows]
    assert steps[:3] == ["synthetic data", "clone", "make inputs"]
    assert steps[3:-1] == [f"make {t}" for t in PIPELINE]
    assert steps[-1] == "publish + colleague"
    assert all(r["seconds"] > 0 for r in rows)


def test_second_publish_pushes_nothing_new(origin: Path, facts: dict, git_env) -> None:
    store = Path(facts["ria"].removeprefix("ria+file://"))

    def snapshot() -> list[tuple[str, int]]:
        return sorted(
            (p.relative_to(store).as_posix(), p.stat().st_size)
            for p in store.rglob("*")
            if p.is_file() and "/logs/" not in p.as_posix()
        )

    env = {**loopback_env(git_env), "PATH": f"{VENV / 'bin'}:{git_env['PATH']}"}

    def publish() -> None:
        subprocess.run(
            ["make", "-C", str(origin), "publish", f"VENV={VENV}", f"RIA={facts['ria']}"],
            check=True, env=env, capture_output=True,
        )  # fmt: skip

    publish()  # other tests may have added commits to the origin since the demo published it
    before = snapshot()
    assert any("/annex/objects/" in p for p, _ in before)  # derivative content is in the store
    head = git_out(origin, "rev-parse", "HEAD").strip()
    branch = git_out(origin, "rev-parse", "--abbrev-ref", "HEAD").strip()
    assert head in git_out(
        store / "alias/nsdprep", "rev-parse", f"refs/heads/{branch}"
    )  # up to date
    publish()
    assert snapshot() == before


def test_publish_without_ria_url_says_how(origin: Path, git_env) -> None:
    env = {**git_env, "PATH": f"{VENV / 'bin'}:{git_env['PATH']}"}
    proc = subprocess.run(
        ["make", "-C", str(origin), "publish", f"VENV={VENV}"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "make publish needs RIA=<store URL>" in proc.stdout + proc.stderr


def test_publish_to_another_store_is_refused(origin: Path, facts: dict, git_env, tmp_path) -> None:
    """``make publish RIA=<another store>`` with the ``ria`` sibling in place: one line, nothing made."""
    other = tmp_path / "other-store"
    env = {**git_env, "PATH": f"{VENV / 'bin'}:{git_env['PATH']}"}
    before = git_out(origin, "config", "--get-regexp", r"^remote\.")
    proc = subprocess.run(
        ["make", "-C", str(origin), "publish", f"VENV={VENV}", f"RIA=ria+file://{other}"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode != 0, proc.stdout[-1500:]
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("nsdprep build: error:")]
    assert len(ours) == 1 and facts["ria"] in ours[0] and "RIA_SIBLING=" in ours[0], ours
    assert not other.exists()
    assert git_out(origin, "config", "--get-regexp", r"^remote\.") == before
