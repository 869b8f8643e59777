"""Storing one artifact through the stream, and reading it back verified.

Engines hand over a byte source (usually a tool's stdout, ``store_tool_output``) and
get back an ``Artifact`` record for the manifest; restores and verify get the plaintext
back into a sink with every check applied, the manifest's seal first.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable
from typing import IO, cast

from strongroom.catalog import (
    Artifact,
    Catalog,
    Manifest,
    StoredChunks,
    data_key,
    manifest_key,
    owner_of,
)
from strongroom.config import EncryptionConfig, RepositoryConfig
from strongroom.errors import Conflict, IntegrityError, NotFound
from strongroom.pipeline import (
    COMPRESSION,
    ENCRYPTION,
    HOLDBACK,
    Progress,
    StreamStats,
    Writable,
    restore_stream,
    store_stream,
)
from strongroom.process import ReadAhead, Tool
from strongroom.repository.base import Repository, StorageSettings
from strongroom.seal import origin_of


def store_artifact(
    repo: Repository,
    key: str,
    source: IO[bytes],
    *,
    name: str,
    content: str,
    encryption: EncryptionConfig,
    level: int,
    settings: StorageSettings | None = None,
    progress: Progress | None = None,
    meta: dict[str, object] | None = None,
    threads: int = -1,
) -> Artifact:
    """Stream ``source`` into ``key``; the object is committed only if the stream ends cleanly."""
    with repo.open_write(key, settings) as writer:
        stats = store_stream(
            source,
            writer,
            recipients=encryption.recipients,
            level=level,
            progress=progress,
            threads=threads,
        )
        stored = writer.commit()
    if stored != stats.stored_size:
        repo.delete(key)
        raise IntegrityError(
            f"{name}: storage reports {stored} bytes, the stream wrote {stats.stored_size}"
        )
    return Artifact(
        name=name,
        key=key,
        content=content,
        raw_size=stats.raw_size,
        stored_size=stats.stored_size,
        raw_sha256=stats.raw_sha256,
        stored_sha256=stats.stored_sha256,
        compression=COMPRESSION,
        compression_level=level,
        encryption=ENCRYPTION,
        recipients=list(encryption.recipients),
        meta=dict(meta or {}),
        stored_chunks=StoredChunks(
            size=stats.stored_chunk_size,
            first=stats.stored_chunk_first,
            sha256=list(stats.stored_chunk_sha256),
        )
        if stats.stored_chunk_size
        else None,
    )


def store_tool_output(
    repo: Repository, tool: Tool, what: str, store: Callable[[IO[bytes]], Artifact]
) -> Artifact:
    """Store a running tool's stdout with ``store`` (read ahead in a thread).

    The tool is stopped if storing fails, and the stored object is removed again unless
    the tool then exits 0: its exit status is what proves the output was whole."""
    assert tool.proc.stdout is not None
    source = ReadAhead(tool.proc.stdout)
    try:
        artifact = store(cast(IO[bytes], source))
    except BaseException:
        tool.kill()
        raise
    finally:
        source.close()  # stops the read-ahead thread, also when the store failed
    try:
        tool.check(what)
    except BaseException:
        repo.delete(artifact.key)
        raise
    return artifact


def check_durable(repo: Repository, artifact: Artifact) -> None:
    """Confirm the artifact is present with the size the manifest will record."""
    try:
        size = repo.size(artifact.key)
    except NotFound:
        raise IntegrityError(f"artifact {artifact.name} is missing at {artifact.key}") from None
    if size != artifact.stored_size:
        raise IntegrityError(
            f"artifact {artifact.name} at {artifact.key} has {size} bytes, "
            f"manifest says {artifact.stored_size}"
        )


def claim_backup_id(repo: Repository, engine: str, target: str, backup_id: str) -> None:
    """Refuse a backup id that is already published or has data (never write over a
    backup), and a backup the repository could not sign (checked up front, before any
    byte is dumped: ``repo.trust.require_signer``)."""
    repo.trust.require_signer(f"backup {backup_id} of {engine}/{target}")
    if repo.exists(manifest_key(engine, target, backup_id)) or any(
        True for _ in repo.list(data_key(engine, target, backup_id, ""))
    ):
        raise Conflict(
            f"backup id {backup_id} already exists for {engine}/{target}; it is never overwritten"
        )


def storage_settings(repo_config: RepositoryConfig, started: dt.datetime) -> StorageSettings:
    """Object-lock retain-until for every object of a new backup: the repository's
    retention days, or the retention policy's longest-keeping rule when the run set one."""
    floor = (
        started + dt.timedelta(days=repo_config.retention_days)
        if repo_config.retention_days
        else None
    )
    candidates = [d for d in (floor, repo_config.retain_until) if d is not None]
    return StorageSettings(retain_until=max(candidates) if candidates else None)


def publish_backup(
    repo: Repository, manifest: Manifest, settings: StorageSettings | None = None
) -> str:
    """Make a backup visible: confirm every artifact is durable, then write the manifest
    last (signed, its signature first; sealed to the artifacts' recipients; locked as
    long as the data it describes)."""
    for artifact in manifest.artifacts:
        check_durable(repo, artifact)
    return Catalog(repo).write(manifest, settings)


def extend_locks(
    repo: Repository, artifacts: list[Artifact], backup_id: str, settings: StorageSettings
) -> int:
    """Lock every artifact a backup references from earlier backups (incremental chains)
    at least as long as the backup itself (S3 object lock; a repository without locks
    has nothing to extend). Returns how many were extended."""
    extend = getattr(repo, "extend_lock", None)
    if extend is None or settings.retain_until is None:
        return 0
    return sum(
        1
        for a in artifacts
        if owner_of(a) not in (backup_id, "") and extend(a.key, settings) is not None
    )


def read_artifact(
    repo: Repository,
    artifact: Artifact,
    sink: Writable,
    *,
    encryption: EncryptionConfig,
    holdback: int = HOLDBACK,
    progress: Progress | None = None,
    check_seal: bool = True,
    on_verified: Callable[[], None] | None = None,
) -> StreamStats:
    """Stream an artifact's plaintext into ``sink`` with every check applied.

    An artifact of a manifest read from the catalog is refused before any byte flows
    when that manifest is not signed by a trusted key, is stored under another name or
    does not match its seal (``check_seal=False``: the caller, i.e. verify, checks the
    stored manifest itself). ``on_verified``: called whenever all the plaintext
    written so far comes from stored chunks that matched the manifest's list (never,
    before the end, for an artifact stored without one)."""
    origin = origin_of(artifact) if check_seal else None
    if origin is not None:
        origin.check([i.get_secret_value() for i in encryption.identities])
    try:
        source = repo.open_read(artifact.key)
    except NotFound:
        raise NotFound(
            f"artifact {artifact.name} is missing from the repository (key {artifact.key})"
        ) from None
    try:
        return restore_stream(
            source,
            sink,
            identities=[i.get_secret_value() for i in encryption.identities],
            expected_stored_sha256=artifact.stored_sha256,
            expected_raw_sha256=artifact.raw_sha256,
            name=f"artifact {artifact.name} ({artifact.key})",
            holdback=holdback,
            progress=progress,
            expected_chunks=(
                artifact.stored_chunks.sha256,
                artifact.stored_chunks.size,
                artifact.stored_chunks.first,
            )
            if artifact.stored_chunks is not None
            else None,
            on_verified=on_verified,
        )
    finally:
        with contextlib.suppress(Exception):
            source.close()
