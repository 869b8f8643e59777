"""Prefect block type for the backup repository: a local folder or an S3 bucket."""

from __future__ import annotations

from typing import Literal

from prefect.blocks.core import Block
from prefect_aws import S3Bucket
from pydantic import Field, SecretStr

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
    trusted_signers: list[str] = Field(
        default_factory=list,
        description="Ed25519 public keys (PEM) whose signed manifests readers trust.",
    )
    signing_key: SigningKey | None = Field(
        default=None,
        description="strongroom-signing-key block: set on backup runners only.",
    )

    def _key(self) -> SecretStr | None:
        return self.signing_key.private_key if self.signing_key is not None else None

    def to_config(self) -> RepositoryConfig:
        if self.s3_bucket is None:
            if not self.local_path:
                raise ValueError("BackupRepository needs local_path or s3_bucket")
            return RepositoryConfig(
                kind="local",
                path=self.local_path,
                compression_level=self.compression_level,
                trusted_signers=list(self.trusted_signers),
                signing_key=self._key(),
            )
        creds = self.s3_bucket.credentials
        params = getattr(creds, "aws_client_parameters", None)
        prefix = "/".join(p for p in (self.s3_bucket.bucket_folder, self.prefix) if p)
        return RepositoryConfig(
            kind="s3",
            bucket=self.s3_bucket.bucket_name,
            prefix=prefix.strip("/"),
            endpoint_url=getattr(params, "endpoint_url", None),
            region=getattr(creds, "region_name", None) or "us-east-1",
            access_key_id=getattr(creds, "aws_access_key_id", None),
            secret_access_key=getattr(creds, "aws_secret_access_key", None),
            sse=self.sse,
            kms_key_id=self.kms_key_id,
            lock_mode=self.lock_mode,
            retention_days=self.retention_days,
            compression_level=self.compression_level,
            trusted_signers=list(self.trusted_signers),
            signing_key=self._key(),
        )
