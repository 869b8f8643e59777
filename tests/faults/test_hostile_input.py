"""Hostile input (property-based): every bad id or name is refused clearly and changes nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from strongroom.catalog import Catalog, Manifest
from strongroom.config import EncryptionConfig, RepositoryConfig
from strongroom.engines.postgres import backup_postgres
from strongroom.engines.postgres_restore import PgRestoreRequest, restore_postgres
from strongroom.errors import InvalidInput, NotFound
from strongroom.ids import BACKUP_ID_RE, NAME_RE, check_backup_id, check_name
from strongroom.repository.local import LocalRepository
from tests.faults._support import databases
from tests.fixtures.postgres import PgDatabase
from tests.fixtures.strongroom_fixtures import pg_connection

KNOWN = [
    "../../etc/passwd",
    "/etc/passwd",
    "..",
    "../",
    "a/../../b",
    "20261124T020000Z-1a2b3c/../../x",
    "20261124T020000Z-1a2b3c\x00",
    "x\x00y",
    "\x00",
    "A" * 5000,
    "é" * 40,
    "'; DROP TABLE items; --",
    'x"; DROP DATABASE postgres; --',
    "items; DROP TABLE items",
    "public.items; TRUNCATE public.items",
    "latest/../..",
    "..\\..\\windows",
    "%2e%2e%2f",
    "",
    " ",
    "-rf",
    "$(touch /tmp/pwned)",
    "`id`",
    "catalog/postgresql/pg1",
]
PREFIXES = st.sampled_from(["../", "/", "\x00", "'", '"', ";", "..", "-", "\\", "$("])
HOSTILE = st.one_of(
    st.sampled_from(KNOWN),
    st.text(max_size=300),
    st.builds(lambda a, b: a + b, PREFIXES, st.text(max_size=60)),
    st.builds(lambda a, b: a + b, st.text(max_size=60), PREFIXES),
)
SLOW_SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TABLES = """
CREATE TABLE items (id int PRIMARY KEY, val text);
INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 50) g;
"""
STATE = "SELECT count(*) || ':' || md5(string_agg(val, ',' ORDER BY id)) FROM items"


@pytest.fixture
def world(
    pg_db: PgDatabase,
    local_repo: tuple[LocalRepository, RepositoryConfig],
    age_key: EncryptionConfig,
) -> tuple[PgDatabase, LocalRepository, Manifest]:
    pg_db.psql(TABLES)
    repo, config = local_repo
    manifest = backup_postgres(pg_connection(pg_db), repo, config, age_key)
    return pg_db, repo, manifest


def _tree(root: Path) -> list[tuple[str, int, float]]:
    found = []
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            st_ = path.stat()
            found.append((str(path.relative_to(root)), st_.st_size, st_.st_mtime))
    return sorted(found)


def _snapshot(db: PgDatabase, repo: LocalRepository) -> Any:
    return _tree(repo.root), databases(db.server), db.psql(STATE)


@settings(max_examples=300, deadline=None)
@given(HOSTILE)
def test_id_and_name_checks_accept_only_safe_values(value: str) -> None:
    try:
        check_backup_id(value)
    except InvalidInput as exc:
        assert "\x00" not in str(exc) or "\\x00" in str(exc)
        assert len(str(exc)) < 400  # long input is shortened in the message
    else:
        assert BACKUP_ID_RE.fullmatch(value)
    try:
        check_name(value, "target name")
    except InvalidInput:
        pass
    else:
        assert NAME_RE.fullmatch(value) and ".." not in value and "/" not in value


@SLOW_SETTINGS
@given(value=HOSTILE, where=st.sampled_from(["backup_id", "target"]))
def test_catalog_resolve_refuses_hostile_ids(
    world: tuple[PgDatabase, LocalRepository, Manifest], value: str, where: str
) -> None:
    _db, repo, manifest = world
    assume(value not in ("latest", manifest.backup_id, manifest.target))
    # an empty target means "no filter" (same as not giving one), not a name
    assume(where == "backup_id" or value != "")
    before = _tree(repo.root)
    with pytest.raises((InvalidInput, NotFound)):
        if where == "backup_id":
            Catalog(repo).resolve(value)
        else:
            Catalog(repo).resolve("latest", "postgresql", value)
    assert _tree(repo.root) == before


@SLOW_SETTINGS
@given(
    value=HOSTILE,
    field=st.sampled_from(["backup_id", "source_target", "database", "tables", "schemas"]),
)
def test_restore_refuses_hostile_request_and_changes_nothing(
    world: tuple[PgDatabase, LocalRepository, Manifest],
    age_key: EncryptionConfig,
    value: str,
    field: str,
) -> None:
    """A real (not dry-run) restore with drop_existing: validation must stop it first."""
    db, repo, manifest = world
    assume(value not in ("latest", manifest.backup_id, "pg1", db.name, "items", "public"))
    assume(value.split(".")[-1] != "items")
    assume(field != "source_target" or value != "")  # empty means "the restore target"
    before = _snapshot(db, repo)
    fields: dict[str, Any] = {"backup_id": manifest.backup_id, "drop_existing": True}
    fields[field] = [value] if field in ("tables", "schemas") else value
    req = PgRestoreRequest(**fields)
    with pytest.raises((InvalidInput, NotFound)):
        restore_postgres(pg_connection(db), repo, age_key, req)
    assert _snapshot(db, repo) == before


@SLOW_SETTINGS
@given(value=HOSTILE)
def test_restore_hostile_target_database_is_validated_or_quoted(
    world: tuple[PgDatabase, LocalRepository, Manifest],
    age_key: EncryptionConfig,
    value: str,
) -> None:
    """SQL in a target database name is either refused or treated as a plain name (dry run)."""
    db, repo, manifest = world
    before = _snapshot(db, repo)
    req = PgRestoreRequest(backup_id=manifest.backup_id, target_database=value, dry_run=True)
    try:
        plan = restore_postgres(pg_connection(db), repo, age_key, req)
    except InvalidInput:
        assert not value or "\x00" in value or len(value.encode()) > 63
    else:
        # an empty name means "the source database's name"
        assert plan["dry_run"] and plan["target_database"] == (value or db.name)
    assert _snapshot(db, repo) == before


@SLOW_SETTINGS
@given(value=HOSTILE, command=st.sampled_from(["show", "list-target"]))
def test_cli_refuses_hostile_ids_with_exit_codes(
    world: tuple[PgDatabase, LocalRepository, Manifest],
    monkeypatch: pytest.MonkeyPatch,
    value: str,
    command: str,
) -> None:
    from typer.testing import CliRunner

    import strongroom.cli as cli

    _db, repo, manifest = world
    assume(value not in ("latest", manifest.backup_id, manifest.target))
    assume(command == "show" or value != "")  # --target "" means no filter
    monkeypatch.setattr(cli, "_open_repo", lambda _name: repo)
    before = _tree(repo.root)
    if command == "show":
        args = ["show", "--json", "--", value]
    else:
        args = ["list", "--engine", "postgresql", "--target", value, "--json"]
    result = CliRunner().invoke(cli.app, args)
    if command != "show" and NAME_RE.fullmatch(value) and ".." not in value:
        # a well-formed name of a target without backups: an empty list, nothing else
        assert result.exit_code == 0 and json.loads(result.stdout) == [], result.output
        return
    assert result.exit_code in (2, 3), (result.exit_code, result.output[-500:])
    assert "Traceback" not in result.output
    if result.stdout.strip().startswith("{"):
        body = json.loads(result.stdout)
        assert body["ok"] is False and body["kind"] in ("InvalidInput", "NotFound")
    assert _tree(repo.root) == before
