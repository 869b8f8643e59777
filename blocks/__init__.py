"""Prefect block types for strongroom: targets, repository, encryption and signing keys."""

from prefect.blocks.core import Block

from blocks.clickhouse import ClickHouseTarget
from blocks.keys import EncryptionKey
from blocks.policy import RetentionPolicyBlock
from blocks.redis import RedisTarget
from blocks.repository import BackupRepository
from blocks.signing import SigningKey
from blocks.targets import PostgresTarget

# The target block type of each engine (strongroom.engines.registry's names): flows load
# targets through it, the fleet and the audit find every target by its slug.
TARGET_BLOCKS: dict[str, type[Block]] = {
    "postgresql": PostgresTarget,
    "clickhouse": ClickHouseTarget,
    "redis": RedisTarget,
}

ALL_BLOCKS = (
    PostgresTarget,
    ClickHouseTarget,
    RedisTarget,
    BackupRepository,
    EncryptionKey,
    SigningKey,
    RetentionPolicyBlock,
)


def register_all() -> list[str]:
    """Register every strongroom block type with the current Prefect API."""
    for block in ALL_BLOCKS:
        block.register_type_and_schema()
    return [b.get_block_type_slug() for b in ALL_BLOCKS]


__all__ = [
    "ALL_BLOCKS",
    "TARGET_BLOCKS",
    "BackupRepository",
    "ClickHouseTarget",
    "EncryptionKey",
    "PostgresTarget",
    "RedisTarget",
    "RetentionPolicyBlock",
    "SigningKey",
    "register_all",
]
