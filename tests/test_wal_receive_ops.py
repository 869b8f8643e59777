"""Running the WAL receiver: lag and slot figures, probes, the health flow, the manifest.

Real PostgreSQL (the archive_command cluster of test_pitr), the real CLI receiver with
``--listen`` (its HTTP endpoints read over loopback), the real ``wal-receive-health``
flow against the session's Prefect API, and the Kubernetes manifest parsed by the
CLI's own option parser.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pyrage import x25519

from strongroom.deploy.k8s import load_k8s_manifests
from strongroom.engines.postgres.wal.config import write_wal_config
from strongroom.engines.postgres.wal.receive import Receiver
from strongroom.engines.postgres.wal.receive_status import (
    Bounds,
    LagClock,
    Monitor,
    findings,
    server_status,
)
from strongroom.sandbox._process import make_temp_dir, remove_dir
from strongroom.sandbox.ports import free_port
from tests.test_pitr import Cluster, _cluster

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    root = make_temp_dir("walops")
    c = _cluster(root, "pgops", x25519.Identity.generate())
    try:
        c.sql("CREATE TABLE t (x int)")
        yield c
    finally:
        c.server.stop()
    remove_dir(root)


def _env(c: Cluster) -> dict[str, str]:
    env = c.server.libpq_env()
    env.pop("PGDATABASE", None)
    return env


def _wait(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _get(url: str) -> tuple[int, bytes]:
    try:
        with NO_PROXY.open(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def _status(base: str) -> dict[str, Any]:
    code, body = _get(f"{base}/status")
    return json.loads(body) if code == 200 else {}


def test_lag_clock_gives_the_age_of_the_oldest_position_not_covered() -> None:
    clock = LagClock(keep_s=100)
    for at, lsn in ((0.0, 100), (5.0, 200), (10.0, 200), (15.0, 300)):
        clock.observe(at, lsn)
    assert clock.seconds_behind(20.0, 300) == 0.0
    assert clock.seconds_behind(20.0, 250) == 5.0  # 300 first seen at 15
    assert clock.seconds_behind(20.0, 150) == 15.0  # 200 first seen at 5
    assert clock.seconds_behind(20.0, 50) == 20.0
    clock.observe(200.0, 400)  # older samples fall out of the window, the newest stays
    assert clock.seconds_behind(200.0, 350) == 0.0


def test_findings_name_each_bound() -> None:
    bounds = Bounds(max_lag_s=10, max_lag_bytes=1000, max_slot_retained_bytes=500)
    ok_slot = {"active": True, "restart_lsn": 900, "wal_status": "reserved"}
    assert findings({"server_lsn": 1000, "slot": ok_slot}, None, bounds) == []
    kinds = [k for k, _ in findings({"server_lsn": 1000, "slot": None}, None, bounds)]
    assert kinds == ["down"]
    idle = {"active": False, "restart_lsn": 0, "wal_status": "extended"}
    assert [k for k, _ in findings({"server_lsn": 1000, "slot": idle}, None, bounds)] == [
        "down",
        "slot-retention",
    ]
    lagging = {"streaming": True, "repository_lag_seconds": 11.0, "repository_lag_bytes": 10}
    assert [k for k, _ in findings({"server_lsn": 1000, "slot": ok_slot}, lagging, bounds)] == [
        "lagging"
    ]
    gone = findings({"server_lsn": 1000, "slot": ok_slot}, {"error": "refused"}, bounds)
    assert gone == [("down", "the receiver's /status: refused")]


def test_an_unreachable_server_is_not_ready_but_alive(cluster: Cluster) -> None:
    env = {**_env(cluster), "PGPORT": str(free_port()), "PGCONNECT_TIMEOUT": "2"}
    receiver = Receiver(_config(cluster, "pgops-down"), cluster.base / "spool-down", env=env)
    monitor = Monitor(env, "nowhere", receiver.view, interval_s=1)
    status = monitor.refresh()
    assert status["server_error"] and status["server_lsn"] is None
    ready, why = monitor.ready()
    assert not ready and "server" in why and "pg_receivewal is not running" in why
    assert monitor.live()[0]


def _config(c: Cluster, target: str) -> Any:
    from strongroom.engines.postgres.wal.config import load_wal_config

    path = write_wal_config(
        c.base / f"{target}.toml",
        target=target,
        repository=c.repo_config,
        recipients=c.enc.recipients,
    )
    return load_wal_config(str(path))


def _receiver_cli(c: Cluster, target: str, slot: str, listen: str) -> subprocess.Popen[bytes]:
    _config(c, target)
    spool = c.base / f"spool-{slot}"
    spool.mkdir(exist_ok=True)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "strongroom.cli.app",
            "wal-receive",
            target,
            *("--config", str(c.base / f"{target}.toml"), "--directory", str(spool)),
            *("--slot", slot, "--poll", "0.05", "--partial-interval", "0"),
            *("--listen", listen, "--status-interval", "0.3"),
        ],
        env={**os.environ, **_env(c)},
        stdout=subprocess.DEVNULL,
        stderr=open(c.base / f"{slot}.err", "ab"),
    )


def test_receiver_publishes_lag_slot_and_probes(cluster: Cluster, prefect_api: str) -> None:
    c = cluster
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _receiver_cli(c, "pgops-recv", "ops_recv", f"127.0.0.1:{port}")
    try:
        assert _wait("ready", lambda: _get(f"{base}/readyz")[0] == 200, 90)
        assert _get(f"{base}/healthz")[0] == 200
        # written, not switched, no partial pushes: the repository trails the server
        c.sql("INSERT INTO t SELECT g FROM generate_series(1, 20000) g")
        behind = _wait(
            "lag in bytes and seconds",
            lambda: (
                (s := _status(base)).get("repository_lag_bytes", 0) > 100_000
                and (s.get("repository_lag_seconds") or 0) >= 1.0
                and s
            ),
        )
        assert behind["slot_active"] and behind["streaming"] and behind["server_error"] == ""
        assert behind["flush_lag_bytes"] is not None and behind["slot_retained_bytes"] >= 0
        c.sql("SELECT pg_switch_wal()")  # the segment completes and is pushed
        caught_up = _wait(
            "the repository catching up",
            lambda: (s := _status(base)).get("repository_lag_seconds") == 0.0 and s,
        )
        assert caught_up["repository_lag_bytes"] < behind["repository_lag_bytes"]
        assert caught_up["pushed"] >= 1 and caught_up["last_push_at"]
        code, metrics = _get(f"{base}/metrics")
        text = metrics.decode()
        assert code == 200
        for name in ("repository_lag_bytes", "repository_lag_seconds", "slot_retained_bytes"):
            assert f'strongroom_wal_receive_{name}{{slot="ops_recv",target="pgops-recv"}}' in text

        result = _health(c, slot="ops_recv", receiver_urls={"pgops-target": base})
        assert result["ok"], result
        row = result["targets"][0]
        assert row["state"] == "OK" and row["slot_active"] is True
        assert row["repository_lag_seconds"] is not None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert proc.returncode == 0
    # the receiver is gone: the slot stays and keeps WAL; the health flow says so
    c.sql("INSERT INTO t VALUES (1)")
    c.sql("SELECT pg_switch_wal()")
    result = _health(
        c, slot="ops_recv", receiver_urls={"pgops-target": base}, max_slot_retained_bytes=1
    )
    assert not result["ok"]
    row = result["targets"][0]
    assert row["slot_active"] is False and row["slot_retained_bytes"] > 1
    assert "down" in row["state"] and "slot-retention" in row["state"], row
    assert "no receiver is streaming" in row["findings"] and "/status" in row["findings"]
    c.sql("SELECT pg_drop_replication_slot('ops_recv')")


def _health(c: Cluster, **params: Any) -> dict[str, Any]:
    """The wal-receive-health flow against the session's Prefect API (fixture in the caller)."""
    from blocks import PostgresTarget, register_all
    from flows.wal_receive_health import wal_receive_health

    register_all()
    PostgresTarget(
        host=c.conn.host,
        port=c.conn.port,
        user=c.conn.user,
        password=c.conn.password,
        sslmode=c.conn.sslmode,
        pitr=True,
    ).save("pgops-target", overwrite=True)
    state = wal_receive_health(targets=["pgops-target"], return_state=True, **params)
    assert state.is_completed(), state.message
    result: dict[str, Any] = state.result()
    return result


