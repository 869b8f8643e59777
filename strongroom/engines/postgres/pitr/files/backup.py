"""File-level physical backups of PostgreSQL: full, differential and incremental.

For a runner that can read the data directory (on the database host, or a sidecar
container sharing its volume). One session runs ``pg_backup_start(label, fast => true)``
(non-exclusive: the backup lives as long as that session) and stays open while the data
directory is walked (``walk``) and every file that changed since the prior backup
(``chain``) streams through ``store_artifact`` into its own artifact; unchanged files are
listed with the prior's artifact. ``pg_backup_stop(wait_for_archive => false)`` then
returns the backup label and tablespace map, stored as artifacts of their own.

Files may change while they are read: that is what a base backup always faces, and
why it is safe (docs/physical.md): every page written after the start checkpoint has its
full image in the WAL from ``pg_backup_start``'s LSN on, and recovery replays that WAL
up to the stop LSN at least before the cluster is consistent. So the backup is done only
when the WAL from start to stop is in the repository (``basebackup.wait_for_wal``), and
the manifest is written after that, last.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from typing import Any

from strongroom.artifacts import (
    claim_backup_id,
    extend_locks,
    publish_backup,
    storage_settings,
)
from strongroom.catalog import Manifest, owner_of
from strongroom.config import EncryptionConfig, PostgresConnection, RepositoryConfig
from strongroom.engines.postgres.backup import ENGINE
from strongroom.engines.postgres.connect import connect
from strongroom.engines.postgres.pitr.archiver_watch import ArchiverWatch
from strongroom.engines.postgres.pitr.basebackup import (
    cluster_facts,
    require_archived_wal,
)
from strongroom.engines.postgres.pitr.files import chain, standby
from strongroom.engines.postgres.pitr.files.copier import Copier
from strongroom.engines.postgres.pitr.files.walk import (
    Tree,
    system_identifier_of,
    walk_data_directory,
)
from strongroom.engines.postgres.pitr.tar import parse_backup_label
from strongroom.engines.postgres.wal import names
from strongroom.errors import InvalidInput
from strongroom.ids import new_backup_id
from strongroom.pipeline import Progress
from strongroom.redact import register
from strongroom.repository.base import Repository

FILE_CLOCK_LAG_NS = 50_000_000  # file mtimes come from a clock a tick (<= 10 ms) behind


def control_system_identifier(data_directory: str) -> int:
    """The system identifier in the data directory's ``global/pg_control``: proves the
    folder the runner reads is the data directory of the server it talks to."""
    try:
        found = system_identifier_of(data_directory)
    except InvalidInput as exc:
        raise InvalidInput(f"{exc}: the runner needs read access to the data directory") from None
    if found is None:
        raise InvalidInput(
            f"cannot read {data_directory}/global/pg_control (missing or truncated): the "
            "runner needs read access to the data directory"
        )
    return found


def files_backup_postgres(
    conn: PostgresConnection,
    repo: Repository,
    repo_config: RepositoryConfig,
    enc: EncryptionConfig,
    *,
    data_directory: str,
    backup_type: str = "full",
    checksum: bool = False,
    backup_id: str | None = None,
    labels: dict[str, str] | None = None,
    progress: Progress | None = None,
    wal_timeout_s: float = 300.0,
    jobs: int = 1,
    primary: PostgresConnection | None = None,
) -> Manifest:
    """Take a file-level backup (``full``, ``diff`` or ``incr``) of ``conn``'s cluster,
    reading its files from ``data_directory``; returns the published manifest. When
    ``conn`` is a streaming standby, ``primary`` is its primary (``standby.py``)."""
    register(*conn.secrets(), *repo_config.secrets(), *enc.secrets())
    if not 1 <= jobs <= 64:
        raise InvalidInput("jobs must be between 1 and 64")
    if backup_type not in chain.BACKUP_TYPES:
        raise InvalidInput(f"backup type must be one of {', '.join(chain.BACKUP_TYPES)}")
    facts = cluster_facts(conn)
    source = standby.check_source(conn, facts, primary)
    archiving = source.primary_facts if source is not None else facts  # who archives WAL
    if archiving["wal_level"] not in ("replica", "logical"):
        raise InvalidInput(f"wal_level is {archiving['wal_level']}: physical backups need replica")
    if archiving["archive_mode"] == "off":
        raise InvalidInput(
            "archive_mode is off on the server: a physical backup without archived WAL "
            "cannot be restored; set archive_mode = on and archive_command = "
            "'strongroom-wal push %p'"
        )
    if facts["extra_tablespaces"]:
        raise InvalidInput(
            f"the cluster has {facts['extra_tablespaces']} tablespace(s) besides pg_default "
            "and pg_global; file-level backups support the default tablespaces only (for now)"
        )
    root = os.path.abspath(data_directory)
    found = control_system_identifier(root)
    if found != facts["system_identifier"]:
        raise InvalidInput(
            f"{root} belongs to database system {found}, the server is "
            f"{facts['system_identifier']}: not its data directory"
        )
    choice = chain.choose_prior(
        repo,
        conn.name,
        backup_type,
        enc,
        system_identifier=facts["system_identifier"],
        timeline=facts["timeline"],
    )
    started = dt.datetime.now(dt.UTC)
    bid = backup_id or new_backup_id(started)
    claim_backup_id(repo, ENGINE, conn.name, bid)
    settings = storage_settings(repo_config, started)
    copier = Copier(
        repo,
        conn.name,
        bid,
        enc,
        repo_config.compression_level,
        settings,
        choice.prior,
        checksum,
        progress,
    )
    watch = ArchiverWatch(
        source.primary if source is not None else conn,
        archiving["archive_command"],
        facts["wal_segment_size"],
    )
    session = connect(conn)
    watch.start(session.cancel)

    def failing() -> None:
        if watch.error is not None:
            raise watch.error

    try:
        if source is not None:
            source.prepare()  # a checkpoint on the primary, replayed by the standby
        # before the start checkpoint, less the lag of the kernel's coarse file clock:
        # every write after a file is read gets an mtime no earlier than this, and the
        # next backup trusts only mtimes in an earlier second (chain.unchanged)
        copy_started_ns = time.time_ns() - FILE_CLOCK_LAG_NS
        row = session.execute(
            "SELECT pg_backup_start(%s, fast => true)::text", (f"strongroom {bid}",)
        ).fetchone()
        assert row is not None
        tree: Tree = walk_data_directory(root)
        control = standby.take_control_file(tree)  # copied after every other file
        copier.copy_all(root, tree.files, jobs, failing)
        if control is not None:
            copier.copy_all(root, [control], 1, failing)
        try:
            # not PostgreSQL's wait: it checks the archiver once a second (a second per
            # backup, measured), and on a standby waits only with archive_mode = always.
            # The WAL is waited for in the repository itself below (require_archived_wal).
            stop = session.execute(
                "SELECT lsn::text, labelfile, spcmapfile"
                " FROM pg_backup_stop(wait_for_archive => false)"
            ).fetchone()
        except Exception:
            failing()
            raise
        assert stop is not None
        stopped = dt.datetime.now(dt.UTC)
        failing()
        label_text, spcmap_text = str(stop[1]), str(stop[2] or "")
        label = parse_backup_label(label_text)
        from_standby = (
            source.finish(str(stop[0]), label, facts["wal_segment_size"]) if source else {}
        )
        copier.text(chain.LABEL, label_text, chain.CONTENT_LABEL)
        copier.text(chain.SPCMAP, spcmap_text, chain.CONTENT_SPCMAP)
        timeline = int(label.get("start_timeline", facts["timeline"]))
        details: dict[str, Any] = {
            "format": "files",
            **chain.chain_details(choice, copier.artifacts, bid),
            "system_identifier": facts["system_identifier"],
            "timeline": timeline,
            "stop_timeline": timeline,
            "wal_segment_size": facts["wal_segment_size"],
            "start_lsn": label["start_lsn"],
            "stop_lsn": str(stop[0]),
            "checkpoint_lsn": label.get("checkpoint_lsn"),
            "start_wal": label["start_wal"],
            "start_time": started.isoformat(),
            "stop_time": stopped.isoformat(),
            "copy_started_ns": copy_started_ns,
            "label_start_time": label.get("start_time"),
            "next_xid": _next_xid(session),
            "backup_label": label_text,
            "wal_target": conn.name,
            "data_directory": root,
            "checksum": checksum,
            "directories": [list(d) for d in tree.directories],
            "empty_files": copier.empty,
            "skipped": tree.skipped[:100],
            **from_standby,
            "files": copier.files + len(copier.empty),
            "files_copied": copier.files_copied,
            "files_referenced": copier.files_referenced,
            "files_mapped": copier.files_mapped,
            "jobs": jobs,
            "copied_bytes": copier.copied_bytes,
            "referenced_bytes": copier.referenced_bytes,
        }
        details["stop_wal"] = names.segment_name(
            timeline,
            names.segno_of_lsn(names.parse_lsn(details["stop_lsn"]) - 1, facts["wal_segment_size"]),
            facts["wal_segment_size"],
        )
        wanted = require_archived_wal(
            repo, conn.name, details, timeout_s=wal_timeout_s, watch=failing, what=f"backup {bid}"
        )
        details["archived_wal"] = wanted
        if choice.prior is not None:
            extend_locks(repo, copier.artifacts, bid, settings)
        manifest = Manifest(
            backup_id=bid,
            engine=ENGINE,
            target=conn.name,
            kind=chain.KIND,
            started_at=started,
            finished_at=dt.datetime.now(dt.UTC),
            repository=repo.describe(),
            tool_versions={"postgres": str(facts.get("version", ""))},
            server={
                "host": conn.host,
                "port": conn.port,
                **{k: v for k, v in facts.items() if k != "archive_command"},
            },
            artifacts=copier.artifacts,
            details=details,
            labels=dict(labels or {}),
        )
        publish_backup(repo, manifest, settings)
    except BaseException:
        copier.clean_up()
        raise
    finally:
        watch.stop()
        session.close()  # ends a backup still in progress (non-exclusive)
    return manifest


def _next_xid(session: Any) -> int:
    row = session.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint").fetchone()
    assert row is not None
    return int(row[0])


def summary(manifest: Manifest) -> dict[str, Any]:
    """What a files backup did, for reports and benchmarks."""
    d = manifest.details
    own = [a for a in manifest.artifacts if owner_of(a) == manifest.backup_id]
    return {
        "backup_id": manifest.backup_id,
        "backup_type": d.get("backup_type"),
        "base_backup_id": d.get("base_backup_id"),
        "files": d.get("files"),
        "files_copied": d.get("files_copied"),
        "files_referenced": d.get("files_referenced"),
        "files_mapped": d.get("files_mapped"),
        "jobs": d.get("jobs"),
        "copied_bytes": d.get("copied_bytes"),
        "referenced_bytes": d.get("referenced_bytes"),
        "stored_bytes": sum(a.stored_size for a in own),
        "seconds": round(manifest.duration_s, 3),
    }
