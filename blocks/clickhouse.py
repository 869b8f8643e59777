"""Prefect block type for a ClickHouse target. The password is SecretStr (masked in the UI/API)."""

from __future__ import annotations

from typing import Literal

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from strongroom.engines.clickhouse.conn import ClickHouseConnection


class ClickHouseTarget(Block):
    """A ClickHouse server to back up (and restore into)."""

    _block_type_name = "strongroom ClickHouse target"
    _block_type_slug = "strongroom-clickhouse-target"
    _description = (
        "A ClickHouse server that strongroom backs up and restores (HTTP interface for data, "
        "native port for clickhouse-client)."
    )

    host: str = "127.0.0.1"
    port: int = Field(default=9000, description="Native protocol port (clickhouse-client).")
    http_port: int = Field(default=8123, description="HTTP interface port (data streams).")
    user: str = "default"
    password: SecretStr | None = None
    secure: bool = Field(default=False, description="Use HTTPS for the HTTP interface.")
    allow_plaintext: bool = Field(
        default=False,
        description="Allow an unencrypted connection to a non-loopback host (refused otherwise).",
    )
    export_via: Literal["auto", "clickhouse-client", "http"] = Field(
        default="auto",
        description="How table data is read: clickhouse-client (native protocol, faster) when "
        "installed and not TLS, else HTTP.",
    )
    wire_compression: bool | None = Field(
        default=None,
        description="LZ4 on the native protocol (default: off on loopback, on otherwise).",
    )
    databases: list[str] = Field(
        default_factory=list,
        description="Databases to back up (names or glob patterns); empty means all non-system.",
    )
    exclude_databases: list[str] = Field(
        default_factory=list, description="Databases to skip (names or glob patterns)."
    )
    incremental: bool = Field(
        default=True,
        description="Back up only changed partitions; unchanged ones reference the latest "
        "backup's stored exports.",
    )
    full_every: int = Field(
        default=7, ge=1, description="A full backup at least every N backups (1: always full)."
    )
    method: Literal["logical", "native"] = Field(
        default="logical",
        description="logical: strongroom reads, compresses and age-encrypts every table; "
        "native: the server's BACKUP ... TO S3 writes into the repository (S3 repositories, "
        "servers with BACKUP, not 18.16; encrypted server-side only, no age).",
    )
    native_s3_endpoint: str | None = Field(
        default=None,
        description="Native method: S3 endpoint URL as the ClickHouse server reaches it.",
    )
    drills: bool = Field(
        default=False,
        description="Take part in the fleet's scheduled restore drills (backup-fleet kind "
        "drill); false: the drill fleet skips this target and lists it.",
    )
    rpo_hours: float = Field(default=24.0, description="Recovery point objective.")
    rto_minutes: float = Field(default=60.0, description="Recovery time objective.")

    def to_connection(self, name: str) -> ClickHouseConnection:
        return ClickHouseConnection(
            name=name,
            host=self.host,
            port=self.port,
            http_port=self.http_port,
            user=self.user,
            password=self.password,
            secure=self.secure,
            allow_plaintext=self.allow_plaintext,
            export_via=self.export_via,
            wire_compression=self.wire_compression,
            databases=list(self.databases),
            exclude_databases=list(self.exclude_databases),
            incremental=self.incremental,
            full_every=self.full_every,
            method=self.method,
            native_s3_endpoint=self.native_s3_endpoint,
        )
