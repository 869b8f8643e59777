"""A local Prefect server and process worker, started and stopped by PID.

Used by ``make up`` / ``make down`` (strongroom/deploy/up.py) and by the server-based
tests. Both processes are started with a parent-death signal (see
strongroom.sandbox._process.spawn): if their parent dies, they stop too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Self

from strongroom.sandbox._process import (
    PORT_ATTEMPTS,
    ServerStartError,
    listens_on,
    spawn,
    stop_process,
    wait_until,
)
from strongroom.sandbox.ports import free_port

ROOT = Path(__file__).resolve().parents[2]  # the project: strongroom/deploy/<this>
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def prefect_command() -> list[str]:
    script = Path(sys.executable).parent / "prefect"
    return [str(script)] if script.exists() else [sys.executable, "-m", "prefect"]


def base_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for Prefect processes: isolated home, no analytics, no proxy
    for loopback, no inherited API URL/key/profile."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE", "PREFECT_UI_URL")
    }
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        NO_PROXY=",".join(filter(None, [env.get("NO_PROXY", ""), "127.0.0.1", "localhost"])),
    )
    env.update(extra or {})
    return env


class PrefectServer:
    """``prefect server start`` on 127.0.0.1 (SQLite under ``home``), UI included."""

    host = "127.0.0.1"

    def __init__(
        self, home: Path, *, port: int | None = None, settings: Mapping[str, str] | None = None
    ) -> None:
        self.home = home
        self.log_path = home / "server.log"
        self._fixed_port = port
        self.port = port or 0
        self.settings = dict(settings or {})
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def start(self, timeout: float = 120) -> Self:
        self.home.mkdir(parents=True, exist_ok=True)
        for attempt in range(PORT_ATTEMPTS):
            self.port = self._fixed_port or free_port()
            env = base_env(
                self.home,
                {
                    "PREFECT_UI_URL": self.url,
                    "PREFECT_UI_API_URL": self.api_url,
                    **self.settings,
                },
            )
            self.log_path.write_text("")
            self.proc = spawn(
                [
                    *prefect_command(),
                    "server",
                    "start",
                    "--host",
                    self.host,
                    "--port",
                    str(self.port),
                ],
                log_path=self.log_path,
                cwd=self.home,
                env=env,
            )
            try:
                wait_until(
                    "prefect server",
                    self._ready,
                    self.proc,
                    [self.log_path],
                    timeout=timeout,
                    interval=0.5,
                )
                return self
            except ServerStartError as exc:
                self.stop()
                if not exc.port_conflict or self._fixed_port or attempt == PORT_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _ready(self) -> bool:
        assert self.proc is not None
        if not listens_on(self.proc.pid, [self.port]):
            return False
        with _NO_PROXY.open(f"{self.api_url}/health", timeout=2) as response:
            return bool(json.loads(response.read()))

    def stop(self) -> None:
        stop_process(self.proc, [(signal.SIGTERM, 20.0)])
        self.proc = None


class ProcessWorker:
    """``prefect worker start --type process`` polling one pool; runs flows in ``cwd``.

    With ``warm`` (the default) a warm starter (strongroom.deploy.warm) runs beside it
    and the worker's runs are forked from it when the pool's flow-run command is
    strongroom.deploy.engine_start (what ``strongroom bootstrap`` sets on process pools).
    """

    def __init__(
        self,
        pool: str,
        api_url: str,
        home: Path,
        *,
        cwd: Path = ROOT,
        query_seconds: float = 10,
        limit: int | None = None,
        env: Mapping[str, str] | None = None,
        warm: bool = True,
    ) -> None:
        self.pool = pool
        self.api_url = api_url
        self.home = home
        self.cwd = cwd
        self.log_path = home / f"worker-{pool}.log"
        self.query_seconds = query_seconds
        self.limit = limit
        self.extra_env = dict(env or {})
        self.warm = warm
        self.warm_socket = home / f"warm-{pool}.sock"
        self.warm_log_path = home / f"warm-{pool}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.warm_proc: subprocess.Popen[bytes] | None = None

    def _start_warm(self, env: dict[str, str], timeout: float) -> None:
        self.warm_log_path.write_text("")
        self.warm_proc = spawn(
            [sys.executable, "-m", "strongroom.deploy.warm", str(self.warm_socket)],
            log_path=self.warm_log_path,
            cwd=self.cwd,
            env=env,
        )
        wait_until(
            "warm starter",
            lambda: "ready on" in self.warm_log_path.read_text(),
            self.warm_proc,
            [self.warm_log_path],
            timeout=timeout,
            interval=0.2,
        )

    def start(self, timeout: float = 60) -> Self:
        self.home.mkdir(parents=True, exist_ok=True)
        env = base_env(
            self.home,
            {
                "PREFECT_API_URL": self.api_url,
                "PREFECT_WORKER_QUERY_SECONDS": str(self.query_seconds),
                "PREFECT_WORKER_HEARTBEAT_SECONDS": str(max(self.query_seconds, 5)),
                "PREFECT_WORKER_PREFETCH_SECONDS": "5",
                **self.extra_env,
            },
        )
        if self.warm:
            self._start_warm(env, timeout)
            env["STRONGROOM_WARM_SOCKET"] = str(self.warm_socket)
        cmd = [
            *prefect_command(),
            "worker",
            "start",
            "--pool",
            self.pool,
            "--type",
            "process",
            "--name",
            f"strongroom-{self.pool}",
        ]
        if self.limit:
            cmd += ["--limit", str(self.limit)]
        self.log_path.write_text("")
        self.proc = spawn(cmd, log_path=self.log_path, cwd=self.cwd, env=env)
        wait_until(
            "prefect worker", self._ready, self.proc, [self.log_path], timeout=timeout, interval=0.5
        )
        return self

    def _ready(self) -> bool:
        return "started" in self.log_path.read_text().lower()

    def stop(self) -> None:
        # SIGTERM lets the worker hand back what it holds; it goes before the server.
        stop_process(self.proc, [(signal.SIGTERM, 20.0)])
        self.proc = None
        stop_process(self.warm_proc, [(signal.SIGTERM, 20.0)])
        self.warm_proc = None
