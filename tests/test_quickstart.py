"""The README's "Back up your own database" quickstart, run as written: the commands are
read from the README's first fenced block under that heading (not a copy of them) and run
by bash one by one, with only the documented placeholders ($PGHOST, $PGPORT, $PGUSER,
$PGPASSWORD, $PGDATABASE) set to the test PostgreSQL server and PREFECT_API_URL to the
session's Prefect API. Each must exit 0, and the restored database must hold the data."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.fixtures.postgres import PgDatabase

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Back up your own database"


def quickstart_commands(readme: str) -> list[str]:
    """The command lines of the first ```bash block after the quickstart heading."""
    after = readme.split(HEADING, 1)[1]
    match = re.search(r"^```bash\n(.*?)^```", after, re.S | re.M)
    assert match, f"no ```bash block under {HEADING!r}"
    lines = [line.strip() for line in match.group(1).splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _delete_blocks(names: list[tuple[str, str]]) -> None:
    """A fresh Prefect API has none of the quickstart's blocks: remove those an earlier
    test module of this session may have saved under the same names."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for slug, name in names:
            try:
                doc = client.read_block_document_by_name(name, block_type_slug=slug)
            except ObjectNotFound:  # not there: nothing to remove
                continue
            client.delete_block_document(doc.id)


def test_readme_quickstart_runs_as_written(
    prefect_api: str, pg_db: PgDatabase, tmp_path: Path
) -> None:
    commands = quickstart_commands((ROOT / "README.md").read_text())
    assert 1 <= len(commands) <= 6, commands
    assert all(c.startswith("strongroom ") for c in commands), commands
    server = pg_db.server
    pg_db.psql(
        "CREATE TABLE orders (id int PRIMARY KEY, note text);"
        "INSERT INTO orders SELECT g, 'order ' || g FROM generate_series(1, 200) g;"
    )
    _delete_blocks(
        [
            ("strongroom-postgres-target", "mydb"),
            ("strongroom-repository", "default"),
            ("strongroom-encryption-key", "default"),
            ("strongroom-signing-key", "default-signing"),
        ]
    )
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PGHOST": server.host,
        "PGPORT": str(server.port),
        "PGUSER": server.superuser,
        "PGPASSWORD": server.password,
        "PGDATABASE": pg_db.name,
        "PREFECT_API_URL": prefect_api,
        "COLUMNS": "200",
    }
    restored = f"{pg_db.name}_restored"
    try:
        for command in commands:
            done = subprocess.run(
                ["bash", "-c", command],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            output = done.stdout + done.stderr
            assert done.returncode == 0, f"{command}\n{output}"
            assert server.password not in output, command
        got = server.psql("SELECT count(*), sum(id) FROM orders", db=restored).split("|")
        assert got == ["200", str(sum(range(1, 201)))], got
        notes = server.psql("SELECT note FROM orders WHERE id = 7", db=restored).strip()
        assert notes == "order 7"
    finally:
        server.psql(f'DROP DATABASE IF EXISTS "{restored}"')
