"""``make up`` / ``make down``: strongroom in the Prefect UI on this machine.

``up`` starts a supervisor process in the background and returns once everything is
ready. The supervisor starts, in order: throwaway PostgreSQL (with sample data), Redis
and ClickHouse (when installed), a Prefect server with its UI on 127.0.0.1, runs
``strongroom bootstrap`` (blocks for those servers, a local repository, an encryption
key, the ``strongroom-local`` process pool and every deployment, automations) and
starts a process worker. Everything it started stops when it gets SIGTERM.

``down`` stops exactly that supervisor (checked by PID and process start time, so a
reused PID is never signalled); its servers stop with it (worker first, then the
Prefect server, then the databases). State lives in .strongroom-demo/up/.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # the project: strongroom/deploy/<this>
STATE_DIR = Path(os.environ.get("STRONGROOM_UP_DIR", ROOT / ".strongroom-demo" / "up"))
STATE_FILE = STATE_DIR / "state.json"
LOG_FILE = STATE_DIR / "supervisor.log"
POOL = "strongroom-local"
UP_TIMEOUT_S = float(os.environ.get("STRONGROOM_UP_TIMEOUT", "300"))
# How often the process worker asks for runs to start (PREFECT_WORKER_QUERY_SECONDS)
WORKER_QUERY_S = 1.0


def _identity(pid: int) -> str | None:
    from strongroom.sandbox._process import _process_identity

    return _process_identity(pid)


def _read_state() -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(STATE_FILE.read_text())
        return data
    except (OSError, ValueError):
        return None


def _alive(state: dict[str, Any]) -> bool:
    return bool(state.get("identity")) and _identity(int(state["pid"])) == state["identity"]


def _print_ready(state: dict[str, Any]) -> None:
    print(f"Prefect UI:  {state['ui_url']}")
    print(f"Prefect API: {state['api_url']}   (export PREFECT_API_URL={state['api_url']})")
    print(f"work pool:   {POOL} (process worker running)")
    for name, where in state.get("targets", {}).items():
        print(f"target:      {name} -> {where}")
    print(f"repository:  {state.get('repository')}")
    print("try:")
    print(f"  export PREFECT_API_URL={state['api_url']}")
    print("  prefect deployment run 'backup-postgresql/on-demand' --param target=demo-pg --watch")
    print("  prefect deployment run 'backup-fleet/on-demand' --param engine=postgresql --watch")
    print("  prefect deployment run 'restore-postgresql/on-demand' --param target=demo-pg \\")
    print("      --param target_database=shop_restored --watch")
    print("stop everything with: make down")


def up() -> int:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    state = _read_state()
    if state and _alive(state):
        if state.get("ready"):
            print("already up")
            _print_ready(state)
            return 0
        print(f"a previous `make up` (pid {state['pid']}) is still starting; see {LOG_FILE}")
        return 1
    STATE_FILE.unlink(missing_ok=True)
    with open(LOG_FILE, "wb") as log:
        # A new session and no parent-death signal: the supervisor outlives `make up`.
        proc = subprocess.Popen(
            [sys.executable, "-m", "strongroom.deploy.up", "serve"],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    print(f"starting (supervisor pid {proc.pid}, log {LOG_FILE}) ...", flush=True)
    deadline = time.monotonic() + UP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            print(f"start-up failed (exit {proc.returncode}); last lines of {LOG_FILE}:")
            print("\n".join(LOG_FILE.read_text(errors="replace").splitlines()[-30:]))
            return 1
        state = _read_state()
        if state and state.get("ready"):
            _print_ready(state)
            return 0
        time.sleep(0.5)
    print(f"not ready after {UP_TIMEOUT_S:.0f} s; stopping it (see {LOG_FILE})")
    proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(60)
    return 1


def down() -> int:
    state = _read_state()
    if not state:
        print("nothing to stop (no .strongroom-demo/up/state.json)")
        return 0
    pid = int(state["pid"])
    if not _alive(state):
        print(f"supervisor {pid} is not running any more; cleaning up its state file")
        STATE_FILE.unlink(missing_ok=True)
        return 0
    print(f"stopping supervisor {pid} and what it started ...", flush=True)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and _identity(pid) == state["identity"]:
        time.sleep(0.3)
    if _identity(pid) == state["identity"]:
        print(
            f"supervisor {pid} did not stop in 90 s: SIGKILL (its servers get their "
            "parent-death signal)"
        )
        os.kill(pid, signal.SIGKILL)
    STATE_FILE.unlink(missing_ok=True)
    print("stopped")
    return 0


# ---- the supervisor ------------------------------------------------------------------------


def _write_state(**values: Any) -> None:
    state = _read_state() or {}
    state.update(values)
    tmp = STATE_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(STATE_FILE)


def serve() -> int:
    from pyrage import x25519

    from strongroom.deploy.local_server import PrefectServer, ProcessWorker
    from strongroom.sandbox.ports import free_port
    from strongroom.sandbox.postgres import PostgresServer
    from strongroom.signing import key_file_signer

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    _write_state(pid=os.getpid(), identity=_identity(os.getpid()), ready=False)
    engines = os.environ.get("STRONGROOM_UP_ENGINES", "postgresql,redis,clickhouse").split(",")
    stops: list[Callable[[], None]] = []
    targets: dict[str, str] = {}
    blocks: dict[str, dict[str, dict[str, Any]]] = {}
    secrets_env: dict[str, str] = {}

    def log(message: str) -> None:
        print(time.strftime("%H:%M:%S"), message, flush=True)

    try:
        pg = PostgresServer()
        pg.start()
        stops.append(pg.cleanup)
        log(f"PostgreSQL on 127.0.0.1:{pg.port}")
        pg.create_database("shop")
        import psycopg

        from strongroom.sample_data import load_sample_data

        with psycopg.connect(pg.dsn("shop"), autocommit=True) as conn:
            load_sample_data(conn, int(os.environ.get("STRONGROOM_UP_SAMPLE_MB", "20")))
        secrets_env["UP_PG_PASSWORD"] = pg.password
        blocks.setdefault("strongroom-postgres-target", {})["demo-pg"] = {
            "host": pg.host,
            "port": pg.port,
            "user": pg.superuser,
            "password": "${UP_PG_PASSWORD}",
            "databases": ["shop"],
        }
        targets["demo-pg"] = f"postgresql://127.0.0.1:{pg.port}/shop"

        if "redis" in engines and _have("redis-server") and _block_type("strongroom-redis-target"):
            from strongroom.sandbox.redis import RedisServer

            redis = RedisServer()
            redis.start()
            stops.append(redis.stop)
            secrets_env["UP_REDIS_PASSWORD"] = redis.password
            blocks["strongroom-redis-target"] = {
                "demo-redis": {
                    "host": redis.host,
                    "port": redis.port,
                    "password": "${UP_REDIS_PASSWORD}",
                }
            }
            targets["demo-redis"] = f"redis://127.0.0.1:{redis.port}"
            log(f"Redis on 127.0.0.1:{redis.port}")
        if (
            "clickhouse" in engines
            and _have("clickhouse-server")
            and _block_type("strongroom-clickhouse-target")
        ):
            from strongroom.sandbox.clickhouse import ClickHouseServer

            ch = ClickHouseServer()
            ch.start()
            stops.append(ch.stop)
            blocks["strongroom-clickhouse-target"] = {
                "demo-clickhouse": {
                    "host": ch.host,
                    "port": ch.tcp_port,
                    "http_port": ch.http_port,
                }
            }
            targets["demo-clickhouse"] = f"clickhouse http://127.0.0.1:{ch.http_port}"
            log(f"ClickHouse on 127.0.0.1:{ch.http_port}")

        port = int(os.environ.get("STRONGROOM_UP_PORT", "4200"))
        with contextlib.closing(socket.socket()) as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                port = free_port()
        server = PrefectServer(STATE_DIR / "prefect", port=port)
        server.start()
        stops.append(server.stop)
        log(f"Prefect server on {server.url}")

        identity_file = STATE_DIR / "age-identity.txt"
        if not identity_file.exists():
            identity_file.touch(mode=0o600)
            identity_file.write_text(str(x25519.Identity.generate()) + "\n")
        identity = x25519.Identity.from_str(identity_file.read_text().strip())
        secrets_env["UP_AGE_IDENTITY"] = str(identity)
        repository = STATE_DIR / "repository"
        signer = key_file_signer(STATE_DIR / "signing-key.pem")
        secrets_env["UP_SIGNING_KEY"] = signer.private_pem().get_secret_value()
        blocks["strongroom-repository"] = {
            "default": {
                "local_path": str(repository),
                "trusted_signers": [signer.public.pem()],
                "signing_key": {"private_key": "${UP_SIGNING_KEY}"},
            }
        }
        blocks["strongroom-encryption-key"] = {
            "default": {
                "recipients": [str(identity.to_public())],
                "identity": "${UP_AGE_IDENTITY}",
            }
        }
        config: dict[str, Any] = {
            "work_pools": [
                {"name": "strongroom-k8s", "type": "kubernetes"},
                {"name": POOL, "type": "process"},
            ],
            "deployments": {"work_pool": POOL},
            "blocks": blocks,
        }
        if os.environ.get("SLACK_WEBHOOK_URL"):
            config["notifications"] = {"slack": {"webhook_url": "${SLACK_WEBHOOK_URL}"}}

        os.environ["PREFECT_API_URL"] = server.api_url
        os.environ["PREFECT_HOME"] = str(STATE_DIR / "prefect-client")
        from prefect.settings import PREFECT_API_URL, temporary_settings

        from strongroom.deploy.bootstrap import BootstrapConfig, bootstrap, expand_env

        missing: set[str] = set()
        expanded = expand_env(config, {**os.environ, **secrets_env}, missing)
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            report = bootstrap(BootstrapConfig.model_validate(expanded))
        log(f"bootstrap: {len(report['deployments']['deployed'])} deployments")

        home = STATE_DIR / "prefect"
        worker = ProcessWorker(POOL, server.api_url, home, query_seconds=WORKER_QUERY_S)
        worker.start()
        stops.append(worker.stop)
        log("process worker polling " + POOL)
        _write_state(
            ready=True,
            ui_url=server.url,
            api_url=server.api_url,
            targets=targets,
            repository=str(repository),
            deployments=report["deployments"]["deployed"],
        )
        while not stopping.wait(1):
            pass
        log("stopping")
        return 0
    except Exception as exc:
        log(f"start-up failed: {type(exc).__name__}: {exc}")
        return 1
    finally:
        for stop in reversed(stops):  # worker, Prefect server, then the databases
            with contextlib.suppress(Exception):
                stop()
        if (_read_state() or {}).get("pid") == os.getpid():
            STATE_FILE.unlink(missing_ok=True)


def _have(tool: str) -> bool:
    import shutil

    return shutil.which(tool) is not None


def _block_type(slug: str) -> bool:
    from strongroom.deploy.bootstrap import strongroom_block_classes

    return any(c.get_block_type_slug() == slug for c in strongroom_block_classes())


def main(argv: list[str]) -> int:
    commands = {"up": up, "down": down, "serve": serve}
    if len(argv) != 1 or argv[0] not in commands:
        print("usage: python -m strongroom.deploy.up up|down", file=sys.stderr)
        return 2
    return commands[argv[0]]()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
