"""The one options spec: every setting a user gives ``make`` is declared here, once.

Each field of :class:`Options` is one option. Its declaration holds the make variable (the field's
name in capitals), the command-line flag (``--`` + the name with dashes), the type and what it
allows, the default, the help line, the make targets that read it, and whether it changes the bytes
of an output. Everything else is derived from these declarations:

- ``nsdprep build`` and the stage commands get their argparse flags from :func:`add_arguments`;
- ``make help`` lists :func:`help_lines`, and make checks its command line with :func:`check_words`
  before any target runs (an unknown variable such as ``SUBJETCS=01`` stops it);
- one message per type names the option and what it allows (:meth:`Kind.parse`);
- the run fingerprint uses the options that change output bytes only (:func:`output_words`), so a
  byte-neutral option (``JOBS``, ``DROP``, ``PREFETCH``, ``WAIT``, ...) never makes outputs look out
  of date;
- the SLURM resubmit command is :func:`to_words`, and :func:`from_words` reads it back to the same
  :class:`Options`.

The module needs the standard library only: make runs it with the system Python before the
environment exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from nsdprep.core import nsd
from nsdprep.core.errors import UsageError

# ------------------------------------------------------------------------------------------------
# kinds: how an option's text is read, written and passed on


class Kind:
    """How the text of an option is read (:meth:`parse`), written (:meth:`format`) and passed on."""

    #: what is allowed, for the one message of this type ("a whole number >= 1")
    allowed = "a value"

    def convert(self, text: str) -> Any:
        """The value of ``text``; raise ``ValueError`` if it is not allowed."""
        return text

    def parse(self, var: str, text: str) -> Any:
        """The value of ``VAR=text``, or one message naming the option and what it allows."""
        try:
            return self.convert(str(text).strip())
        except ValueError:
            raise UsageError(f"{var}={text!r} is not allowed: {var} takes {self.allowed}") from None

    def check(self, var: str, value: Any) -> Any:
        """A value given in code, checked like text would be (returns it normalised)."""
        return self.parse(var, self.format(value))

    def format(self, value: Any) -> str:
        """The text that :meth:`parse` reads back to ``value``."""
        return str(value)

    def argv(self, flag: str, value: Any) -> list[str]:
        """The command-line words that pass ``value`` on (``--jobs 2``)."""
        return [flag, self.format(value)]


class Whole(Kind):
    """A whole number, at least ``minimum``."""

    def __init__(self, minimum: int = 0) -> None:
        self.minimum = minimum
        self.allowed = f"a whole number >= {minimum}"

    def convert(self, text: str) -> int:
        if not re.fullmatch(r"[0-9]+", text) or int(text) < self.minimum:
            raise ValueError(text)
        return int(text)


class Number(Kind):
    """A number greater than 0."""

    allowed = "a number > 0"

    def convert(self, text: str) -> float:
        value = float(text)
        if not value > 0 or value == float("inf"):
            raise ValueError(text)
        return value

    def format(self, value: Any) -> str:
        return repr(float(value))


class YesNo(Kind):
    """A yes/no switch: ``1``, ``yes``, ``true`` or ``0``, ``no``, ``false`` (or empty)."""

    allowed = "1 or 0 (also yes/no, true/false)"

    def convert(self, text: str) -> bool:
        low = text.lower()
        if low in ("1", "yes", "true"):
            return True
        if low in ("0", "no", "false", ""):
            return False
        raise ValueError(text)

    def format(self, value: Any) -> str:
        if not isinstance(value, bool):
            raise UsageError(f"expected True or False, got {value!r}")
        return "1" if value else "0"

    def argv(self, flag: str, value: Any) -> list[str]:
        return [flag] if value else []


class OneOf(Kind):
    """One of a fixed set of words."""

    def __init__(self, choices: Sequence[str]) -> None:
        self.choices = tuple(choices)
        self.allowed = "one of " + ", ".join(self.choices)

    def convert(self, text: str) -> str:
        if text not in self.choices:
            raise ValueError(text)
        return text


class Text(Kind):
    """Free text (a URL, a path, shell words); a single line."""

    allowed = "one line of text"

    def convert(self, text: str) -> str:
        if "\n" in text or "\0" in text:
            raise ValueError(text)
        return text

    def parse(self, var: str, text: str) -> Any:
        try:
            return self.convert(str(text))  # kept as given: spaces may matter in a path
        except ValueError:
            raise UsageError(f"{var}={text!r} is not allowed: {var} takes {self.allowed}") from None


class Name(Kind):
    """A file-name-like word (letters, digits, ``.``, ``_``, ``-``; no path), or empty for none."""

    allowed = "a name such as nsdgeneral (letters, digits, . _ -), or empty"

    def convert(self, text: str) -> str:
        if text and (
            not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", text) or text.endswith(".nii.gz")
        ):
            raise ValueError(text)
        return text

    def argv(self, flag: str, value: Any) -> list[str]:
        return [flag, self.format(value)] if value else []


class ShellWords(Text):
    """Words split as a shell splits them (``SLURM_OPTS="--time=1:00 --mem=8G"``)."""

    allowed = "words a shell can split (balanced quotes)"

    def convert(self, text: str) -> str:
        shlex.split(super().convert(text))  # raises ValueError on unbalanced quotes
        return text


class Subjects(Kind):
    """NSD subject numbers 1..99, written ``01 02`` or ``1,2``; empty = every registered one."""

    allowed = 'subject numbers 1..99, such as 01 or "01 02" (empty: all)'

    def convert(self, text: str) -> tuple[int, ...]:
        parts = [p for p in re.split(r"[,\s]+", text) if p]
        if not all(re.fullmatch(r"[0-9]{1,2}", p) and 1 <= int(p) <= 99 for p in parts):
            raise ValueError(text)
        return tuple(sorted({int(p) for p in parts}))

    def format(self, value: Any) -> str:
        return " ".join(f"{int(s):02d}" for s in value)

    def argv(self, flag: str, value: Any) -> list[str]:
        return [flag, *(str(int(s)) for s in value)] if value else []


class IntPair(Kind):
    """Two whole numbers >= 1, ``A,B``."""

    allowed = "two whole numbers >= 1, such as 63,62"

    def convert(self, text: str) -> tuple[int, int]:
        parts = [p for p in re.split(r"[,\s]+", text) if p]
        if len(parts) != 2 or not all(re.fullmatch(r"[0-9]+", p) and int(p) >= 1 for p in parts):
            raise ValueError(text)
        return int(parts[0]), int(parts[1])

    def format(self, value: Any) -> str:
        return ",".join(str(int(v)) for v in value)


# ------------------------------------------------------------------------------------------------
# the declarations

#: Make targets whose steps run on SLURM with ``BACKEND=slurm``.
CLUSTER = ("3mm", "coco-labels", "curated", "decode", "all")
#: Targets that choose subjects.
WITH_SUBJECTS = ("inputs", "get", "drop", "repair", "3mm", "curated", "decode", "all")


@dataclass(frozen=True)
class Spec:
    """One option's declaration (see the module docstring); ``name`` is the field's name."""

    name: str
    kind: Kind
    default: Any
    help: str
    #: make targets that read it
    targets: tuple[str, ...]
    #: a different value gives different output bytes (part of the run fingerprint)
    changes_output: bool
    #: passed to the stage command of its targets as a flag (``True``), of these targets only
    #: (a tuple), or of none (``False``: read by ``nsdprep build`` itself)
    passed: bool | tuple[str, ...]

    @property
    def var(self) -> str:
        """The make variable: ``PERMUTATIONS``."""
        return self.name.upper()

    @property
    def flag(self) -> str:
        """The command-line flag: ``--permutations``."""
        return "--" + self.name.replace("_", "-")


def option(
    kind: Kind,
    default: Any,
    help: str,
    *,
    targets: Sequence[str],
    changes_output: bool,
    passed: bool | tuple[str, ...] = True,
) -> Any:
    """Declare one option: a dataclass field of :class:`Options` carrying its :class:`Spec`."""
    meta = {"kind": kind, "help": help, "targets": tuple(targets)}
    meta |= {"changes_output": changes_output, "passed": passed}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Options:
    """Every option a make target reads, with its declaration (one field each)."""

    subjects: tuple[int, ...] = option(
        Subjects(), (), "subjects, e.g. \"01 02\" (default: every registered one)",
        targets=WITH_SUBJECTS, changes_output=True, passed=False,
    )  # fmt: skip
    jobs: int = option(
        Whole(1), 2, "worker processes inside one step",
        targets=("3mm", "decode", "all", "bench-pipeline"), changes_output=False,
    )  # fmt: skip
    drop: bool = option(
        YesNo(), False, "3mm: fetch each session ahead, drop it when done (bounded disk)",
        targets=("3mm", "all"), changes_output=False,
    )  # fmt: skip
    prefetch: int = option(
        Whole(0), 1, "3mm DROP=1: sessions fetched ahead (disk: JOBS + PREFETCH sessions)",
        targets=("3mm", "all", "bench-pipeline"), changes_output=False,
    )  # fmt: skip
    streams: int = option(
        Whole(1), 4,
        "3mm DROP=1 and get: downloads at once (parallel connections), in order of need",
        targets=("3mm", "get", "all"), changes_output=False,
    )  # fmt: skip
    force: bool = option(
        YesNo(), False, "rebuild although the inputs or options changed since the last run",
        targets=("3mm", "coco-labels", "curated", "decode", "all"), changes_output=False,
        passed=False,
    )  # fmt: skip
    labels: nsd.LabelMode = option(
        OneOf(nsd.LABEL_MODES), "default",
        "label rule: default (largest annotation), crop (inside the shown crop), legacy",
        targets=("coco-labels", "curated", "decode", "all"), changes_output=True,
        passed=("coco-labels", "curated"),
    )  # fmt: skip
    coco_max_mb: int = option(
        Whole(1), 2048, "coco-labels: largest inflated COCO JSON accepted from the zip (MiB)",
        targets=("coco-labels", "all"), changes_output=False,
    )  # fmt: skip
    valid: bool = option(
        YesNo(), False, "curated: keep only voxels valid in every session (writes the mask)",
        targets=("curated", "all"), changes_output=True,
    )  # fmt: skip
    runs_per_session: int = option(
        Whole(1), 12, "experiment layout: runs per session (real NSD: 12)",
        targets=("curated", "all"), changes_output=True,
    )  # fmt: skip
    trials_per_run: tuple[int, int] = option(
        IntPair(), (63, 62), "experiment layout: trials per run A,B (odd runs, even runs)",
        targets=("curated", "all"), changes_output=True,
    )  # fmt: skip
    zscore: str = option(
        OneOf(("none", "session")), "none",
        "curated: session = z-score each voxel within each session over its trials (float32)",
        targets=("curated", "decode", "all"), changes_output=True,
        passed=("curated",),
    )  # fmt: skip
    average: bool = option(
        YesNo(), False, "curated: one row per image, the mean of its kept repeats (float32)",
        targets=("curated", "decode", "all"), changes_output=True,
        passed=("curated",),
    )  # fmt: skip
    roi: str = option(
        Name(), "", "curated: keep only the voxels of this MNI ROI of NSD, e.g. nsdgeneral "
        "(empty: all grey matter)",
        targets=("curated", "decode", "all"), changes_output=True,
        passed=("curated",),
    )  # fmt: skip
    max_session: int = option(
        Whole(0), 0, "curated: use sessions 1..N at most, e.g. 37 as papers before 2023 (0: all)",
        targets=("curated", "decode", "all"), changes_output=True,
        passed=("curated",),
    )  # fmt: skip
    subsample: int = option(
        Whole(0), 0, "decode: trials per subject for a quick look (0: all)",
        targets=("decode", "all"), changes_output=True,
    )  # fmt: skip
    permutations: int = option(
        Whole(0), 100, "decode: label permutations per subject (smallest p = 1/(N+1))",
        targets=("decode", "all"), changes_output=True,
    )  # fmt: skip
    classifier: str = option(
        OneOf(("ridge", "logistic")), "ridge",
        "decode: ridge (dual form, one factorization for all permutations) or logistic",
        targets=("decode", "all"), changes_output=True,
    )  # fmt: skip
    split: str = option(
        OneOf(("cv", "shared1000")), "cv",
        "decode: cv (run-grouped folds) or shared1000 (train on the train rows, test on the "
        "shared 1000 images)",
        targets=("decode", "all"), changes_output=True,
    )  # fmt: skip
    alpha: float = option(
        Number(), 0.03, "decode, ridge: penalty per voxel (alpha = ALPHA x voxels), fixed",
        targets=("decode", "all"), changes_output=True,
    )  # fmt: skip
    rev: str = option(
        Text(), "HEAD", "rerun: the run record (commit or range) to re-execute",
        targets=("rerun",), changes_output=False, passed=False,
    )  # fmt: skip
    backend: str = option(
        OneOf(("local", "slurm")), "local", "where steps run: here, or as SLURM jobs",
        targets=CLUSTER, changes_output=False, passed=False,
    )  # fmt: skip
    slurm_opts: str = option(
        ShellWords(), "", "BACKEND=slurm: extra sbatch options, e.g. \"--time=04:00:00 --mem=8G\"",
        targets=CLUSTER, changes_output=False, passed=False,
    )  # fmt: skip
    wait: bool = option(
        YesNo(), False, "BACKEND=slurm: wait for the jobs and print their report",
        targets=CLUSTER, changes_output=False, passed=False,
    )  # fmt: skip
    scratch: str = option(
        Text(), "", "BACKEND=slurm: job-local folder for clones (default $TMPDIR, else /tmp)",
        targets=CLUSTER, changes_output=False, passed=False,
    )  # fmt: skip
    ria: str = option(
        Text(), "", "publish (and BACKEND=slurm): the RIA store, ria+file:///path or ria+ssh://...",
        targets=(*CLUSTER, "publish"), changes_output=False, passed=False,
    )  # fmt: skip
    ria_sibling: str = option(
        Text(), "ria", "publish: the store's sibling name",
        targets=(*CLUSTER, "publish"), changes_output=False, passed=False,
    )  # fmt: skip
    alias: str = option(
        Text(), "nsdprep", "publish: the dataset's alias in the store",
        targets=(*CLUSTER, "publish"), changes_output=False, passed=False,
    )  # fmt: skip
    ria_reconfigure: bool = option(
        YesNo(), False, "publish: move the sibling to RIA= (content copied and checked there)",
        targets=("publish",), changes_output=False, passed=False,
    )  # fmt: skip
    nsd_url: str = option(
        Text(), nsd.NSD_BASE_URL, "inputs: base URL of the NSD bucket (or a mirror of it)",
        targets=("inputs",), changes_output=True,
    )  # fmt: skip
    coco_url: str = option(
        Text(), nsd.COCO_ANNOTATIONS_URL, "inputs: URL of the COCO annotations zip",
        targets=("inputs",), changes_output=True,
    )  # fmt: skip
    rate_mb_s: float = option(
        Number(), 50.0, "bench-pipeline: link bandwidth (MB/s) of the whole-NSD projection",
        targets=("bench-pipeline",), changes_output=False,
    )  # fmt: skip

    def __post_init__(self) -> None:
        for spec in SPECS:  # values given in code are checked like text is
            value = getattr(self, spec.name)
            object.__setattr__(self, spec.name, spec.kind.check(spec.var, value))

    @property
    def layout(self) -> nsd.Layout:
        """The experiment layout of ``RUNS_PER_SESSION`` and ``TRIALS_PER_RUN``."""
        return nsd.Layout(self.runs_per_session, self.trials_per_run)

    @property
    def sbatch_args(self) -> tuple[str, ...]:
        """``SLURM_OPTS`` split like a shell splits it."""
        return tuple(shlex.split(self.slurm_opts))

    def replace(self, **changes: Any) -> Options:
        """A copy with ``changes``."""
        return dataclasses.replace(self, **changes)


def _spec(f: dataclasses.Field) -> Spec:
    m = f.metadata
    return Spec(
        f.name, m["kind"], f.default, m["help"], m["targets"], m["changes_output"], m["passed"]
    )


#: Every option, in declaration order.
SPECS: tuple[Spec, ...] = tuple(_spec(f) for f in fields(Options))
_BY_VAR = {s.var: s for s in SPECS}


def spec(name: str) -> Spec:
    """The declaration of the option ``name`` (a field of :class:`Options`)."""
    return next(s for s in SPECS if s.name == name)


#: Variables make itself reads (its recipes), declared here so they are known and listed.
MAKE_VARIABLES: tuple[Spec, ...] = (
    Spec("venv", Text(), ".venv", "folder of the pinned environment", ("*",), False, False),
    Spec(
        "python_boot",
        Text(),
        "python3",
        "Python that creates the environment",
        ("*",),
        False,
        False,
    ),  # fmt: skip
    Spec(
        "pytest_args",
        ShellWords(),
        "",
        'test targets: extra pytest arguments, e.g. "-k decode"',
        ("test", "test-slow", "test-slurm"),
        False,
        False,
    ),  # fmt: skip
)
_MAKE_ONLY = {s.var for s in MAKE_VARIABLES}


# ------------------------------------------------------------------------------------------------
# make words <-> Options


def _split_word(word: str) -> tuple[str, str]:
    var, sep, text = word.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", var):
        raise UsageError(f"expected a make variable NAME=value, got {word!r}")
    return var, text


def _unknown(var: str) -> UsageError:
    near = difflib.get_close_matches(var, [*_BY_VAR, *_MAKE_ONLY], n=1)
    hint = f" (did you mean {near[0]}?)" if near else ""
    return UsageError(
        f"{var} is not an option{hint}; `make help` lists them (make would ignore it and "
        "go on with the default)"
    )


def from_words(words: Iterable[str], base: Options | None = None) -> Options:
    """Options from make words ``NAME=value`` (unknown names and bad values refused, one line)."""
    changes: dict[str, Any] = {}
    for word in words:
        var, text = _split_word(word)
        if var in _MAKE_ONLY:
            continue
        spec = _BY_VAR.get(var)
        if spec is None:
            raise _unknown(var)
        changes[spec.name] = spec.kind.parse(var, text)
    return dataclasses.replace(base or Options(), **changes)


def to_words(opts: Options, *, skip: Sequence[str] = ()) -> list[str]:
    """The make words (``VALID=1``) of every option that differs from its default.

    :func:`from_words` reads them back to ``opts`` (after a shell split of ``shlex.join``).
    """
    return [
        f"{spec.var}={spec.kind.format(getattr(opts, spec.name))}"
        for spec in SPECS
        if spec.name not in skip and getattr(opts, spec.name) != spec.default
    ]


def output_words(opts: Options, target: str) -> list[str]:
    """``VAR=value`` of every option of ``target`` that changes output bytes (the fingerprint)."""
    return [
        f"{spec.var}={spec.kind.format(getattr(opts, spec.name))}"
        for spec in SPECS
        if spec.changes_output and target in spec.targets and spec.name != "subjects"
    ]


def neutral(opts: Options) -> Options:
    """``opts`` with every byte-neutral option at its default."""
    return dataclasses.replace(opts, **{s.name: s.default for s in SPECS if not s.changes_output})


# ------------------------------------------------------------------------------------------------
# command lines


def passed_to(target: str) -> tuple[Spec, ...]:
    """The options a stage command of ``target`` takes as flags."""
    return tuple(
        s
        for s in SPECS
        if target in s.targets and (s.passed is True or (s.passed and target in s.passed))
    )


def to_argv(opts: Options, target: str) -> list[str]:
    """The flags that pass ``target``'s options to its stage command (``--jobs 2 --drop``)."""
    out: list[str] = []
    for spec in passed_to(target):
        out += spec.kind.argv(spec.flag, getattr(opts, spec.name))
    return out


