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
