"""PostgreSQL logical backup, restore and verify against a real server."""

from __future__ import annotations

import time
from typing import Any

import pytest
from pydantic import SecretStr

from strongroom.catalog import Catalog, manifest_key
from strongroom.config import EncryptionConfig, PostgresConnection, RepositoryConfig
from strongroom.engines.postgres.backup import backup_postgres
from strongroom.engines.postgres.restore import PgRestoreRequest, restore_postgres
from strongroom.errors import (
    AccessDenied,
    IntegrityError,
    InvalidInput,
    NotFound,
    ServiceUnavailable,
    TargetNotEmpty,
)
from strongroom.repository import Repository
from strongroom.verify import verify_backup
from tests.fixtures.ports import free_port
from tests.fixtures.postgres import PgDatabase
from tests.fixtures.strongroom_fixtures import pg_connection, signed_config

POPULATE = """
CREATE SCHEMA sales;
CREATE SCHEMA "Odd Schema";
CREATE TABLE sales.customers (id int PRIMARY KEY, name text, photo bytea, tags jsonb);
CREATE TABLE sales.orders (id bigserial PRIMARY KEY, customer_id int REFERENCES sales.customers,
                           amount numeric(10,2), placed timestamptz DEFAULT now());
CREATE TABLE public."odd; name" (x int, "quote""d" text);
CREATE TABLE "Odd Schema"."Ünïcødé table" (id int, val text);
CREATE INDEX orders_customer ON sales.orders(customer_id);
CREATE VIEW sales.big_orders AS SELECT * FROM sales.orders WHERE amount > 500;
INSERT INTO sales.customers SELECT g, 'name ' || g, decode(md5(g::text), 'hex'),
  jsonb_build_object('g', g, 'note', E'line\\nbreak') FROM generate_series(1, 300) g;
INSERT INTO sales.orders (customer_id, amount) SELECT 1 + g % 300, (g * 7.31) % 1000
  FROM generate_series(1, 5000) g;
INSERT INTO public."odd; name" VALUES (1, 'a''b'), (2, '; DROP TABLE x; --');
INSERT INTO "Odd Schema"."Ünïcødé table" VALUES (1, 'ü'), (2, '€'), (3, NULL);
"""

FINGERPRINT = """
SELECT string_agg(t, '|' ORDER BY t) FROM (
  SELECT 'c' || md5(string_agg(c::text, ',' ORDER BY id)) AS t FROM sales.customers c
  UNION ALL SELECT 'o' || md5(string_agg(o::text, ',' ORDER BY id)) FROM sales.orders o
  UNION ALL SELECT 'x' || md5(string_agg(x::text, ',' ORDER BY x)) FROM public."odd; name" x
  UNION ALL SELECT 'u' || md5(string_agg(u::text, ',' ORDER BY id))
    FROM "Odd Schema"."Ünïcødé table" u
) s
"""


@pytest.fixture
def source(pg_db: PgDatabase) -> PgDatabase:
    pg_db.psql(POPULATE)
    return pg_db


def _backup(
    db: PgDatabase, repo: tuple[Repository, RepositoryConfig], key: EncryptionConfig
) -> Any:
    return backup_postgres(pg_connection(db), repo[0], repo[1], key)


def _restore(
    db: PgDatabase, repo: tuple[Repository, RepositoryConfig], key: EncryptionConfig, **kw: Any
) -> dict[str, Any]:
    return restore_postgres(pg_connection(db), repo[0], key, PgRestoreRequest(**kw))


def _new_name(db: PgDatabase, suffix: str) -> str:
    return f"{db.name}_{suffix}"


def _db_exists(db: PgDatabase, name: str) -> bool:
    return db.server.psql(f"SELECT count(*) FROM pg_database WHERE datname = '{name}'") == "1"


