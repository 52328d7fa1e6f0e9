"""The pipeline: one :class:`Stage` record per make target, the only place a stage is described.

A stage record says which make target makes it and which ``python -m nsdprep`` command (and module)
runs it; which input subdatasets it reads and whether it downloads their content; how its steps are
cut (one per subject, or one for the selection) and named; its inputs, and which make command makes
each; its outputs for the given options; and its disk estimate. :mod:`nsdprep.drive.steps` turns a
record and the :class:`~nsdprep.options.Options` into ``datalad run`` steps; the CLI, ``make help``,
the SLURM backend and the fingerprints read the same records.

Adding a stage: write its module under :mod:`nsdprep.stages` (``add_arguments(parser)``,
``main(args)``), declare its options in :mod:`nsdprep.options` with the new target among their
``targets``, and add one record here.

The targets that are not ``datalad run`` stages (``inputs``, ``get``, ...) are :class:`Action`
records; make's own targets (``demo``, ``test``, ...) are listed in :data:`MAKE_TARGETS` for help.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from nsdprep import options
from nsdprep.core import inventory, nsd
from nsdprep.core.errors import MissingInputError
from nsdprep.options import Options

PY = ("python", "-m", "nsdprep")
#: Run records start with this tag: ``[nsdprep] <step name> (inputs <fingerprint>)``.
TAG = "[nsdprep]"


@dataclass(frozen=True)
class Input:
    """A declared input of a step (dataset-relative path or glob) and the make command making it."""

    path: str
    made_by: str = "make inputs"


@dataclass(frozen=True)
class Step:
    """One ``datalad run`` of a stage: its subjects and options, typed; its argv is built last.

    ``inputs`` and ``outputs`` are what the stage record gave at planning time (they depend on the
    registered files); :attr:`command` and :attr:`name` are derived from the record on demand.
    """

    target: str
    subjects: tuple[int, ...]
    options: Options
    inputs: tuple[Input, ...]
    outputs: tuple[str, ...]
    #: identity of things besides the inputs' content (which sessions are registered, ...)
    extra_fingerprint: tuple[str, ...] = ()

    @property
    def stage(self) -> Stage:
        """The stage record of this step."""
        return STAGES[self.target]

    @property
    def name(self) -> str:
        """``3mm subj01``, ``curated sub-01 sub-02``, ``coco-labels crop``: the run record's name."""
        return self.stage.step_name(self)

    @property
    def command(self) -> tuple[str, ...]:
        """The stage command ``datalad run`` records (paths, subjects, then the option flags)."""
        program = self.stage.program or (*PY, self.stage.command)
        return (*program, *self.stage.args(self), *options.to_argv(self.options, self.target))

    @property
    def input_paths(self) -> tuple[str, ...]:
        """The declared inputs' paths (``datalad run -i``)."""
        return tuple(i.path for i in self.inputs)

    @property
    def inputs_ready(self) -> bool:
        """True when the stage fetches (and drops) its inputs itself (``make 3mm DROP=1``)."""
        return self.stage.self_fetching(self.options)

    def message(self, fingerprint: str) -> str:
        """Run-record message; the fingerprint makes 'already up to date' decidable later."""
        return f"{TAG} {self.name} (inputs {fingerprint})"

    def identity(self) -> list[str]:
        """What the fingerprint hashes besides the inputs: stage, arguments, byte-changing options."""
        return [
            self.stage.command,
            *self.stage.args(self),
            *options.output_words(self.options, self.target),
        ]


Cut = Literal["each", "all", "none"]


