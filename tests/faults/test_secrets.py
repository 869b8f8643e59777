"""No password or key used by a run (successful or failing) appears in logs, the repository,
or exception texts."""

from __future__ import annotations

import logging
import traceback
import uuid
from pathlib import Path

import pytest
from pydantic import SecretStr

from strongroom.catalog import Catalog
from strongroom.config import EncryptionConfig, RepositoryConfig
from strongroom.engines.postgres.backup import backup_postgres
from strongroom.engines.postgres.restore import PgRestoreRequest, restore_postgres
from strongroom.errors import StrongroomError
from strongroom.repository.local import LocalRepository
from strongroom.repository.s3 import S3Repository
from strongroom.sandbox.ports import free_port
from tests.fixtures.postgres import PgDatabase
from tests.fixtures.s3 import MotoServer
from tests.fixtures.strongroom_fixtures import pg_connection, signed_config


def _texts_of(exc: BaseException) -> str:
    """The message, repr and whole formatted traceback chain (causes included)."""
    return "\n".join(
        [
            str(exc),
            repr(exc),
            "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        ]
    )


def test_no_secret_in_logs_repository_or_errors(
    pg_db: PgDatabase,
    local_repo: tuple[LocalRepository, RepositoryConfig],
    age_key: EncryptionConfig,
    s3_server: MotoServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    repo, config = local_repo
    pg_password = pg_db.server.password
    wrong_password = f"wrong-{uuid.uuid4().hex}"
    s3_secret = f"s3-secret-{uuid.uuid4().hex}"
    identity = age_key.identities[0].get_secret_value()
    secrets = {
        "postgres password": pg_password,
        "wrong postgres password": wrong_password,
        "s3 secret key": s3_secret,
        "age identity": identity,
    }
    pg_db.psql("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'x');")
    errors: list[BaseException] = []

    # 1. a good backup, then a restore that fails on a damaged artifact
    manifest = backup_postgres(pg_connection(pg_db), repo, config, age_key)
    dump = next(a for a in manifest.artifacts if a.content == "pg_dump-custom")
    path = repo.root / dump.key
    path.chmod(0o644)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(StrongroomError) as caught:
        restore_postgres(
            pg_connection(pg_db),
            repo,
            age_key,
            PgRestoreRequest(backup_id=manifest.backup_id, target_database=f"{pg_db.name}_x"),
        )
    errors.append(caught.value)

    # 2. a backup with a refused password
    bad = pg_connection(pg_db).model_copy(update={"password": SecretStr(wrong_password)})
    with pytest.raises(StrongroomError) as caught:
        backup_postgres(bad, repo, config, age_key)
    errors.append(caught.value)

    # 3. S3 backups that fail: a bucket that does not exist, and a dead endpoint
    for endpoint, bucket in (
        (s3_server.endpoint_url, f"missing-{uuid.uuid4().hex[:8]}"),
        (f"http://127.0.0.1:{free_port()}", "whatever"),
    ):
        s3_config = signed_config(
            kind="s3",
            bucket=bucket,
            endpoint_url=endpoint,
            access_key_id="sr-access",
            secret_access_key=SecretStr(s3_secret),
            max_attempts=2,
        )
        s3_repo = S3Repository(s3_config, retry_wait_initial=0.01, retry_wait_max=0.02)
        with pytest.raises(StrongroomError) as caught:
            backup_postgres(pg_connection(pg_db), s3_repo, s3_config, age_key)
        errors.append(caught.value)

    assert Catalog(repo).list() == [manifest]
    haystacks = {f"exception {type(e).__name__}": _texts_of(e) for e in errors}
    haystacks["captured log records"] = "\n".join(
        r.getMessage() + (r.exc_text or "") for r in caplog.records
    )
    haystacks["captured log text"] = caplog.text
    for file in sorted(p for p in Path(repo.root).rglob("*") if p.is_file()):
        haystacks[f"repository file {file.relative_to(repo.root)}"] = file.read_bytes().decode(
            "latin-1"
        )
    assert len(haystacks) > 6
    leaks = [
        f"{what} found in {where}"
        for where, text in haystacks.items()
        for what, value in secrets.items()
        if value in text
    ]
    assert not leaks, leaks
