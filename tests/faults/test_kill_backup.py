"""SIGKILL during a PostgreSQL backup: nothing half-written becomes visible."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from strongroom.catalog import Catalog
from strongroom.config import EncryptionConfig, PostgresConnection, RepositoryConfig
from strongroom.policy import find_orphans
from strongroom.repository.local import LocalRepository
from strongroom.repository.s3 import S3Repository
from strongroom.verify import verify_backup
from tests.faults._support import child_env, kill_when, run_child, start_child

pytestmark = pytest.mark.slow


def _ids(repo: Any) -> list[str]:
    return [m.backup_id for m in Catalog(repo).list()]


def _data_keys(repo: Any) -> set[str]:
    return {info.key for info in repo.list("data/")}


def _local_temp_files(repo: LocalRepository) -> list[str]:
    return [p.name for p in repo.root.rglob(".*.tmp-*")]


def _kill_then_check(
    repo: Any,
    config: RepositoryConfig,
    conn: PostgresConnection,
    key: EncryptionConfig,
    in_flight: Any,
    leftovers: Any,
) -> None:
    env = child_env(conn, config, key, op="backup")
    first = run_child(env)["backup_id"]
    before_ids = _ids(repo)
    before_data = _data_keys(repo)
    assert before_ids == [first]

    kill_when(start_child(env), lambda: in_flight(repo))

    # no manifest for the partial backup; the earlier backup's objects are untouched
    assert _ids(repo) == before_ids
    assert before_data <= _data_keys(repo)
    assert leftovers(repo), "the kill should have left an incomplete upload behind"
    repo.cleanup_incomplete("")
    assert not leftovers(repo)
    # committed-but-unpublished artifacts of the killed run are not a backup; retention's
    # orphan pass finds exactly them (and never the published backup)
    assert _ids(repo) == before_ids
    left = _data_keys(repo) - before_data
    orphans, dangling = find_orphans(repo, grace=dt.timedelta(0))
    assert dangling == []
    assert {k for o in orphans for k in o["objects"]} == left
    assert first not in {o["backup_id"] for o in orphans}
    report = verify_backup(repo, Catalog(repo).resolve(first), key)
    assert report["ok"], report

    second = run_child(env)["backup_id"]
    assert _ids(repo) == sorted([first, second])
    report = verify_backup(repo, Catalog(repo).resolve(second), key)
    assert report["ok"], report


def test_kill_backup_local(
    local_repo: tuple[LocalRepository, RepositoryConfig],
    big_conn: PostgresConnection,
    age_key: EncryptionConfig,
) -> None:
    repo, config = local_repo

    def in_flight(r: LocalRepository) -> bool:
        # the database dump (not the tiny globals.sql) is streaming into a temp file
        return any(
            p.name.startswith(".db") and p.stat().st_size > 0 for p in r.root.rglob(".*.tmp-*")
        )

    _kill_then_check(repo, config, big_conn, age_key, in_flight, _local_temp_files)


def test_kill_backup_s3(
    s3_repo: tuple[S3Repository, RepositoryConfig],
    big_conn: PostgresConnection,
    age_key: EncryptionConfig,
) -> None:
    repo, config = s3_repo

    def uploads(r: S3Repository) -> list[Any]:
        return list(r.list_incomplete(""))

    _kill_then_check(repo, config, big_conn, age_key, uploads, uploads)
