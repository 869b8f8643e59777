"""File-level physical PostgreSQL backups (full / diff / incr) against real archiving
clusters: every restore starts PostgreSQL on the restored files (WAL from the archive
through ``strongroom-wal fetch``) and compares table fingerprints with the source."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pyrage import x25519

from strongroom.catalog import Catalog, manifest_key, owner_of
from strongroom.engines.postgres.pitr.files import blocks, copier
from strongroom.engines.postgres.pitr.files.backup import files_backup_postgres, summary
from strongroom.engines.postgres.pitr.files.chain import file_records
from strongroom.engines.postgres.pitr.files.restore import (
    check_path,
    plan_files,
    restore_files_backup,
)
from strongroom.errors import IntegrityError, InvalidInput, NotFound
from strongroom.policy.prune import prune
from strongroom.policy.retention import RetentionPolicy
from strongroom.sandbox._process import make_temp_dir, remove_dir
from strongroom.signing import sig_key
from strongroom.verify import verify_backup
from tests.test_pitr import Cluster, _cluster, _restore

TABLES = ("keep", "grow", "hot", "born", "gone", "shrink")


@pytest.fixture(scope="module")
def age_identity() -> x25519.Identity:
    return x25519.Identity.generate()


@pytest.fixture
def pg_tmp() -> Iterator[Path]:
    from strongroom.sandbox.postgres import chown_to_postgres

    path = make_temp_dir("pgfiles-test")
    chown_to_postgres(path, 0o755)
    yield path
    remove_dir(path)


def _new_cluster(name: str, key: x25519.Identity) -> tuple[Cluster, Path]:
    root = make_temp_dir(name)
    c = _cluster(root, name, key)
    c.sql(
        "CREATE EXTENSION IF NOT EXISTS amcheck;"
        "CREATE TABLE keep (id int PRIMARY KEY, v text);"
        "INSERT INTO keep SELECT g, md5(g::text) FROM generate_series(1, 20000) g;"
        "CREATE TABLE grow (id int PRIMARY KEY, v text);"
        "INSERT INTO grow SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, 20000) g;"
        "CREATE TABLE gone (id int); INSERT INTO gone SELECT generate_series(1, 100);"
        "CREATE UNLOGGED TABLE scratch (id int);"
        "INSERT INTO scratch SELECT generate_series(1, 500);"
        "CHECKPOINT"
    )
    time.sleep(1.1)  # a cluster older than a second, as clusters are
    return c, root


@pytest.fixture(scope="module")
def cluster(age_identity: x25519.Identity) -> Iterator[Cluster]:
    c, root = _new_cluster("pgf", age_identity)
    try:
        yield c
    finally:
        c.server.stop()
        remove_dir(root)


@pytest.fixture
def small(age_identity: x25519.Identity) -> Iterator[Cluster]:
    c, root = _new_cluster("pgr", age_identity)
    try:
        yield c
    finally:
        c.server.stop()
        remove_dir(root)


def take(c: Cluster, backup_type: str, **kw: Any) -> Any:
    return files_backup_postgres(
        c.conn,
        c.repo,
        c.repo_config,
        c.enc,
        data_directory=str(c.server.data_dir),
        backup_type=backup_type,
        wal_timeout_s=120,
        **kw,
    )


def fingerprint_sql(tables: tuple[str, ...]) -> str:
    """One line: per existing table, rows and md5 of its ordered rows."""
    parts = [
        f"(SELECT '{t}=' || count(*) || ':' || md5(coalesce(string_agg(x::text, ','"
        f" ORDER BY x::text), '')) FROM {t} x)"
        for t in tables
    ]
    return "SELECT concat_ws(';', " + ", ".join(parts) + ")"


def existing(c: Cluster, tables: tuple[str, ...] = TABLES) -> tuple[str, ...]:
    have = set(
        c.sql("SELECT string_agg(relname, ',') FROM pg_class WHERE relkind = 'r'").split(",")
    )
    return tuple(t for t in tables if t in have)


def restore_and_check(
    c: Cluster, tmp: Path, backup_id: str, tables: tuple[str, ...], expect: str, **kw: Any
) -> dict[str, Any]:
    kw.setdefault("recovery_target", "immediate")
    report = _restore(
        c,
        tmp,
        backup_id=backup_id,
        verify_query=fingerprint_sql(tables),
        verify_expect=expect,
        **kw,
    )
    assert report["recovery"]["verify"]["ok"]
    assert report["plan"]["backup"]["backup_id"] == backup_id
    return report


def test_full_incr_diff_chain_restores_each(cluster: Cluster, pg_tmp: Path) -> None:
    c = cluster
    t0 = time.monotonic()
    full = take(c, "full")
    full_s = time.monotonic() - t0
    tables0 = existing(c)
    fp_full = c.sql(fingerprint_sql(tables0))
    gone_path = c.sql("SELECT pg_relation_filepath('gone')")
    scratch_path = c.sql("SELECT pg_relation_filepath('scratch')")

    # between full and incr: rows written, a table created, one dropped
    c.sql(
        "INSERT INTO grow SELECT g, 'incr' FROM generate_series(20001, 21000) g;"
        "CREATE TABLE born (id int); INSERT INTO born SELECT generate_series(1, 50);"
        "DROP TABLE gone; CHECKPOINT"
    )
    time.sleep(1.1)  # the incremental's own copy start lies in a later second
    tables1 = existing(c)
    fp_incr = c.sql(fingerprint_sql(tables1))
    born_path = c.sql("SELECT pg_relation_filepath('born')")
    t0 = time.monotonic()
    incr = take(c, "incr")
    incr_s = time.monotonic() - t0

    c.sql("UPDATE keep SET v = 'diff' WHERE id <= 100; CHECKPOINT")
    fp_diff = c.sql(fingerprint_sql(tables1))
    diff = take(c, "diff")

    # manifests: types, bases, dependencies, what was copied
    assert full.kind == "files" and full.details["backup_type"] == "full"
    assert "depends_on" not in full.details
    assert incr.details["base_backup_id"] == full.backup_id
    assert incr.details["depends_on"] == [full.backup_id]
    assert diff.details["base_backup_id"] == full.backup_id  # the last full, not the incr
    assert diff.details["depends_on"] == [full.backup_id]
    f_rec, i_rec, d_rec = (file_records(m) for m in (full, incr, diff))
    assert gone_path in f_rec and gone_path not in i_rec  # dropped: absent
    assert born_path in i_rec and owner_of(i_rec[born_path]) == incr.backup_id  # created
    assert owner_of(d_rec[born_path]) == diff.backup_id  # a diff copies what the incr had
    listed = set(f_rec) | {e[0] for e in full.details["empty_files"]}
    assert scratch_path not in listed and f"{scratch_path}_init" in listed  # unlogged
    assert not any(p.startswith("pg_wal/") for p in f_rec)
    s_full, s_incr = summary(full), summary(incr)
    assert s_incr["files_referenced"] > 0.8 * s_full["files_copied"]
    assert s_incr["stored_bytes"] < s_full["stored_bytes"] / 3
    print(f"\nfull: {full_s:.2f}s {s_full}\nincr: {incr_s:.2f}s {s_incr}\ndiff: {summary(diff)}")

    for m in (full, incr, diff):
        loaded = Catalog(c.repo).load("postgresql", c.target, m.backup_id)
        report = verify_backup(c.repo, loaded, c.enc)
        assert report["ok"], [a for a in report["artifacts"] if not a["ok"]]
        assert len(report["artifacts"]) == len(m.artifacts) + 1  # the chain check first
        assert report["artifacts"][0]["artifact"] == "chain"

    # a later point, for PITR from the incremental
    c.sql("CREATE TABLE later (x int); INSERT INTO later VALUES (1), (2)")
    lsn = c.sql("SELECT pg_current_wal_insert_lsn()")
    c.sql("INSERT INTO later VALUES (3)")
    c.switch_and_wait()

    restore_and_check(c, pg_tmp / "full", full.backup_id, tables0, fp_full)
    restore_and_check(c, pg_tmp / "incr", incr.backup_id, tables1, fp_incr)
    restore_and_check(c, pg_tmp / "diff", diff.backup_id, tables1, fp_diff)
    report = _restore(
        c,
        pg_tmp / "pitr",
        backup_id=incr.backup_id,
        recovery_target="lsn",
        target_lsn=lsn,
        verify_query="SELECT string_agg(x::text, ',' ORDER BY x) FROM later",
        verify_expect="1,2",
    )
    assert report["recovery"]["verify"]["ok"]
    # restored files keep the recorded modes and mtimes; the unlogged table is empty
    restored = pg_tmp / "incr" / "data"
    rec = i_rec[born_path]
    assert (restored / born_path).stat().st_mtime_ns == rec.meta["mtime_ns"]
    assert not (restored / gone_path).exists()


class _Hooks:
    """Runs SQL while a given file is half copied (after its first chunk)."""

    def __init__(self, c: Cluster, actions: dict[str, str]) -> None:
        self.c, self.actions, self.by_fd, self.done = c, actions, {}, []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        original_open = copier._open
        original_read, original_blocks = copier.Bounded.read, blocks.ChangedBlocks.read
        hooks = self

        def open_(root: str, path: str) -> int | None:
            fd = original_open(root, path)
            if fd is not None and path in hooks.actions:
                hooks.by_fd[fd] = path
            return fd

        def after(fd: int) -> None:
            path = hooks.by_fd.pop(fd, None)
            if path is not None:
                hooks.c.sql(hooks.actions[path])
                hooks.done.append(path)

        def read(self: copier.Bounded, n: int = -1) -> bytes:
            data = original_read(self, n)
            after(getattr(self, "_fd", -1))
            return data

        def read_blocks(self: blocks.ChangedBlocks, n: int = -1) -> bytes:
            data = original_blocks(self, n)
            after(getattr(self, "_fd", -1))
            return data

        monkeypatch.setattr(copier, "_open", open_)
        monkeypatch.setattr(copier.Bounded, "read", read)
        monkeypatch.setattr(blocks.ChangedBlocks, "read", read_blocks)


def _writer(dsn: dict[str, Any], stop: threading.Event, counter: list[int]) -> None:
    with psycopg.connect(**dsn, autocommit=True) as conn:
        i = 0
        while not stop.is_set():
            i += 1
            conn.execute(
                "INSERT INTO hot SELECT g, md5(g::text) FROM generate_series(%s::int, %s::int) g",
                (i * 1000, i * 1000 + 999),
            )
            conn.execute("UPDATE hot SET v = md5(id::text) WHERE id %% 7 = %s::int", (i % 7,))
            conn.execute(
                "DELETE FROM hot WHERE id %% 13 = %s::int AND id < %s::int", (i % 13, i * 500)
            )
            counter[0] = i


def test_races_during_the_copy(
    cluster: Cluster, pg_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = cluster
    c.sql(
        "DROP TABLE IF EXISTS hot, shrink;"
        "CREATE TABLE hot (id int PRIMARY KEY, v text);"
        "CREATE TABLE shrink (id int, v text);"
        "INSERT INTO shrink SELECT g, repeat('s', 200) FROM generate_series(1, 30000) g;"
        "CHECKPOINT"
    )
    base = take(c, "full")
    grow_path = c.sql("SELECT pg_relation_filepath('grow')")
    shrink_path = c.sql("SELECT pg_relation_filepath('shrink')")
    c.sql("INSERT INTO grow VALUES (-1, 'touch'); INSERT INTO shrink VALUES (0, 'x'); CHECKPOINT")
    time.sleep(1.1)
    hooks = _Hooks(
        c,
        {
            # extended while half copied: many new pages past the size read at open
            grow_path: "INSERT INTO grow SELECT g, repeat('g', 300)"
            " FROM generate_series(-60000, -2) g; CHECKPOINT",
            # truncated in place while half copied (vacuum cuts the emptied pages off)
            shrink_path: "DELETE FROM shrink WHERE id > 10; VACUUM shrink; CHECKPOINT",
        },
    )
    hooks.install(monkeypatch)
    stop, counter = threading.Event(), [0]
    dsn = {
        "host": c.conn.host,
        "port": c.conn.port,
        "user": "postgres",
        "password": c.server.password,
        "dbname": "postgres",
    }
    thread = threading.Thread(target=_writer, args=(dsn, stop, counter), daemon=True)
    thread.start()
    try:
        time.sleep(0.5)
        racing = take(c, "incr")
    finally:
        stop.set()
        thread.join(30)
    monkeypatch.undo()
    assert sorted(hooks.done) == sorted([grow_path, shrink_path]) and counter[0] > 2
    assert racing.details["base_backup_id"] == base.backup_id
    rec = file_records(racing)
    assert owner_of(rec[grow_path]) == racing.backup_id
    tables = existing(c, ("keep", "grow", "hot", "shrink"))
    fp_now = c.sql(fingerprint_sql(tables))
    c.switch_and_wait()
    # consistent at the backup's stop point: indexes agree with the heap
    check = (
        "SELECT (SELECT count(*) FROM hot WHERE v <> md5(id::text))::text || ',' ||"
        " (SELECT bt_index_check('hot_pkey', true))::text || ',' ||"
        " (SELECT bt_index_check('grow_pkey', true))::text"
    )
    report = _restore(
        c,
        pg_tmp / "immediate",
        backup_id=racing.backup_id,
        recovery_target="immediate",
        verify_query=check,
        verify_expect="0,,",
    )
    assert report["recovery"]["verify"]["ok"]
    # and replaying to the end of the archive gives exactly the source's state
    restore_and_check(
        c, pg_tmp / "latest", racing.backup_id, tables, fp_now, recovery_target="latest"
    )


def test_retention_killed_prune_and_broken_chains(small: Cluster, pg_tmp: Path) -> None:
    c = small
    full = take(c, "full")
    c.sql("INSERT INTO keep VALUES (-1, 'd'); CHECKPOINT")
    time.sleep(1.1)
    diff = take(c, "diff")
    c.sql("INSERT INTO keep VALUES (-2, 'i'); CHECKPOINT")
    time.sleep(1.1)
    incr = take(c, "incr")
    assert incr.details["base_backup_id"] == diff.backup_id
    assert set(incr.details["depends_on"]) <= {full.backup_id, diff.backup_id}
    assert full.backup_id in {owner_of(a) for a in incr.artifacts}
    policy = RetentionPolicy(keep_last=1, compliance_floor_years=0)
    report = prune(c.repo, policy, engine="postgresql", orphan_grace=dt.timedelta(0)).to_dict()
    actions = {b["backup_id"]: b["action"] for b in report["backups"]}
    assert actions == {full.backup_id: "keep", diff.backup_id: "keep", incr.backup_id: "keep"}

    # a killed prune: the base's manifest gone, its data left behind. The incremental
    # stays listed and its data stays (the orphan pass keeps what it references) ...
    c.repo.delete(manifest_key("postgresql", c.target, full.backup_id))
    c.repo.delete(sig_key(manifest_key("postgresql", c.target, full.backup_id)))
    report = prune(c.repo, policy, engine="postgresql", orphan_grace=dt.timedelta(0)).to_dict()
    orphan = next(o for o in report["orphans"] if o["backup_id"] == full.backup_id)
    assert orphan["action"] == "referenced"
    assert list(c.repo.list(f"data/postgresql/{c.target}/{full.backup_id}/"))
    loaded = Catalog(c.repo).load("postgresql", c.target, incr.backup_id)
    verdict = verify_backup(c.repo, loaded, c.enc)
    assert not verdict["ok"] and "broken" in verdict["artifacts"][0]["error"]
    # ... but a restore refuses the chain, before anything is written
    target = pg_tmp / "refused" / "data"
    with pytest.raises(NotFound, match=f"broken.*{full.backup_id}"):
        restore_files_backup(c.repo, c.enc, c.target, incr.backup_id, str(target))
    assert not target.exists()
    with pytest.raises(NotFound, match="broken"):
        _restore(c, pg_tmp / "refused2", backup_id=incr.backup_id, recovery_target="immediate")
    assert not (pg_tmp / "refused2" / "data").exists()
    # the next incremental does not build on a broken chain: it is a full one
    again = take(c, "incr")
    assert again.details["backup_type"] == "full" and "not whole" in again.details["full_reason"]

    # a missing artifact: refused up front, verify fails
    victim = next(a for a in again.artifacts if a.raw_size > 8192)
    c.repo.delete(victim.key)
    with pytest.raises(NotFound, match="missing"):
        restore_files_backup(c.repo, c.enc, c.target, again.backup_id, str(target))
    assert not target.exists()
    loaded = Catalog(c.repo).load("postgresql", c.target, again.backup_id)
    assert not verify_backup(c.repo, loaded, c.enc)["ok"]


def test_whole_restore_and_hostile_paths(small: Cluster, pg_tmp: Path) -> None:
    c = small
    full = take(c, "full")
    out = pg_tmp / "copy" / "data"
    report = restore_files_backup(c.repo, c.enc, c.target, full.backup_id, str(out))
    assert report["files"] == full.details["files"]
    assert (out / "backup_label").read_text() == full.details["backup_label"]
    assert not (out / "tablespace_map").exists()  # no tablespaces: none written
    assert (out / "pg_wal" / "archive_status").is_dir() and not list((out / "pg_wal").glob("0*"))
    rec = next(a for a in full.artifacts if a.meta.get("path") == "PG_VERSION")
    assert (out / "PG_VERSION").stat().st_mtime_ns == rec.meta["mtime_ns"]
    assert (out / "PG_VERSION").stat().st_mode & 0o777 == 0o600
    busy = pg_tmp / "copy" / "data"
    with pytest.raises(Exception, match="not empty"):
        restore_files_backup(c.repo, c.enc, c.target, full.backup_id, str(busy))

    for bad in (
        "../etc/passwd",
        "/etc/passwd",
        "base//1",
        "a/./b",
        "pg_wal/000000010000000000000001",
        "recovery.signal",
        "backup_label",
        "x\x00y",
    ):
        with pytest.raises(IntegrityError):
            check_path(bad)
    forged = full.model_copy(deep=True)
    forged.artifacts[0].meta["path"] = "../../outside"
    with pytest.raises(IntegrityError, match="outside"):
        plan_files(forged)
    forged = full.model_copy(deep=True)
    forged.details["directories"].append(["/abs", 0o700])
    with pytest.raises(IntegrityError, match="absolute"):
        plan_files(forged)
    forged = full.model_copy(deep=True)
    forged.artifacts.append(forged.artifacts[0].model_copy())
    with pytest.raises(IntegrityError, match="twice"):
        plan_files(forged)


def test_bad_input_is_refused_before_anything(small: Cluster, pg_tmp: Path) -> None:
    c = small
    with pytest.raises(InvalidInput, match="pg_control"):
        take_at(c, str(pg_tmp))
    with pytest.raises(InvalidInput, match="backup type"):
        take(c, "weekly")
    other = pg_tmp / "other"
    (other / "global").mkdir(parents=True)
    (other / "global" / "pg_control").write_bytes(b"\x01" * 16)
    with pytest.raises(InvalidInput, match="not its data directory"):
        take_at(c, str(other))
    assert not list(c.repo.list("catalog/"))
    # checksum mode: files are compared by content too
    full = take(c, "full")
    again = take(c, "incr", checksum=True)
    assert again.details["checksum"] and summary(again)["files_referenced"] > 0
    assert verify_backup(c.repo, again, c.enc)["ok"]
    assert full.backup_id in again.details["depends_on"]


def take_at(c: Cluster, data_directory: str) -> Any:
    return files_backup_postgres(
        c.conn, c.repo, c.repo_config, c.enc, data_directory=data_directory, wal_timeout_s=60
    )


def test_flow_and_cli(prefect_api: str, small: Cluster) -> None:
    import json

    import typer
    from typer.testing import CliRunner

    from blocks import BackupRepository, EncryptionKey, PostgresTarget, register_all
    from flows.pitr import files_backup_postgresql
    from strongroom.cli.pitr import register
    from tests.fixtures.strongroom_fixtures import signing_block_fields

    c = small
    register_all()
    identity = c.enc.identities[0].get_secret_value()
    EncryptionKey(recipients=c.enc.recipients, identity=identity).save("pgfkey", overwrite=True)
    BackupRepository(**signing_block_fields(), local_path=str(c.repo.root)).save(
        "pgfrepo", overwrite=True
    )
    fields = {
        "host": c.server.host,
        "port": c.server.port,
        "user": c.server.superuser,
        "password": c.server.password,
    }
    PostgresTarget(**fields).save("nodir", overwrite=True)
    PostgresTarget(**fields, data_directory=str(c.server.data_dir)).save(c.target, overwrite=True)
    blocks = {"repository": "pgfrepo", "encryption_key": "pgfkey"}
    with pytest.raises(InvalidInput, match="data_directory"):
        files_backup_postgresql(target="nodir", backup_type="full", **blocks)
    full = files_backup_postgresql(target=c.target, backup_type="incr", **blocks)
    assert full["kind"] == "files" and full["details"]["backup_type"] == "full"  # no prior

    app, backup_app, restore_app = typer.Typer(), typer.Typer(), typer.Typer()
    app.add_typer(backup_app, name="backup")
    app.add_typer(restore_app, name="restore")
    register(app, backup_app, restore_app)
    cmd = ["backup", "postgresql-files", c.target, "-r", "pgfrepo", "-k", "pgfkey"]
    result = CliRunner().invoke(app, [*cmd, "--type", "incr", "--json"])
    assert result.exit_code == 0, result.output
    incr = json.loads(result.stdout)
    assert incr["details"]["backup_type"] == "incr"
    assert incr["details"]["base_backup_id"] == full["backup_id"]
    result = CliRunner().invoke(app, [*cmd, "--type", "weekly", "--json"])
    assert result.exit_code == 2
