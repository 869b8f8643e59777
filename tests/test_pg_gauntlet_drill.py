"""A restore drill and the compliance audit on the PostgreSQL gauntlet (~350 MB,
partitions, matviews, large objects, hostile names): both pass on a clean copy of the
session backup; a hand-edited and a truncated artifact fail verify, deep verify, the
drill and the audit; in a compliant S3 bucket, every control of the audit passes.

The local tests work on their own copy of the session's local gauntlet repository (drills
and verifications write records; tampering writes bytes), so other tests see it unchanged.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from strongroom.audit import record_event
from strongroom.catalog import Manifest
from strongroom.compliance import TargetPolicy, evaluate
from strongroom.compliance.controls import CONTROL_IDS
from strongroom.compliance.evaluate import ComplianceReport
from strongroom.config import EncryptionConfig
from strongroom.drills import DrillFailed, Objectives, list_drills, run_drill
from strongroom.drills.postgres import PostgresDrill
from strongroom.policy.verification import SamplingPolicy, deep_verify
from strongroom.repository import Repository
from strongroom.transport import transport_of
from strongroom.verify import verify_backup
from tests.fixtures.compliant_bucket import RETENTION, compliant_bucket
from tests.fixtures.pg_gauntlet import Gauntlet, GauntletBackup, backup_gauntlet, local_repository
from tests.fixtures.strongroom_fixtures import pg_connection

FIGURES: dict[str, float] = {}
TARGET = TargetPolicy(engine="postgresql", target="gauntlet", rpo_hours=24, rto_minutes=60)
# what the audit checks of a target's backups; the other controls are about the bucket
PER_TARGET = ("SR-FRESH-01", "SR-ENC-01", "SR-DRILL-01", "SR-VERIFY-01")
# a local folder cannot hold object-locked, versioned copies: these fail on any local repo
LOCAL_FOLDER_FAILS = {"SR-LOCK-01", "SR-DOC-01"}


def _copy(backup: GauntletBackup, into: Path) -> Repository:
    shutil.copytree(Path(backup.config.path or ""), into)
    return local_repository(into)[0]


def _drill(gauntlet: Gauntlet, repo: Repository, key: EncryptionConfig) -> dict[str, Any]:
    adapter = PostgresDrill(pg_connection(gauntlet.db, "gauntlet"), repo, key, live="strict")
    return run_drill(
        adapter, repo, target="gauntlet", objectives=Objectives(rto_minutes=60, rpo_hours=24)
    )


def _audit(repo: Repository) -> ComplianceReport:
    return evaluate(repo, targets=[TARGET], retention=RETENTION)


def _statuses(report: ComplianceReport) -> dict[str, str]:
    return {c.id: c.status for c in report.controls}


def _leftover_drill_databases(gauntlet: Gauntlet) -> str:
    return gauntlet.db.server.psql(
        "SELECT string_agg(datname, ',') FROM pg_database WHERE datname LIKE 'sr\\_drill\\_%'"
    )


def test_drill_and_audit_pass_on_the_gauntlet(
    pg_gauntlet: Gauntlet,
    pg_gauntlet_local_backup: GauntletBackup,
    age_key: EncryptionConfig,
    tmp_path: Path,
) -> None:
    repo = _copy(pg_gauntlet_local_backup, tmp_path / "repo")
    manifest = pg_gauntlet_local_backup.manifest
    started = time.monotonic()
    deep = deep_verify(repo, age_key, SamplingPolicy(sample_fraction=1), engine="postgresql")
    FIGURES["deep_verify_s"] = round(time.monotonic() - started, 2)
    assert deep["ok"] and deep["verified"] == 1, deep
    started = time.monotonic()
    record = _drill(pg_gauntlet, repo, age_key)
    FIGURES["drill_s"] = round(time.monotonic() - started, 2)
    FIGURES["drill_rto_s"] = record["rto_s"]
    assert record["ok"] and not record["failures"], record["failures"]
    assert record["backup_id"] == manifest.backup_id
    checks = {c["item"].split(":", 1)[1]: c for c in record["checks"]}
    listed = manifest.details["databases"][0]["tables"]
    # every relation with rows in the dump was counted and fingerprinted against the live
    # source (partitions, inheritance children, populated matviews, hostile names)
    counted = {f"{t['schema']}.{t['name']}" for t in listed if t.get("rows") is not None}
    assert counted <= set(checks) and len(counted) >= 50
    assert all(checks[k]["live_match"] for k in counted)
    assert checks["m_middle.big_payload"]["restored_rows"] > 0
    assert checks["parts.events_by_region"]["fingerprint"]
    assert record["cleanup"]["ok"] and not _leftover_drill_databases(pg_gauntlet)

    started = time.monotonic()
    report = _audit(repo)
    FIGURES["audit_s"] = round(time.monotonic() - started, 2)
    st = _statuses(report)
    for control_id in PER_TARGET:
        found = next(c for c in report.controls if c.id == control_id)
        assert st[control_id] == "pass", (control_id, found.findings)
    assert set(report.summary()["failed"]) <= LOCAL_FOLDER_FAILS, report.summary()


def test_every_control_passes_on_the_gauntlet_in_a_compliant_bucket(
    pg_gauntlet: Gauntlet, age_key: EncryptionConfig, s3_server: Any
) -> None:
    """The whole audit, every control PASS, over a real gauntlet backup (not a fabricated
    history) in a locked, versioned, encrypted, non-public bucket: deep-verified and
    drilled, with the audit event the backup flow's hook records."""
    bucket = compliant_bucket(s3_server, prefix="gauntlet")
    backup = backup_gauntlet(pg_gauntlet, (bucket.repo, bucket.config), age_key)
    FIGURES["s3_backup_s"] = backup.seconds
    manifest = backup.manifest
    FIGURES["s3_dump_raw_mb"] = round(sum(a.raw_size for a in manifest.artifacts) / 2**20, 1)
    # what flows.audit's hook appends when the backup-postgresql flow completes
    record_event(
        bucket.repo,
        action="backup",
        engine="postgresql",
        target="gauntlet",
        backup_id=manifest.backup_id,
        result="success",
        details={},
    )
    assert verify_backup(bucket.repo, manifest, age_key)["ok"]
    started = time.monotonic()
    deep = deep_verify(bucket.repo, age_key, SamplingPolicy(sample_fraction=1), engine="postgresql")
    FIGURES["s3_deep_verify_s"] = round(time.monotonic() - started, 2)
    assert deep["ok"] and deep["verified"] == 1, deep
    started = time.monotonic()
    record = _drill(pg_gauntlet, bucket.repo, age_key)
    FIGURES["s3_drill_s"] = round(time.monotonic() - started, 2)
    FIGURES["s3_drill_rto_s"] = record["rto_s"]
    assert record["ok"] and not record["failures"], record["failures"]
    assert record["backup_id"] == manifest.backup_id
    assert record["cleanup"]["ok"] and not _leftover_drill_databases(pg_gauntlet)

    connection = pg_connection(pg_gauntlet.db, "gauntlet")
    target = TARGET.model_copy(
        update={"transport": transport_of("postgresql", connection.model_dump())}
    )
    started = time.monotonic()
    report = evaluate(bucket.repo, config=bucket.config, targets=[target], retention=RETENTION)
    FIGURES["s3_audit_s"] = round(time.monotonic() - started, 2)
    not_passing = {
        c.id: (c.status, [f.message for f in c.findings if f.status != "pass"])
        for c in report.controls
        if c.status != "pass"
    }
    assert not not_passing, (_statuses(report), not_passing)
    assert [c.id for c in report.controls] == CONTROL_IDS and report.status == "pass"
    # the per-target controls judged this very backup, not an empty repository
    for control_id in PER_TARGET:
        found = next(c for c in report.controls if c.id == control_id)
        assert any(f.target == "gauntlet" for f in found.findings), (control_id, found)