@dataclass(frozen=True)
class Stage:
    """One derivative stage: everything about it that is not its computation."""

    target: str
    command: str
    module: str
    help: str
    #: the input subdatasets it reads (installed on demand in a clone)
    needs: tuple[str, ...]
    #: its steps download input content (git-annex's transfer settings are applied first)
    fetches: bool
    #: one step per subject (``each``), one step for the selected subjects (``all``), or none
    cut: Cut
    #: a folder or file name suffix per option value (``crop``): outputs and step names
    variant: Callable[[Options], str]
    #: the stage command's own arguments (paths, subjects); the option flags follow them
    args: Callable[[Step], tuple[str, ...]]
    inputs: Callable[[Path, Options, tuple[int, ...]], tuple[Input, ...]]
    outputs: Callable[[Options, tuple[int, ...]], tuple[str, ...]]
    #: output bytes, estimated from the dataset, the step and its inputs' total bytes
    estimate: Callable[[Path, Step, int], int]
    #: subjects named in the step name (curated) or not (decode)
    names_subjects: bool = True
    #: its inputs are fetched by the stage itself under these options (not by ``datalad run``)
    self_fetching: Callable[[Options], bool] = lambda opts: False
    extra: Callable[[Path, tuple[int, ...]], tuple[str, ...]] = lambda ds, subjects: ()
    #: the program that runs it, when not ``python -m nsdprep <command>`` (tests use scripts)
    program: tuple[str, ...] = ()

    def step_name(self, step: Step) -> str:
        """The run record's name of ``step``."""
        words = [self.target]
        if variant := self.variant(step.options):
            words.append(variant)
        if self.cut == "each":
            words += [nsd.subject_label(s) for s in step.subjects]
        elif self.cut == "all" and self.names_subjects:
            words += [nsd.bids_subject_label(s) for s in step.subjects]
        return " ".join(words)

    def plan(self, ds: Path, opts: Options) -> list[Step]:
        """The steps that make this stage in dataset ``ds`` under ``opts``."""
        if self.cut == "none":
            groups: list[tuple[int, ...]] = [()]
        else:
            chosen = tuple(inventory.select_subjects(ds / nsd.NSD_DATASET, opts.subjects))
            groups = [(s,) for s in chosen] if self.cut == "each" else [chosen]
        return [
            Step(
                self.target,
                subjects,
                opts,
                self.inputs(ds, opts, subjects),
                self.outputs(opts, subjects),
                self.extra(ds, subjects),
            )
            for subjects in groups
        ]

    def make_command(self, opts: Options, subjects: tuple[int, ...] = ()) -> str:
        """The make command that makes this stage's outputs for ``subjects`` under ``opts``."""
        words = ["make", self.target]
        if subjects and self.cut != "none":
            words.append(f"SUBJECTS={options.Subjects().format(subjects).replace(' ', ',')}")
        words += [w for w in options.output_words(opts, self.target) if not _is_default(w)]
        return " ".join(words)


def _is_default(word: str) -> bool:
    var, _, text = word.partition("=")
    spec = next(s for s in options.SPECS if s.var == var)
    return text == spec.kind.format(spec.default)


# ------------------------------------------------------------------------------------------------
# the records


def labels_variant(opts: Options) -> str:
    """The label rule's suffix: ``""`` for the default, else the rule (``crop``, ``legacy``)."""
    return "" if opts.labels == "default" else opts.labels


def _suffixed(base: str, variant: str) -> str:
    """``derivatives/curated_3mm`` + ``crop`` -> ``derivatives/curated_3mm_crop``."""
    if not variant:
        return base
    stem, dot, ext = base.rpartition(".") if "." in Path(base).name else (base, "", "")
    return f"{stem}_{variant}{dot}{ext}"


def labels_table(opts: Options) -> str:
    """The labels table of the label rule (``derivatives/coco_categories[_crop].pkl``)."""
    return _suffixed(nsd.COCO_CATEGORIES, labels_variant(opts))


def curated_variant(opts: Options) -> str:
    """The curated folder's suffix, one part per output-changing option that is not at its default.

    In this order: the label rule (``crop``, ``legacy``), ``zscore-session``, ``avg``,
    ``roi-<name>``, ``maxsession-<N>``; ``""`` for the default, whose folder stays
    ``derivatives/curated_3mm``. ``VALID=1`` keeps writing the folder of its other options.
    """
    parts = [labels_variant(opts)]
    parts.append("" if opts.zscore == "none" else f"zscore-{opts.zscore}")
    parts.append("avg" if opts.average else "")
    parts.append(f"roi-{opts.roi}" if opts.roi else "")
    parts.append(f"maxsession-{opts.max_session}" if opts.max_session else "")
    return "_".join(p for p in parts if p)


def curated_dir(opts: Options) -> str:
    """The curated folder of the options (``derivatives/curated_3mm[_crop][_zscore-session]...``)."""
    return _suffixed(nsd.CURATED_DIR, curated_variant(opts))


