"""Concurrent writers: exactly one manifest wins; concurrent backups stay consistent."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from strongroom.catalog import Catalog
from strongroom.config import EncryptionConfig, PostgresConnection, RepositoryConfig
from strongroom.engines.postgres.backup import backup_postgres
from strongroom.errors import Conflict, StrongroomError
from strongroom.policy import prune
from strongroom.policy.retention import RetentionPolicy
from strongroom.repository.base import Repository
from strongroom.repository.local import LocalRepository
from strongroom.verify import verify_backup
from tests.fixtures.postgres import PgDatabase
from tests.fixtures.strongroom_fixtures import pg_connection

WRITERS = 8


def _race(n: int, fn: Callable[[int], Any]) -> list[tuple[str, Any]]:
    """Run ``fn(i)`` in ``n`` threads released together; returns (ok|error, value) each."""
    barrier = threading.Barrier(n)
    results: list[tuple[str, Any]] = [("missing", None)] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = ("ok", fn(i))
        except BaseException as exc:
            results[i] = ("error", exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


@pytest.fixture(params=["local", "s3"])
def any_repo(request: pytest.FixtureRequest) -> tuple[Repository, RepositoryConfig]:
    fixture = "local_repo" if request.param == "local" else "s3_repo"
    repo: tuple[Repository, RepositoryConfig] = request.getfixturevalue(fixture)
    return repo


def test_exclusive_put_has_exactly_one_winner(
    any_repo: tuple[Repository, RepositoryConfig],
) -> None:
    repo, _ = any_repo
    key = "catalog/postgresql/race/20261124T020000Z-abcdef.json"
    bodies = [f'{{"writer": {i}}}'.encode() * 1000 for i in range(WRITERS)]
    results = _race(WRITERS, lambda i: repo.put_bytes(key, bodies[i], overwrite=False))
    winners = [i for i, (state, _) in enumerate(results) if state == "ok"]
    assert len(winners) == 1, results
    losers = [value for state, value in results if state == "error"]
    assert all(isinstance(exc, Conflict) for exc in losers), losers
    assert repo.get_bytes(key) == bodies[winners[0]]
    assert [info.key for info in repo.list("catalog/")] == [key]


@pytest.mark.slow
def test_two_backups_of_one_target_at_once(
    pg_db: PgDatabase,
    any_repo: tuple[Repository, RepositoryConfig],
    age_key: EncryptionConfig,
) -> None:
    pg_db.psql(
        "CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 20000) g"
    )
    repo, config = any_repo
    results = _race(2, lambda _i: backup_postgres(pg_connection(pg_db), repo, config, age_key))
    ok = [value for state, value in results if state == "ok"]
    failed = [value for state, value in results if state == "error"]
    assert all(isinstance(exc, StrongroomError) and str(exc) for exc in failed), failed
    assert ok, results
    assert len({m.backup_id for m in ok}) == len(ok)
    assert sorted(m.backup_id for m in Catalog(repo).list()) == sorted(m.backup_id for m in ok)
    for manifest in ok:
        assert verify_backup(repo, manifest, age_key)["ok"]


def test_backup_with_an_existing_id_is_refused_and_keeps_the_existing_backup(
    pg_db: PgDatabase,
    local_repo: tuple[Repository, RepositoryConfig],
    age_key: EncryptionConfig,
) -> None:
    pg_db.psql("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 200) g")
    repo, config = local_repo
    first = backup_postgres(pg_connection(pg_db), repo, config, age_key)
    with pytest.raises(Conflict):
        backup_postgres(pg_connection(pg_db), repo, config, age_key, backup_id=first.backup_id)
    report = verify_backup(repo, Catalog(repo).resolve(first.backup_id), age_key)
    assert report["ok"], report


@pytest.mark.slow
def test_backup_during_retention_run_is_not_touched(
    big_conn: PostgresConnection,
    local_repo: tuple[LocalRepository, RepositoryConfig],
    age_key: EncryptionConfig,
) -> None:
    """prune (keep_last=1, orphans and interrupted uploads included) runs while a backup
    streams: the in-flight backup is neither deleted nor damaged, and it publishes fine."""
    repo, config = local_repo
    old = [backup_postgres(big_conn, repo, config, age_key) for _ in range(2)]
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["manifest"] = backup_postgres(big_conn, repo, config, age_key)
        except BaseException as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".db") for p in repo.root.rglob(".*.tmp-*")):
        assert worker.is_alive(), f"the backup ended before retention ran: {outcome}"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    report = prune(
        repo, RetentionPolicy(keep_last=1, compliance_floor_years=0), engine="postgresql"
    )
    worker.join(timeout=120)
    assert "error" not in outcome, outcome
    new = outcome["manifest"]
    ids = [m.backup_id for m in Catalog(repo).list()]
    assert new.backup_id in ids and old[1].backup_id in ids and old[0].backup_id not in ids
    assert verify_backup(repo, new, age_key)["ok"]
    assert verify_backup(repo, old[1], age_key)["ok"]
    assert report is not None
