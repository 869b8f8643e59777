"""Plain configuration models the engine works with, independent of Prefect.

Prefect blocks (``blocks/``) convert themselves into these, and the CLI builds
them from flags, environment variables or a TOML file. Secrets are
``SecretStr`` so they print as ``**********`` everywhere.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any, Literal

from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from strongroom.errors import InvalidInput
from strongroom.ids import check_name
from strongroom.signing import Trust
from strongroom.transport import PG_MODES, PG_PLAINTEXT_MODES, pg_default_sslmode, require_encrypted


class PostgresConnection(BaseModel):
    """How to reach a PostgreSQL server and which databases to back up."""

    name: str = Field(description="target name used in the repository layout")
    host: str = "127.0.0.1"
    port: int = 5432
    user: str = "postgres"
    password: SecretStr | None = None
    databases: list[str] = Field(
        default_factory=list, description="databases to back up; empty means every database"
    )
    sslmode: str = Field(
        default="require",
        description="libpq sslmode; unset: prefer for loopback/unix sockets, require otherwise "
        "(verify-full recommended for remote hosts)",
    )
    allow_plaintext: bool = Field(
        default=False,
        description="allow disable/allow/prefer to a non-loopback host (TLS can be stripped)",
    )
    maintenance_db: str = "postgres"
    connect_timeout: int = 10
    dump_format: Literal["custom", "directory"] = Field(
        default="custom",
        description="custom: one streamed pg_dump -Fc per database (no staging); "
        "directory: pg_dump -Fd -j jobs into a local spool, then each file is streamed",
    )
    jobs: int = Field(default=1, ge=1, le=64, description="parallel pg_dump/pg_restore jobs")
    spool_dir: str | None = Field(
        default=None, description="where directory-format dumps are staged (default: temp)"
    )
    wal_config_path: str | None = Field(
        default=None,
        description="absolute path where each base backup first (re)writes strongroom-wal's "
        "configuration (it holds the repository secret; mode 0600); unset: not written",
    )
    wal_config_owner: str | None = Field(
        default="postgres", description="OS user the WAL configuration is chowned to (root)"
    )
    data_directory: str | None = Field(
        default=None,
        description="absolute path of the cluster's data directory as the runner sees it "
        "(file-level backups read it); unset: file-level backups are refused",
    )
    primary_host: str | None = Field(
        default=None,
        description="when this server is a streaming standby: its primary's host (same "
        "user and password), for file-level backups taken from the standby",
    )
    primary_port: int = 5432
    primary_sslmode: str | None = Field(
        default=None, description="libpq sslmode towards the primary (unset: as for the host)"
    )

    @field_validator("name")
    @classmethod
    def _name_ok(cls, value: str) -> str:
        return check_name(value, "target name")

    @field_validator("wal_config_path", "data_directory")
    @classmethod
    def _absolute_path_ok(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and value and not os.path.isabs(value):
            raise InvalidInput(f"{info.field_name} {value!r} must be an absolute path")
        return value or None

    @model_validator(mode="before")
    @classmethod
    def _default_sslmode(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("sslmode") is None:
            host = str(data.get("host") or "127.0.0.1")
            data = {**data, "sslmode": pg_default_sslmode(host)}
        return data

    @model_validator(mode="after")
    def _transport_ok(self) -> PostgresConnection:
        if self.sslmode not in PG_MODES:
            raise InvalidInput(
                f"postgres target {self.name!r}: sslmode {self.sslmode!r} is not one of "
                + ", ".join(sorted(PG_MODES))
            )
        require_encrypted(
            engine="postgres",
            target=self.name,
            host=self.host,
            encrypted=self.sslmode not in PG_PLAINTEXT_MODES,
            field=f"sslmode={self.sslmode}",
            allow_plaintext=self.allow_plaintext,
        )
        return self

    def libpq_env(self) -> dict[str, str]:
        """Environment for libpq tools: the password travels here, never in argv."""
        env = dict(os.environ)
        env.update(
            {
                "PGHOST": self.host,
                "PGPORT": str(self.port),
                "PGUSER": self.user,
                "PGSSLMODE": self.sslmode,
                "PGCONNECT_TIMEOUT": str(self.connect_timeout),
                "PGAPPNAME": "strongroom",
            }
        )
        env.pop("PGPASSWORD", None)
        env.pop("PGDATABASE", None)
        if self.password is not None:
            env["PGPASSWORD"] = self.password.get_secret_value()
        return env

    def secrets(self) -> list[str]:
        return [self.password.get_secret_value()] if self.password else []

    def primary_connection(self) -> PostgresConnection | None:
        """The primary of this standby (``primary_host``), same credentials; or None."""
        if not self.primary_host:
            return None
        fields = self.model_dump(exclude={"primary_host", "primary_port", "primary_sslmode"})
        fields.update(host=self.primary_host, port=self.primary_port, sslmode=self.primary_sslmode)
        return PostgresConnection.model_validate(fields)


class RepositoryConfig(BaseModel):
    """Where backups go: a local folder, or an S3 bucket with its protection settings."""

    kind: Literal["local", "s3"] = "local"
    path: str | None = Field(default=None, description="folder for a local repository")
    bucket: str | None = None
    prefix: str = ""
    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    sse: Literal["none", "AES256", "aws:kms"] = "none"
    kms_key_id: str | None = None
    lock_mode: Literal["GOVERNANCE", "COMPLIANCE"] | None = None
    retention_days: int = Field(default=0, ge=0)
    compression_level: int = Field(default=3, ge=1, le=22)
    retain_until: dt.datetime | None = Field(
        default=None,
        description="set per backup run from the retention policy: the object-lock "
        "retain-until of the rule that will keep the new backup longest",
    )
    part_size: int = Field(
        default=16 * 1024 * 1024,
        ge=5 * 1024 * 1024,
        description="the first multipart parts' size; later parts grow (s3_multipart)",
    )
    max_parts: int = Field(
        default=10000,
        ge=16,
        le=10000,
        description="the store's limit on parts per upload (AWS 10,000; some "
        "S3-compatible stores 1,000)",
    )
    max_attempts: int = Field(default=5, ge=1, description="storage retries with backoff")
    max_bytes_per_second: int | None = Field(
        default=None,
        ge=64 * 1024,
        description="bandwidth limit of artifact uploads and downloads, stored bytes per "
        "second, shared by parallel streams (None: unlimited)",
    )
    trusted_signers: list[str] = Field(
        default_factory=list,
        description="Ed25519 public keys (PEM or its one-line body) whose signatures "
        "readers of this repository trust; several at once for key rotation",
    )
    signing_key: SecretStr | None = Field(
        default=None,
        description="the backup runner's Ed25519 private key (from the "
        "strongroom-signing-key block); None on readers",
    )

    def secrets(self) -> list[str]:
        found = [self.secret_access_key.get_secret_value()] if self.secret_access_key else []
        if self.signing_key is not None:
            found.append(self.signing_key.get_secret_value())
        return found

    def trust(self) -> Trust:
        """The trusted keys and signer of ``strongroom.signing`` this config names."""
        return Trust.from_config(self.trusted_signers, self.signing_key)


class EncryptionConfig(BaseModel):
    """Client-side encryption: age X25519 recipients for backup, identities for restore.

    A backup runner needs only the public recipients; restore and verify need an
    identity (``AGE-SECRET-KEY-1...``).
    """

    recipients: list[str] = Field(default_factory=list)
    identities: list[SecretStr] = Field(default_factory=list)

    def secrets(self) -> list[str]:
        return [i.get_secret_value() for i in self.identities]