def test_server_status_names_the_slot_safely(cluster: Cluster) -> None:
    """The slot name travels as a psql variable, quoted by psql: a hostile name is data."""
    answer = server_status({**_env(cluster), "PGDATABASE": "postgres"}, "x'; DROP TABLE t; --")
    assert answer["slot"] is None and answer["server_lsn"] > 0
    assert cluster.sql("SELECT count(*) FROM t") != ""


def test_the_kubernetes_manifest_runs_the_cli_with_its_probes() -> None:
    import typer.main

    from strongroom.cli.app import app

    docs = {(name, d["kind"]): d for name, d in load_k8s_manifests() if name == "wal-receive.yaml"}
    deployment = docs[("wal-receive.yaml", "Deployment")]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # never two on one slot
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = container["args"]
    assert args[:2] == ["strongroom", "wal-receive"]
    group = typer.main.get_command(app)
    command = group.get_command(group.make_context("strongroom", ["wal-receive"]), "wal-receive")  # type: ignore[attr-defined]
    assert command is not None
    ctx = command.make_context("wal-receive", list(args[2:]))  # raises on an unknown option
    listen = ctx.params["listen"]
    port = int(listen.rsplit(":", 1)[1])
    assert {p["containerPort"] for p in container["ports"]} == {port}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    env = {e["name"]: e for e in container["env"]}
    assert "value" not in env["PGPASSWORD"] and env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]
    claim = {v["name"]: v for v in pod["volumes"]}["spool"]["persistentVolumeClaim"]["claimName"]
    assert ("wal-receive.yaml", "PersistentVolumeClaim") in docs
    assert docs[("wal-receive.yaml", "PersistentVolumeClaim")]["metadata"]["name"] == claim
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["spool"] == ctx.params["directory"]
    service = docs[("wal-receive.yaml", "Service")]
    assert service["spec"]["ports"][0]["port"] == port