@pytest.mark.parametrize("repo_kind", ["local_repo", "s3_repo"])
def test_round_trip(
    source: PgDatabase, age_key: EncryptionConfig, repo_kind: str, request: pytest.FixtureRequest
) -> None:
    repo = request.getfixturevalue(repo_kind)
    manifest = _backup(source, repo, age_key)
    # manifest: server facts, per-table rows, artifacts with checksums; published last
    assert manifest.server["version_num"] >= 150000
    db = manifest.details["databases"][0]
    rows = {(t["schema"], t["name"]): t["rows"] for t in db["tables"]}
    assert rows[("sales", "orders")] == 5000
    assert rows[("public", "odd; name")] == 2
    assert rows[("Odd Schema", "Ünïcødé table")] == 3
    assert {a.name for a in manifest.artifacts} == {"globals.sql", db["artifact"]}
    for artifact in manifest.artifacts:
        assert len(artifact.stored_sha256) == 64 and artifact.encryption == "age-x25519"
    assert Catalog(repo[0]).resolve("latest", "postgresql", "pg1").backup_id == manifest.backup_id

    report = verify_backup(repo[0], manifest, age_key)
    assert report["ok"], report

    into = _new_name(source, "copy")
    result = _restore(source, repo, age_key, target_database=into)
    assert result["rows_ok"] and len(result["row_checks"]) == 4
    assert source.server.psql(FINGERPRINT, db=into) == source.psql(FINGERPRINT)
    source.server.drop_database(into)


def test_manifest_never_holds_secrets(
    source: PgDatabase, local_repo: tuple[Repository, RepositoryConfig], age_key: EncryptionConfig
) -> None:
    manifest = _backup(source, local_repo, age_key)
    raw = local_repo[0].get_bytes(manifest_key("postgresql", "pg1", manifest.backup_id)).decode()
    assert source.server.password not in raw
    assert age_key.identities[0].get_secret_value() not in raw
    assert age_key.recipients[0] in raw  # the public key is recorded


def test_selective_schema_only_and_data_only(
    source: PgDatabase, local_repo: tuple[Repository, RepositoryConfig], age_key: EncryptionConfig
) -> None:
    _backup(source, local_repo, age_key)
    into = _new_name(source, "sel")
    report = _restore(source, local_repo, age_key, target_database=into, tables=["odd; name"])
    assert [c["table"] for c in report["row_checks"]] == ["public.odd; name"]
    assert source.server.psql('SELECT count(*) FROM public."odd; name"', db=into) == "2"
    assert (
        source.server.psql("SELECT count(*) FROM pg_tables WHERE schemaname = 'sales'", db=into)
        == "0"
    )

    # the same table again: refused without drop_existing, replaced with it
    with pytest.raises(TargetNotEmpty, match="odd; name"):
        _restore(source, local_repo, age_key, target_database=into, tables=["public.odd; name"])
    source.server.psql("INSERT INTO public.\"odd; name\" VALUES (99, 'extra')", db=into)
    _restore(
        source,
        local_repo,
        age_key,
        target_database=into,
        tables=["public.odd; name"],
        drop_existing=True,
    )
    assert source.server.psql('SELECT count(*) FROM public."odd; name"', db=into) == "2"

    # a schema, schema-only: tables exist but are empty
    _restore(source, local_repo, age_key, target_database=into, schemas=["sales"], schema_only=True)
    assert source.server.psql("SELECT count(*) FROM sales.orders", db=into) == "0"
    # data-only into the empty tables, then again (rows present -> needs drop_existing)
    _restore(source, local_repo, age_key, target_database=into, schemas=["sales"], data_only=True)
    assert source.server.psql("SELECT count(*) FROM sales.orders", db=into) == "5000"
    with pytest.raises(TargetNotEmpty):
        _restore(
            source, local_repo, age_key, target_database=into, schemas=["sales"], data_only=True
        )
    report = _restore(
        source,
        local_repo,
        age_key,
        target_database=into,
        schemas=["sales"],
        data_only=True,
        drop_existing=True,
    )
    assert report["rows_ok"]
    assert source.server.psql("SELECT count(*) FROM sales.orders", db=into) == "5000"
    source.server.drop_database(into)


def test_existing_database_needs_drop_existing_and_is_replaced_atomically(
    source: PgDatabase, local_repo: tuple[Repository, RepositoryConfig], age_key: EncryptionConfig
) -> None:
    _backup(source, local_repo, age_key)
    source.psql("INSERT INTO sales.orders (customer_id, amount) VALUES (1, 1)")
    with pytest.raises(TargetNotEmpty, match="not empty"):
        _restore(source, local_repo, age_key)
    assert source.psql("SELECT count(*) FROM sales.orders") == "5001"  # untouched
    plan = _restore(source, local_repo, age_key, dry_run=True)
    assert plan["dry_run"] and "blocked" in plan and plan["raw_size"] > 0
    assert source.psql("SELECT count(*) FROM sales.orders") == "5001"
    report = _restore(source, local_repo, age_key, drop_existing=True)
    assert report["rows_ok"]
    assert source.psql("SELECT count(*) FROM sales.orders") == "5000"
    leftovers = source.server.psql("SELECT count(*) FROM pg_database WHERE datname LIKE 'sr\\_%'")
    assert leftovers == "0"


