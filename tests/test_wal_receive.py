"""``strongroom wal-receive``: pg_receivewal on a slot, completed segments into the repository.

Real clusters (the archive_command cluster of test_pitr), a real local repository,
the real ``pg_receivewal``. The receiver archives under its own target name where a
test must see only what the receiver stored.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from pyrage import x25519

from strongroom.engines.postgres.wal import names
from strongroom.engines.postgres.wal.config import load_wal_config, write_wal_config
from strongroom.engines.postgres.wal.receive import APPLICATION_NAME, Receiver
from strongroom.engines.postgres.wal.store import (
    fetch_bytes,
    push_bytes,
    read_stored_header,
    wal_key,
)
from strongroom.sandbox._process import make_temp_dir, remove_dir
from strongroom.sandbox.postgres import PostgresServer, chown_to_postgres
from tests.test_pitr import Cluster, _cluster, fake_segment

PG_BIN = Path("/usr/lib/postgresql/15/bin")


@pytest.fixture(scope="module")
def age_identity() -> x25519.Identity:
    return x25519.Identity.generate()


@pytest.fixture(scope="module")
def cluster(age_identity: x25519.Identity) -> Iterator[Cluster]:
    root = make_temp_dir("walrecv")
    c = _cluster(root, "pg1", age_identity)
    try:
        c.sql("CREATE TABLE t (x int)")
        c.switch_and_wait()  # wal/pg1/ made by archive_command (postgres), not by this root test
        yield c
    finally:
        c.server.stop()
    remove_dir(root)


def _config(c: Cluster, target: str) -> Path:
    return write_wal_config(
        c.base / f"{target}.toml",
        target=target,
        repository=c.repo_config,
        recipients=c.enc.recipients,
    )


def _env(server: PostgresServer) -> dict[str, str]:
    env = server.libpq_env()
    env.pop("PGDATABASE", None)
    return env


def _wait(what: str, check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Running:
    """A Receiver.run in a thread (the same code path as the CLI, minus signals)."""

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver
        self.stop = threading.Event()
        self.code: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.code = self.receiver.run(poll_s=0.05, until=self.stop.is_set)

    def finish(self) -> int | None:
        self.stop.set()
        self.thread.join(60)
        return self.code


def _stored(c: Cluster, target: str, name: str) -> bool:
    return c.repo.exists(wal_key(target, name))


def test_receiver_pushes_segments_identical_to_archive_command(cluster: Cluster) -> None:
    c = cluster
    cfg = load_wal_config(str(_config(c, "pg1-recv")))
    spool = c.base / "spool-identical"
    run = Running(Receiver(cfg, spool, slot="recv_identical", env=_env(c.server)))
    try:
        _wait(
            "the slot",
            lambda: "recv_identical" in c.sql("SELECT slot_name FROM pg_replication_slots"),
        )
        _wait("streaming", lambda: c.sql("SELECT count(*) FROM pg_stat_replication") != "0")
        done = []
        for i in range(3):
            c.sql(f"INSERT INTO t SELECT g FROM generate_series(1, {1000 * (i + 1)}) g")
            done.append(c.switch_and_wait())  # archive_command stored it under pg1
        for name in done:
            _wait(f"{name} from the receiver", lambda n=name: _stored(c, "pg1-recv", n))
    finally:
        assert run.finish() == 0
    for name in done:
        ours = read_stored_header(c.repo, wal_key("pg1-recv", name))
        theirs = read_stored_header(c.repo, wal_key("pg1", name))
        assert (ours.raw_size, ours.frame_sha256) == (theirs.raw_size, theirs.frame_sha256)
    ids = [i.get_secret_value() for i in c.enc.identities]
    assert fetch_bytes(c.repo, "pg1-recv", done[-1], ids) == fetch_bytes(
        c.repo, "pg1", done[-1], ids
    )
    assert run.receiver.stats.errors == []
    assert "recv_identical" in c.sql("SELECT slot_name FROM pg_replication_slots")
    c.sql("SELECT pg_drop_replication_slot('recv_identical')")


def test_segment_from_both_sources_identical_accepted_different_refused(
    cluster: Cluster,
) -> None:
    c = cluster
    # same target as archive_command: every segment arrives from both sources
    cfg = load_wal_config(str(c.config))
    spool = c.base / "spool-both"
    run = Running(Receiver(cfg, spool, slot="recv_both", env=_env(c.server)))
    try:
        _wait("streaming", lambda: c.sql("SELECT count(*) FROM pg_stat_replication") != "0")
        c.sql("INSERT INTO t VALUES (1)")
        name = c.switch_and_wait()
        _wait(f"{name} marked pushed", lambda: (spool / ".pushed" / name).exists())
    finally:
        assert run.finish() == 0
    stats = run.receiver.stats
    assert stats.errors == [] and stats.pushed + stats.already_archived >= 1
    c.sql("SELECT pg_drop_replication_slot('recv_both')")

    # a different file already archived under the name the receiver completes next
    cfg = load_wal_config(str(_config(c, "pg1-conflict")))
    nxt = c.sql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())")
    sysid = int(c.sql("SELECT system_identifier FROM pg_control_system()"))
    push_bytes(c.repo, "pg1-conflict", nxt, fake_segment(nxt, sysid=sysid), c.enc.recipients)
    before = read_stored_header(c.repo, wal_key("pg1-conflict", nxt))
    receiver = Receiver(cfg, c.base / "spool-conflict", slot="recv_conflict", env=_env(c.server))
    deadline = time.monotonic() + 60
    code: list[int] = []
    thread = threading.Thread(
        target=lambda: code.append(
            receiver.run(
                poll_s=0.05,
                until=lambda: bool(receiver.stats.errors) or time.monotonic() > deadline,
            )
        )
    )
    thread.start()
    _wait("streaming", lambda: c.sql("SELECT count(*) FROM pg_stat_replication") != "0")
    c.sql("INSERT INTO t VALUES (2)")
    c.sql("SELECT pg_switch_wal()")
    thread.join(90)
    assert code == [9]
    assert any("DIFFERENT" in e for e in receiver.stats.errors), receiver.stats.errors
    after = read_stored_header(c.repo, wal_key("pg1-conflict", nxt))
    assert after == before  # never replaced
    c.sql("SELECT pg_drop_replication_slot('recv_conflict')")


def _cli(
    config: Path, spool: Path, target: str, slot: str, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "strongroom.cli.app",
            "wal-receive",
            target,
            "--config",
            str(config),
            "--directory",
            str(spool),
            "--slot",
            slot,
            "--poll",
            "0.05",
        ],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=open(spool.parent / f"{slot}.err", "ab"),
    )


def test_receiver_killed_and_restarted_loses_nothing(cluster: Cluster) -> None:
    c = cluster
    config = _config(c, "pg1-kill")
    spool = c.base / "spool-kill"
    spool.mkdir()
    env = _env(c.server)
    proc = _cli(config, spool, "pg1-kill", "recv_kill", env)
    expected: list[str] = []
    try:
        _wait("streaming", lambda: c.sql("SELECT count(*) FROM pg_stat_replication") != "0")
        c.sql("INSERT INTO t VALUES (10)")
        expected.append(c.switch_and_wait())
        _wait("first push", lambda: _stored(c, "pg1-kill", expected[0]))
        c.sql("INSERT INTO t VALUES (11)")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        _wait(
            "pg_receivewal gone", lambda: c.sql("SELECT count(*) FROM pg_stat_replication") == "0"
        )
        for i in range(2):  # written while no receiver runs: the slot keeps it
            c.sql(f"INSERT INTO t VALUES ({12 + i})")
            expected.append(c.switch_and_wait())
        proc = _cli(config, spool, "pg1-kill", "recv_kill", env)
        for name in expected:
            _wait(f"{name} after the restart", lambda n=name: _stored(c, "pg1-kill", n))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0
    # every segment between the first and the last is there: no gap
    first = names.segno_of(expected[0])
    last = names.segno_of(expected[-1])
    for segno in range(first, last + 1):
        assert _stored(c, "pg1-kill", names.segment_name(1, segno))
    c.sql("SELECT pg_drop_replication_slot('recv_kill')")


def _commit_xids(wal_dir: Path) -> set[int]:
    """Transaction ids of the COMMIT records in the WAL files of ``wal_dir``
    (a ``.partial`` is read as the segment it will become)."""
    work = wal_dir.parent / f"{wal_dir.name}-dump"
    work.mkdir()
    for entry in os.listdir(wal_dir):
        if names.is_segment(entry.removesuffix(".partial")) and entry[:24] == entry.removesuffix(
            ".partial"
        ):
            shutil.copy(wal_dir / entry, work / entry[:24])
    files = sorted(os.listdir(work))
    out = subprocess.run(
        [str(PG_BIN / "pg_waldump"), "-p", str(work), files[0], files[-1], "--rmgr=Transaction"],
        capture_output=True,
        text=True,
    ).stdout
    xids = set()
    for line in out.splitlines():
        if "COMMIT" in line and "tx:" in line:
            xids.add(int(line.split("tx:")[1].split(",")[0]))
    return xids


def test_synchronous_receiver_has_every_acknowledged_commit_after_kill_9() -> None:
    root = make_temp_dir("walrecv-sync")
    chown_to_postgres(root, 0o755)
    server = PostgresServer(
        root / "src",
        settings={
            "synchronous_standby_names": APPLICATION_NAME,
            "synchronous_commit": "on",
        },
    )
    server.start()
    spool = root / "spool"
    try:
        repo_dir = root / "repo"
        from tests.fixtures.strongroom_fixtures import make_local_repo, signed_config

        repo_config = signed_config(kind="local", path=str(repo_dir))
        make_local_repo(repo_dir)
        key = x25519.Identity.generate()
        config = write_wal_config(
            root / "wal.toml",
            target="sync",
            repository=repo_config,
            recipients=[str(key.to_public())],
        )
        receiver = Receiver(
            load_wal_config(str(config)),
            spool,
            slot="recv_sync",
            synchronous=True,
            env=_env(server),
        )
        run = Running(receiver)
        _wait(
            "a synchronous standby",
            lambda: server.psql("SELECT sync_state FROM pg_stat_replication") == "sync",
        )
        server.psql("CREATE TABLE load (x int)")
        acknowledged: list[int] = []
        killed = threading.Event()

        def writer() -> None:
            with psycopg.connect(server.dsn(), autocommit=True) as conn:
                try:
                    while True:
                        row = conn.execute(
                            "INSERT INTO load VALUES (1) RETURNING txid_current()"
                        ).fetchone()
                        assert row is not None
                        acknowledged.append(int(row[0]))  # the commit returned
                except psycopg.Error:
                    assert killed.is_set()

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        _wait("some commits", lambda: len(acknowledged) >= 200)
        assert server.proc is not None
        killed.set()
        os.kill(server.proc.pid, signal.SIGKILL)
        thread.join(30)
        time.sleep(0.5)  # pg_receivewal notices the lost connection
        run.finish()
        server.proc.wait(10)
        server.proc = None
        assert acknowledged
        have = _commit_xids(spool)
        missing = [x for x in acknowledged if x not in have]
        assert missing == [], f"{len(missing)} acknowledged commits not received"
    finally:
        server.stop()
        remove_dir(root)
