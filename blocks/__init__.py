"""Prefect block types for strongroom: targets, repository, encryption and signing keys.

The block classes are imported on first use (``from blocks import PostgresTarget`` imports
only blocks/targets.py): a flow run of one engine does not pay for prefect-aws, redis or
the other engines' block schemas.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefect.blocks.core import Block

    from blocks.clickhouse import ClickHouseTarget
    from blocks.keys import EncryptionKey
    from blocks.notifications import SmtpEmail
    from blocks.policy import RetentionPolicyBlock
    from blocks.redis import RedisTarget
    from blocks.repository import BackupRepository
    from blocks.signing import SigningKey
    from blocks.targets import PostgresTarget

# class name -> the module defining it
_CLASSES = {
    "PostgresTarget": "blocks.targets",
    "ClickHouseTarget": "blocks.clickhouse",
    "RedisTarget": "blocks.redis",
    "BackupRepository": "blocks.repository",
    "EncryptionKey": "blocks.keys",
    "SigningKey": "blocks.signing",
    "RetentionPolicyBlock": "blocks.policy",
    "SmtpEmail": "blocks.notifications",
}

# Each engine's target block type slug (tests/test_engine_interface.py checks them against
# the classes): the fleet and the audit find every target by its slug without importing
# every engine's block.
TARGET_BLOCK_SLUGS: dict[str, str] = {
    "postgresql": "strongroom-postgres-target",
    "clickhouse": "strongroom-clickhouse-target",
    "redis": "strongroom-redis-target",
}
_TARGET_CLASSES = {
    "postgresql": "PostgresTarget",
    "clickhouse": "ClickHouseTarget",
    "redis": "RedisTarget",
}
REPOSITORY_BLOCK_SLUG = "strongroom-repository"


def _class(name: str) -> Any:
    return getattr(importlib.import_module(_CLASSES[name]), name)


class _TargetBlocks(Mapping[str, "type[Block]"]):
    """engine name -> its target block class, imported when looked up."""

    def __getitem__(self, engine: str) -> type[Block]:
        return _class(_TARGET_CLASSES[engine])

    def __iter__(self) -> Iterator[str]:
        return iter(_TARGET_CLASSES)

    def __len__(self) -> int:
        return len(_TARGET_CLASSES)


# The target block type of each engine (strongroom.engines.registry's names): flows load
# targets through it, the fleet and the audit find every target by its slug.
TARGET_BLOCKS: Mapping[str, type[Block]] = _TargetBlocks()


def all_blocks() -> tuple[type[Block], ...]:
    """Every strongroom block class (imports them all)."""
    return tuple(_class(name) for name in _CLASSES)


def register_all() -> list[str]:
    """Register every strongroom block type with the current Prefect API."""
    blocks = all_blocks()
    for block in blocks:
        block.register_type_and_schema()
    return [b.get_block_type_slug() for b in blocks]


def __getattr__(name: str) -> Any:
    if name in _CLASSES:
        return _class(name)
    if name == "ALL_BLOCKS":
        return all_blocks()
    raise AttributeError(f"module 'blocks' has no attribute {name!r}")


__all__ = [
    "ALL_BLOCKS",
    "REPOSITORY_BLOCK_SLUG",
    "TARGET_BLOCKS",
    "TARGET_BLOCK_SLUGS",
    "BackupRepository",
    "ClickHouseTarget",
    "EncryptionKey",
    "PostgresTarget",
    "RedisTarget",
    "RetentionPolicyBlock",
    "SigningKey",
    "SmtpEmail",
    "all_blocks",
    "register_all",
]
