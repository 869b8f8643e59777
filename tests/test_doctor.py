"""``strongroom doctor`` against the session's real Prefect API, PostgreSQL, Redis and moto
S3: all ok on the test servers; the right line fails (and the exit code is its error
class) for a wrong password, a missing tool, an unwritable repository, WAL archiving off."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from strongroom.config import EncryptionConfig
from strongroom.sandbox.postgres import PostgresServer
from strongroom.sandbox.redis import RedisServer
from tests.fixtures.s3 import MotoServer
from tests.fixtures.strongroom_fixtures import signing_block_fields


@pytest.fixture(scope="module")
def doctor_blocks(
    prefect_api: str,
    pg_server: PostgresServer,
    redis_server: RedisServer,
    s3_server: MotoServer,
    age_key: EncryptionConfig,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    from blocks import BackupRepository, EncryptionKey, PostgresTarget, RedisTarget, register_all

    register_all()
    pg = {"host": pg_server.host, "port": pg_server.port, "user": pg_server.superuser}
    PostgresTarget(**pg, password=SecretStr(pg_server.password)).save("doc-pg", overwrite=True)
    PostgresTarget(**pg, password=SecretStr("wrong")).save("doc-pg-badpw", overwrite=True)
    PostgresTarget(**pg, password=SecretStr(pg_server.password), pitr=True).save(
        "doc-pg-pitr", overwrite=True
    )
    RedisTarget(
        host=redis_server.host, port=redis_server.port, password=SecretStr(redis_server.password)
    ).save("doc-redis", overwrite=True)
    root = tmp_path_factory.mktemp("doctor")
    BackupRepository(**signing_block_fields(), local_path=str(root / "repo")).save(
        "doc-local", overwrite=True
    )
    blocker = root / "a-file"
    blocker.write_text("not a folder")
    BackupRepository(**signing_block_fields(), local_path=str(blocker / "repo")).save(
        "doc-unwritable", overwrite=True
    )
    bucket = s3_server.create_bucket()
    creds = AwsCredentials(
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name="us-east-1",
        aws_client_parameters=AwsClientParameters(endpoint_url=s3_server.endpoint_url),
    )
    BackupRepository(
        **signing_block_fields(), s3_bucket=S3Bucket(bucket_name=bucket, credentials=creds)
    ).save("doc-s3", overwrite=True)
    identity = age_key.identities[0].get_secret_value()
    EncryptionKey(recipients=age_key.recipients, identity=identity).save("doc-key", overwrite=True)
    EncryptionKey(recipients=age_key.recipients).save("doc-key-public", overwrite=True)
    return {"api": prefect_api}


def _doctor(*args: str) -> tuple[int, dict[str, Any]]:
    from strongroom.cli.app import app

    result = CliRunner().invoke(app, ["doctor", *args, "--json"])
    doc = json.loads(result.stdout)
    assert doc["exit_code"] == result.exit_code
    return result.exit_code, doc


def _by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in doc["checks"]}


def test_all_ok_against_the_test_servers(doctor_blocks: dict[str, Any]) -> None:
    for target in ("doc-pg", "doc-redis"):
        for repo in ("doc-local", "doc-s3"):
            code, doc = _doctor(target, "-r", repo, "-k", "doc-key")
            assert code == 0, doc
            assert doc["ok"] is True
            assert all(c["status"] == "ok" for c in doc["checks"]), doc
            assert {"status", "reason", "fix", "exit_code", "name"} == set(doc["checks"][0])
            checks = _by_name(doc)
            assert "Prefect" in checks["prefect-api"]["reason"]
            assert f"{target}: connect" in checks
    checks = _by_name(_doctor("doc-pg", "-r", "doc-s3", "-k", "doc-key")[1])
    assert ">= server 15" in checks["doc-pg: tool-pg_dump"]["reason"]
    assert ">= server 15" in checks["doc-pg: tool-pg_restore"]["reason"]
    assert "against S3" in checks["clock-skew"]["reason"]
    assert "versioning" in checks["repository-versioning"]["reason"]
    assert "wrote, read and deleted doctor/" in checks["repository-write"]["reason"]


def test_text_output_has_one_line_per_check(doctor_blocks: dict[str, Any]) -> None:
    from strongroom.cli.app import app

    result = CliRunner().invoke(app, ["doctor", "doc-pg", "-r", "doc-local", "-k", "doc-key"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    n = len(_doctor("doc-pg", "-r", "doc-local", "-k", "doc-key")[1]["checks"])
    assert len(lines) == n + 1 and lines[-1] == f"{n} checks: 0 failed, 0 warnings"


def test_wrong_password_fails_connect_with_exit_7(doctor_blocks: dict[str, Any]) -> None:
    code, doc = _doctor("doc-pg-badpw", "-r", "doc-local", "-k", "doc-key")
    assert code == 7, doc
    line = _by_name(doc)["doc-pg-badpw: connect"]
    assert line["status"] == "fail" and line["exit_code"] == 7
    assert "wrong" not in json.dumps(doc)  # the password itself is never shown
    assert [c["name"] for c in doc["checks"] if c["status"] == "fail"] == ["doc-pg-badpw: connect"]


def test_missing_tool_fails_its_line(
    doctor_blocks: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no redis-server
    code, doc = _doctor("doc-redis", "-r", "doc-local", "-k", "doc-key")
    assert code == 8, doc
    failed = [c for c in doc["checks"] if c["status"] == "fail"]
    assert [c["name"] for c in failed] == ["doc-redis: tool-redis-server"]
    assert "install redis-server" in failed[0]["fix"]


def test_unwritable_repository_fails_the_repository_line(doctor_blocks: dict[str, Any]) -> None:
    code, doc = _doctor("doc-pg", "-r", "doc-unwritable", "-k", "doc-key")
    assert code != 0, doc
    failed = [c for c in doc["checks"] if c["status"] == "fail"]
    assert [c["name"] for c in failed] == ["repository-write"], failed
    assert failed[0]["exit_code"] == code
    assert "cannot write the probe doctor/probe-" in failed[0]["reason"]


def test_wal_archiving_off_fails_for_a_pitr_target(doctor_blocks: dict[str, Any]) -> None:
    code, doc = _doctor("doc-pg-pitr", "-r", "doc-local", "-k", "doc-key")
    assert code == 2, doc
    line = _by_name(doc)["doc-pg-pitr: wal-archiving"]
    assert line["status"] == "fail" and "archive_mode is off" in line["reason"]
    assert "strongroom-wal" in line["fix"]
    assert "doc-pg: wal-archiving" not in _by_name(_doctor("doc-pg", "-r", "doc-local")[1])


def test_key_without_identity_warns_and_exits_0(doctor_blocks: dict[str, Any]) -> None:
    code, doc = _doctor("doc-pg", "-r", "doc-local", "-k", "doc-key-public")
    assert code == 0, doc
    line = _by_name(doc)["key-identity"]
    assert line["status"] == "warn" and "restores and verify cannot run here" in line["reason"]


def test_unknown_target_is_exit_3_with_nearest(doctor_blocks: dict[str, Any]) -> None:
    code, doc = _doctor("doc-pgg", "-r", "doc-local", "-k", "doc-key")
    assert code == 3, doc
    assert "nearest first: doc-pg" in _by_name(doc)["targets"]["reason"]
    code, doc = _doctor("doc-pg", "-r", "doc-locl", "-k", "doc-kye")
    assert code == 3, doc
    checks = _by_name(doc)
    assert "nearest first: doc-local" in checks["repository"]["reason"]
    assert "nearest first: doc-key" in checks["key-recipients"]["reason"]
    assert checks["doc-pg: connect"]["status"] == "ok"  # the other checks still ran


def test_object_lock_bucket_is_reported_and_no_probe_is_left(
    doctor_blocks: dict[str, Any], s3_server: MotoServer
) -> None:
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    from blocks import BackupRepository

    bucket = s3_server.create_bucket(object_lock=True)
    creds = AwsCredentials(
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name="us-east-1",
        aws_client_parameters=AwsClientParameters(endpoint_url=s3_server.endpoint_url),
    )
    BackupRepository(
        **signing_block_fields(), s3_bucket=S3Bucket(bucket_name=bucket, credentials=creds)
    ).save("doc-s3-locked", overwrite=True)
    code, doc = _doctor("doc-redis", "-r", "doc-s3-locked", "-k", "doc-key")
    assert code == 0, doc
    checks = _by_name(doc)
    assert "object lock enabled" in checks["repository-object-lock"]["reason"]
    assert "versioning Enabled" in checks["repository-versioning"]["reason"]
    assert checks["repository-write"]["status"] == "warn"
    assert "object lock" in checks["repository-write"]["reason"]
    versions = s3_server.s3().list_object_versions(Bucket=bucket)
    assert not versions.get("Versions") and not versions.get("DeleteMarkers")


def test_failing_archive_command_fails_the_archiver_line(doctor_blocks: dict[str, Any]) -> None:
    import time

    from blocks import PostgresTarget

    # an archive_command naming strongroom-wal whose every attempt exits 1 (a plain
    # failure: a missing binary, exit 127, would restart the archiver uncounted)
    command = "[ -e /nonexistent/%f ] && strongroom-wal push %p"
    with PostgresServer(archive_command=command) as server:
        PostgresTarget(
            host=server.host,
            port=server.port,
            user=server.superuser,
            password=SecretStr(server.password),
            pitr=True,
        ).save("doc-pg-archfail", overwrite=True)
        server.psql("CREATE TABLE t AS SELECT 1 AS x; SELECT pg_switch_wal();")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if int(server.psql("SELECT failed_count FROM pg_stat_archiver").strip() or 0):
                break
            time.sleep(0.5)
        code, doc = _doctor("doc-pg-archfail", "-r", "doc-local", "-k", "doc-key")
    assert code == 8, doc
    checks = _by_name(doc)
    assert checks["doc-pg-archfail: wal-archiving"]["status"] == "ok"
    line = checks["doc-pg-archfail: wal-archiver"]
    assert line["status"] == "fail" and "last archive attempt failed" in line["reason"]


def test_clickhouse_target_and_its_refused_password(
    doctor_blocks: dict[str, Any], clickhouse_servers: dict[str, Any]
) -> None:
    from blocks import ClickHouseTarget
    from tests.fixtures.clickhouse import started_server

    server = started_server("ch26", clickhouse_servers)
    fields = {"host": server.host, "port": server.tcp_port, "http_port": server.http_port}
    ClickHouseTarget(**fields, user=server.user).save("doc-ch", overwrite=True)
    ClickHouseTarget(**fields, user=server.user, password=SecretStr("nope-nope")).save(
        "doc-ch-badpw", overwrite=True
    )
    code, doc = _doctor("doc-ch", "-r", "doc-local", "-k", "doc-key")
    assert code == 0, doc
    checks = _by_name(doc)
    assert checks["doc-ch: connect"]["status"] == "ok"
    assert "ClickHouse 26." in checks["doc-ch: connect"]["reason"]
    assert checks["doc-ch: version"]["status"] == "ok"
    assert checks["doc-ch: tool-clickhouse-client"]["status"] in ("ok", "warn")
    code, doc = _doctor("doc-ch-badpw", "-r", "doc-local", "-k", "doc-key")
    assert code == 7, doc
    assert _by_name(doc)["doc-ch-badpw: connect"]["status"] == "fail"
    assert "nope-nope" not in json.dumps(doc)


def test_refused_s3_credentials_fail_the_repository_line(
    doctor_blocks: dict[str, Any], seaweed_server: Any
) -> None:
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    from blocks import BackupRepository

    bucket = seaweed_server.create_bucket()
    creds = AwsCredentials(
        aws_access_key_id=seaweed_server.access_key,
        aws_secret_access_key="not-the-secret",
        region_name="us-east-1",
        aws_client_parameters=AwsClientParameters(endpoint_url=seaweed_server.endpoint_url),
    )
    BackupRepository(
        **signing_block_fields(), s3_bucket=S3Bucket(bucket_name=bucket, credentials=creds)
    ).save("doc-s3-denied", overwrite=True)
    good = creds.model_copy(update={"aws_secret_access_key": seaweed_server.secret_key})
    BackupRepository(
        **signing_block_fields(), s3_bucket=S3Bucket(bucket_name=bucket, credentials=good)
    ).save("doc-s3-seaweed", overwrite=True)
    code, doc = _doctor("doc-redis", "-r", "doc-s3-denied", "-k", "doc-key")
    assert code == 7, doc
    failed = [c for c in doc["checks"] if c["status"] == "fail"]
    assert [c["name"] for c in failed] == ["repository"], failed
    assert "not-the-secret" not in json.dumps(doc)
    code, doc = _doctor("doc-redis", "-r", "doc-s3-seaweed", "-k", "doc-key")
    assert code == 0 and all(c["status"] == "ok" for c in doc["checks"]), doc
    assert "wrote, read and deleted" in _by_name(doc)["repository-write"]["reason"]


def test_no_prefect_api_is_exit_6_and_starts_no_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))  # no profile with an API URL
    code, doc = _doctor()
    assert code == 6, doc
    assert [c["name"] for c in doc["checks"]] == ["prefect-api"]
    assert "PREFECT_API_URL" in doc["checks"][0]["reason"]


def test_a_client_older_than_the_server_fails() -> None:
    from strongroom.cli.doctor_checks import _major, pg_tool_check
    from strongroom.errors import ToolFailed

    assert _major("pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)") == 15
    assert _major("7.2.4") == 7
    installed = _major(pg_tool_check("t", "pg_dump", None).reason)
    assert installed is not None
    assert pg_tool_check("t", "pg_dump", installed * 10000).status == "ok"
    with pytest.raises(ToolFailed, match="older than the server"):
        pg_tool_check("t", "pg_dump", (installed + 1) * 10000)


def test_clock_skew_bound() -> None:
    import datetime as dt
    import email.utils

    from strongroom.cli.doctor_checks import MAX_SKEW_S, clock_skew

    now = dt.datetime.now(dt.UTC)
    behind = email.utils.format_datetime(now - dt.timedelta(seconds=4 * MAX_SKEW_S), usegmt=True)
    line = clock_skew(behind)
    assert line.status == "warn" and "off S3's" in line.reason and line.exit_code == 0
    assert clock_skew(email.utils.format_datetime(now, usegmt=True)).status == "ok"
    assert clock_skew(None).status == "warn"


def test_a_block_the_engine_refuses_is_exit_2_on_its_line(doctor_blocks: dict[str, Any]) -> None:
    from blocks import RedisTarget

    # plaintext to a non-loopback address: the engine's connection model refuses it
    RedisTarget(host="192.0.2.10", port=6379).save("doc-redis-plain", overwrite=True)
    code, doc = _doctor("doc-redis-plain", "-r", "doc-local", "-k", "doc-key")
    assert code == 2, doc
    failed = [c for c in doc["checks"] if c["status"] == "fail"]
    assert [c["name"] for c in failed] == ["doc-redis-plain: connect"], failed
