"""The preamble every engine backup and restore flow shares.

Each flow of flows/postgres.py, flows/clickhouse.py, flows/redis.py and flows/pitr.py
loads its target block (registering the connection's secrets for redaction), the
repository and encryption-key blocks, applies the retention policy's object lock to a
backup's repository config, and holds the target's lock around the engine task. That
is written once here, so the flow modules keep only what differs per engine.

A module of its own (not flows/common.py) because it needs flows.retention, which
imports flows.common.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from flows.common import load_key, load_repository
from flows.locks import target_lock
from flows.policy_blocks import policy_lock
from strongroom.config import EncryptionConfig, RepositoryConfig
from strongroom.redact import register
from strongroom.repository import Repository


class _Connection(Protocol):
    def secrets(self) -> list[str]: ...


ConnT = TypeVar("ConnT", bound=_Connection)
ConnT_co = TypeVar("ConnT_co", bound=_Connection, covariant=True)


class TargetBlock(Protocol[ConnT_co]):
    """A target block type (PostgresTarget, ClickHouseTarget, RedisTarget)."""

    @classmethod
    def load(cls, name: str) -> Any: ...

    def to_connection(self, name: str) -> ConnT_co: ...


def load_target(block_type: type[TargetBlock[ConnT]], name: str) -> ConnT:
    """The connection of the target block ``name``, its secrets registered for redaction."""
    block: TargetBlock[ConnT] = block_type.load(name)
    conn = block.to_connection(name)
    register(*conn.secrets())
    return conn


@dataclass(frozen=True)
class EngineRun(Generic[ConnT]):
    """What one backup or restore flow run works with."""

    engine: str
    target: str
    conn: ConnT
    repo: Repository
    repo_config: RepositoryConfig
    enc: EncryptionConfig

    def locked(self) -> AbstractContextManager[None]:
        """The target's lock (flows.locks.target_lock): one run per target at a time."""
        return target_lock(self.engine, self.target)


def open_backup(
    block_type: type[TargetBlock[ConnT]],
    engine: str,
    target: str,
    repository: str,
    encryption_key: str,
    *,
    kind: str = "logical",
) -> EngineRun[ConnT]:
    """Target, repository (with the retention policy's object lock for a ``kind``
    backup of ``target``) and key, loaded in that order."""
    conn = load_target(block_type, target)
    repo, repo_config = load_repository(repository)
    repo_config = policy_lock(repo, repo_config, engine, target, kind=kind)
    enc = load_key(encryption_key)
    return EngineRun(engine, target, conn, repo, repo_config, enc)


def open_restore(
    block_type: type[TargetBlock[ConnT]],
    engine: str,
    target: str,
    repository: str,
    encryption_key: str,
) -> EngineRun[ConnT]:
    """Target, repository and key, loaded in that order (no object lock: a restore
    stores no backup)."""
    conn = load_target(block_type, target)
    repo, repo_config = load_repository(repository)
    enc = load_key(encryption_key)
    return EngineRun(engine, target, conn, repo, repo_config, enc)
