"""SIGKILL of ClickHouse and Redis backups and restores, against the real servers.

Each operation runs in a child process (its own process group, like ``T/_child.py``)
and is killed with SIGKILL mid-stream. The child paces its writes to, or reads from,
the repository (``SR_WRITE_BPS`` / ``SR_READ_BPS``) so the kill lands mid-stream on any
machine; the engines themselves run unchanged.

Backups: no manifest is published, the earlier backup still verifies, and a re-run
succeeds. Restores: what is left is exactly what docs/clickhouse.md and docs/redis.md
say, and the tests state it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis as redispy
from pydantic import BaseModel, SecretStr

from strongroom.catalog import Catalog
from strongroom.config import EncryptionConfig, RepositoryConfig
from strongroom.engines.clickhouse.backup import backup_clickhouse
from strongroom.engines.clickhouse.conn import ClickHouseConnection
from strongroom.engines.clickhouse.restore import ChRestoreRequest, restore_clickhouse
from strongroom.engines.redis.backup import backup_redis
from strongroom.engines.redis.conn import RedisConnection
from strongroom.engines.redis.restore import RedisRestoreRequest, restore_redis
from strongroom.errors import TargetNotEmpty
from strongroom.policy import find_orphans
from strongroom.repository.local import LocalRepository
from strongroom.sandbox.clickhouse import ClickHouseServer
from strongroom.sandbox.redis import RedisServer
from strongroom.verify import verify_backup
from tests.faults._child import _throttle_reads
from tests.faults._support import ROOT, kill_when
from tests.fixtures.strongroom_fixtures import make_local_repo

pytestmark = pytest.mark.slow

Repo = tuple[LocalRepository, RepositoryConfig]
PACE_BPS = 2 * 1024 * 1024  # repository bytes per second in the killed child
STREAMING = 256 * 1024  # a temp file this big: the data artifact is mid-stream

# ----------------------------------------------------------------------- the child


def _throttle_writes(bps: int) -> None:
    from strongroom.repository.local import LocalObjectWriter

    original = LocalObjectWriter.write

    def paced(self: LocalObjectWriter, data: bytes | bytearray | memoryview) -> int:
        time.sleep(len(data) / bps)
        return original(self, data)

    LocalObjectWriter.write = paced  # type: ignore[method-assign]


def _child_main() -> None:
    """One backup or restore of ClickHouse or Redis, configured by the environment."""
    op = os.environ["SR_OP"]
    conn_data = json.loads(os.environ["SR_CONN"])
    if os.environ.get("SR_CONN_PASSWORD"):
        conn_data["password"] = os.environ["SR_CONN_PASSWORD"]
    config = RepositoryConfig.model_validate_json(os.environ["SR_REPO"])
    assert config.path is not None
    repo = make_local_repo(Path(config.path))
    enc = EncryptionConfig(
        recipients=[os.environ["SR_AGE_RECIPIENT"]],
        identities=[SecretStr(os.environ["SR_AGE_IDENTITY"])],
    )
    if os.environ.get("SR_WRITE_BPS"):
        _throttle_writes(int(os.environ["SR_WRITE_BPS"]))
    if os.environ.get("SR_READ_BPS"):
        _throttle_reads(repo, int(os.environ["SR_READ_BPS"]))
    result: Any
    if op == "ch-backup":
        result = backup_clickhouse(
            ClickHouseConnection.model_validate(conn_data), repo, config, enc
        ).backup_id
    elif op == "redis-backup":
        result = backup_redis(
            RedisConnection.model_validate(conn_data), repo, config, enc
        ).backup_id
    elif op == "ch-restore":
        req = ChRestoreRequest.model_validate_json(os.environ["SR_REQUEST"])
        result = restore_clickhouse(ClickHouseConnection.model_validate(conn_data), repo, enc, req)
    else:
        rreq = RedisRestoreRequest.model_validate_json(os.environ["SR_REQUEST"])
        result = restore_redis(RedisConnection.model_validate(conn_data), repo, enc, rreq)
    print(json.dumps({"result": result}, default=str))


def _start(
    op: str,
    conn: ClickHouseConnection | RedisConnection,
    config: RepositoryConfig,
    enc: EncryptionConfig,
    *,
    request: BaseModel | None = None,
    **pace: int,
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "REDISCLI"))}
    env.update(
        SR_OP=op,
        SR_CONN=conn.model_dump_json(exclude={"password"}),
        SR_CONN_PASSWORD=conn.password.get_secret_value() if conn.password else "",
        SR_REPO=config.model_dump_json(),
        SR_AGE_RECIPIENT=enc.recipients[0],
        SR_AGE_IDENTITY=enc.identities[0].get_secret_value(),
        SR_REQUEST=request.model_dump_json() if request is not None else "",
        PYTHONPATH=str(ROOT),
        **{f"SR_{k.upper()}": str(v) for k, v in pace.items()},
    )
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from tests.faults.test_kill_other_engines import _child_main; _child_main()",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


# ------------------------------------------------------------------ shared checks


def _streaming(repo: LocalRepository) -> Callable[[], bool]:
    def ready() -> bool:
        return any(p.stat().st_size >= STREAMING for p in repo.root.rglob(".*.tmp-*"))

    return ready


def _backup_killed_then_rerun(
    repo: LocalRepository,
    config: RepositoryConfig,
    key: EncryptionConfig,
    op: str,
    conn: ClickHouseConnection | RedisConnection,
    first: str,
) -> str:
    """Kill a second backup mid-stream: no manifest, the first still verifies, only the
    killed run's folder is an orphan; then a re-run publishes and verifies."""
    before = [m.backup_id for m in Catalog(repo).list()]
    assert before == [first]
    before_data = {i.key for i in repo.list("data/")}
    kill_when(_start(op, conn, config, key, write_bps=PACE_BPS), _streaming(repo))
    assert [m.backup_id for m in Catalog(repo).list()] == before
    assert before_data <= {i.key for i in repo.list("data/")}
    assert list(repo.root.rglob(".*.tmp-*")), "the kill should leave the temp file behind"
    repo.cleanup_incomplete("")
    assert not list(repo.root.rglob(".*.tmp-*"))
    orphans, dangling = find_orphans(repo, grace=dt.timedelta(0))
    assert dangling == []
    assert first not in {o["backup_id"] for o in orphans}
    assert {k for o in orphans for k in o["objects"]} == {
        i.key for i in repo.list("data/")
    } - before_data
    assert verify_backup(repo, Catalog(repo).resolve(first), key)["ok"]

    proc = _start(op, conn, config, key)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
    second = str(json.loads(out.decode().strip().splitlines()[-1])["result"])
    assert [m.backup_id for m in Catalog(repo).list()] == sorted([first, second])
    assert verify_backup(repo, Catalog(repo).resolve(second), key)["ok"]
    return second


