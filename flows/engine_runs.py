"""What every engine's backup and restore flow does, written once.

A flow of flows/postgres.py, flows/clickhouse.py or flows/redis.py declares its
parameters (Prefect shows them in deployments) and calls ``run_backup`` or
``run_restore`` with its engine's name: they load the target block (registering the
connection's secrets for redaction), the repository and encryption-key blocks, apply
the retention policy's object lock to a backup's repository config, hold the target's
lock around one retried engine task (``strongroom.engines.registry``), and publish the
engine's summary as the run's artifacts. flows/pitr.py uses ``open_backup`` directly.

A module of its own (not flows/common.py) because it needs flows.retention, which
imports flows.common.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Generic, ParamSpec, Protocol, TypeVar

from prefect import Flow, get_run_logger, task

from blocks import TARGET_BLOCKS
from flows.common import TRANSIENT_TASK, human_size, load_key, load_repository, publish
from flows.locks import target_lock
from flows.policy_blocks import policy_lock
from strongroom import progress
from strongroom.config import EncryptionConfig, RepositoryConfig
from strongroom.engines.registry import get_engine
from strongroom.redact import register
from strongroom.repository import Repository

P = ParamSpec("P")
R = TypeVar("R")


def _json_native(value: Any) -> bool:
    if value is None or isinstance(value, str | int | float | bool):
        return True
    if isinstance(value, list | tuple):
        return all(_json_native(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_native(v) for k, v in value.items())
    return False


def json_parameters(flow: Flow[P, R]) -> Flow[P, R]:
    """Send ``flow``'s JSON-native parameters (every backup and restore flow's: names,
    ids, flags, label maps) to the API as they are: Prefect's own serializer imports
    FastAPI for its ``jsonable_encoder`` (a few hundred ms per CLI run). Anything else
    still goes through Prefect's serializer. Put it above ``@flow(...)``, which
    deployments and bootstrap read from the source::

        @json_parameters
        @flow(name="backup-postgresql", **AUDITED)
        def backup_postgresql(...): ...
    """
    prefect_serialize = flow.serialize_parameters

    def serialize_parameters(parameters: dict[str, Any]) -> dict[str, Any]:
        if not (flow.ismethod or flow.isclassmethod) and _json_native(parameters):
            return dict(parameters)
        return prefect_serialize(parameters)

    flow.serialize_parameters = serialize_parameters  # type: ignore[method-assign]
    return flow


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


@task(task_run_name="backup-{engine_name}-{target}", **TRANSIENT_TASK)
def engine_backup(
    engine_name: str,
    target: str,
    conn: Any,
    repo: Repository,
    repo_config: RepositoryConfig,
    enc: EncryptionConfig,
    labels: dict[str, str],
    options: dict[str, Any],
) -> dict[str, Any]:
    """One backup by the engine (retried only when a server or the storage was down)."""
    manifest = get_engine(engine_name).backup(
        conn,
        repo,
        repo_config,
        enc,
        labels=labels,
        progress=progress.current(),
        options=options,
    )
    return manifest.model_dump(mode="json")


@task(task_run_name="restore-{engine_name}-{target}", **TRANSIENT_TASK)
def engine_restore(
    engine_name: str, target: str, conn: Any, repo: Repository, enc: EncryptionConfig, request: Any
) -> dict[str, Any]:
    """One restore by the engine, from its typed request."""
    return get_engine(engine_name).restore(conn, repo, enc, request, progress=progress.current())


def run_backup(
    engine_name: str,
    target: str,
    repository: str,
    encryption_key: str,
    labels: dict[str, str] | None,
    **options: Any,
) -> dict[str, Any]:
    """The body of a ``backup-<engine>`` flow: the manifest as JSON."""
    engine = get_engine(engine_name)
    block_type: Any = TARGET_BLOCKS[engine_name]
    run: EngineRun[Any] = open_backup(block_type, engine_name, target, repository, encryption_key)
    log = get_run_logger()
    log.info("backing up %s target %s into %s", engine.label, target, run.repo.describe())
    with run.locked():
        manifest = engine_backup(
            engine_name,
            target,
            run.conn,
            run.repo,
            run.repo_config,
            run.enc,
            labels or {},
            {k: v for k, v in options.items() if v is not None},
        )
    summary = engine.backup_summary(manifest, run.repo.describe())
    for attempt in manifest["details"].get("attempts") or []:
        log.warning("method %s %s: %s", attempt["method"], attempt["outcome"], attempt["reason"])
    publish(summary.title, f"backup-{engine_name}-{target}", summary.lines, summary.rows)
    stored = sum(a["stored_size"] for a in manifest["artifacts"])
    log.info("backup %s complete: %s stored", manifest["backup_id"], human_size(stored))
    return manifest


def run_restore(
    engine_name: str, target: str, repository: str, encryption_key: str, request: Any
) -> dict[str, Any]:
    """The body of a ``restore-<engine>`` flow: the engine's report (or plan) as JSON."""
    engine = get_engine(engine_name)
    block_type: Any = TARGET_BLOCKS[engine_name]
    run: EngineRun[Any] = open_restore(block_type, engine_name, target, repository, encryption_key)
    with run.locked():
        report = engine_restore(engine_name, target, run.conn, run.repo, run.enc, request)
    summary = engine.restore_summary(report)
    publish(summary.title, f"restore-{engine_name}-{target}", summary.lines, summary.rows)
    verb = "planned" if report.get("dry_run") else "restored"
    get_run_logger().info("%s %s into %s", verb, report["backup_id"], target)
    return report
