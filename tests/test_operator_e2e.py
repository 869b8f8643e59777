"""Operator paths end to end: a real ``prefect server``, ``strongroom bootstrap`` onto a
``process`` work pool, a process worker, ``prefect deployment run ... --watch`` from a
shell, automations posting to a local HTTP receiver standing in for Slack, and the
backup fleet fanning out over several targets.

One server and one worker serve the whole module (they are slow to start).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest
import yaml
from pyrage import x25519

from strongroom.deploy.local_server import ROOT, PrefectServer, ProcessWorker, prefect_command
from strongroom.sandbox._process import log_tail
from strongroom.sandbox.postgres import PostgresServer
from tests.fixtures.prefect_server import FlakyProxy, WebhookReceiver, prefect_server
from tests.fixtures.smtp_server import SmtpReceiver
from tests.fixtures.strongroom_fixtures import TEST_PUBLIC_KEY, TEST_SIGNER, make_local_repo

pytestmark = pytest.mark.slow

__all__ = ["prefect_server"]

POOL = "e2e-local"


@dataclass
class Stack:
    server: PrefectServer
    worker: ProcessWorker
    slack: WebhookReceiver  # also the generic webhook's receiver (path /webhook)
    smtp: SmtpReceiver
    pg: PostgresServer
    database: str
    repo: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def cli(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PREFECT_API_URL": self.server.api_url, "COLUMNS": "250"}
        return subprocess.run(
            [*prefect_command(), *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=timeout,
        )

    def run(self, deployment: str, **params: Any) -> subprocess.CompletedProcess[str]:
        """``prefect deployment run NAME --param k=v ... --watch``."""
        argv = ["deployment", "run", deployment, "--watch", "--watch-interval", "1"]
        for key, value in params.items():
            text = value if isinstance(value, str) else json.dumps(value)
            argv += ["--param", f"{key}={text}"]
        return self.cli(*argv)

    def run_api(self, deployment: str, **params: Any) -> Any:
        """The same through the Python client (no CLI start-up): the finished FlowRun."""
        from prefect.deployments import run_deployment

        return run_deployment(
            deployment, parameters=params, timeout=300, poll_interval=1, as_subflow=False
        )


def _api(fn: Any) -> Any:
    from prefect.client.orchestration import get_client

    async def run() -> Any:
        async with get_client() as client:
            return await fn(client)

    return asyncio.run(run())


def _flow_run_id(output: str) -> str:
    for line in output.splitlines():
        if "UUID:" in line:
            return line.split("UUID:")[1].strip()
    raise AssertionError(f"no flow run id in output:\n{output}")


def _explain(stack: Stack, result: subprocess.CompletedProcess[str]) -> str:
    return (
        f"exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n"
        f"{result.stderr[-3000:]}\n--- worker log\n{log_tail(stack.worker.log_path, 60)}"
    )


@pytest.fixture(scope="module")
def stack(
    prefect_server: PrefectServer, pg_server: PostgresServer, tmp_path_factory: Any
) -> Iterator[Stack]:
    from strongroom.deploy.bootstrap import bootstrap, load_config

    tmp = tmp_path_factory.mktemp("e2e")
    repo = tmp / "repo"
    database = f"e2e_{uuid.uuid4().hex[:8]}"
    pg_server.create_database(database)
    pg_server.psql(
        "CREATE TABLE orders (id int PRIMARY KEY, item text);"
        "INSERT INTO orders SELECT g, 'item ' || g FROM generate_series(1, 500) g;",
        db=database,
    )
    identity = x25519.Identity.generate()
    target = {
        "host": pg_server.host,
        "port": pg_server.port,
        "user": pg_server.superuser,
        "password": "${E2E_PG_PASSWORD}",
        "databases": [database],
    }
    smtp_password = f"s3cr:t/{uuid.uuid4().hex[:6]}@&?"
    with WebhookReceiver() as slack, SmtpReceiver(tmp, "alerts@example.com", smtp_password) as smtp:
        config = tmp / "bootstrap.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "work_pools": [
                        {"name": "e2e-k8s", "type": "kubernetes"},
                        {"name": POOL, "type": "process"},
                    ],
                    "deployments": {
                        "work_pool": POOL,
                        "exclude": [
                            # hourly/weekly schedules could start real runs mid-test
                            "backup-fleet/*-hourly",
                            "backup-fleet/*-weekly",
                            # not exercised here: fewer flow imports at deploy time
                            "*clickhouse/*",
                            "*redis/*",
                            "base-backup-postgresql/*",
                            "files-backup-postgresql/*",
                            "pitr-restore-postgresql/*",
                            "wal-check-postgresql/*",
                        ],
                    },
                    "blocks": {
                        "strongroom-postgres-target": {"e2e-pg": target},
                        "strongroom-repository": {
                            "default": {
                                "local_path": str(repo),
                                "trusted_signers": [TEST_PUBLIC_KEY],
                                "signing_key": {"private_key": "${E2E_SIGNING_KEY}"},
                            }
                        },
                        "strongroom-encryption-key": {
                            "default": {
                                "recipients": [str(identity.to_public())],
                                "identity": "${E2E_AGE_IDENTITY}",
                            }
                        },
                    },
                    "notifications": {
                        "slack": {"webhook_url": f"{slack.url}/slack"},
                        "webhook": {"url": f"{slack.url}/webhook"},
                        "email": {
                            "sender_email": "strongroom@example.com",
                            "to": ["oncall@example.com"],
                            "smtp": {
                                "host": smtp.host,
                                "port": smtp.port,
                                "security": "none",
                                "username": smtp.username,
                                "password": "${E2E_SMTP_PASSWORD}",
                            },
                        },
                    },
                }
            )
        )
        env = {
            "E2E_PG_PASSWORD": pg_server.password,
            "E2E_AGE_IDENTITY": str(identity),
            "E2E_SIGNING_KEY": TEST_SIGNER.private_pem().get_secret_value(),
            "E2E_SMTP_PASSWORD": smtp_password,
        }
        started = time.monotonic()
        report = bootstrap(load_config(config, env={**os.environ, **env}))
        assert "backup-postgresql/on-demand" in report["deployments"]["deployed"]
        assert report["automations"]["automations"]["strongroom-run-failed"] == "created"
        worker = ProcessWorker(POOL, prefect_server.api_url, prefect_server.home, query_seconds=1)
        worker.start()
        stack = Stack(prefect_server, worker, slack, smtp, pg_server, database, repo)
        stack.extra["bootstrap_s"] = round(time.monotonic() - started, 1)
        try:
            yield stack
        finally:
            worker.stop()
            pg_server.drop_database(database)


def _save_target(name: str, pg: PostgresServer, database: str, **overrides: Any) -> None:
    from blocks import PostgresTarget

    values: dict[str, Any] = {
        "host": pg.host,
        "port": pg.port,
        "user": pg.superuser,
        "password": pg.password,
        "databases": [database],
        **overrides,
    }
    PostgresTarget(**values).save(name, overwrite=True)


def _task_runs(flow_run_id: str, prefix: str = "backup-", timeout: float = 30) -> list[Any]:
    """The run's task runs named ``prefix*``, once all are final: task run states reach
    the API as events, possibly just after the flow run's final state."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read(client: Any) -> list[Any]:
        deadline = time.monotonic() + timeout
        while True:
            runs = [
                r
                for r in await client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(flow_run_id)]))
                )
                if r.name.startswith(prefix)
            ]
            done = runs and all(r.state and r.state.is_final() for r in runs)
            if done or time.monotonic() > deadline:
                return runs
            await asyncio.sleep(0.5)

    return _api(read)


