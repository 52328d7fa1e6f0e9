"""``make demo``: the whole pipeline, offline, on synthetic data, in a scratch clone.

Generates synthetic NSD + COCO data in the real formats, serves it on 127.0.0.1 like the real
buckets, clones this dataset into a scratch folder (the user's checkout is never touched), and runs
``make inputs``, ``make coco-labels``, ``make 3mm``, ``make curated`` and ``make decode`` there with the
mirror's URLs. The same function drives the end-to-end tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nsdprep.core.nsd import Layout
from nsdprep.testing.serve import Mirror
from nsdprep.testing.synth import SynthSpec, make_synthetic

log = logging.getLogger(__name__)

PIPELINE = ("coco-labels", "3mm", "curated", "decode")
#: The field's preparation (session z-scores, repeats averaged, nsdgeneral) and its decoding,
#: trained on the train images and tested on the shared 1000: what ``make demo`` adds.
FIELD = "ZSCORE=session AVERAGE=1 ROI=nsdgeneral"
DEMO_TARGETS = (*PIPELINE, f"curated {FIELD}", f"decode {FIELD} SPLIT=shared1000")


@dataclass(frozen=True)
class DemoSpec:
    """What a demo or end-to-end test run synthesizes: sessions per subject, layout, seed.

    The layout is smaller than NSD's 12 runs x 63/62 trials and is passed explicitly to every stage.
    """

    sessions: tuple[int, ...] = (3, 3, 2, 2)
    layout: Layout = Layout(6, (8, 7))  # noqa: RUF009 (frozen, immutable)
    seed: int = 0
    #: decode's label permutations per subject (the demo reports p down to 1/101)
    permutations: int = 100

    def make_vars(self) -> list[str]:
        """The make variables that pass this layout and the permutation count to the stages."""
        return [
            f"RUNS_PER_SESSION={self.layout.runs_per_session}",
            f"TRIALS_PER_RUN={','.join(map(str, self.layout.trials_per_run))}",
            f"PERMUTATIONS={self.permutations}",
        ]

    def synth_spec(self) -> SynthSpec:
        """The synthetic data of this demo."""
        return SynthSpec(seed=self.seed, sessions=self.sessions, layout=self.layout)


def loopback_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment allowing git-annex to download from 127.0.0.1, for every repo, without config edits.

    git-annex refuses private addresses by default; the setting is passed through git's
    ``GIT_CONFIG_COUNT`` variables so neither the user's nor the dataset's configuration changes.
    """
    env = dict(os.environ if base is None else base)
    n = int(env.get("GIT_CONFIG_COUNT", "0"))
    env[f"GIT_CONFIG_KEY_{n}"] = "annex.security.allowed-ip-addresses"
    env[f"GIT_CONFIG_VALUE_{n}"] = "127.0.0.1"
    env["GIT_CONFIG_COUNT"] = str(n + 1)
    return env


def ensure_identity(env: dict[str, str]) -> None:
    """Use the user's git identity if there is one, else a demo identity for this run only."""
    for var, key in (("GIT_AUTHOR_NAME", "user.name"), ("GIT_AUTHOR_EMAIL", "user.email")):
        if env.get(var):
            continue
        got = subprocess.run(["git", "config", key], capture_output=True, text=True, env=env)
        if got.returncode != 0 or not got.stdout.strip():
            value = "nsdprep demo" if key == "user.name" else "demo@nsdprep.invalid"
            env[var] = env[var.replace("AUTHOR", "COMMITTER")] = value


def clone_dataset(source: Path, dest: Path, env: Mapping[str, str], overlay: bool) -> Path:
    """``datalad clone`` ``source`` into ``dest`` (a collaborator's clone); ``overlay``: see below."""
    subprocess.run(["datalad", "clone", str(source), str(dest)], check=True, env=env)
    if overlay:
        _overlay_code(source, dest, env)
    return dest


def user_clone(source: Path, dest: Path, env: Mapping[str, str], overlay: bool) -> Path:
    """``git clone`` the project's branch into ``dest``, as a new user does (no ``git-annex`` branch).

    With ``overlay``, uncommitted code of ``source`` is carried over and committed (for tests of the
    working tree). Nothing here initialises git-annex: the make targets must do it. A ``source`` at a
    detached HEAD (a tag checked out) gives a clone on a branch ``main`` at that commit: publishing
    pushes a branch.
    """
    subprocess.run(
        ["git", "clone", "--quiet", "--single-branch", "--no-hardlinks", str(source), str(dest)],
        check=True,
        env=env,
    )
    on_branch = ["git", "-C", str(dest), "symbolic-ref", "--quiet", "HEAD"]
    if subprocess.run(on_branch, env=env, capture_output=True).returncode:
        subprocess.run(
            ["git", "-C", str(dest), "switch", "--quiet", "-c", "main"], check=True, env=env
        )
    if overlay:
        _overlay_code(source, dest, env)
    return dest


