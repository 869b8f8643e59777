"""Tampered artifacts and manifests are detected by verify and refused by restore, by name."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from strongroom.catalog import Catalog, Manifest, manifest_key
from strongroom.config import EncryptionConfig, RepositoryConfig
from strongroom.engines.postgres.backup import backup_postgres
from strongroom.engines.postgres.restore import PgRestoreRequest, restore_postgres
from strongroom.errors import IntegrityError, NotFound
from strongroom.repository.local import LocalRepository
from strongroom.verify import verify_backup
from tests.faults._support import databases
from tests.fixtures.postgres import PgDatabase
from tests.fixtures.strongroom_fixtures import TEST_SIGNER, pg_connection

POPULATE = """
CREATE TABLE items (id int PRIMARY KEY, val text);
INSERT INTO items SELECT g, md5(g::text) FROM generate_series(1, 20000) g;
CREATE TABLE notes (id int PRIMARY KEY, body text);
INSERT INTO notes VALUES (1, 'live row');
"""
STATE = "SELECT (SELECT count(*) FROM items) || ':' || (SELECT string_agg(body, ',') FROM notes)"


@pytest.fixture
def backed_up(
    pg_db: PgDatabase,
    local_repo: tuple[LocalRepository, RepositoryConfig],
    age_key: EncryptionConfig,
) -> tuple[PgDatabase, LocalRepository, Manifest]:
    pg_db.psql(POPULATE)
    repo, config = local_repo
    manifest = backup_postgres(pg_connection(pg_db), repo, config, age_key)
    report = verify_backup(repo, manifest, age_key)
    assert report["ok"] and report["manifest"]["sealed"] and not report["warnings"]
    # the live database moves on after the backup
    pg_db.psql("UPDATE notes SET body = 'changed after backup'")
    return pg_db, repo, manifest


def _writable(path: Path) -> Path:
    os.chmod(path, 0o644)
    return path


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    _writable(path).write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    _writable(path).write_bytes(data[: len(data) - 100])


def _dump_artifact(manifest: Manifest) -> str:
    return next(a.name for a in manifest.artifacts if a.content == "pg_dump-custom")


def _assert_refused(
    db: PgDatabase, repo: LocalRepository, manifest: Manifest, key: EncryptionConfig, name: str
) -> None:
    """verify names the artifact; restore (whole, in place, drop_existing) refuses it and
    leaves the live database exactly as it was."""
    fresh = Catalog(repo).resolve(manifest.backup_id)
    report = verify_backup(repo, fresh, key)
    assert not report["ok"]
    bad = [a for a in report["artifacts"] if not a["ok"] and a["artifact"] != "manifest"]
    assert [a["artifact"] for a in bad] == [name]
    assert name in bad[0]["error"]

    state, dbs = db.psql(STATE), databases(db.server)
    with pytest.raises(IntegrityError) as caught:
        restore_postgres(
            pg_connection(db),
            repo,
            key,
            PgRestoreRequest(backup_id=manifest.backup_id, drop_existing=True),
        )
    assert name in str(caught.value)
    assert db.psql(STATE) == state == "20000:changed after backup"
    assert databases(db.server) == dbs  # the scratch database was removed


@pytest.mark.parametrize("damage", [_flip_byte, _truncate], ids=["flipped-byte", "truncated"])
def test_damaged_artifact_is_detected_and_refused(
    backed_up: tuple[PgDatabase, LocalRepository, Manifest],
    age_key: EncryptionConfig,
    damage: Callable[[Path], None],
) -> None:
    db, repo, manifest = backed_up
    name = _dump_artifact(manifest)
    damage(repo.root / manifest.artifact(name).key)
    _assert_refused(db, repo, manifest, age_key, name)


def _edit_manifest(
    repo: LocalRepository, manifest: Manifest, edit: Callable[[dict[str, Any]], None]
) -> None:
    """Edit a stored manifest and re-sign it with the trusted key: a tool holding the
    runner's signing key that does not re-seal. The seal (this file's subject) is then
    what catches the edit; an edit that is not re-signed is refused earlier, by the
    signature (tests/test_signing.py, tests/test_seal.py)."""
    path = repo.root / manifest_key(manifest.engine, manifest.target, manifest.backup_id)
    data = json.loads(path.read_bytes())
    edit(data)
    body = json.dumps(data).encode()
    _writable(path).write_bytes(body)
    _writable(Path(f"{path}.sig")).write_bytes(TEST_SIGNER.sign(body))


def test_manifest_checksum_edited_is_detected_and_refused(
    backed_up: tuple[PgDatabase, LocalRepository, Manifest], age_key: EncryptionConfig
) -> None:
    db, repo, manifest = backed_up
    name = _dump_artifact(manifest)

    def edit(data: dict[str, Any]) -> None:
        for artifact in data["artifacts"]:
            if artifact["name"] == name:
                artifact["stored_sha256"] = "0" * 64

    _edit_manifest(repo, manifest, edit)
    _assert_refused(db, repo, manifest, age_key, name)
    # the seal names the manifest and the edited artifact too
    report = verify_backup(repo, Catalog(repo).resolve(manifest.backup_id), age_key)
    assert report["artifacts"][0]["artifact"] == "manifest"
    assert "does not match its seal" in report["artifacts"][0]["error"]
    assert name in report["artifacts"][0]["error"]


def _bump_rows(data: dict[str, Any]) -> None:
    for table in data["details"]["databases"][0]["tables"]:
        if table["name"] == "items":
            table["rows"] += 1


def test_manifest_row_count_edited_is_refused_by_restore(
    backed_up: tuple[PgDatabase, LocalRepository, Manifest], age_key: EncryptionConfig
) -> None:
    db, repo, manifest = backed_up
    _edit_manifest(repo, manifest, _bump_rows)
    state, dbs = db.psql(STATE), databases(db.server)
    with pytest.raises(IntegrityError) as caught:
        restore_postgres(
            pg_connection(db),
            repo,
            age_key,
            PgRestoreRequest(backup_id=manifest.backup_id, drop_existing=True),
        )
    # refused by the seal before anything is loaded, naming the manifest and the field
    key = manifest_key(manifest.engine, manifest.target, manifest.backup_id)
    assert key in str(caught.value) and "details" in str(caught.value)
    assert db.psql(STATE) == state
    assert databases(db.server) == dbs


def test_manifest_row_count_edited_is_detected_by_verify(
    backed_up: tuple[PgDatabase, LocalRepository, Manifest], age_key: EncryptionConfig
) -> None:
    """A hand-edited row count must not pass verify (the promise is: tampering is detected)."""
    _db, repo, manifest = backed_up
    _edit_manifest(repo, manifest, _bump_rows)
    report = verify_backup(repo, Catalog(repo).resolve(manifest.backup_id), age_key)
    assert not report["ok"], "verify accepted a manifest whose row count was edited by hand"
    key = manifest_key(manifest.engine, manifest.target, manifest.backup_id)
    assert report["manifest"]["sealed"] and not report["manifest"]["ok"]
    first = report["artifacts"][0]
    assert first["artifact"] == "manifest" and not first["ok"]
    assert key in first["error"] and "details" in first["error"]
    # the artifacts themselves are intact and still reported ok
    assert all(a["ok"] for a in report["artifacts"][1:])


def _drop_table(data: dict[str, Any]) -> None:
    tables = data["details"]["databases"][0]["tables"]
    data["details"]["databases"][0]["tables"] = [t for t in tables if t["name"] != "notes"]


def _set(path: tuple[str, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        node = data
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value

    return edit


def _first_artifact(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        data["artifacts"][0][field] = value

    return edit


EDITS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "table-list": (_drop_table, "details"),
    "finished_at": (_set(("finished_at",), "2020-01-01T00:00:00Z"), "finished_at"),
    "labels": (_set(("labels",), {"keep": "forever"}), "labels"),
    "kind": (_set(("kind",), "base"), "kind"),
    "server": (_set(("server",), {"version": "99"}), "server"),
    "raw_size": (_first_artifact("raw_size", 1), "artifacts"),
    "recipients": (_first_artifact("recipients", []), "artifacts"),
    "added-field": (_set(("comment",), "harmless?"), "added comment"),
    "format-downgrade": (_set(("format_version",), 1), "format_version"),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_any_manifest_field_edited_is_detected_by_verify(
    backed_up: tuple[PgDatabase, LocalRepository, Manifest],
    age_key: EncryptionConfig,
    edit: str,
) -> None:
    """Any edit to a sealed manifest fails verify, naming the manifest and what changed."""
    _db, repo, manifest = backed_up
    change, named = EDITS[edit]
    _edit_manifest(repo, manifest, change)
    report = verify_backup(repo, Catalog(repo).resolve(manifest.backup_id), age_key)
    assert not report["ok"]
    first = report["artifacts"][0]
    assert first["artifact"] == "manifest"
    assert manifest_key(manifest.engine, manifest.target, manifest.backup_id) in first["error"]
    assert named in first["error"]


def test_table_list_edited_is_refused_by_restore(
    backed_up: tuple[PgDatabase, LocalRepository, Manifest], age_key: EncryptionConfig
) -> None:
    """A table dropped from the manifest's list (a restore would silently skip it) is refused."""
    db, repo, manifest = backed_up
    _edit_manifest(repo, manifest, _drop_table)
    state, dbs = db.psql(STATE), databases(db.server)
    with pytest.raises(IntegrityError, match="does not match its seal"):
        restore_postgres(
            pg_connection(db),
            repo,
            age_key,
            PgRestoreRequest(backup_id=manifest.backup_id, drop_existing=True),
        )
    assert db.psql(STATE) == state
    assert databases(db.server) == dbs


