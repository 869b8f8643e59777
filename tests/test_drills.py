"""Restore drills on the real servers: pass, data differs (tampered scratch copy), RTO/RPO
objectives missed; scratch targets always cleaned up. Plus the flows and CLI of issue 7."""

from __future__ import annotations

import datetime as dt
import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redispy
from pydantic import SecretStr

from strongroom.catalog import Catalog
from strongroom.config import EncryptionConfig, PostgresConnection, RepositoryConfig
from strongroom.drills import (
    DrillFailed,
    EngineNotAvailable,
    Objectives,
    adapter_for,
    list_drills,
    load_drill,
    run_drill,
)
from strongroom.drills.postgres import PostgresDrill
from strongroom.engines.postgres.backup import backup_postgres
from strongroom.engines.postgres.connect import connect
from strongroom.ids import new_backup_id
from strongroom.policy.pins import pin_key
from strongroom.repository.local import LocalRepository
from strongroom.sandbox.postgres import PostgresServer
from strongroom.sandbox.redis import RedisServer
from strongroom.signing import SIG_SUFFIX, get_verified_json
from tests.fixtures.postgres import PgDatabase
from tests.fixtures.strongroom_fixtures import (
    make_local_repo,
    pg_connection,
    signed_config,
    signing_block_fields,
)

Repo = tuple[LocalRepository, RepositoryConfig]


def _leftover_databases(server: PostgresServer) -> list[str]:
    out = server.psql(
        "SELECT datname FROM pg_database WHERE datname LIKE 'sr\\_drill\\_%' "
        "OR datname LIKE 'sr\\_restore\\_%'"
    )
    return [line for line in out.splitlines() if line]


@pytest.fixture
def pg_backup(
    pg_db: PgDatabase, local_repo: Repo, age_key: EncryptionConfig
) -> tuple[PostgresConnection, LocalRepository, Any]:
    pg_db.psql(
        "CREATE TABLE items (id int PRIMARY KEY, name text, price numeric(10,2), at timestamptz);"
        "INSERT INTO items SELECT g, 'item ' || g, g / 7.0,"
        " '2024-01-01'::timestamptz + g * '1h'::interval FROM generate_series(1, 3000) g;"
        "CREATE SCHEMA sales;"
        "CREATE TABLE sales.orders (id bigserial PRIMARY KEY, item int, qty int);"
        "INSERT INTO sales.orders (item, qty)"
        " SELECT g % 300 + 1, g % 9 FROM generate_series(1, 5000) g;"
        "CREATE TABLE empty_one (x int);"
    )
    repo, config = local_repo
    conn = pg_connection(pg_db, name="drilldb")
    manifest = backup_postgres(conn, repo, config, age_key, include_globals=True)
    return conn, repo, manifest


def test_postgres_drill_passes_records_and_cleans_up(
    pg_backup: tuple[PostgresConnection, LocalRepository, Any],
    pg_db: PgDatabase,
    age_key: EncryptionConfig,
) -> None:
    conn, repo, manifest = pg_backup
    adapter = PostgresDrill(conn, repo, age_key, live="strict")
    record = run_drill(
        adapter, repo, target="drilldb", objectives=Objectives(rto_minutes=10, rpo_hours=1)
    )
    assert record["ok"] and not record["failures"]
    assert record["backup_id"] == manifest.backup_id
    assert 0 < record["rto_s"] < 600 and 0 <= record["rpo_s"] < 3600
    assert record["rto_ok"] is True and record["rpo_ok"] is True
    items = {c["item"]: c for c in record["checks"]}
    assert set(items) == {
        f"{pg_db.name}:public.items",
        f"{pg_db.name}:public.empty_one",
        f"{pg_db.name}:sales.orders",
    }
    orders = items[f"{pg_db.name}:sales.orders"]
    assert orders["restored_rows"] == orders["expected_rows"] == 5000
    assert orders["live_match"] is True and orders["fingerprint"] == orders["live_fingerprint"]
    assert record["scratch"]["mode"] == "source server"
    assert record["cleanup"]["ok"] and _leftover_databases(pg_db.server) == []
    # the record is in the repository and listed
    stored = load_drill(repo, "postgresql", "drilldb", record["drill_id"])
    assert stored["ok"] and stored["rto_s"] == record["rto_s"]
    (row,) = list_drills(repo, "postgresql", "drilldb")
    assert row["drill_id"] == record["drill_id"] and row["rto_objective_s"] == 600
    assert row["rpo_objective_s"] == 3600 and row["ok"]


def _tamper_delete(handle: dict[str, Any]) -> None:
    (scratch,) = handle["databases"].values()
    with connect(handle["connection"], scratch) as c:
        c.execute("DELETE FROM items WHERE id = 17")