def _overlay_code(source: Path, dest: Path, env: Mapping[str, str]) -> None:
    for rel in (
        "code",
        "tests",
        "Makefile",
        "requirements.txt",
        "pyproject.toml",
        ".gitattributes",
    ):
        src, dst = source / rel, dest / rel
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True, ignore=_ignore_caches)
        elif src.exists():
            shutil.copy2(src, dst)
    git = ["git", "-C", str(dest)]
    if subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True).stdout:
        subprocess.run([*git, "add", "-A"], check=True, env=env)
        subprocess.run(
            [*git, "commit", "-q", "-m", "Working-tree code under test"], check=True, env=env
        )


def _ignore_caches(_dir: str, names: list[str]) -> list[str]:
    return [n for n in names if n in ("__pycache__",) or n.endswith((".pyc", ".egg-info"))]


def make(
    ds: Path, target: str, env: Mapping[str, str], venv: Path, args: Sequence[str] = ()
) -> None:
    """Run one make target in ``ds`` with the given environment."""
    cmd = ["make", "--no-print-directory", "-C", str(ds), target, f"VENV={venv}", *args]
    log.info("$ %s", " ".join(cmd))
    subprocess.run(cmd, check=True, env=env)


@contextlib.contextmanager
def _timed(timings: list[tuple[str, float]], step: str) -> Iterator[None]:
    """Append ``(step, wall seconds)`` to ``timings`` once the block has run."""
    t0 = time.monotonic()
    yield
    seconds = time.monotonic() - t0
    log.info("%s: %.1f s", step, seconds)
    timings.append((step, seconds))


#: the end-to-end tests: the demo with 20 permutations (p down to 1/21) to keep ``make test`` short
TEST_SPEC = DemoSpec(permutations=20)


def build_demo(
    workdir: Path,
    venv: Path,
    source: Path,
    spec: DemoSpec = DemoSpec(),  # noqa: B008 (frozen, immutable)
    *,
    targets: Sequence[str] = PIPELINE,
    overlay: bool = False,
    env: Mapping[str, str] | None = None,
    jobs: int = 2,
    share: bool = False,
) -> Path:
    """Synthesize, serve, clone ``source``, register inputs and make ``targets``; return the clone.

    A target may carry make words of its own (``"curated ZSCORE=session"``).

    With ``share``, then publish to a RIA store in ``workdir`` and play a colleague who clones it
    (:func:`colleague_flow`); what they saw is written to ``workdir/share.json``. The seconds of
    each step (synthesis, clone, each make target) go to ``workdir/timings.json``.
    """
    timings: list[tuple[str, float]] = []
    workdir.mkdir(parents=True, exist_ok=True)
    run_env = loopback_env(env)
    run_env["PATH"] = f"{venv / 'bin'}{os.pathsep}{run_env.get('PATH', '')}"
    ensure_identity(run_env)
    synth = workdir / "synth"
    if synth.exists():
        shutil.rmtree(synth)
    with _timed(timings, "synthetic data"):
        make_synthetic(synth, spec.synth_spec())
    ds = workdir / "dataset"
    if ds.exists():
        _rmtree_annex(ds)
    with _timed(timings, "clone"):
        user_clone(source, ds, run_env, overlay)
    with Mirror(synth) as mirror:
        nsd_url = f"{mirror.url}/nsd"
        coco_url = f"{mirror.url}/coco/annotations/annotations_trainval2017.zip"
        urls = [f"NSD_URL={nsd_url}", f"COCO_URL={coco_url}"]
        with _timed(timings, "make inputs"):
            make(ds, "inputs", run_env, venv, urls)
        for item in targets:
            target, *words = item.split()
            with _timed(timings, f"make {item}"):
                make(ds, target, run_env, venv, [*spec.make_vars(), f"JOBS={jobs}", *words])
        if share:
            with _timed(timings, "publish + colleague"):
                facts = colleague_flow(ds, workdir, run_env, venv, spec)
            (workdir / "share.json").write_text(json.dumps(facts, indent=1, sort_keys=True) + "\n")
    rows = [{"step": name, "seconds": round(sec, 2)} for name, sec in timings]
    (workdir / "timings.json").write_text(json.dumps(rows, indent=1) + "\n")
    return ds