def decoding_variant(opts: Options) -> str:
    """The decoding folder's suffix: the curated folder's, then ``split-shared1000`` if set."""
    split = "" if opts.split == "cv" else f"split-{opts.split}"
    return "_".join(p for p in (curated_variant(opts), split) if p)


def decoding_dir(opts: Options) -> str:
    """The decoding folder of the options (``derivatives/decoding[_crop][_zscore-session]...``)."""
    return _suffixed(nsd.DECODING_DIR, decoding_variant(opts))


def merged_json(opts: Options) -> str:
    """The merged COCO instances the label rule writes (none for ``crop``: it reuses the default)."""
    return {"default": nsd.COCO_MERGED, "legacy": nsd.COCO_MERGED_LEGACY, "crop": ""}[opts.labels]


def _ratio(r: float) -> Callable[[Path, Step, int], int]:
    return lambda ds, step, total_in: int(total_in * r)


def _json_sizes(ds: Path, step: Step, total_in: int) -> int:
    """Uncompressed size of the COCO instances JSONs in the zip (the merged JSON's estimate)."""
    try:
        with zipfile.ZipFile(ds / nsd.COCO_DATASET / nsd.COCO_ZIP_NAME) as zf:
            return sum(i.file_size for i in zf.infolist() if "instances_" in i.filename)
    except (OSError, zipfile.BadZipFile):
        return 0


_EXPDESIGN = f"{nsd.NSD_DATASET}/{nsd.EXPDESIGN_KEY}"
_STIM_INFO_CSV = f"{nsd.NSD_DATASET}/{nsd.STIM_INFO_CSV_KEY}"


# -- 3mm
def _resample_inputs(ds: Path, opts: Options, subjects: tuple[int, ...]) -> tuple[Input, ...]:
    (subject,) = subjects
    nsd_ds = ds / nsd.NSD_DATASET
    return tuple(
        Input(f"{nsd.NSD_DATASET}/{nsd.betas_key(subject, s)}")
        for s in inventory.registered_sessions(nsd_ds, subject)
    )


def _resample_args(step: Step) -> tuple[str, ...]:
    (subject,) = step.subjects
    out = nsd.resampled_subject_dir(subject)
    return ("--nsd", nsd.NSD_DATASET, "--subject", str(subject), "--out", out)


RESAMPLE = Stage(
    target="3mm",
    command="resample",
    module="nsdprep.stages.resample",
    help="resample 1 mm betas to 3 mm + grey-matter mask -> derivatives/3mm (datalad run per subject)",
    needs=(nsd.NSD_DATASET,),
    fetches=True,
    cut="each",
    variant=lambda opts: "",
    args=_resample_args,
    inputs=_resample_inputs,
    outputs=lambda opts, subjects: (nsd.resampled_subject_dir(subjects[0]),),
    estimate=_ratio(1 / 27),  # 3 mm keeps 1/27 of the 1 mm voxels, then masks
    self_fetching=lambda opts: opts.drop,
)


# -- coco-labels
def _labels_args(step: Step) -> tuple[str, ...]:
    opts = step.options
    args = ("--zip", f"{nsd.COCO_DATASET}/{nsd.COCO_ZIP_NAME}")
    args += ("--stim-info", _STIM_INFO_CSV)  # CSV: never unpickled
    args += ("--expdesign", _EXPDESIGN, "--out", labels_table(opts))
    if merged := merged_json(opts):
        args += ("--merged-out", merged)
    return args


def _labels_outputs(opts: Options, subjects: tuple[int, ...]) -> tuple[str, ...]:
    table = labels_table(opts)
    merged = merged_json(opts)
    outputs = (table, nsd.table_sidecar(table), nsd.summary_path(table))
    return (*((merged,) if merged else ()), *outputs)


LABELS = Stage(
    target="coco-labels",
    command="coco",
    module="nsdprep.stages.labels",
    help="COCO labels per NSD image -> derivatives/coco_categories.pkl (datalad run)",
    needs=(nsd.NSD_DATASET, nsd.COCO_DATASET),
    fetches=True,
    cut="none",
    variant=labels_variant,
    args=_labels_args,
    inputs=lambda ds, opts, subjects: tuple(
        Input(p)
        for p in (
            f"{nsd.COCO_DATASET}/{nsd.COCO_ZIP_NAME}",
            _STIM_INFO_CSV,
            _EXPDESIGN,
        )
    ),
    outputs=_labels_outputs,
    estimate=_json_sizes,
)


