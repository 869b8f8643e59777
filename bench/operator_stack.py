"""An operator's stack for benchmarks: a real Prefect server, strongroom's blocks and a
runner of the ``strongroom`` CLI as a new process each time.

    with operator_stack(workdir) as stack:
        stack.register_postgres_target("shop", pg_server, "shop")
        result = stack.cli("backup", "postgresql", "shop")

The server (``strongroom.deploy.local_server.PrefectServer``, SQLite under ``workdir``)
gets strongroom's block types and three blocks named ``default``: a local
BackupRepository at ``stack.repository`` (signing with a fresh Ed25519 key it also
trusts), an EncryptionKey (a fresh age identity) and the SigningKey. ``stack.cli``
runs ``.venv/bin/strongroom`` with ``stack.env`` (``PREFECT_API_URL`` set, an isolated
``PREFECT_HOME`` and ``XDG_CONFIG_HOME`` under ``workdir``), so what is timed is what an
operator waits for: interpreter start, imports, flow run creation, block loads, the run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyrage import x25519

from strongroom.deploy.local_server import ROOT, PrefectServer, base_env
from strongroom.sandbox.postgres import PostgresServer
from strongroom.signing import Signer


def strongroom_command() -> list[str]:
    """The installed ``strongroom`` script of this interpreter's venv."""
    script = Path(sys.executable).parent / "strongroom"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "strongroom.cli.app"]


@dataclass
class OperatorStack:
    """What ``operator_stack`` yields: the server, the blocks' secrets, the CLI runner."""

    server: PrefectServer
    workdir: Path
    repository: Path
    env: dict[str, str]
    signer: Signer
    identity: x25519.Identity
    targets: dict[str, tuple[str, int, str]] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        return self.server.api_url

    def cli(
        self,
        *args: str,
        timeout: float = 600,
        env: Mapping[str, str | None] | None = None,
        command: list[str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``strongroom ARGS...`` as a new process (``env`` adds or, with None, removes
        variables; ``command``: another checkout's ``strongroom``, for a baseline)."""
        run_env = dict(self.env)
        for key, value in (env or {}).items():
            if value is None:
                run_env.pop(key, None)
            else:
                run_env[key] = value
        return subprocess.run(
            [*(command or strongroom_command()), *args],
            capture_output=True,
            text=True,
            env=run_env,
            cwd=ROOT,
            timeout=timeout,
        )

    def timed_cli(
        self, *args: str, **kwargs: Any
    ) -> tuple[float, subprocess.CompletedProcess[str]]:
        """``cli(...)`` and its wall time in seconds (the whole process lifetime)."""
        started = time.perf_counter()
        result = self.cli(*args, **kwargs)
        return time.perf_counter() - started, result

    def register_postgres_target(self, name: str, server: PostgresServer, database: str) -> None:
        """Save a PostgresTarget block ``name`` for ``database`` on ``server``."""
        from blocks import PostgresTarget

        with self.client():
            PostgresTarget(
                host=server.host,
                port=server.port,
                user=server.superuser,
                password=server.password,
                databases=[database],
            ).save(name, overwrite=True)
        self.targets[name] = (server.host, server.port, database)

    @contextmanager
    def client(self) -> Iterator[None]:
        """This process's Prefect client (settings and environment) on the stack's server."""
        from prefect.settings import PREFECT_API_URL, temporary_settings

        saved = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = self.api_url
        try:
            with temporary_settings(updates={PREFECT_API_URL: self.api_url}):
                yield
        finally:
            if saved is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = saved


def _register_blocks(stack: OperatorStack) -> None:
    from blocks import BackupRepository, EncryptionKey, SigningKey, register_all

    with stack.client():
        register_all()
        signing = SigningKey(private_key=stack.signer.private_pem())
        signing.save("default", overwrite=True)
        BackupRepository(
            local_path=str(stack.repository),
            trusted_signers=[stack.signer.public.pem()],
            signing_key=signing,
        ).save("default", overwrite=True)
        EncryptionKey(
            recipients=[str(stack.identity.to_public())], identity=str(stack.identity)
        ).save("default", overwrite=True)


@contextmanager
def operator_stack(workdir: Path) -> Iterator[OperatorStack]:
    """Start the Prefect server under ``workdir``, register the blocks, yield the stack;
    stop the server (by its PID) on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    server = PrefectServer(workdir / "prefect-server")
    client_home = workdir / "prefect-client"
    config_home = workdir / "config"
    client_home.mkdir(exist_ok=True)
    config_home.mkdir(exist_ok=True)
    env = base_env(client_home, {"COLUMNS": "250", "XDG_CONFIG_HOME": str(config_home)})
    # an operator's install has bytecode caches: let the CLI write them (the first, untimed
    # run of each command does)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    try:
        server.start()
        env["PREFECT_API_URL"] = server.api_url
        stack = OperatorStack(
            server=server,
            workdir=workdir,
            repository=workdir / "repo",
            env=env,
            signer=Signer.generate(),
            identity=x25519.Identity.generate(),
        )
        _register_blocks(stack)
        yield stack
    finally:
        server.stop()
