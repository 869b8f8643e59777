"""Shared helpers for the fault suite: a big database, child processes, fingerprints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from strongroom.config import EncryptionConfig, PostgresConnection, RepositoryConfig
from strongroom.engines.postgres.restore import PgRestoreRequest
from strongroom.sandbox.postgres import PostgresServer

ROOT = Path(__file__).resolve().parents[2]

# ~45 MB of poorly compressible rows: big enough that a backup or restore is still
# streaming when the test kills it, small enough to stay fast on two cores.
BIG_POPULATE = """
CREATE TABLE big (id int PRIMARY KEY, payload text);
INSERT INTO big SELECT g, md5(random()::text) || md5(random()::text) || md5(random()::text)
  || md5(random()::text) || md5(random()::text) || md5(random()::text)
  FROM generate_series(1, 220000) g;
CREATE TABLE small (id int PRIMARY KEY, val text);
INSERT INTO small SELECT g, 'v' || g FROM generate_series(1, 100) g;
"""

FINGERPRINT = (
    "SELECT (SELECT count(*) FROM big) || ':' || "
    "(SELECT md5(string_agg(payload, ',' ORDER BY id)) FROM big) || ':' || "
    "(SELECT md5(string_agg(val, ',' ORDER BY id)) FROM small)"
)


def fingerprint(server: PostgresServer, db: str) -> str:
    return server.psql(FINGERPRINT, db=db).strip()


def databases(server: PostgresServer) -> set[str]:
    out = server.psql("SELECT datname FROM pg_database")
    return {line.strip() for line in out.splitlines() if line.strip()}


def child_env(
    conn: PostgresConnection,
    config: RepositoryConfig,
    enc: EncryptionConfig,
    *,
    op: str,
    request: PgRestoreRequest | None = None,
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "AWS_"))}
    assert conn.password is not None
    env.update(
        SR_OP=op,
        SR_PG=conn.model_dump_json(exclude={"password"}),
        SR_PG_PASSWORD=conn.password.get_secret_value(),
        SR_REPO=config.model_dump_json(exclude={"secret_access_key"}),
        SR_REPO_SECRET=(
            config.secret_access_key.get_secret_value() if config.secret_access_key else ""
        ),
        SR_AGE_RECIPIENT=enc.recipients[0],
        SR_AGE_IDENTITY=enc.identities[0].get_secret_value() if enc.identities else "",
        SR_REQUEST=(request or PgRestoreRequest()).model_dump_json(),
        PYTHONPATH=str(ROOT),
    )
    return env


def start_child(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A child in its own process group (so pg_dump/psql die with it)."""
    return subprocess.Popen(
        [sys.executable, "-c", "from tests.faults._child import main; main()"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def run_child(env: dict[str, str], timeout: float = 120) -> dict[str, Any]:
    proc = start_child(env)
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
    return dict(json.loads(out.decode().strip().splitlines()[-1]))


def kill_when(
    proc: subprocess.Popen[bytes],
    ready: Callable[[], bool],
    *,
    timeout: float = 60,
    settle: float = 0.0,
) -> None:
    """Poll ``ready`` until it holds, then SIGKILL the child's whole process group."""
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                _, err = proc.communicate()
                raise AssertionError(
                    "the child finished before the fault could be injected: "
                    + err.decode(errors="replace")[-2000:]
                )
            if time.monotonic() > deadline:
                raise AssertionError("the fault point was never reached")
            time.sleep(0.005)
        if settle:
            time.sleep(settle)
        assert proc.poll() is None, "the child finished before it could be killed"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
