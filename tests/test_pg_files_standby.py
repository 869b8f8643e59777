"""File-level physical backups taken from a streaming standby (docs/physical.md, "Backup
from a standby"): a real archiving primary (``strongroom-wal push``) takes writes while
a real hot standby of it is copied; every backup is restored and started, and compared
with what the primary had committed around it."""

from __future__ import annotations

import datetime as dt
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pydantic import SecretStr
from pyrage import x25519

from strongroom.catalog import owner_of
from strongroom.config import PostgresConnection
from strongroom.engines.postgres.pitr.basebackup import base_backups
from strongroom.engines.postgres.pitr.files import chain
from strongroom.engines.postgres.pitr.files import standby as standby_module
from strongroom.engines.postgres.pitr.files.backup import files_backup_postgres, summary
from strongroom.engines.postgres.pitr.files.chain import file_records
from strongroom.engines.postgres.pitr.files.restore import restore_files_backup
from strongroom.engines.postgres.wal.check import wal_check
from strongroom.engines.postgres.wal.names import parse_lsn
from strongroom.errors import InvalidInput
from strongroom.sandbox._process import make_temp_dir, remove_dir
from strongroom.sandbox.ports import free_port
from strongroom.sandbox.postgres import PG_BIN_DIR, PostgresServer, chown_to_postgres
from strongroom.sandbox.postgres_standby import StandbyServer
from strongroom.verify import verify_backup
from tests.test_pg_files import _new_cluster, fingerprint_sql
from tests.test_pitr import Cluster, _restore

STATIC = ("keep", "grow")


@pytest.fixture(scope="module")
def age_identity() -> x25519.Identity:
    return x25519.Identity.generate()


@pytest.fixture(scope="module")
def primary(age_identity: x25519.Identity) -> Iterator[Cluster]:
    c, root = _new_cluster("pgsb", age_identity)
    c.sql("CREATE TABLE hot (id int PRIMARY KEY, v text); CREATE TABLE ticks (i int)")
    try:
        yield c
    finally:
        c.server.stop()
        remove_dir(root)


@pytest.fixture(scope="module")
def standby(primary: Cluster) -> Iterator[StandbyServer]:
    server = StandbyServer(primary.server).start()
    time.sleep(1.1)  # its files older than a second, as a standby's files are
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def pg_tmp() -> Iterator[Path]:
    path = make_temp_dir("pgsb-test")
    chown_to_postgres(path, 0o755)
    yield path
    remove_dir(path)


def standby_conn(c: Cluster, s: StandbyServer) -> PostgresConnection:
    return PostgresConnection(
        name=c.target, host=s.host, port=s.port, password=SecretStr(s.password)
    )


def take(c: Cluster, s: StandbyServer, backup_type: str, **kw: Any) -> Any:
    kw.setdefault("primary", c.conn)
    return files_backup_postgres(
        standby_conn(c, s),
        c.repo,
        c.repo_config,
        c.enc,
        data_directory=str(s.data_dir),
        backup_type=backup_type,
        wal_timeout_s=60,
        **kw,
    )


class Writer:
    """Commits on the primary from a thread: rows into ``hot`` (``v = md5(id)`` always
    holds), and a rising number into ``ticks`` after each round."""

    def __init__(self, c: Cluster) -> None:
        self.dsn = {
            "host": c.conn.host,
            "port": c.conn.port,
            "user": "postgres",
            "password": c.server.password,
            "dbname": "postgres",
        }
        self.stop_event = threading.Event()
        self.tick = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with psycopg.connect(**self.dsn, autocommit=True) as conn:
            i = int(conn.execute("SELECT coalesce(max(i), 0) FROM ticks").fetchone()[0])  # type: ignore[index]
            while not self.stop_event.is_set():
                i += 1
                conn.execute(
                    "INSERT INTO hot SELECT g, md5(g::text)"
                    " FROM generate_series(%s::int, %s::int) g",
                    (i * 100, i * 100 + 99),
                )
                conn.execute("UPDATE hot SET v = md5(id::text) WHERE id %% 7 = %s::int", (i % 7,))
                conn.execute("INSERT INTO ticks VALUES (%s)", (i,))
                self.tick = i
                time.sleep(0.05)

    def __enter__(self) -> Writer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while self.tick < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.tick >= 3
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(30)


