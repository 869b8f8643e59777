"""Whole-database restores in phases with parallel table loads (issue 19), on a real server.

The dataset has every kind the phases split: many tables of different sizes, a
partitioned table, sequences, a large object, a materialized view, foreign keys across
tables, triggers and hostile names. Each restore is compared by content fingerprint
with the source, for one job and several; failures (a tampered artifact, a pg_restore
that fails mid-load, no room for the spool) leave the target as it was and no scratch
database behind.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from strongroom.catalog import Catalog
from strongroom.config import EncryptionConfig, RepositoryConfig
from strongroom.engines.postgres import restore_groups, restore_phased
from strongroom.engines.postgres.backup import backup_postgres
from strongroom.engines.postgres.growing_spool import GrowingSpool, SpoolAborted
from strongroom.engines.postgres.restore import PgRestoreRequest, restore_postgres
from strongroom.errors import IntegrityError, StrongroomError
from strongroom.repository import Repository
from tests.fixtures.postgres import PgDatabase
from tests.fixtures.strongroom_fixtures import pg_connection

POPULATE = '''
CREATE SCHEMA "Wïde ""schema""";
CREATE TABLE public.small (id int PRIMARY KEY, v text);
CREATE TABLE public.big (id bigserial PRIMARY KEY, payload text, n int);
CREATE TABLE public.mid (id int PRIMARY KEY, big_id bigint REFERENCES public.big, w float8);
CREATE TABLE "Wïde ""schema"""."tåble; --x" (k text PRIMARY KEY, j jsonb);
CREATE TABLE public.events (id int, day date, v text) PARTITION BY RANGE (day);
CREATE TABLE public.events_a PARTITION OF public.events
  FOR VALUES FROM ('2026-01-01') TO ('2026-07-01');
CREATE TABLE public.events_b PARTITION OF public.events
  FOR VALUES FROM ('2026-07-01') TO ('2027-01-01');
CREATE INDEX events_day ON public.events (day);
CREATE INDEX big_n ON public.big (n);
CREATE SEQUENCE public.counter START 41;
SELECT nextval('public.counter');
CREATE FUNCTION public.touch() RETURNS trigger LANGUAGE plpgsql AS
  $$ BEGIN NEW.w := coalesce(NEW.w, 0) + 1; RETURN NEW; END $$;
CREATE TRIGGER mid_touch BEFORE INSERT ON public.mid FOR EACH ROW EXECUTE FUNCTION public.touch();
INSERT INTO public.small SELECT g, 'v' || g FROM generate_series(1, 50) g;
INSERT INTO public.big (payload, n) SELECT repeat(md5(g::text), 8), g % 97
  FROM generate_series(1, 60000) g;
INSERT INTO public.mid SELECT g, g, g / 3.0 FROM generate_series(1, 20000) g;
INSERT INTO "Wïde ""schema"""."tåble; --x"
  SELECT 'k' || g, jsonb_build_object('g', g, 'q', E'a\\nb''c') FROM generate_series(1, 3000) g;
INSERT INTO public.events SELECT g, DATE '2026-01-01' + (g % 360), 'e' || g
  FROM generate_series(1, 30000) g;
