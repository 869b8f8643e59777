"""The S3 server dies mid-upload: bounded retries, a clear ServiceUnavailable, then recovery."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest
from pydantic import SecretStr

import tests.fixtures.s3 as s3_fixtures
from strongroom.catalog import Catalog
from strongroom.config import EncryptionConfig, PostgresConnection
from strongroom.engines.postgres.backup import backup_postgres
from strongroom.errors import ServiceUnavailable
from strongroom.repository.s3 import S3Repository
from strongroom.verify import verify_backup
from tests.fixtures.s3 import MotoServer
from tests.fixtures.strongroom_fixtures import signed_config

pytestmark = pytest.mark.slow

MAX_ATTEMPTS = 3


def _restart_on_same_port(server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    port = server.port
    monkeypatch.setattr(s3_fixtures, "free_port", lambda: port)
    server.start()
    assert server.port == port


def test_s3_outage_mid_upload_fails_clearly_then_recovers(
    own_moto: MotoServer,
    big_conn: PostgresConnection,
    age_key: EncryptionConfig,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bucket = own_moto.create_bucket()
    config = signed_config(
        kind="s3",
        bucket=bucket,
        prefix="backups",
        endpoint_url=own_moto.endpoint_url,
        access_key_id=own_moto.access_key,
        secret_access_key=SecretStr(own_moto.secret_key),
        part_size=5 * 1024 * 1024,
        max_attempts=MAX_ATTEMPTS,
    )
    repo = S3Repository(config, retry_wait_initial=0.05, retry_wait_max=0.2)
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["manifest"] = backup_postgres(big_conn, repo, config, age_key)
        except BaseException as exc:
            outcome["error"] = exc
        outcome["ended"] = time.monotonic()

    caplog.set_level(logging.WARNING, logger="strongroom")
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    deadline = time.monotonic() + 60
    while not list(repo.list_incomplete("")):
        assert worker.is_alive(), f"backup ended before the outage: {outcome}"
        assert time.monotonic() < deadline, "no multipart upload started"
        time.sleep(0.01)
    own_moto.stop()
    stopped = time.monotonic()
    worker.join(timeout=90)
    assert not worker.is_alive(), "the backup hangs on a dead storage server"

    assert "manifest" not in outcome, "a backup reported success while the storage was down"
    error = outcome["error"]
    assert isinstance(error, ServiceUnavailable), repr(error)
    assert str(error), "the error must say what happened"
    assert outcome["ended"] - stopped < 60, "retries are not bounded"
    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert retries, "transient errors should be retried"
    assert all(f"of {MAX_ATTEMPTS}" in r.getMessage() for r in retries)

    # the server comes back (moto keeps no state across restarts: recreate the bucket)
    _restart_on_same_port(own_moto, monkeypatch)
    own_moto.create_bucket(bucket)
    assert Catalog(repo).list() == []
    manifest = backup_postgres(big_conn, repo, config, age_key)
    assert [m.backup_id for m in Catalog(repo).list()] == [manifest.backup_id]
    assert verify_backup(repo, manifest, age_key)["ok"]
    assert not list(repo.list_incomplete(""))
