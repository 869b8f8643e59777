"""``make demo GAUNTLET=1``: the demo's PostgreSQL step on the gauntlet dataset.

``python -m strongroom.demo --gauntlet`` runs the main demo with this step in place
of the sample shop database: a throwaway PostgreSQL 15 server filled by
``strongroom.sandbox.gauntlet_pg`` (generated on the spot, ~350 MB: two-level
partitioning, inheritance, a 6.4 MB large object, matviews, hostile and non-ASCII
names, a 200+ MB table in the middle of the dump), then backup, verify and a
selective restore through the Prefect flows, and a content fingerprint of what was
restored against the source (order-independent row hashes, not counts). Sizes and
times are printed. The rest of the demo (ClickHouse, Redis, drills, deep verify, the
compliance audit) runs unchanged and includes this backup.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from strongroom.demo import Demo

GAUNTLET_MB = int(os.environ.get("STRONGROOM_DEMO_GAUNTLET_MB", "350"))
TARGET = "demo-pg-gauntlet"
RESTORED = "gauntlet_selected"


def _mb(n: float) -> str:
    return f"{n / 1024 / 1024:,.1f} MiB"


def _selection() -> list[tuple[str, str]]:
    """What the selective restore asks for: the partitioned parent (it brings its
    partitions), the big table in the middle of the dump, the table with quotes, ';'
    and '--' in its schema and name, and the last table of the dump."""
    from strongroom.sandbox import gauntlet_pg as g

    return [g.PARTITIONED, g.BIG, (g.HOSTILE_SCHEMA, g.HOSTILE_TABLE), g.LAST]


def _print_shape(demo: Demo, prints: dict[str, Any], size: int, load_s: float) -> None:
    rels = prints["relations"]
    kinds: dict[str, int] = {}
    for value in rels.values():
        kinds[value["relkind"]] = kinds.get(value["relkind"], 0) + 1
    biggest = max((lo[2] for lo in prints["large_objects"]), default=0)
    demo.console.print(
        f"gauntlet: database {_mb(size)} generated in {load_s:.1f} s; "
        f"{len(rels)} relations in {len({k.split('.', 1)[0] for k in rels})} schemas "
        f"({kinds.get('r', 0)} tables, {kinds.get('p', 0)} partitioned, "
        f"{kinds.get('m', 0)} matviews, {kinds.get('f', 0)} foreign); "
        f"{len(prints['large_objects'])} large objects (largest {_mb(biggest)}), "
        f"{len(prints['sequences'])} sequences, {len(prints['triggers'])} triggers"
    )


def postgres_gauntlet(demo: Demo) -> tuple[str, str]:
    """Load the gauntlet, back it up, verify, restore a selection, compare fingerprints."""
    import psycopg
    from pydantic import SecretStr
    from rich.markup import escape
    from rich.table import Table

    from blocks import PostgresTarget
    from flows.postgres import backup_postgresql, restore_postgresql
    from flows.verify import verify_backup_flow
    from strongroom.catalog import artifact_totals
    from strongroom.sandbox import gauntlet_pg as g
    from strongroom.sandbox.postgres import PostgresServer

    pg = demo.stack.enter_context(PostgresServer())
    pg.create_database("gauntlet")
    demo.console.rule(f"postgresql: generating the gauntlet (~{GAUNTLET_MB} MB)")
    info = g.load_gauntlet(pg.dsn("gauntlet"), size_mb=GAUNTLET_MB, role_suffix="demo")
    started = time.monotonic()
    source = g.fingerprint(pg.dsn("gauntlet"))
    fingerprint_s = time.monotonic() - started
    _print_shape(demo, source, info.size_bytes, info.load_seconds)
    demo.console.print(f"source fingerprint (every row of every relation) in {fingerprint_s:.1f} s")
    PostgresTarget(
        host=pg.host,
        port=pg.port,
        user=pg.superuser,
        password=SecretStr(pg.password),
        databases=["gauntlet"],
        rpo_hours=24,
        rto_minutes=30,
    ).save(TARGET, overwrite=True)

    manifest = demo.timed(
        "postgresql", "backup (gauntlet)", lambda: backup_postgresql(target=TARGET)
    )
    raw, stored = artifact_totals(manifest)
    demo.row(
        "postgresql",
        "backup (gauntlet)",
        f"database {_mb(info.size_bytes)}, dump {_mb(raw)} -> stored {_mb(stored)} "
        f"({stored / max(raw, 1):.0%}), {raw / 1024 / 1024 / max(demo.last_s, 1e-3):,.0f} MiB/s",
    )
    backup_id = manifest["backup_id"]
    verify = demo.timed(
        "postgresql",
        "verify (gauntlet)",
        lambda: verify_backup_flow(backup_id=backup_id, engine="postgresql", target=TARGET),
    )
    demo.row("postgresql", "verify (gauntlet)", f"{_mb(raw)} re-read, ok={verify['ok']}")

    selection = [f"{s}.{t}" for s, t in _selection()]
    demo.console.print("selective restore of: " + ", ".join(escape(repr(n)) for n in selection))
    report = demo.timed(
        "postgresql",
        f"selective restore into {RESTORED}",
        lambda: restore_postgresql(
            target=TARGET, backup_id=backup_id, target_database=RESTORED, tables=selection
        ),
    )
    restored_s = demo.last_s
    for note in report.get("notes", []):
        demo.console.print(f"plan: {escape(note)}")
    with psycopg.connect(pg.dsn(RESTORED), autocommit=True) as c:
        wanted = [
            (str(r[0]), str(r[1]))
            for r in c.execute(
                "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n "
                "ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p', 'm', 'f') "
                "AND n.nspname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2"
            ).fetchall()
        ]
    # exactly what the plan selected is there, and nothing else was created
    only_selected = sorted(f"{s}.{t}" for s, t in wanted) == sorted(report["tables"])
    started = time.monotonic()
    restored = g.fingerprint(pg.dsn(RESTORED), wanted)["relations"]
    compare_s = time.monotonic() - started
    table = Table("relation", "kind", "rows", "fingerprint (restored)", "same as source")
    same_all = True
    for s, t in wanted:
        name = f"{s}.{t}"
        mine, theirs = restored.get(name), source["relations"].get(name)
        if theirs is None:
            same_all = False
            continue
        same = mine == theirs
        same_all &= same
        table.add_row(
            escape(name),
            {"r": "table", "p": "partitioned", "m": "matview", "f": "foreign"}[theirs["relkind"]],
            f"{mine['rows']:,}" if mine and "rows" in mine else "-",
            str(mine.get("hash", "(no rows of its own)")) if mine else "MISSING",
            "[green]yes[/green]" if same else "[red]NO[/red]",
        )
    demo.console.print(table)
    demo.console.print(
        f"restored {len(wanted)} relations (the whole {_mb(raw)} dump read and checked) in "
        f"{restored_s:.1f} s; fingerprints compared in "
        f"{compare_s:.1f} s: identical={same_all}; nothing else created={only_selected}"
    )
    demo.row(
        "postgresql",
        "selective restore (gauntlet)",
        f"{len(wanted)} relations, fingerprints identical: {same_all}",
    )
    demo.ok &= bool(verify["ok"] and report["rows_ok"] and wanted and same_all and only_selected)
    return "postgresql", TARGET
