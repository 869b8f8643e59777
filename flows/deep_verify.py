"""Prefect flow ``deep-verify``: re-read a sample of backups end to end and keep the evidence."""

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
from strongroom.config import EncryptionConfig
from strongroom.errors import IntegrityError
from strongroom.policy.verification import SamplingPolicy, deep_verify
from strongroom.repository import Repository


@task(**TRANSIENT_TASK)
def run_deep_verify(
    repo: Repository,
    enc: EncryptionConfig,
    sampling: SamplingPolicy,
    engine: str | None,
    target: str | None,
) -> dict[str, Any]:
    log = get_run_logger()
    return deep_verify(
        repo,
        enc,
        sampling,
        engine=engine,
        target=target,
        on_backup=lambda m, why: log.info("verifying %s (%s)", m.backup_id, why),
    )


@flow(name="deep-verify", **AUDITED)
def deep_verify_flow(
    repository: str = "default",
    encryption_key: str = "default",
    engine: str | None = None,
    target: str | None = None,
    policy: str | None = None,
    newest_per_target: int | None = None,
    reverify_after_days: float | None = None,
    sample_fraction: float | None = None,
    max_backups: int | None = None,
    max_gib: float | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Read back every artifact of the sampled backups (checksums, decryption,
    decompression, engine structure check) and store one evidence record per backup
    under ``verifications/``. Sampling comes from the ``policy`` block (if given),
    overridden by the explicit parameters. Fails if any backup fails."""
    secure_logging()
    repo, _ = load_repository(repository)
    enc = load_key(encryption_key)
    sampling = SamplingPolicy(seed=seed)
    if policy:
        from flows.policy_blocks import load_policy

        sampling = load_policy(policy).sampling(seed)
    updates = {
        k: v
        for k, v in {
            "newest_per_target": newest_per_target,
            "reverify_after_days": reverify_after_days,
            "sample_fraction": sample_fraction,
            "max_backups": max_backups,
            "max_bytes": int(max_gib * 1024**3) if max_gib else None,
        }.items()
        if v is not None
    }
    sampling = SamplingPolicy(**{**sampling.model_dump(), **updates})
    report = run_deep_verify(repo, enc, sampling, engine, target)
    publish(
        f"Deep verify: {report['verified']} backup(s), "
        f"{'all OK' if report['ok'] else str(report['failed']) + ' FAILED'}",
        f"deep-verify-{engine or 'all'}-{target or 'all'}",
        [
            f"- repository: `{repo.describe()}`; {report['backups_in_scope']} backups in scope",
            f"- verified {report['verified']}, read {human_size(report['bytes_read'])}",
            f"- never verified and not picked this run: {report['never_verified_left']}",
            "- checks per artifact: stored SHA-256, age decryption, zstd, plaintext SHA-256, "
            "engine structure",
        ],
        [
            {
                "backup": r["backup_id"],
                "target": f"{r['engine']}/{r['target']}",
                "why": r["reason"],
                "ok": r["ok"],
                "seconds": r["seconds"],
                "error": r["error"] or "",
            }
            for r in report["results"]
        ],
    )
    if not report["ok"]:
        bad = next(r for r in report["results"] if not r["ok"])
        raise IntegrityError(
            f"deep verify: {report['failed']} backup(s) failed; {bad['backup_id']}: {bad['error']}"
        )
    return report
