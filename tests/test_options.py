"""The one options spec: every option round-trips, is named in help, and is checked by one rule a type.

The round trip Options -> make words -> Options is what a failed SLURM submission prints to resubmit
itself, so it is tested over every declared option, each changed on its own and all at once.
"""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import REPO_ROOT
from nsdprep import options, pipeline
from nsdprep.core.errors import UsageError
from nsdprep.options import Options


def other_value(spec: options.Spec) -> object:
    """A valid value of ``spec`` that is not its default (one rule per kind, so none is skipped)."""
    kind = spec.kind
    if isinstance(kind, options.YesNo):
        return not spec.default
    if isinstance(kind, options.Whole):
        return spec.default + 3
    if isinstance(kind, options.Number):
        return spec.default * 2.5
    if isinstance(kind, options.OneOf):
        return next(c for c in kind.choices if c != spec.default)
    if isinstance(kind, options.Subjects):
        return (2, 7)
    if isinstance(kind, options.Name):
        return "prf-visualrois"
    if isinstance(kind, options.IntPair):
        return (5, 4)
    if isinstance(kind, options.ShellWords):
        return "--time=04:00:00 --comment='a b' --mem=8G"
    if isinstance(kind, options.Text):
        return "/some path/with 'quotes' and $HOME"
    raise AssertionError(f"no test value for the kind of {spec.var}: add one here")


def bad_text(spec: options.Spec) -> str | None:
    """Text the kind of ``spec`` must refuse (None: free text, nothing to refuse on one line)."""
    kind = spec.kind
    if isinstance(kind, options.YesNo):
        return "maybe"
    if isinstance(kind, options.Whole | options.Number | options.IntPair):
        return "abc"
    if isinstance(kind, options.OneOf):
        return "nonsense"
    if isinstance(kind, options.Subjects):
        return "1x"
    if isinstance(kind, options.Name):
        return "../nsdgeneral"
    if isinstance(kind, options.ShellWords):
        return "--comment='unbalanced"
    return None


def words_back(words: list[str]) -> list[str]:
    """What a shell makes of the printed words (the resubmit line is copied into a terminal)."""
    return shlex.split(" ".join(shlex.quote(w) for w in words))


@pytest.mark.parametrize("spec", options.SPECS, ids=lambda s: s.var)
def test_every_option_round_trips_through_make_words(spec: options.Spec) -> None:
    opts = dataclasses.replace(Options(), **{spec.name: other_value(spec)})
    words = options.to_words(opts)
    assert [w.split("=", 1)[0] for w in words] == [spec.var]
    assert options.from_words(words_back(words)) == opts


def test_all_options_at_once_round_trip() -> None:
    opts = Options(**{s.name: other_value(s) for s in options.SPECS})
    assert options.from_words(words_back(options.to_words(opts))) == opts
    assert options.to_words(Options()) == []


@pytest.mark.parametrize("spec", options.SPECS, ids=lambda s: s.var)
def test_resubmit_command_carries_every_option(spec: options.Spec, tmp_path: Path) -> None:
    """A failed ``make <target> BACKEND=slurm X=..`` prints a resubmit that rebuilds the same thing."""
    from nsdprep.drive.slurm.plan import Plan, Task

    value = other_value(spec) if spec.name != "backend" else "slurm"
    opts = dataclasses.replace(Options(backend="slurm"), **{spec.name: value})
    stage = pipeline.STAGES["curated"]
    step = pipeline.Step("curated", (2,), opts, (), ("derivatives/curated_3mm",))
    plan = Plan(
        id="1", target=stage.target, dataset=str(tmp_path), branch="main", base="0" * 40,
        store="ria+file:///s", source="x", sibling="ria", storage="ria-storage", scratch="",
        opts=opts, tasks=(Task(step=step, fingerprint="f", branch="b"),),
    )  # fmt: skip
    words = shlex.split(plan.resubmit_command(plan.tasks))
    assert words[:2] == ["make", "curated"]
    back = options.from_words(words[2:])
    expected = dataclasses.replace(opts, subjects=(2,))
    assert back == expected, words


