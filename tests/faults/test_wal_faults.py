"""WAL archiving under faults: killed pushes, concurrent pushes, slow storage, replaced segments.

One real PostgreSQL 15 cluster archives through ``strongroom-wal push`` into a real
moto S3 server (a versioned bucket, so "stored exactly once" can be counted) through a
throttling proxy on loopback (``throttle_proxy.py``). The cluster's archive_command is
a small wrapper around the real command: it keeps a copy of every file PostgreSQL
hands over (to compare with what comes back), records the PID of the push (so a test
can SIGKILL it), logs each exit code, and waits while a gate file exists (so the state
between a kill and PostgreSQL's retry can be inspected). The proxy's holds stop an
upload at an exact point, so every kill lands where it is meant to on any machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import SecretStr
from pyrage import x25519

from strongroom.cli.wal import main as wal_main
from strongroom.config import EncryptionConfig, PostgresConnection, RepositoryConfig
from strongroom.engines.postgres.wal import names
from strongroom.engines.postgres.wal.check import wal_check
from strongroom.engines.postgres.wal.config import (
    load_wal_config,
    write_identity_file,
    write_wal_config,
)
from strongroom.engines.postgres.wal.fast import ok_dir, push_dir
from strongroom.engines.postgres.wal.push import lock_held
from strongroom.engines.postgres.wal.store import encode, parse_header, wal_key
from strongroom.repository.s3 import S3Repository
from strongroom.sandbox._process import make_temp_dir, remove_dir
from strongroom.sandbox.postgres import PostgresServer, chown_to_postgres
from tests.faults._support import ROOT
from tests.faults.throttle_proxy import Hold, ThrottleProxy
from tests.fixtures.s3 import MotoServer
from tests.fixtures.strongroom_fixtures import signed_config

TARGET = "walfaults"
BANDWIDTH = 8 * 1024 * 1024  # bytes per second through the proxy, each way
LATENCY_S = 0.01

WRAPPER = """#!/bin/sh
# archive_command wrapper (test only) around the real strongroom-wal push
ctl={ctl}
name=$(basename "$1")
while [ -e "$ctl/gate" ]; do sleep 0.02; done
cp "$1" "$ctl/keep/.$name.$$" && mv "$ctl/keep/.$name.$$" "$ctl/keep/$name"
mode=$(cat "$ctl/mode")
{command} push --$mode --config {config} "$1" 2>>"$ctl/stderr" &
pid=$!
echo $pid > "$ctl/pids/$name"
wait $pid
rc=$?
echo "$name $rc" >> "$ctl/calls"
exit $rc
"""


@dataclass
class Rig:
    """The cluster, its archive, the proxy in between and the wrapper's control folder."""

    server: PostgresServer
    moto: MotoServer
    bucket: str
    repo: S3Repository  # direct to moto (what the test reads), not through the proxy
    repo_config: RepositoryConfig
    proxy: ThrottleProxy
    base: Path
    ctl: Path
    fetch_config: Path  # direct, with the identity, no prefetch
    push_config: Path  # through the proxy (the cluster's)
    enc: EncryptionConfig
    identity: x25519.Identity

    @property
    def pg_wal(self) -> Path:
        return self.server.data_dir / "pg_wal"

    def sql(self, text: str) -> str:
        return self.server.psql(text)

    def set_mode(self, mode: str) -> None:
        (self.ctl / "mode").write_text(mode)

    def gate(self, closed: bool) -> None:
        gate = self.ctl / "gate"
        if closed:
            gate.touch()
        else:
            gate.unlink(missing_ok=True)

    def current_segment(self) -> str:
        return self.sql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())")

    def switch(self, rows: int = 1) -> str:
        """Write ``rows`` rows (about 100 bytes of WAL each), switch WAL; returns the
        finished segment's name."""
        self.sql(f"INSERT INTO ticks SELECT now(), md5(g::text) FROM generate_series(1, {rows}) g")
        return self.sql("SELECT pg_walfile_name(pg_switch_wal())")

    def archived_by_postgres(self) -> set[str]:
        return {n for n, rc in self.calls() if rc == 0}

    def calls(self) -> list[tuple[str, int]]:
        path = self.ctl / "calls"
        if not path.exists():
            return []
        found = []
        for line in path.read_text().splitlines():
            name, _, rc = line.partition(" ")
            if rc.strip().lstrip("-").isdigit():
                found.append((name, int(rc)))
        return found

    def wait_archived(self, name: str, timeout: float = 90, *, nudge: bool = False) -> None:
        """Wait until archive_command succeeded for ``name``. ``nudge``: after an
        archiver crash the postmaster starts a new one (at most every 10 s) only when
        its loop wakes, up to a minute later; a reload signal wakes it (as any other
        activity would)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (name, 0) in self.calls():
                return
            if nudge:
                self.sql("SELECT pg_reload_conf()")
                time.sleep(0.2)
            time.sleep(0.05)
        raise AssertionError(
            f"{name} was not archived; calls {self.calls()[-5:]}; "
            f"log {self.server.log_path.read_text()[-1500:]}"
        )

    def wait_pusher_gone(self, timeout: float = 30) -> None:
        lock = Path(push_dir(load_wal_config(str(self.push_config)), str(self.pg_wal)))
        deadline = time.monotonic() + timeout
        while lock_held(lock / "pusher.lock"):
            assert time.monotonic() < deadline, "the background pusher never finished"
            time.sleep(0.05)

    def push_pid(self, name: str, timeout: float = 30) -> int:
        path = self.ctl / "pids" / name
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = path.read_text().strip() if path.exists() else ""
            if text.isdigit():
                return int(text)
            time.sleep(0.01)
        raise AssertionError(f"no archive_command was started for {name}")

    def pusher_pids(self) -> list[int]:
        """The background pushers strongroom-wal started for this cluster (found by
        their command line, which names this cluster's own pg_wal)."""
        found = []
        needle = f"--pg-wal\0{self.pg_wal}".encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if b"push-worker" in cmdline and needle in cmdline:
                found.append(int(entry))
        return found

    def versions(self, name: str) -> int:
        key = f"{self.repo_config.prefix}/{wal_key(TARGET, name)}"
        s3 = self.moto.s3()
        listed = s3.list_object_versions(Bucket=self.bucket, Prefix=key)
        return sum(1 for v in listed.get("Versions", []) if v["Key"] == key)

    def kept(self, name: str) -> bytes:
        return (self.ctl / "keep" / name).read_bytes()

    def fetch(self, name: str, folder: Path) -> tuple[int, bytes | None]:
        """``strongroom-wal fetch`` as restore_command runs it; (exit code, file or None)."""
        folder.mkdir(parents=True, exist_ok=True)
        dest = folder / "RECOVERYXLOG"
        dest.unlink(missing_ok=True)
        code = wal_main(["fetch", "--config", str(self.fetch_config), name, str(dest)])
        return code, dest.read_bytes() if dest.exists() else None

    def put_raw(self, name: str, body: bytes) -> None:
        """Replace the stored object behind strongroom's back (a new version)."""
        key = f"{self.repo_config.prefix}/{wal_key(TARGET, name)}"
        self.moto.s3().put_object(Bucket=self.bucket, Key=key, Body=body)


def _s3_config(endpoint: str, bucket: str) -> RepositoryConfig:
    return signed_config(
        kind="s3",
        bucket=bucket,
        prefix="sr",
        endpoint_url=endpoint,
        access_key_id="testing",
        secret_access_key=SecretStr("testing"),
    )


@pytest.fixture(scope="module")
def rig(s3_server: MotoServer) -> Iterator[Rig]:
    from strongroom.engines.postgres.pitr.restore import default_wal_command

    bucket = f"wal-{uuid.uuid4().hex[:12]}"
    s3 = s3_server.s3()
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    proxy = ThrottleProxy(
        ("127.0.0.1", s3_server.port), bandwidth_bps=BANDWIDTH, latency_s=LATENCY_S
    ).start()
    base = make_temp_dir("walfaults")
    server: PostgresServer | None = None
    try:
        chown_to_postgres(base, 0o755)
        ctl = base / "ctl"
        for sub in (ctl, ctl / "keep", ctl / "pids"):
            sub.mkdir()
            chown_to_postgres(sub, 0o755)
        (ctl / "mode").write_text("sync")
        (ctl / "mode").chmod(0o644)
        identity = x25519.Identity.generate()
        enc = EncryptionConfig(
            recipients=[str(identity.to_public())], identities=[SecretStr(str(identity))]
        )
        direct = _s3_config(s3_server.endpoint_url, bucket)
        push_config = write_wal_config(
            base / "wal.toml",
            target=TARGET,
            repository=_s3_config(proxy.endpoint_url, bucket),
            recipients=enc.recipients,
            owner="postgres",
            push={"parallel": 2, "linger_seconds": 0.5},
        )
        key = write_identity_file(base / "wal.key", [str(identity)])
        fetch_config = write_wal_config(
            base / "fetch.toml",
            target=TARGET,
            repository=direct,
            recipients=enc.recipients,
            identity_file=str(key),
            fetch={"prefetch": 0},
        )
        wrapper = base / "archive.sh"
        wrapper.write_text(
            WRAPPER.format(ctl=ctl, command=default_wal_command("postgres"), config=push_config)
        )
        wrapper.chmod(0o755)
        server = PostgresServer(
            base / "src", archive_command=f"{wrapper} %p", settings={"archive_timeout": 0}
        )
        server.start()
        rig = Rig(
            server,
            s3_server,
            bucket,
            S3Repository(direct),
            direct,
            proxy,
            base,
            ctl,
            fetch_config,
            push_config,
            enc,
            identity,
        )
        rig.sql("CREATE TABLE ticks (at timestamptz, note text)")
        rig.wait_archived(rig.switch())
        yield rig
    finally:
        proxy.stop()
        if server is not None:
            server.stop()
        remove_dir(base)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        raise AssertionError(f"process {pid} was gone before the kill") from None


# ------------------------------------------------------------------ 1. kills


@pytest.mark.parametrize("point", ["mid-upload", "stored-not-acknowledged"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_killed_push_leaves_no_partial_segment_and_the_retry_succeeds(
    rig: Rig, mode: str, point: str, tmp_path: Path
) -> None:
    """SIGKILL of the push (sync: the archive_command uploads itself; async: the
    archive_command and the background pusher it started) while the segment's PUT is
    half sent, or after S3 stored it but before the answer reached the pusher."""
    rig.wait_pusher_gone()
    rig.set_mode(mode)
    name = rig.current_segment()
    hold = rig.proxy.hold(
        Hold(name.encode(), after_body_bytes=256 * 1024)
        if point == "mid-upload"
        else Hold(name.encode(), response=True)
    )
    try:
        assert rig.switch(rows=20000) == name  # a body of about 1 MB
        hold.wait_held()
        if point == "stored-not-acknowledged":
            assert hold.responses == 1  # S3 has answered: the object is stored
        rig.gate(closed=True)  # PostgreSQL's retry waits until the state is checked
        victims = [rig.push_pid(name)]
        if mode == "async":
            pushers = rig.pusher_pids()
            assert len(pushers) == 1, pushers
            victims += pushers
        for pid in victims:  # the waiting archive_command first: it would respawn a pusher
            _kill(pid)
        hold.release(drop=True)  # the dead client's connection goes with it
    finally:
        rig.proxy.clear_holds()

    # between the kill and the retry: a complete verified segment, or not there at all
    code, data = rig.fetch(name, tmp_path / "before")
    if point == "mid-upload":
        assert (code, data) == (1, None)
        assert rig.versions(name) == 0
    else:
        assert code == 0 and data == rig.kept(name)
        assert rig.versions(name) == 1
    rig.repo.cleanup_incomplete("")
    assert list(rig.repo.list_incomplete("")) == []

    rig.gate(closed=False)
    rig.wait_archived(name, nudge=True)  # PostgreSQL re-ran archive_command for the file
    assert next(rc for n, rc in rig.calls() if n == name) != 0  # the killed call failed
    assert rig.versions(name) == 1
    code, data = rig.fetch(name, tmp_path / "after")
    assert code == 0 and data == rig.kept(name)
    report = wal_check(rig.repo, TARGET, [])
    assert report["gaps"] == [], report["gaps"]
    timeline = next(t for t in report["timelines"] if t["timeline"] == 1)
    assert timeline["first"] <= name <= timeline["last"]


# ------------------------------------------------------- 2. concurrent pushes


def _push_process(config: Path, wal: Path) -> subprocess.Popen[str]:
    argv = ["-m", "strongroom.cli.wal", "push", "--sync", "--config", str(config), str(wal)]
    return subprocess.Popen(
        [sys.executable, *argv],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _pg_wal_with(folder: Path, name: str, data: bytes) -> Path:
    (folder / "pg_wal" / "archive_status").mkdir(parents=True)
    path = folder / "pg_wal" / name
    path.write_bytes(data)
    (folder / "pg_wal" / "archive_status" / f"{name}.ready").touch()
    return path


def test_two_pushes_of_one_segment_at_once(rig: Rig, tmp_path: Path) -> None:
    """Two hosts (say a primary and a standby with archive_mode=always) push the same
    real segment into the same target at the same moment: both PUTs are held mid-body
    by the proxy until both are in flight, then go on together."""
    name = rig.switch(rows=20000)
    rig.wait_archived(name)
    raw = rig.kept(name)
    body = len(encode(name, raw, rig.enc.recipients)[0])
    target = f"dup{uuid.uuid4().hex[:6]}"
    config = write_wal_config(
        tmp_path / "dup.toml",
        target=target,
        repository=_s3_config(rig.proxy.endpoint_url, rig.bucket),
        recipients=rig.enc.recipients,
        push={"parallel": 1},
    )
    walls = [_pg_wal_with(tmp_path / host, name, raw) for host in ("a", "b")]
    hold = rig.proxy.hold(Hold(f"/{target}/".encode(), after_body_bytes=body // 2))
    try:
        procs = [_push_process(config, wal) for wal in walls]
        hold.wait_held(2)
        hold.release()
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        rig.proxy.clear_holds()
    assert [p.returncode for p in procs] == [0, 0], outs
    key = f"{rig.repo_config.prefix}/{wal_key(target, name)}"
    listed = rig.moto.s3().list_object_versions(Bucket=rig.bucket, Prefix=f"sr/wal/{target}/")
    assert [v["Key"] for v in listed.get("Versions", [])] == [key]  # one object, one version
    stored = rig.repo.get_bytes(wal_key(target, name))
    from strongroom.engines.postgres.wal.store import decode

    assert decode(name, stored, [str(rig.identity)]) == raw

    # another cluster's file under the same name (a valid segment, other content)
    other = bytearray(raw)
    other[len(other) // 2] ^= 0xFF
    wal = _pg_wal_with(tmp_path / "c", name, bytes(other))
    proc = _push_process(config, wal)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 9, err
    assert name in err and "DIFFERENT content" in err and "Refusing to overwrite" in err
    assert rig.repo.get_bytes(wal_key(target, name)) == stored
    listed = rig.moto.s3().list_object_versions(Bucket=rig.bucket, Prefix=f"sr/wal/{target}/")
    assert len(listed.get("Versions", [])) == 1


# ---------------------------------------------------------- 3. slow storage


@pytest.mark.slow
def test_slow_storage_every_archived_segment_stored_once(rig: Rig, tmp_path: Path) -> None:
    """A real workload archives through the throttled proxy with the background pusher
    (async). Meanwhile a watcher checks that every "stored" marker of the pusher and
    every file PostgreSQL marked done is already in the bucket."""
    rig.wait_pusher_gone()
    rig.set_mode("async")
    rig.proxy.pacer_up.bps = 4 * 1024 * 1024
    rig.proxy.latency_s = 0.03
    spool_ok = Path(
        ok_dir(
            push_dir(load_wal_config(str(rig.push_config)), str(rig.pg_wal)),
            load_wal_config(str(rig.push_config)).repo_identity(),
        )
    )
    status = rig.pg_wal / "archive_status"
    seen: set[str] = set()
    bad: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            found = {p.name for p in spool_ok.glob("0*")} if spool_ok.exists() else set()
            found |= {p.name[: -len(".done")] for p in status.glob("0*.done")}
            for name in sorted(found - seen):
                seen.add(name)
                if not rig.repo.exists(wal_key(TARGET, name)):
                    bad.append(name)
            time.sleep(0.01)

    start_calls = len(rig.calls())
    first = rig.current_segment()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        rig.sql("CREATE TABLE load (id int, payload text)")
        for step in range(8):
            rig.sql(
                "INSERT INTO load SELECT g, md5(g::text) || repeat('x', 60) "
                f"FROM generate_series({step * 100000 + 1}, {(step + 1) * 100000}) g"
            )
        last = rig.switch()
        rig.wait_archived(last, timeout=240)
    finally:
        stop.set()
        watcher.join(timeout=10)
        rig.proxy.pacer_up.bps = BANDWIDTH
        rig.proxy.latency_s = LATENCY_S
    done = {n for n, rc in rig.calls()[start_calls:] if rc == 0}
    segments = sorted(n for n in done if names.is_segment(n))
    expected = [
        names.segment_name(1, s) for s in range(names.segno_of(first), names.segno_of(last) + 1)
    ]
    assert segments == expected  # every segment of the workload, none skipped
    assert len(segments) >= 6
    assert bad == [], f"marked done before stored: {bad}"
    assert seen >= set(segments[:-1])  # the watcher saw them (it is not vacuous)
    for name in segments:
        assert rig.versions(name) == 1, name  # stored exactly once, never re-written
        code, data = rig.fetch(name, tmp_path)
        assert code == 0 and data == rig.kept(name), name
    listing = {i.key.rsplit("/", 1)[-1] for i in rig.repo.list(f"wal/{TARGET}/")}
    assert {n for n in listing if names.is_segment(n)} <= rig.archived_by_postgres()
    assert list(rig.repo.list_incomplete("")) == []


# ------------------------------------------------------- 4. replaced segment


def _replacement(rig: Rig, name: str, original: bytes, how: str) -> bytes:
    raw = rig.kept(name)
    if how == "flipped-byte":
        blob = bytearray(original)
        blob[len(blob) // 2] ^= 0x01
        return bytes(blob)
    if how == "reencrypted-content-under-kept-header":
        # a valid segment (same page header, other records), validly encrypted for the
        # archive's recipient, behind the original first line
        other = bytearray(raw)
        other[len(other) // 2] ^= 0xFF
        forged, _ = encode(name, bytes(other), rig.enc.recipients)
        head = parse_header(original)
        return original[: head.header_size] + forged[parse_header(forged).header_size :]
    # another archived segment, its first line rewritten to this name
    donor = min(n for n in rig.archived_by_postgres() if n != name and names.is_segment(n))
    stored = rig.repo.get_bytes(wal_key(TARGET, donor))
    return stored.replace(donor.encode(), name.encode(), 1)


@pytest.mark.parametrize(
    "how",
    ["flipped-byte", "reencrypted-content-under-kept-header", "other-segment-renamed"],
)
def test_replaced_segment_is_named_by_verify_and_refused_by_fetch(
    rig: Rig, how: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = rig.switch()
    rig.wait_archived(name)
    original = rig.repo.get_bytes(wal_key(TARGET, name))
    capsys.readouterr()
    assert wal_main(["verify", "--config", str(rig.fetch_config)]) == 0
    rig.put_raw(name, _replacement(rig, name, original, how))
    try:
        capsys.readouterr()
        assert wal_main(["verify", "--config", str(rig.fetch_config)]) == 4
        out = capsys.readouterr()
        assert f"WAL {name}" in out.err and "1 failed" in out.out
        assert out.err.count("strongroom-wal: ") == 1  # only the replaced one
        code, data = rig.fetch(name, tmp_path / "pg_wal")
        assert code == 200 and data is None
        assert name in capsys.readouterr().err
        assert [p.name for p in (tmp_path / "pg_wal").iterdir() if p.name != "strongroom"] == []
    finally:
        rig.put_raw(name, original)
    code, data = rig.fetch(name, tmp_path / "again")
    assert code == 0 and data == rig.kept(name)


def test_pitr_over_a_replaced_segment_fails_naming_it(rig: Rig) -> None:
    """A point-in-time restore whose replay needs the replaced segment stops with an
    error naming it; it never promotes a cluster recovered from the wrong data."""
    from strongroom.engines.postgres.pitr.basebackup import base_backup_postgres
    from strongroom.engines.postgres.pitr.plan import PitrRequest
    from strongroom.engines.postgres.pitr.restore import pitr_restore
    from strongroom.engines.postgres.pitr.server import RestoredServer
    from strongroom.errors import StrongroomError
    from tests.fixtures.ports import free_port

    rig.wait_pusher_gone()
    rig.set_mode("async")
    conn = PostgresConnection(
        name=TARGET,
        host=rig.server.host,
        port=rig.server.port,
        password=SecretStr(rig.server.password),
    )
    base = base_backup_postgres(conn, rig.repo, rig.repo_config, rig.enc)
    assert base.details["archived_wal"]
    rig.sql("CREATE TABLE after_base (x int); INSERT INTO after_base VALUES (1)")
    victim = rig.switch()
    rig.wait_archived(victim)
    rig.sql("INSERT INTO after_base VALUES (2)")
    rig.wait_archived(rig.switch())
    original = rig.repo.get_bytes(wal_key(TARGET, victim))
    rig.put_raw(
        victim, _replacement(rig, victim, original, "reencrypted-content-under-kept-header")
    )
    where = rig.base / "restore"
    where.mkdir()
    chown_to_postgres(where, 0o755)
    req = PitrRequest(
        target=TARGET,
        data_dir=str(where / "data"),
        start=True,
        port=free_port(),
        socket_dir=str(where),
        wait_timeout_s=120,
        config_path=str(where / "wal.toml"),
    )
    try:
        with pytest.raises(StrongroomError) as info:
            pitr_restore(rig.repo, rig.repo_config, rig.enc, req)
        assert victim in str(info.value)
        assert "does not match the checksum recorded at push" in str(info.value)
    finally:
        RestoredServer(
            where / "data", req.port or 0, where, where / "data.pitr.log", "postgres"
        ).stop("immediate")
        rig.put_raw(victim, original)
    # the background fetcher (which kept failing on the replaced segment) must not outlive
    # the cluster it served: once the data directory is gone it exits
    shutil.rmtree(where / "data")
    deadline = time.monotonic() + 30
    while _fetchers_for(where) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _fetchers_for(where) == [], "a fetch-worker outlived its data directory"


def _fetchers_for(where: Path) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"fetch-worker" in argv and any(str(where).encode() in a for a in argv):
            found.append(int(proc.name))
    return found
