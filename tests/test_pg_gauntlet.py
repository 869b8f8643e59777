"""The PostgreSQL gauntlet (~300 MB, partitions, large objects, hostile names) end to end.

One database and one backup per repository kind are shared (session fixtures); each
selective restore goes into a fresh, small database and is compared by content
fingerprint (order-independent row hashes), not by counts.
"""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from strongroom.config import EncryptionConfig
from strongroom.engines.postgres.restore import PgRestoreRequest, restore_postgres
from strongroom.errors import IntegrityError, InvalidInput, NotFound, StrongroomError
from strongroom.policy.verification import SamplingPolicy, deep_verify
from strongroom.sandbox import gauntlet_pg as g
from strongroom.verify import verify_backup
from tests.fixtures.pg_gauntlet import Gauntlet, GauntletBackup, local_repository
from tests.fixtures.strongroom_fixtures import pg_connection

FIGURES: dict[str, float] = {}


def _restore(
    gauntlet: Gauntlet, backup: GauntletBackup, key: EncryptionConfig, **kw: Any
) -> dict[str, Any]:
    started = time.monotonic()
    report = restore_postgres(
        pg_connection(gauntlet.db, "gauntlet"), backup.repo, key, PgRestoreRequest(**kw)
    )
    report["_seconds"] = round(time.monotonic() - started, 2)
    return report


def _fresh(gauntlet: Gauntlet) -> str:
    return f"gx_{uuid.uuid4().hex[:10]}"


def _relations(gauntlet: Gauntlet, database: str) -> set[tuple[str, str]]:
    out = gauntlet.db.server.psql(
        "SELECT n.nspname || E'\\t' || c.relname FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r','p','m','f') "
        "AND n.nspname NOT IN ('pg_catalog', 'information_schema')",
        db=database,
    )
    return {tuple(line.split("\t", 1)) for line in out.splitlines() if line}  # type: ignore[misc]


def _exists(gauntlet: Gauntlet, database: str) -> bool:
    out = gauntlet.db.server.psql(f"SELECT count(*) FROM pg_database WHERE datname = '{database}'")
    return out == "1"


def _selected_prints(gauntlet: Gauntlet, database: str, keys: list[tuple[str, str]]) -> None:
    restored = g.fingerprint(gauntlet.db.server.dsn(database), keys)
    source = {k: gauntlet.fingerprint["relations"][f"{k[0]}.{k[1]}"] for k in keys}
    assert restored["relations"] == {f"{s}.{t}": v for (s, t), v in source.items()}


def test_gauntlet_shape(pg_gauntlet: Gauntlet, pg_gauntlet_local_backup: GauntletBackup) -> None:
    """The dataset is what the issue asks for, and the manifest knows every relation kind."""
    info, prints = pg_gauntlet.info, pg_gauntlet.fingerprint
    rels = prints["relations"]
    assert len(rels) >= 50 and len({k.split(".")[0] for k in rels}) >= 5
    assert info.size_bytes >= 300 * 1024 * 1024 * 0.9
    big = pg_gauntlet.db.server.psql(
        "SELECT pg_table_size('m_middle.big_payload')", db=pg_gauntlet.db.name
    )
    assert int(big) >= 200 * 1024 * 1024
    assert max(lo[2] for lo in prints["large_objects"]) >= 5 * 1024 * 1024
    assert ("a_first.audited", "bump_on_insert") in prints["triggers"]
    assert rels["parts.events_unpopulated"] == {"relkind": "m", "populated": False}
    tables = {
        (t["schema"], t["name"]): t
        for t in pg_gauntlet_local_backup.manifest.details["databases"][0]["tables"]
    }
    assert tables[g.PARTITIONED]["relkind"] == "p" and tables[g.PARTITIONED]["rows"] == 0
    assert tables[("parts", "events_2025")]["partition_of"] == ["parts", "events"]
    assert tables[g.LEAF_PARTITION]["partition_of"] == ["parts", "events_2025"]
    leaves = [k for k, t in tables.items() if t.get("partition_of") and t["relkind"] == "r"]
    assert sum(tables[k]["rows"] for k in leaves) == 60000
    assert tables[("parts", "cars")]["inherits"] == [["parts", "vehicles"]]
    assert tables[("parts", "vehicles")]["rows"] == 100  # its own rows, not its children's
    assert tables[("parts", "scratch_cache")]["unlogged"] is True
    assert tables[("parts", "events_by_region")]["populated"] is True
    assert tables[("parts", "events_unpopulated")]["rows"] is None
    if info.foreign_table:
        assert tables[("parts", "remote_things")]["relkind"] == "f"
        assert tables[("parts", "remote_things")]["rows"] is None
    FIGURES.update(
        database_bytes=info.size_bytes,
        load_s=info.load_seconds,
        backup_local_s=pg_gauntlet_local_backup.seconds,
        dump_raw_bytes=sum(a.raw_size for a in pg_gauntlet_local_backup.manifest.artifacts),
        dump_stored_bytes=sum(a.stored_size for a in pg_gauntlet_local_backup.manifest.artifacts),
    )


