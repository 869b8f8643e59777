"""The closing act of ``make demo``: one restore drill per engine, with measured RTO and RPO.

``demo_drills([("postgresql", "demo-pg"), ("clickhouse", "demo-ch"), ("redis", "demo-redis")])``
runs the ``restore-drill`` flow for each target (blocks already saved, backups taken),
prints a table and returns the drill records. A failed drill is shown, not raised;
the caller decides the exit code (``all(r["ok"] for r in records)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 120:
        return f"{value:.2f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def demo_drills(
    targets: Sequence[tuple[str, str]],
    *,
    repository: str = "default",
    encryption_key: str = "default",
    sandbox: bool = False,
    console: Any = None,
) -> list[dict[str, Any]]:
    """Drill each (engine, target block name); print the RTO/RPO table; return the records."""
    from rich.console import Console
    from rich.table import Table

    from flows.drill import restore_drill
    from strongroom.drills import DrillFailed, available_engines

    console = console or Console()
    usable = set(available_engines())
    records: list[dict[str, Any]] = []
    for engine, target in targets:
        console.rule(f"restore drill {engine}/{target} (flow restore-drill)")
        if engine not in usable:
            console.print(f"[yellow]{engine}: no restore engine in this installation[/yellow]")
            continue
        try:
            record = restore_drill(
                target=target,
                engine=engine,
                repository=repository,
                encryption_key=encryption_key,
                sandbox=sandbox and engine != "redis",
            )
        except DrillFailed as exc:
            record = exc.record
        records.append(record)

    table = Table(
        "engine",
        "target",
        "backup",
        "restored into",
        "checks",
        "RTO measured",
        "RTO objective",
        "RPO measured",
        "RPO objective",
        "result",
        title="restore drills: measured RTO and RPO",
    )
    for r in records:
        checks = r.get("checks", [])
        scratch = r.get("scratch") or {}
        obj = r.get("objectives") or {}
        table.add_row(
            r["engine"],
            r["target"],
            str(r.get("backup_id") or "-"),
            f"{scratch.get('mode', '-')} {scratch.get('server') or ''}".strip(),
            f"{sum(1 for c in checks if c.get('ok'))}/{len(checks)}",
            _fmt(r.get("rto_s")),
            _fmt(obj.get("rto_s")),
            _fmt(r.get("rpo_s")),
            _fmt(obj.get("rpo_s")),
            "[green]passed[/green]" if r["ok"] else "[red]FAILED[/red]",
        )
    console.print(table)
    for r in records:
        for failure in r.get("failures", []):
            console.print(f"[red]{r['engine']}/{r['target']}: {failure}[/red]", highlight=False)
    return records