CREATE MATERIALIZED VIEW public.big_summary AS SELECT n, count(*) AS c FROM public.big GROUP BY n;
SELECT lo_from_bytea(0, decode(repeat('ab', 40000), 'hex'));
GRANT SELECT ON public.small TO PUBLIC;
COMMENT ON TABLE public.big IS 'the big one';
'''

FINGERPRINT = '''
SELECT string_agg(t, '|' ORDER BY t) FROM (
  SELECT 's' || md5(string_agg(x::text, ',' ORDER BY id)) AS t FROM public.small x
  UNION ALL SELECT 'b' || md5(string_agg(x::text, ',' ORDER BY id)) FROM public.big x
  UNION ALL SELECT 'm' || md5(string_agg(x::text, ',' ORDER BY id)) FROM public.mid x
  UNION ALL SELECT 'w' || md5(string_agg(x::text, ',' ORDER BY k))
    FROM "Wïde ""schema"""."tåble; --x" x
  UNION ALL SELECT 'e' || md5(string_agg(x::text, ',' ORDER BY id)) FROM public.events x
  UNION ALL SELECT 'v' || md5(string_agg(x::text, ',' ORDER BY n)) FROM public.big_summary x
  UNION ALL SELECT 'q' || last_value::text FROM public.counter
  UNION ALL SELECT 'l' || md5(string_agg(md5(lo_get(oid)), ',')) FROM pg_largeobject_metadata
  UNION ALL SELECT 'i' || string_agg(indexname, ',' ORDER BY indexname) FROM pg_indexes
    WHERE schemaname NOT IN ('pg_catalog')
  UNION ALL SELECT 'c' || string_agg(conname, ',' ORDER BY conname) FROM pg_constraint
    WHERE connamespace::regnamespace::text NOT IN ('pg_catalog')
  UNION ALL SELECT 't' || string_agg(tgname, ',' ORDER BY tgname) FROM pg_trigger
    WHERE NOT tgisinternal
  UNION ALL SELECT 'a' || coalesce(relacl::text, '-') FROM pg_class
    WHERE oid = 'public.small'::regclass
  UNION ALL SELECT 'd' || obj_description('public.big'::regclass, 'pg_class')
) s
'''


@pytest.fixture
def source(pg_db: PgDatabase) -> PgDatabase:
    pg_db.psql(POPULATE)
    return pg_db


@pytest.fixture
def backed_up(
    source: PgDatabase, local_repo: tuple[Repository, RepositoryConfig], age_key: EncryptionConfig
) -> PgDatabase:
    backup_postgres(pg_connection(source), local_repo[0], local_repo[1], age_key)
    return source


def _restore(
    db: PgDatabase, repo: tuple[Repository, RepositoryConfig], key: EncryptionConfig, **kw: Any
) -> dict[str, Any]:
    return restore_postgres(pg_connection(db), repo[0], key, PgRestoreRequest(**kw))


def _scratch_left(db: PgDatabase) -> str:
    return db.server.psql(
        "SELECT count(*) FROM pg_database WHERE datname LIKE 'sr\\_restore\\_%' "
        "OR datname LIKE 'sr\\_old\\_%'"
    )


@pytest.mark.parametrize("jobs", [1, 3])
def test_whole_restore_in_phases_matches_the_source(
    backed_up: PgDatabase,
    local_repo: tuple[Repository, RepositoryConfig],
    age_key: EncryptionConfig,
    jobs: int,
) -> None:
    into = f"{backed_up.name}_p{jobs}"
    plan = _restore(backed_up, local_repo, age_key, target_database=into, jobs=jobs, dry_run=True)
    assert f"{jobs} parallel table load(s)" in plan["method"]
    report = _restore(backed_up, local_repo, age_key, target_database=into, jobs=jobs)
    assert report["rows_ok"]
    checked = {c["table"] for c in report["row_checks"]}
    assert {"public.big", "public.events_a", 'Wïde "schema".tåble; --x'} <= checked
    assert backed_up.server.psql(FINGERPRINT, db=into) == backed_up.psql(FINGERPRINT)
    assert _scratch_left(backed_up) == "0"
    backed_up.server.drop_database(into)


def test_manifest_records_table_sizes_for_the_groups(
    backed_up: PgDatabase, local_repo: tuple[Repository, RepositoryConfig]
) -> None:
    manifest = Catalog(local_repo[0]).resolve("latest", "postgresql", "pg1")
    tables = {(t["schema"], t["name"]): t for t in manifest.details["databases"][0]["tables"]}
    assert tables[("public", "big")]["bytes"] > tables[("public", "small")]["bytes"] > 0
    assert "bytes" not in tables[("public", "events")]  # a partitioned parent stores nothing


def test_tampered_artifact_leaves_the_target_as_it_was(
    backed_up: PgDatabase,
    local_repo: tuple[Repository, RepositoryConfig],
    age_key: EncryptionConfig,
) -> None:
    manifest = Catalog(local_repo[0]).resolve("latest", "postgresql", "pg1")
    entry = manifest.details["databases"][0]
    artifact = manifest.artifact(entry["artifact"])
    path = local_repo[0].root / artifact.key  # type: ignore[attr-defined]
    data = bytearray(path.read_bytes())
    data[len(data) * 3 // 4] ^= 0xFF  # past the table of contents: tables are loading
    path.write_bytes(bytes(data))
    before = backed_up.psql(FINGERPRINT)
    with pytest.raises(IntegrityError):
        _restore(backed_up, local_repo, age_key, jobs=3, drop_existing=True)
    assert backed_up.psql(FINGERPRINT) == before
    assert _scratch_left(backed_up) == "0"


def test_a_failing_load_leaves_nothing_behind(
    backed_up: PgDatabase,
    local_repo: tuple[Repository, RepositoryConfig],
    age_key: EncryptionConfig,
) -> None:
    """The backup's tables are owned by a role the target server does not have: the
    definitions fail under --exit-on-error (unless --no-owner), nothing is swapped in."""
    role = f"gone_{backed_up.name}"
    backed_up.psql(f'CREATE ROLE "{role}"; ALTER TABLE public.small OWNER TO "{role}"')
    backup_postgres(pg_connection(backed_up), local_repo[0], local_repo[1], age_key)
    backed_up.psql(f'ALTER TABLE public.small OWNER TO CURRENT_USER; DROP ROLE "{role}"')
    into = f"{backed_up.name}_fail"
    with pytest.raises(StrongroomError, match="definitions"):
        _restore(backed_up, local_repo, age_key, target_database=into, jobs=2)
    exists = f"SELECT count(*) FROM pg_database WHERE datname = '{into}'"
    assert backed_up.server.psql(exists) == "0"
    assert _scratch_left(backed_up) == "0"
    report = _restore(backed_up, local_repo, age_key, target_database=into, jobs=2, no_owner=True)
    assert report["rows_ok"]
    backed_up.server.drop_database(into)


def test_without_room_for_the_spool_one_stream_restores(
    backed_up: PgDatabase,
    local_repo: tuple[Repository, RepositoryConfig],
    age_key: EncryptionConfig,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(restore_phased, "SPOOL_MARGIN", 1 << 62)  # no disk is that large
    into = f"{backed_up.name}_one"
    report = _restore(backed_up, local_repo, age_key, target_database=into, jobs=3)
    assert report["rows_ok"]
    assert backed_up.server.psql(FINGERPRINT, db=into) == backed_up.psql(FINGERPRINT)
    backed_up.server.drop_database(into)


def test_data_groups_balance_by_size_and_keep_archive_order() -> None:
    listing = "\n".join(
        [
            ";",
            "; Archive created at ...",
            "3001; 0 101 TABLE DATA public a postgres",
            "3002; 0 102 TABLE DATA public b postgres",
            "3003; 0 103 TABLE DATA public c postgres",
            "3004; 0 104 TABLE DATA public d postgres",
            "3005; 0 0 SEQUENCE SET public s postgres",
            "3006; 0 0 BLOBS - BLOBS ",
        ]
    )
    tables = [
        {"schema": "public", "name": n, "oid": o, "rows": 1, "bytes": b}
        for n, o, b in [("a", 101, 10), ("b", 102, 1000), ("c", 103, 600), ("d", 104, 500)]
    ]
    groups = restore_groups.data_groups(listing, {"tables": tables}, 2)
    oids = [[oid for _, oid in group] for group in groups]
    assert oids == [[101, 102, 0, 0], [103, 104]]  # b, then a: 1010 | c, d: 1100; order kept
    assert restore_groups.data_groups(listing, {"tables": tables}, 8)[0][0][1] == 102
    assert len(restore_groups.data_groups(listing, {"tables": tables}, 8)) == 4


def test_growing_spool_followers_read_what_is_published_from_the_start(tmp_path: Path) -> None:
    spool = GrowingSpool(tmp_path / "s")
    outputs: list[bytearray] = [bytearray(), bytearray()]

    class Pipe:
        def __init__(self, out: bytearray, stop_after: int | None) -> None:
            self.out, self.stop_after = out, stop_after

        def write(self, data: memoryview) -> int:
            if self.stop_after is not None and len(self.out) >= self.stop_after:
                raise BrokenPipeError
            self.out += data
            return len(data)

        def close(self) -> None:
            pass

    readers = [
        threading.Thread(target=spool.follow, args=(Pipe(outputs[0], None),)),
        threading.Thread(target=spool.follow, args=(Pipe(outputs[1], 3000),)),
    ]
    for reader in readers:
        reader.start()
    expected = b"".join(bytes([i]) * 1000 for i in range(20))
    for i in range(10):
        spool.write(bytes([i]) * 1000)
    time.sleep(0.05)
    assert outputs == [bytearray(), bytearray()]  # nothing published: nothing read
    spool.publish()
    deadline = time.monotonic() + 10
    while len(outputs[0]) < 10000 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert bytes(outputs[0]) == expected[:10000]
    for i in range(10, 20):
        spool.write(bytes([i]) * 1000)
        time.sleep(0.002)
    spool.finish()
    for reader in readers:
        reader.join(timeout=10)
    assert bytes(outputs[0]) == expected
    assert bytes(outputs[1]) == expected[: len(outputs[1])] and 3000 <= len(outputs[1]) < 20000

    aborted = GrowingSpool(tmp_path / "t")
    aborted.write(b"x" * 10)
    out = bytearray()
    reader = threading.Thread(target=aborted.follow, args=(Pipe(out, None),))
    reader.start()
    aborted.abort()
    reader.join(timeout=10)
    assert not reader.is_alive()
    with pytest.raises(SpoolAborted):
        aborted.write(b"y")


def test_forged_artifact_never_reaches_pg_restore(
    backed_up: PgDatabase,
    local_repo: tuple[Repository, RepositoryConfig],
    age_key: EncryptionConfig,
) -> None:
    """A bucket writer re-encrypts an altered dump to the public recipient (well formed,
    age authenticates it): its first stored chunk differs from the signed manifest's,
    so the restore stops before a single byte is published to a pg_restore."""
    import io

    from strongroom.artifacts import read_artifact
    from strongroom.pipeline import store_stream

    manifest = Catalog(local_repo[0]).resolve("latest", "postgresql", "pg1")
    artifact = manifest.artifact(manifest.details["databases"][0]["artifact"])
    assert artifact.stored_chunks is not None and artifact.stored_chunks.sha256
    plain = io.BytesIO()
    read_artifact(local_repo[0], artifact, plain, encryption=age_key, holdback=0)
    altered = plain.getvalue().replace(b"public", b"pwned!", 1)
    forged = io.BytesIO()
    store_stream(io.BytesIO(altered), forged, recipients=age_key.recipients)
    path = local_repo[0].root / artifact.key  # type: ignore[attr-defined]
    path.write_bytes(forged.getvalue())
    before = backed_up.psql(FINGERPRINT)
    with pytest.raises(IntegrityError, match="stored chunk 0 does not match"):
        _restore(backed_up, local_repo, age_key, jobs=2, drop_existing=True)
    assert backed_up.psql(FINGERPRINT) == before
    assert _scratch_left(backed_up) == "0"
