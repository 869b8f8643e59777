"""SIGKILL during a retention run: a backup is whole or gone, never listed with missing data.

The retention run (``strongroom.policy.prune``) runs in a child process against an S3
repository on moto in an object-lock bucket. The child pauses before each object
deletion (``SR_DELETE_PAUSE``, the deletions themselves are the production code), so
the kill lands deterministically between the deletion of a backup's manifest and the
deletion of its last data object.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest
from pydantic import SecretStr

from strongroom.catalog import Catalog, Manifest, manifest_key
from strongroom.config import EncryptionConfig, RepositoryConfig
from strongroom.engines.postgres.backup import backup_postgres
from strongroom.policy import find_orphans, prune
from strongroom.policy.retention import RetentionPolicy
from strongroom.repository.s3 import S3Repository
from strongroom.verify import verify_backup
from tests.faults._support import ROOT, kill_when
from tests.fixtures.postgres import PgDatabase
from tests.fixtures.s3 import MotoServer
from tests.fixtures.strongroom_fixtures import pg_connection, signed_config

POLICY = RetentionPolicy(keep_last=1, compliance_floor_years=0)
PAUSE_S = "0.4"  # before each object deletion in the child: the kill window


def _child_main() -> None:
    """Entry point of the child: one real retention run, paced deletions."""
    from strongroom.policy.locks import S3ObjectStore

    data = json.loads(os.environ["SR_REPO"])
    data["secret_access_key"] = SecretStr(os.environ["SR_REPO_SECRET"])
    repo = S3Repository(signed_config(**data))
    pause = float(os.environ["SR_DELETE_PAUSE"])
    original = S3ObjectStore.remove

    def paced(self: S3ObjectStore, key: str) -> None:
        time.sleep(pause)
        original(self, key)

    S3ObjectStore.remove = paced  # type: ignore[method-assign]
    report = prune(repo, POLICY, orphan_grace=dt.timedelta(0))
    print(json.dumps({"ok": report.ok}))


def _start_prune(config: RepositoryConfig) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    assert config.secret_access_key is not None
    env.update(
        SR_REPO=config.model_dump_json(exclude={"secret_access_key"}),
        SR_REPO_SECRET=config.secret_access_key.get_secret_value(),
        SR_DELETE_PAUSE=PAUSE_S,
        PYTHONPATH=str(ROOT),
    )
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from tests.faults.test_kill_retention import _child_main; _child_main()",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _versions(s3: Any, bucket: str, prefix: str) -> set[tuple[str, str, str]]:
    """(key, version id, etag) of every object version under ``prefix``."""
    found: set[tuple[str, str, str]] = set()
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        for v in page.get("Versions", []):
            found.add((v["Key"], v["VersionId"], v["ETag"]))
        for m in page.get("DeleteMarkers", []):
            found.add((m["Key"], m["VersionId"], "delete-marker"))
    return found


def _backup_prefixes(m: Manifest) -> list[str]:
    return [
        f"backups/{manifest_key(m.engine, m.target, m.backup_id)}",
        f"backups/data/{m.engine}/{m.target}/{m.backup_id}/",
    ]


def _all_listed_verify(repo: S3Repository, key: EncryptionConfig) -> list[str]:
    ids = []
    for m in Catalog(repo).list():
        report = verify_backup(repo, m, key)
        assert report["ok"], report
        ids.append(m.backup_id)
    return ids


@pytest.mark.slow
def test_kill_retention_run_leaves_whole_or_gone_backups(
    s3_server: MotoServer,
    s3_locked_bucket: str,
    pg_db: PgDatabase,
    age_key: EncryptionConfig,
) -> None:
    pg_db.psql(
        "CREATE TABLE t (id int PRIMARY KEY, v text);"
        "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 2000) g;"
    )
    conn = pg_connection(pg_db, "retained")
    config = signed_config(
        kind="s3",
        bucket=s3_locked_bucket,
        prefix="backups",
        endpoint_url=s3_server.endpoint_url,
        access_key_id=s3_server.access_key,
        secret_access_key=SecretStr(s3_server.secret_key),
    )
    repo = S3Repository(config)
    until = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=2)
    locked_config = config.model_copy(update={"lock_mode": "GOVERNANCE", "retain_until": until})
    locked = backup_postgres(conn, S3Repository(locked_config), locked_config, age_key)
    victims = [backup_postgres(conn, repo, config, age_key) for _ in range(2)]
    newest = backup_postgres(conn, repo, config, age_key)
    assert all(len(m.artifacts) >= 2 for m in victims), "each victim needs >= 2 data objects"
    s3 = s3_server.s3()
    locked_before = set().union(
        *(_versions(s3, s3_locked_bucket, p) for p in _backup_prefixes(locked))
    )
    assert locked_before

    def data_keys(m: Manifest) -> set[str]:
        return {i.key for i in repo.list(f"data/{m.engine}/{m.target}/{m.backup_id}/")}

    full = {m.backup_id: data_keys(m) for m in victims}

    def half_deleted() -> bool:  # some of a victim's data is gone, some is left
        return any(0 < len(data_keys(m)) < len(full[m.backup_id]) for m in victims)

    kill_when(_start_prune(config), half_deleted)

    # 1. every listed backup verifies; the half-deleted one is not listed (manifest first)
    listed = _all_listed_verify(repo, age_key)
    assert locked.backup_id in listed and newest.backup_id in listed
    half = [m for m in victims if m.backup_id not in listed and data_keys(m)]
    assert len(half) == 1, (listed, [m.backup_id for m in victims])
    orphans, dangling = find_orphans(repo, grace=dt.timedelta(0))
    assert dangling == [], "a listed backup lost artifacts"
    assert [o["backup_id"] for o in orphans] == [half[0].backup_id]
    assert set(orphans[0]["objects"]) == data_keys(half[0])

    # 2. the next run keeps the leftover while it is inside the grace period...
    report = prune(repo, POLICY).to_dict()
    assert report["ok"], report["errors"]
    mine = [o for o in report["orphans"] if o["backup_id"] == half[0].backup_id]
    assert [o["action"] for o in mine] == ["too recent (grace period)"]
    assert data_keys(half[0])
    # ... and a run after the grace period (24 h) removes it, every version of it
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=25)
    report = prune(repo, POLICY, now=later).to_dict()
    assert report["ok"], report["errors"]
    mine = [o for o in report["orphans"] if o["backup_id"] == half[0].backup_id]
    assert [o["action"] for o in mine] == ["deleted"]
    for m in victims:
        for prefix in _backup_prefixes(m):
            assert not _versions(s3, s3_locked_bucket, prefix), prefix
    # (ids taken in the same second sort by their random suffix: compare as sets)
    assert set(_all_listed_verify(repo, age_key)) == {locked.backup_id, newest.backup_id}
    assert find_orphans(repo, grace=dt.timedelta(0)) == ([], [])

    # 3. the locked backup was never touched: the same versions, byte for byte
    locked_after = set().union(
        *(_versions(s3, s3_locked_bucket, p) for p in _backup_prefixes(locked))
    )
    assert locked_after == locked_before