def _tamper_update(handle: dict[str, Any]) -> None:
    (scratch,) = handle["databases"].values()
    with connect(handle["connection"], scratch) as c:
        c.execute("UPDATE sales.orders SET qty = qty + 1 WHERE id = 99")


@pytest.mark.parametrize(
    ("tamper", "live", "expected"),
    [
        (_tamper_delete, "off", "public.items: 2999 rows restored, manifest says 3000"),
        (_tamper_update, "strict", "sales.orders: restored copy differs from the live source"),
    ],
    ids=["row-deleted", "value-changed"],
)
def test_postgres_drill_fails_when_restored_data_differs(
    pg_backup: tuple[PostgresConnection, LocalRepository, Any],
    pg_db: PgDatabase,
    age_key: EncryptionConfig,
    tamper: Any,
    live: str,
    expected: str,
) -> None:
    conn, repo, _ = pg_backup
    adapter = PostgresDrill(conn, repo, age_key, live=live)  # type: ignore[arg-type]
    with pytest.raises(DrillFailed) as failed:
        run_drill(adapter, repo, target="drilldb", hook=tamper)
    record = failed.value.record
    assert failed.value.exit_code == 4 and record["data_mismatch"]
    assert not record["ok"] and expected in record["failures"][0]
    assert record["cleanup"]["ok"] and _leftover_databases(pg_db.server) == []
    assert list_drills(repo)[0]["ok"] is False  # failed drills are evidence too


@pytest.mark.parametrize(
    ("objectives", "needle"),
    [
        (Objectives(rto_minutes=1e-6, rpo_hours=24), "RTO"),
        (Objectives(rto_minutes=60, rpo_hours=1e-9), "RPO"),
    ],
    ids=["rto-too-low", "rpo-too-low"],
)
def test_postgres_drill_fails_on_objectives(
    pg_backup: tuple[PostgresConnection, LocalRepository, Any],
    pg_db: PgDatabase,
    age_key: EncryptionConfig,
    objectives: Objectives,
    needle: str,
) -> None:
    conn, repo, _ = pg_backup
    with pytest.raises(DrillFailed, match=f"{needle} .* exceeds the objective") as failed:
        run_drill(PostgresDrill(conn, repo, age_key), repo, target="drilldb", objectives=objectives)
    record = failed.value.record
    assert failed.value.exit_code == 1 and not record["data_mismatch"]
    assert all(c["ok"] for c in record["checks"]) and record["restored"]
    assert record[f"{needle.lower()}_ok"] is False
    assert record["cleanup"]["ok"] and _leftover_databases(pg_db.server) == []


def test_postgres_drill_in_a_sandbox_server_with_globals(
    pg_backup: tuple[PostgresConnection, LocalRepository, Any],
    pg_db: PgDatabase,
    age_key: EncryptionConfig,
) -> None:
    conn, repo, _ = pg_backup
    adapter = PostgresDrill(conn, repo, age_key, sandbox=True)
    record = run_drill(adapter, repo, target="drilldb")
    assert record["ok"], record["failures"]
    assert record["scratch"]["mode"] == "sandbox"
    assert record["scratch"]["server"] != f"{conn.host}:{conn.port}"
    assert record["restore"]["globals"]["applied"] and record["restore"]["no_owner"] is False
    assert record["cleanup"] == {
        "ok": True,
        "sandbox_stopped": True,
        "dropped": list(record["scratch"]["databases"].values()),
    }
    assert adapter._server is None


def test_drill_without_backups_is_recorded_and_fails(
    local_repo: Repo, pg_db: PgDatabase, age_key: EncryptionConfig
) -> None:
    repo, _ = local_repo
    conn = pg_connection(pg_db, name="nothing")
    with pytest.raises(DrillFailed, match="resolve failed: no backups"):
        run_drill(PostgresDrill(conn, repo, age_key), repo, target="nothing")
    (row,) = list_drills(repo)
    assert row["backup_id"] is None and not row["ok"]


def test_unknown_engine_is_refused(local_repo: Repo, age_key: EncryptionConfig) -> None:
    with pytest.raises(EngineNotAvailable, match="no restore drill for engine 'mongodb'"):
        adapter_for("mongodb", None, local_repo[0], age_key)


# --------------------------------------------------------------------- Redis


