"""backup-fleet: back up many targets, each as its own flow run of its deployment.

The fleet does no database work itself. For every target it starts one run of the
engine's per-target deployment (e.g. ``backup-postgresql/on-demand``), so on the
Kubernetes work pool every target gets its own Job (own pod, resources, logs, retries).
Two Prefect global concurrency limits bound how many run at once:

* ``strongroom-engine-<engine>``: at most ``per_engine_limit`` runs of that engine;
* ``strongroom-host-<host>``: at most ``per_host_limit`` runs against one database host.

Both are shared by every fleet run (a manual fleet run and the nightly one respect the
same limits). Within one fleet run the targets queue locally (a freed slot goes to the
next target at once); the shared limits are asked again every half second while they
are full (flows.locks.hold_slots). The fleet waits for every child, publishes one summary
(markdown + table artifact), emits ``strongroom.<kind>.completed`` per successful target
(resource ``strongroom.target.<engine>.<target>``; the Proactive "no backup within RPO"
automation watches it) and fails if any child did not complete.

``mode="inline"`` (kind ``backup`` only) runs the engine backups inside the fleet's own
run instead, still one lock, task run, manifest and audit event per target
(flows/fleet_inline.py): for many small targets, without one process or Job each.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run as current_run

from blocks import TARGET_BLOCKS
from flows.audit import AUDITED
from flows.common import _slug
from flows.fleet_inline import backup_batches, backup_inline
from flows.locks import engine_limit_name, ensure_limit, hold_slots, host_limit_name
from strongroom.errors import InvalidInput, StrongroomError

Engine = Literal["postgresql", "clickhouse", "redis"]
Kind = Literal["backup", "base-backup", "wal-check", "drill"]
Mode = Literal["runs", "inline"]

# Which deployment does the work for one target, per (engine, kind).
DEPLOYMENTS: dict[tuple[str, str], str] = {
    ("postgresql", "backup"): "backup-postgresql/on-demand",
    ("postgresql", "base-backup"): "base-backup-postgresql/on-demand",
    ("postgresql", "wal-check"): "wal-check-postgresql/on-demand",
    ("clickhouse", "backup"): "backup-clickhouse/on-demand",
    ("redis", "backup"): "backup-redis/on-demand",
    ("postgresql", "drill"): "restore-drill/on-demand",
    ("clickhouse", "drill"): "restore-drill/on-demand",
    ("redis", "drill"): "restore-drill/on-demand",
}
# The fleet's own deployment: the batches of an inline fleet run (targets_per_run) go there.
FLEET_DEPLOYMENT = "backup-fleet/on-demand"
# Block type holding the targets of each engine (all its named blocks = the fleet).
TARGET_BLOCK_TYPES: dict[str, str] = {
    engine: block.get_block_type_slug() for engine, block in TARGET_BLOCKS.items()
}


def target_resource_id(engine: str, target: str) -> str:
    return f"strongroom.target.{engine}.{target}"


def not_applicable(kind: str, block: dict[str, Any]) -> str | None:
    """Why ``kind`` does not apply to a target (its block data), or None when it does:
    base backups and WAL checks need ``pitr`` in the block, drills ``drills``."""
    if kind in ("base-backup", "wal-check") and not block.get("pitr"):
        return "skipped: PITR not enabled in its block (pitr: false; logical dumps only)"
    if kind == "drill" and not block.get("drills"):
        return "skipped: no drill policy in its block (drills: false)"
    return None


async def discover_targets(
    engine: str, names: list[str] | None, kind: str = "backup"
) -> tuple[dict[str, str], dict[str, str]]:
    """(target name -> database host, target name -> why skipped), from the engine's
    target blocks (secrets not read); targets ``kind`` does not apply to are skipped."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    slug = TARGET_BLOCK_TYPES[engine]
    async with get_client() as client:
        try:
            docs = await client.read_block_documents_by_type(slug, include_secrets=False)
        except ObjectNotFound:
            docs = []
    named = {d.name: dict(d.data or {}) for d in docs if d.name and not d.is_anonymous}
    hosts = {name: str(data.get("host") or "unknown") for name, data in named.items()}
    chosen = sorted(hosts) if names is None else names
    missing = [n for n in chosen if n not in hosts]
    if missing:
        raise InvalidInput(
            f"no {slug} block named {', '.join(map(repr, missing))}; "
            f"known {engine} targets: {', '.join(sorted(hosts)) or 'none'}"
        )
    skipped = {n: why for n in chosen if (why := not_applicable(kind, named[n]))}
    return {n: hosts[n] for n in chosen if n not in skipped}, skipped


