"""``backup-fleet`` in its inline mode against a real ``prefect server`` and PostgreSQL.

The fleet runs in this process (the inline mode starts no child runs, so no worker is
needed): several targets on one host, one of them with a wrong password. Each target
must get its own manifest, audit event and task run; the failing one is reported (row,
audit event, the fleet's failure) without stopping the others; the per-host limit and
the target locks hold.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pyrage import x25519

from strongroom.deploy.local_server import PrefectServer
from strongroom.sandbox.postgres import PostgresServer
from tests.fixtures.prefect_server import prefect_server
from tests.fixtures.strongroom_fixtures import make_local_repo, signing_block_fields

pytestmark = pytest.mark.slow

__all__ = ["prefect_server"]

GOOD = [f"inline-{i}" for i in range(4)]
BAD = "inline-badpass"
WRONG_PASSWORD = "not-the-password-7f3a"


@dataclass
class Fleet:
    pg: PostgresServer
    repo: Path
    databases: dict[str, str]


@pytest.fixture(scope="module")
def fleet(
    prefect_server: PrefectServer, pg_server: PostgresServer, tmp_path_factory: Any
) -> Iterator[Fleet]:
    from blocks import BackupRepository, EncryptionKey, PostgresTarget, register_all

    register_all()
    repo = tmp_path_factory.mktemp("fleet-inline") / "repo"
    identity = x25519.Identity.generate()
    EncryptionKey(recipients=[str(identity.to_public())], identity=str(identity)).save(
        "default", overwrite=True
    )
    BackupRepository(**signing_block_fields(), local_path=str(repo)).save("default", overwrite=True)
    databases: dict[str, str] = {}
    for name in [*GOOD, BAD]:
        db = f"fleet_{uuid.uuid4().hex[:8]}"
        pg_server.create_database(db)
        pg_server.psql(
            "CREATE TABLE items (id int PRIMARY KEY, body text);"
            "INSERT INTO items SELECT g, md5(g::text) FROM generate_series(1, 300) g;",
            db=db,
        )
        databases[name] = db
        PostgresTarget(
            host=pg_server.host,
            port=pg_server.port,
            user=pg_server.superuser,
            password=WRONG_PASSWORD if name == BAD else pg_server.password,
            databases=[db],
        ).save(name, overwrite=True)
    try:
        yield Fleet(pg_server, repo, databases)
    finally:
        for db in databases.values():
            pg_server.drop_database(db)


def _run_fleet(**params: Any) -> Any:
    """The fleet flow in this process; its final state."""
    from flows.fleet import backup_fleet

    return asyncio.run(backup_fleet(return_state=True, **params))  # type: ignore[call-overload]


def _api(fn: Any) -> Any:
    from prefect.client.orchestration import get_client

    async def run() -> Any:
        async with get_client() as client:
            return await fn(client)

    return asyncio.run(run())


def _table(flow_run_id: uuid.UUID) -> list[dict[str, Any]]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read(client: Any) -> list[Any]:
        found: list[Any] = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
        return found

    tables = [a for a in _api(read) if a.key == "backup-fleet-postgresql-backup-table"]
    assert len(tables) == 1, [a.key for a in _api(read)]
    rows: list[dict[str, Any]] = json.loads(tables[0].data)
    return rows


def test_inline_fleet_backs_up_each_target_and_reports_the_failing_one(fleet: Fleet) -> None:
    from strongroom.audit import read_events
    from strongroom.catalog import Catalog

    state = _run_fleet(
        engine="postgresql",
        targets=[*GOOD, BAD],
        mode="inline",
        per_host_limit=1,
        per_engine_limit=3,
        parameters={"labels": {"case": "inline-1"}},
    )
    assert state.is_failed(), state
    assert BAD in (state.message or "") and "1 of 5" in (state.message or "")
    fleet_id = state.state_details.flow_run_id

    rows = {r["target"]: r for r in _table(fleet_id)}
    assert set(rows) == {*GOOD, BAD}
    for name in GOOD:
        assert rows[name]["state"] == "Completed", rows[name]
        assert rows[name]["backup_id"], rows[name]
    assert rows[BAD]["state"] == "Failed"
    assert rows[BAD]["error"] and WRONG_PASSWORD not in rows[BAD]["error"]

    repo = make_local_repo(fleet.repo)
    catalog = Catalog(repo)
    manifests = {}
    for name in GOOD:
        found = [m for m in catalog.list("postgresql", name) if m.labels.get("case") == "inline-1"]
        assert len(found) == 1, (name, found)
        manifests[name] = found[0]
        assert found[0].backup_id == rows[name]["backup_id"]
        assert found[0].details["databases"][0]["name"] == fleet.databases[name]
    assert not catalog.list("postgresql", BAD)

    # per_host_limit=1: the backups of the one host never overlapped
    spans = sorted((m.started_at, m.finished_at) for m in manifests.values())
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start, spans

    events = [
        e
        for e in read_events(repo)
        if e.action == "backup" and e.details.get("flow_run_id") == str(fleet_id)
    ]
    by_target = {e.target: e for e in events}
    assert len(events) == len(by_target) == 5, [(e.target, e.result) for e in events]
    for name in GOOD:
        event = by_target[name]
        assert event.result == "success" and event.backup_id == rows[name]["backup_id"]
        assert event.details["mode"] == "inline"
        assert event.checksums == {a.name: a.stored_sha256 for a in manifests[name].artifacts}
    assert by_target[BAD].result == "failure" and by_target[BAD].backup_id is None
    assert "error" in by_target[BAD].details
    assert WRONG_PASSWORD not in json.dumps(by_target[BAD].model_dump(mode="json"))
    # and one event for the fleet run itself (its audit hook)
    fleet_events = [
        e
        for e in read_events(repo)
        if e.action == "backup-fleet" and e.details.get("flow_run_id") == str(fleet_id)
    ]
    assert len(fleet_events) == 1 and fleet_events[0].result == "failure"


def test_inline_fleet_waits_for_a_target_lock_held_elsewhere(fleet: Fleet) -> None:
    from flows.locks import target_lock
    from strongroom.catalog import Catalog

    catalog = Catalog(make_local_repo(fleet.repo))

    def backups(target: str) -> list[Any]:
        return [
            m for m in catalog.list("postgresql", target) if m.labels.get("case") == "inline-lock"
        ]

    held = threading.Event()
    released_at: list[float] = []
    free_done_while_held: list[bool] = []

    def hold() -> None:
        with target_lock("postgresql", GOOD[0]):
            held.set()
            # hold the lock until the other target's backup is done (or 120 s)
            deadline = time.monotonic() + 120
            while not backups(GOOD[1]) and time.monotonic() < deadline:
                time.sleep(0.2)
            free_done_while_held.append(bool(backups(GOOD[1])))
            released_at.append(time.time())

    # the thread uses this test's Prefect settings (the module's server)
    holder = threading.Thread(target=contextvars.copy_context().run, args=(hold,))
    holder.start()
    try:
        assert held.wait(60), "the test could not take the lock"
        state = _run_fleet(
            engine="postgresql",
            targets=GOOD[:2],
            mode="inline",
            per_host_limit=2,
            parameters={"labels": {"case": "inline-lock"}},
        )
    finally:
        holder.join(180)
    assert state.is_completed(), state
    # the free target did not wait for the held one; the held one began only after
    # the other holder let go
    assert free_done_while_held == [True]
    locked = backups(GOOD[0])
    assert len(locked) == 1 and len(backups(GOOD[1])) == 1
    assert locked[0].started_at.timestamp() >= released_at[0]


def test_inline_fleet_waits_for_the_host_limit_held_by_another_fleet(fleet: Fleet) -> None:
    """Another fleet holds the host's only slot: this one waits (asking again every half
    second, flows.locks.hold_slots) and backs up once the slot is free."""
    from flows.locks import ensure_limit, hold_slots, host_limit_name
    from strongroom.catalog import Catalog

    catalog = Catalog(make_local_repo(fleet.repo))
    names = [host_limit_name(fleet.pg.host)]
    held = threading.Event()
    released_at: list[float] = []

    async def opened(client: Any) -> int:
        from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

        runs = await client.read_task_runs(
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=["fleet-open-repository"]))
        )
        return sum(1 for r in runs if r.state and r.state.is_completed())

    before = _api(opened)

    async def hold() -> None:
        from prefect.client.orchestration import get_client

        await ensure_limit(names[0], 1, update=True)
        async with hold_slots(names), get_client() as client:
            held.set()
            # keep the slot until the fleet below is past its start and asking for it
            deadline = time.monotonic() + 90
            while await opened(client) == before and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            await asyncio.sleep(2)
            released_at.append(time.time())

    holder = threading.Thread(target=contextvars.copy_context().run, args=(asyncio.run, hold()))
    holder.start()
    try:
        assert held.wait(60), "the test could not take the host slot"
        state = _run_fleet(
            engine="postgresql",
            targets=GOOD[2:],
            mode="inline",
            per_host_limit=1,
            parameters={"labels": {"case": "inline-host"}},
        )
    finally:
        holder.join(120)
    assert state.is_completed(), state
    made = [
        m
        for name in GOOD[2:]
        for m in catalog.list("postgresql", name)
        if m.labels.get("case") == "inline-host"
    ]
    assert len(made) == 2
    assert min(m.started_at.timestamp() for m in made) >= released_at[0]
    rows = {r["target"]: r for r in _table(state.state_details.flow_run_id)}
    assert max(r["waited_s"] for r in rows.values()) > 0, rows  # it did wait for the slot


def test_inline_is_for_backups_only(fleet: Fleet) -> None:
    state = _run_fleet(engine="postgresql", kind="wal-check", targets=GOOD[:1], mode="inline")
    assert state.is_failed()
    assert "inline" in (state.message or "")
