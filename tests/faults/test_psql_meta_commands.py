"""A backup's plain SQL never runs psql meta-commands (issue 15 item 4).

A globals.sql holding ``\\!`` (shell), at a line start or hidden after a statement on the
same line, is refused by a drill that restores globals, and the shell command never runs:
the line scan refuses the first, psql's restricted mode (behind a key generated per run)
refuses the second. Both on the real PostgreSQL server, with a properly published backup
(the attacker here controls the backup's content, not the checks).
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from strongroom.artifacts import publish_backup, store_artifact
from strongroom.catalog import Catalog, data_key
from strongroom.config import EncryptionConfig, RepositoryConfig
from strongroom.drills import DrillFailed, run_drill
from strongroom.drills.postgres import PostgresDrill
from strongroom.engines.postgres.backup import backup_postgres
from strongroom.engines.postgres.sql_guard import (
    check_no_meta_commands,
    new_restrict_key,
    restricted_lines,
)
from strongroom.errors import IntegrityError
from strongroom.ids import new_backup_id
from strongroom.repository.local import LocalRepository
from tests.fixtures.postgres import PgDatabase
from tests.fixtures.strongroom_fixtures import pg_connection

Repo = tuple[LocalRepository, RepositoryConfig]


def _forged_globals_backup(
    repo: LocalRepository, config: RepositoryConfig, db: PgDatabase, key: EncryptionConfig, sql: str
) -> str:
    """A real backup of ``db`` republished under a new id with ``sql`` as its globals."""
    db.psql("CREATE TABLE IF NOT EXISTS t (x int); INSERT INTO t VALUES (1), (2);")
    conn = pg_connection(db, name="metadb")
    real = backup_postgres(conn, repo, config, key, include_globals=True)
    bid = new_backup_id()
    forged = store_artifact(
        repo,
        data_key("postgresql", conn.name, bid, "globals.sql"),
        io.BytesIO(sql.encode()),
        name="globals.sql",
        content="sql",
        encryption=key,
        level=3,
    )
    others = [a for a in real.artifacts if a.name != "globals.sql"]
    manifest = real.model_copy(update={"backup_id": bid, "artifacts": [forged, *others]})
    publish_backup(repo, manifest)
    return bid


@pytest.mark.parametrize(
    "where", ["line-start", "mid-line"], ids=["meta-command-line", "after-a-statement"]
)
def test_drill_refuses_globals_with_shell_commands(
    where: str, pg_db: PgDatabase, local_repo: Repo, age_key: EncryptionConfig, tmp_path: Path
) -> None:
    repo, config = local_repo
    marker = tmp_path / "pwned"
    shell = f"\\! touch {marker}"
    line = shell if where == "line-start" else f"SELECT 1; {shell}"
    sql = f"SET client_encoding = 'UTF8';\n{line}\nSELECT 2;\n"
    bid = _forged_globals_backup(repo, config, pg_db, age_key, sql)
    manifest = Catalog(repo).load("postgresql", "metadb", bid)
    adapter = PostgresDrill(
        pg_connection(pg_db, name="metadb"), repo, age_key, restore_globals=True
    )
    with pytest.raises(DrillFailed) as failed:
        run_drill(adapter, repo, target="metadb", backup_id=manifest.backup_id)
    assert "meta-command" in str(failed.value.record["failures"])
    assert not marker.exists()
    assert failed.value.record["cleanup"]["ok"]


def test_dump_restrict_lines_are_replaced_by_ours(tmp_path: Path) -> None:
    path = tmp_path / "globals.sql"
    path.write_bytes(b"\\restrict abc123\nCREATE ROLE x;\n\\unrestrict abc123\n")
    check_no_meta_commands(path, "globals.sql")  # the dump's own pair is allowed
    key = new_restrict_key()
    assert list(restricted_lines(path, key)) == [
        f"\\restrict {key}\n".encode(),
        b"CREATE ROLE x;\n",
    ]
    assert len(key) == 64 and key != new_restrict_key()
    path.write_bytes(b"CREATE ROLE x;\n  \\copy t to '/tmp/x'\n")
    with pytest.raises(IntegrityError, match=r"'\\\\copy' on line 2"):
        check_no_meta_commands(path, "globals.sql")