@pytest.mark.parametrize("spec", options.SPECS, ids=lambda s: s.var)
def test_a_bad_value_is_refused_naming_its_option(spec: options.Spec) -> None:
    text = bad_text(spec)
    if text is None:
        assert isinstance(spec.kind, options.Text)
        with pytest.raises(UsageError, match=spec.var):
            options.from_words([f"{spec.var}=two\nlines"])
        return
    with pytest.raises(UsageError) as err:
        options.from_words([f"{spec.var}={text}"])
    message = str(err.value)
    assert message.startswith(f"{spec.var}=") and spec.kind.allowed in message
    assert "\n" not in message
    others = {s.var for s in options.SPECS} - {spec.var}
    assert not any(f"{v}=" in message or f" {v} " in message for v in others), message


def test_unknown_variable_names_the_likely_one() -> None:
    with pytest.raises(UsageError, match=r"SUBJETCS is not an option \(did you mean SUBJECTS\?\)"):
        options.from_words(["SUBJETCS=01"])


def test_make_refuses_a_bad_option_before_any_target_runs(tmp_path: Path) -> None:
    """``make -n`` runs nothing, yet a wrong option still stops make (it is read at parse time)."""
    for word, name in (("SUBJETCS=01", "SUBJETCS"), ("PERMUTATIONS=abc", "PERMUTATIONS"),
                       ("PREFETCH=abc", "PREFETCH"), ("DROP=maybe", "DROP")):  # fmt: skip
        proc = subprocess.run(
            ["make", "-s", "-n", "-C", str(REPO_ROOT), "3mm", word], capture_output=True, text=True
        )
        assert proc.returncode == 2, proc.stdout
        first = proc.stderr.strip().splitlines()[0]
        assert f"*** {name}" in first and "SUBJECTS=" not in first.replace(name, ""), first
        assert proc.stdout == ""  # nothing ran, not even a dry run of a recipe


def test_make_help_lists_every_option_and_target() -> None:
    proc = subprocess.run(["make", "-C", str(REPO_ROOT), "help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for spec in (*options.SPECS, *options.MAKE_VARIABLES):
        assert f"  {spec.var} " in out, spec.var
    for target in pipeline.target_help():
        assert f"  {target} " in out, target


def test_every_target_in_help_is_a_make_target() -> None:
    for target in pipeline.target_help():
        proc = subprocess.run(
            ["make", "-n", "-C", str(REPO_ROOT), target], capture_output=True, text=True
        )
        assert "No rule to make target" not in proc.stderr, (target, proc.stderr)


def test_fingerprint_ignores_byte_neutral_options() -> None:
    base = pipeline.Step("3mm", (1,), Options(), (), ("derivatives/3mm/subj01",))
    for spec in options.SPECS:
        step = dataclasses.replace(
            base, options=dataclasses.replace(Options(), **{spec.name: other_value(spec)})
        )
        if spec.changes_output and "3mm" in spec.targets and spec.name != "subjects":
            assert step.identity() != base.identity(), spec.var
        elif not spec.changes_output:
            assert step.identity() == base.identity(), spec.var


def _write_curated(folder: Path, labels: list[str]) -> None:
    from nsdprep.core.matrix import MatrixWriter

    folder.mkdir(parents=True)
    mask = np.zeros((3, 4, 5), bool)
    mask[1, 1:3, 2:4] = True
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), np.eye(4)), folder / "sub-01_mask.nii.gz")
    with MatrixWriter(folder / "sub-01_X.npy", mask, len(labels)) as w:
        for k in range(len(labels)):
            w.write(np.full(mask.shape, k, np.int16))
    np.save(folder / "sub-01_labels.npy", np.array(labels))
    np.save(folder / "sub-01_runs.npy", np.arange(1, len(labels) + 1))
    rows = "".join(f"{k}\t{lab}\n" for k, lab in enumerate(labels))
    (folder / "sub-01_trials.tsv").write_text("trial\tsupercat\n" + rows)


@pytest.mark.parametrize("mode", ["default", "crop", "legacy"])
def test_load_curated_opens_the_folder_of_its_label_rule(tmp_path: Path, mode: str) -> None:
    import nsdprep

    per_mode = {
        "default": ["animal", "food", "person"],
        "crop": ["animal", "vehicle", "person"],
        "legacy": ["sports", "food", "indoor"],
    }
    for m, labels in per_mode.items():
        _write_curated(tmp_path / pipeline.curated_dir(Options(labels=m)), labels)
    got = nsdprep.load_curated(1, dataset=tmp_path, labels=mode)
    assert got.labels.tolist() == per_mode[mode]
    with pytest.raises(UsageError, match="LABELS|labels"):
        nsdprep.load_curated(1, dataset=tmp_path, labels="crops")  # type: ignore[arg-type]
