"""The ``wal-receive-health`` flow: is every streaming WAL receiver keeping up?

Runs every few minutes (prefect.yaml). For each PostgreSQL target it asks the server
itself (``receive_status.STATUS_SQL``: the slot and the connection streaming from it),
so a dead receiver, or a pod that never came back, is still seen; where the target's
receiver publishes ``/status`` (``receiver_urls``) it adds the repository lag the
receiver measures. Every bound passed (``receive_status.findings``) emits one event that
deployments/automations.yaml routes to the channels:

* ``strongroom.wal-receive.down``: slot missing, lost or without a receiver; the
  receiver not answering, not streaming, or failing to push;
* ``strongroom.wal-receive.lagging``: the repository trails by more than the bounds;
* ``strongroom.wal-receive.slot-retention``: the slot keeps more WAL than the bound (the
  server's disk is at risk; docs/pitr.md says how to drop a slot no receiver will use).

As in backup-health, an alert is an event, not a failed run; the run fails only when a
server cannot be asked at all (which the failed-run automation reports).
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any, cast

from prefect import flow, get_run_logger
from prefect.events import emit_event

from blocks import PostgresTarget
from flows.common import publish, secure_logging
from flows.engine_runs import load_target
from strongroom.engines.postgres.wal.receive import DEFAULT_SLOT
from strongroom.engines.postgres.wal.receive_status import (
    Bounds,
    behind,
    findings,
    server_status,
)
from strongroom.errors import StrongroomError
from strongroom.redact import scrub

EVENT_PREFIX = "strongroom.wal-receive"


def receiver_status(url: str) -> dict[str, Any]:
    """The receiver's ``/status`` JSON, or ``{"error": ...}`` when it does not answer."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/status", timeout=10) as response:  # noqa: S310
            answer: dict[str, Any] = json.loads(response.read())
            return answer
    except (OSError, ValueError) as exc:
        return {"error": scrub(f"{type(exc).__name__}: {exc}")}


def _emit(kind: str, target: str, message: str, figures: dict[str, Any]) -> None:
    emit_event(
        event=f"{EVENT_PREFIX}.{kind}",
        resource={
            "prefect.resource.id": f"strongroom.target.postgresql.{target}",
            "prefect.resource.name": target,
            "strongroom.engine": "postgresql",
        },
        related=[
            {"prefect.resource.id": "prefect.tag.strongroom", "prefect.resource.role": "tag"},
            {"prefect.resource.id": "prefect.tag.postgresql", "prefect.resource.role": "tag"},
        ],
        payload={"message": message, **figures},
    )


@flow(name="wal-receive-health")
def wal_receive_health(
    targets: list[str] | None = None,
    slot: str = DEFAULT_SLOT,
    receiver_urls: dict[str, str] | None = None,
    max_lag_s: float = 60.0,
    max_lag_bytes: int = 64 * 1024 * 1024,
    max_slot_retained_bytes: int = 8 * 1024**3,
) -> dict[str, Any]:
    """Check the slot (and the receiver's ``/status`` where ``receiver_urls`` names it)
    of every target in ``targets`` (PostgreSQL target block names; None: every one whose
    block sets ``pitr``); emit one ``strongroom.wal-receive.<kind>`` event per bound passed."""
    from prefect.utilities.asyncutils import run_coro_as_sync

    from flows.fleet import discover_targets

    secure_logging()
    log = get_run_logger()
    if targets is None:
        found = run_coro_as_sync(discover_targets("postgresql", None, "wal-check"))
        hosts = cast("tuple[dict[str, str], dict[str, str]]", found)[0]
        targets = sorted(hosts)
    bounds = Bounds(max_lag_s, max_lag_bytes, max_slot_retained_bytes)
    rows: list[dict[str, Any]] = []
    unreachable: list[str] = []
    for target in targets:
        conn = load_target(PostgresTarget, target)
        try:
            server = server_status({**conn.libpq_env(), "PGDATABASE": conn.maintenance_db}, slot)
        except StrongroomError as exc:
            unreachable.append(f"{target}: {scrub(str(exc))}")
            rows.append({"target": target, "state": "NOT CHECKED", "findings": unreachable[-1]})
            continue
        url = (receiver_urls or {}).get(target)
        receiver = receiver_status(url) if url else None
        slot_facts = server.get("slot") or {}
        figures = {
            "slot": slot,
            "slot_active": bool(slot_facts.get("active")),
            "slot_retained_bytes": behind(server.get("server_lsn"), slot_facts.get("restart_lsn")),
            "repository_lag_seconds": (receiver or {}).get("repository_lag_seconds"),
            "repository_lag_bytes": (receiver or {}).get("repository_lag_bytes"),
        }
        found = findings(server, receiver, bounds)
        for kind, message in found:
            _emit(kind, target, message, figures)
            log.warning("%s: %s: %s", target, kind, message)
        rows.append(
            {
                "target": target,
                "state": "OK" if not found else ", ".join(sorted({k for k, _ in found})),
                **figures,
                "findings": "; ".join(m for _, m in found),
            }
        )
    publish(
        f"WAL receivers: {sum(r['state'] == 'OK' for r in rows)} of {len(rows)} OK",
        "wal-receive-health",
        [f"- {r['target']}: {r['state']} {r['findings']}" for r in rows] or ["- no targets"],
        rows,
    )
    if unreachable:
        raise StrongroomError("could not ask: " + "; ".join(unreachable))
    return {"ok": all(r["state"] == "OK" for r in rows), "targets": rows}
