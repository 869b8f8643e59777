"""A throwaway redis-server on 127.0.0.1 with a random password, driven by redis-cli."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
from pathlib import Path
from typing import Self

from strongroom.sandbox._process import (
    listens_on,
    make_temp_dir,
    spawn,
    start_retrying_ports,
    stop_process,
)
from strongroom.sandbox.ports import free_port

# redis-cli prints error replies on stdout and exits 0 when stdout is not a tty.
_ERROR_REPLY = re.compile(
    r"^(ERR|NOAUTH|WRONGPASS|WRONGTYPE|NOPERM|BUSY\w*|LOADING|READONLY|MISCONF|EXECABORT|"
    r"NOSCRIPT|OOM|NOREPLICAS|MASTERDOWN|NOPROTO|CROSSSLOT|MOVED|ASK|TRYAGAIN) "
)


class RedisCliError(RuntimeError):
    pass


class RedisServer:
    """redis-server (not daemonized: the Popen PID is the server) with its config in a
    0600 file, so the password is in neither argv nor ``ps`` output."""

    host = "127.0.0.1"

    def __init__(self, base_dir: Path | None = None, *, extra_config: str = "") -> None:
        self.base_dir = base_dir if base_dir is not None else make_temp_dir("redis")
        self.dir = self.base_dir / "data"
        self.dir.mkdir(exist_ok=True)
        self.conf_path = self.base_dir / "redis.conf"
        self.log_path = self.base_dir / "redis.log"
        self.password = secrets.token_urlsafe(24)
        self.extra_config = extra_config
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"RedisServer(host={self.host!r}, port={self.port}, dir={self.dir})"

    def _write_config(self) -> None:
        self.conf_path.touch(mode=0o600)
        self.conf_path.write_text(
            "\n".join(
                [
                    f"port {self.port}",
                    f"bind {self.host}",
                    "protected-mode yes",
                    f'requirepass "{self.password}"',
                    f'dir "{self.dir}"',
                    'logfile ""',  # stdout, which spawn() sends to log_path
                    "daemonize no",
                    'save ""',
                    "appendonly no",
                    "repl-diskless-sync-delay 0",
                    "enable-debug-command local",
                    self.extra_config,
                ]
            )
            + "\n"
        )

    def start(self) -> Self:
        start_retrying_ports("redis-server", self._launch, self._ready, self.stop, timeout=30)
        return self

    def _launch(self) -> tuple[subprocess.Popen[bytes], list[Path]]:
        self.port = free_port()
        self._write_config()
        self.log_path.write_text("")
        self.proc = spawn(
            ["redis-server", self.conf_path], log_path=self.log_path, cwd=self.base_dir
        )
        return self.proc, [self.log_path]

    def _ready(self) -> bool:
        assert self.proc is not None
        return listens_on(self.proc.pid, [self.port]) and (
            self.cli("PING", check=False, timeout=5) == "PONG"
        )

    def stop(self) -> None:
        stop_process(self.proc, [(signal.SIGTERM, 10.0)])
        self.proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def cli_env(self) -> dict[str, str]:
        """Environment for running redis-cli yourself: password in REDISCLI_AUTH."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("REDISCLI_")}
        env["REDISCLI_AUTH"] = self.password
        return env

    def cli_args(self) -> list[str]:
        """``redis-cli -h HOST -p PORT`` (no password: use :meth:`cli_env`)."""
        return ["redis-cli", "-h", self.host, "-p", str(self.port)]

    def cli(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        """Run ``redis-cli ARGS...`` and return stdout without the trailing newline.

        With ``check`` an exit code != 0, an auth failure or an error reply (``ERR ...``)
        raises RedisCliError. Nil prints as an empty string.
        """
        result = subprocess.run(
            [*self.cli_args(), *args],
            env=self.cli_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        out = result.stdout.removesuffix("\n")
        if check and (
            result.returncode != 0 or "AUTH failed" in result.stderr or _ERROR_REPLY.match(out)
        ):
            raise RedisCliError(
                f"redis-cli {' '.join(args)!r} failed ({result.returncode}): "
                f"{out} {result.stderr}".strip()
            )
        return out
