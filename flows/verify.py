"""Prefect flow that re-reads a backup and checks everything about it."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from flows.audit import AUDITED
from flows.common import (
    TRANSIENT_TASK,
    human_size,
    load_key,
    load_repository,
    publish,
    secure_logging,
)
from strongroom import progress
from strongroom.catalog import Catalog
from strongroom.config import EncryptionConfig
from strongroom.errors import IntegrityError
from strongroom.repository import Repository
from strongroom.verify import verify_backup


@task(**TRANSIENT_TASK)
def check_backup(
    repo: Repository,
    enc: EncryptionConfig,
    backup_id: str,
    engine: str | None,
    target: str | None,
) -> dict[str, Any]:
    manifest = Catalog(repo).resolve(backup_id, engine, target)
    return verify_backup(repo, manifest, enc, progress=progress.current())


@flow(name="verify-backup", **AUDITED)
def verify_backup_flow(
    backup_id: str = "latest",
    engine: str | None = None,
    target: str | None = None,
    repository: str = "default",
    encryption_key: str = "default",
) -> dict[str, Any]:
    """Verify checksums, decryption, decompression and dump structure of one backup."""
    secure_logging()
    repo, _ = load_repository(repository)
    enc = load_key(encryption_key)
    report = check_backup(repo, enc, backup_id, engine, target)
    publish(
        f"Verify {report['backup_id']}: {'OK' if report['ok'] else 'FAILED'}",
        f"verify-{report['engine']}-{report['target']}",
        [
            f"- backup `{report['backup_id']}` of {report['engine']}/{report['target']}",
            f"- read {human_size(report['bytes_read'])} in {report['duration_s']} s",
            f"- result: **{'OK' if report['ok'] else 'FAILED'}**",
            *(f"- warning: {w}" for w in report.get("warnings", [])),
        ],
        [
            {"artifact": a["artifact"], "ok": a["ok"], "detail": a.get("error", "")}
            for a in report["artifacts"]
        ],
    )
    for warning in report.get("warnings", []):
        get_run_logger().warning("%s", warning)
    if not report["ok"]:
        bad = [a for a in report["artifacts"] if not a["ok"]]
        get_run_logger().error("verification failed: %s", bad[0].get("error"))
        raise IntegrityError(f"backup {report['backup_id']} failed verification: {bad[0]['error']}")
    return report
