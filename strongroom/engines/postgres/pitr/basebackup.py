"""PostgreSQL physical base backups for point-in-time recovery.

``pg_basebackup -D - -Ft -X none -c fast`` writes one tar to stdout; it streams
through the pipeline (SHA-256, zstd, age) into ``data/postgresql/<target>/<id>/base.tar``
while ``TarTap`` picks ``backup_label`` and ``backup_manifest`` out of the passing
stream. Nothing is staged on disk.

WAL is not in the tar (``-X none``): the backup is restorable only with the WAL
from its start to its stop position, which the cluster's ``archive_command``
(``strongroom-wal push``) sends to ``wal/<target>/``. The backup counts as done
only when every one of those files is in the repository: the manifest is
written after that check, never before.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from typing import IO, Any, cast

from strongroom.artifacts import claim_backup_id, publish_backup, storage_settings, store_artifact
from strongroom.catalog import PHYSICAL_KINDS, Artifact, Catalog, Manifest, data_key
from strongroom.config import EncryptionConfig, PostgresConnection, RepositoryConfig
from strongroom.engines.postgres import inspection as pg_inspect
from strongroom.engines.postgres.backup import ENGINE, pg_tool, tool_version
from strongroom.engines.postgres.connect import connect
from strongroom.engines.postgres.pitr.archiver_watch import ArchiverWatch
from strongroom.engines.postgres.pitr.tar import (
    BaseTarCheck,
    TarTap,
    check_manifest_checksum,
    parse_backup_label,
)
from strongroom.engines.postgres.wal import names
from strongroom.engines.postgres.wal.store import wal_prefix
from strongroom.errors import IntegrityError, InvalidInput, ServiceUnavailable
from strongroom.ids import new_backup_id
from strongroom.pipeline import Progress
from strongroom.process import Tool
from strongroom.redact import register
from strongroom.repository.base import Repository
from strongroom.verify import register_check

KIND = "base"
CONTENT = "pg_basebackup-tar"
ARTIFACT = "base.tar"

register_check(CONTENT, BaseTarCheck)


class _TeeReader:
    """Reads from a tool's stdout and shows every byte to a TarTap on the way."""

    def __init__(self, source: IO[bytes], tap: TarTap) -> None:
        self._source = source
        self._tap = tap

    def read(self, n: int = -1) -> bytes:
        data = self._source.read(n if n and n > 0 else 1024 * 1024)
        if data:
            self._tap.write(data)
        return data


def cluster_facts(conn: PostgresConnection) -> dict[str, Any]:
    """What a base backup and its PITR need to know about the cluster."""
    with connect(conn) as c:
        facts = pg_inspect.server_facts(c)
        row = c.execute(
            "SELECT (SELECT system_identifier FROM pg_control_system()),"
            " (SELECT timeline_id FROM pg_control_checkpoint()),"
            " (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'),"
            " current_setting('archive_mode'), current_setting('wal_level'),"
            " current_setting('archive_command'),"
            " (SELECT count(*) FROM pg_tablespace"
            "   WHERE spcname NOT IN ('pg_default', 'pg_global'))"
        ).fetchone()
    assert row is not None
    return {
        **facts,
        "system_identifier": int(row[0]),
        "timeline": int(row[1]),
        "wal_segment_size": int(row[2]),
        "archive_mode": row[3],
        "wal_level": row[4],
        "archive_command": row[5],
        "extra_tablespaces": int(row[6]),
    }


def _next_xid(conn: PostgresConnection) -> int:
    with connect(conn) as c:
        row = c.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint").fetchone()
    assert row is not None
    return int(row[0])


def required_wal(details: dict[str, Any]) -> list[str]:
    """The WAL files a base backup needs to become consistent: start to stop segment on
    its timeline, plus its backup history file (a primary's backups only)."""
    size = int(details["wal_segment_size"])
    tli = int(details["timeline"])
    first = names.segno_of_lsn(names.parse_lsn(details["start_lsn"]), size)
    last = names.segno_of_lsn(names.parse_lsn(details["stop_lsn"]) - 1, size)
    found = [names.segment_name(tli, n, size) for n in range(first, max(first, last) + 1)]
    if details.get("backup_from") == "standby":
        return found  # a standby writes no backup history file
    offset = names.parse_lsn(details["start_lsn"]) % size
    found.append(f"{details['start_wal']}.{offset:08X}.backup")
    return found