def committed_tick(c: Cluster) -> int:
    return int(c.sql("SELECT coalesce(max(i), 0) FROM ticks"))


def consistent_between(low: int, high: int, fp: str) -> tuple[str, str]:
    """(query, expected): the static tables' fingerprint, every tick committed (and
    replayed by the standby) before the backup started, none committed after it
    returned, the heap invariant and the primary key index intact."""
    query = (
        f"SELECT ({fingerprint_sql(STATIC)}) || '|' ||"
        f" (SELECT max(i) BETWEEN {low} AND {high} FROM ticks)::text || '|' ||"
        " (SELECT count(*) FROM hot WHERE v <> md5(id::text))::text || '|' ||"
        " (SELECT bt_index_check('hot_pkey', true))::text"
    )
    return query, f"{fp}|true|0|"


def test_full_and_incr_from_the_standby_while_the_primary_writes(
    primary: Cluster, standby: StandbyServer, pg_tmp: Path
) -> None:
    c, s = primary, standby
    fp_static = c.sql(fingerprint_sql(STATIC))
    with Writer(c):
        # for comparison, under the same writer: a full backup from the primary
        t0 = time.monotonic()
        from_primary = files_backup_postgres(
            c.conn,
            c.repo,
            c.repo_config,
            c.enc,
            data_directory=str(c.server.data_dir),
            backup_type="full",
            wal_timeout_s=60,
        )
        primary_s = time.monotonic() - t0
        assert "backup_from" not in from_primary.details
        low_full = committed_tick(c)
        s.catch_up()
        t0 = time.monotonic()
        full = take(c, s, "full")
        full_s = time.monotonic() - t0
        high_full = committed_tick(c)

        c.sql("UPDATE grow SET v = 'incr' WHERE id <= 500; CHECKPOINT")
        fp_static_incr = c.sql(fingerprint_sql(STATIC))
        s.catch_up()
        time.sleep(1.1)  # the incremental's copy start lies in a later second
        low_incr = committed_tick(c)
        t0 = time.monotonic()
        incr = take(c, s, "incr", jobs=3)  # pg_control still last with parallel copy
        incr_s = time.monotonic() - t0
        high_incr = committed_tick(c)
    assert high_full > low_full and high_incr > low_incr  # writes went on during both

    for m in (full, incr):
        d = m.details
        assert d["backup_from"] == "standby" and "BACKUP FROM: standby" in d["backup_label"]
        assert d["primary"]["port"] == c.server.port and m.server["port"] == s.port
        assert d["standby_receiver"]["status"] == "streaming"
        # it started at (or after) the checkpoint it asked the primary for
        assert parse_lsn(d["checkpoint_lsn"]) >= parse_lsn(d["primary_checkpoint"])
        assert not any(n.endswith(".backup") for n in d["archived_wal"])  # none on a standby
        assert d["data_directory"] == str(s.data_dir)
        assert verify_backup(c.repo, m, c.enc)["ok"]
        # pg_control was stored after every other file (keys are numbered in store
        # order; the label and tablespace map come after the copy), and is always
        # copied: it changes with every restartpoint
        own = [a for a in m.artifacts if owner_of(a) == m.backup_id]
        files = [a for a in own if a.meta.get("path") not in (chain.LABEL, chain.SPCMAP)]
        assert max(files, key=lambda a: a.key).meta["path"] == "global/pg_control"
        assert owner_of(file_records(m)["global/pg_control"]) == m.backup_id
    assert incr.details["base_backup_id"] == full.backup_id
    s_full, s_incr = summary(full), summary(incr)
    assert s_incr["files_referenced"] > 0.5 * s_full["files_copied"]
    keep_path, grow_path = (c.sql(f"SELECT pg_relation_filepath('{t}')") for t in STATIC)
    assert owner_of(file_records(incr)[keep_path]) == full.backup_id  # unchanged: referenced
    assert owner_of(file_records(incr)[grow_path]) == incr.backup_id  # changed: copied

    print(
        f"\nstandby full {full_s:.2f}s {_phases(full)} {s_full}"
        f"\nstandby incr {incr_s:.2f}s {_phases(incr)} {s_incr}"
        f"\nprimary full {primary_s:.2f}s {_phases(from_primary)} {summary(from_primary)}"
    )

    # the copied pg_control is the standby's: in archive recovery, and its minimum recovery
    # point (where the restore's recovery ends the backup) lies between start and stop
    control = _controldata(c, full, pg_tmp / "files")
    assert control["Database cluster state"] == "in archive recovery"
    min_point = parse_lsn(control["Minimum recovery ending location"])
    assert parse_lsn(full.details["start_lsn"]) <= min_point <= parse_lsn(full.details["stop_lsn"])

    fp_all = c.sql(fingerprint_sql((*STATIC, "hot", "ticks")))
    c.switch_and_wait()
    # the WAL continuity report counts the standby's backups as consistent
    rows = {
        r["backup_id"]: r
        for r in wal_check(c.repo, c.target, base_backups(c.repo, c.target))["backups"]
    }
    assert rows[full.backup_id]["consistent"] and rows[incr.backup_id]["consistent"]
    query, expect = consistent_between(low_full, high_full, fp_static)
    _check(
        _restore(
            c,
            pg_tmp / "full",
            backup_id=full.backup_id,
            recovery_target="immediate",
            verify_query=query,
            verify_expect=expect,
        ),
        full.backup_id,
    )
    query, expect = consistent_between(low_incr, high_incr, fp_static_incr)
    _check(
        _restore(
            c,
            pg_tmp / "incr",
            backup_id=incr.backup_id,
            recovery_target="immediate",
            verify_query=query,
            verify_expect=expect,
        ),
        incr.backup_id,
    )
    # replayed to the end of the archive: exactly what the primary has
    _check(
        _restore(
            c,
            pg_tmp / "latest",
            backup_id=incr.backup_id,
            recovery_target="latest",
            verify_query=fingerprint_sql((*STATIC, "hot", "ticks")),
            verify_expect=fp_all,
        ),
        incr.backup_id,
    )


