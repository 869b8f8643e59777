"""SeaweedFS's S3 gateway as a second S3 implementation: a bucket API it lacks
(GetPublicAccessBlock answers 501 NotImplemented) is asked once, never retried, and
makes only the control that reads it a named warning; the audit of an object-lock
bucket after a backup shows lock, versioning and encryption as the store reports them.

The repository contract tests (tests/test_repository.py) run against this server too.
"""

from __future__ import annotations

import uuid

import pytest
from pydantic import SecretStr

from strongroom.config import EncryptionConfig
from strongroom.engines.redis.backup import backup_redis
from strongroom.engines.redis.conn import RedisConnection
from strongroom.errors import Unsupported
from strongroom.repository.s3 import S3Repository
from strongroom.sandbox.redis import RedisServer
from strongroom.verify import verify_backup
from tests.fixtures.compliant_bucket import Bucket, s3_repository
from tests.fixtures.seaweedfs import SeaweedServer
from tests.test_compliance import TARGETS, control, populate, run, statuses


def _encrypted_locked_bucket(server: SeaweedServer) -> str:
    name = server.create_bucket(f"sw-{uuid.uuid4().hex[:12]}", object_lock=True)
    server.s3().put_bucket_encryption(
        Bucket=name,
        ServerSideEncryptionConfiguration={
            "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
        },
    )
    return name


def test_not_implemented_is_asked_once(
    seaweed_server: SeaweedServer, seaweed_locked_bucket: str
) -> None:
    repo, _ = s3_repository(seaweed_server, seaweed_locked_bucket, max_attempts=5)
    assert isinstance(repo, S3Repository)

    def not_implemented() -> int:
        return seaweed_server.request_count(seaweed_locked_bucket, method="GET", code="501")

    before = not_implemented()
    with pytest.raises(Unsupported, match="not supported by this store") as raised:
        repo.bucket_setting("public_access_block")
    assert raised.value.api == "GetPublicAccessBlock"
    assert not_implemented() == before + 1  # one request, no retries (max_attempts=5)

    settings = repo.bucket_settings()  # the other APIs are still asked and answered
    assert not_implemented() == before + 2
    assert settings["unsupported"] == {"public_access_block": "GetPublicAccessBlock"}
    assert settings["public_access_block"] is None
    assert settings["versioning"] == "Enabled"
    assert settings["object_lock"]["ObjectLockEnabled"] == "Enabled"


def test_audit_of_an_object_lock_bucket(
    seaweed_server: SeaweedServer, redis_server: RedisServer, age_key: EncryptionConfig
) -> None:
    name = _encrypted_locked_bucket(seaweed_server)
    repo, config = s3_repository(seaweed_server, name)
    populate(repo)  # backups, WAL, drills and verifications, as the engines write them
    # and a real backup (COMPLIANCE lock, SSE on each object), read back in full
    conn = RedisConnection(
        name="cache",
        host=redis_server.host,
        port=redis_server.port,
        password=SecretStr(redis_server.password),
    )
    manifest = backup_redis(conn, repo, config, age_key)
    assert verify_backup(repo, manifest, age_key)["ok"]
    head = seaweed_server.s3().head_object(Bucket=name, Key=f"prod/{manifest.artifacts[0].key}")
    assert head["ObjectLockMode"] == "COMPLIANCE" and head["ServerSideEncryption"] == "AES256"

    report = run(Bucket(repo, config, name), TARGETS)

    found = statuses(report)
    assert not [cid for cid, status in found.items() if status == "fail"], [
        (c.id, c.summary) for c in report.controls if c.status == "fail"
    ]
    # what the store shows, as it reports it
    assert found["SR-LOCK-01"] == "pass"
    assert "object lock enabled" in control(report, "SR-LOCK-01").summary
    assert found["SR-VERS-01"] == "pass"
    assert found["SR-ENC-02"] == "pass"
    enc = [f.message for f in control(report, "SR-ENC-02").findings]
    assert "default encryption AES256" in enc
    assert any("carry server-side encryption" in m for m in enc)
    # what it cannot show: a warning naming the API, asked once
    pab = control(report, "SR-PAB-01")
    assert pab.status == "warn"
    assert [f.data.get("api") for f in pab.findings] == ["GetPublicAccessBlock"]
    assert "not supported by this store (GetPublicAccessBlock)" in pab.summary
