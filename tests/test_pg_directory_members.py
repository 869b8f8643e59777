"""Directory-format restores take member names from the manifest: hostile until checked.

A forged manifest naming a member ``../x``, an absolute path or a nested path must be
refused before any file is opened, so nothing outside the spool folder is written.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from strongroom.config import EncryptionConfig, RepositoryConfig
from strongroom.engines.postgres.backup import backup_postgres
from strongroom.engines.postgres.restore import _spool_directory_dump
from strongroom.errors import IntegrityError
from strongroom.repository import Repository
from tests.fixtures.postgres import PgDatabase
from tests.fixtures.strongroom_fixtures import pg_connection


@pytest.mark.parametrize(
    "forged",
    ["../../escaped.dat", "/tmp/strongroom-escaped.dat", "sub/1234.dat", "..", "", "a\x00b"],
)
def test_forged_member_names_are_refused_before_any_open(
    pg_db: PgDatabase,
    local_repo: tuple[Repository, RepositoryConfig],
    age_key: EncryptionConfig,
    tmp_path: Path,
    forged: str,
) -> None:
    pg_db.psql("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 100)")
    repo, config = local_repo
    manifest = backup_postgres(pg_connection(pg_db, dump_format="directory"), repo, config, age_key)
    entry = manifest.details["databases"][0]
    last = manifest.artifacts[-1]
    forged_artifact = last.model_copy(update={"meta": {**last.meta, "member": forged}})
    forged_manifest = manifest.model_copy(
        update={"artifacts": [*manifest.artifacts[:-1], forged_artifact]}
    )
    spool = tmp_path / "spool"
    spool.mkdir()
    with pytest.raises(IntegrityError, match="member"):
        _spool_directory_dump(repo, forged_manifest, entry, age_key, spool, None)
    # refused before any member was fetched: not even the honest ones were written
    assert [p.name for p in (spool / "dump").iterdir()] == []
    assert not (tmp_path / "escaped.dat").exists()
    assert not Path("/tmp/strongroom-escaped.dat").exists()