def wait_for_wal(
    repo: Repository,
    target: str,
    wanted: list[str],
    *,
    timeout_s: float,
    poll_s: float = 0.5,
    watch: Callable[[], None] | None = None,
) -> list[str]:
    """Wait until every file in ``wanted`` is archived under ``wal/<target>/``; returns
    the ones still missing after ``timeout_s`` (empty: all there). ``watch`` is called
    on every round and may raise (the archiver is failing). Polls every 50 ms at first,
    backing off to ``poll_s``: the last segment usually lands within a few tenths."""
    deadline = time.monotonic() + timeout_s
    delay = min(0.05, poll_s)
    while True:
        folders = {f"{wal_prefix(target)}{name[:8]}/" for name in wanted}
        present: set[str] = set()
        for folder in folders:
            present.update(info.key.rsplit("/", 1)[-1] for info in repo.list(folder))
        missing = [n for n in wanted if n not in present]
        if not missing or time.monotonic() >= deadline:
            return missing
        if watch is not None:
            watch()
        time.sleep(delay)
        delay = min(delay * 1.5, poll_s)


def require_archived_wal(
    repo: Repository,
    target: str,
    details: dict[str, Any],
    *,
    timeout_s: float,
    watch: Callable[[], None] | None,
    what: str,
) -> list[str]:
    """The WAL segments a physical backup needs (start..stop), once all are archived in
    the repository; ``ServiceUnavailable`` naming the missing ones after ``timeout_s``."""
    wanted = required_wal(details)
    missing = wait_for_wal(repo, target, wanted, timeout_s=timeout_s, watch=watch)
    if missing:
        raise ServiceUnavailable(
            f"{what}: WAL needed to make it consistent is not archived in "
            f"{repo.describe()}/{wal_prefix(target)} after {timeout_s:.0f} s "
            f"(missing {', '.join(missing[:5])}); is archive_command "
            "'strongroom-wal push %p' configured with this repository and target?"
        )
    return wanted