def test_stripped_seal_is_refused_and_unsealed_old_manifest_warns(
    backed_up: tuple[PgDatabase, LocalRepository, Manifest], age_key: EncryptionConfig
) -> None:
    """Removing the seal of a sealed-format manifest is an error; a format-1 manifest
    without a seal (written before sealing existed) verifies with an "unsealed" warning."""
    db, repo, manifest = backed_up
    key = manifest_key(manifest.engine, manifest.target, manifest.backup_id)

    def strip(data: dict[str, Any]) -> None:
        del data["seal"]

    _edit_manifest(repo, manifest, strip)
    report = verify_backup(repo, Catalog(repo).resolve(manifest.backup_id), age_key)
    assert not report["ok"] and "lost its seal" in report["artifacts"][0]["error"]
    with pytest.raises(IntegrityError, match="lost its seal"):
        restore_postgres(
            pg_connection(db),
            repo,
            age_key,
            PgRestoreRequest(backup_id=manifest.backup_id, drop_existing=True, dry_run=False),
        )

    _edit_manifest(repo, manifest, _set(("format_version",), 1))
    report = verify_backup(repo, Catalog(repo).resolve(manifest.backup_id), age_key)
    assert report["ok"] and not report["manifest"]["sealed"]
    assert report["warnings"] and "unsealed manifest" in report["warnings"][0]
    assert key in report["warnings"][0]


