"""Prefect block types for database targets. Passwords are SecretStr (masked in the UI/API)."""

from __future__ import annotations

from typing import Literal

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from strongroom.config import PostgresConnection


class PostgresTarget(Block):
    """A PostgreSQL server to back up (and restore into)."""

    _block_type_name = "strongroom PostgreSQL target"
    _block_type_slug = "strongroom-postgres-target"
    _description = "A PostgreSQL server that strongroom backs up and restores."

    host: str = "127.0.0.1"
    port: int = 5432
    user: str = "postgres"
    password: SecretStr | None = None
    databases: list[str] = Field(
        default_factory=list, description="Databases to back up; empty means all."
    )
    sslmode: str | None = Field(
        default=None,
        description="libpq sslmode; empty: prefer on loopback/unix sockets, require otherwise "
        "(verify-full recommended).",
    )
    allow_plaintext: bool = Field(
        default=False,
        description="Allow disable/allow/prefer to a non-loopback host (refused otherwise).",
    )
    maintenance_db: str = "postgres"
    dump_format: Literal["custom", "directory"] = Field(
        default="custom", description="custom (streamed) or directory (pg_dump -j, spooled)"
    )
    jobs: int = Field(default=1, ge=1, le=64, description="Parallel jobs (directory format).")
    spool_dir: str | None = Field(default=None, description="Spool for directory dumps.")
    wal_config_path: str | None = Field(
        default=None,
        description="Absolute path where each base backup first (re)writes strongroom-wal's "
        "configuration (holds the repository secret, mode 0600); empty: not written. Set here, "
        "by whoever may write blocks, never by a flow parameter.",
    )
    wal_config_owner: str | None = Field(
        default="postgres", description="OS user the WAL configuration is chowned to (root)."
    )
    data_directory: str | None = Field(
        default=None,
        description="The cluster's data directory as the worker sees it (file-level backups: "
        "a worker on the database host or a sidecar mounting the volume read-only).",
    )
    primary_host: str | None = Field(
        default=None,
        description="When this server is a streaming standby: its primary's host (same user "
        "and password). File-level backups then read the standby and coordinate with the "
        "primary, which archives the WAL.",
    )
    primary_port: int = Field(default=5432, description="The primary's port (standby only).")
    pitr: bool = Field(
        default=False,
        description="PITR enabled: WAL is archived to the repository (strongroom-wal). Only "
        "then do the fleet's base backups and WAL checks include this target; a target "
        "with logical dumps only is skipped and listed, not failed.",
    )
    drills: bool = Field(
        default=False,
        description="Take part in the fleet's scheduled restore drills (backup-fleet kind "
        "drill); false: the drill fleet skips this target and lists it.",
    )
    rpo_hours: float = Field(default=24.0, description="Recovery point objective.")
    rto_minutes: float = Field(default=60.0, description="Recovery time objective.")

    def to_connection(self, name: str) -> PostgresConnection:
        from blocks.target_config import postgres_connection

        return postgres_connection(name, self)
