"""Repository contract tests: every behaviour runs against a local folder and against two
S3 implementations (real moto and SeaweedFS server processes from tests/fixtures/s3.py and
tests/fixtures/seaweedfs.py), plus S3-only and local-only checks.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import re
import threading
import time
import traceback
import tracemalloc
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError, ReadTimeoutError
from botocore.response import StreamingBody
from botocore.stub import Stubber
from pydantic import SecretStr

from strongroom.config import RepositoryConfig
from strongroom.errors import (
    AccessDenied,
    Conflict,
    IntegrityError,
    InvalidInput,
    NotFound,
    ServiceUnavailable,
    StrongroomError,
)
from strongroom.repository.base import Repository, StorageSettings
from strongroom.repository.local import LocalRepository
from strongroom.repository.s3 import S3Repository
from tests.fixtures.ports import free_port
from tests.fixtures.s3 import MotoServer
from tests.fixtures.strongroom_fixtures import make_local_repo, signed_config

MIB = 1024 * 1024
PART = 5 * MIB
PREFIX = "pfx/one"
_TMP = re.compile(r"^\..+\.tmp-[0-9a-f]{16}$")


def _data(n: int, seed: int = 0) -> bytes:
    """Incompressible-looking bytes, cheap to make: a random MiB repeated with a twist."""
    block = os.urandom(MIB)
    out = bytearray()
    i = seed
    while len(out) < n:
        out += block[i % 997 :] + block[: i % 997]
        i += 1
    return bytes(out[:n])


def _s3_config(server: MotoServer, bucket: str, **extra: Any) -> RepositoryConfig:
    values: dict[str, Any] = {
        "kind": "s3",
        "bucket": bucket,
        "prefix": PREFIX,
        "endpoint_url": server.endpoint_url,
        "access_key_id": server.access_key,
        "secret_access_key": SecretStr(server.secret_key),
        "part_size": PART,
        "max_attempts": 3,
    }
    values.update(extra)
    return signed_config(**values)


def _s3_repo(server: MotoServer, bucket: str, **extra: Any) -> S3Repository:
    return S3Repository(
        _s3_config(server, bucket, **extra), retry_wait_initial=0.01, retry_wait_max=0.05
    )


def _uploads(repo: S3Repository, server: MotoServer) -> list[str]:
    resp = server.s3().list_multipart_uploads(Bucket=repo.bucket)
    return [u["Key"] for u in resp.get("Uploads", [])]


def _leftovers(repo: Repository, server: MotoServer | None) -> list[str]:
    """Temp files (local) or multipart uploads (S3) still lying around."""
    if isinstance(repo, LocalRepository):
        if not repo.root.exists():
            return []
        return [
            str(Path(d, f)) for d, _, files in os.walk(repo.root) for f in files if _TMP.match(f)
        ]
    assert isinstance(repo, S3Repository) and server is not None
    return _uploads(repo, server)


# the S3 implementations every S3 contract test runs against (session-scoped servers)
S3_SERVERS = {"s3": "s3_server", "seaweedfs": "seaweed_server"}


@pytest.fixture(params=["local", *S3_SERVERS])
def repo_and_server(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[Repository, MotoServer | None]]:
    if request.param == "local":
        yield make_local_repo(tmp_path / "repo"), None
        return
    server: MotoServer = request.getfixturevalue(S3_SERVERS[request.param])
    bucket = server.create_bucket()
    try:
        yield _s3_repo(server, bucket), server
    finally:
        server.delete_bucket(bucket)


@pytest.fixture
def repo(repo_and_server: tuple[Repository, MotoServer | None]) -> Repository:
    return repo_and_server[0]


@pytest.fixture(params=list(S3_SERVERS))
def any_s3(request: pytest.FixtureRequest) -> MotoServer:
    """moto, then SeaweedFS (same duck type): for S3 tests that hold on both."""
    server: MotoServer = request.getfixturevalue(S3_SERVERS[request.param])
    return server


@pytest.fixture
def bucket(s3_server: MotoServer) -> Iterator[str]:
    name = s3_server.create_bucket()
    try:
        yield name
    finally:
        s3_server.delete_bucket(name)


# --------------------------------------------------------------- both backends


def test_multipart_round_trip(repo: Repository) -> None:
    data = _data(12 * MIB + 7)
    sizes = [1, 65536, 3 * MIB + 5, 1_000_003, 7 * MIB]
    pos = 0
    with repo.open_write("pg/base/dump.bin") as writer:
        i = 0
        while pos < len(data):
            chunk = data[pos : pos + sizes[i % len(sizes)]]
            # every accepted buffer type
            written = writer.write([bytes, bytearray, memoryview][i % 3](chunk))
            assert written == len(chunk)
            pos += len(chunk)
            i += 1
        assert writer.commit() == len(data)
    assert repo.exists("pg/base/dump.bin")
    assert repo.size("pg/base/dump.bin") == len(data)
    assert repo.get_bytes("pg/base/dump.bin") == data
    out = bytearray()
    with repo.open_read("pg/base/dump.bin") as reader:
        while chunk := reader.read(777_777):
            out += chunk
    assert out == data
    [info] = list(repo.list("pg/"))
    assert info.key == "pg/base/dump.bin" and info.size == len(data)
    assert info.modified.tzinfo is not None


def test_small_and_empty_objects(repo: Repository) -> None:
    with repo.open_write("a/small") as writer:
        writer.write(b"hello ")
        writer.write(b"world")
        assert writer.commit() == 11
    assert repo.get_bytes("a/small") == b"hello world"
    with repo.open_read("a/small") as reader:
        assert reader.read(5) == b"hello"
        assert reader.read() == b" world"
    with repo.open_write("a/empty") as writer:
        assert writer.commit() == 0
    assert repo.get_bytes("a/empty") == b""
    assert repo.size("a/empty") == 0


def test_put_bytes_conflict_and_overwrite(repo: Repository) -> None:
    repo.put_bytes("m/manifest.json", b"first")
    with pytest.raises(Conflict, match=r"m/manifest\.json"):
        repo.put_bytes("m/manifest.json", b"second")
    assert repo.get_bytes("m/manifest.json") == b"first"
    repo.put_bytes("m/manifest.json", b"third", overwrite=True)
    assert repo.get_bytes("m/manifest.json") == b"third"


def test_not_found_names_the_key(repo: Repository) -> None:
    for call in (repo.open_read, repo.get_bytes, repo.size):
        with pytest.raises(NotFound, match=r"no/such-key"):
            call("no/such-key")
    assert not repo.exists("no/such-key")
    repo.delete("no/such-key")  # missing keys are not an error
    assert list(repo.list("no/")) == []


def test_delete(repo: Repository) -> None:
    repo.put_bytes("d/x", b"1")
    repo.delete("d/x")
    assert not repo.exists("d/x")
    assert list(repo.list("d/")) == []


def test_abort_leaves_nothing(repo_and_server: tuple[Repository, MotoServer | None]) -> None:
    repo, server = repo_and_server
    writer = repo.open_write("big/aborted")
    writer.write(_data(11 * MIB))  # two parts sent, one buffered
    writer.abort()
    writer.abort()  # idempotent
    assert not repo.exists("big/aborted")
    assert list(repo.list("")) == []
    assert _leftovers(repo, server) == []
    with pytest.raises(InvalidInput):
        writer.write(b"more")


def test_exception_inside_with_aborts(
    repo_and_server: tuple[Repository, MotoServer | None],
) -> None:
    repo, server = repo_and_server
    with pytest.raises(RuntimeError, match="producer died"), repo.open_write("big/x") as writer:
        writer.write(_data(11 * MIB))
        raise RuntimeError("producer died")
    assert not repo.exists("big/x")
    assert _leftovers(repo, server) == []


def test_writer_after_commit(repo: Repository) -> None:
    writer = repo.open_write("c/done")
    writer.write(b"abc")
    assert writer.commit() == 3
    assert writer.commit() == 3  # idempotent
    writer.abort()  # no-op after commit: the object stays
    assert repo.get_bytes("c/done") == b"abc"
    with pytest.raises(InvalidInput):
        writer.write(b"x")


def test_list_is_relative_and_prefix_scoped(repo: Repository) -> None:
    for key in ("a/1", "a/2", "a/sub/3", "ab/x", "b/1"):
        repo.put_bytes(key, key.encode())
    assert [i.key for i in repo.list("a/")] == ["a/1", "a/2", "a/sub/3"]
    assert [i.key for i in repo.list("")] == ["a/1", "a/2", "a/sub/3", "ab/x", "b/1"]
    assert [i.key for i in repo.list("a")] == ["a/1", "a/2", "a/sub/3", "ab/x"]
    assert [(i.key, i.size) for i in repo.list("b/")] == [("b/1", 3)]


def test_object_invisible_until_commit(repo: Repository) -> None:
    writer = repo.open_write("w/pending")
    writer.write(_data(6 * MIB))
    assert not repo.exists("w/pending")
    assert list(repo.list("w/")) == []
    writer.commit()
    assert [i.key for i in repo.list("w/")] == ["w/pending"]


BAD_KEYS = [
    "",
    "../escape",
    "a/../../etc/passwd",
    "/etc/passwd",
    "a//b",
    "a/./b",
    ".",
    "..",
    "a/",
    "a\\..\\b",
    "a/b\x00",
    "a b",
    "x" * 201,
]


def test_path_traversal_keys_rejected(repo: Repository) -> None:
    for key in BAD_KEYS:
        _assert_key_rejected(repo, key)
    assert list(repo.list("")) == []


def _assert_key_rejected(repo: Repository, key: str) -> None:
    calls: list[Callable[[], object]] = [
        lambda: repo.open_write(key),
        lambda: repo.open_read(key),
        lambda: repo.put_bytes(key, b"x"),
        lambda: repo.put_bytes(key, b"x", overwrite=True),
        lambda: repo.get_bytes(key),
        lambda: repo.exists(key),
        lambda: repo.size(key),
        lambda: repo.delete(key),
    ]
    for call in calls:
        with pytest.raises(InvalidInput):
            call()
    if key and not key.endswith("/"):
        with pytest.raises(InvalidInput):
            list(repo.list(key + "/"))


# ------------------------------------------------------------------ local only


def test_local_temp_file_pattern_and_cleanup(tmp_path: Path) -> None:
    repo = make_local_repo(tmp_path / "repo")
    writer = repo.open_write("a/obj")
    writer.write(b"partial")
    [name] = os.listdir(tmp_path / "repo" / "a")
    assert re.fullmatch(r"\.obj\.tmp-[0-9a-f]{16}", name)
    assert list(repo.list("")) == []  # temp files are never listed
    # a crashed writer elsewhere, another prefix, and a recent one
    (tmp_path / "repo" / "b").mkdir()
    (tmp_path / "repo" / "b" / ".other.tmp-0123456789abcdef").write_bytes(b"x")
    assert repo.cleanup_incomplete("a/", older_than=dt.timedelta(hours=1)) == 0
    assert repo.cleanup_incomplete("a/") == 1
    assert os.listdir(tmp_path / "repo" / "a") == []
    assert repo.cleanup_incomplete("") == 1
    writer.abort()  # its temp file is already gone: still fine


def test_local_reserved_temp_names_rejected(tmp_path: Path) -> None:
    repo = make_local_repo(tmp_path)
    with pytest.raises(InvalidInput, match="reserved"):
        repo.put_bytes("a/.x.tmp-0123456789abcdef", b"")


def test_local_put_bytes_exclusive_under_race(tmp_path: Path) -> None:
    repo = make_local_repo(tmp_path / "repo")
    n = 16
    barrier = threading.Barrier(n)
    results: list[str] = [""] * n

    def put(i: int) -> None:
        barrier.wait()
        try:
            repo.put_bytes("lock/owner", f"writer-{i}".encode())
            results[i] = "ok"
        except Conflict:
            results[i] = "conflict"

    for _round in range(5):
        repo.delete("lock/owner")
        threads = [threading.Thread(target=put, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results.count("ok") == 1, results
        assert results.count("conflict") == n - 1
        winner = results.index("ok")
        assert repo.get_bytes("lock/owner") == f"writer-{winner}".encode()
    assert _leftovers(repo, None) == []


def test_local_files_are_private(tmp_path: Path) -> None:
    repo = make_local_repo(tmp_path)
    repo.put_bytes("k", b"secret data")
    with repo.open_write("w") as writer:
        writer.write(b"x")
        writer.commit()
    for name in ("k", "w"):
        assert (tmp_path / name).stat().st_mode & 0o077 == 0


def test_local_from_config_and_describe(tmp_path: Path) -> None:
    repo = LocalRepository.from_config(signed_config(kind="local", path=str(tmp_path)))
    assert repo.describe() == tmp_path.absolute().as_uri()
    with pytest.raises(InvalidInput):
        LocalRepository.from_config(signed_config(kind="local"))


# --------------------------------------------------------------------- S3 only


class _Recorder:
    """Records the headers of every request a client sends."""

    def __init__(self, client: Any) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        client.meta.events.register("before-send.s3", self._record)

    def _record(self, request: Any, event_name: str, **_: Any) -> None:
        op = event_name.rsplit(".", 1)[-1]
        headers = {
            k.lower(): v.decode() if isinstance(v, bytes) else str(v)
            for k, v in request.headers.items()
        }
        self.requests.append((op, headers))

    def ops(self, name: str) -> list[dict[str, str]]:
        return [h for op, h in self.requests if op == name]


def test_s3_layout_parts_and_checksums(any_s3: MotoServer) -> None:
    s3_server, bucket = any_s3, any_s3.create_bucket()
    client = s3_server.s3()
    recorder = _Recorder(client)
    repo = S3Repository.from_client(client, _s3_config(s3_server, bucket, sse="AES256"))
    assert repo.describe() == f"s3://{bucket}/{PREFIX}"
    data = _data(12 * MIB)
    with repo.open_write("x/multi") as writer:
        writer.write(data)
        writer.commit()
    with repo.open_write("x/exact") as writer:  # exactly one part: a single PutObject
        writer.write(data[:PART])
        writer.commit()
    repo.put_bytes("x/small", b"tiny")
    raw = s3_server.s3()
    assert raw.head_object(Bucket=bucket, Key=f"{PREFIX}/x/multi")["ETag"].endswith('-3"')
    assert "-" not in raw.head_object(Bucket=bucket, Key=f"{PREFIX}/x/exact")["ETag"]
    assert raw.get_object(Bucket=bucket, Key=f"{PREFIX}/x/small")["Body"].read() == b"tiny"
    parts = recorder.ops("UploadPart")
    puts = recorder.ops("PutObject")
    creates = recorder.ops("CreateMultipartUpload")
    assert len(parts) == 3 and len(puts) == 2 and len(creates) == 1
    assert all("content-md5" in h for h in parts + puts)
    assert all(h.get("x-amz-server-side-encryption") == "AES256" for h in puts + creates)
    assert recorder.ops("PutObject")[-1].get("if-none-match") == "*"


def test_s3_sse_kms(s3_server: MotoServer, bucket: str) -> None:
    kms = s3_server.client("kms")
    key_arn = kms.create_key(Description="strongroom test")["KeyMetadata"]["Arn"]
    repo = _s3_repo(s3_server, bucket, sse="aws:kms", kms_key_id=key_arn)
    repo.put_bytes("k/small", b"data")
    with repo.open_write("k/multi") as writer:
        writer.write(_data(11 * MIB))
        writer.commit()
    raw = s3_server.s3()
    for key in ("k/small", "k/multi"):
        head = raw.head_object(Bucket=bucket, Key=f"{PREFIX}/{key}")
        assert head["ServerSideEncryption"] == "aws:kms"
        assert head["SSEKMSKeyId"] == key_arn


def test_s3_object_lock_headers(any_s3: MotoServer) -> None:
    s3_server, bucket = any_s3, any_s3.create_bucket(object_lock=True)
    raw = s3_server.s3()
    before = dt.datetime.now(dt.UTC)
    repo = _s3_repo(s3_server, bucket, lock_mode="GOVERNANCE", retention_days=3)
    repo.put_bytes("l/small", b"locked")
    with repo.open_write("l/multi") as writer:
        writer.write(_data(11 * MIB))
        writer.commit()
    for key in ("l/small", "l/multi"):
        head = raw.head_object(Bucket=bucket, Key=f"{PREFIX}/{key}")
        assert head["ObjectLockMode"] == "GOVERNANCE"
        until = head["ObjectLockRetainUntilDate"]
        assert abs(until - (before + dt.timedelta(days=3))) < dt.timedelta(minutes=10)

    # an explicit retain_until wins over retention_days
    target = (dt.datetime.now(dt.UTC) + dt.timedelta(days=10)).replace(microsecond=0)
    compliance = _s3_repo(s3_server, bucket, lock_mode="COMPLIANCE", retention_days=1)
    compliance.put_bytes("l/explicit", b"x", settings=StorageSettings(retain_until=target))
    with compliance.open_write("l/explicit-multi", StorageSettings(retain_until=target)) as w:
        w.write(_data(6 * MIB))
        w.commit()
    for key in ("l/explicit", "l/explicit-multi"):
        head = raw.head_object(Bucket=bucket, Key=f"{PREFIX}/{key}")
        assert head["ObjectLockMode"] == "COMPLIANCE"
        assert head["ObjectLockRetainUntilDate"].replace(microsecond=0) == target

    no_retention = _s3_repo(s3_server, bucket, lock_mode="GOVERNANCE", retention_days=0)
    with pytest.raises(InvalidInput, match="retention"):
        no_retention.put_bytes("l/none", b"x")
    with pytest.raises(InvalidInput, match="future"):
        repo.put_bytes(
            "l/past", b"x", settings=StorageSettings(retain_until=dt.datetime(2000, 1, 1))
        )


def test_s3_bucket_settings(s3_server: MotoServer, bucket: str, s3_locked_bucket: str) -> None:
    plain = _s3_repo(s3_server, bucket).bucket_settings()
    assert plain["versioning"] is None
    assert plain["object_lock"] is None
    assert plain["public_access_block"] is None
    assert plain["unsupported"] == {}  # moto implements every API read here
    # (AWS now reports SSE-S3 on every bucket; moto reports none: not asserted.)
    raw = s3_server.s3()
    raw.put_bucket_encryption(
        Bucket=bucket,
        ServerSideEncryptionConfiguration={
            "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms"}}]
        },
    )
    raw.put_public_access_block(
        Bucket=bucket,
        PublicAccessBlockConfiguration={
            "BlockPublicAcls": True,
            "IgnorePublicAcls": True,
            "BlockPublicPolicy": True,
            "RestrictPublicBuckets": True,
        },
    )
    raw.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Suspended"})
    configured = _s3_repo(s3_server, bucket).bucket_settings()
    assert configured["versioning"] == "Suspended"
    rule = configured["encryption"]["Rules"][0]
    assert rule["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "aws:kms"
    assert configured["public_access_block"]["BlockPublicAcls"] is True

    raw.put_object_lock_configuration(
        Bucket=s3_locked_bucket,
        ObjectLockConfiguration={
            "ObjectLockEnabled": "Enabled",
            "Rule": {"DefaultRetention": {"Mode": "COMPLIANCE", "Days": 7}},
        },
    )
    locked = _s3_repo(s3_server, s3_locked_bucket).bucket_settings()
    assert locked["versioning"] == "Enabled"
    assert locked["object_lock"]["ObjectLockEnabled"] == "Enabled"
    retention = locked["object_lock"]["Rule"]["DefaultRetention"]
    assert retention["Mode"] == "COMPLIANCE" and retention["Days"] == 7
    json.dumps(locked, default=str)  # plain data, fit for an audit report


def test_s3_missing_bucket(s3_server: MotoServer) -> None:
    repo = _s3_repo(s3_server, "no-such-bucket-here")
    with pytest.raises(NotFound, match="no-such-bucket-here"):
        repo.get_bytes("x")
    with pytest.raises(NotFound, match="no-such-bucket-here"):
        repo.put_bytes("x", b"1")
    with pytest.raises(NotFound, match="no-such-bucket-here"):
        list(repo.list(""))


def test_s3_cleanup_incomplete(s3_server: MotoServer, bucket: str) -> None:
    raw = s3_server.s3()
    repo = _s3_repo(s3_server, bucket)
    dangling = raw.create_multipart_upload(Bucket=bucket, Key=f"{PREFIX}/a/crashed")
    raw.upload_part(
        Bucket=bucket,
        Key=f"{PREFIX}/a/crashed",
        UploadId=dangling["UploadId"],
        PartNumber=1,
        Body=b"x" * PART,
    )
    raw.create_multipart_upload(Bucket=bucket, Key=f"{PREFIX}/b/other")
    raw.create_multipart_upload(Bucket=bucket, Key="outside/prefix")
    assert [k for k, _, _ in repo.list_incomplete("a/")] == [f"{PREFIX}/a/crashed"]
    assert repo.cleanup_incomplete("a/") == 1
    assert sorted(_uploads(repo, s3_server)) == ["outside/prefix", f"{PREFIX}/b/other"]
    assert repo.cleanup_incomplete() == 1  # everything under the repository prefix
    assert _uploads(repo, s3_server) == ["outside/prefix"]  # not ours: untouched
    assert repo.cleanup_incomplete() == 0


def test_s3_cleanup_spares_recent_uploads(s3_server: MotoServer, bucket: str) -> None:
    # moto reports every upload as initiated in 2010, so the age filter is checked stubbed.
    repo, stub = _stubbed(s3_server, bucket)
    now = dt.datetime.now(dt.UTC)
    stub.add_response(
        "list_multipart_uploads",
        {
            "Uploads": [
                {"Key": f"{PREFIX}/a/new", "UploadId": "u1", "Initiated": now},
                {
                    "Key": f"{PREFIX}/a/old",
                    "UploadId": "u2",
                    "Initiated": now - dt.timedelta(days=2),
                },
            ],
            "IsTruncated": False,
        },
    )
    stub.add_response(
        "abort_multipart_upload",
        {},
        {"Bucket": bucket, "Key": f"{PREFIX}/a/old", "UploadId": "u2"},
    )
    with stub:
        assert repo.cleanup_incomplete("a/", older_than=dt.timedelta(hours=1)) == 1
    stub.assert_no_pending_responses()


def test_s3_put_bytes_without_conditional_writes(s3_server: MotoServer, bucket: str) -> None:
    repo = S3Repository(_s3_config(s3_server, bucket), conditional_writes=False)
    repo.put_bytes("m", b"1")
    with pytest.raises(Conflict):
        repo.put_bytes("m", b"2")
    assert repo.get_bytes("m") == b"1"


def _auth_server(tmp_path: Path) -> tuple[MotoServer, dict[str, str], dict[str, str]]:
    """A separate moto server with IAM auth switched on after setup."""
    server = MotoServer(base_dir=tmp_path).start()
    iam = server.client("iam")
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
    }
    iam.create_user(UserName="backup")
    iam.put_user_policy(UserName="backup", PolicyName="s3", PolicyDocument=json.dumps(policy))
    good = iam.create_access_key(UserName="backup")["AccessKey"]
    iam.create_user(UserName="nobody")
    nobody = iam.create_access_key(UserName="nobody")["AccessKey"]
    server.create_bucket("auth-bucket")
    request = urllib.request.Request(
        f"{server.endpoint_url}/moto-api/reset-auth",
        data=b"0",
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request) as resp:
        assert resp.status == 200
    return server, good, nobody


def _auth_repo(server: MotoServer, key_id: str, secret: str) -> S3Repository:
    config = _s3_config(server, "auth-bucket").model_copy(
        update={"access_key_id": key_id, "secret_access_key": SecretStr(secret)}
    )
    return S3Repository(config, retry_wait_initial=0.01, retry_wait_max=0.05)


def _assert_no_secret(exc: BaseException, secret: str) -> None:
    text = "".join(traceback.format_exception(exc))
    assert secret not in text
    assert secret not in str(exc) and secret not in repr(exc)


def test_s3_wrong_credentials_access_denied(tmp_path: Path) -> None:
    server, good, nobody = _auth_server(tmp_path)
    try:
        ok = _auth_repo(server, good["AccessKeyId"], good["SecretAccessKey"])
        ok.put_bytes("hello", b"world")
        assert ok.get_bytes("hello") == b"world"

        wrong_secret = "Wr0ngSecretValueThatMustNeverBeShown1234"
        bad = _auth_repo(server, good["AccessKeyId"], wrong_secret)
        for call in (
            lambda: bad.get_bytes("hello"),
            lambda: bad.put_bytes("x", b"1"),
            lambda: list(bad.list("")),
            lambda: bad.exists("hello"),
        ):
            with pytest.raises(AccessDenied) as info:
                call()
            _assert_no_secret(info.value, wrong_secret)
        assert "SignatureDoesNotMatch" in str(info.value) or "403" in str(info.value)

        unknown_secret = "UnknownKeySecretValue987654321abcdefghij"
        unknown = _auth_repo(server, "AKIAUNKNOWNKEY000000", unknown_secret)
        with pytest.raises(AccessDenied, match="InvalidAccessKeyId") as info:
            unknown.get_bytes("hello")
        _assert_no_secret(info.value, unknown_secret)

        denied = _auth_repo(server, nobody["AccessKeyId"], nobody["SecretAccessKey"])
        with pytest.raises(AccessDenied, match="AccessDenied") as info:
            denied.put_bytes("y", b"1")
        _assert_no_secret(info.value, nobody["SecretAccessKey"])
    finally:
        server.stop()


def test_s3_unreachable_is_service_unavailable() -> None:
    secret = "S3cretThatMustNotLeak-unreachable-0123456789"
    config = signed_config(
        kind="s3",
        bucket="bkt",
        endpoint_url=f"http://127.0.0.1:{free_port()}",  # nothing listens there
        access_key_id="AKIAEXAMPLE",
        secret_access_key=SecretStr(secret),
        max_attempts=3,
    )
    repo = S3Repository(config, retry_wait_initial=0.01, retry_wait_max=0.05)
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable, match="after 3 attempt") as info:
        repo.get_bytes("x")
    assert time.monotonic() - started < 10
    _assert_no_secret(info.value, secret)
    with pytest.raises(ServiceUnavailable), repo.open_write("y") as writer:
        writer.write(b"small")
        writer.commit()


def _stubbed(s3_server: MotoServer, bucket: str, **extra: Any) -> tuple[S3Repository, Stubber]:
    client = s3_server.s3()
    stub = Stubber(client)
    repo = S3Repository.from_client(
        client,
        _s3_config(s3_server, bucket, **extra),
        retry_wait_initial=0.001,
        retry_wait_max=0.01,
    )
    return repo, stub


def test_s3_transient_errors_are_retried(s3_server: MotoServer, bucket: str) -> None:
    repo, stub = _stubbed(s3_server, bucket, max_attempts=3)
    stub.add_client_error("head_object", "SlowDown", http_status_code=503)
    stub.add_client_error("head_object", "InternalError", http_status_code=500)
    stub.add_response("head_object", {"ContentLength": 5})
    with stub:
        assert repo.size("k") == 5
    stub.assert_no_pending_responses()

    for _ in range(3):
        stub.add_client_error("get_object", "ServiceUnavailable", http_status_code=503)
    with stub, pytest.raises(ServiceUnavailable, match="after 3 attempt"):
        repo.get_bytes("k")
    stub.assert_no_pending_responses()

    stub.add_client_error("get_object", "AccessDenied", http_status_code=403)
    with stub, pytest.raises(AccessDenied):  # not retried
        repo.get_bytes("k")
    stub.assert_no_pending_responses()


def test_s3_put_bytes_retry_that_already_landed(s3_server: MotoServer, bucket: str) -> None:
    """First PutObject landed but its answer was lost: the retry's 412 is our own object."""
    repo, stub = _stubbed(s3_server, bucket)
    stub.add_client_error("put_object", "InternalError", http_status_code=500)
    stub.add_client_error("put_object", "PreconditionFailed", http_status_code=412)
    stub.add_response(
        "get_object", {"Body": StreamingBody(io.BytesIO(b"mine"), 4), "ContentLength": 4}
    )
    with stub:
        repo.put_bytes("m", b"mine")
    stub.assert_no_pending_responses()


