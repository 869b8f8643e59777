"""PostgreSQL PITR: base backups, wal-push / wal-fetch, continuity, point-in-time restores.

The WAL hot path is exercised on synthetic segments (fast, exact) and through
real clusters whose archive_command is ``strongroom-wal push``; restores start
the recovered cluster (restore_command ``strongroom-wal fetch``) and check
exactly which rows survived.
"""

from __future__ import annotations

import datetime as dt
import os
import pwd
import shutil
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from pyrage import x25519

from strongroom.cli.wal import main as wal_main
from strongroom.config import EncryptionConfig, PostgresConnection, RepositoryConfig
from strongroom.engines.postgres.pitr.basebackup import base_backup_postgres, base_backups
from strongroom.engines.postgres.pitr.plan import PitrRequest, plan_pitr
from strongroom.engines.postgres.pitr.points import create_restore_point
from strongroom.engines.postgres.pitr.restore import (
    default_wal_command,
    extract_base,
    pitr_restore,
    write_recovery,
)
from strongroom.engines.postgres.pitr.server import RestoredServer
from strongroom.engines.postgres.wal import names
from strongroom.engines.postgres.wal.check import wal_check
from strongroom.engines.postgres.wal.config import (
    load_wal_config,
    write_identity_file,
    write_wal_config,
)
from strongroom.engines.postgres.wal.fast import archive_command
from strongroom.engines.postgres.wal.store import wal_key
from strongroom.errors import Conflict, InvalidInput, StrongroomError, TargetNotEmpty
from strongroom.repository.local import LocalRepository
from strongroom.sandbox._process import make_temp_dir, remove_dir
from strongroom.sandbox.postgres import PostgresServer, chown_to_postgres
from strongroom.verify import verify_backup
from tests.fixtures.ports import free_port
from tests.fixtures.strongroom_fixtures import make_local_repo, signed_config, signing_block_fields

SEG = names.DEFAULT_SEGMENT_SIZE
SYSID = 7_311_000_000_000_000_001


# ------------------------------------------------------------ synthetic segments


def fake_segment(name: str, *, sysid: int = SYSID, salt: bytes = b"") -> bytes:
    """A 16 MiB file with a valid long page header for ``name`` (mostly zeros)."""
    tli = names.timeline_of(name)
    addr = names.segno_of(name) * SEG
    header = struct.pack("<HHIQI4xQII", 0xD110, 0x0002, tli, addr, 0, sysid, SEG, 8192)
    body = header + name.encode() + salt + os.urandom(64)
    return body + bytes(SEG - len(body))


@dataclass
class WalSetup:
    root: Path
    pg_wal: Path
    repo: LocalRepository
    config: Path  # prefetching fetch, async push
    sync_config: Path  # fetch without prefetch
    identity: x25519.Identity

    def put_ready(self, name: str, data: bytes) -> Path:
        path = self.pg_wal / name
        path.write_bytes(data)
        (self.pg_wal / "archive_status" / f"{name}.ready").touch()
        return path


@pytest.fixture
def wal_setup(tmp_path: Path) -> WalSetup:
    identity = x25519.Identity.generate()
    pg_wal = tmp_path / "data" / "pg_wal"
    (pg_wal / "archive_status").mkdir(parents=True)
    repo_dir = tmp_path / "repo"
    key = write_identity_file(tmp_path / "wal.key", [str(identity)])
    config = write_wal_config(
        tmp_path / "wal.toml",
        target="syn",
        repository=signed_config(kind="local", path=str(repo_dir)),
        recipients=[str(identity.to_public())],
        identity_file=str(key),
        system_identifier=SYSID,
        push={"parallel": 3, "linger_seconds": 0.5},
        fetch={"prefetch": 4, "linger_seconds": 3},
    )
    sync_config = tmp_path / "sync.toml"
    sync_config.write_text(config.read_text().replace("prefetch = 4", "prefetch = 0"))
    sync_config.chmod(0o600)
    return WalSetup(tmp_path, pg_wal, make_local_repo(repo_dir), config, sync_config, identity)


def _seg(n: int, tli: int = 1) -> str:
    return names.segment_name(tli, n)