def test_missing_artifact_is_detected_and_refused(
    backed_up: tuple[PgDatabase, LocalRepository, Manifest], age_key: EncryptionConfig
) -> None:
    db, repo, manifest = backed_up
    name = _dump_artifact(manifest)
    (repo.root / manifest.artifact(name).key).unlink()
    report = verify_backup(repo, Catalog(repo).resolve(manifest.backup_id), age_key)
    bad = [a for a in report["artifacts"] if not a["ok"]]
    assert not report["ok"] and [a["artifact"] for a in bad] == [name]
    assert name in bad[0]["error"]
    state, dbs = db.psql(STATE), databases(db.server)
    with pytest.raises(NotFound) as caught:
        restore_postgres(
            pg_connection(db),
            repo,
            age_key,
            PgRestoreRequest(backup_id=manifest.backup_id, drop_existing=True),
        )
    assert name in str(caught.value)
    assert db.psql(STATE) == state
    assert databases(db.server) == dbs


def test_wrong_key_is_detected_and_refused(
    backed_up: tuple[PgDatabase, LocalRepository, Manifest],
) -> None:
    from pydantic import SecretStr
    from pyrage import x25519

    db, repo, manifest = backed_up
    other = x25519.Identity.generate()
    wrong = EncryptionConfig(
        recipients=[str(other.to_public())], identities=[SecretStr(str(other))]
    )
    report = verify_backup(repo, manifest, wrong)
    assert not report["ok"]
    assert all(
        "wrong key" in a["error"] and a["artifact"] in a["error"] for a in report["artifacts"]
    )
    state, dbs = db.psql(STATE), databases(db.server)
    with pytest.raises(IntegrityError) as caught:
        restore_postgres(
            pg_connection(db),
            repo,
            wrong,
            PgRestoreRequest(backup_id=manifest.backup_id, drop_existing=True),
        )
    assert "wrong key" in str(caught.value)
    assert db.psql(STATE) == state
    assert databases(db.server) == dbs