@dataclass
class _Slots:
    """This fleet run's local queues in front of the shared limits (engine, each host)."""

    engine: asyncio.Semaphore
    hosts: dict[str, asyncio.Semaphore]


def _completed_event(engine: str, kind: str, target: str, row: dict[str, Any]) -> None:
    """``strongroom.<kind>.completed`` for the target (the RPO automation watches it)."""
    from prefect.events import emit_event

    run_id = str(row.get("flow_run_id") or current_run.get_id() or "")
    emit_event(
        event=f"strongroom.{kind}.completed",
        resource={
            "prefect.resource.id": target_resource_id(engine, target),
            "prefect.resource.name": target,
            "strongroom.engine": engine,
        },
        related=[
            {
                "prefect.resource.id": f"prefect.flow-run.{run_id}",
                "prefect.resource.role": "flow-run",
                "prefect.resource.name": str(row.get("flow_run") or current_run.get_name()),
            }
        ],
        payload={"flow_run_id": run_id, "seconds": row.get("seconds")},
    )


async def _run_one(
    deployment: str,
    engine: str,
    kind: str,
    target: str,
    host: str,
    parameters: dict[str, Any],
    timeout_s: float,
    poll_s: float,
    slots: _Slots,
) -> dict[str, Any]:
    from prefect.deployments import arun_deployment

    row: dict[str, Any] = {"target": target, "host": host, "state": "NOT STARTED"}
    waited = time.monotonic()
    async with (
        slots.hosts[host],
        slots.engine,
        hold_slots([engine_limit_name(engine), host_limit_name(host)]),
    ):
        row["waited_s"] = round(time.monotonic() - waited, 1)
        started = time.monotonic()
        try:
            child = await arun_deployment(
                deployment,
                parameters={**parameters, "target": target},
                timeout=timeout_s,
                poll_interval=poll_s,
                tags=["strongroom", engine, kind, "fleet"],
                idempotency_key=f"{current_run.get_id()}:{deployment}:{target}",
            )
        except Exception as exc:  # the deployment is missing, the API refused the run...
            row.update(state="NOT STARTED", error=f"{type(exc).__name__}: {exc}")
            return row
        row["seconds"] = round(time.monotonic() - started, 1)
    state = child.state
    row.update(
        state=state.name if state else "UNKNOWN",
        flow_run=child.name,
        flow_run_id=str(child.id),
        error="" if state and state.is_completed() else (state.message if state else ""),
    )
    if state and state.is_completed():
        _completed_event(engine, kind, target, row)
    return row


async def _publish(title: str, key: str, lines: list[str], rows: list[dict[str, Any]]) -> None:
    """flows.common.publish for an async flow (same keys: a markdown summary and a table)."""
    from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact

    body = f"# {title}\n\n" + "\n".join(lines)
    await acreate_markdown_artifact(markdown=body, key=_slug(f"{key}-summary"), description=title)
    if rows:
        await acreate_table_artifact(table=rows, key=_slug(f"{key}-table"), description=title)


