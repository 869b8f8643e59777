"""Streaming WAL receiver throughput: ``strongroom wal-receive`` against ``pg_receivewal``
alone, in the same run, on the same WAL.

    python -m bench.wal_receive_bench [--quick]  -> bench/results/wal-receive.json
                                                   (wal-receive-quick.json)

A throwaway cluster gets two physical slots that reserve WAL at the same
position, then a backlog of less compressible rows (md5 text) and a WAL switch.
``pg_receivewal_mib_s``: ``pg_receivewal --endpos`` on the first slot drains the
backlog into a local directory. ``receive_mib_s``: the receiver (pg_receivewal
plus push of every completed segment: zstd, age, signed local repository with
fsync) on the second slot, until the last completed segment is in the
repository. MiB are WAL bytes from the slots' start to the switch. Measures
capacity (a drained backlog), not lag under a live load.

``rpo_async_s`` / ``lost_commits_sync``: a fresh cluster, the receiver (pushing its
``.partial`` every second and when it stops), a single-row INSERT load for a few
seconds, then SIGKILL of the primary and a stop of the receiver. The repository's
WAL (completed segments, and the partial zero-padded as ``wal-fetch`` serves it) is
decoded with ``pg_waldump``; every acknowledged commit whose transaction id has no
COMMIT record there is lost. ``rpo_async_s`` is the commit time between the newest
acknowledged commit and the newest one recovered (0 when none is lost);
``lost_commits_sync`` the count lost with ``--synchronous`` and
``synchronous_standby_names`` naming the receiver.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.signing import bench_config, bench_repo

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MIB = 1 << 20


def _repository_commits(repo: Any, target: str, identities: list[str], work: Path) -> set[int]:
    """Transaction ids with a COMMIT record in the target's archived WAL."""
    from strongroom.engines.postgres.wal import names
    from strongroom.engines.postgres.wal.store import archived_files, fetch_to_file

    work.mkdir()
    wanted = sorted(
        {name[:24] for _info, name, kind in archived_files(repo, target) if kind != "history"}
    )
    for name in wanted:
        if names.is_segment(name):
            fetch_to_file(repo, target, name, identities, str(work / name))
    if not wanted:
        return set()
    waldump = str(Path(pg_bin_dir()) / "pg_waldump")
    out = subprocess.run(
        [waldump, "-p", str(work), wanted[0], wanted[-1], "--rmgr=Transaction"],
        capture_output=True,
        text=True,
    ).stdout
    return {
        int(line.split("tx:")[1].split(",")[0])
        for line in out.splitlines()
        if "COMMIT" in line and "tx:" in line
    }


def pg_bin_dir() -> str:
    from strongroom.engines.postgres.wal.receive import pg_receivewal

    return str(Path(pg_receivewal()).parent)


def kill_under_load(synchronous: bool, seconds: float) -> dict[str, Any]:
    """Commits lost when the primary is killed with SIGKILL under a write load."""
    import os
    import signal
    import threading

    import psycopg
    from pyrage import x25519

    from strongroom.engines.postgres.wal.config import load_wal_config, write_wal_config
    from strongroom.engines.postgres.wal.receive import APPLICATION_NAME, Receiver
    from strongroom.sandbox._process import make_temp_dir, remove_dir
    from strongroom.sandbox.postgres import PostgresServer, chown_to_postgres

    root = make_temp_dir("walrecv-rpo")
    chown_to_postgres(root, 0o755)
    # the sandbox turns synchronous_commit off for speed: a commit must wait for the
    # primary's flush (and, with synchronous, for the receiver's)
    settings = {"synchronous_commit": "on"}
    if synchronous:
        settings["synchronous_standby_names"] = APPLICATION_NAME
    server = PostgresServer(root / "src", settings=settings)
    server.start()
    try:
        env = server.libpq_env()
        env.pop("PGDATABASE", None)
        key = x25519.Identity.generate()
        config = write_wal_config(
            root / "wal.toml",
            target="rpo",
            repository=bench_config(kind="local", path=str(root / "repo")),
            recipients=[str(key.to_public())],
        )
        repo = bench_repo(root / "repo")
        receiver = Receiver(
            load_wal_config(str(config)),
            root / "spool",
            slot="bench_rpo",
            synchronous=synchronous,
            env=env,
            partial_interval_s=1.0,
        )
        stop = threading.Event()
        code: list[int] = []
        thread = threading.Thread(
            target=lambda: code.append(receiver.run(poll_s=0.05, until=stop.is_set)),
            daemon=True,
        )
        thread.start()
        state = "sync" if synchronous else "async"
        deadline = time.monotonic() + 60
        while server.psql("SELECT sync_state FROM pg_stat_replication") != state:
            if time.monotonic() > deadline:
                raise RuntimeError("the receiver did not connect")
            time.sleep(0.05)
        server.psql("CREATE TABLE load (x int)")
        acked: list[tuple[int, float]] = []
        killed = threading.Event()

        def writer() -> None:
            with psycopg.connect(server.dsn(), autocommit=True) as conn:
                try:
                    while True:
                        row = conn.execute(
                            "INSERT INTO load VALUES (1) RETURNING txid_current()"
                        ).fetchone()
                        acked.append((int(row[0]) if row else 0, time.time()))
                except psycopg.Error:
                    if not killed.is_set():
                        raise

        load = threading.Thread(target=writer, daemon=True)
        load.start()
        time.sleep(seconds)
        assert server.proc is not None
        killed.set()
        os.kill(server.proc.pid, signal.SIGKILL)
        load.join(30)
        time.sleep(0.5)  # pg_receivewal notices the lost connection
        stop.set()
        thread.join(120)
        server.proc.wait(10)
        server.proc = None
        have = _repository_commits(repo, "rpo", [str(key)], root / "fetched")
    finally:
        server.stop()
        remove_dir(root)
    lost = [(x, t) for x, t in acked if x not in have]
    kept = [t for x, t in acked if x in have]
    newest = max(t for _x, t in acked)
    return {
        "acknowledged": len(acked),
        "lost": len(lost),
        "rpo_s": round(newest - max(kept), 3) if lost and kept else (0.0 if not lost else None),
        "receiver_exit": code[0] if code else None,
        "lost_xids": [lost[0][0], lost[-1][0]] if lost else [],  # first, last
        "acked_xids": [acked[0][0], acked[-1][0]],
    }