def test_tampered_artifact_is_detected_and_restore_changes_nothing(
    source: PgDatabase,
    local_repo: tuple[Repository, RepositoryConfig],
    age_key: EncryptionConfig,
) -> None:
    repo, _ = local_repo
    manifest = _backup(source, local_repo, age_key)
    dump = next(a for a in manifest.artifacts if a.content == "pg_dump-custom")
    path = repo.root / dump.key  # type: ignore[attr-defined]
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))

    report = verify_backup(repo, manifest, age_key)
    assert not report["ok"]
    failed = [a for a in report["artifacts"] if not a["ok"]]
    assert [a["artifact"] for a in failed] == [dump.name]

    into = _new_name(source, "tampered")
    with pytest.raises(IntegrityError, match=dump.name):
        _restore(source, local_repo, age_key, target_database=into)
    assert not _db_exists(source, into)
    leftovers = source.server.psql("SELECT count(*) FROM pg_database WHERE datname LIKE 'sr\\_%'")
    assert leftovers == "0"


def test_missing_artifact_and_wrong_key(
    source: PgDatabase,
    local_repo: tuple[Repository, RepositoryConfig],
    age_key: EncryptionConfig,
) -> None:
    from pyrage import x25519

    repo, _ = local_repo
    manifest = _backup(source, local_repo, age_key)
    other = x25519.Identity.generate()
    wrong = EncryptionConfig(recipients=[], identities=[SecretStr(str(other))])
    into = _new_name(source, "wrongkey")
    with pytest.raises(IntegrityError, match="wrong key"):
        _restore(source, local_repo, wrong, target_database=into)
    assert not _db_exists(source, into)

    dump = next(a for a in manifest.artifacts if a.content == "pg_dump-custom")
    repo.delete(dump.key)
    with pytest.raises(NotFound, match=dump.name):
        _restore(source, local_repo, age_key, target_database=into)
    assert not verify_backup(repo, manifest, age_key)["ok"]
    assert not _db_exists(source, into)


def test_bad_ids_and_hostile_names(
    source: PgDatabase,
    local_repo: tuple[Repository, RepositoryConfig],
    age_key: EncryptionConfig,
) -> None:
    manifest = _backup(source, local_repo, age_key)
    near = manifest.backup_id[:-1] + ("0" if manifest.backup_id[-1] != "0" else "1")
    with pytest.raises(NotFound, match=manifest.backup_id):
        _restore(source, local_repo, age_key, backup_id=near)
    for hostile in ("../../etc/passwd", "x\x00y", "20261124T000000Z-abc/../"):
        with pytest.raises(InvalidInput):
            _restore(source, local_repo, age_key, backup_id=hostile)
    with pytest.raises(NotFound, match="it holds"):
        _restore(source, local_repo, age_key, tables=['orders"; DROP TABLE sales.orders; --'])
    with pytest.raises(InvalidInput):
        _restore(source, local_repo, age_key, target_database="x" * 100)
    assert source.psql("SELECT count(*) FROM sales.orders") == "5000"


def test_unreachable_server_and_wrong_password(
    source: PgDatabase,
    local_repo: tuple[Repository, RepositoryConfig],
    age_key: EncryptionConfig,
) -> None:
    repo, config = local_repo
    closed = PostgresConnection(name="gone", port=free_port(), connect_timeout=2)
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable, match="unreachable after"):
        backup_postgres(closed, repo, config, age_key)
    assert time.monotonic() - started < 60  # bounded retries, not forever

    wrong = pg_connection(source).model_copy(
        update={"password": SecretStr("definitely-wrong-password")}
    )
    with pytest.raises(AccessDenied) as info:
        backup_postgres(wrong, repo, config, age_key)
    assert "definitely-wrong-password" not in str(info.value)
    assert list(repo.list("catalog/")) == []
    assert list(repo.list("data/")) == []


def test_unknown_database_lists_what_exists(
    source: PgDatabase,
    local_repo: tuple[Repository, RepositoryConfig],
    age_key: EncryptionConfig,
) -> None:
    conn = pg_connection(source).model_copy(update={"databases": ["nope"]})
    with pytest.raises(NotFound, match=source.name):
        backup_postgres(conn, local_repo[0], local_repo[1], age_key)


