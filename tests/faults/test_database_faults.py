"""Database faults during a backup: the dump's connection is killed, the server is unreachable."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from strongroom.catalog import Catalog
from strongroom.config import EncryptionConfig, PostgresConnection, RepositoryConfig
from strongroom.engines.postgres import backup_postgres
from strongroom.errors import ServiceUnavailable, StrongroomError
from strongroom.repository.local import LocalRepository
from strongroom.sandbox.ports import free_port
from tests.fixtures.postgres import PgDatabase


@pytest.mark.slow
def test_dump_connection_terminated_mid_stream_leaves_nothing(
    big_source: PgDatabase,
    big_conn: PostgresConnection,
    local_repo: tuple[LocalRepository, RepositoryConfig],
    age_key: EncryptionConfig,
) -> None:
    """pg_terminate_backend on pg_dump's COPY: a clear failure, no manifest, no data, no temp."""
    repo, config = local_repo
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["manifest"] = backup_postgres(big_conn, repo, config, age_key)
        except BaseException as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    terminated = "0"
    deadline = time.monotonic() + 60
    while terminated.strip() in ("", "0"):
        assert worker.is_alive(), f"the backup ended before the fault: {outcome}"
        assert time.monotonic() < deadline, "pg_dump's COPY was never seen"
        terminated = big_source.server.psql(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            f"WHERE datname = '{big_source.name}' AND query ILIKE 'COPY%' AND state = 'active'"
        )
    worker.join(timeout=60)
    assert not worker.is_alive()
    assert "manifest" not in outcome, "a backup whose dump was cut reported success"
    error = outcome["error"]
    assert isinstance(error, StrongroomError) and str(error), repr(error)
    assert Catalog(repo).list() == []
    # an in-process failure cleans up after itself: no artifacts, no temp files
    assert list(repo.list("data/")) == []
    assert not list(repo.root.rglob(".*.tmp-*"))


def test_unreachable_server_fails_fast_and_clearly(
    big_conn: PostgresConnection,
    local_repo: tuple[LocalRepository, RepositoryConfig],
    age_key: EncryptionConfig,
) -> None:
    repo, config = local_repo
    dead = big_conn.model_copy(update={"port": free_port(), "connect_timeout": 2})
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable) as caught:
        backup_postgres(dead, repo, config, age_key)
    assert time.monotonic() - started < 30
    assert str(dead.port) in str(caught.value) or "127.0.0.1" in str(caught.value)
    assert not list(repo.list(""))