def test_verify_and_deep_verify_pass(
    pg_gauntlet_local_backup: GauntletBackup, age_key: EncryptionConfig
) -> None:
    backup = pg_gauntlet_local_backup
    started = time.monotonic()
    report = verify_backup(backup.repo, backup.manifest, age_key)
    FIGURES["verify_s"] = round(time.monotonic() - started, 2)
    assert report["ok"], report
    dump = next(a for a in report["artifacts"] if a["artifact"].endswith(".pgdump"))
    assert dump["structure"]["tables_with_data"] >= 50
    deep = deep_verify(
        backup.repo, age_key, SamplingPolicy(), engine="postgresql", target="gauntlet"
    )
    assert deep["ok"] if "ok" in deep else all(r["ok"] for r in deep["results"]), deep


@pytest.mark.parametrize("repo_kind", ["local", "s3"])
def test_whole_round_trip_is_fingerprint_identical(
    pg_gauntlet: Gauntlet,
    age_key: EncryptionConfig,
    repo_kind: str,
    request: pytest.FixtureRequest,
) -> None:
    backup: GauntletBackup = request.getfixturevalue(f"pg_gauntlet_{repo_kind}_backup")
    FIGURES[f"backup_{repo_kind}_s"] = backup.seconds
    into = _fresh(pg_gauntlet)  # a renamed restore: another database name on the server
    try:
        report = _restore(pg_gauntlet, backup, age_key, target_database=into)
        FIGURES[f"restore_whole_{repo_kind}_s"] = report["_seconds"]
        assert report["rows_ok"]
        assert g.fingerprint(pg_gauntlet.db.server.dsn(into)) == pg_gauntlet.fingerprint
    finally:
        pg_gauntlet.db.server.drop_database(into)


@pytest.mark.parametrize(
    "where, table",
    [
        ("start", f"{g.FIRST[0]}.{g.FIRST[1]}"),
        ("middle", f"{g.BIG[0]}.{g.BIG[1]}"),
        ("end", f"{g.LAST[0]}.{g.LAST[1]}"),
        ("hostile", f"{g.HOSTILE_SCHEMA}.{g.HOSTILE_TABLE}"),
    ],
)
def test_selective_table_restore_anywhere_in_the_dump(
    pg_gauntlet: Gauntlet,
    pg_gauntlet_local_backup: GauntletBackup,
    age_key: EncryptionConfig,
    where: str,
    table: str,
) -> None:
    into = _fresh(pg_gauntlet)
    key = tuple(table.split(".", 1)) if where != "hostile" else (g.HOSTILE_SCHEMA, g.HOSTILE_TABLE)
    try:
        report = _restore(
            pg_gauntlet, pg_gauntlet_local_backup, age_key, target_database=into, tables=[table]
        )
        FIGURES[f"restore_table_{where}_s"] = report["_seconds"]
        assert report["tables"] == [f"{key[0]}.{key[1]}"]
        assert _relations(pg_gauntlet, into) == {key}  # nothing else is created
        _selected_prints(pg_gauntlet, into, [key])  # type: ignore[list-item]
    finally:
        pg_gauntlet.db.server.drop_database(into)


