"""End to end, in a temporary clone: make inputs → coco-labels → 3mm → curated → decode, then rerun.

Everything a user would run, through the Makefile, against synthetic data on a loopback mirror. The
checks recompute what they compare against from the raw inputs (COCO annotations via pycocotools, 3 mm
volumes via nibabel), never from the pipeline's own intermediate results.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import scipy.io

from conftest import git_out
from nsdprep.testing.demo import TEST_SPEC, loopback_env, user_clone

LAYOUT = TEST_SPEC
VENV = Path(sys.executable).parent.parent
pytestmark = pytest.mark.datalad


@pytest.fixture(scope="module")
def built(demo_built: Path) -> Path:
    return demo_built


def _coco_label(synth: Path, coco_id: int) -> str:
    """Supercategory of the largest-area annotation of ``coco_id``, computed with pycocotools."""
    from pycocotools.coco import COCO

    if not hasattr(_coco_label, "cache"):
        cocos = []
        with zipfile.ZipFile(synth / "coco/annotations/annotations_trainval2017.zip") as zf:
            for split in ("train2017", "val2017"):
                dest = synth / f"instances_{split}.json"
                dest.write_bytes(zf.read(f"annotations/instances_{split}.json"))
                cocos.append(COCO(str(dest)))
        _coco_label.cache = cocos
    for coco in _coco_label.cache:
        if coco_id in coco.imgs:
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[coco_id]))
            if not anns:
                return "unknown"
            best = max(range(len(anns)), key=lambda i: (anns[i]["area"], -i))
            return coco.loadCats([anns[best]["category_id"]])[0]["supercategory"]
    raise KeyError(coco_id)


def test_history_has_one_run_record_per_step(built: Path) -> None:
    log = git_out(built, "log", "--format=%s")
    assert "[nsdprep] coco-labels (inputs " in log
    for subject in range(1, len(LAYOUT.sessions) + 1):
        assert f"[nsdprep] 3mm subj{subject:02d} (inputs " in log
    assert "[nsdprep] curated sub-01" in log
    assert "[nsdprep] decode (inputs " in log
    assert git_out(built, "status", "--porcelain") == ""


def test_curated_trials_match_raw_inputs(built: Path) -> None:
    synth = built.parent / "synth"
    nsd = built / "inputs/nsd"
    design = scipy.io.loadmat(nsd / "nsddata/experiments/nsd/nsd_expdesign.mat")
    stim = pd.read_csv(nsd / "nsddata/experiments/nsd/nsd_stim_info_merged.csv", index_col=0)
    per_session = LAYOUT.layout.runs_per_session * sum(LAYOUT.layout.trials_per_run) // 2
    counts = {}
    rng = np.random.default_rng(0)
    for subject in range(1, len(LAYOUT.sessions) + 1):
        cur = built / "derivatives/curated_3mm"
        img = nib.load(cur / f"sub-{subject:02d}.nii.gz")
        labels = np.load(cur / f"sub-{subject:02d}_labels.npy", allow_pickle=False)
        runs = np.load(cur / f"sub-{subject:02d}_runs.npy", allow_pickle=False)
        trials = pd.read_csv(cur / f"sub-{subject:02d}_trials.tsv", sep="\t")
        counts[subject] = len(labels)
        assert img.shape[3] == len(labels) == len(runs) == len(trials)
        assert "unknown" not in set(labels)
        for k in rng.choice(len(labels), size=min(12, len(labels)), replace=False):
            row = trials.iloc[k]
            t = (row.session - 1) * per_session + row.trial_in_session - 1
            assert row.trial == t + 1
            nsd_id = (
                int(design["subjectim"][subject - 1, int(design["masterordering"][0, t]) - 1]) - 1
            )
            assert row.nsdId == nsd_id
            coco_id = int(stim.iloc[nsd_id]["cocoId"])
            assert row.cocoId == coco_id
            assert labels[k] == _coco_label(synth, coco_id)
            # the run, from an independent count over the alternating run lengths
            bounds = np.cumsum(
                [LAYOUT.layout.trials_per_run[r % 2] for r in range(LAYOUT.layout.runs_per_session)]
            )
            run_in_session = (
                int(np.searchsorted(bounds, row.trial_in_session - 1, side="right")) + 1
            )
            assert runs[k] == (row.session - 1) * LAYOUT.layout.runs_per_session + run_in_session
            src = nib.load(
                built / f"derivatives/3mm/subj{subject:02d}/betas_session{row.session:02d}.nii.gz"
            )
            np.testing.assert_array_equal(
                np.asarray(img.dataobj[..., k]),
                np.asarray(src.dataobj[..., row.trial_in_session - 1]),
            )
    assert len(set(counts.values())) == 1, counts


def test_decoding_beats_chance(built: Path) -> None:
    results = json.loads((built / "derivatives/decoding/results.json").read_text())
    assert (built / "derivatives/decoding/report.md").exists()
    subjects = results["subjects"]
    assert sorted(subjects) == [f"sub-{s:02d}" for s in range(1, len(LAYOUT.sessions) + 1)]
    for res in subjects.values():
        # planted signal, run-grouped CV: well above 1/n_classes on every subject
        assert res["mean_balanced_accuracy"] > res["chance_theoretical"] + 0.1, res
        assert res["mean_balanced_accuracy"] > res["dummy_chance"] + 0.1, res
        # no permutation within runs reaches it: p is the smallest the permutation count allows
        assert res["permutation_p_value"] == pytest.approx(1 / (LAYOUT.permutations + 1)), res


def test_second_make_does_nothing(built: Path, git_env) -> None:
    head = git_out(built, "rev-parse", "HEAD")
    env = loopback_env(git_env)
    for target in ("coco-labels", "3mm", "curated"):
        subprocess.run(
            ["make", "-C", str(built), target, f"VENV={VENV}", *LAYOUT.make_vars()],
            check=True,
            env=env,
        )
    assert git_out(built, "rev-parse", "HEAD") == head


def test_byte_neutral_options_leave_every_step_up_to_date(built: Path, git_env) -> None:
    """JOBS, DROP and PREFETCH change no byte: after a default run, every step is up to date."""
    head = git_out(built, "rev-parse", "HEAD")
    env = loopback_env(git_env)
    subjects = range(1, len(LAYOUT.sessions) + 1)
    for target, extra in (("3mm", ["DROP=1"]), ("3mm", ["JOBS=1"]),
                          ("3mm", ["DROP=1", "PREFETCH=3"]), ("decode", ["JOBS=1"])):  # fmt: skip
        proc = subprocess.run(
            ["make", "-C", str(built), target, f"VENV={VENV}", *LAYOUT.make_vars(), *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout
        names = [f"3mm subj{s:02d}" for s in subjects] if target == "3mm" else ["decode"]
        for name in names:
            assert f"{name}: up to date" in proc.stdout, (extra, proc.stdout)
    assert git_out(built, "rev-parse", "HEAD") == head


@pytest.mark.parametrize("step", ["coco-labels", "3mm subj02", "curated", "decode"])
def test_rerun_reproduces_identical_checksums(built: Path, git_env, step: str) -> None:
    commit = git_out(built, "log", "-F", f"--grep=[nsdprep] {step}", "--format=%H", "-n1").strip()
    assert commit
    changed = git_out(
        built, "diff-tree", "--no-commit-id", "--name-only", "-r", commit, "--"
    ).split()
    assert changed
    before = git_out(built, "ls-files", "-s", "--", *changed)
    head = git_out(built, "rev-parse", "HEAD")
    env = {**loopback_env(git_env), "PYTHONPATH": str(built / "code"), "OMP_NUM_THREADS": "1"}
    subprocess.run(["datalad", "rerun", commit], cwd=built, check=True, env=env)
    assert git_out(built, "ls-files", "-s", "--", *changed) == before
    assert git_out(built, "rev-parse", "HEAD") == head  # identical outputs: no new commit


# ------------------------------------------------------------------------------------------------
# The clone is an annex dataset: derivatives are annexed and locked, never committed into git.

#: Small text that `.gitattributes` keeps in git.
IN_GIT = ("README.md", "dataset_description.json", "report.md")


def _tracked(ds: Path, where: str) -> dict[str, str]:
    """``path -> git mode`` of every tracked file under ``where``."""
    out = git_out(ds, "ls-files", "-s", "--", where)
    return {line.split("\t", 1)[1]: line.split()[0] for line in out.splitlines()}


def test_user_clone_had_no_annex_branch(built: Path) -> None:
    # The setting under test: a plain `git clone` of the project, which carries no git-annex branch;
    # only the make targets can have initialised the annex.
    origin_refs = git_out(built, "for-each-ref", "--format=%(refname)", "refs/remotes/origin")
    assert "git-annex" not in origin_refs
    assert git_out(built, "config", "--local", "annex.uuid").strip()


def test_user_clone_of_a_detached_checkout_is_on_a_branch(tmp_path: Path, git_env) -> None:
    """`make demo` from a checked-out tag: the scratch clone has a branch to publish."""
    source = tmp_path / "source"
    subprocess.run(["git", "init", "--quiet", str(source)], check=True, env=git_env)
    (source / "f.txt").write_text("x\n")
    for args in (
        ("add", "f.txt"),
        ("commit", "--quiet", "-m", "one"),
        ("tag", "v1"),
        ("commit", "--quiet", "--allow-empty", "-m", "two"),
    ):  # no branch points at v1
        subprocess.run(["git", "-C", str(source), *args], check=True, env=git_env)
    subprocess.run(["git", "-C", str(source), "checkout", "--quiet", "v1"], check=True, env=git_env)
    dest = user_clone(source, tmp_path / "clone", git_env, overlay=False)
    assert git_out(dest, "symbolic-ref", "--short", "HEAD").strip() == "main"
    assert git_out(dest, "rev-parse", "HEAD") == git_out(source, "rev-parse", "HEAD")


def test_every_derivative_binary_is_annexed_and_locked(built: Path) -> None:
    tracked = _tracked(built, "derivatives")
    binaries = sorted(p for p in tracked if Path(p).name not in IN_GIT)
    texts = sorted(p for p in tracked if Path(p).name in IN_GIT)
    assert len(binaries) >= 30 and len(texts) == 3, tracked
    annexed = set(git_out(built, "annex", "find", "--include=*", "derivatives").splitlines())
    assert annexed == set(binaries)
    annex_objects = (built / ".git/annex/objects").resolve()
    for rel in binaries:
        assert tracked[rel] == "120000", f"{rel} is committed into git (mode {tracked[rel]})"
        path = built / rel
        assert path.is_symlink() and path.resolve().is_relative_to(annex_objects), rel
        assert not path.resolve().stat().st_mode & 0o222, f"{rel}: annexed content is writable"
    for rel in texts:
        assert tracked[rel] == "100644" and not (built / rel).is_symlink(), rel
    found = [p for p in (built / "derivatives").rglob("*") if p.is_file() and not p.is_symlink()]
    assert sorted(p.name for p in found) == sorted(Path(t).name for t in texts)


def test_git_history_grows_by_kilobytes_not_by_the_derivatives(built: Path) -> None:
    annexed_bytes = sum((built / p).stat().st_size for p in _tracked(built, "derivatives"))
    # everything the pipeline added to git: history since the clone, plus the git-annex branch
    first = git_out(built, "log", "--reverse", "--format=%H", "--", ".gitmodules").split()[0]
    listing = git_out(built, "rev-list", "--objects", f"{first}^..HEAD", "git-annex")
    ids = "\n".join(line.split()[0] for line in listing.splitlines()) + "\n"
    sizes = subprocess.run(
        ["git", "-C", str(built), "cat-file", "--batch-check=%(objectsize)"],
        input=ids, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    git_bytes = sum(map(int, sizes))
    assert git_bytes < 100_000, git_bytes
    assert git_bytes < annexed_bytes / 20, (git_bytes, annexed_bytes)


# ------------------------------------------------------------------------------------------------
# Analysis-ready access: the matrix and load_curated on the demo dataset.


def test_load_curated_matches_the_4d_file(built: Path) -> None:
    import nsdprep

    for subject in range(1, len(LAYOUT.sessions) + 1):
        d = nsdprep.load_curated(subject, dataset=built)
        cur = built / "derivatives/curated_3mm"
        img = nib.load(cur / f"sub-{subject:02d}.nii.gz")
        data = np.asarray(img.dataobj)
        mask = np.asarray(d.mask_img.dataobj) != 0
        assert isinstance(d.X, np.memmap) and not d.X.flags.writeable
        assert d.X.shape == (data.shape[3], int(mask.sum())) and mask.sum() > 100
        np.testing.assert_array_equal(np.asarray(d.X), data[mask].T)
        assert not data[~mask].any()  # the 3 mm stage left nothing outside grey matter
        np.testing.assert_array_equal(
            d.labels, np.load(cur / f"sub-{subject:02d}_labels.npy", allow_pickle=False)
        )
        np.testing.assert_array_equal(d.runs, d.trials["run"].to_numpy())
        back = d.to_img([0, len(d.labels) - 1])
        np.testing.assert_allclose(back.affine, img.affine)
        np.testing.assert_array_equal(np.asarray(back.dataobj), data[..., [0, -1]])


def test_readme_example_runs_as_written(built: Path) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Analysis-ready access", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) == 5
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=built, capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": str(built / "code")},
    )  # fmt: skip
    score = float(proc.stdout.strip())
    assert 1 / 12 + 0.1 < score <= 1.0, proc.stdout  # planted signal: well above chance


def test_load_curated_names_datalad_get_when_content_is_absent(built: Path) -> None:
    import nsdprep
    from nsdprep.core.errors import MissingInputError

    mate = built.parent / "colleague"  # fetched sub-02 only
    assert nsdprep.load_curated(2, dataset=mate).X.shape[0] > 0
    with pytest.raises(MissingInputError, match=r"datalad get derivatives/curated_3mm/sub-01\*"):
        nsdprep.load_curated(1, dataset=mate)


def test_decode_reads_the_matrix_with_identical_results(built: Path, tmp_path: Path) -> None:
    """The recorded decode read the matrix; streaming the 4D file gives the same data and results."""
    from nsdprep.core.nsd import curated_files
    from nsdprep.stages.decode.data import load_masked

    cur = built / "derivatives/curated_3mm"
    stream = tmp_path / "curated"  # the same subject without its matrix: decode streams the 4D file
    stream.mkdir()
    for suffix in (".nii.gz", "_mask.nii.gz", "_labels.npy", "_runs.npy", "_trials.tsv"):
        shutil.copy(cur / f"sub-02{suffix}", stream / f"sub-02{suffix}")
    trials = np.arange(0, 80, 3)
    X_matrix, mask_matrix, _ = load_masked(curated_files(2, cur), trials)
    X_stream, mask_stream, _ = load_masked(curated_files(2, stream), trials)
    np.testing.assert_array_equal(mask_matrix, mask_stream)
    np.testing.assert_array_equal(X_matrix, X_stream)
    out = tmp_path / "decoding"
    env = {**os.environ, "PYTHONPATH": str(built / "code"), "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "nsdprep", "decode", "--curated", str(stream), "--out", str(out),
         "--subjects", "2", "--permutations", str(LAYOUT.permutations)],
        check=True, env=env, capture_output=True,
    )  # fmt: skip
    recorded = json.loads((built / "derivatives/decoding/results.json").read_text())
    streamed = json.loads((out / "results.json").read_text())
    assert streamed["subjects"]["sub-02"] == recorded["subjects"]["sub-02"]
