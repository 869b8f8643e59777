"""Row counts read from real pg_dump archives match count(*) on the server, in any chunking."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strongroom.config import EncryptionConfig, RepositoryConfig
from strongroom.engines.pg_dump_rows import ArchiveRowCounter, DumpFormatError, LineCounter
from strongroom.engines.postgres import _count_rows_live, backup_postgres, pg_tool
from strongroom.repository.local import LocalRepository
from tests.fixtures.postgres import PgDatabase
from tests.fixtures.strongroom_fixtures import pg_connection

TRICKY = r"""
CREATE SCHEMA "we""ird ; schema";
CREATE TABLE plain (id int, t text, b bytea);
INSERT INTO plain SELECT g, E'multi\nline\\ and\ttab ' || g, '\x000a0d'::bytea
  FROM generate_series(1, 3000) g;
INSERT INTO plain VALUES (0, NULL, NULL), (-1, '', ''), (-2, E'\\.', NULL);
CREATE TABLE "we""ird ; schema"."tä ble ""q"" x" (x int);
INSERT INTO "we""ird ; schema"."tä ble ""q"" x" SELECT generate_series(1, 17);
CREATE TABLE empty (x int);
CREATE TABLE parted (k int, v text) PARTITION BY RANGE (k);
CREATE TABLE parted_a PARTITION OF parted FOR VALUES FROM (0) TO (100);
CREATE TABLE parted_b PARTITION OF parted FOR VALUES FROM (100) TO (10000)
  PARTITION BY RANGE (k);
CREATE TABLE parted_b1 PARTITION OF parted_b FOR VALUES FROM (100) TO (500);
CREATE TABLE parted_b2 PARTITION OF parted_b FOR VALUES FROM (500) TO (10000);
INSERT INTO parted SELECT g, 'v' FROM generate_series(1, 2000) g;
CREATE UNLOGGED TABLE scratchpad (x int);
INSERT INTO scratchpad VALUES (1), (2);
SELECT lo_from_bytea(0, convert_to(repeat(E'line\n', 100), 'UTF8'));
"""


@pytest.fixture
def tricky_db(pg_db: PgDatabase) -> PgDatabase:
    pg_db.psql(TRICKY)
    return pg_db


def _dump(db: PgDatabase, out: Path, fmt: str, *extra: str) -> Path:
    env = {**db.server.libpq_env(db.name)}
    subprocess.run([pg_tool("pg_dump"), f"-F{fmt}", *extra, "-f", str(out)], env=env, check=True)
    return out


def _server_counts(db: PgDatabase) -> dict[tuple[str, str], int]:
    return _count_rows_live(pg_connection(db), db.name)


def test_custom_archive_counts_match_the_server(tricky_db: PgDatabase, tmp_path: Path) -> None:
    data = _dump(tricky_db, tmp_path / "d.dump", "c", "-Z0").read_bytes()
    counter = ArchiveRowCounter()
    counter.feed(data)
    expected = _server_counts(tricky_db)
    assert counter.table_rows() == expected
    assert expected[("public", "parted")] == 2000  # partitions add up into the root
    assert expected[("public", "empty")] == 0
    assert expected[("public", "plain")] == 3003
    assert counter.server_version.startswith("15.")


def test_chunk_boundaries_do_not_matter(tricky_db: PgDatabase, tmp_path: Path) -> None:
    data = _dump(tricky_db, tmp_path / "d.dump", "c", "-Z0").read_bytes()
    whole = ArchiveRowCounter()
    whole.feed(data)
    expected = whole.table_rows()

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.integers(min_value=1, max_value=4096), min_size=1, max_size=50))
    def check(sizes: list[int]) -> None:
        counter = ArchiveRowCounter()
        pos, i = 0, 0
        while pos < len(data):
            step = sizes[i % len(sizes)]
            counter.feed(memoryview(data)[pos : pos + step])
            pos += step
            i += 1
        assert counter.table_rows() == expected

    check()


def test_directory_archive_counts_match_the_server(tricky_db: PgDatabase, tmp_path: Path) -> None:
    folder = _dump(tricky_db, tmp_path / "dir", "d", "-Z0", "-j2")
    counter = ArchiveRowCounter()
    counter.feed((folder / "toc.dat").read_bytes())
    members: dict[str, LineCounter] = {}
    for member in folder.iterdir():
        if member.name != "toc.dat":
            members[member.name] = LineCounter()
            members[member.name].feed(member.read_bytes())
    assert counter.table_rows(members) == _server_counts(tricky_db)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda d: d[:-1], id="truncated-last-byte"),
        pytest.param(lambda d: d[: len(d) // 2], id="truncated-half"),
        pytest.param(lambda d: b"XXXXX" + d[5:], id="no-magic"),
        pytest.param(lambda d: d + b"\x09", id="unknown-block"),
    ],
)
def test_damaged_archives_are_refused(
    tricky_db: PgDatabase, tmp_path: Path, damage: object
) -> None:
    data = _dump(tricky_db, tmp_path / "d.dump", "c", "-Z0").read_bytes()
    counter = ArchiveRowCounter()
    counter.feed(damage(data))  # type: ignore[operator]
    with pytest.raises(DumpFormatError):
        counter.table_rows()


def test_compressed_archive_is_refused_not_miscounted(
    tricky_db: PgDatabase, tmp_path: Path
) -> None:
    data = _dump(tricky_db, tmp_path / "d.dump", "c", "-Z1").read_bytes()
    counter = ArchiveRowCounter()
    counter.feed(data)
    with pytest.raises(DumpFormatError, match="compressed"):
        counter.table_rows()


@pytest.mark.parametrize("dump_format", ["custom", "directory"])
def test_backup_records_archive_counts(
    tricky_db: PgDatabase,
    local_repo: tuple[LocalRepository, RepositoryConfig],
    age_key: EncryptionConfig,
    dump_format: str,
) -> None:
    repo, config = local_repo
    conn = pg_connection(tricky_db, dump_format=dump_format, jobs=2)
    manifest = backup_postgres(conn, repo, config, age_key, include_globals=False)
    (entry,) = manifest.details["databases"]
    assert entry["row_counts"] == "archive"
    recorded = {(t["schema"], t["name"]): t["rows"] for t in entry["tables"]}
    assert recorded == _server_counts(tricky_db)