def test_selective_table_restore_from_s3(
    pg_gauntlet: Gauntlet, pg_gauntlet_s3_backup: GauntletBackup, age_key: EncryptionConfig
) -> None:
    into = _fresh(pg_gauntlet)
    try:
        report = _restore(
            pg_gauntlet, pg_gauntlet_s3_backup, age_key, target_database=into, tables=["zz_last"]
        )
        FIGURES["restore_table_end_s3_s"] = report["_seconds"]
        _selected_prints(pg_gauntlet, into, [g.LAST])
    finally:
        pg_gauntlet.db.server.drop_database(into)


def test_selective_schema_with_a_non_ascii_name(
    pg_gauntlet: Gauntlet, pg_gauntlet_local_backup: GauntletBackup, age_key: EncryptionConfig
) -> None:
    into = _fresh(pg_gauntlet)
    try:
        report = _restore(
            pg_gauntlet,
            pg_gauntlet_local_backup,
            age_key,
            target_database=into,
            schemas=[g.UNICODE_SCHEMA],
        )
        FIGURES["restore_schema_s"] = report["_seconds"]
        keys = sorted(_relations(pg_gauntlet, into))
        assert {s for s, _ in keys} == {g.UNICODE_SCHEMA} and len(keys) == 13
        _selected_prints(pg_gauntlet, into, keys)
    finally:
        pg_gauntlet.db.server.drop_database(into)


def test_partitioned_parent_brings_every_partition_attached(
    pg_gauntlet: Gauntlet, pg_gauntlet_local_backup: GauntletBackup, age_key: EncryptionConfig
) -> None:
    into = _fresh(pg_gauntlet)
    parts = [
        ("parts", n)
        for n in (
            "events",
            "events_2025",
            "events_2026",
            "events_2025_eu",
            "events_2025_other",
            "events_2025_us",
        )
    ]
    try:
        report = _restore(
            pg_gauntlet,
            pg_gauntlet_local_backup,
            age_key,
            target_database=into,
            tables=["parts.events"],
        )
        assert sorted(report["tables"]) == sorted(f"{s}.{t}" for s, t in parts)
        assert any("restored with its 5 partitions" in n for n in report["notes"])
        assert _relations(pg_gauntlet, into) == set(parts)
        assert pg_gauntlet.db.server.psql("SELECT count(*) FROM parts.events", db=into) == "60000"
        _selected_prints(pg_gauntlet, into, parts)
    finally:
        pg_gauntlet.db.server.drop_database(into)


def test_single_partition_is_restored_standalone_and_the_plan_says_so(
    pg_gauntlet: Gauntlet, pg_gauntlet_local_backup: GauntletBackup, age_key: EncryptionConfig
) -> None:
    into = _fresh(pg_gauntlet)
    name = f"{g.LEAF_PARTITION[0]}.{g.LEAF_PARTITION[1]}"
    plan = _restore(
        pg_gauntlet,
        pg_gauntlet_local_backup,
        age_key,
        target_database=into,
        tables=[name],
        dry_run=True,
    )
    assert plan["tables"] == [name]
    assert any("is a partition of parts.events_2025" in n for n in plan["notes"])
    assert not _exists(pg_gauntlet, into)  # a dry run touches nothing
    try:
        _restore(
            pg_gauntlet, pg_gauntlet_local_backup, age_key, target_database=into, tables=[name]
        )
        assert _relations(pg_gauntlet, into) == {g.LEAF_PARTITION}
        _selected_prints(pg_gauntlet, into, [g.LEAF_PARTITION])
    finally:
        pg_gauntlet.db.server.drop_database(into)


def test_schema_only_then_data_only(
    pg_gauntlet: Gauntlet, pg_gauntlet_local_backup: GauntletBackup, age_key: EncryptionConfig
) -> None:
    into = _fresh(pg_gauntlet)
    keys = [g.FIRST, ("a_first", "audited")]
    names = [f"{s}.{t}" for s, t in keys]
    try:
        _restore(
            pg_gauntlet,
            pg_gauntlet_local_backup,
            age_key,
            target_database=into,
            tables=names,
            schema_only=True,
        )
        assert pg_gauntlet.db.server.psql("SELECT count(*) FROM a_first.audited", db=into) == "0"
        report = _restore(
            pg_gauntlet,
            pg_gauntlet_local_backup,
            age_key,
            target_database=into,
            tables=names,
            data_only=True,
        )
        assert report["rows_ok"]
        # no trigger came with the table definitions, so nothing was bumped twice
        _selected_prints(pg_gauntlet, into, keys)
    finally:
        pg_gauntlet.db.server.drop_database(into)


