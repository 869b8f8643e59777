"""Fleet benchmark: ``backup-fleet`` over many small PostgreSQL targets on a process pool.

A real Prefect server, one throwaway PostgreSQL holding N small databases (one target
block each), the strongroom blocks, a ``process`` work pool with a process worker
polling it as ``make up``'s does, and the ``backup-fleet/on-demand`` and
``backup-postgresql/on-demand`` deployments. The fleet runs twice: in its default mode
(one child flow run per target, per-host limit 1) and in the inline mode (the engine
backups inside the fleet run). For every child run the timeline comes from the Prefect
API (when the worker picked it up: its Pending state; its end) and the backup's own
duration from its manifest, so ``fleet_overhead_per_run_s`` is the mean of
(end - picked up - backup duration).

``python -m bench.restore_fleet [--quick]`` prints the JSON and writes
bench/results/restore-fleet.json (--quick: restore-fleet-quick.json, 5 targets).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from strongroom.deploy.local_server import PrefectServer, ProcessWorker
from strongroom.deploy.up import WORKER_QUERY_S

RESULTS = Path(__file__).resolve().parent / "results"
POOL = "bench-fleet"
ROWS_PER_DB = 2000
FLEET = "backup-fleet/on-demand"
CHILD = "backup-postgresql/on-demand"
_RUN_KEYS = ("target", "state", "wall_s", "start_s", "backup_s")


def _db(name: str) -> str:
    return name.replace("-", "_")


def _log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, file=sys.stderr, flush=True)


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def _bootstrap_config(pg: Any, names: list[str], workdir: Path, signer: Any) -> dict[str, Any]:
    from pyrage import x25519

    from strongroom.deploy.bootstrap_config import declared_deployments
    from strongroom.deploy.local_server import ROOT

    keep = {FLEET, CHILD}
    labels = [
        f"{d['flow_name']}/{d.get('name')}" for d in declared_deployments(ROOT / "prefect.yaml")
    ]
    identity = x25519.Identity.generate()
    target = {
        "host": pg.host,
        "port": pg.port,
        "user": pg.superuser,
        "password": pg.password,
    }
    return {
        "work_pools": [{"name": POOL, "type": "process"}],
        "deployments": {"work_pool": POOL, "exclude": sorted(set(labels) - keep)},
        "blocks": {
            "strongroom-postgres-target": {n: {**target, "databases": [_db(n)]} for n in names},
            "strongroom-repository": {
                "default": {
                    "local_path": str(workdir / "repo"),
                    "trusted_signers": [signer.public.pem()],
                    "signing_key": {"private_key": signer.private_pem().get_secret_value()},
                }
            },
            "strongroom-encryption-key": {
                "default": {"recipients": [str(identity.to_public())], "identity": str(identity)}
            },
        },
    }


async def _child_timelines(fleet_id: uuid.UUID) -> list[dict[str, Any]]:
    """Each child run of the fleet: target, picked-up (Pending), start (Running), end."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    out: list[dict[str, Any]] = []
    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[fleet_id])
            ),
            limit=200,
        )
        for run in runs:
            states = await client.read_flow_run_states(run.id)
            times = {s.type.value: s.timestamp for s in states}
            out.append(
                {
                    "target": run.parameters.get("target"),
                    "state": run.state.name if run.state else None,
                    "scheduled": times.get("SCHEDULED"),
                    "picked_up": times.get("PENDING"),
                    "running": times.get("RUNNING"),
                    "end": run.end_time,
                }
            )
    return out


def _backup_seconds(repo: Path, signer: Any, names: list[str], label: str) -> dict[str, float]:
    """Target -> the duration of its backup labelled ``bench=label`` (from the manifest)."""
    from strongroom.catalog import Catalog
    from strongroom.repository.local import LocalRepository
    from strongroom.signing import Trust

    catalog = Catalog(LocalRepository(repo, trust=Trust((signer.public,), None)))
    found: dict[str, float] = {}
    for name in names:
        for manifest in catalog.list("postgresql", name):
            if manifest.labels.get("bench") == label:
                found[name] = manifest.duration_s
    return found


