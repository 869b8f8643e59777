"""Prefect block type for the backup repository: a local folder or an S3 bucket."""

from __future__ import annotations

from typing import Literal

from prefect.blocks.core import Block
from prefect_aws import S3Bucket
from pydantic import Field

from blocks.repository_config import repository_config
from blocks.signing import SigningKey
from strongroom.config import RepositoryConfig


class BackupRepository(Block):
    """Where backups are stored and how they are protected."""

    _block_type_name = "strongroom repository"
    _block_type_slug = "strongroom-repository"
    _description = "A local folder or an S3 bucket (via prefect-aws S3Bucket) holding backups."

    local_path: str | None = Field(default=None, description="Folder for a local repository.")
    s3_bucket: S3Bucket | None = Field(default=None, description="prefect-aws S3Bucket block.")
    prefix: str = ""
    sse: Literal["none", "AES256", "aws:kms"] = "none"
    kms_key_id: str | None = None
    lock_mode: Literal["GOVERNANCE", "COMPLIANCE"] | None = None
    retention_days: int = 0
    compression_level: int = Field(default=3, ge=1, le=22)
    max_parts: int = Field(
        default=10000,
        ge=16,
        le=10000,
        description="S3: the store's limit on parts per upload (AWS 10,000; some "
        "S3-compatible stores 1,000). Part sizes grow so any artifact fits.",
    )
    max_bytes_per_second: int | None = Field(
        default=None,
        ge=64 * 1024,
        description="Bandwidth limit of artifact uploads and downloads in stored bytes per "
        "second, shared by parallel streams; empty: unlimited.",
    )
    trusted_signers: list[str] = Field(
        default_factory=list,
        description="Ed25519 public keys (PEM) whose signed manifests readers trust.",
    )
    signing_key: SigningKey | None = Field(
        default=None,
        description="strongroom-signing-key block: set on backup runners only.",
    )

    def to_config(self) -> RepositoryConfig:
        return repository_config(self)
