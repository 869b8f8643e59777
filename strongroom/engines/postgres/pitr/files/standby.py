"""File-level backups taken from a streaming standby: the checks and the coordination
with the primary that PostgreSQL leaves to the caller.

PostgreSQL 15 runs a non-exclusive ``pg_backup_start`` / ``pg_backup_stop`` on a hot
standby (docs/physical.md, "Backup from a standby"), but there

* the start point is a **restartpoint**: ``fast => true`` asks for one at once, and it
  can only be made at a checkpoint record the standby has replayed (the primary's last
  checkpoint), so the start LSN is that checkpoint's redo point;
* ``pg_backup_stop`` writes no end-of-backup record, no backup history file, and
  switches no WAL: the stop LSN is the standby's ``minRecoveryPoint`` (every page on its
  disk is at most that new). The label says ``BACKUP FROM: standby`` and recovery of
  the restored copy takes its end point from the ``minRecoveryPoint`` of the copied
  ``pg_control``, which is why that file is copied **last** (:func:`take_control_file`);
* it refuses (at stop) a backup during which WAL written with ``full_page_writes =
  off`` was replayed, or during which the standby was promoted.

So the WAL comes from the **primary**: it archives it (its ``archive_command`` is the one
watched), and the segment holding the stop LSN is switched there (:meth:`Standby.finish`)
before the backup waits for it in the repository. Before anything is claimed, the
standby must be streaming (``pg_stat_wal_receiver``) the primary's system and timeline
and receive what the primary flushed (:func:`check_source`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import psycopg

from strongroom.config import PostgresConnection
from strongroom.engines.postgres.connect import connect
from strongroom.engines.postgres.pitr.basebackup import cluster_facts
from strongroom.engines.postgres.pitr.files.walk import FileStat, Tree
from strongroom.engines.postgres.wal import names
from strongroom.errors import IntegrityError, InvalidInput, ServiceUnavailable
from strongroom.redact import register

CONTROL_FILE = "global/pg_control"
BACKUP_FROM = "standby"


def take_control_file(tree: Tree) -> FileStat | None:
    """Remove ``global/pg_control`` from the files to copy and return it, to be copied
    after every other file (as pg_basebackup does): restoring a standby's backup ends
    recovery at the ``minRecoveryPoint`` that file holds, which must be at least as new
    as every page copied before it."""
    for i, entry in enumerate(tree.files):
        if entry.path == CONTROL_FILE:
            return tree.files.pop(i)
    return None


@dataclass
class Standby:
    """A checked standby source: its primary and what was found about both."""

    standby: PostgresConnection
    primary: PostgresConnection
    primary_facts: dict[str, Any]
    receiver: dict[str, Any]
    catch_up_s: float = 30.0
    primary_checkpoint: str | None = None  # the primary's CHECKPOINT replayed before the start
    checkpoint_note: str = ""

    def prepare(self) -> None:
        """Before ``pg_backup_start``: a ``CHECKPOINT`` on the primary, then wait until the
        standby has replayed its record. The standby's restartpoint (the backup's start)
        is then that checkpoint, and the restartpoint raises the standby's
        ``minRecoveryPoint`` past it: a restore to the backup's consistency point holds
        everything the primary committed before the backup. Without the right to
        checkpoint (superuser or pg_checkpoint) the backup starts at the primary's last
        checkpoint and a restore to ``immediate`` may end before the backup began
        (recorded in ``details.primary_checkpoint_note``)."""
        with connect(self.primary) as c:
            try:
                c.execute("CHECKPOINT")
            except psycopg.errors.InsufficientPrivilege as exc:
                self.checkpoint_note = (
                    f"CHECKPOINT on the primary failed ({exc}); started at its last"
                )
                return
            row = c.execute("SELECT checkpoint_lsn::text FROM pg_control_checkpoint()").fetchone()
        assert row is not None
        self.primary_checkpoint = str(row[0])
        _wait_lsn(
            self.standby,
            self.primary,
            "pg_last_wal_replay_lsn() > %s::pg_lsn",
            self.primary_checkpoint,
            self.catch_up_s,
            "replayed the primary's checkpoint",
        )

    def finish(self, stop_lsn: str, label: dict[str, Any], segment_size: int) -> dict[str, Any]:
        """After ``pg_backup_stop`` on the standby: check the label and the primary's
        timeline, switch the primary's WAL when its current segment still holds the
        stop LSN (so it is archived), and return the manifest's standby details."""
        if label.get("backup_from") != BACKUP_FROM:
            raise IntegrityError(
                f"the backup label says BACKUP FROM: {label.get('backup_from')}, not standby: "
                "the server was promoted during the backup"
            )
        tli = int(self.primary_facts["timeline"])
        stop_segno = names.segno_of_lsn(names.parse_lsn(stop_lsn) - 1, segment_size)
        with connect(self.primary) as c:
            row = c.execute(
                "SELECT (SELECT timeline_id FROM pg_control_checkpoint()),"
                " pg_current_wal_insert_lsn()::text WHERE NOT pg_is_in_recovery()"
            ).fetchone()
            if row is None or int(row[0]) != tli or int(label.get("start_timeline", tli)) != tli:
                raise InvalidInput(
                    f"the primary {self.primary.host}:{self.primary.port} left timeline {tli} "
                    "during the backup (failover or promotion): take the backup again"
                )
            insert = names.parse_lsn(str(row[1]))
            if insert < names.parse_lsn(stop_lsn):
                raise IntegrityError(
                    f"the standby's stop LSN {stop_lsn} is ahead of the primary's WAL "
                    f"({row[1]}): the standby does not follow this primary"
                )
            switched = None
            if names.segno_of_lsn(insert, segment_size) == stop_segno:
                try:
                    got = c.execute("SELECT pg_switch_wal()::text").fetchone()
                except psycopg.errors.InsufficientPrivilege as exc:
                    raise InvalidInput(
                        "the primary's WAL must be switched so the segment holding the "
                        f"standby's stop LSN is archived, and pg_switch_wal() failed ({exc}); "
                        "GRANT EXECUTE ON FUNCTION pg_switch_wal() TO the backup role"
                    ) from None
                switched = str(got[0]) if got else None
        return {
            "backup_from": BACKUP_FROM,
            "primary": {
                "host": self.primary.host,
                "port": self.primary.port,
                "version": self.primary_facts.get("version"),
            },
            "standby_receiver": self.receiver,
            "primary_switched_wal_at": switched,
            "primary_checkpoint": self.primary_checkpoint,
            **({"primary_checkpoint_note": self.checkpoint_note} if self.checkpoint_note else {}),
        }


