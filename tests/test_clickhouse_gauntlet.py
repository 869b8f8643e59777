"""ClickHouse gauntlet round trips on 18.16 and 26.x: every restore path ends with the same
per-table row counts and content hashes (computed in SQL) as the source.

The dataset (strongroom.sandbox.gauntlet_clickhouse: 3.3M rows, 65 partitions, hostile names,
every engine of the MergeTree family the issue names) is loaded and backed up once per
session (tests/fixtures/clickhouse_gauntlet.py); each test restores a shared backup, compares
fingerprints and drops what it restored.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from strongroom.config import EncryptionConfig
from strongroom.engines.clickhouse.plan import ChRestoreRequest
from strongroom.engines.clickhouse.restore import restore_clickhouse
from strongroom.engines.clickhouse.sql import qualified, quote_string
from strongroom.sandbox.clickhouse import HTTPQueries
from strongroom.sandbox.gauntlet_clickhouse import FACT_ROWS, FACTS, MAIN_DB, SECOND_DB, fingerprint
from strongroom.verify import verify_backup
from tests.fixtures.clickhouse_gauntlet import PARTITION_WHERE, PARTITIONS, ClickHouseGauntlet

RENAMED = "restored `g` é"


@pytest.fixture
def g(clickhouse_gauntlet: ClickHouseGauntlet) -> Iterator[ClickHouseGauntlet]:
    clickhouse_gauntlet.drop(MAIN_DB, SECOND_DB, RENAMED)
    yield clickhouse_gauntlet
    clickhouse_gauntlet.drop(MAIN_DB, SECOND_DB, RENAMED)


def _restore(g: ClickHouseGauntlet, kind: str, key: EncryptionConfig, **kw: Any) -> dict[str, Any]:
    started = time.monotonic()
    request = ChRestoreRequest(backup_id=g.manifests[kind].backup_id, **kw)
    report = restore_clickhouse(g.conn, g.repos[kind][0], key, request)
    report["seconds"] = round(time.monotonic() - started, 2)
    return report


def _tables(g: ClickHouseGauntlet, db: str) -> list[str]:
    rows = g.client.tuples(f"SELECT name FROM system.tables WHERE database = {quote_string(db)}")
    return sorted(str(r[0]) for r in rows)


def test_gauntlet_holds_what_it_promises(
    clickhouse_gauntlet: ClickHouseGauntlet, clickhouse_server: HTTPQueries
) -> None:
    load = clickhouse_gauntlet.load
    assert load["rows"] >= 3_000_000 and load["partitions"] >= 12
    assert load["features"]["version"].startswith(clickhouse_server.version_prefix)
    # 18.16 has LowCardinality (experimental, behind a setting), 26.x by default
    assert load["features"]["skipped"] == []
    tables = clickhouse_gauntlet.source_print["tables"]
    engines = {t["engine"] for t in tables.values()}
    assert {
        "MergeTree",
        "SummingMergeTree",
        "ReplacingMergeTree",
        "AggregatingMergeTree",
    } <= engines
    assert {"MaterializedView", "View", "Log"} <= engines
    assert tables[f"{MAIN_DB}.{FACTS}"]["rows"] == FACT_ROWS
    (db,) = [
        d
        for d in clickhouse_gauntlet.manifests["local"].details["databases"]
        if d["name"] == MAIN_DB
    ]
    by_name = {t["name"]: t for t in db["tables"]}
    assert by_name["replaced `r`"]["rows"] == 90_000  # unmerged duplicates in the backup
    assert len(by_name[FACTS]["partitions"]) == 24
    assert clickhouse_gauntlet.source_print["meta"]["features"] == load["features"]


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_whole_round_trip_is_fingerprint_identical(
    g: ClickHouseGauntlet, age_key: EncryptionConfig, kind: str
) -> None:
    report = _restore(g, kind, age_key)
    assert report["fingerprints_ok"] and not report["leftovers"], report
    assert fingerprint(g.client) == g.source_print
    replaced = qualified(MAIN_DB, "replaced `r`")
    assert int(g.client.execute(f"SELECT count() FROM {replaced}")) == 90_000  # raw duplicates


def test_renamed_database_round_trip(g: ClickHouseGauntlet, age_key: EncryptionConfig) -> None:
    report = _restore(g, "local", age_key, databases=[MAIN_DB], target_database=RENAMED)
    assert report["fingerprints_ok"], report
    restored = fingerprint(g.client, {MAIN_DB: RENAMED})
    expected = {k: v for k, v in g.source_print["tables"].items() if k.startswith(f"{MAIN_DB}.")}
    assert restored["tables"] == expected
    assert _tables(g, MAIN_DB) == [] and _tables(g, SECOND_DB) == []


@pytest.mark.parametrize(
    ("kind", "globs", "selected"),
    [
        ("local", ["facts*"], {FACTS}),
        ("s3", ["*.summed", "aggregated", "replaced*"], {"summed", "aggregated", "replaced `r`"}),
    ],
)
def test_table_glob_restore_brings_only_the_selected_tables(
    g: ClickHouseGauntlet,
    age_key: EncryptionConfig,
    kind: str,
    globs: list[str],
    selected: set[str],
) -> None:
    report = _restore(g, kind, age_key, tables=globs)
    assert report["fingerprints_ok"], report
    names = {f"{MAIN_DB}.{t}" for t in selected}
    assert fingerprint(g.client, tables=names)["tables"] == {
        k: v for k, v in g.source_print["tables"].items() if k in names
    }
    assert _tables(g, MAIN_DB) == sorted(selected) and _tables(g, SECOND_DB) == []


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_partition_restore_brings_only_those_partitions(
    g: ClickHouseGauntlet, age_key: EncryptionConfig, kind: str
) -> None:
    report = _restore(g, kind, age_key, tables=["facts*"], partitions=list(PARTITIONS))
    assert report["fingerprints_ok"], report
    facts = {f"{MAIN_DB}.{FACTS}"}
    assert fingerprint(g.client, tables=facts, where=PARTITION_WHERE) == g.partition_print
    whole = fingerprint(g.client, tables=facts)["tables"][f"{MAIN_DB}.{FACTS}"]
    assert whole == g.partition_print["tables"][f"{MAIN_DB}.{FACTS}"]  # nothing else came
    assert 0 < whole["rows"] < FACT_ROWS
    assert _tables(g, MAIN_DB) == [FACTS]


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_gauntlet_backups_verify(
    clickhouse_gauntlet: ClickHouseGauntlet, age_key: EncryptionConfig, kind: str
) -> None:
    g = clickhouse_gauntlet
    report = verify_backup(g.repos[kind][0], g.manifests[kind], age_key)
    assert report["ok"], report
    natives = [a for a in report["artifacts"] if a["artifact"].endswith(".native")]
    assert sum(a["structure"]["rows"] or 0 for a in natives) >= FACT_ROWS
