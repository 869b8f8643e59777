"""How to reach a ClickHouse server and what to back up (the engine's config model).

Prefect's ``ClickHouseTarget`` block converts itself into this; tests and the
bench build it directly. The password is a ``SecretStr``; it travels only in
the ``X-ClickHouse-Key`` HTTP header and in the config document clickhouse-client
reads from an inherited pipe, never in a URL, argv, a file or a message.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator

from strongroom.ids import check_name
from strongroom.transport import require_encrypted


class ClickHouseConnection(BaseModel):
    """A ClickHouse server: HTTP for queries and data streams, the native port for
    ``clickhouse-client`` and other native-protocol tools."""

    name: str = Field(description="target name used in the repository layout")
    host: str = "127.0.0.1"
    port: int = Field(default=9000, description="native protocol port (clickhouse-client)")
    http_port: int = Field(default=8123, description="HTTP interface port (used for data)")
    user: str = "default"
    password: SecretStr | None = None
    secure: bool = Field(default=False, description="HTTPS for the HTTP interface")
    verify_tls: bool = True
    allow_plaintext: bool = Field(
        default=False, description="allow secure=False to a non-loopback host"
    )
    ca_file: str | None = None
    databases: list[str] = Field(
        default_factory=list,
        description="databases to back up (names or glob patterns); empty means all non-system",
    )
    exclude_databases: list[str] = Field(
        default_factory=list, description="databases to skip (names or glob patterns)"
    )
    connect_timeout: float = 10.0
    read_timeout: float = 3600.0
    export_via: Literal["auto", "clickhouse-client", "http"] = Field(
        default="auto",
        description="how table data is read: clickhouse-client (native protocol, faster) when "
        "installed and the connection is not TLS, else HTTP",
    )
    incremental: bool = Field(
        default=True,
        description="back up only changed partitions, referencing the latest backup's "
        "exports of the others (strongroom.engines.clickhouse.incremental)",
    )
    full_every: int = Field(
        default=7, ge=1, description="a full backup at least every N backups (1: always full)"
    )
    wire_compression: bool | None = Field(
        default=None,
        description="LZ4 on the native protocol; None: off for loopback hosts, on otherwise",
    )
    method: Literal["logical", "native"] = Field(
        default="logical",
        description="logical: strongroom reads every table (FORMAT Native), compresses and "
        "age-encrypts it; native: the server's own BACKUP DATABASE ... TO S3 writes into the "
        "repository (S3 only, servers with BACKUP, probed: not 18.16; encrypted "
        "server-side only, no age: docs/clickhouse.md)",
    )
    native_s3_endpoint: str | None = Field(
        default=None,
        description="native method: the S3 endpoint URL as the ClickHouse server reaches it "
        "(default: the repository's endpoint_url, else AWS's regional endpoint)",
    )

    @field_validator("name")
    @classmethod
    def _name_ok(cls, value: str) -> str:
        return check_name(value, "target name")

    @model_validator(mode="after")
    def _transport_ok(self) -> ClickHouseConnection:
        require_encrypted(
            engine="clickhouse",
            target=self.name,
            host=self.host,
            encrypted=self.secure,
            field="secure=false",
            allow_plaintext=self.allow_plaintext,
        )
        return self

    def secrets(self) -> list[str]:
        return [self.password.get_secret_value()] if self.password else []

    def describe(self) -> str:
        scheme = "https" if self.secure else "http"
        return f"{scheme}://{self.host}:{self.http_port}"
