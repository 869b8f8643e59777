"""Partial WAL segments: the receiver's ``.partial`` in the repository and PITR from it.

Real clusters, the real ``pg_receivewal``, a real local repository. The receiver runs
(as the postgres OS user) beside archive_command into the same target; the primary
is killed with SIGKILL under a synchronous write load, so the newest commits exist
only in the receiver's partial segment, and a PITR to 'latest' must recover every
acknowledged commit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from pydantic import SecretStr
from pyrage import x25519

from strongroom.config import EncryptionConfig, PostgresConnection
from strongroom.engines.postgres.pitr.basebackup import base_backup_postgres
from strongroom.engines.postgres.pitr.restore import default_wal_command
from strongroom.engines.postgres.wal import names
from strongroom.engines.postgres.wal.check import load_index, walk
from strongroom.engines.postgres.wal.config import load_wal_config, write_wal_config
from strongroom.engines.postgres.wal.fast import archive_command
from strongroom.engines.postgres.wal.receive import APPLICATION_NAME
from strongroom.engines.postgres.wal.store import (
    fetch_to_file,
    push_bytes,
    push_partial,
    read_stored_header,
    wal_key,
)
from strongroom.errors import Conflict, IntegrityError, NotFound
from strongroom.repository.local import LocalRepository
from strongroom.sandbox._process import make_temp_dir, remove_dir
from strongroom.sandbox.postgres import PostgresServer, chown_to_postgres
from tests.fixtures.strongroom_fixtures import make_local_repo, signed_config
from tests.test_pitr import SEG, Cluster, _restore, fake_segment
from tests.test_wal_receive import _env, _wait

# ----------------------------------------------------- replacement rules (real repo)


@pytest.fixture
def repo(tmp_path: Path) -> LocalRepository:
    return make_local_repo(tmp_path / "repo")


def _partial(name: str, used: int) -> bytes:
    """The first ``used`` bytes of a segment with a valid header, zero-padded."""
    full = fake_segment(name)
    body = bytearray(full[:used])
    for i in range(100, used, 997):  # WAL-like content that is not zero
        body[i] = 0x5A
    return bytes(body) + bytes(SEG - used)


def test_partial_extends_refuses_other_history_and_yields_to_segment(
    repo: LocalRepository, tmp_path: Path
) -> None:
    key = x25519.Identity.generate()
    rcpt, ident = [str(key.to_public())], [str(key)]
    seg = names.segment_name(1, 7)
    short = _partial(seg, 20_000)
    longer = short[:20_000] + bytes([0x33]) * 30_000 + bytes(SEG - 50_000)
    assert push_partial(repo, "t", seg, short, rcpt).outcome == "stored"
    assert push_partial(repo, "t", seg, short, rcpt).outcome == "unchanged"
    assert push_partial(repo, "t", seg, longer, rcpt).outcome == "replaced"
    assert read_stored_header(repo, wal_key("t", f"{seg}.partial")).raw_size == 50_000
    assert push_partial(repo, "t", seg, short, rcpt).outcome == "kept_longer"
    other = bytearray(longer)
    other[150] ^= 0xFF  # the same name, a different history
    other[60_000] = 1
    with pytest.raises(Conflict):
        push_partial(repo, "t", seg, bytes(other), rcpt)
    assert read_stored_header(repo, wal_key("t", f"{seg}.partial")).raw_size == 50_000

    # restore_command asks for the segment: the partial is served, zero-padded
    dest = tmp_path / "out"
    assert fetch_to_file(repo, "t", seg, ident, str(dest)) == SEG
    assert dest.read_bytes() == longer
    with pytest.raises(NotFound):
        fetch_to_file(repo, "t", names.segment_name(1, 8), ident, str(tmp_path / "none"))

    # a completed segment wins: it is served, and no partial is stored once it exists
    full = bytes(longer[:60_000]) + bytes([7]) * (SEG - 60_000)
    push_bytes(repo, "t", seg, full, rcpt)
    assert push_partial(repo, "t", seg, full[:70_000], rcpt).outcome == "superseded"
    assert read_stored_header(repo, wal_key("t", f"{seg}.partial")).raw_size == 50_000
    assert fetch_to_file(repo, "t", seg, ident, str(dest)) == SEG
    assert dest.read_bytes() == full


def test_wal_push_of_a_promoted_partial_shares_the_receivers_key(repo: LocalRepository) -> None:
    """archive_command archives PostgreSQL's own ``.partial`` at promotion (16 MiB, the
    WAL up to the switch): it extends the receiver's partial of the same segment."""
    rcpt = [str(x25519.Identity.generate().to_public())]
    seg = names.segment_name(1, 11)
    receiver_copy = _partial(seg, 30_000)
    promoted = receiver_copy[:30_000] + bytes([9]) * 5_000 + bytes(SEG - 35_000)
    push_partial(repo, "t", seg, receiver_copy, rcpt)
    result = push_bytes(repo, "t", f"{seg}.partial", promoted, rcpt)
    assert not result.already_archived and result.raw_size == 35_000
    assert push_bytes(repo, "t", f"{seg}.partial", promoted, rcpt).already_archived
    other = bytearray(promoted)
    other[200] ^= 0xFF
    other[40_000] = 3
    with pytest.raises(Conflict):
        push_bytes(repo, "t", f"{seg}.partial", bytes(other), rcpt)