class _FlakyBody:
    """A response body whose connection drops once after ``fail_after`` bytes."""

    def __init__(self, body: Any, fail_after: int) -> None:
        self._body = body
        self._left = fail_after

    def readinto(self, buffer: Any) -> int:
        if self._left <= 0:
            raise ReadTimeoutError(endpoint_url="http://test")
        view = memoryview(buffer)[: self._left]
        n = int(self._body.readinto(view))
        self._left -= n
        return n

    def close(self) -> None:
        self._body.close()


class _FlakyClient:
    """Wraps a real client: get_object bodies drop; upload_part fails for one part."""

    def __init__(self, client: Any, *, drop_after: int = 0, fail_part: int = 0) -> None:
        self._client = client
        self.drop_after = drop_after
        self.fail_part = fail_part
        self.get_calls: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def get_object(self, **kwargs: Any) -> Any:
        self.get_calls.append(kwargs)
        resp = self._client.get_object(**kwargs)
        if self.drop_after and len(self.get_calls) == 1:
            resp["Body"] = _FlakyBody(resp["Body"], self.drop_after)
        return resp

    def upload_part(self, **kwargs: Any) -> Any:
        if kwargs["PartNumber"] == self.fail_part:
            response: Any = {
                "Error": {"Code": "InvalidArgument", "Message": "injected"},
                "ResponseMetadata": {"HTTPStatusCode": 400},
            }
            raise ClientError(response, "UploadPart")
        return self._client.upload_part(**kwargs)