def check_source(
    conn: PostgresConnection,
    facts: dict[str, Any],
    primary: PostgresConnection | None,
    *,
    catch_up_s: float = 30.0,
) -> Standby | None:
    """None when ``conn`` is a primary (and no ``primary`` is given); for a standby, the
    checked :class:`Standby`. ``InvalidInput`` for a standby without a primary, a primary
    that is not one or is of another system, a standby not streaming it."""
    if not facts.get("in_recovery"):
        if primary is not None:
            raise InvalidInput(
                f"a primary connection was given but {conn.host}:{conn.port} is not a "
                "standby (not in recovery): back it up without a primary"
            )
        return None
    if primary is None:
        raise InvalidInput(
            f"{conn.host}:{conn.port} is a standby: a backup from a standby needs its "
            "primary's connection (PostgresTarget primary_host / primary_port), which "
            "archives the WAL and switches it at the end of the backup"
        )
    register(*primary.secrets())
    pfacts = cluster_facts(primary)
    where = f"the primary {primary.host}:{primary.port}"
    if pfacts.get("in_recovery"):
        raise InvalidInput(
            f"{where} is itself a standby: give the primary the WAL is archived from "
            "(backups from a cascaded standby are not supported)"
        )
    if pfacts["system_identifier"] != facts["system_identifier"]:
        raise InvalidInput(
            f"{where} is database system {pfacts['system_identifier']}, the standby "
            f"{conn.host}:{conn.port} is {facts['system_identifier']}: not its primary"
        )
    with connect(primary) as c:
        row = c.execute("SELECT current_setting('full_page_writes')").fetchone()
    if row is None or row[0] != "on":
        raise InvalidInput(
            f"full_page_writes is off on {where}: a backup from a standby needs it on "
            "(PostgreSQL refuses the backup at pg_backup_stop otherwise)"
        )
    receiver = _receiver(conn)
    if receiver.get("status") != "streaming":
        raise InvalidInput(
            f"the standby {conn.host}:{conn.port} is not streaming from a primary "
            f"(pg_stat_wal_receiver status {receiver.get('status') or 'none: no WAL receiver'})"
            ": its backup would wait for WAL it never gets; fix primary_conninfo or back up "
            "the primary"
        )
    if receiver.get("received_tli") != pfacts["timeline"]:
        raise InvalidInput(
            f"the standby receives timeline {receiver.get('received_tli')}, {where} is on "
            f"timeline {pfacts['timeline']}: not streaming from this primary"
        )
    with connect(primary) as c:
        row = c.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()
    assert row is not None
    # it then really follows this primary's WAL, not only a primary of the same system
    _wait_lsn(
        conn,
        primary,
        "pg_last_wal_receive_lsn() >= %s::pg_lsn",
        str(row[0]),
        catch_up_s,
        "received what the primary had flushed",
    )
    return Standby(conn, primary, pfacts, receiver, catch_up_s)


def _receiver(conn: PostgresConnection) -> dict[str, Any]:
    with connect(conn) as c:
        row = c.execute(
            "SELECT pid, status, received_tli, sender_host, sender_port, slot_name"
            " FROM pg_stat_wal_receiver"
        ).fetchone()
    if row is None:
        return {}
    if row[0] is not None and row[1] is None:
        raise InvalidInput(
            "the backup role cannot read pg_stat_wal_receiver on the standby: grant it "
            "pg_read_all_stats (or pg_monitor)"
        )
    return {
        "status": row[1],
        "received_tli": row[2],
        "sender_host": row[3],
        "sender_port": row[4],
        "slot_name": row[5],
    }


def _wait_lsn(
    standby: PostgresConnection,
    primary: PostgresConnection,
    condition: str,
    lsn: str,
    limit: float,
    what: str,
) -> None:
    """Until ``condition`` (on ``lsn``) holds on the standby, for ``limit`` seconds."""
    deadline = time.monotonic() + limit
    with connect(standby) as c:
        while True:
            got = c.execute(
                f"SELECT coalesce({condition}, false), pg_last_wal_receive_lsn()::text,"
                " pg_last_wal_replay_lsn()::text",
                (lsn,),
            ).fetchone()
            assert got is not None
            if got[0]:
                return
            if time.monotonic() >= deadline:
                raise ServiceUnavailable(
                    f"the standby {standby.host}:{standby.port} has not {what} ({lsn} on "
                    f"{primary.host}:{primary.port}) in {limit:.0f} s: it received up to "
                    f"{got[1]}, replayed up to {got[2]}"
                )
            time.sleep(0.05)
