"""``nsdprep build TARGET``: what each make target calls.

It checks the options, installs the input subdatasets the target reads, takes the dataset's lock and
runs the target's steps (:mod:`nsdprep.drive.steps`) here, or submits them to SLURM (:mod:`nsdprep.drive.slurm`);
``get``, ``drop``, ``repair`` and ``rerun`` go to the input and dataset modules.
"""

from __future__ import annotations

import argparse
import os
import shlex
from collections.abc import Sequence
from pathlib import Path

from nsdprep.core import dataset, inventory, nsd
from nsdprep.core.errors import DatasetStateError, NsdPrepError, UsageError
from nsdprep.drive.steps import (
    CLUSTER_TARGETS,
    FETCHING,
    NEEDS,
    TARGETS,
    Options,
    SlurmOptions,
    run_plan,
    steps_for,
)


def run_target(target: str, ds: Path, opts: Options) -> int:
    """Make ``target`` in ``ds`` under the lock: its ``datalad run`` steps, or get/drop/rerun/repair."""
    ensure_inputs(ds, NEEDS.get(target, ()))
    dataset.ensure_annex(ds)
    if target == "3mm":
        from nsdprep.stages.resample import PREFETCH_ENV

        os.environ[PREFETCH_ENV] = str(opts.prefetch)  # read by the stage, not in its record
    if opts.backend == "slurm":
        if target not in CLUSTER_TARGETS:
            raise UsageError(
                f"BACKEND=slurm runs {', '.join(CLUSTER_TARGETS)}; `make {target}` runs locally"
            )
        from nsdprep.drive.slurm.submit import submit

        return submit(target, ds, opts)
    with dataset.lock(ds, f"make {target}"):
        for rel in NEEDS.get(target, ()):
            dataset.clear_stale_index_lock(ds / rel)  # a run killed while fetching
            if target in FETCHING:
                dataset.configure_transfers(ds / rel)
        if target == "rerun":
            commit = check_rerun_rev(ds, opts.rev)
            dataset.clear_stale_index_lock(ds)
            if not dataset.rerun(ds, commit):
                raise NsdPrepError(f"`datalad rerun {opts.rev}` failed (see the messages above)")
            return 0
        if target in ("get", "drop", "repair"):
            from nsdprep.drive import repair
            from nsdprep.stages import inputs

            subjects = inventory.select_subjects(ds / nsd.NSD_DATASET, opts.subjects)
            fn = {
                "get": inputs.get_subjects,
                "drop": inputs.drop_subjects,
                "repair": repair.repair_subjects,
            }[target]
            fn(ds, subjects)
            return 0
        run_plan(ds, steps_for(target, ds, opts), force=opts.force)
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


def _subjects(text: str) -> tuple[int, ...]:
    return nsd.parse_int_list(text, "SUBJECTS")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``nsdprep build TARGET`` (what the Makefile passes)."""
    parser.add_argument("target", choices=TARGETS)
    parser.add_argument("--dataset", type=Path, default=Path.cwd(), help="superdataset root")
    parser.add_argument("--subjects", nargs="*", default=[], help="e.g. 01 02 (default: all)")
    parser.add_argument("--jobs", default="2", help="worker processes inside one step")
    parser.add_argument("--drop", action="store_true", help="3mm: get/drop each input session")
    parser.add_argument("--prefetch", default="1", help="3mm --drop: sessions fetched ahead")
    parser.add_argument("--force", action="store_true", help="rebuild even if inputs changed")
    parser.add_argument("--labels", default="default", help="default, legacy or crop")
    parser.add_argument(
        "--valid", action="store_true", help="curated: keep voxels valid in every session only"
    )
    parser.add_argument("--runs-per-session", default="12")
    parser.add_argument("--trials-per-run", default="63,62")
    parser.add_argument("--subsample", default="0")
    parser.add_argument("--permutations", default="100", help="decode: label permutations")
    parser.add_argument("--rev", default="HEAD", help="rerun: the commit (or range) to re-execute")
    parser.add_argument(
        "--backend", default="local", help="local, or slurm (see nsdprep.drive.slurm)"
    )
    parser.add_argument("--slurm-opts", default="", help="slurm: extra sbatch arguments")
    parser.add_argument("--wait", action="store_true", help="slurm: wait for the result")
    parser.add_argument("--ria", default="", help="slurm: output store (RIA URL)")
    parser.add_argument("--ria-sibling", default="ria", help="slurm: the store's sibling name")
    parser.add_argument(
        "--alias", default="nsdprep", help="slurm: the dataset's alias in the store"
    )
    parser.add_argument("--scratch", default="", help="slurm: folder for job clones ($TMPDIR)")


def main(args: argparse.Namespace) -> int:
    """Entry point of ``nsdprep build``: check the options, then make the target."""
    if args.labels not in nsd.LABEL_MODES:
        raise UsageError(f"LABELS must be one of {', '.join(nsd.LABEL_MODES)}, got {args.labels!r}")
    if args.backend not in ("local", "slurm"):
        raise UsageError(f"BACKEND must be 'local' or 'slurm', got {args.backend!r}")
    (jobs,) = _one_int(args.jobs, "JOBS")
    (subsample,) = _one_int(args.subsample, "SUBSAMPLE")
    (prefetch,) = _one_int(args.prefetch, "PREFETCH")
    (permutations,) = _one_int(args.permutations, "PERMUTATIONS")
    opts = Options(
        subjects=tuple(s for item in args.subjects for s in _subjects(item)),
        jobs=jobs,
        drop=args.drop,
        prefetch=prefetch,
        force=args.force,
        labels=args.labels,
        valid=args.valid,
        layout=nsd.Layout.parse(args.runs_per_session, args.trials_per_run),
        subsample=subsample,
        permutations=permutations,
        rev=args.rev,
        backend=args.backend,
        slurm=SlurmOptions(
            sbatch_args=tuple(shlex.split(args.slurm_opts)),
            wait=args.wait,
            ria=args.ria,
            sibling=args.ria_sibling,
            alias=args.alias,
            scratch=args.scratch,
        ),
    )
    for s in opts.subjects:
        nsd.subject_label(s)  # 1..99, or a clear error
    ds = args.dataset.resolve()
    if not dataset.is_dataset(ds):
        raise DatasetStateError(
            f"{ds} is not a DataLad dataset (no .datalad/); run make from its root"
        )
    return run_target(args.target, ds, opts)


def _one_int(text: str, what: str) -> tuple[int]:
    values = nsd.parse_int_list(text, what)
    if len(values) != 1:
        raise UsageError(f"{what}: expected one integer, got {text!r}")
    return values  # type: ignore[return-value]