def add_arguments(parser: argparse.ArgumentParser, specs: Iterable[Spec]) -> None:
    """Add a flag per option (``--permutations N``); read them back with :func:`from_args`."""
    for spec in specs:
        dest = f"opt_{spec.name}"
        text = (
            f"{spec.help} (make: {spec.var}; default: {spec.kind.format(spec.default) or 'none'})"
        )
        if isinstance(spec.kind, YesNo):
            parser.add_argument(spec.flag, dest=dest, action="store_const", const="1", help=text)
        elif isinstance(spec.kind, Subjects):
            parser.add_argument(spec.flag, dest=dest, nargs="*", metavar="N", help=text)
        else:
            parser.add_argument(spec.flag, dest=dest, metavar=spec.var, help=text)


def from_args(args: argparse.Namespace, base: Options | None = None) -> Options:
    """The options given as flags in ``args`` (see :func:`add_arguments`), over ``base``."""
    changes: dict[str, Any] = {}
    for spec in SPECS:
        text = getattr(args, f"opt_{spec.name}", None)
        if text is None:
            continue
        if isinstance(text, list):
            text = " ".join(text)
        changes[spec.name] = spec.kind.parse(spec.flag, text)
    return dataclasses.replace(base or Options(), **changes)


# ------------------------------------------------------------------------------------------------
# make's side


def check_words(words: Sequence[str]) -> str:
    """What make prints before any target runs: ``""`` if every word is a known, valid option."""
    try:
        from_words(words)
    except UsageError as exc:
        return str(exc)
    return ""


def help_lines(width: int = 16) -> list[str]:
    """``make help``'s variable list: every option, its default and its help line."""
    lines = []
    for spec in (*SPECS, *MAKE_VARIABLES):
        default = spec.kind.format(spec.default)
        lines.append(f"  {spec.var:<{width}} {spec.help} [{default or 'empty'}]")
    return lines


def describe(values: Mapping[str, Any]) -> str:
    """``JOBS=2 DROP=1`` for log lines."""
    return " ".join(f"{k}={v}" for k, v in values.items())