def run(quick: bool) -> dict[str, Any]:
    from pyrage import x25519

    from strongroom.engines.postgres.wal import names
    from strongroom.engines.postgres.wal.config import load_wal_config, write_wal_config
    from strongroom.engines.postgres.wal.receive import Receiver, pg_receivewal
    from strongroom.engines.postgres.wal.store import wal_key
    from strongroom.sandbox._process import make_temp_dir, remove_dir
    from strongroom.sandbox.postgres import PostgresServer, chown_to_postgres

    rows = 1_000_000 if quick else 5_000_000
    root = make_temp_dir("walrecv-bench")
    chown_to_postgres(root, 0o755)
    server = PostgresServer(root / "src")
    server.start()
    try:
        env = server.libpq_env()
        env.pop("PGDATABASE", None)
        for slot in ("bench_raw", "bench_recv"):
            server.psql(f"SELECT pg_create_physical_replication_slot('{slot}', true)")
        start = names.parse_lsn(
            server.psql("SELECT restart_lsn FROM pg_replication_slots WHERE slot_name='bench_raw'")
        )
        server.psql(
            "CREATE TABLE r AS SELECT g, md5(random()::text) || md5(random()::text) AS t "
            f"FROM generate_series(1, {rows}) g"
        )
        end = names.parse_lsn(server.psql("SELECT pg_switch_wal()"))
        seg = 16 * MIB
        first = start // seg
        last_done = (end - 1) // seg  # the switch completed this segment
        wal_bytes = (last_done + 1 - first) * seg

        raw_dir = root / "raw"
        raw_dir.mkdir()
        t0 = time.monotonic()
        subprocess.run(
            [
                pg_receivewal(),
                "--slot",
                "bench_raw",
                "--directory",
                str(raw_dir),
                "--no-loop",
                "--no-password",
                f"--endpos={names.format_lsn(end)}",
            ],
            env=env,
            check=True,
            capture_output=True,
        )
        raw_s = time.monotonic() - t0

        repo_dir = root / "repo"
        key = x25519.Identity.generate()
        config = write_wal_config(
            root / "wal.toml",
            target="bench",
            repository=bench_config(kind="local", path=str(repo_dir)),
            recipients=[str(key.to_public())],
        )
        repo = bench_repo(repo_dir)
        last_name = names.segment_name(1, last_done)
        receiver = Receiver(
            load_wal_config(str(config)), root / "spool", slot="bench_recv", env=env
        )
        t0 = time.monotonic()
        code = receiver.run(
            poll_s=0.02,
            until=lambda: repo.exists(wal_key("bench", last_name)) or time.monotonic() - t0 > 600,
        )
        recv_s = time.monotonic() - t0
        if code != 0 or not repo.exists(wal_key("bench", last_name)):
            raise RuntimeError(f"receiver did not store {last_name} (exit {code})")
    finally:
        server.stop()
        remove_dir(root)
    result = {
        "quick": quick,
        "wal_mib": round(wal_bytes / MIB, 1),
        "segments": last_done + 1 - first,
        "pg_receivewal_s": round(raw_s, 3),
        "receive_s": round(recv_s, 3),
        "pg_receivewal_mib_s": round(wal_bytes / MIB / raw_s, 1),
        "receive_mib_s": round(wal_bytes / MIB / recv_s, 1),
        "stored_mib": round(receiver.stats.bytes_out / MIB, 1),
    }
    load_s = 3.0 if quick else 10.0
    async_run = kill_under_load(False, load_s)
    sync_run = kill_under_load(True, load_s)
    result["rpo_async_s"] = async_run["rpo_s"]
    result["lost_commits_async"] = async_run["lost"]
    result["lost_commits_sync"] = sync_run["lost"]
    result["kill_runs"] = {"load_s": load_s, "async": async_run, "sync": sync_run}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("wal-receive-quick.json" if quick else "wal-receive.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smaller WAL backlog")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.quick), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
