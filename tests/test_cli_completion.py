"""Shell completion of the ``strongroom`` command (typer/click completion), exercised
the way bash calls it: the installed entry point with COMP_WORDS/COMP_CWORD set."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

STRONGROOM = str(Path(sys.executable).with_name("strongroom"))


def _complete(words: str) -> list[str]:
    parts = words.split(" ")
    env = {
        **os.environ,
        "_STRONGROOM_COMPLETE": "complete_bash",
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(parts) - 1),
    }
    out = subprocess.run([STRONGROOM], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_commands_subcommands_and_options_complete() -> None:
    assert _complete("strongroom res") == ["restore"]
    assert {"postgresql", "postgresql-pitr", "clickhouse", "redis"} <= set(
        _complete("strongroom restore ")
    )
    assert "--json" in _complete("strongroom list --j")
    assert _complete("strongroom no-such-thing") == []


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_the_completion_script_for_each_shell(shell: str) -> None:
    out = subprocess.run(
        [STRONGROOM, "--show-completion", shell], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "_STRONGROOM_COMPLETE" in out.stdout
