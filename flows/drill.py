"""Prefect flow ``restore-drill``: restore the latest backup into a scratch target, prove it,
measure RTO and RPO, store the drill record, and fail when an objective is missed."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blocks import TARGET_BLOCKS
from flows.audit import AUDITED
from flows.common import (
    human_size,
    load_key,
    load_repository,
    publish,
    secure_logging,
)
from strongroom.config import EncryptionConfig
from strongroom.drills import DrillFailed, Objectives, adapter_for, run_drill
from strongroom.errors import InvalidInput, NotFound
from strongroom.redact import register
from strongroom.repository import Repository


def load_target(engine: str, name: str) -> tuple[Any, Any]:
    """(engine connection config, the block) for target block ``name`` of ``engine``."""
    block_cls: Any = TARGET_BLOCKS.get(engine)
    if block_cls is None:
        raise InvalidInput(f"unknown engine {engine!r}: expected one of {', '.join(TARGET_BLOCKS)}")
    cls_name = block_cls.__name__
    try:
        block = block_cls.load(name)
    except ValueError as exc:
        raise NotFound(f"no {cls_name} block named {name!r}") from exc
    conn = block.to_connection(name)
    register(*conn.secrets())
    return conn, block


def objectives_for(
    block: Any,
    rto_minutes: float | None,
    rpo_hours: float | None,
    defaults: Objectives | None = None,
) -> Objectives:
    """Explicit parameters win, then the target block's fields, then the policy defaults."""
    fallback = defaults or Objectives()
    return Objectives(
        rto_minutes=rto_minutes or getattr(block, "rto_minutes", None) or fallback.rto_minutes,
        rpo_hours=rpo_hours or getattr(block, "rpo_hours", None) or fallback.rpo_hours,
    )


@task(cache_policy=NO_CACHE)
def drill_task(
    engine: str,
    target: str,
    source: Any,
    scratch: Any,
    repo: Repository,
    enc: EncryptionConfig,
    backup_id: str,
    sandbox: bool,
    compare_live: str,
    objectives: Objectives,
) -> dict[str, Any]:
    options: dict[str, Any] = {"live": compare_live}
    if scratch is not None:
        options["scratch"] = scratch
        if engine == "redis":
            options["flush_scratch"] = True
    if engine != "redis":
        options["sandbox"] = sandbox
    adapter = adapter_for(engine, source, repo, enc, **options)
    return run_drill(
        adapter, repo, target=target, backup_id=backup_id, objectives=objectives, check=False
    )


def parse_point(point: str) -> dict[str, Any]:
    """``latest``, an LSN (``X/Y`` in hex) or an ISO time (UTC when no zone is given)."""
    import datetime as dt
    import re

    if point == "latest":
        return {"recovery_target": "latest"}
    if re.fullmatch(r"[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}", point):
        return {"recovery_target": "lsn", "target_lsn": point}
    try:
        when = dt.datetime.fromisoformat(point)
    except ValueError:
        raise InvalidInput(
            f"point must be 'latest', an LSN like 0/3000060 or an ISO time, not {point[:80]!r}"
        ) from None
    return {
        "recovery_target": "time",
        "target_time": when if when.tzinfo else when.replace(tzinfo=dt.UTC),
    }


@task(cache_policy=NO_CACHE)
def pitr_drill_task(
    target: str,
    source: Any,
    repository: str,
    enc: EncryptionConfig,
    point: str,
    objectives: Objectives,
    verify_query: str | None,
    verify_expect: str | None,
) -> dict[str, Any]:
    from strongroom.drills.pitr import run_pitr_drill

    repo, repo_config = load_repository(repository)
    return run_pitr_drill(
        repo,
        repo_config,
        enc,
        target=target,
        source=source,
        objectives=objectives,
        verify_query=verify_query,
        verify_expect=verify_expect,
        check=False,
        **parse_point(point),
    )


def _emit(record: dict[str, Any]) -> None:
    try:
        from prefect.events import emit_event

        emit_event(
            event=f"strongroom.drill.{'completed' if record['ok'] else 'failed'}",
            resource={
                "prefect.resource.id": f"strongroom.target.{record['engine']}.{record['target']}",
                "prefect.resource.name": record["target"],
                "strongroom.engine": record["engine"],
            },
            payload={
                "drill_id": record["drill_id"],
                "backup_id": record.get("backup_id"),
                "rto_s": record.get("rto_s"),
                "rpo_s": record.get("rpo_s"),
                "failures": record.get("failures", [])[:5],
            },
        )
    except Exception:  # events are a convenience; the drill record is the evidence
        get_run_logger().debug("could not emit the drill event", exc_info=True)


