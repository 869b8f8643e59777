"""PostgreSQL logical backups behind the Engine interface (``strongroom.engines.interface``).

The dump and restore live in ``backup.py`` and ``restore.py``; this module adapts them
to the shared verbs and says what a backup's and a restore's summary show.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from strongroom.catalog import artifact_totals
from strongroom.engines.interface import Engine, Summary
from strongroom.engines.postgres.backup import backup_postgres
from strongroom.engines.postgres.restore import PgRestoreRequest, restore_postgres
from strongroom.sizes import human_size


def backup_summary(manifest: Mapping[str, Any], repository: str) -> Summary:
    raw, stored = artifact_totals(manifest)
    return Summary(
        f"PostgreSQL backup {manifest['backup_id']}",
        [
            f"- target: `{manifest['target']}` ({manifest['server']['version']})",
            f"- repository: `{repository}`",
            f"- artifacts: {len(manifest['artifacts'])}, dump {human_size(raw)}, "
            f"stored {human_size(stored)}",
            f"- finished: {manifest['finished_at']}",
        ],
        [
            {
                "database": db["name"],
                "tables": len(db["tables"]),
                "rows": sum(t["rows"] or 0 for t in db["tables"]),
                "size": human_size(db["size_bytes"]),
            }
            for db in manifest["details"]["databases"]
        ],
    )


def restore_summary(report: Mapping[str, Any]) -> Summary:
    dry = bool(report.get("dry_run"))
    checks = report.get("row_checks") or []
    return Summary(
        f"PostgreSQL restore {'plan ' if dry else ''}{report['backup_id']}",
        [
            f"- {'would restore' if dry else 'restored'} `{report['source_database']}` "
            f"from backup `{report['backup_id']}`",
            f"- into `{report['target_database']}` on `{report['target_server']}` "
            f"({report['mode']})",
            f"- size: {human_size(report['raw_size'])}",
            *([f"- how: {report['method']}"] if report.get("method") else []),
            *(
                ["- seconds: " + ", ".join(f"{k[:-2]} {v}" for k, v in report["phases_s"].items())]
                if report.get("phases_s")
                else []
            ),
            f"- row counts match the manifest: {report.get('rows_ok', 'n/a')}",
        ]
        + ([f"- blocked: {report['blocked']}"] if report.get("blocked") else [])
        + [f"- note: {note}" for note in report.get("notes") or []],
        [
            {
                "table": c["table"],
                "expected rows": c["expected"],
                "restored rows": c["actual"],
                "ok": c["ok"],
            }
            for c in checks
        ]
        or [{"table": t} for t in report.get("tables") or []],
        ok=dry or report.get("rows_ok") is not False,
    )


ENGINE = Engine(
    "postgresql",
    "PostgreSQL",
    PgRestoreRequest,
    backup_fn=backup_postgres,
    restore_fn=restore_postgres,
    backup_summary=backup_summary,
    restore_summary=restore_summary,
    one_stream=True,
)
