"""Parallel ClickHouse restores (``jobs``): several tables and partitions loaded at once on
real 18.16 and 26.x servers, with hostile names; a damaged partition among many leaves the
target as it was; no overwrite without ``drop_existing``; the pool's bound and stop."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from strongroom.config import EncryptionConfig, RepositoryConfig
from strongroom.engines.clickhouse import sql as chsql
from strongroom.engines.clickhouse.backup import backup_clickhouse
from strongroom.engines.clickhouse.capabilities import capabilities
from strongroom.engines.clickhouse.conn import ClickHouseConnection
from strongroom.engines.clickhouse.http_client import ClickHouseHTTP
from strongroom.engines.clickhouse.parallel import Cancelled, Staged, default_jobs, load_all
from strongroom.engines.clickhouse.restore import ChRestoreRequest, restore_clickhouse
from strongroom.errors import IntegrityError, InvalidInput, TargetNotEmpty
from strongroom.repository import Repository
from strongroom.sandbox.clickhouse import HTTPQueries

Repo = tuple[Repository, RepositoryConfig]

EVENTS = "ev 'x' `1`"
BUCKETS = "buck;ets é"
LOG = "odd `n` ü"
SCHEMA = """
CREATE TABLE {db}.{ev} (d Date, id UInt64, s String, n Nullable(Int32))
    ENGINE = MergeTree PARTITION BY toYYYYMM(d) ORDER BY id
;CREATE TABLE {db}.plain (id UInt32, s String) ENGINE = MergeTree ORDER BY id
;CREATE TABLE {db}.{buckets} (k String, id UInt64) ENGINE = MergeTree PARTITION BY k ORDER BY id
;CREATE TABLE {db}.{log} (`a b` UInt8, `c``d` String) ENGINE = Log
;CREATE MATERIALIZED VIEW {db}.mv ENGINE = MergeTree PARTITION BY toYYYYMM(d) ORDER BY id AS
    SELECT d, id FROM {db}.{ev} WHERE id % 5 = 0
"""
FILL = """
INSERT INTO {db}.{ev} SELECT toDate('2024-01-01') + number % 180, number,
    concat('s\\t', toString(number)), if(number % 3 = 0, NULL, toInt32(number))
    FROM system.numbers LIMIT 30000
;INSERT INTO {db}.plain SELECT number, hex(number) FROM system.numbers LIMIT 5000
;INSERT INTO {db}.{buckets} SELECT ['a/b', 'é ü', 'x''y', ''][number % 4 + 1], number
    FROM system.numbers LIMIT 8000