def test_push_is_durable_parallel_and_never_overwrites(
    wal_setup: WalSetup, capsys: pytest.CaptureFixture[str]
) -> None:
    w = wal_setup
    files = {_seg(n): w.put_ready(_seg(n), fake_segment(_seg(n))) for n in range(1, 7)}
    first = _seg(1)
    # async: the pusher uploads every .ready file ahead of PostgreSQL's calls
    assert wal_main(["push", "--config", str(w.config), str(files[first])]) == 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(w.repo.exists(wal_key("syn", n)) for n in files):
        time.sleep(0.05)
    assert all(w.repo.exists(wal_key("syn", n)) for n in files)
    # later calls are answered from the markers, without touching storage
    started = time.monotonic()
    for name in sorted(files)[1:]:
        assert wal_main(["push", "--config", str(w.config), str(files[name])]) == 0
    assert time.monotonic() - started < 5
    stored = w.repo.get_bytes(wal_key("syn", first))
    assert stored.startswith(b"SRWAL1 " + first.encode())
    # the marker is a hard link to the stored file: the shell answers PostgreSQL alone
    import subprocess

    repo_id = load_wal_config(str(w.config)).repo_id

    def shell(name: str, repo: str) -> int:
        line = archive_command("false", None, repo).replace("%f", name)
        line = line.replace("%p", f"pg_wal/{name}")
        return subprocess.run(["sh", "-c", line], cwd=w.pg_wal.parent).returncode

    assert shell(sorted(files)[-1], repo_id) == 0
    assert shell("00000001000000000000000F", repo_id) == 1  # not pushed: runs the tool
    assert shell(sorted(files)[-1], "0123456789abcdef0") == 1  # another repository
    assert fake_segment(first)[:64] not in stored  # encrypted

    # duplicate push of identical content (marker gone: e.g. after a crash) succeeds
    shutil.rmtree(w.pg_wal / "strongroom")
    assert wal_main(["push", "--sync", "--config", str(w.config), str(files[first])]) == 0
    assert w.repo.get_bytes(wal_key("syn", first)) == stored  # untouched
    # different content under an archived name fails loudly, archive untouched
    files[first].unlink()  # e.g. another cluster's file under the same name (new inode)
    files[first].write_bytes(fake_segment(first, salt=b"other cluster"))
    capsys.readouterr()
    assert wal_main(["push", "--sync", "--config", str(w.config), str(files[first])]) == 9
    err = capsys.readouterr().err
    assert "DIFFERENT content" in err and "Refusing to overwrite" in err
    assert w.repo.get_bytes(wal_key("syn", first)) == stored
    # a segment from another database system is refused
    foreign = _seg(9)
    path = w.put_ready(foreign, fake_segment(foreign, sysid=42))
    assert wal_main(["push", "--sync", "--config", str(w.config), str(path)]) == 2
    assert "belongs to database system 42" in capsys.readouterr().err
    assert not w.repo.exists(wal_key("syn", foreign))


def test_duplicate_comparison_across_levels_and_versions(tmp_path: Path) -> None:
    """The header fingerprints the zstd frame: a re-push at another level is compared by
    recompressing; one by another zstd version cannot be compared and fails loudly."""
    from strongroom.engines.postgres.wal.store import push_bytes, read_stored_header

    repo = make_local_repo(tmp_path / "repo")
    key = x25519.Identity.generate()
    name = _seg(5)
    raw = fake_segment(name)
    first = push_bytes(repo, "d", name, raw, [str(key.to_public())], level=1)
    again = push_bytes(repo, "d", name, raw, [str(key.to_public())], level=3)
    assert not first.already_archived and again.already_archived
    with pytest.raises(Conflict, match="DIFFERENT"):
        push_bytes(repo, "d", name, fake_segment(name, salt=b"x"), [str(key.to_public())])
    path = repo.root / wal_key("d", name)
    head = read_stored_header(repo, wal_key("d", name))
    blob = path.read_bytes().replace(head.codec.encode(), b"zstd-0.0.1-1", 1)
    path.write_bytes(blob)
    with pytest.raises(Conflict, match="cannot tell"):
        push_bytes(repo, "d", name, raw, [str(key.to_public())])


