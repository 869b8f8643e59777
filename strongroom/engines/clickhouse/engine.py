"""ClickHouse backups behind the Engine interface (``strongroom.engines.interface``).

The dump and restore live in ``backup.py`` and ``restore.py``; this module adapts them
to the shared verbs and says what a backup's and a restore's summary show.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from strongroom.catalog import artifact_totals
from strongroom.engines.clickhouse.backup import backup_clickhouse
from strongroom.engines.clickhouse.restore import ChRestoreRequest, restore_clickhouse
from strongroom.engines.interface import Engine, Summary
from strongroom.sizes import human_size


def _table_sizes(manifest: Mapping[str, Any]) -> dict[tuple[str, str], int]:
    sizes: dict[tuple[str, str], int] = {}
    for a in manifest["artifacts"]:
        meta = a.get("meta", {})
        if meta.get("table") is not None:
            key = (meta["database"], meta["table"])
            sizes[key] = sizes.get(key, 0) + a["raw_size"]
    return sizes


def _mode_line(details: Mapping[str, Any]) -> str:
    section = details.get("incremental") or {}
    if section.get("mode") == "incremental":
        return (
            f"- incremental on `{details['base_backup_id']}`: "
            f"{section['stored_artifacts']} artifact(s) stored "
            f"({human_size(section.get('new_stored_bytes', 0))}), {section['reused_artifacts']} "
            f"unchanged referenced ({human_size(section['reused_raw_bytes'])} not read again)"
        )
    return f"- full backup ({section.get('full_reason') or 'every partition exported'})"


def backup_summary(manifest: Mapping[str, Any], repository: str) -> Summary:
    sizes = _table_sizes(manifest)
    rows = [
        {
            "database": db["name"],
            "table": t["name"],
            "engine": t["engine"],
            "rows": t["rows"] if t["rows"] is not None else "",
            "partitions": len(t["partitions"]),
            "size": human_size(sizes.get((db["name"], t["name"]), 0)),
        }
        for db in manifest["details"]["databases"]
        for t in db["tables"]
    ]
    raw, stored = artifact_totals(manifest)
    return Summary(
        f"ClickHouse backup {manifest['backup_id']}",
        [
            f"- target: `{manifest['target']}` (ClickHouse {manifest['server']['version']})",
            f"- repository: `{repository}`",
            f"- databases: {len(manifest['details']['databases'])}, tables and views: "
            f"{len(rows)}, artifacts: {len(manifest['artifacts'])}",
            f"- data {human_size(raw)}, stored {human_size(stored)}",
            _mode_line(manifest["details"]),
            "- consistency: per table (ClickHouse has no cross-table snapshot)",
            f"- finished: {manifest['finished_at']}",
        ],
        rows,
    )


def restore_summary(report: Mapping[str, Any]) -> Summary:
    dry = bool(report.get("dry_run"))
    into = ", ".join(f"`{s}` -> `{t}`" for s, t in report["databases"].items())
    if dry:
        rows = [
            {
                "object": a["target"],
                "action": a["action"],
                "partitions": ", ".join(a["partitions"]),
                "rows": a["rows"],
                "size": human_size(a["raw_size"]),
                "blocked": a["blocked"] or "",
            }
            for a in report["actions"]
        ]
    else:
        rows = [
            {
                "table": c["table"],
                "stage": c["stage"],
                "check": c.get("check", "fingerprint"),
                "partitions": c["partitions"],
                "expected rows": c["expected_rows"],
                "restored rows": c["actual_rows"],
                "ok": c["ok"],
            }
            for c in report.get("checks", [])
        ]
    return Summary(
        f"ClickHouse restore {'plan ' if dry else ''}{report['backup_id']}",
        [
            f"- {'would restore' if dry else 'restored'} backup `{report['backup_id']}` "
            f"of `{report['source_target']}` ({report['mode']})",
            f"- databases: {into} on `{report['target_server']}`",
            f"- objects: {len(report['tables'])}, rows: {report['rows']}, "
            f"data: {human_size(report['raw_size'])}",
            f"- fingerprints match the manifest: {report.get('fingerprints_ok', 'n/a')}",
            f"- parallel loads: {report.get('jobs', 1)}",
        ]
        + ([f"- blocked: {report['blocked']}"] if report.get("blocked") else [])
        + ([f"- left over: {report['leftovers']}"] if report.get("leftovers") else []),
        rows,
        ok=dry or report.get("fingerprints_ok") is not False,
    )


ENGINE = Engine(
    "clickhouse",
    "ClickHouse",
    ChRestoreRequest,
    backup_fn=backup_clickhouse,
    restore_fn=restore_clickhouse,
    backup_summary=backup_summary,
    restore_summary=restore_summary,
)