@pytest.fixture(scope="module")
def redis_source() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_redis_drill_passes_and_fails_when_tampered(
    redis_source: RedisServer, local_repo: Repo, age_key: EncryptionConfig
) -> None:
    from strongroom.engines.redis.backup import backup_redis
    from strongroom.engines.redis.conn import RedisConnection

    for db, n in ((0, 300), (2, 40)):
        c = redispy.Redis(
            host=redis_source.host, port=redis_source.port, db=db, password=redis_source.password
        )
        c.flushdb()
        c.mset({f"k{i}": f"v{i}" * 5 for i in range(n)})
        c.hset("h", mapping={"a": "1", "b": "2"})
        c.close()
    repo, config = local_repo
    conn = RedisConnection(
        name="cache",
        host=redis_source.host,
        port=redis_source.port,
        password=SecretStr(redis_source.password),
    )
    manifest = backup_redis(conn, repo, config, age_key)
    record = run_drill(
        adapter_for("redis", conn, repo, age_key, live="strict"),
        repo,
        target="cache",
        objectives=Objectives(rto_minutes=5, rpo_hours=1),
    )
    assert record["ok"], record["failures"]
    assert record["backup_id"] == manifest.backup_id
    assert {c["item"]: c["restored_keys"] for c in record["checks"]} == {"db0": 301, "db2": 41}
    assert all(c["live_match"] for c in record["checks"])
    assert record["cleanup"] == {"ok": True, "sandbox_stopped": True}

    scratch_ports: list[int] = []

    def tamper(handle: dict[str, Any]) -> None:
        scratch_ports.append(handle["connection"].port)
        client = handle["connection"].client(2)
        client.delete("k1", "k2")
        client.close()

    with pytest.raises(DrillFailed, match="db2: 39 keys restored, the backup holds 41"):
        run_drill(adapter_for("redis", conn, repo, age_key), repo, target="cache", hook=tamper)
    with pytest.raises(redispy.ConnectionError):  # the scratch server is gone
        redispy.Redis(host="127.0.0.1", port=scratch_ports[0], socket_timeout=2).ping()


# ---------------------------------------------------------------- ClickHouse


def test_clickhouse_drill_passes_and_fails_when_tampered(
    clickhouse_server: Any, local_repo: Repo, age_key: EncryptionConfig
) -> None:
    from strongroom.engines.clickhouse.backup import backup_clickhouse
    from strongroom.engines.clickhouse.conn import ClickHouseConnection
    from strongroom.engines.clickhouse.http_client import ClickHouseHTTP

    db = f"drill_{uuid.uuid4().hex[:8]}"
    ch = clickhouse_server
    ch.query(f"CREATE DATABASE {db}")
    ch.query(
        f"CREATE TABLE {db}.events (d Date, id UInt64, s String) "
        "ENGINE = MergeTree PARTITION BY toYYYYMM(d) ORDER BY id"
    )
    ch.query(
        f"INSERT INTO {db}.events SELECT toDate('2024-01-01') + number % 60, number, "
        "toString(number) FROM system.numbers LIMIT 5000"
    )
    ch.query(f"CREATE TABLE {db}.small (x UInt8) ENGINE = Log")
    ch.query(f"INSERT INTO {db}.small VALUES (1), (2), (3)")
    conn = ClickHouseConnection(
        name="olap", host=ch.host, port=ch.tcp_port, http_port=ch.http_port, databases=[db]
    )
    repo, config = local_repo
    try:
        backup_clickhouse(conn, repo, config, age_key)
        record = run_drill(
            adapter_for("clickhouse", conn, repo, age_key, live="strict"), repo, target="olap"
        )
        assert record["ok"], record["failures"]
        checks = {c["item"]: c for c in record["checks"]}
        assert checks[f"{db}.events"]["restored_rows"] == 5000
        assert checks[f"{db}.events"]["live_match"] is True
        assert record["cleanup"]["ok"]

        def tamper(handle: dict[str, Any]) -> None:
            (scratch,) = handle["databases"].values()
            ClickHouseHTTP(handle["connection"]).execute(
                f"INSERT INTO `{scratch}`.events VALUES ('2024-01-05', 999999, 'forged')"
            )

        with pytest.raises(DrillFailed, match=f"{db}.events: 5001 rows"):
            run_drill(
                adapter_for("clickhouse", conn, repo, age_key), repo, target="olap", hook=tamper
            )
        left = ch.query("SELECT name FROM system.databases WHERE name LIKE 'sr_drill_%'")
        assert left == ""
    finally:
        ch.query(f"DROP DATABASE IF EXISTS {db}")


# ------------------------------------------------------------ flows and CLI