def base_backup_postgres(
    conn: PostgresConnection,
    repo: Repository,
    repo_config: RepositoryConfig,
    enc: EncryptionConfig,
    *,
    backup_id: str | None = None,
    labels: dict[str, str] | None = None,
    progress: Progress | None = None,
    manifest_checksums: str = "SHA256",
    wal_timeout_s: float = 300.0,
    checkpoint: str = "fast",
) -> Manifest:
    """Take a base backup of ``conn``'s cluster; returns the published manifest."""
    register(*conn.secrets(), *repo_config.secrets(), *enc.secrets())
    if manifest_checksums.upper() not in ("NONE", "CRC32C", "SHA224", "SHA256", "SHA384", "SHA512"):
        raise InvalidInput(f"unknown manifest checksum algorithm {manifest_checksums!r}")
    if checkpoint not in ("fast", "spread"):
        raise InvalidInput("checkpoint must be 'fast' or 'spread'")
    facts = cluster_facts(conn)
    if facts["wal_level"] not in ("replica", "logical"):
        raise InvalidInput(f"wal_level is {facts['wal_level']}: PITR needs replica or logical")
    if facts["archive_mode"] == "off":
        raise InvalidInput(
            "archive_mode is off on the server: a base backup without archived WAL cannot "
            "be restored; set archive_mode = on and archive_command = 'strongroom-wal push %p'"
        )
    if facts["extra_tablespaces"]:
        raise InvalidInput(
            f"the cluster has {facts['extra_tablespaces']} tablespace(s) besides pg_default "
            "and pg_global; streamed base backups support the default tablespaces only"
        )
    started = dt.datetime.now(dt.UTC)
    watch = ArchiverWatch(conn, facts["archive_command"], facts["wal_segment_size"])
    bid = backup_id or new_backup_id(started)
    claim_backup_id(repo, ENGINE, conn.name, bid)
    settings = storage_settings(repo_config, started)
    key = data_key(ENGINE, conn.name, bid, ARTIFACT)
    tap = TarTap()
    argv = [
        pg_tool("pg_basebackup"),
        "-D",
        "-",
        "-Ft",
        "-X",
        "none",
        "-c",
        checkpoint,
        "--no-password",
        f"--label=strongroom {bid}",
        f"--manifest-checksums={manifest_checksums.upper()}",
    ]
    env = {**conn.libpq_env(), "PGDATABASE": conn.maintenance_db}
    tool = Tool(argv, env)
    assert tool.proc.stdout is not None
    artifact: Artifact | None = None
    watch.start(tool.kill)

    def failing() -> None:
        if watch.error is not None:
            raise watch.error

    try:
        try:
            artifact = store_artifact(
                repo,
                key,
                cast(IO[bytes], _TeeReader(tool.proc.stdout, tap)),
                name=ARTIFACT,
                content=CONTENT,
                encryption=enc,
                level=repo_config.compression_level,
                settings=settings,
                progress=progress,
                meta={"manifest_checksums": manifest_checksums.upper()},
            )
        except BaseException:
            tool.kill()
            failing()
            raise
        failing()
        tool.check("pg_basebackup")
        stopped = dt.datetime.now(dt.UTC)
        if not tap.ended or "backup_label" not in tap.captured:
            raise IntegrityError("pg_basebackup's tar stream is incomplete (no backup_label)")
        label_text = tap.captured["backup_label"].decode("utf-8", "replace")
        label = parse_backup_label(label_text)
        pg_manifest = check_manifest_checksum(tap.captured.get("backup_manifest", b""))
        ranges = pg_manifest.get("WAL-Ranges") or []
        if not ranges:
            raise IntegrityError("backup_manifest has no WAL-Ranges")
        details: dict[str, Any] = {
            "format": "pg_basebackup-tar",
            "system_identifier": facts["system_identifier"],
            "timeline": int(label.get("start_timeline", ranges[-1]["Timeline"])),
            "stop_timeline": int(ranges[-1]["Timeline"]),
            "wal_segment_size": facts["wal_segment_size"],
            "start_lsn": label["start_lsn"],
            "stop_lsn": ranges[-1]["End-LSN"],
            "checkpoint_lsn": label.get("checkpoint_lsn"),
            "start_wal": label["start_wal"],
            "start_time": started.isoformat(),
            "stop_time": stopped.isoformat(),
            "label_start_time": label.get("start_time"),
            "next_xid": _next_xid(conn),
            "backup_label": label_text,
            "files": len(pg_manifest.get("Files", [])),
            "manifest_checksums": manifest_checksums.upper(),
            "wal_target": conn.name,
        }
        details["stop_wal"] = names.segment_name(
            details["stop_timeline"],
            names.segno_of_lsn(
                names.parse_lsn(details["stop_lsn"]) - 1, details["wal_segment_size"]
            ),
            details["wal_segment_size"],
        )
        wanted = require_archived_wal(
            repo,
            conn.name,
            details,
            timeout_s=wal_timeout_s,
            watch=failing,
            what=f"base backup {bid}",
        )
        details["archived_wal"] = wanted
        manifest = Manifest(
            backup_id=bid,
            engine=ENGINE,
            target=conn.name,
            kind=KIND,
            started_at=started,
            finished_at=dt.datetime.now(dt.UTC),
            repository=repo.describe(),
            tool_versions={"pg_basebackup": tool_version("pg_basebackup")},
            server={
                "host": conn.host,
                "port": conn.port,
                **{k: v for k, v in facts.items() if k != "archive_command"},
            },
            artifacts=[artifact],
            details=details,
            labels=dict(labels or {}),
        )
        publish_backup(repo, manifest, settings)
    except BaseException:
        if artifact is not None or repo.exists(key):
            repo.delete(key)
        raise
    finally:
        watch.stop()
    return manifest


def base_backups(repo: Repository, target: str) -> list[Manifest]:
    """Physical backups of ``target`` (base and file-level), oldest first (logical backups
    are skipped)."""
    return base_backups_with_findings(repo, target)[0]


def base_backups_with_findings(
    repo: Repository, target: str
) -> tuple[list[Manifest], list[dict[str, Any]]]:
    """(trusted base backups of ``target`` oldest first, the target's catalog entries
    skipped as not trusted: ``strongroom.catalog.catalog_finding``)."""
    manifests, findings = Catalog(repo).list_with_findings(ENGINE, target)
    return [m for m in manifests if m.kind in PHYSICAL_KINDS], findings
