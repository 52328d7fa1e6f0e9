"""``nsdprep build TARGET [NAME=value ...]``: what every pipeline make target calls.

make hands over the variables of its command line as ``NAME=value`` words; :mod:`nsdprep.options`
reads and checks them (flags such as ``--jobs 2`` work too, for use without make). Then this module
installs the input subdatasets the target reads, takes the dataset's lock and runs the target: a
stage's ``datalad run`` steps (:mod:`nsdprep.drive.steps`) here, or as SLURM jobs
(:mod:`nsdprep.drive.slurm`); or an action (``inputs``, ``get``, ``drop``, ``repair``, ``rerun``,
``publish``, ``all``). What each target is lives in :mod:`nsdprep.pipeline`.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from collections.abc import Sequence
from pathlib import Path

from nsdprep import options, pipeline
from nsdprep.core import dataset, inventory, nsd, pins, signals
from nsdprep.core.bucket import NSD_403_HINT
from nsdprep.core.errors import DatasetStateError, NsdPrepError, UsageError
from nsdprep.drive import steps
from nsdprep.drive.steps import run_plan, steps_for
from nsdprep.options import Options


def run_target(target: str, ds: Path, opts: Options, command: str = "") -> int:
    """Make ``target`` in ``ds``: its ``datalad run`` steps, or the action it names."""
    if target == "all":
        return make_all(ds, opts)
    if target == "inputs":
        return _register(ds, opts, command)
    stage, action = pipeline.STAGES.get(target), pipeline.ACTIONS.get(target)
    needs = stage.needs if stage else action.needs if action else ()
    ensure_inputs(ds, needs)
    dataset.ensure_annex(ds)
    if target == "publish":
        return _publish(ds, opts)
    if opts.backend == "slurm":
        if stage is None:
            raise UsageError(
                f"BACKEND=slurm runs {', '.join(pipeline.STAGES)}; `make {target}` runs locally"
            )
        from nsdprep.drive.slurm.submit import submit

        return submit(target, ds, opts)
    fetches = stage.fetches if stage else action.fetches if action else False
    with dataset.lock(ds, f"make {target}"):
        for rel in needs:
            dataset.clear_stale_index_lock(ds / rel)  # a run killed while fetching
            if fetches:
                dataset.configure_transfers(ds / rel)
        if target == "rerun":
            commit = check_rerun_rev(ds, opts.rev)
            dataset.clear_stale_index_lock(ds)
            # datalad rerun fetches the recorded inputs itself: fetch and check them first
            recorded = steps.expand(ds, recorded_inputs(ds, commit))
            if recorded:
                pins.fetch_verified(ds, recorded, hint_403=NSD_403_HINT)
            if not dataset.rerun(ds, commit):
                raise NsdPrepError(f"`datalad rerun {opts.rev}` failed (see the messages above)")
            return 0
        if target in ("get", "drop", "repair"):
            from nsdprep.drive import repair
            from nsdprep.stages import inputs

            subjects = inventory.select_subjects(ds / nsd.NSD_DATASET, opts.subjects)
            if target == "get":
                inputs.get_subjects(ds, subjects, streams=opts.streams)
            elif target == "drop":
                inputs.drop_subjects(ds, subjects)
            else:
                repair.repair_subjects(ds, subjects)
            return 0
        run_plan(ds, steps_for(target, ds, opts), force=opts.force)
    return 0


def make_all(ds: Path, opts: Options) -> int:
    """Every derivative in order; with ``BACKEND=slurm`` each waits for the one before."""
    if opts.backend == "slurm":
        opts = opts.replace(wait=True)
    for target in pipeline.ALL:
        code = run_target(target, ds, opts)
        if code:
            return code
    return 0


def _register(ds: Path, opts: Options, command: str) -> int:
    from nsdprep.stages import inputs

    added = inputs.register_inputs(ds, opts.nsd_url, opts.coco_url, opts.subjects or None, command)
    print("registered (new files): " + ", ".join(f"{k}: {v}" for k, v in added.items()))
    return 0


def _publish(ds: Path, opts: Options) -> int:
    from nsdprep.drive import publish

    if not opts.ria:
        raise UsageError("make publish needs RIA=<store URL>, e.g. RIA=ria+file:///data/ria-store")
    url = publish.publish(
        ds, opts.ria, sibling=opts.ria_sibling, alias=opts.alias, reconfigure=opts.ria_reconfigure
    )
    print(f"published. Clone it with:\n  datalad clone {shlex.quote(url)} nsd-decoding")
    return 0


def ensure_inputs(ds: Path, needed: Sequence[str]) -> None:
    """Install the input subdatasets ``needed`` if the dataset knows them; else say to register them."""
    if not needed:
        return
    from nsdprep.stages import inputs

    for rel in needed:
        if dataset.is_installed(ds / rel):
            continue
        if (ds / rel).exists() and any((ds / rel).iterdir()):
            raise DatasetStateError(
                f"{ds / rel} exists but is not a dataset: expected the input subdataset {rel} "
                "there. Move it away, then run `make inputs`."
            )
        if rel not in dataset.git(ds, "config", "-f", ".gitmodules", "--get-regexp", "path",
                                  check=False).split():  # fmt: skip
            raise DatasetStateError(
                f"{rel} does not exist yet: the inputs are not registered. Run `make inputs` first "
                "(it lists the NSD bucket and registers every file by URL, without downloading)."
            )
        inputs.ensure_subdataset(ds, rel)


def recorded_inputs(ds: Path, rev: str) -> list[str]:
    """The inputs the ``datalad run`` record(s) of ``rev`` (a commit or a range) declare."""
    commits = dataset.git(ds, "rev-list", rev).split() if ".." in rev else [rev]
    found: list[str] = []
    for commit in commits:
        body = dataset.git(ds, "log", "-1", "--format=%B", commit)
        m = _RECORD_RE.search(body)
        if m is None:
            continue
        try:
            found += [str(p) for p in json.loads(m.group(1)).get("inputs", [])]
        except (ValueError, AttributeError):
            continue  # not a record we can read: datalad rerun will say so
    return list(dict.fromkeys(found))


#: The JSON of a ``datalad run`` record inside its commit message.
_RECORD_RE = re.compile(
    r"=== Do not change lines below ===\n(.*?)\n\^\^\^ Do not change lines above", re.S
)


def check_rerun_rev(ds: Path, rev: str) -> str:
    """Return ``rev`` if it names a ``datalad run`` record (or is a range); else a clear error."""
    commit = dataset.resolve_commit(ds, rev) if ".." not in rev else rev
    if commit is None:
        raise UsageError(
            f"REV={rev!r} names no commit in {ds}; pick a run record from "
            "`git log --oneline --grep='DATALAD RUNCMD'`, e.g. `make rerun REV=<commit>`."
        )
    if ".." not in rev and not dataset.is_run_record(ds, commit):
        raise UsageError(
            f"REV={rev} ({commit[:8]}) is not a `datalad run` record, so there is nothing to "
            "re-execute; pick one from `git log --oneline --grep='DATALAD RUNCMD'` "
            "(e.g. `make rerun REV=<commit>`)."
        )
    return rev


# ----------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``nsdprep build TARGET [NAME=value ...] [--flag value ...]``: every option of the spec."""
    parser.add_argument("target", choices=pipeline.build_targets())
    parser.add_argument(
        "words", nargs="*", metavar="NAME=value", help="make variables, e.g. SUBJECTS=01 JOBS=2"
    )
    parser.add_argument("--dataset", type=Path, default=Path.cwd(), help="superdataset root")
    options.add_arguments(parser, options.SPECS)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``nsdprep build``: read the options, then make the target."""
    opts = options.from_args(args, options.from_words(args.words))
    ds = args.dataset.resolve()
    if not dataset.is_dataset(ds):
        raise DatasetStateError(
            f"{ds} is not a DataLad dataset (no .datalad/); run make from its root"
        )
    head = dataset.resolve_commit(ds, "HEAD")
    try:
        return run_target(args.target, ds, opts, getattr(args, "command_line", ""))
    except BaseException as exc:  # noqa: BLE001 - re-raised; an interrupt says what it left
        if not (isinstance(exc, KeyboardInterrupt) or signals.received()):
            raise
        since = recorded_since(ds, head)
        if isinstance(exc, signals.Interrupted) and exc.detail:
            if since == "nothing recorded":
                raise
            raise signals.Interrupted(f"{since}; then {exc.detail}") from None
        raise signals.Interrupted(since) from None


def recorded_since(ds: Path, head: str | None) -> str:
    """``nothing recorded``, or the commits made since ``head`` (an interrupted target's summary)."""
    now = dataset.resolve_commit(ds, "HEAD")
    if now == head:
        return "nothing recorded"
    if head is None:
        return "the dataset's first commits were made before the interrupt"
    subjects = dataset.git(ds, "log", "--format=%s", f"{head}..{now}").splitlines()
    return f"recorded before the interrupt: {'; '.join(subjects[:3])}" + (
        f" (+{len(subjects) - 3} more)" if len(subjects) > 3 else ""
    )
