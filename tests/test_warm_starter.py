"""The warm starter (strongroom.deploy.warm) and the process pools' flow-run command
(strongroom.deploy.engine_start), as real processes.

A run through a warm starter must reach Prefect's engine with the caller's arguments,
stdout/stderr and exit code; without a starter (no variable, or a socket nobody listens
on) the command must start the engine itself. Real flow runs through the starter are
in tests/test_operator_e2e.py (the fleet test checks the starter's log).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from strongroom.deploy.local_server import ROOT

BAD_ID = "not-a-flow-run-id"


@pytest.fixture(scope="module")
def starter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    home = tmp_path_factory.mktemp("warm")
    sock, log = home / "warm.sock", home / "warm.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "strongroom.deploy.warm", str(sock)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while "ready on" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert oct(sock.stat().st_mode & 0o777) == oct(0o600)
        yield sock, log
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert not sock.exists()  # removed on the way out


def _start(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "strongroom.deploy.engine_start", BAD_ID],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_run_is_forked_by_the_starter_with_its_output_and_exit_code(
    starter: tuple[Path, Path],
) -> None:
    sock, log = starter
    before = log.read_text().count("started for flow run")
    result = _start({"STRONGROOM_WARM_SOCKET": str(sock)})
    # Prefect's engine ran in the fork: its complaint about the id reached our stderr
    assert result.returncode == 1, result
    assert "Invalid flow run id" in result.stderr and BAD_ID in result.stderr
    text = log.read_text()
    assert text.count("started for flow run") == before + 1
    assert "ended (exit 1)" in text


def test_without_a_starter_the_command_starts_the_engine_itself(
    starter: tuple[Path, Path], tmp_path: Path
) -> None:
    _, log = starter
    before = log.read_text()
    for env in ({}, {"STRONGROOM_WARM_SOCKET": str(tmp_path / "nobody.sock")}):
        result = _start(env)
        assert result.returncode == 1, result
        assert "Invalid flow run id" in result.stderr and BAD_ID in result.stderr
    assert log.read_text() == before  # the starter was not involved
