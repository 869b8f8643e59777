"""Prefect flows and the CLI against a real Prefect API and a real PostgreSQL server.

Also the secrets sweep: the target's password and the age identity must not
appear in any captured output, Prefect run log, artifact or manifest.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pyrage import x25519

from strongroom.errors import AccessDenied, ServiceUnavailable, TargetNotEmpty
from tests.fixtures.ports import free_port
from tests.fixtures.postgres import PgDatabase
from tests.fixtures.strongroom_fixtures import signing_block_fields

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def identity() -> x25519.Identity:
    return x25519.Identity.generate()


@pytest.fixture
def blocks(prefect_api: str, pg_db: PgDatabase, tmp_path: Path, identity: x25519.Identity) -> str:
    from blocks import BackupRepository, EncryptionKey, PostgresTarget, register_all

    register_all()
    EncryptionKey(recipients=[str(identity.to_public())], identity=str(identity)).save(
        "default", overwrite=True
    )
    BackupRepository(**signing_block_fields(), local_path=str(tmp_path / "repo")).save(
        "default", overwrite=True
    )
    server = pg_db.server
    PostgresTarget(
        host=server.host,
        port=server.port,
        user=server.superuser,
        password=server.password,
        databases=[pg_db.name],
    ).save("flowdb", overwrite=True)
    pg_db.psql(
        "CREATE TABLE items (id int PRIMARY KEY, name text);"
        "INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 1000) g;"
    )
    return "flowdb"


def _api(coro_fn: Any) -> Any:
    from prefect.client.orchestration import get_client

    async def run() -> Any:
        async with get_client() as client:
            return await coro_fn(client)

    return asyncio.run(run())


def _run_text() -> str:
    """Every log line and artifact the Prefect API holds, as one text."""

    async def collect(client: Any) -> str:
        logs = await client.read_logs(limit=200)
        artifacts = await client.read_artifacts(limit=200)
        return "\n".join([str(line.message) for line in logs] + [str(a.data) for a in artifacts])

    return _api(collect)


def test_backup_verify_restore_flows_publish_artifacts(
    blocks: str,
    pg_db: PgDatabase,
    tmp_path: Path,
    identity: x25519.Identity,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    from flows.postgres import backup_postgresql, restore_postgresql
    from flows.verify import verify_backup_flow

    caplog.set_level(logging.DEBUG)
    manifest = backup_postgresql(target=blocks)
    assert manifest["details"]["databases"][0]["tables"][0]["rows"] == 1000
    assert verify_backup_flow(backup_id=manifest["backup_id"])["ok"]
    into = f"{pg_db.name}_r"
    report = restore_postgresql(target=blocks, target_database=into)
    assert report["rows_ok"]
    with pytest.raises(TargetNotEmpty):
        restore_postgresql(target=blocks, target_database=into)
    pg_db.server.drop_database(into)

    async def artifacts(client: Any) -> list[Any]:
        return await client.read_artifacts(limit=100)

    keys = {a.key for a in _api(artifacts)}
    assert f"backup-postgresql-{blocks}-summary" in keys
    assert f"backup-postgresql-{blocks}-table" in keys
    assert any(k and k.startswith("restore-postgresql") for k in keys)

    # the secrets sweep: captured output, Prefect logs and artifacts, manifests on disk
    secrets = [pg_db.server.password, str(identity)]
    out, err = capfd.readouterr()
    texts = [caplog.text, out, err, _run_text()]
    texts += [p.read_text() for p in (tmp_path / "repo").rglob("*.json")]
    for secret in secrets:
        for text in texts:
            assert secret not in text


def test_transient_failures_retry_and_permanent_ones_do_not(
    blocks: str,
    pg_db: PgDatabase,
) -> None:
    from blocks import PostgresTarget
    from flows.postgres import backup_postgresql

    PostgresTarget(port=free_port(), password="x" * 12).save("nowhere", overwrite=True)
    with pytest.raises(ServiceUnavailable):
        backup_postgresql(target="nowhere")
    server = pg_db.server
    PostgresTarget(
        host=server.host,
        port=server.port,
        password="wrong-password-123",
        databases=[pg_db.name],
    ).save("badpass", overwrite=True)
    with pytest.raises(AccessDenied):
        backup_postgresql(target="badpass")

    async def task_runs(client: Any) -> list[Any]:
        return await client.read_task_runs(limit=200)

    runs = [r for r in _api(task_runs) if r.name.startswith("backup-postgresql-")]
    counts = sorted(r.run_count for r in runs if r.state and r.state.is_failed())
    # one failed run retried twice (ServiceUnavailable), one not retried (AccessDenied)
    assert 3 in counts and 1 in counts


def _cli(*args: str, api: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_LOGGING_LEVEL": "WARNING"}
    return subprocess.run(
        [sys.executable, "-m", "strongroom.cli.app", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )


def test_cli_json_and_exit_codes(blocks: str, prefect_api: str, pg_db: PgDatabase) -> None:
    result = _cli("backup", "postgresql", blocks, "--json", api=prefect_api)
    assert result.returncode == 0, result.stderr
    backup_id = json.loads(result.stdout)["backup_id"]

    listing = json.loads(_cli("list", "--json", api=prefect_api).stdout)
    assert backup_id in [row["backup_id"] for row in listing]
    shown = json.loads(_cli("show", backup_id, "--json", api=prefect_api).stdout)
    assert shown["engine"] == "postgresql"
    verified = _cli("verify", backup_id, "--json", api=prefect_api)
    assert verified.returncode == 0 and json.loads(verified.stdout)["ok"]

    missing = _cli("show", "20200101T000000Z-abcdef", "--json", api=prefect_api)
    assert missing.returncode == 3
    assert backup_id in json.loads(missing.stdout)["error"]  # nearest ids are offered
    hostile = _cli("show", "../../etc/passwd", api=prefect_api)
    assert hostile.returncode == 2 and "invalid backup id" in hostile.stderr

    plan = _cli("restore", "postgresql", blocks, "--dry-run", "--json", api=prefect_api)
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["blocked"]
    refused = _cli("restore", "postgresql", blocks, api=prefect_api)
    assert refused.returncode == 5 and "drop_existing" in refused.stderr

    assert _cli("--help", api=prefect_api).returncode == 0
    for text in (result.stdout + result.stderr, refused.stderr, plan.stdout):
        assert pg_db.server.password not in text


def test_flows_with_an_s3_repository_block(
    blocks: str,
    pg_db: PgDatabase,
    s3_server: Any,
    s3_bucket: str,
) -> None:
    """The repository block wraps prefect-aws S3Bucket/AwsCredentials (moto over HTTP)."""
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    from blocks import BackupRepository
    from flows.postgres import backup_postgresql, restore_postgresql
    from flows.verify import verify_backup_flow

    creds = AwsCredentials(
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name="us-east-1",
        aws_client_parameters=AwsClientParameters(endpoint_url=s3_server.endpoint_url),
    )
    BackupRepository(
        **signing_block_fields(),
        s3_bucket=S3Bucket(bucket_name=s3_bucket, credentials=creds, bucket_folder="team"),
        prefix="pg",
        sse="AES256",
    ).save("s3repo", overwrite=True)
    manifest = backup_postgresql(target=blocks, repository="s3repo")
    assert manifest["repository"] == f"s3://{s3_bucket}/team/pg"
    assert verify_backup_flow(backup_id=manifest["backup_id"], repository="s3repo")["ok"]
    into = f"{pg_db.name}_s3"
    report = restore_postgresql(target=blocks, target_database=into, repository="s3repo")
    assert report["rows_ok"]
    pg_db.server.drop_database(into)
    keys = [o["Key"] for o in s3_server.s3().list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert f"team/pg/catalog/postgresql/{blocks}/{manifest['backup_id']}.json" in keys
    first = manifest["artifacts"][0]["key"]
    head = s3_server.s3().head_object(Bucket=s3_bucket, Key=f"team/pg/{first}")
    assert head["ServerSideEncryption"] == "AES256"
