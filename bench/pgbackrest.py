"""pgBackRest (Debian's 2.45) as a peer: a stanza on a throwaway cluster, full backups.

The PostgreSQL server runs as the ``postgres`` OS user, and so must pgBackRest (it reads
the data directory and is called by ``archive_command``): its repository, log and lock
directories belong to postgres and every command goes through ``runuser -u postgres --``
when we are root.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

PGBACKREST = "/usr/bin/pgbackrest"
STANZA = "bench"


def available() -> str | None:
    """None if pgBackRest can be used here, else the reason it cannot."""
    if not Path(PGBACKREST).exists() and shutil.which("pgbackrest") is None:
        return "pgbackrest is not installed (apt-get install pgbackrest)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "runuser is needed to run pgbackrest as the postgres user"
    return None


def binary() -> str:
    return PGBACKREST if Path(PGBACKREST).exists() else (shutil.which("pgbackrest") or PGBACKREST)


def as_postgres() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def version() -> str:
    out = subprocess.run([binary(), "version"], capture_output=True, text=True, check=False)
    return out.stdout.strip() or out.stderr.strip()


class PgBackRest:
    """A pgBackRest configuration under ``base`` (a directory owned by postgres)."""

    def __init__(self, base: Path, *, process_max: int = 2, compress_level: int = 3) -> None:
        self.base = base
        self.config = base / "pgbackrest.conf"
        self.repo = base / "repo"
        self.log = base / "log"
        self.lock = base / "lock"
        self.process_max = process_max
        self.compress_level = compress_level

    def archive_command(self) -> str:
        return f"{binary()} --config={self.config} --stanza={STANZA} archive-push %p"

    def write_config(self, *, data_dir: Path, port: int, socket_dir: Path) -> None:
        """Write the configuration (called once the server's port is known)."""
        from strongroom.sandbox.postgres import chown_to_postgres

        for path in (self.base, self.repo, self.log, self.lock):
            chown_to_postgres(path, 0o750)
        self.config.write_text(
            "\n".join(
                [
                    "[global]",
                    f"repo1-path={self.repo}",
                    # backups are expired explicitly between samples, untimed
                    "repo1-retention-full=9999",
                    f"log-path={self.log}",
                    f"lock-path={self.lock}",
                    "log-level-console=warn",
                    "log-level-stderr=off",
                    "log-level-file=info",
                    "compress-type=zst",
                    f"compress-level={self.compress_level}",
                    f"process-max={self.process_max}",
                    "start-fast=y",
                    "",
                    f"[{STANZA}]",
                    f"pg1-path={data_dir}",
                    f"pg1-port={port}",
                    f"pg1-socket-path={socket_dir}",
                    "pg1-user=postgres",
                    "",
                ]
            )
        )
        chown_to_postgres(self.config, 0o640)

    def command(self, *args: str) -> list[str]:
        return [*as_postgres(), binary(), f"--config={self.config}", f"--stanza={STANZA}", *args]

    def run(self, *args: str, timeout: float = 600) -> str:
        result = subprocess.run(
            self.command(*args),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.base,
            env=_clean_env(),
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"pgbackrest {' '.join(args)} failed ({result.returncode}): "
                f"{result.stdout}\n{result.stderr}\n{self.log_tail()}"
            )
        return result.stdout

    def backup_command(self) -> list[str]:
        return self.command("--type=full", "backup")

    def stanza_create(self) -> None:
        self.run("stanza-create")
        self.run("check")

    def info(self) -> dict[str, Any]:
        data = json.loads(self.run("--output=json", "info"))
        return data[0] if data else {}

    def latest_backup(self) -> dict[str, Any]:
        backups = self.info().get("backup", [])
        if not backups:
            raise RuntimeError("pgbackrest info lists no backup")
        return dict(backups[-1])

    def expire_all_but_latest(self) -> None:
        self.run("--repo1-retention-full=1", "expire")

    def log_tail(self, lines: int = 20) -> str:
        parts = []
        for path in sorted(self.log.glob("*.log")) if self.log.exists() else []:
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name} ---\n" + "\n".join(text))
        return "\n".join(parts)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PGBACKREST_"))}