# --------------------------------------------------------------------- ClickHouse


CH_ROWS = 200_000


def _ch(server: ClickHouseServer, sql: str) -> str:
    return server.query(sql).strip()


@pytest.fixture
def ch_db(clickhouse_server: ClickHouseServer) -> Iterator[str]:
    """A database with one ~13 MB (raw) MergeTree table of poorly compressible rows."""
    name = f"killch_{uuid.uuid4().hex[:8]}"
    _ch(clickhouse_server, f"CREATE DATABASE {name}")
    _ch(
        clickhouse_server,
        f"CREATE TABLE {name}.big (id UInt64, s String) ENGINE = MergeTree ORDER BY id",
    )
    _ch(
        clickhouse_server,
        f"INSERT INTO {name}.big SELECT number, concat(hex(MD5(toString(number))), "
        f"hex(MD5(toString(number + 7)))) FROM system.numbers LIMIT {CH_ROWS}",
    )
    try:
        yield name
    finally:
        _ch(clickhouse_server, f"DROP DATABASE IF EXISTS {name}")


def _ch_conn(server: ClickHouseServer, db: str) -> ClickHouseConnection:
    return ClickHouseConnection(
        name="killch",
        http_port=server.http_port,
        port=server.tcp_port,
        databases=[db],
    )