def test_directory_format_with_parallel_jobs(
    source: PgDatabase, local_repo: tuple[Repository, RepositoryConfig], age_key: EncryptionConfig
) -> None:
    """pg_dump -Fd -j 2 through a spool; restore with pg_restore -j 2 (whole) and selective."""
    repo, config = local_repo
    conn = pg_connection(source, dump_format="directory", jobs=2)
    manifest = backup_postgres(conn, repo, config, age_key)
    entry = manifest.details["databases"][0]
    assert entry["format"] == "directory" and len(entry["members"]) >= 5  # toc.dat + tables
    assert all(a.content == "pg_dump-directory-member" for a in manifest.artifacts[1:])
    assert verify_backup(repo, manifest, age_key)["ok"]

    into = _new_name(source, "dir")
    report = restore_postgres(conn, repo, age_key, PgRestoreRequest(target_database=into, jobs=2))
    assert report["rows_ok"] and report["format"] == "directory"
    assert source.server.psql(FINGERPRINT, db=into) == source.psql(FINGERPRINT)
    source.server.drop_database(into)
    report = restore_postgres(
        conn, repo, age_key, PgRestoreRequest(target_database=into, tables=["sales.customers"])
    )
    assert [c["table"] for c in report["row_checks"]] == ["sales.customers"]

    member = next(a for a in manifest.artifacts if a.name.endswith("toc.dat"))
    path = repo.root / member.key  # type: ignore[attr-defined]
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(IntegrityError, match=r"toc\.dat"):
        restore_postgres(
            conn,
            repo,
            age_key,
            PgRestoreRequest(target_database=into, tables=["sales.orders"]),
        )
    assert (
        source.server.psql("SELECT count(*) FROM pg_tables WHERE tablename = 'orders'", db=into)
        == "0"
    )
    source.server.drop_database(into)


def test_objects_are_locked_until_the_policys_retain_until(
    source: PgDatabase, age_key: EncryptionConfig, s3_server: Any, s3_locked_bucket: str
) -> None:
    """On an object-lock bucket every artifact AND the manifest get the retain-until the
    run computed from the retention policy (here: 7 years), not just retention_days."""
    import datetime as dt

    from strongroom.repository.s3 import S3Repository

    until = dt.datetime.now(dt.UTC) + dt.timedelta(days=7 * 365)
    config = signed_config(
        kind="s3",
        bucket=s3_locked_bucket,
        endpoint_url=s3_server.endpoint_url,
        access_key_id=s3_server.access_key,
        secret_access_key=SecretStr(s3_server.secret_key),
        lock_mode="COMPLIANCE",
        retention_days=1,
        retain_until=until,
    )
    manifest = backup_postgres(pg_connection(source), S3Repository(config), config, age_key)
    keys = [a.key for a in manifest.artifacts]
    keys.append(manifest_key("postgresql", "pg1", manifest.backup_id))
    for key in keys:
        head = s3_server.s3().head_object(Bucket=s3_locked_bucket, Key=key)
        assert head["ObjectLockMode"] == "COMPLIANCE"
        assert head["ObjectLockRetainUntilDate"] >= until - dt.timedelta(seconds=2)


def test_latest_logical_restore_skips_newer_base_backups(
    source: PgDatabase, local_repo: tuple[Repository, RepositoryConfig], age_key: EncryptionConfig
) -> None:
    """A base (PITR) backup of the same target is newer, but `latest` for a logical
    restore means the newest logical dump; naming the base backup is refused clearly."""
    import datetime as dt

    from strongroom.catalog import Manifest
    from strongroom.ids import new_backup_id

    repo, _ = local_repo
    logical = _backup(source, local_repo, age_key)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5)
    base = Manifest(
        backup_id=new_backup_id(later),
        engine="postgresql",
        target="pg1",
        kind="base",
        started_at=later,
        finished_at=later,
        repository=repo.describe(),
        artifacts=[],
    )
    Catalog(repo).write(base)
    assert Catalog(repo).resolve("latest", "postgresql", "pg1").backup_id == base.backup_id
    plan = _restore(source, local_repo, age_key, target_database="x_plan", dry_run=True)
    assert plan["backup_id"] == logical.backup_id
    with pytest.raises(InvalidInput, match="base backup"):
        _restore(source, local_repo, age_key, backup_id=base.backup_id, dry_run=True)
