"""Benchmark strongroom on a modern ClickHouse (26.x) with the realistic dataset, in one run:
the full logical backup against the raw pipeline, the server's native BACKUP method, and
an incremental after one of twelve partitions changed.

    python -m bench.clickhouse_modern_bench            # 3M rows, 3 rounds
    python -m bench.clickhouse_modern_bench --quick    # 300k rows, 1 round: smoke test

A throwaway 26.9 server (``strongroom.sandbox.clickhouse_modern``, chdb-core) gets the
dataset of ``strongroom.sandbox.gauntlet_ch26`` (Map, named Tuple, JSON, Variant, Dynamic,
aggregate states, dictionaries, projections, materialized views; the fact table in 12
monthly partitions). A moto S3 server takes the native method's BACKUP. Each round, in
alternating order where it matters:

- ``raw``: for every table that stores data, ``curl`` POSTs ``SELECT * ... FORMAT
  Native`` to the HTTP interface and pipes it into ``zstd -T0 -3`` (two processes per
  table, no Python, no shell); the tables one after the other, like strongroom;
- ``full``: ``backup_clickhouse(full=True)`` into a local repository (age, zstd 3), timed
  in the call; it also fingerprints every partition on the server and checks part sets;
- ``native``: the same call with ``method="native"`` into the moto bucket (the server's
  ``BACKUP DATABASE ... TO S3``, objects read back, recorded and signed by strongroom);
- ``incremental``: every row of one fact partition changes (``ALTER UPDATE ... IN
  PARTITION``), then ``backup_clickhouse()`` builds on that round's full;
- ``incremental_insert``: 20,000 late rows go into that partition (its materialized
  views change too, as they would), and the next incremental builds on the previous.

Writes ``bench/results/clickhouse-modern.json`` (``--quick``: ``...-modern-quick.json``).
Medians over rounds; ratios are of medians. moto is a test server (about 100 MB/s up on
loopback), so ``native_backup_s`` measures the method through it, not S3 itself.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LEVEL = 3
CHANGED_ROWS = 20_000


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _data_tables(client: Any, databases: list[str]) -> list[tuple[str, str]]:
    from strongroom.engines.clickhouse import inspection
    from strongroom.engines.clickhouse.sql import quote_string

    listed = ", ".join(quote_string(d) for d in databases)
    rows = client.tuples(
        f"SELECT database, name, engine FROM system.tables WHERE database IN ({listed})"
    )
    return [(str(d), str(n)) for d, n, e in rows if inspection.stores_data(str(e))]


def raw_export(http_url: str, tables: list[tuple[str, str]], work: Path) -> dict[str, Any]:
    """curl | zstd per table; returns seconds and bytes written."""
    from strongroom.engines.clickhouse.sql import qualified

    out = work / "raw"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    os.sync()
    started = time.perf_counter()
    written = 0
    for index, (db, table) in enumerate(tables):
        target = out / f"{index}.native.zst"
        query = f"SELECT * FROM {qualified(db, table)} FORMAT Native"
        with open(target, "wb") as sink:
            curl = subprocess.Popen(
                ["curl", "-sS", "--fail", "--data-binary", "@-", http_url],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            assert curl.stdin is not None
            zstd = subprocess.Popen(
                ["zstd", "-T0", f"-{LEVEL}", "-q", "-c"], stdin=curl.stdout, stdout=sink
            )
            assert curl.stdout is not None
            curl.stdout.close()
            curl.stdin.write(query.encode())
            curl.stdin.close()
            if curl.wait() != 0 or zstd.wait() != 0:
                raise RuntimeError(f"raw export of {db}.{table} failed")
        written += target.stat().st_size
    return {"wall_s": round(time.perf_counter() - started, 3), "stored_size": written}


class Run:
    """One server, one dataset, the repositories; one method per call."""

    def __init__(self, server: Any, moto: Any, work: Path, databases: list[str]) -> None:
        from pyrage import x25519

        from strongroom.config import EncryptionConfig

        self.server = server
        self.moto = moto
        self.work = work
        self.databases = databases
        self.enc = EncryptionConfig(recipients=[str(x25519.Identity.generate().to_public())])
        self.local = work / "repo"

    def conn(self, **extra: Any) -> Any:
        from strongroom.engines.clickhouse.conn import ClickHouseConnection

        return ClickHouseConnection(
            name="bench",
            host=self.server.host,
            port=self.server.tcp_port,
            http_port=self.server.http_port,
            databases=self.databases,
            read_timeout=3600,
            **extra,
        )

    def logical(self, *, full: bool) -> Any:
        from bench.signing import bench_config, bench_repo
        from strongroom.engines.clickhouse.backup import backup_clickhouse

        repo = bench_repo(self.local)
        config = bench_config(kind="local", path=str(self.local), compression_level=LEVEL)
        os.sync()
        started = time.perf_counter()
        manifest = backup_clickhouse(self.conn(), repo, config, self.enc, full=full)
        return manifest, time.perf_counter() - started

    def native(self) -> tuple[Any, float]:
        import boto3
        from pydantic import SecretStr

        from bench.signing import bench_config, bench_trust
        from strongroom.engines.clickhouse.backup import backup_clickhouse
        from strongroom.repository.s3 import S3Repository

        bucket = f"bench-{uuid.uuid4().hex[:10]}"
        boto3.client(
            "s3",
            endpoint_url=self.moto.endpoint_url,
            aws_access_key_id=self.moto.access_key,
            aws_secret_access_key=self.moto.secret_key,
            region_name="us-east-1",
        ).create_bucket(Bucket=bucket)
        config = bench_config(
            kind="s3",
            bucket=bucket,
            endpoint_url=self.moto.endpoint_url,
            access_key_id=self.moto.access_key,
            secret_access_key=SecretStr(self.moto.secret_key),
        )
        repo = S3Repository(config, trust=bench_trust())
        started = time.perf_counter()
        manifest = backup_clickhouse(self.conn(method="native"), repo, config, self.enc)
        return manifest, time.perf_counter() - started

    def middle_partition(self, fact: str) -> str:
        ids = sorted(
            self.server.query(f"SELECT DISTINCT _partition_id FROM {fact} FORMAT TSV").split()
        )
        return ids[len(ids) // 2]

    def update_one_partition(self, fact: str, pid: str) -> None:
        """Every row of one partition changes (a mutation: materialized views, which only
        see INSERTs, do not change)."""
        self.server.query(
            f"ALTER TABLE {fact} UPDATE flag = NOT flag IN PARTITION ID '{pid}' WHERE 1 "
            "SETTINGS mutations_sync = 2"
        )

    def insert_into_one_partition(self, fact: str, pid: str) -> None:
        """Late rows for one partition: its materialized views get rows too (the inner
        table's partition, and the unpartitioned AggregatingMergeTree the TO view fills)."""
        self.server.query(
            f"INSERT INTO {fact} SELECT * FROM {fact} "
            f"WHERE _partition_id = '{pid}' LIMIT {CHANGED_ROWS}"
        )


def _incremental_sample(inc: Any, seconds: float, fact_table: str) -> dict[str, Any]:
    own = _own(inc)
    data = [a for a in own if a.meta.get("table")]
    return {
        "wall_s": round(seconds, 3),
        "stored_size": sum(a.stored_size for a in own),
        "exported": sorted(
            f"{a.meta['table']}:{a.meta.get('partition_id') or 'all'}" for a in data
        ),
        "referenced_artifacts": inc.details["incremental"]["reused_artifacts"],
        "fact_partitions_exported": sorted(
            str(a.meta.get("partition_id")) for a in data if a.meta.get("table") == fact_table
        ),
        "base_backup_id": inc.details.get("base_backup_id"),
    }


def _own(manifest: Any) -> list[Any]:
    from strongroom.catalog import owner_of

    return [a for a in manifest.artifacts if owner_of(a) == manifest.backup_id]


def run(quick: bool, rounds: int) -> dict[str, Any]:
    from strongroom.engines.clickhouse.conn import ClickHouseConnection
    from strongroom.engines.clickhouse.http_client import ClickHouseHTTP
    from strongroom.engines.clickhouse.sql import qualified
    from strongroom.sandbox import gauntlet_ch26 as data
    from strongroom.sandbox.clickhouse_modern import ModernClickHouseServer
    from tests.fixtures.s3 import MotoServer

    work = Path(tempfile.mkdtemp(prefix="strongroom-bench-ch26-"))
    server = ModernClickHouseServer(work / "server")
    (work / "moto").mkdir()
    moto = MotoServer(work / "moto")
    samples: list[dict[str, Any]] = []
    try:
        server.start()
        moto.start()
        version = server.query("SELECT version()").strip()
        client = ClickHouseHTTP(
            ClickHouseConnection(name="fill", http_port=server.http_port, read_timeout=3600)
        )
        loaded = data.load_ch26(client, rows=300_000 if quick else data.FACT_ROWS)
        log(f"ClickHouse {version}: dataset {loaded}")
        databases = [data.MAIN_DB, data.AUX_DB]
        tables = _data_tables(client, databases)
        fact = qualified(data.MAIN_DB, data.FACT)
        bench = Run(server, moto, work, databases)
        log("warm-up")
        raw_export(server.http_url, tables, work)
        bench.logical(full=True)
        for index in range(rounds):
            order = ["raw", "full"] if index % 2 == 0 else ["full", "raw"]
            sample: dict[str, Any] = {"round": index}
            for tool in order:
                if tool == "raw":
                    sample["raw"] = raw_export(server.http_url, tables, work)
                else:
                    full, full_s = bench.logical(full=True)
                    sample["full"] = {
                        "wall_s": round(full_s, 3),
                        "stored_size": full.stored_size,
                        "raw_size": full.raw_size,
                    }
            pid = bench.middle_partition(fact)
            sample["changed_partition"] = pid
            bench.update_one_partition(fact, pid)
            inc, inc_s = bench.logical(full=False)
            sample["incremental"] = _incremental_sample(inc, inc_s, data.FACT)
            bench.insert_into_one_partition(fact, pid)
            inc, inc_s = bench.logical(full=False)
            sample["incremental_insert"] = _incremental_sample(inc, inc_s, data.FACT)
            native, native_s = bench.native()
            sample["native"] = {"wall_s": round(native_s, 3), "stored_size": native.stored_size}
            samples.append(sample)
            log(f"round {index}: {json.dumps(sample)}")
    finally:
        moto.stop()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    def median(tool: str, field: str = "wall_s") -> float:
        return round(statistics.median(s[tool][field] for s in samples), 3)

    full_s, raw_s, incr_s = median("full"), median("raw"), median("incremental")
    changed = samples[-1]["incremental"]["fact_partitions_exported"]
    return {
        "benchmark": "clickhouse-modern",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "server_version": version,
        "rows": loaded["rows"],
        "dataset": loaded,
        "rounds": rounds,
        "full_s": full_s,
        "raw_native_zstd_s": raw_s,
        "full_over_raw": round(full_s / raw_s, 3),
        "native_backup_s": median("native"),
        "incr_changed_partitions": len(changed),
        "incr_changed_partition_ids": changed,
        "incr_s": incr_s,
        "incr_stored_over_full": round(
            median("incremental", "stored_size") / median("full", "stored_size"), 4
        ),
        "incr_time_over_full": round(incr_s / full_s, 3),
        "incr_insert_stored_over_full": round(
            median("incremental_insert", "stored_size") / median("full", "stored_size"), 4
        ),
        "incr_insert_time_over_full": round(median("incremental_insert") / full_s, 3),
        "stored_bytes": {
            "raw": median("raw", "stored_size"),
            "full": median("full", "stored_size"),
            "incremental": median("incremental", "stored_size"),
            "incremental_insert": median("incremental_insert", "stored_size"),
            "native": median("native", "stored_size"),
        },
        "samples": samples,
        "notes": [
            "full: strongroom logical backup (age + zstd 3 + sha256 + server fingerprints), "
            "timed in the call; raw: curl | zstd -T0 -3 per table over HTTP, no encryption",
            "incremental (incr_*): after every row of one of the 12 fact partitions changed "
            "(ALTER UPDATE ... IN PARTITION); stored bytes are the artifacts it wrote",
            "incremental_insert (incr_insert_*): after 20,000 late rows went into that "
            "partition; its materialized views change too, and the unpartitioned "
            "AggregatingMergeTree their TO view fills is exported whole (partition-level "
            "incrementals cannot split it; part-level ones could)",
            "native: BACKUP DATABASE ... TO S3 into a moto server (a test server, "
            "not a throughput target), plus read-back, recording and signing",
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300k rows, 1 round")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    result = run(args.quick, rounds)
    name = "clickhouse-modern-quick.json" if args.quick else "clickhouse-modern.json"
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / name).write_text(json.dumps(result, indent=2) + "\n")
    keys = [
        "server_version",
        "rows",
        "full_s",
        "raw_native_zstd_s",
        "full_over_raw",
        "native_backup_s",
        "incr_changed_partitions",
        "incr_stored_over_full",
        "incr_time_over_full",
    ]
    for key in keys:
        print(f"{key:>26}: {result[key]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
