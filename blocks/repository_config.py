"""A BackupRepository block's fields -> ``RepositoryConfig``, without importing Prefect.

One function for both forms of the block: the loaded ``BackupRepository`` (its
``to_config``) and the raw block document data the Prefect API returns (nested S3Bucket
and AwsCredentials as dicts), which ``flows.common.load_repository`` and the CLI read
without importing prefect-aws.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import SecretStr

from strongroom.config import RepositoryConfig


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


def _secret(value: Any) -> SecretStr | None:
    if value is None or value == "":
        return None
    return value if isinstance(value, SecretStr) else SecretStr(str(value))


def repository_config(block: Any) -> RepositoryConfig:
    """The RepositoryConfig of a BackupRepository (an instance or its document data)."""
    signing = _get(block, "signing_key")
    common: dict[str, Any] = {
        "compression_level": _get(block, "compression_level") or 3,
        "trusted_signers": list(_get(block, "trusted_signers") or []),
        "signing_key": _secret(_get(signing, "private_key")),
        "max_bytes_per_second": _get(block, "max_bytes_per_second") or None,
    }
    bucket = _get(block, "s3_bucket")
    if bucket is None:
        path = _get(block, "local_path")
        if not path:
            raise ValueError("BackupRepository needs local_path or s3_bucket")
        return RepositoryConfig(kind="local", path=path, **common)
    creds = _get(bucket, "credentials")
    params = _get(creds, "aws_client_parameters")
    prefix = "/".join(p for p in (_get(bucket, "bucket_folder"), _get(block, "prefix")) if p)
    return RepositoryConfig(
        kind="s3",
        bucket=_get(bucket, "bucket_name"),
        prefix=prefix.strip("/"),
        endpoint_url=_get(params, "endpoint_url"),
        region=_get(creds, "region_name") or "us-east-1",
        access_key_id=_get(creds, "aws_access_key_id"),
        secret_access_key=_secret(_get(creds, "aws_secret_access_key")),
        sse=_get(block, "sse") or "none",
        kms_key_id=_get(block, "kms_key_id"),
        lock_mode=_get(block, "lock_mode"),
        retention_days=_get(block, "retention_days") or 0,
        max_parts=_get(block, "max_parts") or 10000,
        **common,
    )
