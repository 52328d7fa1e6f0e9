"""The command line's outcomes: one line and an exit code, and nothing left behind for the next."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from nsdprep import cli
from nsdprep.testing import synth


def test_an_interrupted_command_leaves_the_next_one_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A SIGTERM during one command is that command's: the next one's error is its own (exit 2,
    not 130), and the process's own handlers are back once each command returns."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)

    def signalled(_args: object) -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        return 0

    with monkeypatch.context() as m:
        m.setattr(synth, "main", signalled)
        assert cli.main(["synth", str(tmp_path / "a")]) == cli.EXIT_INTERRUPTED
    assert "nsdprep synth: interrupted" in capsys.readouterr().err
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before

    assert cli.main(["synth", str(tmp_path / "b"), "--sessions", "0,1"]) == cli.EXIT_ERROR
    assert "sessions must be >= 1" in capsys.readouterr().err
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