def test_tampered_artifact_fails_verify_and_a_selective_restore_commits_nothing(
    pg_gauntlet: Gauntlet,
    pg_gauntlet_local_backup: GauntletBackup,
    age_key: EncryptionConfig,
    tmp_path: Path,
) -> None:
    """A byte flipped near the end, after every table pg_restore needs: pg_restore stops
    reading early, the rest is still read, the checksum fails, nothing is committed."""
    source_root = Path(pg_gauntlet_local_backup.config.path or "")
    shutil.copytree(source_root, tmp_path / "repo")
    repo, config = local_repository(tmp_path / "repo")
    manifest = pg_gauntlet_local_backup.manifest
    dump = next(a for a in manifest.artifacts if a.content == "pg_dump-custom")
    path = tmp_path / "repo" / dump.key
    with path.open("r+b") as f:
        f.seek(dump.stored_size - 1000)
        byte = f.read(1)
        f.seek(dump.stored_size - 1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    report = verify_backup(repo, manifest, age_key)
    assert not report["ok"]
    tampered = GauntletBackup(repo, config, manifest, 0)
    into = _fresh(pg_gauntlet)
    pg_gauntlet.db.server.create_database(into)
    try:
        with pytest.raises(IntegrityError, match=dump.name):
            _restore(pg_gauntlet, tampered, age_key, target_database=into, tables=["a_000_first"])
        assert _relations(pg_gauntlet, into) == set()  # nothing committed
    finally:
        pg_gauntlet.db.server.drop_database(into)
    # truncated: the same, and the database strongroom would have created is not left behind
    with path.open("r+b") as f:
        f.truncate(dump.stored_size // 2)
    with pytest.raises(IntegrityError):
        _restore(pg_gauntlet, tampered, age_key, target_database=into, tables=["zz_last"])
    assert not _exists(pg_gauntlet, into)


@pytest.mark.parametrize(
    "request_kw, error, match",
    [
        ({"schemas": [g.EMPTY_SCHEMA]}, NotFound, "holds no tables"),
        ({"tables": [g.DUPLICATE_NAME]}, InvalidInput, "ambiguous; qualify it"),
        ({"tables": ["no_such_table"]}, NotFound, "not in the backup"),
    ],
)
def test_bad_selections_are_refused_and_touch_nothing(
    pg_gauntlet: Gauntlet,
    pg_gauntlet_local_backup: GauntletBackup,
    age_key: EncryptionConfig,
    request_kw: dict[str, Any],
    error: type[Exception],
    match: str,
) -> None:
    into = _fresh(pg_gauntlet)
    with pytest.raises(error, match=match):
        _restore(pg_gauntlet, pg_gauntlet_local_backup, age_key, target_database=into, **request_kw)
    assert not _exists(pg_gauntlet, into)


def test_table_whose_types_are_not_restored_fails_clearly_and_commits_nothing(
    pg_gauntlet: Gauntlet, pg_gauntlet_local_backup: GauntletBackup, age_key: EncryptionConfig
) -> None:
    """Like pg_restore -t, a table selection brings no types or extensions: a table using
    an enum and hstore cannot be created in a fresh database. psql's error is reported
    (pg_restore is never left blocked) and the database strongroom created is removed."""
    into = _fresh(pg_gauntlet)
    with pytest.raises(StrongroomError, match="psql"):
        _restore(
            pg_gauntlet,
            pg_gauntlet_local_backup,
            age_key,
            target_database=into,
            tables=[f"{g.KINDS[0]}.{g.KINDS[1]}"],
        )
    assert not _exists(pg_gauntlet, into)


def test_report_figures(pg_gauntlet: Gauntlet) -> None:
    """Prints the measured figures (run last with -p no:randomly; -s to see them)."""
    print("gauntlet figures:", {**pg_gauntlet.figures, **FIGURES})
    assert pg_gauntlet.info.load_seconds > 0