def _logs(flow_run_id: str, *needles: str, timeout: float = 30) -> str:
    """The run's log; waits (up to ``timeout``) until every needle is in it: run logs
    reach the API in batches, possibly after the run's final state."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async def read(client: Any) -> str:
        deadline = time.monotonic() + timeout
        while True:
            logs = await client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[uuid.UUID(flow_run_id)]))
            )
            text = "\n".join(line.message for line in logs)
            if all(n in text for n in needles) or time.monotonic() > deadline:
                return text
            await asyncio.sleep(0.5)

    return _api(read)


# ---- tests (in file order: each is independent of the others' results) ------------------


def test_cron_deployments_get_scheduled_runs(stack: Stack) -> None:
    async def scheduled(client: Any) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        for name in ("postgresql-daily", "redis-daily", "clickhouse-daily"):
            deployment = await client.read_deployment_by_name(f"backup-fleet/{name}")
            from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

            runs = await client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
            )
            out[name] = [r for r in runs if r.state and r.state.is_scheduled()]
        return out

    deadline = time.monotonic() + 60
    runs = _api(scheduled)
    while not all(runs.values()) and time.monotonic() < deadline:
        time.sleep(1)
        runs = _api(scheduled)
    expected = {"postgresql-daily": (2, 0), "clickhouse-daily": (2, 30), "redis-daily": (3, 0)}
    for name, (hour, minute) in expected.items():
        assert runs[name], f"no scheduled runs for backup-fleet/{name}"
        for run in runs[name]:
            at = run.expected_start_time.astimezone(UTC)
            assert (at.hour, at.minute) == (hour, minute), (name, at)
            assert "strongroom" in run.tags


def test_restore_by_deployment_run_with_backup_id(stack: Stack) -> None:
    backup = stack.run("backup-postgresql/on-demand", target="e2e-pg")
    assert backup.returncode == 0, _explain(stack, backup)
    from strongroom.catalog import Catalog

    backup_id = Catalog(make_local_repo(stack.repo)).list("postgresql", "e2e-pg")[-1].backup_id
    into = f"{stack.database}_restored"
    restore = stack.run(
        "restore-postgresql/on-demand",
        target="e2e-pg",
        backup_id=backup_id,
        target_database=into,
    )
    try:
        assert restore.returncode == 0, _explain(stack, restore)
        assert "Completed" in restore.stdout
        assert stack.pg.psql("SELECT count(*) FROM orders", db=into) == "500"
    finally:
        stack.pg.drop_database(into)


def test_bad_parameters_exit_nonzero_with_readable_errors(stack: Stack) -> None:
    missing = "20200101T000000Z-abcdef"
    result = stack.run(
        "restore-postgresql/on-demand",
        target="e2e-pg",
        backup_id=missing,
        target_database="never_created",
    )
    assert result.returncode != 0, _explain(stack, result)
    logs = _logs(_flow_run_id(result.stdout), missing, "NotFound")
    assert missing in logs and "NotFound" in logs, logs[-3000:]
    # a value of the wrong type is refused before any run starts
    wrong = stack.run("restore-postgresql/on-demand", target="e2e-pg", jobs="many")
    assert wrong.returncode != 0
    text = wrong.stdout + wrong.stderr
    assert "jobs" in text and "valid" in text.lower(), text[-2000:]
    # a required parameter left out
    absent = stack.cli("deployment", "run", "backup-postgresql/on-demand")
    assert absent.returncode != 0
    assert "target" in absent.stdout + absent.stderr


def test_retries_on_transient_failures_and_not_on_permanent(stack: Stack) -> None:
    # The first attempt's connections are cut (3 = the engine's own connect attempts):
    # the task fails with ServiceUnavailable, is retried, and the retry gets through.
    with FlakyProxy((stack.pg.host, stack.pg.port), drop_first=3) as proxy:
        _save_target("e2e-flaky", stack.pg, stack.database, port=proxy.port)
        flaky = stack.run_api("backup-postgresql/on-demand", target="e2e-flaky")
        assert flaky.state.is_completed(), (flaky.state, log_tail(stack.worker.log_path, 60))
        assert proxy.accepted > 3
    runs = _task_runs(str(flaky.id))
    assert [r.run_count for r in runs] == [2], [(r.name, r.run_count) for r in runs]

    _save_target("e2e-badpass", stack.pg, stack.database, password="not-the-password-1")
    denied = stack.run_api("backup-postgresql/on-demand", target="e2e-badpass")
    assert denied.state.is_failed(), denied.state
    runs = _task_runs(str(denied.id))
    assert [r.run_count for r in runs] == [1], [(r.name, r.run_count) for r in runs]
    assert "credentials refused" in _logs(str(denied.id), "credentials refused")


def test_failed_run_posts_one_slack_message_and_a_successful_one_none(stack: Stack) -> None:
    ok = stack.run_api("backup-postgresql/on-demand", target="e2e-pg")
    assert ok.state.is_completed(), ok.state
    failed = stack.run_api("backup-postgresql/on-demand", target="no-such-target")
    assert failed.state.is_failed(), failed.state

    def mentions(run_id: Any, path: str = "/slack") -> Any:
        return lambda m: m["path"] == path and str(run_id) in json.dumps(m["json"])

    found = stack.slack.wait_for(mentions(failed.id), timeout=60)
    assert found, f"no Slack message; received: {stack.slack.messages}"
    time.sleep(3)  # a duplicate would arrive right behind the first
    messages = stack.slack.matching(mentions(failed.id))
    assert len(messages) == 1, messages
    message = messages[0]
    assert message["path"] == "/slack"
    assert set(message["json"]) == {"text"}  # a Slack incoming-webhook payload
    text = message["json"]["text"]
    assert "backup-postgresql/on-demand" in text
    assert "Failed" in text
    assert "no-such-target" in text  # the target
    assert "Unable to find block document named no-such-target" in text  # the error
    assert f"{stack.server.url}/runs/flow-run/{failed.id}" in text  # the link
    assert not stack.slack.matching(mentions(ok.id))

    # the same failure by email through the SMTP server (authenticated) ...
    mails = stack.smtp.wait_for(str(failed.id), timeout=60)
    assert len(mails) == 1, [m["Subject"] for m in stack.smtp.messages()]
    mail = mails[0]
    assert mail["To"] == "oncall@example.com"
    assert "strongroom@example.com" in mail["From"]
    assert "backup-postgresql Failed" in mail["Subject"]
    assert not stack.smtp.wait_for(str(ok.id), timeout=0)
    # ... and to the generic webhook, as strongroom's JSON payload
    hooks = stack.slack.wait_for(mentions(failed.id, "/webhook"), timeout=60)
    assert hooks, f"no webhook call; received: {stack.slack.messages}"
    assert any(h["json"].get("source") == "strongroom" for h in hooks), hooks
    assert all(stack.smtp.password not in json.dumps(h["json"]) for h in hooks)


def test_backup_fleet_runs_each_target_as_its_own_flow_run(stack: Stack) -> None:
    targets = [f"e2e-fleet-{i}" for i in range(3)]
    for name in targets:
        _save_target(name, stack.pg, stack.database)
    result = stack.run(
        "backup-fleet/on-demand",
        engine="postgresql",
        targets=targets,
        per_host_limit=2,
        poll_s=1,
    )
    assert result.returncode == 0, _explain(stack, result)
    fleet_id = _flow_run_id(result.stdout)

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    async def children(client: Any) -> list[Any]:
        runs: list[Any] = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[uuid.UUID(fleet_id)])
            )
        )
        return runs

    runs = _api(children)
    assert sorted(r.parameters["target"] for r in runs) == targets
    assert all(r.state and r.state.is_completed() for r in runs)
    # each child was forked by the worker's warm starter (not a fresh interpreter)
    warm_log = stack.worker.warm_log_path.read_text()
    for run in runs:
        assert f"started for flow run {run.id}" in warm_log, warm_log[-2000:]
    assert all({"strongroom", "fleet"} <= set(r.tags) for r in runs)
    # never more than per_host_limit (2) running against the one host at a time
    spans = sorted((r.start_time, r.end_time) for r in runs)
    peak = max(sum(1 for s, e in spans if s <= start < e) for start, _ in spans)
    assert peak <= 2, spans

    from strongroom.catalog import Catalog

    catalog = Catalog(make_local_repo(stack.repo))
    for name in targets:
        assert catalog.list("postgresql", name), f"no backup of {name}"

    async def artifacts(client: Any) -> list[Any]:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        found: list[Any] = await client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(
                    any_=[
                        "backup-fleet-postgresql-backup-table",
                        "backup-fleet-postgresql-backup-summary",
                    ]
                )
            )
        )
        return found

    found = _api(artifacts)
    assert {a.key for a in found} == {
        "backup-fleet-postgresql-backup-table",
        "backup-fleet-postgresql-backup-summary",
    }
    table = next(a for a in found if a.key.endswith("table"))
    assert sorted(row["target"] for row in json.loads(table.data)) == targets


def test_inline_fleet_in_batches_of_targets_per_run(stack: Stack) -> None:
    targets = [f"e2e-batch-{i}" for i in range(3)]
    for name in targets:
        _save_target(name, stack.pg, stack.database)
    result = stack.run(
        "backup-fleet/on-demand",
        engine="postgresql",
        targets=targets,
        mode="inline",
        targets_per_run=2,
        per_host_limit=2,
        poll_s=1,
    )
    assert result.returncode == 0, _explain(stack, result)
    fleet_id = _flow_run_id(result.stdout)

    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )

    async def children(client: Any) -> list[Any]:
        runs: list[Any] = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[uuid.UUID(fleet_id)])
            )
        )
        return runs

    runs = _api(children)
    # two batch runs of the fleet's own deployment, inline, 2 + 1 targets
    assert sorted(len(r.parameters["targets"]) for r in runs) == [1, 2]
    assert all(r.parameters["mode"] == "inline" for r in runs)
    assert sorted(t for r in runs for t in r.parameters["targets"]) == targets
    assert all(r.state and r.state.is_completed() for r in runs)

    async def table(client: Any) -> list[dict[str, Any]]:
        found = await client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[uuid.UUID(fleet_id)])
            )
        )
        data = next(a.data for a in found if a.key == "backup-fleet-postgresql-backup-table")
        rows: list[dict[str, Any]] = json.loads(data)
        return rows

    rows = {r["target"]: r for r in _api(table)}
    assert set(rows) == set(targets)
    from strongroom.catalog import Catalog

    catalog = Catalog(make_local_repo(stack.repo))
    for name in targets:
        assert rows[name]["state"] == "Completed", rows[name]
        assert rows[name]["flow_run"] in {r.name for r in runs}
        ids = [m.backup_id for m in catalog.list("postgresql", name)]
        assert rows[name]["backup_id"] in ids, (rows[name], ids)


def test_two_backups_of_one_target_never_overlap(stack: Stack) -> None:
    from prefect.deployments import run_deployment

    started: list[Any] = [
        run_deployment(
            "backup-postgresql/on-demand",
            parameters={"target": "e2e-pg"},
            timeout=0,
            as_subflow=False,
        )
        for _ in range(2)
    ]

    async def wait(client: Any) -> list[Any]:
        deadline = time.monotonic() + 240
        while True:
            runs = [await client.read_flow_run(r.id) for r in started]
            if all(r.state and r.state.is_final() for r in runs) or time.monotonic() > deadline:
                return runs
            await asyncio.sleep(1)

    runs = _api(wait)
    assert all(r.state.is_completed() for r in runs), [r.state for r in runs]
    spans = []
    for run in runs:
        dumps = _task_runs(str(run.id))
        spans.append((dumps[0].start_time, dumps[0].end_time))
    first, second = sorted(spans)
    assert first[1] <= second[0], f"the two backups of e2e-pg overlapped: {spans}"
