"""Runs one backup or restore in a child process so a test can SIGKILL it mid-stream.

Configuration comes from environment variables (secrets separately, never on argv):
SR_OP (backup|restore), SR_PG (PostgresConnection JSON without password),
SR_PG_PASSWORD, SR_REPO (RepositoryConfig JSON without secret), SR_REPO_SECRET,
SR_AGE_RECIPIENT, SR_AGE_IDENTITY, SR_REQUEST (PgRestoreRequest JSON); SR_READ_BPS paces
reads from the repository (the fault is still a real SIGKILL of a real restore).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from pydantic import SecretStr

from strongroom.config import EncryptionConfig, PostgresConnection
from tests.fixtures.strongroom_fixtures import signed_config


class _SlowReader:
    """Paces reads to ``bps`` bytes per second, so a kill lands mid-stream on any machine."""

    def __init__(self, inner: Any, bps: int) -> None:
        self._inner, self._bps = inner, bps

    def read(self, n: int = -1) -> bytes:
        data: bytes = self._inner.read(min(n, 256 * 1024) if n and n > 0 else 256 * 1024)
        time.sleep(len(data) / self._bps)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._inner.close()


def _throttle_reads(repo: Any, bps: int) -> None:
    original = repo.open_read
    repo.open_read = lambda key: _SlowReader(original(key), bps)


def main() -> None:
    from strongroom.engines.postgres.backup import backup_postgres
    from strongroom.engines.postgres.restore import PgRestoreRequest, restore_postgres
    from strongroom.repository.local import LocalRepository
    from strongroom.repository.s3 import S3Repository

    conn = PostgresConnection.model_validate(
        {**json.loads(os.environ["SR_PG"]), "password": os.environ["SR_PG_PASSWORD"]}
    )
    repo_data = json.loads(os.environ["SR_REPO"])
    if os.environ.get("SR_REPO_SECRET"):
        repo_data["secret_access_key"] = os.environ["SR_REPO_SECRET"]
    config = signed_config(**repo_data)
    repo = LocalRepository.from_config(config) if config.kind == "local" else S3Repository(config)
    if os.environ.get("SR_READ_BPS"):
        _throttle_reads(repo, int(os.environ["SR_READ_BPS"]))
    identity = os.environ.get("SR_AGE_IDENTITY")
    enc = EncryptionConfig(
        recipients=[os.environ["SR_AGE_RECIPIENT"]],
        identities=[SecretStr(identity)] if identity else [],
    )
    if os.environ["SR_OP"] == "backup":
        manifest = backup_postgres(conn, repo, config, enc)
        print(json.dumps({"backup_id": manifest.backup_id}))
    else:
        req = PgRestoreRequest.model_validate_json(os.environ["SR_REQUEST"])
        report = restore_postgres(conn, repo, enc, req)
        print(json.dumps({"rows_ok": report.get("rows_ok")}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
