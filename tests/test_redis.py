"""Redis backup, restore and verify against real redis-server processes.

The session ``redis_server`` is the source; extra servers from
strongroom.sandbox are restore targets and the "managed Redis" that refuses
SYNC (and BGSAVE/CONFIG) through ``rename-command``.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redispy
from pydantic import SecretStr

from strongroom.artifacts import read_artifact, store_artifact
from strongroom.catalog import Catalog, data_key, manifest_key
from strongroom.config import EncryptionConfig, RepositoryConfig
from strongroom.engines.redis.backup import backup_redis
from strongroom.engines.redis.conn import RedisConnection
from strongroom.engines.redis.key_copy import value_digest
from strongroom.engines.redis.rdb import crc64
from strongroom.engines.redis.restore import (
    RdbVersionTooNew,
    RedisRestoreRequest,
    restore_redis,
)
from strongroom.engines.redis.sync import SyncRefused
from strongroom.errors import AccessDenied, IntegrityError, InvalidInput, TargetNotEmpty
from strongroom.ids import new_backup_id
from strongroom.repository import Repository
from strongroom.sandbox.redis import RedisServer
from strongroom.verify import verify_backup
from tests.fixtures.strongroom_fixtures import signing_block_fields

Repo = tuple[Repository, RepositoryConfig]
DBS = (0, 1, 3)
BINARY_KEY = b"bin:\x00\xff\r\n key"
BINARY_VALUE = bytes(range(256)) * 4


def client(server: RedisServer, db: int = 0) -> redispy.Redis:
    return redispy.Redis(host=server.host, port=server.port, db=db, password=server.password)


def conn_for(server: RedisServer, name: str = "cache", **extra: Any) -> RedisConnection:
    return RedisConnection(
        name=name,
        host=server.host,
        port=server.port,
        password=SecretStr(server.password),
        **extra,
    )


def populate(server: RedisServer) -> None:
    c = client(server)
    c.flushall()
    c.set("str:plain", "hello")
    c.set(BINARY_KEY, BINARY_VALUE)
    c.set("str:int", 12345)
    c.hset("hash:small", mapping={"f1": "v1", b"\x00bin": b"\xff\xfe"})
    c.hset("hash:big", mapping={f"field{i}": f"value{i}" * 3 for i in range(600)})
    c.rpush("list:1", *[f"item{i}" for i in range(300)])
    c.sadd("set:ints", *range(40))
    c.sadd("set:strs", *[f"m{i}" for i in range(200)])
    c.zadd("zset:1", {f"member{i}": i * 1.5 for i in range(150)})
    for i in range(25):
        c.xadd("stream:1", {"n": str(i), "payload": b"\x01\x02"})
    c.xgroup_create("stream:1", "workers", id="0")
    c.xreadgroup("workers", "w1", {"stream:1": ">"}, count=5)
    c.set("ttl:str", "soon", ex=3600)
    c.hset("ttl:hash", mapping={"a": "1"})
    c.pexpire("ttl:hash", 7_200_000)
    pipe = c.pipeline(transaction=False)
    for i in range(1500):
        pipe.set(f"user:{i}", f"profile-{i}")
    for i in range(300):
        pipe.set(f"session:{i}", os.urandom(16), ex=900 + i)
    pipe.execute()
    c1 = client(server, 1)
    c1.set("db1:key", "one")
    c1.rpush("db1:list", "a", "b", "c")
    c3 = client(server, 3)
    c3.mset({f"user:db3:{i}": i for i in range(100)})


def fingerprint(
    server: RedisServer, dbs: tuple[int, ...] = DBS, pattern: str | None = None
) -> dict[int, dict[bytes, tuple[str, str, bool]]]:
    out: dict[int, dict[bytes, tuple[str, str, bool]]] = {}
    for db in dbs:
        c = client(server, db)
        keys = sorted(set(c.scan_iter(match=pattern, count=1000)))
        digests = {}
        for key in keys:
            d = value_digest(c, key)
            digests[key] = (d["type"], d["sha256"], d["ttl"] >= 0)
        out[db] = digests
    return out


@pytest.fixture(scope="module")
def source(redis_server: RedisServer) -> RedisServer:
    populate(redis_server)
    return redis_server


@pytest.fixture(scope="module")
def source_print(source: RedisServer) -> dict[int, dict[bytes, tuple[str, str, bool]]]:
    return fingerprint(source)


@pytest.fixture(scope="module")
def target() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def empty_target(target: RedisServer) -> RedisServer:
    client(target).flushall()
    return target


def _restore(server: RedisServer, repo: Repo, key: EncryptionConfig, **kw: Any) -> dict[str, Any]:
    kw.setdefault("source_target", "cache")
    return restore_redis(conn_for(server, "restored"), repo[0], key, RedisRestoreRequest(**kw))


# -- backup --------------------------------------------------------------------------------


def test_sync_backup_manifest_and_verify(
    source: RedisServer, local_repo: Repo, age_key: EncryptionConfig
) -> None:
    manifest = backup_redis(conn_for(source), local_repo[0], local_repo[1], age_key)
    d = manifest.details
    assert manifest.kind == "rdb" and d["method"] == "sync" and not d["attempts"]
    assert d["sync"]["transfer"] == "diskless" and d["sync"]["command"] == "PSYNC"
    assert d["redis_version"].startswith("7.") and d["rdb_version"] == 10
    assert d["rdb"]["aux"]["redis-ver"] == d["redis_version"]
    assert len(d["rdb"]["crc64"]) == 16
    assert d["used_memory"] > 0
    assert d["keyspace"]["0"]["keys"] == 1812 and d["keyspace"]["0"]["expires"] == 302
    assert d["keyspace"]["1"]["keys"] == 2 and d["keyspace"]["3"]["keys"] == 100
    assert manifest.artifacts[0].content == "redis-rdb"
    report = verify_backup(local_repo[0], manifest, age_key)
    assert report["ok"], report
    assert report["artifacts"][0]["structure"]["rdb_version"] == 10
    raw = local_repo[0].get_bytes(manifest_key("redis", "cache", manifest.backup_id)).decode()
    assert source.password not in raw and age_key.identities[0].get_secret_value() not in raw


# -- live restore --------------------------------------------------------------------------


@pytest.mark.parametrize("repo_kind", ["local_repo", "s3_repo"])
def test_live_round_trip(
    source: RedisServer,
    source_print: dict[int, Any],
    empty_target: RedisServer,
    age_key: EncryptionConfig,
    repo_kind: str,
    request: pytest.FixtureRequest,
) -> None:
    repo = request.getfixturevalue(repo_kind)
    manifest = backup_redis(conn_for(source), repo[0], repo[1], age_key)
    report = _restore(empty_target, repo, age_key)
    assert report["keys_ok"] and report["matches_manifest"], report["key_checks"]
    assert report["sample"]["ok"] and report["sample"]["checked"] >= 20
    assert report["copy"]["method"] == "pipeline" and report["copy"]["keys"] == 1914
    assert report["backup_id"] == manifest.backup_id
    assert fingerprint(empty_target) == source_print
    ttl = client(empty_target).pttl("ttl:hash")
    assert 7_000_000 < ttl <= 7_200_000  # TTLs travel with the keys
    assert client(empty_target).get(BINARY_KEY) == BINARY_VALUE

    # the target now holds keys: refused without flush_existing, nothing changed
    client(empty_target).set("user:0", "changed")
    client(empty_target).set("extra", "x")
    with pytest.raises(TargetNotEmpty, match="flush_existing"):
        _restore(empty_target, repo, age_key)
    assert client(empty_target).get("user:0") == b"changed"
    plan = _restore(empty_target, repo, age_key, dry_run=True)
    assert plan["dry_run"] and "flush_existing" in plan["blocked"]
    assert plan["conflicts"]["0"] == 1813
    report = _restore(empty_target, repo, age_key, flush_existing=True)
    assert report["flushed"]["0"] == 1813
    assert fingerprint(empty_target) == source_print


def test_subset_by_pattern_and_db(
    source: RedisServer,
    source_print: dict[int, Any],
    empty_target: RedisServer,
    local_repo: Repo,
    age_key: EncryptionConfig,
) -> None:
    backup_redis(conn_for(source), local_repo[0], local_repo[1], age_key)
    report = _restore(
        empty_target, local_repo, age_key, key_pattern="user:*", dbs=[0, 3], copy_method="migrate"
    )
    assert report["copy"]["method"] == "migrate"
    assert [c["restored"] for c in report["key_checks"]] == [1500, 100]
    assert fingerprint(empty_target, (0, 3)) == fingerprint(source, (0, 3), "user:*")
    assert client(empty_target, 1).dbsize() == 0
    assert client(empty_target).exists("str:plain") == 0
    # another pattern into the same dbs: no conflict with user:* keys
    _restore(empty_target, local_repo, age_key, key_pattern="session:*", dbs=[0])
    assert client(empty_target).dbsize() == 1800
    # the same pattern again conflicts; flush_existing removes only the matching keys
    client(empty_target).set("user:extra", "stale")
    with pytest.raises(TargetNotEmpty, match="user"):
        _restore(empty_target, local_repo, age_key, key_pattern="user:*", dbs=[0])
    _restore(empty_target, local_repo, age_key, key_pattern="user:*", dbs=[0], flush_existing=True)
    assert client(empty_target).exists("user:extra") == 0
    assert client(empty_target).dbsize() == 1800
    with pytest.raises(Exception, match="db 5 holds no keys"):
        _restore(empty_target, local_repo, age_key, dbs=[5])


# -- fallbacks -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def no_sync_server() -> Iterator[RedisServer]:
    """Replication refused, but its data dir is visible: the BGSAVE fallback applies."""
    server = RedisServer(extra_config='rename-command SYNC ""\nrename-command PSYNC ""').start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def managed_server() -> Iterator[RedisServer]:
    """Like managed Redis: no SYNC/PSYNC, no BGSAVE, no CONFIG."""
    server = RedisServer(
        extra_config="\n".join(
            f'rename-command {c} ""' for c in ("SYNC", "PSYNC", "BGSAVE", "CONFIG")
        )
    ).start()
    yield server
    server.stop()


def test_sync_refused_falls_back_to_bgsave(
    no_sync_server: RedisServer,
    empty_target: RedisServer,
    local_repo: Repo,
    age_key: EncryptionConfig,
) -> None:
    populate(no_sync_server)
    expected = fingerprint(no_sync_server)
    with pytest.raises(SyncRefused, match="PSYNC and SYNC refused"):
        backup_redis(conn_for(no_sync_server), local_repo[0], local_repo[1], age_key, method="sync")
    manifest = backup_redis(conn_for(no_sync_server), local_repo[0], local_repo[1], age_key)
    d = manifest.details
    assert d["method"] == "bgsave" and d["fallback"]
    assert d["attempts"][0]["method"] == "sync" and "refused" in d["attempts"][0]["reason"]
    assert d["bgsave"]["path"] == str(no_sync_server.dir / "dump.rdb")
    assert d["keyspace"]["0"]["keys"] == 1812
    assert verify_backup(local_repo[0], manifest, age_key)["ok"]
    report = _restore(empty_target, local_repo, age_key)
    assert report["keys_ok"] and report["matches_manifest"]
    assert fingerprint(empty_target) == expected


def test_managed_redis_falls_back_to_logical(
    managed_server: RedisServer,
    empty_target: RedisServer,
    local_repo: Repo,
    age_key: EncryptionConfig,
    caplog: pytest.LogCaptureFixture,
) -> None:
    populate(managed_server)
    expected = fingerprint(managed_server)
    caplog.set_level(logging.WARNING, logger="strongroom.redis")
    manifest = backup_redis(conn_for(managed_server), local_repo[0], local_repo[1], age_key)
    d = manifest.details
    assert manifest.kind == "logical" and d["method"] == "logical"
    assert [a["method"] for a in d["attempts"]] == ["sync", "bgsave"]
    assert "CONFIG" in d["attempts"][1]["reason"]
    assert "refuses replication" in caplog.text
    assert d["keyspace"] == {"0": {"keys": 1812}, "1": {"keys": 2}, "3": {"keys": 100}}
    assert d["rdb_version"] == 10
    report = verify_backup(local_repo[0], manifest, age_key)
    assert report["ok"], report
    assert report["artifacts"][0]["structure"]["keys"] == {"0": 1812, "1": 2, "3": 100}
    restored = _restore(empty_target, local_repo, age_key)
    assert restored["keys_ok"] and restored["matches_manifest"] and restored["sample"]["ok"]
    assert fingerprint(empty_target) == expected
    assert 7_000_000 < client(empty_target).pttl("ttl:hash") <= 7_200_000
    # logical backups replay into a live server only
    with pytest.raises(InvalidInput, match="use mode=live"):
        _restore(empty_target, local_repo, age_key, mode="file", flush_existing=True)


# -- file restore --------------------------------------------------------------------------


class FileTarget:
    """A redis-server restarted through local commands, as on a VM."""

    def __init__(self) -> None:
        self.server = RedisServer().start()
        self.pidfile = self.server.base_dir / "daemon.pid"

    def conn(self, **extra: Any) -> RedisConnection:
        s = self.server
        fields: dict[str, Any] = {
            "data_path": str(s.dir / "dump.rdb"),
            "stop_command": f"redis-cli -h {s.host} -p {s.port} shutdown nosave",
            "start_command": f"redis-server {s.conf_path} --daemonize yes --pidfile {self.pidfile}",
        }
        fields.update(extra)
        return conn_for(s, "filetarget", **fields)

    def pid(self) -> int | None:
        if self.pidfile.exists():
            return int(self.pidfile.read_text().strip())
        return self.server.proc.pid if self.server.proc else None

    def stop(self) -> None:
        if self.pidfile.exists():
            pid = int(self.pidfile.read_text().strip())
            try:
                os.kill(pid, signal.SIGTERM)
                for _ in range(100):
                    os.kill(pid, 0)
                    time.sleep(0.05)
            except ProcessLookupError:
                pass
        self.server.stop()


@pytest.fixture(scope="module")
def file_target() -> Iterator[FileTarget]:
    target = FileTarget()
    yield target
    target.stop()


@pytest.mark.parametrize("repo_kind", ["local_repo", "s3_repo"])
def test_file_round_trip(
    source: RedisServer,
    source_print: dict[int, Any],
    file_target: FileTarget,
    age_key: EncryptionConfig,
    repo_kind: str,
    request: pytest.FixtureRequest,
) -> None:
    repo = request.getfixturevalue(repo_kind)
    backup_redis(conn_for(source), repo[0], repo[1], age_key)
    server = file_target.server
    client(server).set("old", "data")
    conn = file_target.conn()
    with pytest.raises(TargetNotEmpty):
        restore_redis(
            conn, repo[0], age_key, RedisRestoreRequest(source_target="cache", mode="file")
        )
    pid_before = file_target.pid()
    report = restore_redis(
        conn,
        repo[0],
        age_key,
        RedisRestoreRequest(source_target="cache", mode="file", flush_existing=True),
    )
    assert report["keys_ok"] and report["matches_manifest"] and report["sample"]["ok"]
    assert file_target.pid() != pid_before  # it really restarted
    assert client(server).exists("old") == 0
    assert fingerprint(server) == source_print
    previous = Path(report["previous_data_file"]) if report["previous_data_file"] else None
    assert previous is None or previous.exists()
    assert not list(server.dir.glob(".strongroom-restore-*"))


def test_file_mode_needs_coordination(
    source: RedisServer, file_target: FileTarget, local_repo: Repo, age_key: EncryptionConfig
) -> None:
    backup_redis(conn_for(source), local_repo[0], local_repo[1], age_key)
    req = RedisRestoreRequest(source_target="cache", mode="file", flush_existing=True)
    with pytest.raises(InvalidInput, match="stop_command and start_command"):
        restore_redis(conn_for(file_target.server), local_repo[0], age_key, req)
    k8s = file_target.conn(stop_command=None, start_command=None, k8s_statefulset="redis")
    with pytest.raises(InvalidInput, match="not in a cluster"):
        restore_redis(k8s, local_repo[0], age_key, req)
    wrong = file_target.conn(data_path=str(file_target.server.base_dir / "other.rdb"))
    with pytest.raises(InvalidInput, match="not the file the server loads"):
        restore_redis(wrong, local_repo[0], age_key, req)
    with pytest.raises(InvalidInput, match="key_pattern"):
        restore_redis(
            file_target.conn(),
            local_repo[0],
            age_key,
            req.model_copy(update={"key_pattern": "user:*"}),
        )


# -- bad input -----------------------------------------------------------------------------


def test_wrong_password(
    source: RedisServer, target: RedisServer, local_repo: Repo, age_key: EncryptionConfig
) -> None:
    secret = "wrong-password-1234567"
    bad = RedisConnection(name="cache", port=source.port, password=SecretStr(secret))
    with pytest.raises(AccessDenied) as info:
        backup_redis(bad, local_repo[0], local_repo[1], age_key)
    assert secret not in str(info.value)
    backup_redis(conn_for(source), local_repo[0], local_repo[1], age_key)
    bad_target = RedisConnection(name="cache", port=target.port, password=SecretStr(secret))
    with pytest.raises(AccessDenied) as info:
        restore_redis(bad_target, local_repo[0], age_key, RedisRestoreRequest())
    assert secret not in str(info.value)
    nopass = RedisConnection(name="cache", port=source.port)
    with pytest.raises(AccessDenied):
        backup_redis(nopass, local_repo[0], local_repo[1], age_key, method="sync")


def _forge_newer_backup(repo: Repo, key: EncryptionConfig, version: int) -> str:
    """A copy of the latest backup whose RDB claims a newer format (CRC64 recomputed)."""
    catalog = Catalog(repo[0])
    original = catalog.resolve("latest", "redis", "cache")
    plain = io.BytesIO()
    read_artifact(repo[0], original.artifacts[0], plain, encryption=key)
    data = bytearray(plain.getvalue())
    data[5:9] = b"%04d" % version
    data[-8:] = crc64(bytes(data[:-8])).to_bytes(8, "little")
    bid = new_backup_id()
    artifact = store_artifact(
        repo[0],
        data_key("redis", "cache", bid, "dump.rdb"),
        io.BytesIO(bytes(data)),
        name="dump.rdb",
        content="redis-rdb",
        encryption=key,
        level=3,
    )
    details = {
        **original.details,
        "rdb_version": version,
        "rdb": {**original.details["rdb"], "version": version},
    }
    catalog.write(
        original.model_copy(update={"backup_id": bid, "artifacts": [artifact], "details": details})
    )
    return bid


def test_newer_rdb_is_refused_before_anything_changes(
    source: RedisServer,
    target: RedisServer,
    file_target: FileTarget,
    local_repo: Repo,
    age_key: EncryptionConfig,
) -> None:
    backup_redis(conn_for(source), local_repo[0], local_repo[1], age_key)
    bid = _forge_newer_backup(local_repo, age_key, 12)
    client(target).flushall()
    client(target).set("keep", "me")
    with pytest.raises(RdbVersionTooNew, match=r"RDB version 12 \(written by Redis 7.4"):
        _restore(target, local_repo, age_key, backup_id=bid, flush_existing=True)
    assert client(target).dbsize() == 1 and client(target).get("keep") == b"me"
    client(file_target.server).set("keep", "me")
    pid = file_target.pid()
    with pytest.raises(RdbVersionTooNew, match="loads RDB versions up to 10"):
        restore_redis(
            file_target.conn(),
            local_repo[0],
            age_key,
            RedisRestoreRequest(
                backup_id=bid, source_target="cache", mode="file", flush_existing=True
            ),
        )
    assert file_target.pid() == pid and client(file_target.server).get("keep") == b"me"
    # and verify still accepts the forged file's structure (it is a consistent RDB)
    forged = Catalog(local_repo[0]).resolve(bid, "redis", "cache")
    assert verify_backup(local_repo[0], forged, age_key)["ok"]


def test_tampered_artifact_changes_nothing(
    source: RedisServer, target: RedisServer, local_repo: Repo, age_key: EncryptionConfig
) -> None:
    manifest = backup_redis(conn_for(source), local_repo[0], local_repo[1], age_key)
    path = Path(local_repo[1].path or "") / manifest.artifacts[0].key
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    report = verify_backup(local_repo[0], manifest, age_key)
    assert not report["ok"]
    client(target).flushall()
    client(target).set("keep", "me")
    with pytest.raises(IntegrityError):
        _restore(target, local_repo, age_key, flush_existing=True)
    assert client(target).dbsize() == 1 and client(target).get("keep") == b"me"


def test_bad_request_values(
    target: RedisServer, local_repo: Repo, age_key: EncryptionConfig
) -> None:
    with pytest.raises(InvalidInput, match="key_pattern"):
        _restore(target, local_repo, age_key, key_pattern="")
    with pytest.raises(InvalidInput, match="invalid backup id"):
        _restore(target, local_repo, age_key, backup_id="../../etc")
    with pytest.raises((ValueError, InvalidInput)):
        RedisConnection(name="../x", port=1)


# -- Prefect flows -------------------------------------------------------------------------


def test_flows_backup_verify_restore(
    prefect_api: str,
    source: RedisServer,
    source_print: dict[int, Any],
    empty_target: RedisServer,
    tmp_path: Path,
    age_key: EncryptionConfig,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    from blocks import BackupRepository, EncryptionKey
    from blocks.redis import RedisTarget
    from flows.redis import backup_redis_flow, restore_redis_flow
    from flows.verify import verify_backup_flow

    for block in (RedisTarget, BackupRepository, EncryptionKey):
        block.register_type_and_schema()
    EncryptionKey(
        recipients=age_key.recipients, identity=age_key.identities[0].get_secret_value()
    ).save("redis-key", overwrite=True)
    BackupRepository(**signing_block_fields(), local_path=str(tmp_path / "repo")).save(
        "redis-repo", overwrite=True
    )
    RedisTarget(host=source.host, port=source.port, password=source.password).save(
        "cache", overwrite=True
    )
    RedisTarget(
        host=empty_target.host, port=empty_target.port, password=empty_target.password
    ).save("cache-copy", overwrite=True)
    caplog.set_level(logging.DEBUG)
    common = {"repository": "redis-repo", "encryption_key": "redis-key"}
    manifest = backup_redis_flow(target="cache", **common)
    assert manifest["details"]["method"] == "sync"
    assert verify_backup_flow(backup_id=manifest["backup_id"], **common)["ok"]
    plan = restore_redis_flow(target="cache-copy", source_target="cache", dry_run=True, **common)
    assert plan["dry_run"] and not plan.get("blocked")
    report = restore_redis_flow(target="cache-copy", source_target="cache", **common)
    assert report["keys_ok"] and fingerprint(empty_target) == source_print
    with pytest.raises(TargetNotEmpty):
        restore_redis_flow(target="cache-copy", source_target="cache", **common)
    cli_out = _cli_checks(manifest["backup_id"])

    from prefect.client.orchestration import get_client

    async def collect() -> tuple[set[str], str]:
        async with get_client() as c:
            arts = await c.read_artifacts(limit=200)
            logs = await c.read_logs(limit=200)
        keys = {a.key for a in arts if a.key}
        text = "\n".join([str(x.message) for x in logs] + [str(a.data) for a in arts])
        return keys, text

    keys, text = asyncio.run(collect())
    assert {
        "backup-redis-cache-summary",
        "backup-redis-cache-table",
        "restore-redis-cache-copy-summary",
    } <= keys
    out, err = capfd.readouterr()
    for secret in (
        source.password,
        empty_target.password,
        age_key.identities[0].get_secret_value(),
    ):
        for blob in (caplog.text, out, err, text, cli_out):
            assert secret not in blob
        for path in (tmp_path / "repo").rglob("*.json"):
            assert secret not in path.read_text()


def _cli_checks(backup_id: str) -> str:
    """The redis commands, registered on fresh command groups as cli.py does."""
    import json

    import typer
    from typer.testing import CliRunner

    from strongroom.cli.redis import register

    app, backup_app, restore_app = typer.Typer(), typer.Typer(), typer.Typer()
    app.add_typer(backup_app, name="backup")
    app.add_typer(restore_app, name="restore")
    register(backup_app, restore_app)
    runner = CliRunner()
    opts = ["-r", "redis-repo", "-k", "redis-key"]
    done = runner.invoke(app, ["backup", "redis", "cache", "--method", "sync", "--json", *opts])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["details"]["method"] == "sync"
    plan = runner.invoke(
        app,
        [
            "restore",
            "redis",
            "cache-copy",
            "--source-target",
            "cache",
            "--dry-run",
            "--json",
            *opts,
        ],
    )
    assert plan.exit_code == 0 and json.loads(plan.stdout)["blocked"]
    refused = runner.invoke(
        app, ["restore", "redis", "cache-copy", "--source-target", "cache", "-b", backup_id, *opts]
    )
    assert refused.exit_code == 5 and "flush_existing" in refused.output
    subset = runner.invoke(
        app,
        [
            "restore",
            "redis",
            "cache-copy",
            "--source-target",
            "cache",
            "--key-pattern",
            "user:1*",
            "--db",
            "0",
            "--flush-existing",
            *opts,
        ],
    )
    assert subset.exit_code == 0, subset.output
    assert "restored" in subset.output
    bad = runner.invoke(app, ["restore", "redis", "cache-copy", "--mode", "tape", *opts])
    assert bad.exit_code == 2
    return "\n".join(r.output for r in (done, plan, refused, subset, bad))