def _flip_a_byte_near_the_end(path: Path, size: int) -> None:
    with path.open("r+b") as f:
        f.seek(size - 1000)
        byte = f.read(1)
        f.seek(size - 1000)
        f.write(bytes([byte[0] ^ 0xFF]))


def _truncate(path: Path, size: int) -> None:
    with path.open("r+b") as f:
        f.truncate(size // 2)


@pytest.mark.parametrize("tamper", [_flip_a_byte_near_the_end, _truncate], ids=["edited", "cut"])
def test_tampered_artifact_fails_verify_deep_verify_drill_and_audit(
    pg_gauntlet: Gauntlet,
    pg_gauntlet_local_backup: GauntletBackup,
    age_key: EncryptionConfig,
    tmp_path: Path,
    tamper: Any,
) -> None:
    repo = _copy(pg_gauntlet_local_backup, tmp_path / "repo")
    manifest: Manifest = pg_gauntlet_local_backup.manifest
    dump = next(a for a in manifest.artifacts if a.content == "pg_dump-custom")
    tamper(tmp_path / "repo" / dump.key, dump.stored_size)

    assert not verify_backup(repo, manifest, age_key)["ok"]
    deep = deep_verify(repo, age_key, SamplingPolicy(sample_fraction=1), engine="postgresql")
    assert deep["verified"] == 1 and not deep["ok"], deep

    started = time.monotonic()
    with pytest.raises(DrillFailed) as failed:
        _drill(pg_gauntlet, repo, age_key)
    FIGURES[f"drill_{tamper.__name__}_s"] = round(time.monotonic() - started, 2)
    record = failed.value.record
    assert failed.value.exit_code == 4 and record["data_mismatch"] and not record["restored"]
    assert "restore failed" in record["failures"][0] and dump.name in record["failures"][0]
    assert record["cleanup"]["ok"] and not _leftover_drill_databases(pg_gauntlet)
    assert list_drills(repo, "postgresql", "gauntlet")[-1]["ok"] is False

    report = _audit(repo)
    st = _statuses(report)
    assert st["SR-VERIFY-01"] == "fail" and st["SR-DRILL-01"] == "fail", st
    messages = " ".join(f.message for c in report.controls for f in c.findings)
    assert manifest.backup_id in messages and "failed" in messages
    assert report.status == "fail"


def test_report_figures() -> None:
    """Prints the measured figures (run last with -p no:randomly; -s to see them)."""
    print("gauntlet drill/audit figures:", FIGURES)
    assert all(v is None or v >= 0 for v in FIGURES.values())