def colleague_flow(
    ds: Path, workdir: Path, env: Mapping[str, str], venv: Path, spec: DemoSpec
) -> dict[str, Any]:
    """Publish ``ds`` to a RIA store in ``workdir``, then clone, get and rerun as a colleague would.

    The colleague has their own folder and HOME. Returns what they saw: commands, seconds, sizes.
    """
    store = workdir / "ria-store"
    for path in (store, workdir / "colleague", workdir / "colleague-home"):
        if path.exists():
            _rmtree_annex(path)
    ria = f"ria+file://{store}"
    facts: dict[str, Any] = {"ria": ria, "steps": []}

    def step(cmd: Sequence[str], cwd: Path, run_env: Mapping[str, str]) -> str:
        log.info("$ %s", shlex.join(cmd))
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=cwd, env=run_env, capture_output=True, text=True)
        out = proc.stdout + proc.stderr
        sys.stdout.write(out)
        if proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout, proc.stderr)
        facts["steps"].append({"cmd": shlex.join(cmd), "seconds": round(time.monotonic() - t0, 2)})
        return out

    make_cmd = ["make", "--no-print-directory", f"VENV={venv}"]
    step([*make_cmd, "publish", f"RIA={ria}"], ds, env)
    home = workdir / "colleague-home"
    home.mkdir()
    cenv = {k: v for k, v in env.items() if not k.startswith(("GIT_AUTHOR_", "GIT_COMMITTER_"))}
    cenv["HOME"] = str(home)
    ensure_identity(cenv)
    mate = workdir / "colleague"
    step(["datalad", "clone", f"{ria}#~nsdprep", str(mate)], workdir, cenv)
    facts["git_du_before_get"] = _du(mate / ".git")
    curated = sorted(p.relative_to(mate).as_posix() for p in mate.glob(f"{CURATED_GLOB}"))
    step(["datalad", "get", *curated], mate, cenv)
    step(["datalad", "get", "-n", "inputs/nsd"], mate, cenv)
    step([*make_cmd, "get", "SUBJECTS=01"], mate, cenv)
    facts["git_du_after_get"] = _du(mate / ".git")
    facts["nsd_git_du_after_get"] = _du(mate / "inputs/nsd/.git")
    commit = subprocess.run(
        [
            "git",
            "-C",
            str(mate),
            "log",
            "-F",
            "--grep=[nsdprep] 3mm subj01 (",
            "--format=%H",
            "-n1",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    facts["rerun_commit"] = commit
    head = _head(mate)
    step([*make_cmd, "rerun", f"REV={commit}"], mate, cenv)
    facts["rerun_new_commit"] = _head(mate) != head
    out = step([*make_cmd, "curated", *spec.make_vars()], mate, cenv)
    facts["curated_up_to_date"] = "nothing to do" in out
    return facts


#: What the colleague fetches of the curated derivatives: one subject.
CURATED_GLOB = "derivatives/curated_3mm/sub-02*"


def _head(ds: Path) -> str:
    return subprocess.run(
        ["git", "-C", str(ds), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()


def _du(path: Path) -> int:
    """Bytes on disk under ``path`` (symlinks not followed)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def _rmtree_annex(path: Path) -> None:
    """Remove a scratch dataset (annexed objects are read-only, so make them writable first)."""
    subprocess.run(["chmod", "-R", "u+w", str(path)], check=False)
    shutil.rmtree(path)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``make demo``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source", type=Path, default=Path.cwd(), help="the dataset to clone (default: .)"
    )
    parser.add_argument("--venv", type=Path, default=None, help="default: SOURCE/.venv")
    parser.add_argument("--workdir", type=Path, default=None, help="default: SOURCE/.demo")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s demo: %(message)s")
    source = args.source.resolve()
    dirty = subprocess.run(
        ["git", "-C", str(source), "status", "--porcelain", "--", "code", "Makefile"],
        capture_output=True,
        text=True,
    ).stdout
    if dirty.strip():
        log.warning("uncommitted changes in code/ or Makefile are NOT part of the demo clone")
    start = time.monotonic()
    venv = (args.venv or source / ".venv").resolve()
    workdir = (args.workdir or source / ".demo").resolve()
    ds = build_demo(workdir, venv, source, targets=DEMO_TARGETS, jobs=args.jobs, share=True)
    minutes = (time.monotonic() - start) / 60
    print("\nTime per step:")
    for row in json.loads((workdir / "timings.json").read_text()):
        print(f"  {row['seconds']:6.1f} s  {row['step']}")
    print(f"\nDemo finished in {minutes:.1f} min. Results in the scratch dataset {ds}:")
    for rel in (
        "inputs/nsd",
        "inputs/coco",
        "derivatives/3mm",
        "derivatives/coco_categories.pkl",
        "derivatives/curated_3mm",
        "derivatives/decoding/report.md",
        "derivatives/curated_3mm_zscore-session_avg_roi-nsdgeneral",
        "derivatives/decoding_zscore-session_avg_roi-nsdgeneral_split-shared1000/report.md",
    ):
        print(f"  {ds / rel}")
    print(
        f"History: git -C {ds} log --oneline ; reproduce one step: cd {ds} && make rerun REV=<commit>"
    )
    facts = json.loads((ds.parent / "share.json").read_text())
    print(f"\nPublished to {facts['ria']}; a colleague's clone is in {ds.parent / 'colleague'}:")
    for item in facts["steps"]:
        print(f"  {item['seconds']:6.2f} s  $ {item['cmd']}")
    print(
        f"  colleague's .git: {facts['git_du_before_get'] / 1e6:.1f} MB after clone, "
        f"{facts['git_du_after_get'] / 1e6:.1f} MB after getting sub-02's curated files; "
        f"inputs/nsd/.git {facts['nsd_git_du_after_get'] / 1e6:.1f} MB after `make get SUBJECTS=01`"
    )
    print(
        "  rerun of 3mm subj01: "
        + (
            "new commit (outputs differ!)"
            if facts["rerun_new_commit"]
            else "identical keys, no new commit"
        )
        + "; make curated: "
        + ("nothing to do" if facts["curated_up_to_date"] else "rebuilt")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
