"""The CLI's read path without Prefect (strongroom.cli.repo_source): --repository-url,
the block over one HTTP GET, the cached repository descriptor (no secret in it) and the
fallback to it when the Prefect API is down."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from strongroom.cli import repo_source
from strongroom.config import RepositoryConfig
from strongroom.errors import InvalidInput
from tests.fixtures.ports import free_port
from tests.fixtures.postgres import PgDatabase
from tests.fixtures.strongroom_fixtures import (
    TEST_PUBLIC_KEY,
    TEST_SIGNER,
    pg_connection,
    signed_config,
    signing_block_fields,
)

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, env: dict[str, str | None]) -> subprocess.CompletedProcess[str]:
    """``python -X importtime -m strongroom.cli.app ARGS`` (stderr lists every import)."""
    run_env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    for key, value in env.items():
        if value is None:
            run_env.pop(key, None)
        else:
            run_env[key] = value
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "strongroom.cli.app", *args],
        capture_output=True,
        text=True,
        env={**run_env, "COLUMNS": "200"},
        cwd=ROOT,
        timeout=120,
    )


def _imported(stderr: str) -> set[str]:
    return {
        line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if "import time:" in line
    }


@pytest.fixture
def backed_up(pg_db: PgDatabase, tmp_path: Path, age_key: Any) -> tuple[Path, str]:
    """A local repository holding one signed backup of ``pg_db``: (root, backup id)."""
    from strongroom.engines.postgres.backup import backup_postgres
    from tests.fixtures.strongroom_fixtures import make_local_repo

    pg_db.psql("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1), (2);")
    root = tmp_path / "repo"
    config = signed_config(kind="local", path=str(root))
    manifest = backup_postgres(
        pg_connection(pg_db, "reads"), make_local_repo(root), config, age_key
    )
    return root, manifest.backup_id


def test_repository_url_forms(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    trust = tmp_path / "trusted.pem"
    trust.write_text(TEST_PUBLIC_KEY)
    local = repo_source.config_from_url(f"file://{tmp_path}/repo", str(trust))
    assert (local.kind, local.path) == ("local", f"{tmp_path}/repo")
    assert local.trusted_signers == [TEST_PUBLIC_KEY] and local.signing_key is None

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    s3 = repo_source.config_from_url("s3://bucket-a/team/pg/")
    assert (s3.kind, s3.bucket, s3.prefix) == ("s3", "bucket-a", "team/pg")
    assert (s3.endpoint_url, s3.region, s3.access_key_id) == (
        "http://127.0.0.1:9",
        "eu-west-3",
        None,
    )
    for bad in ("s3://key:secret@bucket/p", "http://example.com/repo", "file://host/x", "s3:///p"):
        with pytest.raises(InvalidInput):
            repo_source.config_from_url(bad)


def test_descriptor_holds_no_secret(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1/api")
    monkeypatch.delenv(repo_source.CACHE_ENV, raising=False)
    config = signed_config(kind="local", path=str(tmp_path / "repo"))
    path = repo_source.write_descriptor("default", config)
    assert path is not None and path.parent.parent.parent == tmp_path / "config"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    private = TEST_SIGNER.private_pem().get_secret_value()
    assert "PRIVATE" not in text and private.splitlines()[1] not in text
    cached = repo_source.read_descriptor("default")
    assert cached is not None
    assert cached[0].path == config.path and cached[0].trusted_signers == [TEST_PUBLIC_KEY]
    assert cached[0].signing_key is None
    # one descriptor per API and block name
    assert repo_source.read_descriptor("other") is None

    s3 = RepositoryConfig.model_validate(
        {"kind": "s3", "bucket": "b", "access_key_id": "AKID", "secret_access_key": "s3cr3t-v4lue"}
    )
    assert repo_source.write_descriptor("s3repo", s3) is None
    assert not repo_source.descriptor_path("s3repo").exists()
    monkeypatch.setenv(repo_source.CACHE_ENV, "0")
    assert repo_source.read_descriptor("default") is None
    assert repo_source.write_descriptor("again", config) is None


def test_read_commands_without_prefect(backed_up: tuple[Path, str], tmp_path: Path) -> None:
    root, backup_id = backed_up
    trust = tmp_path / "trusted.pem"
    trust.write_text(TEST_PUBLIC_KEY)
    env: dict[str, str | None] = {"PREFECT_API_URL": None, "XDG_CONFIG_HOME": str(tmp_path)}
    url = root.as_uri()
    listed = _cli("list", "--repository-url", url, "--trust", str(trust), "--json", env=env)
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert [r["backup_id"] for r in json.loads(listed.stdout)] == [backup_id]
    assert not {m for m in _imported(listed.stderr) if m.split(".")[0] in ("prefect", "flows")}
    shown = _cli(
        "show",
        "latest",
        "--json",
        env={**env, "STRONGROOM_REPOSITORY_URL": url, "STRONGROOM_TRUSTED_SIGNERS": str(trust)},
    )
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert json.loads(shown.stdout)["backup_id"] == backup_id
    assert "prefect" not in {m.split(".")[0] for m in _imported(shown.stderr)}
    helped = _cli("--help", env=env)
    assert helped.returncode == 0
    assert not {m.split(".")[0] for m in _imported(helped.stderr)} & {"prefect", "flows", "blocks"}


def test_block_read_over_http_and_the_fallback_descriptor(
    prefect_api: str, backed_up: tuple[Path, str], tmp_path: Path, s3_server: Any
) -> None:
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    from blocks import BackupRepository, register_all
    from blocks.repository_config import repository_config

    root, backup_id = backed_up
    register_all()
    BackupRepository(**signing_block_fields(), local_path=str(root)).save("reads", overwrite=True)
    creds = AwsCredentials(
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name="eu-central-1",
        aws_client_parameters=AwsClientParameters(endpoint_url=s3_server.endpoint_url),
    )
    BackupRepository(
        **signing_block_fields(),
        s3_bucket=S3Bucket(bucket_name="bkt", credentials=creds, bucket_folder="team"),
        prefix="pg",
        sse="AES256",
        retention_days=30,
        lock_mode="GOVERNANCE",
    ).save("reads-s3", overwrite=True)
    # the raw document data gives the config the block class gives
    for name in ("reads", "reads-s3"):
        data = repo_source.fetch_block_data("strongroom-repository", name, prefect_api)
        by_http = repository_config(data).model_dump()
        by_class = BackupRepository.load(name).to_config().model_dump()  # type: ignore[union-attr]
        reveal = {"signing_key", "secret_access_key"}
        for fields in (by_http, by_class):
            for key in reveal:
                fields[key] = fields[key].get_secret_value() if fields[key] else None
        assert by_http == by_class

    env: dict[str, str | None] = {"PREFECT_API_URL": prefect_api, "XDG_CONFIG_HOME": str(tmp_path)}
    listed = _cli("list", "-r", "reads", "--json", env=env)
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert [r["backup_id"] for r in json.loads(listed.stdout)] == [backup_id]
    assert "prefect" not in {m.split(".")[0] for m in _imported(listed.stderr)}
    cached = list((tmp_path / "strongroom" / "repositories").glob("*.json"))
    assert len(cached) == 1
    assert "PRIVATE" not in cached[0].read_text()
    s3_listed = _cli("list", "-r", "reads-s3", "--json", env=env)  # empty bucket: fails
    assert s3_server.secret_key not in s3_listed.stdout + s3_listed.stderr
    assert len(list(cached[0].parent.glob("*.json"))) == 1  # the S3 secret is never cached

    # the Prefect API down: the descriptor of that API and block serves, with a warning
    dead = f"http://127.0.0.1:{free_port()}/api"
    descriptor = json.loads(cached[0].read_text())
    down_env = {**env, "PREFECT_API_URL": dead}
    missing = _cli("list", "-r", "reads", env=down_env)
    assert missing.returncode == 6, missing.stderr[-2000:]  # nothing cached for that API
    target = tmp_path / "strongroom" / "repositories"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_API_URL", dead)
        mp.setenv("XDG_CONFIG_HOME", str(tmp_path))
        written = repo_source.write_descriptor(
            "reads", RepositoryConfig.model_validate(descriptor["config"])
        )
    assert written is not None and written.parent == target
    fallback = _cli("list", "-r", "reads", "--json", env=down_env)
    assert fallback.returncode == 0, fallback.stderr[-2000:]
    assert [r["backup_id"] for r in json.loads(fallback.stdout)] == [backup_id]
    assert "Prefect API unreachable" in fallback.stderr


def test_restore_plan_is_a_read_without_a_flow_run(
    prefect_api: str, backed_up: tuple[Path, str], pg_db: PgDatabase, tmp_path: Path
) -> None:
    """``restore postgresql --dry-run`` reads the target and repository blocks over HTTP,
    checks the manifest and the target database, and creates no flow run; the target's
    password never shows; a block that does not exist is exit 3 (not found)."""
    import asyncio

    from prefect.client.orchestration import get_client

    from blocks import BackupRepository, PostgresTarget, register_all

    root, backup_id = backed_up
    register_all()
    BackupRepository(**signing_block_fields(), local_path=str(root)).save("plans", overwrite=True)
    conn = pg_connection(pg_db, "reads")
    assert conn.password is not None
    PostgresTarget(host=conn.host, port=conn.port, user=conn.user, password=conn.password).save(
        "reads", overwrite=True
    )

    async def runs() -> int:
        async with get_client() as client:
            return len(await client.read_flow_runs())

    before = asyncio.run(runs())
    env: dict[str, str | None] = {"PREFECT_API_URL": prefect_api, "XDG_CONFIG_HOME": str(tmp_path)}
    planned = _cli(
        "restore", "postgresql", "reads", "-r", "plans", "--into", "planned_copy",
        "--dry-run", "--json", env=env,
    )  # fmt: skip
    assert planned.returncode == 0, planned.stderr[-3000:]
    plan = json.loads(planned.stdout)
    assert plan["dry_run"] and plan["backup_id"] == backup_id
    assert plan["target_database"] == "planned_copy" and not plan["target_exists"]
    assert "parallel table load" in plan["method"]
    assert conn.password.get_secret_value() not in planned.stdout + planned.stderr
    assert "prefect" not in {m.split(".")[0] for m in _imported(planned.stderr)}
    blocked = _cli(
        "restore", "postgresql", "reads", "-r", "plans", "--into", pg_db.name, "--dry-run",
        "--json", env=env,
    )  # fmt: skip
    assert blocked.returncode == 0
    assert "needs drop_existing" in json.loads(blocked.stdout)["blocked"]
    missing = _cli("restore", "postgresql", "no-such", "-r", "plans", "--dry-run", env=env)
    assert missing.returncode == 3, missing.stderr[-2000:]
    assert asyncio.run(runs()) == before