def _ch_print(server: ClickHouseServer, db: str) -> str:
    return _ch(server, f"SELECT count(), sum(cityHash64(id, s)) FROM {db}.big")


def _ch_tables(server: ClickHouseServer, db: str) -> set[str]:
    out = _ch(server, f"SELECT name FROM system.tables WHERE database = '{db}'")
    return {line for line in out.splitlines() if line}


def test_kill_clickhouse_backup(
    clickhouse_server: ClickHouseServer, ch_db: str, local_repo: Repo, age_key: EncryptionConfig
) -> None:
    repo, config = local_repo
    # full backups: an incremental of an unchanged table exports nothing to kill
    conn = _ch_conn(clickhouse_server, ch_db).model_copy(update={"incremental": False})
    first = backup_clickhouse(conn, repo, config, age_key).backup_id
    _backup_killed_then_rerun(repo, config, age_key, "ch-backup", conn, first)
    assert _ch_tables(clickhouse_server, ch_db) == {"big"}


def test_kill_clickhouse_restore(
    clickhouse_server: ClickHouseServer, ch_db: str, local_repo: Repo, age_key: EncryptionConfig
) -> None:
    """Killed while the scratch table loads: the target table is unchanged and exactly one
    ``__sr_restore_<run>_001`` table is left (docs/clickhouse.md); a re-run succeeds."""
    repo, config = local_repo
    conn = _ch_conn(clickhouse_server, ch_db)
    manifest = backup_clickhouse(conn, repo, config, age_key)
    backed_up = _ch_print(clickhouse_server, ch_db)
    # the target moves on after the backup: the restore must replace it, or leave it be
    _ch(clickhouse_server, f"INSERT INTO {ch_db}.big VALUES (999999999, 'after the backup')")
    changed = _ch_print(clickhouse_server, ch_db)
    req = ChRestoreRequest(backup_id=manifest.backup_id, drop_existing=True)

    def loading() -> bool:
        return any(t.startswith("__sr_restore_") for t in _ch_tables(clickhouse_server, ch_db))

    kill_when(
        _start("ch-restore", conn, config, age_key, request=req, read_bps=PACE_BPS),
        loading,
        settle=0.3,
    )
    left = _ch_tables(clickhouse_server, ch_db) - {"big"}
    assert _ch_print(clickhouse_server, ch_db) == changed, "the target table changed"
    assert len(left) == 1 and next(iter(left)).startswith("__sr_restore_"), left
    assert next(iter(left)).endswith("_001")
    assert not any(t.startswith("__sr_old_") for t in left)
    scratch = next(iter(left))
    loaded = int(_ch(clickhouse_server, f"SELECT count() FROM {ch_db}.{scratch}"))
    assert loaded < CH_ROWS, "killed before the scratch table was complete"

    report = restore_clickhouse(conn, repo, age_key, req)
    assert report["fingerprints_ok"] and report["leftovers"] == [], report
    assert _ch_print(clickhouse_server, ch_db) == backed_up
    # the re-run reports the killed run's scratch table (never drops it: another restore
    # may be using it); it stays until an operator drops it
    assert report["stale_scratch"] == [f"{ch_db}.{scratch}"]
    assert scratch in report["warnings"][0]
    assert _ch_tables(clickhouse_server, ch_db) - {"big"} == left


# -------------------------------------------------------------------------- Redis

REDIS_KEYS = 100_000