def test_tampered_or_forged_partial_is_refused(repo: LocalRepository, tmp_path: Path) -> None:
    key = x25519.Identity.generate()
    rcpt, ident = [str(key.to_public())], [str(key)]
    seg = names.segment_name(1, 9)
    push_partial(repo, "t", seg, _partial(seg, 40_000), rcpt)
    path = repo.root / wal_key("t", f"{seg}.partial")
    good = path.read_bytes()
    dest = tmp_path / "out"
    # a flipped ciphertext byte: age authentication fails
    flipped = bytearray(good)
    flipped[-100] ^= 0x01
    path.chmod(0o600)
    path.write_bytes(bytes(flipped))
    with pytest.raises(IntegrityError):
        fetch_to_file(repo, "t", seg, ident, str(dest))
    # content swapped under the kept clear header (re-encrypted to the public key):
    # the frame SHA-256 of the header no longer matches
    from strongroom.engines.postgres.wal.store import encode, parse_header

    forged, _ = encode(f"{seg}.partial", _partial(seg, 40_000)[:40_000], rcpt)
    head = parse_header(good)
    path.write_bytes(good[: head.header_size] + forged[parse_header(forged).header_size :])
    with pytest.raises(IntegrityError):
        fetch_to_file(repo, "t", seg, ident, str(dest))
    assert not dest.exists()  # nothing half-written is handed over
    # and a partial under another segment's name is refused by its page header
    wrong = names.segment_name(1, 10)
    blob, _ = encode(f"{wrong}.partial", _partial(seg, 40_000)[:40_000], rcpt)
    with pytest.raises(Exception, match="first page"):
        push_partial(repo, "t", wrong, _partial(seg, 40_000), rcpt)
    repo.put_bytes(wal_key("t", f"{wrong}.partial"), blob)
    with pytest.raises(IntegrityError):
        fetch_to_file(repo, "t", wrong, ident, str(dest))


# ------------------------------------------------------ kill -9, then PITR (real)


@pytest.fixture(scope="module")
def sync_cluster() -> Iterator[Cluster]:
    """A cluster archiving with archive_command, whose commits wait for the receiver."""
    root = make_temp_dir("walpartial")
    chown_to_postgres(root, 0o755)
    repo_dir = root / "repo"
    chown_to_postgres(repo_dir)
    key = x25519.Identity.generate()
    repo_config = signed_config(kind="local", path=str(repo_dir))
    enc = EncryptionConfig(recipients=[str(key.to_public())], identities=[SecretStr(str(key))])
    config = write_wal_config(
        root / "wal.toml",
        target="pgp",
        repository=repo_config,
        recipients=enc.recipients,
        owner="postgres",
        push={"parallel": 2, "linger_seconds": 1.0},
    )
    command = default_wal_command("postgres")
    server = PostgresServer(
        root / "src",
        archive_command=archive_command(command, str(config), load_wal_config(str(config)).repo_id),
        settings={
            "archive_timeout": 0,
            "synchronous_standby_names": APPLICATION_NAME,
            "synchronous_commit": "on",
        },
    )
    server.start()
    conn = PostgresConnection(
        name="pgp", host=server.host, port=server.port, password=SecretStr(server.password)
    )
    c = Cluster(server, conn, make_local_repo(repo_dir), repo_config, enc, root, "pgp", config)
    try:
        yield c
    finally:
        server.stop()
        remove_dir(root)