# -- curated
def _curated_inputs(ds: Path, opts: Options, subjects: tuple[int, ...]) -> tuple[Input, ...]:
    nsd_ds = ds / nsd.NSD_DATASET
    out = tuple(
        Input(nsd.resampled_subject_dir(s), RESAMPLE.make_command(opts, (s,))) for s in subjects
    )
    # the TSV sidecar of the labels table: what curate reads (the pickle is never unpickled)
    out += (Input(nsd.table_sidecar(labels_table(opts)), LABELS.make_command(opts)),)
    out += (Input(_EXPDESIGN),)
    # The split's cross-check: the stim info's shared1000 column, read from the CSV.
    out += (Input(_STIM_INFO_CSV),)
    if opts.roi:
        _require_roi(nsd_ds, opts.roi, subjects)
        out += tuple(Input(f"{nsd.NSD_DATASET}/{nsd.roi_key(s, opts.roi)}") for s in subjects)
    # Valid masks: counted in the README always, applied with VALID=1.
    out += tuple(
        Input(f"{nsd.NSD_DATASET}/{nsd.valid_key(s, ses)}")
        for s in subjects
        for ses in inventory.registered_sessions(nsd_ds, s, kind="valid")
    )
    return out


def _require_roi(nsd_ds: Path, roi: str, subjects: tuple[int, ...]) -> None:
    """Every subject has the ROI registered, or one error naming who lacks it and what they have."""
    lacking = {s: inventory.registered_rois(nsd_ds, s) for s in subjects}
    lacking = {s: have for s, have in lacking.items() if roi not in have}
    if lacking:
        listing = "; ".join(
            f"{nsd.subject_label(s)} has {', '.join(have) if have else 'no MNI ROI'}"
            for s, have in lacking.items()
        )
        raise MissingInputError(
            f"ROI={roi}: not registered under {nsd.NSD_DATASET}/nsddata/ppdata/subjXX/MNI/roi/ "
            f"for every subject ({listing}). Run `make inputs` to register the bucket's ROI "
            "volumes, or choose other SUBJECTS or another ROI."
        )


def _curated_args(step: Step) -> tuple[str, ...]:
    args = ("--nsd", nsd.NSD_DATASET, "--resampled", nsd.RESAMPLED_DIR)
    args += ("--labels-table", nsd.table_sidecar(labels_table(step.options)))
    args += ("--expdesign", _EXPDESIGN, "--stim-info-csv", _STIM_INFO_CSV)
    return (*args, "--out", curated_dir(step.options), "--subjects", *map(str, step.subjects))


def _curated_outputs(opts: Options, subjects: tuple[int, ...]) -> tuple[str, ...]:
    out = curated_dir(opts)
    files = tuple(f"{out}/{nsd.bids_subject_label(s)}*" for s in subjects)
    return (*files, f"{out}/README.md", f"{out}/dataset_description.json")


CURATE = Stage(
    target="curated",
    command="curate",
    module="nsdprep.stages.curate",
    help="equalized trials per subject -> derivatives/curated_3mm[_<options>] (datalad run)",
    needs=(nsd.NSD_DATASET,),
    fetches=False,
    cut="all",
    variant=curated_variant,
    args=_curated_args,
    inputs=_curated_inputs,
    outputs=_curated_outputs,
    estimate=_ratio(1.0),  # a subset of its 3 mm inputs, re-packed
    # Which sessions are registered decides N (rule 1), so it is part of the inputs' identity.
    extra=lambda ds, subjects: tuple(inventory.registered_keys(ds / nsd.NSD_DATASET)),
)


# -- decode
def _decode_args(step: Step) -> tuple[str, ...]:
    opts = step.options
    args = ("--curated", curated_dir(opts), "--out", decoding_dir(opts))
    return (*args, "--subjects", *map(str, step.subjects))


DECODE = Stage(
    target="decode",
    command="decode",
    module="nsdprep.stages.decode",
    help="run-grouped decoding baseline + report -> derivatives/decoding (datalad run)",
    needs=(nsd.NSD_DATASET,),
    fetches=False,
    cut="all",
    names_subjects=False,
    variant=decoding_variant,
    args=_decode_args,
    inputs=lambda ds, opts, subjects: tuple(
        Input(
            f"{curated_dir(opts)}/{nsd.bids_subject_label(s)}*", CURATE.make_command(opts, subjects)
        )
        for s in subjects
    ),
    outputs=lambda opts, subjects: (decoding_dir(opts),),
    estimate=_ratio(0.0),
)

