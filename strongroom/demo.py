"""``make demo``: the whole loop on embedded defaults, end to end.

Starts a throwaway PostgreSQL with a few hundred MB of realistic sample data,
keeps the repository in a local folder and Prefect's state in
``.strongroom-demo/``, then backs up through the Prefect flows, lists,
verifies, restores into a new database and prints what happened: sizes,
throughput and the row-count comparison. Servers it started are stopped.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

DEMO_DIR = Path(os.environ.get("STRONGROOM_DEMO_DIR", ".strongroom-demo")).resolve()
SAMPLE_MB = int(os.environ.get("STRONGROOM_DEMO_MB", "300"))


def _prefect_env() -> None:
    os.environ.setdefault("PREFECT_HOME", str(DEMO_DIR / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.pop("PREFECT_API_URL", None)  # Prefect's local (ephemeral) API


def _mb(n: float) -> str:
    return f"{n / 1024 / 1024:,.1f} MiB"


def main() -> int:
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    _prefect_env()
    import psycopg
    from pydantic import SecretStr
    from pyrage import x25519
    from rich.console import Console
    from rich.table import Table

    from strongroom.catalog import Catalog
    from strongroom.repository.local import LocalRepository
    from strongroom.sample_data import load_sample_data
    from strongroom.sandbox.postgres import PostgresServer

    console = Console()
    console.rule("[bold]strongroom demo")
    t0 = time.monotonic()
    with PostgresServer() as pg:
        console.print(f"PostgreSQL 15 started on 127.0.0.1:{pg.port} (throwaway)")
        pg.create_database("shop")
        with psycopg.connect(pg.dsn("shop"), autocommit=True) as conn:
            counts = load_sample_data(conn, SAMPLE_MB)
            size = conn.execute("SELECT pg_database_size('shop')").fetchone()
        console.print(
            f"sample data: {sum(counts.values()):,} rows in {len(counts)} tables, "
            f"database {_mb(size[0] if size else 0)}"
        )

        from blocks import BackupRepository, EncryptionKey, PostgresTarget, register_all
        from flows.postgres import backup_postgresql, restore_postgresql
        from flows.verify import verify_backup_flow

        register_all()
        repo_path = DEMO_DIR / "repository"
        identity = x25519.Identity.generate()
        EncryptionKey(
            recipients=[str(identity.to_public())], identity=SecretStr(str(identity))
        ).save("default", overwrite=True)
        (DEMO_DIR / "age-identity.txt").write_text(str(identity) + "\n")
        os.chmod(DEMO_DIR / "age-identity.txt", 0o600)
        BackupRepository(local_path=str(repo_path)).save("default", overwrite=True)
        PostgresTarget(
            host=pg.host,
            port=pg.port,
            user=pg.superuser,
            password=SecretStr(pg.password),
            databases=["shop"],
        ).save("demo-pg", overwrite=True)
        console.print(f"blocks saved; repository {repo_path}")

        console.rule("backup (flow backup-postgresql)")
        t = time.monotonic()
        manifest = backup_postgresql(target="demo-pg")
        backup_s = time.monotonic() - t
        raw = sum(a["raw_size"] for a in manifest["artifacts"])
        stored = sum(a["stored_size"] for a in manifest["artifacts"])

        console.rule("list")
        listing = Table("backup id", "target", "dump", "stored")
        for m in Catalog(LocalRepository(repo_path)).list("postgresql", "demo-pg"):
            listing.add_row(m.backup_id, m.target, _mb(m.raw_size), _mb(m.stored_size))
        console.print(listing)

        console.rule("verify (flow verify-backup)")
        t = time.monotonic()
        verify = verify_backup_flow(backup_id=manifest["backup_id"])
        verify_s = time.monotonic() - t

        console.rule("restore into shop_restored (flow restore-postgresql)")
        t = time.monotonic()
        report: dict[str, Any] = restore_postgresql(
            target="demo-pg", backup_id=manifest["backup_id"], target_database="shop_restored"
        )
        restore_s = time.monotonic() - t

        checks = Table("table", "rows in backup", "rows restored", "match")
        for c in report["row_checks"]:
            checks.add_row(
                c["table"],
                f"{c['expected']:,}",
                f"{c['actual']:,}",
                "[green]yes[/green]" if c["ok"] else "[red]NO[/red]",
            )
        console.print(checks)

        summary = Table("step", "seconds", "figures", title="strongroom demo summary")
        summary.add_row(
            "backup",
            f"{backup_s:.1f}",
            f"dump {_mb(raw)} -> stored {_mb(stored)} "
            f"({stored / max(raw, 1):.0%}), {raw / 1024 / 1024 / backup_s:,.0f} MiB/s",
        )
        summary.add_row(
            "verify", f"{verify_s:.1f}", f"{len(verify['artifacts'])} artifacts, ok={verify['ok']}"
        )
        summary.add_row("restore", f"{restore_s:.1f}", f"rows match manifest: {report['rows_ok']}")
        console.print(summary)
        console.print(
            f"backup id {manifest['backup_id']}; repository {repo_path}; "
            f"age identity {DEMO_DIR / 'age-identity.txt'}"
        )
    console.print(f"done in {time.monotonic() - t0:.0f} s; throwaway servers stopped")
    return 0 if report["rows_ok"] and verify["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