@pytest.fixture
def policy_blocks(
    prefect_api: str, pg_db: PgDatabase, tmp_path: Path, age_key: EncryptionConfig
) -> tuple[PostgresConnection, LocalRepository]:
    from blocks import BackupRepository, EncryptionKey, PostgresTarget
    from blocks.policy import RetentionPolicyBlock

    for block in (PostgresTarget, BackupRepository, EncryptionKey, RetentionPolicyBlock):
        block.register_type_and_schema()
    EncryptionKey(recipients=age_key.recipients, identity=age_key.identities[0]).save(
        "drillkey", overwrite=True
    )
    BackupRepository(**signing_block_fields(), local_path=str(tmp_path / "repo")).save(
        "drillrepo", overwrite=True
    )
    server = pg_db.server
    PostgresTarget(
        host=server.host,
        port=server.port,
        user=server.superuser,
        password=SecretStr(server.password),
        databases=[pg_db.name],
        rto_minutes=30,
        rpo_hours=2,
    ).save("flowdrill", overwrite=True)
    RetentionPolicyBlock(
        keep_last=1,
        compliance_floor_years=0,
        recovery_window_days=0,
        daily=0,
        weekly=0,
        monthly=0,
        yearly=0,
        min_redundancy=1,
    ).save("drillpolicy", overwrite=True)
    pg_db.psql("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 100);")
    repo = make_local_repo(tmp_path / "repo")
    conn = pg_connection(pg_db, name="flowdrill")
    return conn, repo


def test_flows_and_cli(
    policy_blocks: tuple[PostgresConnection, LocalRepository],
    age_key: EncryptionConfig,
    pg_db: PgDatabase,
) -> None:
    import typer
    from typer.testing import CliRunner

    from flows.deep_verify import deep_verify_flow
    from flows.drill import restore_drill
    from flows.retention import apply_retention
    from strongroom.cli.policy import register

    conn, repo = policy_blocks
    config = signed_config(kind="local", path=str(repo.root))
    earlier = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)  # ids have 1 s resolution
    first = backup_postgres(conn, repo, config, age_key, backup_id=new_backup_id(earlier))
    second = backup_postgres(conn, repo, config, age_key)

    record = restore_drill(
        target="flowdrill",
        repository="drillrepo",
        encryption_key="drillkey",
        compare_live="strict",
    )
    assert record["ok"] and record["backup_id"] == second.backup_id
    assert record["objectives"] == {"rto_s": 1800, "rpo_s": 7200}  # from the target block
    with pytest.raises(DrillFailed, match="RTO"):
        restore_drill(
            target="flowdrill", repository="drillrepo", encryption_key="drillkey", rto_minutes=1e-6
        )
    assert _leftover_databases(pg_db.server) == []

    from rich.console import Console

    from strongroom.demo_drills import demo_drills

    shown = io.StringIO()
    (demo,) = demo_drills(
        [("postgresql", "flowdrill")],
        repository="drillrepo",
        encryption_key="drillkey",
        console=Console(file=shown, width=200),
    )
    assert demo["ok"] and "measured RTO and RPO" in shown.getvalue()

    report = deep_verify_flow(repository="drillrepo", encryption_key="drillkey", sample_fraction=1)
    assert report["ok"] and report["verified"] == 2
    assert {r["reason"] for r in report["results"]} == {"newest", "never verified"}
    evidence = [  # signed records only (each has its .sig beside it), all trusted
        get_verified_json(repo, i.key)[0]
        for i in repo.list("verifications/postgresql/flowdrill/")
        if not i.key.endswith(SIG_SUFFIX)
    ]
    assert len(evidence) == 2 and all(e["ok"] for e in evidence)
    assert all(e["structure_unchecked"] == [] for e in evidence)  # pg_restore --list, UTF-8

    app = typer.Typer()
    register(app)
    cli = CliRunner()

    def run(*args: str) -> Any:
        result = cli.invoke(app, [*args, "--repository", "drillrepo", "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    drills = run("drills", "--engine", "postgresql", "--target", "flowdrill")
    assert [d["ok"] for d in drills] == [True, False, True]
    assert run("pin", first.backup_id, "--reason", "audit 2024")["backup_id"] == first.backup_id
    assert [p["reason"] for p in run("pins")] == ["audit 2024"]
    plan = run("retention", "apply", "--dry-run", "--policy", "drillpolicy")
    assert {b["backup_id"]: (b["action"], b["rule"]) for b in plan["backups"]} == {
        first.backup_id: ("keep", "pinned"),
        second.backup_id: ("keep", "keep-last 1"),
    }
    run("unpin", first.backup_id)
    forged = pin_key("postgresql", "flowdrill", first.backup_id)
    repo.put_bytes(forged, json.dumps({"reason": "forged"}).encode())  # unsigned: still pins
    kept = apply_retention(policy="drillpolicy", repository="drillrepo", dry_run=True)
    assert [(f["key"], f["reason"]) for f in kept["findings"]] == [(forged, "untrusted-pin")]
    assert kept["summary"]["would_delete"] == 0
    repo.delete(forged)
    applied = apply_retention(policy="drillpolicy", repository="drillrepo")
    assert applied["summary"]["deleted"] == 1
    assert [m.backup_id for m in Catalog(repo).list()] == [second.backup_id]
    missing = cli.invoke(app, ["retention", "apply", "--policy", "nope", "-r", "drillrepo"])
    assert missing.exit_code == 3 and "no retention policy block 'nope'" in missing.output