;INSERT INTO {db}.{log} VALUES (1, 'a`b'), (2, 'tab\\there')
"""
ORDERED = {
    EVENTS: "ORDER BY id",
    "plain": "ORDER BY id",
    BUCKETS: "ORDER BY id",
    LOG: "ORDER BY `a b`",
    "mv": "ORDER BY id",
}


class Ch:
    def __init__(self, server: HTTPQueries) -> None:
        self.server = server
        self.client = ClickHouseHTTP(ClickHouseConnection(name="t", http_port=server.http_port))
        self.created: list[str] = []

    def run(self, script: str, db: str) -> None:
        caps = capabilities(self.client)
        names = {
            "db": chsql.quote_ident(db),
            "ev": chsql.quote_ident(EVENTS),
            "buckets": chsql.quote_ident(BUCKETS),
            "log": chsql.quote_ident(LOG),
        }
        for statement in script.format(**names).split("\n;"):
            if statement.strip():
                self.client.execute(statement, settings={**caps.ddl_settings})

    def new_db(self, prefix: str) -> str:
        name = f"{prefix} `{uuid.uuid4().hex[:6]}` é"
        self.created.append(name)
        return name

    def dump(self, db: str) -> dict[str, bytes]:
        return {
            table: self.server.query_bytes(
                f"SELECT * FROM {chsql.qualified(db, table)} {order} FORMAT TSV"
            )
            for table, order in ORDERED.items()
        }

    def databases(self) -> list[str]:
        return self.server.query("SELECT name FROM system.databases FORMAT TSVRaw").splitlines()

    def leftovers(self) -> list[str]:
        text = self.server.query(
            "SELECT concat(database, '.', name) FROM system.tables "
            "WHERE name LIKE '%\\\\_\\\\_sr\\\\_%' FORMAT TSVRaw"
        )
        return text.splitlines() if text else []


@pytest.fixture
def ch(clickhouse_server: HTTPQueries) -> Iterator[Ch]:
    server = Ch(clickhouse_server)
    yield server
    for db in server.created:
        server.server.query(f"DROP DATABASE IF EXISTS {chsql.quote_ident(db)}")


@pytest.fixture
def source(ch: Ch) -> str:
    db = ch.new_db("par src")
    ch.client.execute(f"CREATE DATABASE {chsql.quote_ident(db)}")
    ch.run(SCHEMA, db)
    ch.run(FILL, db)
    return db


def conn(ch: Ch, *databases: str) -> ClickHouseConnection:
    return ClickHouseConnection(
        name="par",
        port=ch.server.tcp_port,
        http_port=ch.server.http_port,
        databases=list(databases),
    )


def restore(ch: Ch, repo: Repo, key: EncryptionConfig, **kw: Any) -> dict[str, Any]:
    return restore_clickhouse(conn(ch), repo[0], key, ChRestoreRequest(**kw))


def test_many_tables_and_partitions_load_in_parallel(
    ch: Ch, source: str, local_repo: Repo, age_key: EncryptionConfig
) -> None:
    manifest = backup_clickhouse(conn(ch, source), local_repo[0], local_repo[1], age_key)
    data = [a for a in manifest.artifacts if a.meta.get("table")]
    assert len(data) >= 12  # six months, four buckets, the rest whole
    expected = ch.dump(source)
    into = ch.new_db("par into")
    report = restore(ch, local_repo, age_key, target_database=into, jobs=3)
    assert report["jobs"] == 3 and report["fingerprints_ok"]
    assert ch.dump(into) == expected
    staged = [c for c in report["checks"] if c["stage"] == "scratch"]
    final = [c for c in report["checks"] if c["stage"] == "final"]
    assert {c["check"] for c in staged} == {"fingerprint"}
    assert {c["check"] for c in final} == {"rows"}
    assert sorted(c["table"] for c in staged) == sorted(c["table"] for c in final)
    assert len(staged) == 5 and all(c["ok"] for c in report["checks"])
    assert ch.leftovers() == []

    # replacing the source itself, every final table fingerprinted again (recheck)
    ch.client.execute(f"TRUNCATE TABLE {chsql.qualified(source, 'plain')}")
    report = restore(ch, local_repo, age_key, drop_existing=True, jobs=4, recheck=True)
    assert report["fingerprints_ok"] and ch.dump(source) == expected
    assert {c["check"] for c in report["checks"]} == {"fingerprint"}
    # one job is the sequential restore: same result
    again = ch.new_db("par seq")
    report = restore(ch, local_repo, age_key, target_database=again, jobs=1)
    assert report["jobs"] == 1 and ch.dump(again) == expected
    assert ch.leftovers() == []


def test_a_damaged_partition_among_many_leaves_the_target_untouched(
    ch: Ch, source: str, local_repo: Repo, age_key: EncryptionConfig
) -> None:
    manifest = backup_clickhouse(conn(ch, source), local_repo[0], local_repo[1], age_key)
    months = [a for a in manifest.artifacts if a.meta.get("table") == EVENTS]
    victim = sorted(months, key=lambda a: a.name)[len(months) // 2]
    path = local_repo[0].root / victim.key  # type: ignore[attr-defined]
    blob = bytearray(path.read_bytes())
    blob[-60] ^= 0x01
    path.write_bytes(bytes(blob))
    ch.client.execute(
        f"INSERT INTO {chsql.qualified(source, 'plain')} VALUES (99999, 'after the backup')"
    )
    before = ch.dump(source)
    with pytest.raises(IntegrityError, match="artifact") as failed:
        restore(ch, local_repo, age_key, drop_existing=True, jobs=3)
    assert not isinstance(failed.value, Cancelled)
    assert ch.dump(source) == before
    into = ch.new_db("par bad")
    with pytest.raises(IntegrityError):
        restore(ch, local_repo, age_key, target_database=into, jobs=4)
    assert into not in ch.databases()  # created by the run, dropped again
    assert ch.leftovers() == []


def test_no_overwrite_without_drop_existing_and_bad_jobs(
    ch: Ch, source: str, local_repo: Repo, age_key: EncryptionConfig
) -> None:
    backup_clickhouse(conn(ch, source), local_repo[0], local_repo[1], age_key)
    before = ch.dump(source)
    with pytest.raises(TargetNotEmpty, match="plain holds 5000 rows"):
        restore(ch, local_repo, age_key, jobs=4)
    plan = restore(ch, local_repo, age_key, jobs=4, dry_run=True)
    assert plan["jobs"] == 4 and "plain holds 5000 rows" in plan["blocked"]
    assert ch.dump(source) == before
    assert restore(ch, local_repo, age_key, dry_run=True)["jobs"] == default_jobs()
    for bad in (0, 65):
        with pytest.raises(ValueError, match="jobs"):
            ChRestoreRequest(jobs=bad)
    with pytest.raises(InvalidInput):
        restore(ch, local_repo, age_key, schema_only=True, data_only=True, jobs=2)
    assert ch.dump(source) == before and ch.leftovers() == []


# --- the pool itself (no server) ---------------------------------------------------------


class _Art:
    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.raw_size = size


def test_the_pool_is_bounded_checks_each_table_once_and_stops_on_failure() -> None:
    lock = threading.Lock()
    running, peak = [0], [0]
    started: list[str] = []
    loaded: list[str] = []
    checked: list[int] = []

    def load(artifact: _Art, stop: threading.Event) -> None:
        with lock:
            started.append(artifact.name)
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1
            loaded.append(artifact.name)
        if artifact.name == "bad":
            raise IntegrityError("artifact bad: checksum mismatch")

    tables = [
        Staged([_Art(f"t{t}p{p}", 10 * p + t) for p in range(4)], lambda t=t: checked.append(t))
        for t in range(3)
    ]
    load_all(tables, 2, load)
    assert peak[0] == 2 and len(loaded) == 12 and sorted(checked) == [0, 1, 2]
    assert started[:2] == ["t2p3", "t1p3"]  # the largest first

    loaded.clear()
    checked.clear()
    bad = [Staged([_Art("bad", 100)] + [_Art(f"x{i}", 1) for i in range(20)], lambda: None)]
    with pytest.raises(IntegrityError, match="bad"):
        load_all(bad, 3, load)
    assert len(loaded) < 21  # the rest never started