@pytest.fixture(scope="module")
def own_redis() -> Iterator[RedisServer]:
    """A Redis server of this module (the session one is shared with other tests)."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


def _redis(server: RedisServer) -> redispy.Redis:
    return redispy.Redis(host=server.host, port=server.port, password=server.password)


def _redis_conn(server: RedisServer) -> RedisConnection:
    return RedisConnection(
        name="killredis", host=server.host, port=server.port, password=SecretStr(server.password)
    )


def _fill(server: RedisServer) -> None:
    client = _redis(server)
    client.flushall()
    pipe = client.pipeline(transaction=False)
    for i in range(REDIS_KEYS):
        pipe.set(f"k:{i}", os.urandom(32).hex())
    pipe.execute()


def _redis_print(server: RedisServer) -> dict[bytes, bytes | None]:
    """Every key of the data set and its value (None: missing)."""
    client = _redis(server)
    keys = [f"k:{i}".encode() for i in range(REDIS_KEYS)]
    values: list[bytes | None] = []
    for start in range(0, REDIS_KEYS, 10_000):
        values.extend(cast(list[bytes | None], client.mget(keys[start : start + 10_000])))
    return dict(zip(keys, values, strict=True))


def test_kill_redis_backup(
    own_redis: RedisServer, local_repo: Repo, age_key: EncryptionConfig
) -> None:
    repo, config = local_repo
    _fill(own_redis)
    conn = _redis_conn(own_redis)
    first = backup_redis(conn, repo, config, age_key).backup_id
    _backup_killed_then_rerun(repo, config, age_key, "redis-backup", conn, first)
    assert _redis(own_redis).dbsize() == REDIS_KEYS


def _scratch_servers(folder: Path) -> list[int]:
    """PIDs of processes working in a folder under ``folder`` (redis-server rewrites its
    command line, but its working directory is its data folder)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if cwd.startswith(f"{folder}/"):
            found.append(int(proc.name))
    return found


def test_kill_redis_live_restore(
    own_redis: RedisServer, local_repo: Repo, age_key: EncryptionConfig, tmp_path: Path
) -> None:
    """Killed while keys are copied into the target: the target holds part of the backup
    (a live restore is not atomic, docs/redis.md); the scratch redis-server stops with
    the restore (parent-death signal) but its folder, with the decrypted RDB, stays; a
    re-run with ``flush_existing`` restores everything."""
    repo, config = local_repo
    _fill(own_redis)
    conn = _redis_conn(own_redis)
    manifest = backup_redis(conn, repo, config, age_key)
    expected = _redis_print(own_redis)
    client = _redis(own_redis)
    client.flushall()
    scratch_parent = tmp_path / "scratch"
    scratch_parent.mkdir()
    req = RedisRestoreRequest(
        backup_id=manifest.backup_id, batch_size=50, scratch_dir=str(scratch_parent)
    )

    def copying() -> bool:  # keys arrive while the scratch server still runs
        return 0 < int(client.dbsize()) < REDIS_KEYS and bool(_scratch_servers(scratch_parent))

    kill_when(_start("redis-restore", conn, config, age_key, request=req), copying)
    partial = int(client.dbsize())
    assert 0 < partial < REDIS_KEYS
    # every key that arrived holds the backed-up value
    arrived = {k: v for k, v in _redis_print(own_redis).items() if v is not None}
    assert len(arrived) == partial and all(expected[k] == v for k, v in arrived.items())
    # the scratch server got its parent-death signal; its folder is left behind
    deadline = time.monotonic() + 10
    while _scratch_servers(scratch_parent) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _scratch_servers(scratch_parent) == []
    left = list(scratch_parent.iterdir())
    assert len(left) == 1 and left[0].name.startswith("strongroom-scratch-redis-"), left
    assert (left[0].stat().st_mode & 0o777) == 0o700
    assert (left[0] / "data" / "dump.rdb").is_file(), "the decrypted RDB is left behind"
    assert ((left[0] / "redis.conf").stat().st_mode & 0o777) == 0o600

    # a re-run without flush_existing refuses (the target holds keys); with it, succeeds
    with pytest.raises(TargetNotEmpty, match="flush_existing"):
        restore_redis(conn, repo, age_key, req)
    rerun = req.model_copy(update={"flush_existing": True})
    report = restore_redis(conn, repo, age_key, rerun)
    assert report["keys_ok"] and report["matches_manifest"], report["key_checks"]
    assert int(client.dbsize()) == REDIS_KEYS and _redis_print(own_redis) == expected
    # the next restore removes the killed run's folder (its owner process is gone) and
    # says so; its own folder goes too
    assert report["stale_scratch_removed"] == [str(left[0])]
    assert list(scratch_parent.iterdir()) == []