def _fleet(mode: str, names: list[str], label: str, extra: dict[str, Any]) -> tuple[Any, float]:
    from prefect.deployments import run_deployment

    started = time.monotonic()
    run = run_deployment(
        FLEET,
        parameters={
            "engine": "postgresql",
            "targets": names,
            **({"mode": mode} if mode != "runs" else {}),
            "parameters": {"labels": {"bench": label}},
            **extra,
        },
        timeout=3600,
        poll_interval=0.5,
        as_subflow=False,
    )
    wall = time.monotonic() - started
    if not (run.state and run.state.is_completed()):
        raise RuntimeError(f"fleet run ({mode}) ended {run.state}")
    return run, wall


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def run(
    quick: bool,
    workdir: Path,
    modes: tuple[str, ...] = ("runs", "inline"),
    *,
    warm: bool = True,
) -> dict[str, Any]:
    """The fleet figures (see the module docstring); ``modes`` picks the fleet modes run,
    ``warm`` whether the worker's runs are forked from a warm starter."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from strongroom.deploy.bootstrap import BootstrapConfig, bootstrap
    from strongroom.sandbox.postgres import PostgresServer
    from strongroom.signing import Signer

    n = 5 if quick else 50
    signer = Signer.generate()
    names = [f"fleet-{i:03d}" for i in range(n)]  # block names; database fleet_NNN
    workdir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "fleet_targets": n,
        "worker_query_s": WORKER_QUERY_S,
        "warm_starter": warm,
    }
    with PostgresServer() as pg:
        for name in names:
            pg.psql(f"CREATE DATABASE {_db(name)}")
            pg.psql(
                "CREATE TABLE items (id int PRIMARY KEY, body text); INSERT INTO items"
                f" SELECT g, md5(g::text) FROM generate_series(1, {ROWS_PER_DB}) g",
                db=_db(name),
            )
        server = PrefectServer(workdir / "prefect").start()
        worker: ProcessWorker | None = None
        try:
            with (
                _environ({"PREFECT_API_URL": server.api_url}),
                temporary_settings(updates={PREFECT_API_URL: server.api_url}),
            ):
                t0 = time.monotonic()
                config = _bootstrap_config(pg, names, workdir, signer)
                bootstrap(BootstrapConfig.model_validate(config))
                result["bootstrap_s"] = round(time.monotonic() - t0, 1)
                home = workdir / "prefect"
                worker = ProcessWorker(
                    POOL, server.api_url, home, query_seconds=WORKER_QUERY_S, warm=warm
                ).start()
                _log(f"fleet of {n} targets, default mode")
                fleet, wall = _fleet("runs", names, "runs", {})
                result["fleet_wall_s"] = round(wall, 2)
                _log(f"fleet wall {wall:.1f} s")
                children = asyncio.run(_child_timelines(fleet.id))
                backups = _backup_seconds(workdir / "repo", signer, names, "runs")
                per_run = []
                for child in children:
                    backup = backups.get(child["target"])
                    if child["picked_up"] and child["end"] and backup is not None:
                        span = (child["end"] - child["picked_up"]).total_seconds()
                        child["wall_s"] = round(span, 3)
                        child["backup_s"] = round(backup, 3)
                        if child["running"]:
                            start = (child["running"] - child["picked_up"]).total_seconds()
                            child["start_s"] = round(start, 3)
                        per_run.append(span - backup)
                if len(per_run) != n:
                    raise RuntimeError(f"{len(per_run)} of {n} child runs have a full timeline")
                result["fleet_overhead_per_run_s"] = _round(statistics.mean(per_run))
                result["fleet_overhead_per_run_max_s"] = _round(max(per_run))
                result["fleet_backup_mean_s"] = _round(statistics.mean(backups.values()), 3)
                result["fleet_wall_per_target_s"] = _round(wall / n)
                starts = [c["start_s"] for c in children if "start_s" in c]
                result["fleet_child_start_mean_s"] = _round(
                    statistics.mean(starts) if starts else None
                )
                result["fleet_runs"] = [
                    {k: v for k, v in c.items() if k in _RUN_KEYS}
                    for c in sorted(children, key=lambda c: str(c["target"]))
                ]
                if "inline" in modes:
                    _log(f"fleet of {n} targets, inline mode")
                    _, inline_wall = _fleet("inline", names, "inline", {})
                    inline_backups = _backup_seconds(workdir / "repo", signer, names, "inline")
                    if len(inline_backups) != n:
                        raise RuntimeError(f"inline: {len(inline_backups)} of {n} backups")
                    result["fleet_inline_wall_s"] = round(inline_wall, 2)
                    result["fleet_inline_per_target_s"] = _round(inline_wall / n)
                    result["fleet_inline_over_default"] = _round(inline_wall / wall, 3)
        finally:
            if worker is not None:
                worker.stop()
            server.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 targets instead of 50")
    parser.add_argument("--default-only", action="store_true", help="skip the inline mode")
    parser.add_argument(
        "--cold", action="store_true", help="no warm starter: a fresh process per run"
    )
    args = parser.parse_args(argv)
    modes = ("runs",) if args.default_only else ("runs", "inline")
    import tempfile

    with tempfile.TemporaryDirectory(prefix="strongroom-bench-fleet-") as tmp:
        result = run(args.quick, Path(tmp), modes, warm=not args.cold)
    name = "restore-fleet" + ("-cold" if args.cold else "") + ("-quick" if args.quick else "")
    out = RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
