"""The inline mode of ``backup-fleet``: many targets' backups inside one flow run.

``backup-fleet`` with ``mode="inline"`` does not start one flow run (one process, one
Kubernetes Job) per target: it runs the engine backups itself, in threads, at most
``per_engine_limit`` at once and ``per_host_limit`` per database host (the same Prefect
global concurrency limits as the default mode). Each target still gets what a
``backup-<engine>`` run gives it: its target lock (flows.locks.target_lock), one task
run ``backup-<engine>-<target>`` (retried on transient failures), one signed manifest,
its summary artifacts, one audit event (action ``backup``, the fleet's run as the
actor) and, when it succeeds, the ``strongroom.backup.completed`` event. A target that
fails (refused credentials, a server down) is reported in its row and in the audit
trail; the others go on.

The repository and the encryption key are loaded once for the whole run; the target
blocks one by one. With ``targets_per_run=N`` the fleet instead starts child runs of a
``backup-fleet`` deployment (default ``backup-fleet/on-demand``) with N targets each,
all inline (``backup_batches``): one process or Job per N targets.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run as current_run

from blocks import TARGET_BLOCKS
from flows.common import load_key, load_repository, publish
from flows.engine_runs import engine_backup, load_target
from flows.locks import engine_limit_name, hold_slots, host_limit_name, target_lock
from flows.policy_blocks import policy_lock
from strongroom.audit import record_event
from strongroom.config import EncryptionConfig, RepositoryConfig
from strongroom.engines.registry import get_engine
from strongroom.redact import scrub
from strongroom.repository import Repository

# Flow parameters of backup-<engine> that are not engine options.
_RUN_PARAMETERS = ("target", "repository", "encryption_key", "labels")


@dataclass(frozen=True)
class _Shared:
    """What every target's backup in the run uses."""

    engine: str
    repository: str
    repo: Repository
    repo_config: RepositoryConfig
    enc: EncryptionConfig
    labels: dict[str, str]
    options: dict[str, Any]


def _audit(shared: _Shared, target: str, row: dict[str, Any], manifest: dict[str, Any]) -> None:
    """One audit event for the target's backup (never raises: the row says if it failed)."""
    details: dict[str, Any] = {
        "flow": "backup-fleet",
        "mode": "inline",
        "flow_run_id": str(current_run.get_id() or ""),
        "flow_run_name": current_run.get_name(),
        "state": row["state"],
        "seconds": row.get("seconds"),
    }
    if row.get("error"):
        details["error"] = row["error"]
    checksums = {
        str(a.get("name")): str(a["stored_sha256"])
        for a in manifest.get("artifacts") or []
        if a.get("stored_sha256")
    }
    try:
        record_event(
            shared.repo,
            action="backup",
            engine=shared.engine,
            target=target,
            backup_id=manifest.get("backup_id"),
            result="success" if row["state"] == "Completed" else "failure",
            details=details,
            checksums=checksums,
        )
    except Exception as exc:
        row["audit_error"] = scrub(f"{type(exc).__name__}: {exc}")


# Sync tasks: inside them Prefect's block loads and artifacts are sync calls (in the async
# fleet flow's own context they would return coroutines).
@task(task_run_name="fleet-{target}", cache_policy=NO_CACHE)
def backup_one(shared: _Shared, target: str, row: dict[str, Any]) -> dict[str, Any]:
    """Back up one target; its row (state, backup id, seconds, error). Never raises."""
    row = dict(row)
    engine = get_engine(shared.engine)
    started = time.monotonic()
    manifest: dict[str, Any] = {}
    try:
        block_type: Any = TARGET_BLOCKS[shared.engine]
        conn: Any = load_target(block_type, target)
        repo_config = policy_lock(shared.repo, shared.repo_config, shared.engine, target)
        with target_lock(shared.engine, target):
            manifest = engine_backup(
                shared.engine,
                target,
                conn,
                shared.repo,
                repo_config,
                shared.enc,
                shared.labels,
                shared.options,
            )
        summary = engine.backup_summary(manifest, shared.repo.describe())
        publish(summary.title, f"backup-{shared.engine}-{target}", summary.lines, summary.rows)
        row.update(
            state="Completed",
            backup_id=manifest["backup_id"],
            stored_bytes=sum(a["stored_size"] for a in manifest["artifacts"]),
            error="",
        )
    except Exception as exc:  # reported per target; the other targets go on
        row.update(state="Failed", error=scrub(f"{type(exc).__name__}: {exc}"))
    row["seconds"] = round(time.monotonic() - started, 2)
    _audit(shared, target, row, manifest)
    return row


