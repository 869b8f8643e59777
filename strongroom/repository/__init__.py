"""Repositories: where backups are stored (local folder or S3 bucket)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from strongroom.errors import InvalidInput
from strongroom.repository.base import ObjectInfo, ObjectWriter, Repository, StorageSettings

if TYPE_CHECKING:
    from strongroom.config import RepositoryConfig

__all__ = ["ObjectInfo", "ObjectWriter", "Repository", "StorageSettings", "open_repository"]


def open_repository(config: RepositoryConfig) -> Repository:
    """Build the repository a RepositoryConfig describes, trusting its
    ``trusted_signers`` and signing with its ``signing_key`` (``repo.trust``)."""
    if config.kind == "local":
        from pathlib import Path

        from strongroom.repository.local import LocalRepository

        if not config.path:
            raise InvalidInput("a local repository needs a path")
        return LocalRepository.from_config(
            config.model_copy(update={"path": str(Path(config.path).expanduser())})
        )
    from strongroom.repository.s3 import S3Repository

    return S3Repository(config, trust=config.trust())