def _controldata(c: Cluster, m: Any, folder: Path) -> dict[str, str]:
    restore_files_backup(c.repo, c.enc, c.target, m.backup_id, str(folder / "data"))
    out = subprocess.run(
        [str(PG_BIN_DIR / "pg_controldata"), "-D", str(folder / "data")],
        capture_output=True,
        text=True,
        check=True,
        env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"},
    ).stdout
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}


def _phases(m: Any) -> str:
    """Copy (start to pg_backup_stop) and WAL wait (to the manifest) seconds."""
    start, stop = (dt.datetime.fromisoformat(m.details[k]) for k in ("start_time", "stop_time"))
    copy, wal = (stop - start).total_seconds(), (m.finished_at - stop).total_seconds()
    return f"(copy {copy:.2f}s, wal {wal:.2f}s)"


def _check(report: dict[str, Any], backup_id: str) -> None:
    assert report["plan"]["backup"]["backup_id"] == backup_id
    assert report["recovery"]["verify"]["ok"], report["recovery"]["verify"]


def _keys(c: Cluster) -> set[str]:
    return {i.key for prefix in ("catalog/", "data/") for i in c.repo.list(prefix)}


def test_bad_standby_input_is_refused_before_anything(
    primary: Cluster, standby: StandbyServer, age_identity: x25519.Identity
) -> None:
    c, s = primary, standby
    before = _keys(c)
    with pytest.raises(InvalidInput, match="is a standby: a backup from a standby needs"):
        take(c, s, "full", primary=None)
    with pytest.raises(InvalidInput, match="is not a standby"):
        files_backup_postgres(
            c.conn,
            c.repo,
            c.repo_config,
            c.enc,
            data_directory=str(c.server.data_dir),
            primary=c.conn,
        )
    with pytest.raises(InvalidInput, match="is itself a standby"):
        take(c, s, "full", primary=standby_conn(c, s))
    # a primary of another database system
    with PostgresServer(archive_command="true") as other:
        stranger = PostgresConnection(
            name=c.target, host=other.host, port=other.port, password=SecretStr(other.password)
        )
        with pytest.raises(InvalidInput, match="not its primary"):
            take(c, s, "full", primary=stranger)
    # a standby whose WAL receiver cannot reach its primary
    s.point_at(free_port())
    try:
        deadline = time.monotonic() + 30
        while s.receiver_status() == "streaming" and time.monotonic() < deadline:
            time.sleep(0.1)
        with pytest.raises(InvalidInput, match="not streaming"):
            take(c, s, "full")
    finally:
        s.point_at(c.server.port)
        s.wait_streaming()
    assert _keys(c) == before  # nothing claimed, nothing stored