def _fmt_s(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value < 120:
        return f"{value:.2f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def summarize(record: dict[str, Any]) -> tuple[str, list[str], list[dict[str, Any]]]:
    """Title, markdown lines and table rows for a drill record (also used by the demo)."""
    ok = record["ok"]
    obj = record.get("objectives", {})
    title = (
        f"Restore drill {record['engine']}/{record['target']}: {'PASSED' if ok else 'FAILED'} "
        f"(RTO {_fmt_s(record.get('rto_s'))}, RPO {_fmt_s(record.get('rpo_s'))})"
    )
    scratch = record.get("scratch") or {}
    lines = [
        f"- backup `{record.get('backup_id')}` finished {record.get('backup_finished_at')}"
        f" ({human_size(record.get('backup_stored_size') or 0)} stored)",
        f"- scratch: {scratch.get('mode')} `{scratch.get('server')}` "
        f"{', '.join(f'`{d}`' for d in (scratch.get('databases') or {}))}",
        f"- measured RTO (restore time): **{_fmt_s(record.get('rto_s'))}** "
        f"(objective {_fmt_s(obj.get('rto_s'))})",
        f"- measured RPO (age of the restored data): **{_fmt_s(record.get('rpo_s'))}** "
        f"(objective {_fmt_s(obj.get('rpo_s'))})",
        f"- checks: {sum(1 for c in record.get('checks', []) if c.get('ok'))} of "
        f"{len(record.get('checks', []))} passed",
        f"- scratch cleaned up: {(record.get('cleanup') or {}).get('ok', 'n/a')}",
        f"- record: `{record.get('record_key')}`",
    ]
    if record.get("kind") == "pitr":
        rpo = record.get("rpo") or {}
        lines.insert(
            0,
            f"- point-in-time drill to **{(record.get('recovery') or {}).get('target')}**: "
            f"RPO basis {rpo.get('basis', 'n/a')}, transactions not recovered: "
            f"{rpo.get('lost_xids', 'n/a')}",
        )
    lines += [f"- **failure**: {f}" for f in record.get("failures", [])]
    rows = [
        {
            "item": c.get("item"),
            "check": c.get("check"),
            "expected": c.get("expected_rows", c.get("backup_keys")),
            "restored": c.get("restored_rows", c.get("restored_keys")),
            "live": c.get("live_rows", c.get("live_keys")),
            "ok": c.get("ok"),
        }
        for c in record.get("checks", [])
    ]
    return title, lines, rows


@flow(name="restore-drill", **AUDITED)
def restore_drill(
    target: str,
    engine: str = "postgresql",
    backup_id: str = "latest",
    repository: str = "default",
    encryption_key: str = "default",
    scratch_target: str | None = None,
    sandbox: bool = False,
    compare_live: str = "off",
    rto_minutes: float | None = None,
    rpo_hours: float | None = None,
    policy: str | None = None,
    point: str | None = None,
    verify_query: str | None = None,
    verify_expect: str | None = None,
) -> dict[str, Any]:
    """Restore ``backup_id`` (default the latest) of ``engine/target`` into a scratch target.

    Scratch: ``sandbox`` starts a throwaway server for the drill (Redis always does);
    ``scratch_target`` names a target block of the same engine to restore into
    (throwaway databases there); else throwaway databases on the source server.
    Objectives: ``rto_minutes`` / ``rpo_hours``, else the target block's, else the
    ``policy`` block's defaults. The drill record is stored under ``drills/``.

    ``point`` (PostgreSQL PITR targets): a PITR drill instead (strongroom.drills.pitr):
    recover base backup + WAL to ``latest``, an ISO time or an LSN (``0/3000060``) in a
    throwaway cluster, check it (``verify_query`` / ``verify_expect``), and record RTO
    and the measured RPO against the live source.
    """
    secure_logging()
    log = get_run_logger()
    if compare_live not in ("off", "report", "strict"):
        raise InvalidInput(f"compare_live must be off, report or strict, not {compare_live!r}")
    source, block = load_target(engine, target)
    scratch = load_target(engine, scratch_target)[0] if scratch_target else None
    repo, _ = load_repository(repository)
    enc = load_key(encryption_key)
    defaults = None
    if policy:
        from flows.policy_blocks import load_policy

        defaults = load_policy(policy).default_objectives()
    objectives = objectives_for(block, rto_minutes, rpo_hours, defaults)
    if point is not None:
        if engine != "postgresql":
            raise InvalidInput(f"point-in-time drills are for postgresql, not {engine!r}")
        record = pitr_drill_task(
            target, source, repository, enc, point, objectives, verify_query, verify_expect
        )
    else:
        record = drill_task(
            engine, target, source, scratch, repo, enc, backup_id, sandbox, compare_live, objectives
        )
    title, lines, rows = summarize(record)
    publish(title, f"drill-{engine}-{target}", lines, rows)
    _emit(record)
    if not record["ok"]:
        log.error("drill failed: %s", "; ".join(record["failures"]))
        raise DrillFailed(
            f"drill {record['drill_id']} of {engine}/{target} failed: {record['failures'][0]}",
            record,
        )
    log.info("drill passed: RTO %s s, RPO %s s", record["rto_s"], record["rpo_s"])
    return record
