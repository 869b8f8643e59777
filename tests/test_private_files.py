"""Decrypted RDB scratch files are private; restart commands see a minimal environment."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from strongroom.private_files import create_private, minimal_env, private_folder


def test_private_file_is_0600_while_it_exists(tmp_path: Path) -> None:
    folder = private_folder(tmp_path)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    path = folder / "backup.rdb"
    old = os.umask(0)
    try:
        with create_private(path) as handle:
            handle.write(b"REDIS0011")
            assert stat.S_IMODE(os.fstat(handle.fileno()).st_mode) == 0o600
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_planted_symlink_does_not_redirect(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    planted = tmp_path / "predictable.rdb"
    planted.symlink_to(victim)
    with pytest.raises(OSError):
        create_private(planted)
    assert victim.read_bytes() == b"keep"
    existing = tmp_path / "existing.rdb"
    existing.write_bytes(b"x")
    with pytest.raises(FileExistsError):
        create_private(existing)


def test_restart_command_does_not_see_worker_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRONGROOM_TEST_SECRET", "s3cr3t-value")
    env = minimal_env({"STRONGROOM_REDIS_PORT": "6379"})
    out = subprocess.run(["env"], env=env, capture_output=True, text=True, check=True).stdout
    assert "s3cr3t-value" not in out and "STRONGROOM_TEST_SECRET" not in out
    assert "STRONGROOM_REDIS_PORT=6379" in out
    assert set(env) <= {"PATH", "HOME", "LANG", "STRONGROOM_REDIS_PORT"}