def test_fetch_prefetches_verifies_and_answers_not_found(
    wal_setup: WalSetup, capsys: pytest.CaptureFixture[str]
) -> None:
    w = wal_setup
    contents = {}
    for n in range(1, 8):
        name = _seg(n)
        contents[name] = fake_segment(name)
        path = w.put_ready(name, contents[name])
        assert wal_main(["push", "--sync", "--config", str(w.config), str(path)]) == 0
    history = "00000002.history"
    (w.pg_wal / history).write_text("1\t0/5000098\tno recovery target specified\n")
    assert wal_main(["push", "--sync", "--config", str(w.config), str(w.pg_wal / history)]) == 0
    # damage one archived segment before anything reads it
    key_path = w.repo.root / wal_key("syn", _seg(6))
    blob = bytearray(key_path.read_bytes())
    blob[len(blob) // 2] ^= 0x40
    key_path.write_bytes(bytes(blob))
    shutil.rmtree(w.pg_wal)  # a restore starts with an empty pg_wal
    w.pg_wal.mkdir()
    dest = w.pg_wal / "RECOVERYXLOG"

    assert wal_main(["fetch", "--config", str(w.config), _seg(1), str(dest)]) == 0
    assert dest.read_bytes() == contents[_seg(1)]
    cache = w.pg_wal / "strongroom" / "fetch" / "cache"
    deadline = time.monotonic() + 20  # the fetcher prefetches the next segments
    while time.monotonic() < deadline and not {_seg(2), _seg(3)} <= {
        p.name for p in cache.iterdir()
    }:
        time.sleep(0.02)
    assert {_seg(2), _seg(3)} <= {p.name for p in cache.iterdir()}
    for n in range(2, 6):
        assert wal_main(["fetch", "--config", str(w.config), _seg(n), str(dest)]) == 0
        assert dest.read_bytes() == contents[_seg(n)]
    assert wal_main(["fetch", "--config", str(w.config), history, str(dest)]) == 0
    assert names.parse_history(dest.read_text())[0].parent == 1

    # the corrupted segment is detected and never handed over: fatal (> 125)
    dest.unlink()
    capsys.readouterr()
    assert wal_main(["fetch", "--config", str(w.config), _seg(6), str(dest)]) == 200
    assert "failed authentication" in capsys.readouterr().err
    assert not dest.exists()
    assert wal_main(["fetch", "--config", str(w.sync_config), _seg(6), str(dest)]) == 200
    assert not dest.exists()

    # not archived: exit 1 (end of the archive), for segments and history files alike
    for config in (w.config, w.sync_config):
        assert wal_main(["fetch", "--config", str(config), _seg(8), str(dest)]) == 1
        assert wal_main(["fetch", "--config", str(config), "00000003.history", str(dest)]) == 1
    assert not dest.exists()

    # an object stored under another segment's name is caught by its header
    shutil.copy(w.repo.root / wal_key("syn", _seg(7)), w.repo.root / wal_key("syn", _seg(10)))
    capsys.readouterr()
    assert wal_main(["fetch", "--config", str(w.sync_config), _seg(10), str(dest)]) == 200
    assert "says it is" in capsys.readouterr().err and not dest.exists()
    # a missing segment with later ones archived is a gap, not the end: fatal
    assert wal_main(["fetch", "--config", str(w.sync_config), _seg(8), str(dest)]) == 200
    assert "missing from the archive but later segments" in capsys.readouterr().err


def test_fetch_without_prefetch_and_bad_config(
    wal_setup: WalSetup, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    w = wal_setup
    name = _seg(3)
    data = fake_segment(name)
    path = w.put_ready(name, data)
    assert wal_main(["push", "--sync", "--config", str(w.config), str(path)]) == 0
    dest = w.pg_wal / "RECOVERYXLOG"
    assert wal_main(["fetch", "--config", str(w.sync_config), name, str(dest)]) == 0
    assert dest.read_bytes() == data
    assert wal_main(["fetch", "--config", str(w.sync_config), _seg(4), str(dest)]) == 1
    # configuration problems: push 2, fetch fatal (recovery must not end quietly)
    assert wal_main(["push", "--config", str(tmp_path / "nope.toml"), str(path)]) == 2
    assert wal_main(["fetch", "--config", str(tmp_path / "nope.toml"), name, str(dest)]) == 200
    (tmp_path / "wal.key").chmod(0o644)
    capsys.readouterr()
    assert wal_main(["fetch", "--config", str(w.sync_config), name, str(dest)]) == 200
    assert "readable by group or others" in capsys.readouterr().err
    assert wal_main(["push", str(path), "--bogus"]) == 2
    assert load_wal_config(str(w.config)).push_parallel == 3


def test_push_and_fetch_through_s3(
    s3_repo: tuple[Any, RepositoryConfig], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same hot path against an S3 bucket (moto): conditional writes keep the
    archive append-only, the client is built without Prefect."""
    repo, repo_config = s3_repo
    identity = x25519.Identity.generate()
    key = write_identity_file(tmp_path / "k", [str(identity)])
    config = write_wal_config(
        tmp_path / "s3.toml",
        target="s3db",
        repository=repo_config,
        recipients=[str(identity.to_public())],
        identity_file=str(key),
        push={"parallel": 2, "linger_seconds": 0.5},
        fetch={"prefetch": 0},
    )
    assert config.stat().st_mode & 0o777 == 0o600  # it holds the secret key
    pg_wal = tmp_path / "pg_wal"
    (pg_wal / "archive_status").mkdir(parents=True)
    names_ = [_seg(n) for n in (1, 2, 3)]
    for name in names_:
        (pg_wal / name).write_bytes(fake_segment(name))
        (pg_wal / "archive_status" / f"{name}.ready").touch()
    assert wal_main(["push", "--config", str(config), str(pg_wal / names_[0])]) == 0
    for name in names_:
        assert wal_main(["push", "--config", str(config), str(pg_wal / name)]) == 0
        assert repo.exists(wal_key("s3db", name))
    shutil.rmtree(pg_wal / "strongroom")  # forget the markers: the bucket decides
    assert wal_main(["push", "--sync", "--config", str(config), str(pg_wal / names_[1])]) == 0
    (pg_wal / names_[1]).unlink()
    (pg_wal / names_[1]).write_bytes(fake_segment(names_[1], salt=b"x"))
    assert wal_main(["push", "--sync", "--config", str(config), str(pg_wal / names_[1])]) == 9
    dest = pg_wal / "RECOVERYXLOG"
    assert wal_main(["fetch", "--config", str(config), names_[2], str(dest)]) == 0
    assert dest.read_bytes()[:64] == fake_segment(names_[2])[:64]
    assert wal_main(["fetch", "--config", str(config), _seg(4), str(dest)]) == 1
    assert "testing" not in capsys.readouterr().err


def test_hot_path_imports_stay_light(tmp_path: Path) -> None:
    """strongroom-wal must not import Prefect, pydantic, boto3 or typer to answer."""
    import subprocess
    import sys

    code = (
        "import sys; from strongroom.cli import wal as wal_cli; "
        "rc = wal_cli.main(['push', '--config', sys.argv[1], sys.argv[2]]); "
        "bad = [m for m in ('prefect', 'pydantic', 'boto3', 'botocore', 'typer', 'rich')"
        " if m in sys.modules]; print(rc, bad)"
    )
    config = tmp_path / "c.toml"
    config.write_text('target = "x"\n[repository]\nkind = "local"\npath = "/nonexistent"\n')
    pg_wal = tmp_path / "pg_wal"
    pg_wal.mkdir()
    out = subprocess.run(
        [sys.executable, "-c", code, str(config), str(pg_wal / _seg(1))],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "3 []", out  # missing file: answered before any heavy import


# ------------------------------------------------------------------- real clusters


@dataclass
class Cluster:
    server: PostgresServer
    conn: PostgresConnection
    repo: LocalRepository
    repo_config: RepositoryConfig
    enc: EncryptionConfig
    base: Path
    target: str
    config: Path
    base_manifest: Any = None

    def sql(self, text: str) -> str:
        return self.server.psql(text)

    def switch_and_wait(self) -> str:
        """Switch WAL and wait until the finished segment is in the repository."""
        name = self.sql("SELECT pg_walfile_name(pg_switch_wal())")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.repo.exists(wal_key(self.target, name)):
                return name
            time.sleep(0.05)
        raise AssertionError(f"{name} was not archived: {self.server.log_path.read_text()[-2000:]}")


def _cluster(
    root: Path, target: str, key: x25519.Identity, *, auth_local: str = "trust"
) -> Cluster:
    chown_to_postgres(root, 0o755)
    repo_dir = root / "repo"
    chown_to_postgres(repo_dir)
    repo_config = signed_config(kind="local", path=str(repo_dir))
    enc = EncryptionConfig(recipients=[str(key.to_public())], identities=[SecretStr(str(key))])
    config = write_wal_config(
        root / "wal.toml",
        target=target,
        repository=repo_config,
        recipients=enc.recipients,
        owner="postgres",
        push={"parallel": 2, "linger_seconds": 1.0},
    )
    command = default_wal_command("postgres")
    server = PostgresServer(
        root / "src",
        # the line `strongroom wal-config` prints
        archive_command=archive_command(command, str(config), load_wal_config(str(config)).repo_id),
        settings={"archive_timeout": 0},
        auth_local=auth_local,
    )
    server.start()
    conn = PostgresConnection(
        name=target, host=server.host, port=server.port, password=SecretStr(server.password)
    )
    return Cluster(server, conn, make_local_repo(repo_dir), repo_config, enc, root, target, config)


@pytest.fixture(scope="module")
def age_identity() -> x25519.Identity:
    return x25519.Identity.generate()


@pytest.fixture
def pg_tmp() -> Iterator[Path]:
    """A temp dir the postgres OS user can reach (pytest's tmp_path is root-only)."""
    path = make_temp_dir("pitr-test")
    chown_to_postgres(path, 0o755)
    yield path
    remove_dir(path)


@pytest.fixture(scope="module")
def cluster(age_identity: x25519.Identity) -> Iterator[Cluster]:
    root = make_temp_dir("pitr")
    c = _cluster(root, "pg1", age_identity)
    try:
        c.sql("CREATE TABLE seed (x int); INSERT INTO seed VALUES (1)")
        c.base_manifest = base_backup_postgres(c.conn, c.repo, c.repo_config, c.enc)
        yield c
    finally:
        c.server.stop()
    remove_dir(root)


def _restore(c: Cluster, tmp: Path, **kw: Any) -> dict[str, Any]:
    chown_to_postgres(tmp, 0o755)
    req = PitrRequest(
        target=kw.pop("target", c.target),
        data_dir=str(tmp / "data"),
        start=True,
        port=free_port(),
        socket_dir=str(tmp),
        wait_timeout_s=120,
        **kw,
    )
    try:
        return pitr_restore(c.repo, c.repo_config, c.enc, req)
    finally:
        RestoredServer(tmp / "data", req.port or 0, tmp, tmp / "data.pitr.log", "postgres").stop(
            "immediate"
        )


def test_base_backup_manifest_wal_and_verify(cluster: Cluster) -> None:
    m = cluster.base_manifest
    d = m.details
    assert m.kind == "base" and m.artifacts[0].content == "pg_basebackup-tar"
    assert d["system_identifier"] == int(
        cluster.sql("SELECT system_identifier FROM pg_control_system()")
    )
    assert d["timeline"] == 1 and d["start_wal"].startswith("00000001")
    assert names.parse_lsn(d["stop_lsn"]) > names.parse_lsn(d["start_lsn"])
    assert "START WAL LOCATION" in d["backup_label"]
    # done only when its WAL is archived: every needed file is in the repository
    assert d["archived_wal"][-1].endswith(".backup")
    for name in d["archived_wal"]:
        assert cluster.repo.exists(wal_key(cluster.target, name))
    report = verify_backup(cluster.repo, m, cluster.enc)
    assert report["ok"], report
    structure = report["artifacts"][0]["structure"]
    assert structure["file_checksums_verified"] == structure["manifest_files"] > 500


def test_pitr_to_time_between_two_commits(cluster: Cluster, pg_tmp: Path) -> None:
    cluster.sql("CREATE TABLE t_time (x int); INSERT INTO t_time VALUES (1), (2), (3)")
    time.sleep(0.3)
    between = dt.datetime.now(dt.UTC)
    time.sleep(0.3)
    cluster.sql("INSERT INTO t_time VALUES (4), (5)")
    cluster.switch_and_wait()
    report = _restore(
        cluster,
        pg_tmp,
        recovery_target="time",
        target_time=between,
        verify_query="SELECT string_agg(x::text, ',' ORDER BY x) FROM t_time",
        verify_expect="1,2,3",
    )
    rec = report["recovery"]
    assert rec["state"] == "promoted" and rec["timeline"] == 2
    assert "recovery stopping before commit" in rec["stopped_at"][0]
    conf = (pg_tmp / "data" / "postgresql.auto.conf").read_text()
    assert "archive_mode = 'off'" in conf and "archive_command = ''" in conf
    assert report["plan"]["backup"]["backup_id"] == cluster.base_manifest.backup_id
    # recovery is over: the decryption key was removed from the restore host
    assert not Path(report["files"]["identity_file"]).exists()


def test_pitr_to_lsn_xid_and_restore_point(cluster: Cluster, pg_tmp: Path) -> None:
    c = cluster
    c.sql("CREATE TABLE t_mark (step text)")
    c.sql("INSERT INTO t_mark VALUES ('a')")
    lsn = c.sql("SELECT pg_current_wal_insert_lsn()")  # write LSN lags: async commit
    c.sql("INSERT INTO t_mark VALUES ('b')")
    xid = int(c.sql("BEGIN; INSERT INTO t_mark VALUES ('c'); SELECT txid_current(); COMMIT;"))
    c.sql("INSERT INTO t_mark VALUES ('d')")
    point = create_restore_point(c.conn, c.repo, "before_e")
    assert point["archived"] and point["timeline"] == 1
    c.sql("INSERT INTO t_mark VALUES ('e')")
    c.switch_and_wait()
    query = "SELECT string_agg(step, '' ORDER BY step) FROM t_mark"
    cases = [
        ({"recovery_target": "lsn", "target_lsn": lsn}, "a"),
        ({"recovery_target": "xid", "target_xid": xid}, "abc"),
        ({"recovery_target": "xid", "target_xid": xid, "inclusive": False}, "ab"),
        ({"recovery_target": "name", "target_name": "before_e"}, "abcd"),
    ]
    for i, (target, expected) in enumerate(cases):
        report = _restore(c, pg_tmp / f"r{i}", verify_query=query, verify_expect=expected, **target)
        assert report["recovery"]["verify"]["ok"]
    with pytest.raises(StrongroomError):  # duplicate restore point names are refused
        create_restore_point(c.conn, c.repo, "before_e")


def test_refusals_state_the_window(cluster: Cluster, pg_tmp: Path) -> None:
    c = cluster
    base = c.base_manifest
    early = dt.datetime.fromisoformat(base.details["stop_time"]) - dt.timedelta(hours=1)
    with pytest.raises(InvalidInput, match="outside the recoverable window") as info:
        plan_pitr(
            c.repo,
            PitrRequest(target=c.target, data_dir="/x", recovery_target="time", target_time=early),
        )
    assert base.backup_id in str(info.value) and "to" in str(info.value)
    future = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    with pytest.raises(InvalidInput, match="outside the recoverable window"):
        plan_pitr(
            c.repo,
            PitrRequest(target=c.target, data_dir="/x", recovery_target="time", target_time=future),
        )
    with pytest.raises(InvalidInput, match="outside"):
        plan_pitr(
            c.repo,
            PitrRequest(target=c.target, data_dir="/x", recovery_target="lsn", target_lsn="FF/0"),
        )
    with pytest.raises(InvalidInput, match="needs target_time"):
        plan_pitr(c.repo, PitrRequest(target=c.target, data_dir="/x", recovery_target="time"))
    busy = pg_tmp / "busy"
    busy.mkdir()
    (busy / "PG_VERSION").write_text("15")
    with pytest.raises(TargetNotEmpty, match="not empty"):
        pitr_restore(c.repo, c.repo_config, c.enc, PitrRequest(target=c.target, data_dir=str(busy)))
    assert (busy / "PG_VERSION").read_text() == "15"
    dry = pitr_restore(
        c.repo,
        c.repo_config,
        c.enc,
        PitrRequest(
            target=c.target,
            data_dir=str(pg_tmp / "new"),
            recovery_target="immediate",
            dry_run=True,
        ),
    )
    assert dry["plan"]["recovery_settings"]["recovery_target"] == "immediate"
    assert not (pg_tmp / "new").exists()


def test_gap_is_reported_and_blocks_recovery(cluster: Cluster, pg_tmp: Path) -> None:
    c = cluster
    c.sql("CREATE TABLE t_gap (x int)")
    for i in range(3):
        c.sql(f"INSERT INTO t_gap VALUES ({i})")
        c.switch_and_wait()
    copy_dir = pg_tmp / "repo-copy"
    shutil.copytree(c.repo.root, copy_dir)
    chown_to_postgres(copy_dir, recursive=True)
    copy = make_local_repo(copy_dir)
    plan = plan_pitr(copy, PitrRequest(target=c.target, data_dir="/x"))  # latest, before damage
    index_names = sorted(
        i.key.rsplit("/", 1)[-1]
        for i in copy.list(f"wal/{c.target}/00000001/")
        if names.is_segment(i.key.rsplit("/", 1)[-1])
    )
    victim = index_names[-3]
    (copy_dir / wal_key(c.target, victim)).unlink()

    report = wal_check(copy, c.target, base_backups(copy, c.target))
    assert not report["ok"] and report["gaps"][0]["from"] == victim
    assert report["window"]["latest"]["segment"] < victim
    with pytest.raises(InvalidInput, match="gap"):
        plan_pitr(copy, PitrRequest(target=c.target, data_dir="/x"))

    # a recovery planned before the damage stops at the gap with a clear error
    data = pg_tmp / "r" / "data"
    chown_to_postgres(data.parent, 0o755)
    data.mkdir(mode=0o700)
    copy_config = copy_dir.parent / "copy.toml"
    req = PitrRequest(
        target=c.target, data_dir=str(data), start=True, port=free_port(), wait_timeout_s=60
    )
    data_fd = os.open(data, os.O_RDONLY | os.O_DIRECTORY)
    try:
        extract_base(copy, c.enc, plan.backup["backup_id"], c.target, data_fd)
        copy_cfg = signed_config(kind="local", path=str(copy_dir))
        req = req.model_copy(update={"config_path": str(copy_config)})
        write_recovery(req, plan, data, copy_cfg, c.enc, "postgres", data_fd)
    finally:
        os.close(data_fd)
    chown_to_postgres(data, recursive=True)
    server = RestoredServer(data, req.port or 0, data.parent, data.parent / "pitr.log", "postgres")
    (data.parent / "pitr.log").touch()
    chown_to_postgres(data.parent / "pitr.log", 0o600)
    server.start(60)
    try:
        with pytest.raises(StrongroomError, match="missing from the archive but later"):
            server.wait_recovery("promote", 60)
    finally:
        server.stop("immediate")


def test_timeline_switch_restore_promote_write_restore_again(
    pg_tmp: Path, age_identity: x25519.Identity
) -> None:
    c = _cluster(pg_tmp, "tl", age_identity)
    restored: RestoredServer | None = None
    try:
        c.sql("CREATE TABLE t_tl (src text)")
        base_backup_postgres(c.conn, c.repo, c.repo_config, c.enc)
        c.sql("INSERT INTO t_tl VALUES ('tl1')")
        c.switch_and_wait()
        first = c.base / "first"
        chown_to_postgres(first, 0o755)
        req = PitrRequest(
            target="tl",
            data_dir=str(first / "data"),
            start=True,
            port=free_port(),
            socket_dir=str(first),
            archive_after="tl",
            wait_timeout_s=120,
        )
        report = pitr_restore(c.repo, c.repo_config, c.enc, req)
        restored = RestoredServer(
            first / "data",
            req.port or 0,
            Path(report["recovery"]["socket_dir"]),
            first / "data.pitr.log",
            "postgres",
        )
        assert report["recovery"]["timeline"] == 2
        # the promoted cluster writes on timeline 2 and archives it (history file first)
        restored.psql("INSERT INTO t_tl VALUES ('tl2')")
        name = restored.psql("SELECT pg_walfile_name(pg_switch_wal())")
        assert name.startswith("00000002")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not c.repo.exists(wal_key("tl", name)):
            time.sleep(0.05)
        assert c.repo.exists(wal_key("tl", name))
        assert c.repo.exists(wal_key("tl", "00000002.history"))
        restored.stop("fast")
        restored = None

        check = wal_check(c.repo, "tl", base_backups(c.repo, "tl"))
        assert check["ok"], check
        tl2 = next(t for t in check["timelines"] if t["timeline"] == 2)
        assert tl2["parent"] == 1 and check["window"]["timeline"] == 2

        again = _restore(
            c,
            c.base / "second",
            target="tl",
            verify_query="SELECT string_agg(src, ',' ORDER BY src) FROM t_tl",
            verify_expect="tl1,tl2",
        )
        assert again["plan"]["timeline"] == 2 and again["recovery"]["timeline"] == 3
    finally:
        if restored is not None:
            restored.stop("immediate")
        c.server.stop()


def test_flows_and_cli(prefect_api: str, pg_tmp: Path, age_identity: x25519.Identity) -> None:
    import json

    import typer
    from typer.testing import CliRunner

    from blocks import BackupRepository, EncryptionKey, PostgresTarget, register_all
    from flows.pitr import (
        base_backup_postgresql,
        create_restore_point_postgresql,
        pitr_restore_postgresql,
        wal_check_postgresql,
    )
    from strongroom.cli.pitr import register

    c = _cluster(pg_tmp, "flowpg", age_identity)
    try:
        register_all()
        EncryptionKey(recipients=c.enc.recipients, identity=str(age_identity)).save(
            "pitrkey", overwrite=True
        )
        BackupRepository(**signing_block_fields(), local_path=str(c.repo.root)).save(
            "pitrrepo", overwrite=True
        )
        written = pg_tmp / "written.toml"
        PostgresTarget(
            host=c.server.host,
            port=c.server.port,
            user=c.server.superuser,
            password=c.server.password,
            wal_config_path=str(written),  # the block says where, never a flow parameter
            wal_config_owner="postgres",
        ).save("flowpg", overwrite=True)
        blocks = {"repository": "pitrrepo"}
        manifest = base_backup_postgresql(target="flowpg", encryption_key="pitrkey", **blocks)
        assert manifest["kind"] == "base" and manifest["details"]["archived_wal"]
        assert written.stat().st_mode & 0o777 == 0o600
        if os.geteuid() == 0:  # the block's owner was applied
            assert written.stat().st_uid == pwd.getpwnam("postgres").pw_uid
        cfg = load_wal_config(str(written))
        assert cfg.target == "flowpg" and cfg.recipients == c.enc.recipients
        assert cfg.identity_file is None  # the archiver never gets the identity

        c.sql("CREATE TABLE t_flow (x int); INSERT INTO t_flow VALUES (1)")
        point = create_restore_point_postgresql(target="flowpg", name="rp1", **blocks)
        assert point["archived"]
        check = wal_check_postgresql(target="flowpg", **blocks)
        assert check["ok"] and check["window"]["timeline"] == 1
        plan = pitr_restore_postgresql(
            target="flowpg",
            data_dir=str(pg_tmp / "never"),
            recovery_target="name",
            target_name="rp1",
            dry_run=True,
            encryption_key="pitrkey",
            **blocks,
        )
        assert plan["plan"]["target_lsn"] == point["lsn"]
        assert plan["plan"]["backup"]["backup_id"] == manifest["backup_id"]

        app, backup_app, restore_app = typer.Typer(), typer.Typer(), typer.Typer()
        app.add_typer(backup_app, name="backup")
        app.add_typer(restore_app, name="restore")
        register(app, backup_app, restore_app)
        runner = CliRunner()
        by_cli = pg_tmp / "by-cli.toml"  # written by the CLI's own process, then the flow
        backup_cmd = ["backup", "postgresql-base", "flowpg", "-r", "pitrrepo", "-k", "pitrkey"]
        result = runner.invoke(app, [*backup_cmd, "--write-wal-config", str(by_cli), "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["kind"] == "base"
        assert by_cli.stat().st_mode & 0o777 == 0o600
        assert load_wal_config(str(by_cli)).target == "flowpg"
        result = runner.invoke(app, ["wal-check", "flowpg", "-r", "pitrrepo", "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["ok"] is True
        result = runner.invoke(
            app,
            [
                "restore",
                "postgresql-pitr",
                "flowpg",
                "-D",
                str(pg_tmp / "never"),
                "--time",
                "2000-01-01T00:00:00Z",
                "-r",
                "pitrrepo",
                "-k",
                "pitrkey",
                "--json",
            ],
        )
        assert result.exit_code == 2 and "outside the recoverable window" in result.stdout
        check_cmd = ["wal-check", "flowpg", "-r", "pitrrepo", "--verify", "pitrkey", "--json"]
        result = runner.invoke(app, check_cmd)
        assert result.exit_code == 0, result.output
        verified = json.loads(result.stdout)["verify"]
        assert verified["ok"] and verified["checked"] >= 1
        archived = (c.repo.root / "wal" / "flowpg").rglob("0*")
        segment = next(p for p in sorted(archived) if p.is_file() and len(p.name) == 24)
        segment.chmod(0o644)
        damaged = bytearray(segment.read_bytes())
        damaged[-10] ^= 0x01
        segment.write_bytes(bytes(damaged))
        result = runner.invoke(app, check_cmd)
        assert result.exit_code == 4, result.output
        report = json.loads(result.stdout)
        assert [f["name"] for f in report["verify"]["failed"]] == [segment.name]
        assert any(segment.name in p for p in report["problems"])
        result = runner.invoke(app, ["wal-push", "--config", str(written), "/nonexistent/x"])
        assert result.exit_code == 2  # not a WAL file name
    finally:
        c.server.stop()
