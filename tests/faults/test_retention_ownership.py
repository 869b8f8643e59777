"""Retention deletes only what it owns (issue 15, finding 3).

The attack: someone with write access to the bucket adds old manifests (not even
re-sealed) that list another backup's data key, that backup's manifest and a WAL
segment, or whose JSON engine/target/backup_id point at another backup's folder, or
that claim another target's WAL. Before the fix, prune deleted all of those. Now a
backup's keys come from its listing path only: prune deletes none of the victim's
objects (on S3: none of their versions), reports each forged manifest as a finding,
and a forged manifest never counts toward keeping another backup.

Real PostgreSQL backups into a local folder and into a versioned (object-lock) moto
bucket; the kill test runs the real prune in a child and SIGKILLs it mid-deletion.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from strongroom.catalog import Catalog, Manifest, manifest_key
from strongroom.config import EncryptionConfig, RepositoryConfig
from strongroom.engines.postgres.backup import backup_postgres
from strongroom.policy import find_orphans, prune
from strongroom.policy.retention import RetentionPolicy
from strongroom.repository.base import Repository
from strongroom.repository.local import LocalRepository
from strongroom.repository.s3 import S3Repository
from strongroom.verify import verify_backup
from tests.faults._support import ROOT, kill_when
from tests.fixtures.postgres import PgDatabase
from tests.fixtures.s3 import MotoServer
from tests.fixtures.strongroom_fixtures import (
    TEST_SIGNER,
    make_local_repo,
    pg_connection,
    signed_config,
)

POLICY = RetentionPolicy(keep_last=1, compliance_floor_years=0)
VICTIM = "victim"
WAL_KEYS = [f"wal/{VICTIM}/00000001/0000000100000000000000{n:02X}" for n in range(1, 4)] + [
    f"wal/{VICTIM}/00000001/00000001.history"
]
STRAYS = [
    "data/postgresql/victim/not-a-backup-id/x",  # a data folder no backup id names
    f"wal/{VICTIM}/00000001/notes.txt",  # not a WAL file name
    f"wal/{VICTIM}/00000002/000000010000000000000001",  # timeline folder mismatch
]


def _forge(base: Manifest, **changes: Any) -> dict[str, Any]:
    """A manifest document derived from a genuine one, edited and NOT re-sealed."""
    doc = json.loads(base.model_dump_json())
    doc.update(changes)
    return doc


def _put_raw(repo: Repository, key: str, body: bytes) -> None:
    if isinstance(repo, LocalRepository):
        path = repo.root.joinpath(*key.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
    else:
        assert isinstance(repo, S3Repository)
        repo._client.put_object(Bucket=repo.bucket, Key=f"{repo.root}/{key}", Body=body)


def _put(repo: Repository, key: str, doc: dict[str, Any] | bytes) -> str:
    """Write like a bucket writer: raw bytes under any key, no strongroom checks. JSON
    forgeries are signed with the trusted key (a leaked signing key: ownership checks
    still hold; unsigned forgeries are refused earlier, see tests/test_signing.py)."""
    body = doc if isinstance(doc, bytes) else json.dumps(doc, indent=2).encode()
    _put_raw(repo, key, body)
    if not isinstance(doc, bytes):
        _put_raw(repo, key + ".sig", TEST_SIGNER.sign(body))
    return key


def _plant(repo: Repository, old: Manifest, kept: Manifest) -> dict[str, str]:
    """The hostile objects; returns {purpose: key}."""
    for key in WAL_KEYS + STRAYS:
        _put(repo, key, b"wal or stray bytes")
    victim_data = kept.artifacts[0].key
    victim_manifest = manifest_key("postgresql", VICTIM, kept.backup_id)
    own = f"data/postgresql/{VICTIM}/20200101T000000Z-aaaaaa/"  # then walks out with ..
    listed = [dict(a) for a in json.loads(kept.model_dump_json())["artifacts"]]
    foreign = [
        {**listed[0], "key": victim_data},
        {**listed[0], "name": "m", "key": victim_manifest},
        {**listed[0], "name": "w", "key": WAL_KEYS[0]},
        {**listed[0], "name": "up", "key": f"{own}../../{VICTIM}/{kept.backup_id}/x"},
    ]
    planted: dict[str, str] = {}
    # 1. old, in the victim's series, listing the victim's data key, manifest and WAL
    bid = "20200101T000000Z-aaaaaa"
    planted["foreign-artifacts"] = _put(
        repo,
        manifest_key("postgresql", VICTIM, bid),
        _forge(old, backup_id=bid, started_at="2020-01-01T00:00:00Z", artifacts=foreign),
    )
    # 2. old, whose JSON names the victim's backup: it used to steer the data prefix
    bid = "20200102T000000Z-bbbbbb"
    planted["identity-mismatch"] = _put(
        repo,
        manifest_key("postgresql", VICTIM, bid),
        _forge(kept, started_at="2020-01-02T00:00:00Z"),
    )
    # 3. a base backup of another target claiming the victim's WAL (late start)
    bid = "20200103T000000Z-cccccc"
    planted["wal-target"] = _put(
        repo,
        manifest_key("postgresql", "intruder", bid),
        _forge(
            old,
            backup_id=bid,
            target="intruder",
            kind="base",
            artifacts=[],
            details={"start_wal": "0000000100000000000000FF", "wal_target": VICTIM},
        ),
    )
    # 4. a FRESH forged backup of the victim: it must not push the real one out
    bid = "29990101T000000Z-dddddd"
    planted["fresh"] = _put(
        repo,
        manifest_key("postgresql", VICTIM, bid),
        _forge(kept, backup_id=bid, started_at="2999-01-01T00:00:00Z", artifacts=foreign[:1]),
    )
    planted["unreadable"] = _put(
        repo, manifest_key("postgresql", VICTIM, "20200104T000000Z-eeeeee"), b"{not json"
    )
    planted["bad-name"] = _put(repo, "catalog/postgresql/victim/2020 x.json", b"{}")
    return planted


def _snapshot(repo: Repository) -> dict[str, int]:
    return {info.key: info.size for info in repo.list("")}


def _versions(s3: Any, bucket: str, prefix: str = "") -> set[tuple[str, str, str]]:
    found: set[tuple[str, str, str]] = set()
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        for v in page.get("Versions", []):
            found.add((v["Key"], v["VersionId"], v["ETag"]))
        for m in page.get("DeleteMarkers", []):
            found.add((m["Key"], m["VersionId"], "delete-marker"))
    return found


def _owned(m: Manifest) -> set[str]:
    mkey = manifest_key(m.engine, m.target, m.backup_id)
    return {mkey, mkey + ".sig", *(a.key for a in m.artifacts)}


def _check_report(report: dict[str, Any], planted: dict[str, str], old: Manifest) -> None:
    assert report["ok"], report["errors"]
    # only the genuine backups were evaluated; the real old one went, the real new one stayed
    actions = {(b["target"], b["backup_id"]): b["action"] for b in report["backups"]}
    assert actions[(VICTIM, old.backup_id)] == "deleted"
    assert sorted(actions.values()) == ["deleted", "keep"], actions
    reasons = {(f["key"], f["reason"]) for f in report["findings"]}
    for reason in ("foreign-artifacts", "identity-mismatch", "wal-target", "unreadable"):
        assert (planted[reason], reason) in reasons, (reason, reasons)
    assert (planted["fresh"], "foreign-artifacts") in reasons
    assert (planted["bad-name"], "bad-name") in reasons
    strays = [f["key"] for f in report["findings"] if f["reason"] == "bad-name"]
    assert any("not-a-backup-id" in key for key in strays), strays
    (wal,) = report["wal"]
    assert wal["deleted"] == 0 and wal["not_wal_files"] == 2, wal
    assert report["summary"]["findings"] == len(report["findings"])


def _two_backups(
    pg_db: PgDatabase, repo: Repository, config: RepositoryConfig, key: EncryptionConfig
) -> tuple[Manifest, Manifest]:
    pg_db.psql(
        "CREATE TABLE IF NOT EXISTS t (id int PRIMARY KEY, v text);"
        "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 500) g"
        " ON CONFLICT DO NOTHING;"
    )
    conn = pg_connection(pg_db, VICTIM)
    old = backup_postgres(conn, repo, config, key)
    kept = backup_postgres(conn, repo, config, key)
    assert len(kept.artifacts) >= 2
    return old, kept


def test_forged_manifests_delete_nothing_they_do_not_own_local(
    tmp_path: Path, pg_db: PgDatabase, age_key: EncryptionConfig
) -> None:
    repo = make_local_repo(tmp_path / "repo")
    config = signed_config(kind="local", path=str(tmp_path / "repo"))
    old, kept = _two_backups(pg_db, repo, config, age_key)
    planted = _plant(repo, old, kept)
    before = _snapshot(repo)

    dry = prune(repo, POLICY, dry_run=True).to_dict()
    assert _snapshot(repo) == before
    assert {f["key"] for f in dry["findings"]} >= set(planted.values())

    report = prune(repo, POLICY).to_dict()
    _check_report(report, planted, old)
    after = _snapshot(repo)
    # exactly the genuine old backup's own objects went, nothing else
    assert set(before) - set(after) == _owned(old)
    assert {k: before[k] for k in after} == after
    assert verify_backup(repo, Catalog(repo).load("postgresql", VICTIM, kept.backup_id), age_key)[
        "ok"
    ]
    # a second run changes nothing and reports the same findings
    again = prune(repo, POLICY).to_dict()
    assert _snapshot(repo) == after
    assert again["findings"] == report["findings"]


def test_forged_manifests_delete_no_version_they_do_not_own_s3(
    s3_server: MotoServer,
    s3_locked_bucket: str,
    pg_db: PgDatabase,
    age_key: EncryptionConfig,
) -> None:
    config = _s3_config(s3_server, s3_locked_bucket)
    repo = S3Repository(config)
    old, kept = _two_backups(pg_db, repo, config, age_key)
    planted = _plant(repo, old, kept)
    s3 = s3_server.s3()
    before = _versions(s3, s3_locked_bucket)

    report = prune(repo, POLICY, purge_versions=True).to_dict()
    _check_report(report, planted, old)
    after = _versions(s3, s3_locked_bucket)
    gone = before - after
    # every version of the old backup's own keys went (purge_versions); nothing else
    assert {k for k, _, _ in gone} == {f"vault/{k}" for k in _owned(old)}
    assert not {k for k, _, _ in after} & {f"vault/{k}" for k in _owned(old)}
    assert after <= before, "prune must not add delete markers or versions"
    assert verify_backup(repo, Catalog(repo).load("postgresql", VICTIM, kept.backup_id), age_key)[
        "ok"
    ]


def _s3_config(server: MotoServer, bucket: str) -> RepositoryConfig:
    return signed_config(
        kind="s3",
        bucket=bucket,
        prefix="vault",
        endpoint_url=server.endpoint_url,
        access_key_id=server.access_key,
        secret_access_key=SecretStr(server.secret_key),
    )


# ---------------------------------------------------------------- killed prune


def _child_main() -> None:
    """Child: one real prune, each deletion paced so the kill lands between two."""
    from strongroom.policy.locks import S3ObjectStore

    data = json.loads(os.environ["SR_REPO"])
    data["secret_access_key"] = SecretStr(os.environ["SR_REPO_SECRET"])
    repo = S3Repository(signed_config(**data))
    original = S3ObjectStore.remove

    def paced(self: S3ObjectStore, key: str) -> None:
        time.sleep(0.4)
        original(self, key)

    S3ObjectStore.remove = paced  # type: ignore[method-assign]
    print(json.dumps({"ok": prune(repo, POLICY, orphan_grace=dt.timedelta(0)).ok}))


@pytest.mark.slow
def test_killed_prune_with_forged_manifests_breaks_no_kept_backup(
    s3_server: MotoServer,
    s3_locked_bucket: str,
    pg_db: PgDatabase,
    age_key: EncryptionConfig,
) -> None:
    config = _s3_config(s3_server, s3_locked_bucket)
    repo = S3Repository(config)
    old, kept = _two_backups(pg_db, repo, config, age_key)
    planted = _plant(repo, old, kept)
    s3 = s3_server.s3()
    victim_versions = set().union(
        *(_versions(s3, s3_locked_bucket, f"vault/{k}") for k in _owned(kept) | set(WAL_KEYS))
    )
    forged_versions = set().union(
        *(_versions(s3, s3_locked_bucket, f"vault/{k}") for k in planted.values())
    )
    full = {i.key for i in repo.list(f"data/postgresql/{VICTIM}/{old.backup_id}/")}

    def half_deleted() -> bool:
        left = {i.key for i in repo.list(f"data/postgresql/{VICTIM}/{old.backup_id}/")}
        return 0 < len(left) < len(full)

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    assert config.secret_access_key is not None
    env.update(
        SR_REPO=config.model_dump_json(exclude={"secret_access_key"}),
        SR_REPO_SECRET=config.secret_access_key.get_secret_value(),
        PYTHONPATH=str(ROOT),
    )
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from tests.faults.test_retention_ownership import _child_main; _child_main()",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    kill_when(child, half_deleted)

    def check_untouched() -> None:
        for k in _owned(kept) | set(WAL_KEYS):
            assert _versions(s3, s3_locked_bucket, f"vault/{k}") <= victim_versions
        assert (
            set().union(
                *(
                    _versions(s3, s3_locked_bucket, f"vault/{k}")
                    for k in _owned(kept) | set(WAL_KEYS)
                )
            )
            == victim_versions
        )
        assert (
            set().union(*(_versions(s3, s3_locked_bucket, f"vault/{k}") for k in planted.values()))
            == forged_versions
        )
        manifest = Catalog(repo).load("postgresql", VICTIM, kept.backup_id)
        assert verify_backup(repo, manifest, age_key)["ok"]

    # the killed run: the kept backup is whole, the half-deleted one is unlisted
    check_untouched()
    assert not repo.exists(manifest_key("postgresql", VICTIM, old.backup_id))
    orphans, _dangling = find_orphans(repo, grace=dt.timedelta(0))
    assert [o["backup_id"] for o in orphans] == [old.backup_id]
    # the next run (after the grace period) finishes the job and still touches nothing else
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=25)
    report = prune(repo, POLICY, now=later).to_dict()
    assert report["ok"], report["errors"]
    assert [o["action"] for o in report["orphans"]] == ["deleted"]
    assert not _versions(s3, s3_locked_bucket, f"vault/data/postgresql/{VICTIM}/{old.backup_id}/")
    check_untouched()
