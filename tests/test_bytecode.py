"""Bytecode is written at install time only, and a file cut short (full disk) is removed."""

from __future__ import annotations

import importlib
import os
import py_compile
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nsdprep.drive import bytecode


def test_imported_names_include_lazy_and_from_imports_not_relative(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(
        textwrap.dedent(
            """
            import os, json.decoder
            from . import sibling
            from .sibling import thing

            def lazy():
                from sklearn.linear_model import LogisticRegression
                import nilearn.image as image
            """
        )
    )
    names = bytecode.imported_names([tmp_path])
    assert {"os", "json.decoder", "sklearn.linear_model", "nilearn.image"} <= names
    assert "sklearn.linear_model.LogisticRegression" in names  # tried, skipped if not a module
    assert not any("sibling" in name for name in names)


def _module(folder: Path, name: str) -> Path:
    source = folder / f"{name}.py"
    source.write_text("VALUE = 41 + 1\n")
    return Path(py_compile.compile(str(source), doraise=True))


def _import_value(folder: Path, name: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(folder), "PYTHONDONTWRITEBYTECODE": "1"}
    code = f"import {name}; print({name}.VALUE)"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_a_truncated_pyc_breaks_imports_until_it_is_removed(tmp_path: Path) -> None:
    since = time.time() - 1
    whole, cut = _module(tmp_path, "whole"), _module(tmp_path, "cut")
    cut.write_bytes(cut.read_bytes()[:-20])  # what a write on a full disk leaves
    broken = _import_value(tmp_path, "cut")
    assert broken.returncode != 0 and "marshal data too short" in broken.stderr

    assert bytecode.check_written([whole, cut], since) == (1, 1)
    assert whole.exists() and not cut.exists()
    assert _import_value(tmp_path, "cut").stdout.strip() == "42"


def test_bytecode_files_name_the_pyc_of_each_imported_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pyc = _module(tmp_path, "listed_here")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        importlib.import_module("listed_here")
        assert pyc in bytecode.bytecode_files()
    finally:
        sys.modules.pop("listed_here", None)


def test_files_written_before_the_install_are_left_alone(tmp_path: Path) -> None:
    old = _module(tmp_path, "old")
    old.write_bytes(old.read_bytes()[:-20])
    os.utime(old, (time.time() - 3600,) * 2)
    assert bytecode.check_written([old, tmp_path / "never.pyc"], time.time() - 1) == (0, 0)
    assert old.exists()


def test_refuses_where_bytecode_is_not_written(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    with pytest.raises(SystemExit) as exit_:
        bytecode.main(["code"])
    assert exit_.value.code == 2


def test_make_runs_every_command_without_writing_bytecode() -> None:
    """The Makefile's commands inherit PYTHONDONTWRITEBYTECODE=1 whatever the caller's setting."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        ["make", "-s", "-C", str(root), "--eval=show-env: ; @echo $$PYTHONDONTWRITEBYTECODE",
         "show-env"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "1"