@task(task_run_name="fleet-open-repository", cache_policy=NO_CACHE)
def open_shared(engine: str, parameters: dict[str, Any]) -> _Shared:
    repository = str(parameters.get("repository") or "default")
    repo, repo_config = load_repository(repository)
    enc = load_key(str(parameters.get("encryption_key") or "default"))
    options = {k: v for k, v in parameters.items() if k not in _RUN_PARAMETERS and v is not None}
    labels = dict(parameters.get("labels") or {})
    return _Shared(engine, repository, repo, repo_config, enc, labels, options)


async def backup_inline(
    engine: str,
    hosts: dict[str, str],
    parameters: dict[str, Any],
    per_engine_limit: int,
    per_host_limit: int,
    on_completed: Callable[[str, dict[str, Any]], None],
) -> list[dict[str, Any]]:
    """Back up every target of ``hosts`` (target -> host) in this run; one row each.

    ``on_completed(target, row)`` is called for each target whose backup completed (the
    fleet emits its event there)."""
    log = get_run_logger()
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(max_workers=per_engine_limit, thread_name_prefix="fleet") as pool:

        def in_thread(fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
            context = contextvars.copy_context()  # the flow run's context, for task runs
            return loop.run_in_executor(pool, context.run, fn, *args)

        shared: _Shared = await in_thread(open_shared, engine, parameters)
        engine_slots = asyncio.Semaphore(per_engine_limit)
        host_slots = {h: asyncio.Semaphore(per_host_limit) for h in set(hosts.values())}

        async def one(target: str, host: str) -> dict[str, Any]:
            row: dict[str, Any] = {"target": target, "host": host, "state": "NOT STARTED"}
            waited = time.monotonic()
            try:
                async with (
                    host_slots[host],
                    engine_slots,
                    hold_slots([engine_limit_name(engine), host_limit_name(host)]),
                ):
                    row["waited_s"] = round(time.monotonic() - waited, 1)
                    row = await in_thread(backup_one, shared, target, row)
            except Exception as exc:  # the limits could not be taken
                row.update(state="NOT STARTED", error=scrub(f"{type(exc).__name__}: {exc}"))
            if row["state"] == "Completed":
                on_completed(target, row)
            else:
                log.error("%s %s: %s", engine, target, row.get("error"))
            return row

        return list(await asyncio.gather(*(one(t, h) for t, h in hosts.items())))


async def _child_rows(child: Any, engine: str) -> list[dict[str, Any]]:
    """The per-target rows a batch run published (its table artifact), or none."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    key = f"backup-fleet-{engine}-backup-table"
    async with get_client() as client:
        found = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[child.id]))
        )
    for artifact in found:
        if artifact.key == key and artifact.data:
            data = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
            return [dict(r) for r in data if isinstance(r, dict)]
    return []


async def backup_batches(
    engine: str,
    hosts: dict[str, str],
    parameters: dict[str, Any],
    limits: tuple[int, int],
    targets_per_run: int,
    deployment: str,
    timeout_s: float,
    poll_s: float,
) -> list[dict[str, Any]]:
    """``targets_per_run`` targets per child run of ``deployment`` (a backup-fleet
    deployment, inline mode), at most ``per_engine_limit`` child runs at once; the
    children take the engine and host slots per target. One row per target, from each
    child's table artifact."""
    from prefect.deployments import arun_deployment

    per_engine_limit, per_host_limit = limits
    names = list(hosts)
    batches = [names[i : i + targets_per_run] for i in range(0, len(names), targets_per_run)]
    gate = asyncio.Semaphore(per_engine_limit)

    async def one(index: int, batch: list[str]) -> list[dict[str, Any]]:
        base: dict[str, dict[str, Any]] = {
            t: {"target": t, "host": hosts[t], "state": "NOT STARTED"} for t in batch
        }
        async with gate:
            try:
                child = await arun_deployment(
                    deployment,
                    parameters={
                        "engine": engine,
                        "kind": "backup",
                        "targets": batch,
                        "mode": "inline",
                        "targets_per_run": 0,
                        "per_engine_limit": per_engine_limit,
                        "per_host_limit": per_host_limit,
                        "parameters": parameters,
                    },
                    timeout=timeout_s,
                    poll_interval=poll_s,
                    tags=["strongroom", engine, "backup", "fleet"],
                    idempotency_key=f"{current_run.get_id()}:{deployment}:batch-{index}",
                )
            except Exception as exc:  # the deployment is missing, the API refused the run
                error = scrub(f"{type(exc).__name__}: {exc}")
                return [{**row, "error": error} for row in base.values()]
        state = child.state
        for row in await _child_rows(child, engine):
            if row.get("target") in base:
                base[row["target"]].update(row)
        for row in base.values():
            row["flow_run"] = child.name
            if row["state"] == "NOT STARTED" and state is not None:  # the batch run failed
                row.update(state=state.name, error=state.message or "")
        return list(base.values())

    results = await asyncio.gather(*(one(i, b) for i, b in enumerate(batches)))
    return [row for rows in results for row in rows]