def _receiver_as_postgres(
    config: Path, spool: Path, env: dict[str, str], *extra: str
) -> subprocess.Popen[bytes]:
    """``strongroom wal-receive`` as the postgres OS user (the archive_command's user:
    both write the same target)."""
    chown_to_postgres(spool, 0o700)
    args = ["wal-receive", "pgp", "--config", str(config), "--directory", str(spool)]
    args += ["--slot", "recv_partial", "--synchronous", "--poll", "0.05"]
    args += ["--partial-interval", "0.5", *extra]
    import shlex

    # the interpreter and PYTHONPATH archive_command uses, running the app instead
    python = default_wal_command("postgres").split(" -c ", 1)[0]
    line = f"cd / && exec env {python} -m strongroom.cli.app {shlex.join(args)}"
    return subprocess.Popen(
        ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "sh", "-c", line],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=open(spool.parent / "receiver.err", "ab"),
        cwd="/",
    )


def _partials(c: Cluster) -> list[str]:
    return sorted(
        info.key.rsplit("/", 1)[-1]
        for info in c.repo.list("wal/pgp/")
        if info.key.endswith(".partial")
    )


def test_pitr_after_kill_9_recovers_every_acknowledged_commit(sync_cluster: Cluster) -> None:
    c = sync_cluster
    recv_config = write_wal_config(
        c.base / "recv.toml",
        target="pgp",
        repository=c.repo_config,
        recipients=c.enc.recipients,
        owner="postgres",
    )
    spool = c.base / "spool"
    proc = _receiver_as_postgres(recv_config, spool, _env(c.server))
    try:
        try:
            _wait(
                "a synchronous standby",
                lambda: c.sql("SELECT sync_state FROM pg_stat_replication") == "sync",
            )
        except AssertionError:
            raise AssertionError((spool.parent / "receiver.err").read_text()[-2000:]) from None
        c.sql("CREATE TABLE load (id bigserial PRIMARY KEY, pad text)")
        c.switch_and_wait()
        c.base_manifest = base_backup_postgres(c.conn, c.repo, c.repo_config, c.enc)
        _wait("a partial pushed", lambda: bool(_partials(c)))
        acknowledged: list[int] = []
        killed = threading.Event()

        def writer() -> None:
            with psycopg.connect(c.server.dsn(), autocommit=True) as conn:
                try:
                    while True:
                        row = conn.execute(
                            "INSERT INTO load (pad) VALUES (repeat('x', 200)) RETURNING id"
                        ).fetchone()
                        assert row is not None
                        acknowledged.append(int(row[0]))  # the commit returned
                except psycopg.Error:
                    assert killed.is_set()

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        _wait("some commits", lambda: len(acknowledged) >= 300)
        assert c.server.proc is not None
        killed.set()
        os.kill(c.server.proc.pid, signal.SIGKILL)
        thread.join(30)
    finally:
        proc.send_signal(signal.SIGTERM)  # stopping pushes the newest partial
        proc.wait(60)
    assert proc.returncode == 0, (spool.parent / "receiver.err").read_text()[-2000:]
    assert c.server.proc is not None
    c.server.proc.wait(10)
    c.server.proc = None
    # the one-shot push finds the repository already holding the spool's partial
    once = _receiver_as_postgres(recv_config, spool, _env(c.server), "--push-partial")
    out, _ = once.communicate(timeout=60)
    assert once.returncode == 0 and b"partial: unchanged" in out, out
    # the newest commits are only in the partial: its segment was never completed
    tail = _partials(c)[-1]
    assert not c.repo.exists(wal_key("pgp", tail[:24]))
    index = load_index(c.repo, "pgp")
    reach = walk(index, c.base_manifest.details, 1)
    assert reach.partial_size is not None and not reach.gaps  # the partial is no gap

    tmp = c.base / "restore"
    report = _restore(
        c, tmp, verify_query="SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM load"
    )
    assert report["recovery"]["state"] == "promoted"
    restored = {int(x) for x in report["recovery"]["verify"]["output"].split(",") if x}
    missing = sorted(set(acknowledged) - restored)
    assert missing == [], f"{len(missing)} of {len(acknowledged)} acknowledged commits lost"