def test_s3_read_resumes_after_dropped_connection(s3_server: MotoServer, bucket: str) -> None:
    data = _data(7 * MIB)
    _s3_repo(s3_server, bucket).put_bytes("r/obj", data)
    flaky = _FlakyClient(s3_server.s3(), drop_after=3 * MIB + 11)
    repo = S3Repository.from_client(flaky, _s3_config(s3_server, bucket))  # type: ignore[arg-type]
    with repo.open_read("r/obj") as reader:
        assert reader.read() == data
    assert len(flaky.get_calls) == 2
    resumed = flaky.get_calls[1]
    assert resumed["Range"] == f"bytes={3 * MIB + 11}-"
    assert resumed["IfMatch"]

    # the object changes between the drop and the resume: refused, not spliced
    flaky2 = _FlakyClient(s3_server.s3(), drop_after=MIB)
    repo2 = S3Repository.from_client(flaky2, _s3_config(s3_server, bucket))  # type: ignore[arg-type]
    reader2 = repo2.open_read("r/obj")
    reader2.read(MIB)
    _s3_repo(s3_server, bucket).put_bytes("r/obj", b"replaced", overwrite=True)
    with pytest.raises(IntegrityError, match="changed"):
        reader2.read()
    reader2.close()


def test_s3_failed_part_aborts_upload(s3_server: MotoServer, bucket: str) -> None:
    flaky = _FlakyClient(s3_server.s3(), fail_part=2)
    repo = S3Repository.from_client(flaky, _s3_config(s3_server, bucket))  # type: ignore[arg-type]
    with pytest.raises(StrongroomError, match="injected"), repo.open_write("f/x") as writer:
        for _ in range(30):
            writer.write(_data(MIB))
        writer.commit()
    assert _uploads(repo, s3_server) == []
    assert not repo.exists("f/x")


