"""The operator path on the PostgreSQL gauntlet: ``strongroom backup``, ``verify`` and a
selective ``restore`` as subprocesses of the installed command, against a real
``prefect server`` (the module-scoped ``prefect_server`` fixture that
``tests/test_operator_e2e.py`` builds its stack on; no worker is needed: the
``strongroom`` command runs the flows itself and reports them to that server).

What was restored is compared with the source by content fingerprint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from strongroom.config import EncryptionConfig
from strongroom.deploy.local_server import ROOT, PrefectServer
from strongroom.sandbox import gauntlet_pg as g
from tests.fixtures.pg_gauntlet import Gauntlet
from tests.fixtures.prefect_server import prefect_server
from tests.fixtures.strongroom_fixtures import signing_block_fields

pytestmark = pytest.mark.slow

__all__ = ["prefect_server"]

STRONGROOM = str(Path(sys.executable).with_name("strongroom"))
FIGURES: dict[str, float] = {}


def _cli(server: PrefectServer, *args: str, timeout: float = 900) -> Any:
    """``strongroom ARGS --json`` in a subprocess; its JSON document (exit 0 asserted)."""
    env = {**os.environ, "PREFECT_API_URL": server.api_url, "COLUMNS": "250"}
    started = time.monotonic()
    done = subprocess.run(
        [STRONGROOM, *args, "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )
    FIGURES[f"{args[0]}_s"] = round(time.monotonic() - started, 2)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr}"
    return json.loads(done.stdout)


def _flow_runs(names: set[str]) -> dict[str, list[str]]:
    import asyncio

    from prefect.client.orchestration import get_client

    async def read() -> dict[str, list[str]]:
        async with get_client() as client:
            runs = await client.read_flow_runs(limit=200)
            flows = {f.id: f.name for f in await client.read_flows(limit=200)}
        found: dict[str, list[str]] = {}
        for run in runs:
            name = flows.get(run.flow_id, "")
            if name in names and run.state is not None:
                found.setdefault(name, []).append(run.state.name)
        return found

    return asyncio.run(read())


def test_gauntlet_backup_and_selective_restore_through_the_cli(
    prefect_server: PrefectServer,
    pg_gauntlet: Gauntlet,
    age_key: EncryptionConfig,
    tmp_path: Path,
) -> None:
    from blocks import BackupRepository, EncryptionKey, PostgresTarget, register_all

    register_all()
    suffix = uuid.uuid4().hex[:6]
    repo_block, key_block, target = f"gauntlet-repo-{suffix}", f"gauntlet-key-{suffix}", "gx-op"
    BackupRepository(**signing_block_fields(), local_path=str(tmp_path / "repo")).save(
        repo_block, overwrite=True
    )
    EncryptionKey(recipients=age_key.recipients, identity=age_key.identities[0]).save(
        key_block, overwrite=True
    )
    server = pg_gauntlet.db.server
    PostgresTarget(
        host=server.host,
        port=server.port,
        user=server.superuser,
        password=SecretStr(server.password),
        databases=[pg_gauntlet.db.name],
    ).save(target, overwrite=True)
    where = ["--repository", repo_block, "--key", key_block]

    manifest = _cli(prefect_server, "backup", "postgresql", target, *where)
    assert sum(a["raw_size"] for a in manifest["artifacts"]) > 300 * 1024 * 1024
    verified = _cli(prefect_server, "verify", manifest["backup_id"], *where)
    assert verified["ok"], verified

    # the partitioned parent (all its partitions), the 200+ MB table in the middle of the
    # dump, and the table whose schema and name hold quotes, ';' and '--'
    hostile = f"{g.HOSTILE_SCHEMA}.{g.HOSTILE_TABLE}"
    into = f"gx_op_{suffix}"
    try:
        report = _cli(
            prefect_server,
            "restore",
            "postgresql",
            target,
            "--backup-id",
            manifest["backup_id"],
            "--into",
            into,
            "--table",
            "parts.events",
            "--table",
            f"{g.BIG[0]}.{g.BIG[1]}",
            "--table",
            hostile,
            *where,
        )
        assert report["rows_ok"], report
        restored = server.psql(
            "SELECT n.nspname || E'\\t' || c.relname FROM pg_class c JOIN pg_namespace n"
            " ON n.oid = c.relnamespace WHERE c.relkind IN ('r','p','m','f')"
            " AND n.nspname NOT IN ('pg_catalog', 'information_schema')",
            db=into,
        )
        keys = sorted(tuple(line.split("\t", 1)) for line in restored.splitlines() if line)
        parts = {k for k in keys if k[0] == "parts"}
        assert len(parts) == 6 and set(keys) == parts | {g.BIG, (g.HOSTILE_SCHEMA, g.HOSTILE_TABLE)}
        assert sorted(report["tables"]) == sorted(f"{s}.{t}" for s, t in keys)
        prints = g.fingerprint(server.dsn(into), keys)  # type: ignore[arg-type]
        source = pg_gauntlet.fingerprint["relations"]
        assert prints["relations"] == {f"{s}.{t}": source[f"{s}.{t}"] for s, t in keys}
    finally:
        server.drop_database(into)
    runs = _flow_runs({"backup-postgresql", "restore-postgresql", "verify-backup"})
    assert all(states and set(states) == {"Completed"} for states in runs.values()), runs
    assert {"backup-postgresql", "restore-postgresql"} <= set(runs)
    print("gauntlet operator figures:", FIGURES)
