"""Loading the retention policy block, and the object-lock retain-until it gives a backup.

Kept apart from ``flows/retention.py`` (the ``apply-retention`` flow) because backup
flows and the audit use these too, and the retention flow itself is audited: one
module each way, no import circle.
"""

from __future__ import annotations

import datetime as dt

from blocks.policy import RetentionPolicyBlock
from strongroom.config import RepositoryConfig
from strongroom.errors import NotFound
from strongroom.policy.upload import upload_settings
from strongroom.repository import Repository


def load_policy(name: str) -> RetentionPolicyBlock:
    """The RetentionPolicyBlock named ``name``; NotFound with a hint if there is none."""
    try:
        block = RetentionPolicyBlock.load(name)
    except ValueError as exc:
        raise NotFound(
            f"no retention policy block {name!r} (type strongroom-retention-policy): "
            "create one, e.g. RetentionPolicyBlock(...).save(name)"
        ) from exc
    return block  # type: ignore[return-value]


def policy_lock(
    repo: Repository,
    repo_config: RepositoryConfig,
    engine: str,
    target: str,
    *,
    policy: str = "default",
    kind: str = "logical",
) -> RepositoryConfig:
    """The repository config for one backup run, with the object-lock retain-until of the
    retention rule that will keep this backup longest (only on locked repositories)."""
    if not repo_config.lock_mode:
        return repo_config
    block = try_load_policy(policy)
    settings = upload_settings(
        repo,
        repo_config,
        engine,
        target,
        dt.datetime.now(dt.UTC),
        block.policy_for(engine, target) if block else None,
        kind=kind,
    )
    return repo_config.model_copy(update={"retain_until": settings.retain_until})


def try_load_policy(name: str) -> RetentionPolicyBlock | None:
    """Like ``load_policy`` but None when the block does not exist (backups use this to
    compute upload-time retain-until only when a policy is configured)."""
    try:
        return load_policy(name)
    except NotFound:
        return None