def test_s3_prefect_aws_blocks(s3_server: MotoServer, bucket: str) -> None:
    from prefect_aws import AwsClientParameters, AwsCredentials, S3Bucket

    creds = AwsCredentials(
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=SecretStr(s3_server.secret_key),
        region_name="us-east-1",
        aws_client_parameters=AwsClientParameters(endpoint_url=s3_server.endpoint_url),
    )
    block = S3Bucket(bucket_name=bucket, credentials=creds, bucket_folder="from-block")
    repo = S3Repository.from_s3_bucket(block, signed_config(kind="s3", sse="AES256"))
    assert repo.describe() == f"s3://{bucket}/from-block"
    repo.put_bytes("p/x", b"via block")
    head = s3_server.s3().head_object(Bucket=bucket, Key="from-block/p/x")
    assert head["ServerSideEncryption"] == "AES256"
    direct = S3Repository.from_aws_credentials(creds, _s3_config(s3_server, bucket, prefix=""))
    assert direct.get_bytes("from-block/p/x") == b"via block"


def test_s3_config_errors() -> None:
    with pytest.raises(InvalidInput, match="bucket"):
        S3Repository(signed_config(kind="s3"), client=object())  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        S3Repository(
            signed_config(kind="s3", bucket="bkt", prefix="a/../b"),
            client=object(),  # type: ignore[arg-type]
        )


def test_s3_streamed_upload_memory_is_bounded(s3_server: MotoServer, bucket: str) -> None:
    """Peak Python allocations while streaming N MiB (default 64; set
    STRONGROOM_REPO_MEM_MB=200 for the figure in the docs) stay around three parts."""
    total_mb = int(os.environ.get("STRONGROOM_REPO_MEM_MB", "64"))
    repo = _s3_repo(s3_server, bucket)
    chunk = os.urandom(MIB)
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        started = time.monotonic()
        with repo.open_write("mem/stream") as writer:
            for _ in range(total_mb):
                writer.write(chunk)
            writer.commit()
        elapsed = time.monotonic() - started
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    print(
        f"\nstreamed {total_mb} MiB to moto in {elapsed:.1f} s "
        f"({total_mb / elapsed:.0f} MiB/s), part_size {PART // MIB} MiB, "
        f"peak traced memory {peak / MIB:.1f} MiB"
    )
    assert repo.size("mem/stream") == total_mb * MIB
    assert peak < 4 * PART + 4 * MIB, f"peak {peak / MIB:.1f} MiB"