def test_flow_takes_the_primary_from_the_target_block(
    prefect_api: str, primary: Cluster, standby: StandbyServer
) -> None:
    from blocks import BackupRepository, EncryptionKey, PostgresTarget, register_all
    from flows.pitr import files_backup_postgresql
    from strongroom.config import pg_default_sslmode
    from tests.fixtures.strongroom_fixtures import signing_block_fields

    c, s = primary, standby
    register_all()
    identity = c.enc.identities[0].get_secret_value()
    EncryptionKey(recipients=c.enc.recipients, identity=identity).save("sbkey", overwrite=True)
    BackupRepository(**signing_block_fields(), local_path=str(c.repo.root)).save(
        "sbrepo", overwrite=True
    )
    fields = {
        "host": s.host,
        "port": s.port,
        "user": s.superuser,
        "password": s.password,
        "data_directory": str(s.data_dir),
    }
    block = PostgresTarget(**fields, primary_host=c.server.host, primary_port=c.server.port)
    to_primary = block.to_connection(c.target).primary_connection()
    assert to_primary is not None and to_primary.primary_host is None
    assert (to_primary.host, to_primary.port, to_primary.name) == (
        c.conn.host,
        c.conn.port,
        c.target,
    )
    assert (to_primary.user, to_primary.password) == (c.conn.user, c.conn.password)
    assert to_primary.sslmode == pg_default_sslmode(c.conn.host)
    assert PostgresTarget(**fields).to_connection(c.target).primary_connection() is None
    block.save(c.target, overwrite=True)
    PostgresTarget(**fields).save("sbnoprimary", overwrite=True)
    blocks = {"repository": "sbrepo", "encryption_key": "sbkey"}
    with pytest.raises(InvalidInput, match="needs its primary"):
        files_backup_postgresql(target="sbnoprimary", backup_type="full", **blocks)
    got = files_backup_postgresql(target=c.target, backup_type="incr", **blocks)
    assert got["details"]["backup_from"] == "standby"
    assert got["details"]["primary"]["port"] == c.server.port
    assert got["server"]["port"] == s.port


def test_a_standby_promoted_during_the_backup_stores_nothing(
    primary: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = primary
    s = StandbyServer(c.server, slot="strongroom_promoted").start()
    try:
        before = _keys(c)
        original = standby_module.take_control_file

        def promote_then(tree: Any) -> Any:  # after the walk, before the copy
            s.psql("SELECT pg_promote(true, 30)")
            return original(tree)

        monkeypatch.setattr(standby_module, "take_control_file", promote_then)
        with pytest.raises(psycopg.Error, match="promoted during online backup"):
            take(c, s, "full")
        assert s.psql("SELECT pg_is_in_recovery()") == "f"
        assert _keys(c) == before  # what it had stored is removed, nothing published
    finally:
        s.cleanup()