@flow(name="backup-fleet", **AUDITED)
async def backup_fleet(
    engine: Engine = "postgresql",
    kind: Kind = "backup",
    targets: list[str] | None = None,
    per_engine_limit: int = 4,
    per_host_limit: int = 1,
    parameters: dict[str, Any] | None = None,
    deployment: str | None = None,
    timeout_s: float = 12 * 3600,
    poll_s: float = 1.0,
    mode: Mode = "runs",
    targets_per_run: int = 0,
) -> dict[str, Any]:
    """Start one run of the per-target deployment for each target and wait for them all
    (``mode="runs"``), or back them all up inside this run (``mode="inline"``).

    ``targets``: block names (None: every target block of ``engine``). ``parameters``
    are passed to every child run (``target`` is set per child); inline, they are the
    ``backup-<engine>`` parameters (``repository``, ``encryption_key``, ``labels``,
    engine options). ``deployment`` overrides the ``flow/deployment`` name picked from
    ``engine`` and ``kind``. ``poll_s``: how often a child run's state is read.
    ``targets_per_run`` (inline only): 0 backs every target up in this run; N > 0 starts
    child runs of ``deployment`` (default ``backup-fleet/on-demand``) with N targets each.
    """
    log = get_run_logger()
    if per_engine_limit < 1 or per_host_limit < 1:
        raise InvalidInput("per_engine_limit and per_host_limit must be at least 1")
    if mode == "inline" and kind != "backup":
        raise InvalidInput(f"mode 'inline' runs backups only, not {kind!r}")
    if targets_per_run < 0:
        raise InvalidInput("targets_per_run must be 0 (all in this run) or more")
    name = deployment or DEPLOYMENTS.get((engine, kind))
    if mode == "inline":
        name = deployment or FLEET_DEPLOYMENT if targets_per_run else "inline"
    if name is None:
        raise InvalidInput(f"no {kind!r} deployment for engine {engine!r}")
    parameters = dict(parameters or {})
    if kind == "drill":  # restore-drill serves every engine: tell it which
        parameters.setdefault("engine", engine)
    hosts, skipped = await discover_targets(engine, targets, kind)
    log.info("%s %s over %d target(s) via %s", kind, engine, len(hosts), name)
    for target, why in skipped.items():
        log.info("%s: %s", target, why)
    await ensure_limit(engine_limit_name(engine), per_engine_limit, update=True)
    for host in sorted(set(hosts.values())):
        await ensure_limit(host_limit_name(host), per_host_limit, update=True)
    if mode == "inline" and 0 < targets_per_run < len(hosts):
        rows = await backup_batches(
            engine,
            hosts,
            parameters,
            (per_engine_limit, per_host_limit),
            targets_per_run,
            name,
            timeout_s,
            poll_s,
        )
    elif mode == "inline":
        rows = await backup_inline(
            engine,
            hosts,
            parameters,
            per_engine_limit,
            per_host_limit,
            lambda target, row: _completed_event(engine, kind, target, row),
        )
    else:
        slots = _Slots(
            asyncio.Semaphore(per_engine_limit),
            {h: asyncio.Semaphore(per_host_limit) for h in set(hosts.values())},
        )
        rows = await asyncio.gather(
            *(
                _run_one(name, engine, kind, target, host, parameters, timeout_s, poll_s, slots)
                for target, host in hosts.items()
            )
        )
    ok = [r for r in rows if r["state"] == "Completed"]
    failed = [r for r in rows if r["state"] != "Completed"]
    rows = [*rows, *({"target": t, "state": "SKIPPED", "error": w} for t, w in skipped.items())]
    await _publish(
        f"Fleet {kind} of {engine}: {len(ok)}/{len(ok) + len(failed)} completed"
        + (f", {len(skipped)} skipped" if skipped else ""),
        f"backup-fleet-{engine}-{kind}",
        [
            f"- mode: {mode}" + ("" if name == "inline" else f", deployment: `{name}`"),
            f"- targets: {len(hosts)} on {len(set(hosts.values()))} host(s); limits: "
            f"{per_engine_limit} per engine, {per_host_limit} per host",
            f"- completed: {len(ok)}, not completed: {len(failed)}, skipped: {len(skipped)}",
            *(f"- **{r['target']}**: {r['state']} {r.get('error', '')}" for r in failed),
            *(f"- {t}: {w}" for t, w in skipped.items()),
        ],
        [
            {
                k: r.get(k, "")
                for k in (
                    "target",
                    "host",
                    "state",
                    "seconds",
                    "waited_s",
                    "flow_run",
                    "backup_id",
                    "error",
                )
            }
            for r in rows
        ],
    )
    summary = {
        "engine": engine,
        "kind": kind,
        "mode": mode,
        "deployment": name,
        "runs": [r for r in rows if r["state"] != "SKIPPED"],
        "skipped": skipped,
    }
    if failed:
        raise StrongroomError(
            f"{len(failed)} of {len(hosts)} {engine} {kind} runs did not complete: "
            + ", ".join(f"{r['target']} ({r['state']})" for r in failed)
        )
    return summary