#: Every stage, in pipeline order (``make all`` runs them so).
STAGES: dict[str, Stage] = {s.target: s for s in (LABELS, RESAMPLE, CURATE, DECODE)}
#: ``make all``: every derivative, in order (with ``BACKEND=slurm`` each waits for the one before).
ALL: tuple[str, ...] = ("3mm", "coco-labels", "curated", "decode")


@dataclass(frozen=True)
class Action:
    """A make target that is not a ``datalad run`` stage (registration, transfers, rerun, publish)."""

    target: str
    help: str
    needs: tuple[str, ...] = ()
    fetches: bool = False
    #: the ``python -m nsdprep`` command and module, when it has one of its own
    command: str = ""
    module: str = ""


ACTIONS: dict[str, Action] = {
    a.target: a
    for a in (
        Action("inputs", "create/update inputs/nsd and inputs/coco, registered by URL (no download)",
               command="inputs", module="nsdprep.stages.inputs"),
        Action("get", "fetch the betas of SUBJECTS (e.g. make get SUBJECTS=01) and the experiment files",
               needs=(nsd.NSD_DATASET,), fetches=True),
        Action("drop", "drop the betas content of SUBJECTS again (frees disk; still registered)",
               needs=(nsd.NSD_DATASET,)),
        Action("repair", "re-fetch and verify damaged inputs of SUBJECTS, re-key them to their checksum",
               needs=(nsd.NSD_DATASET,), fetches=True),
        Action("rerun", "re-execute a recorded run (REV=<commit>, default HEAD) with datalad rerun"),
        Action("publish", "publish to a RIA store: make publish RIA=ria+file:///path/store",
               command="publish", module="nsdprep.drive.publish"),
        Action("all", "every derivative, in order (3mm, coco-labels, curated, decode)"),
    )
}  # fmt: skip

#: make's own targets (recipes in the Makefile), for ``make help``.
MAKE_TARGETS: dict[str, str] = {
    "help": "list the targets and the options",
    "venv": "create/update the pinned environment in .venv (datalad, git-annex, nibabel, ...)",
    "demo": "offline end-to-end run on synthetic data in a scratch clone (.demo/)",
    "test": "run the test suite (unit + end-to-end in temporary clones)",
    "test-slow": "run the slow tests only (kill loops, full-geometry data)",
    "test-slurm": "BACKEND=slurm end to end on a throw-away single-node SLURM (root; installs it)",
    "lint": "ruff check + format check",
    "format": "format the code with ruff",
    "bench": "benchmark the 3 mm resample on a full-geometry synthetic session (bench/results/)",
    "bench-load": "curated matrix vs streaming the 4D NIfTI on a full-size subject",
    "bench-pipeline": "benchmark make 3mm DROP=1 (downloads overlapping compute) + NSD projection",
    "bench-decode": "the ridge decoder on a full-size synthetic subject, 100 and 1000 permutations",
    "bench-conventions": "make curated ZSCORE=session AVERAGE=1 ROI=nsdgeneral, full-size subject",
}

#: Tools for the demo and the tests (``python -m nsdprep <tool>``), not pipeline stages.
TOOLS: dict[str, tuple[str, str]] = {
    "synth": ("nsdprep.testing.synth", "write synthetic NSD + COCO data in the real formats"),
    "serve": ("nsdprep.testing.serve", "serve a folder on 127.0.0.1 as a minimal S3-like mirror"),
}


def build_targets() -> tuple[str, ...]:
    """The make targets ``nsdprep build`` makes (one recipe in the Makefile serves them all)."""
    return (*ACTIONS, *STAGES)


def target_help() -> dict[str, str]:
    """Every make target and its help line, in the order ``make help`` lists them."""
    out = dict(MAKE_TARGETS)
    for name in ("inputs", "get", "drop"):
        out[name] = ACTIONS[name].help
    for name in ALL:
        out[name] = STAGES[name].help
    for name in ("all", "rerun", "repair", "publish"):
        out[name] = ACTIONS[name].help
    return out
