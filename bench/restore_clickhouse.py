"""Benchmark strongroom's ClickHouse restore against a raw Native insert of the same data.

    python -m bench.restore_clickhouse [--quick] [--server 18|26] [--jobs N]

One throwaway server (18: Debian's clickhouse-server 18.16, ``strongroom.sandbox.clickhouse``;
26: ClickHouse 26.9 from chdb-core, ``strongroom.sandbox.clickhouse_modern``) gets a source
database of three MergeTree tables built from ``bench.clickhouse_bench``'s rows: one
partitioned by day (several partitions), one unpartitioned, one partitioned by a hash
bucket (quick ~50 MB of Native, full ~1 GB). strongroom backs it up (untimed) into a local
repository (age, zstd 3), and every table is exported once (untimed) the way an operator
keeps a dump: ``clickhouse-client --query "SELECT * FROM t FORMAT Native" | zstd -3 -T0 > f``.
Then, in the same run, alternating the order each repeat:

- ``raw`` (the baseline): a fresh database, each table created with ``clickhouse-client
  --query "CREATE TABLE ..."`` and filled with ``zstd -dc f | clickhouse-client --query
  "INSERT INTO db.t FORMAT Native"``, table after table (the loop an operator scripts;
  two processes per table, no shell, no Python in the data path);
- ``raw_parallel`` (shown, not the ratio's base): the same inserts, ``jobs`` at a time;
- ``raw_http`` (shown): the same loop over HTTP, ``zstd -dc f | curl -X POST -T - 'http://
  .../?query=INSERT ... FORMAT Native'`` (the machine's clickhouse-client is 18.16's, old
  for a 26.x server; this is the baseline without it);
- ``strongroom``: ``python -m bench.restore_clickhouse --child``, a new interpreter that
  calls ``restore_clickhouse()`` with ``target_database`` (a new database): the whole
  process lifetime is timed, so start-up, imports, the signature and seal checks, plan,
  decryption, both SHA-256 checks, the staging tables, fingerprint checks and the swap
  all count.

Each restored database is checked (row count and content fingerprint equal to the source)
and dropped. Every sample records the CPU of the tools (``tool_cpu_s``), of the server
(``server_cpu_s``) and of everything else on the host (``other_cpu_s``, ``bench.cpu``); a
sample waits up to 5 s for a quiet host first and is re-run once when other work used more
than 10 % of the CPUs meanwhile (the less disturbed attempt counts: ``final``). Medians
over repeats (quick 1, full 3). Writes ``bench/results/restore-clickhouse.json``
(``--quick``: ``...-quick.json``; ``--server 26``: ``restore-clickhouse-26[-quick].json``);
``run()`` is the section other benchmarks assemble.
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
import urllib.parse
from pathlib import Path
from typing import Any

from bench.clickhouse_bench import FILL, log
from bench.cpu import CpuMeter, is_disturbed, wait_quiet

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SOURCE_DB = "src"
LEVEL = 3
# shielding from a shared machine (see bench/README.md): wait (a little) for a quiet host
# before a sample, re-run one during which other work used more than DISTURBED of the
# CPUs; of the attempts, the least disturbed counts
QUIET = 0.15
QUIET_TIMEOUT_S = 5.0
DISTURBED = 0.10
RETRIES = 1
# rows per table: ~80 bytes of Native per row
FULL_ROWS = {"events_by_day": 6_000_000, "plain": 4_000_000, "by_bucket": 2_500_000}
QUICK_ROWS = {"events_by_day": 300_000, "plain": 200_000, "by_bucket": 125_000}
COLUMNS = (
    "(id UInt64, ts DateTime, user UInt32, kind String, url String, value Float64, token String)"
)
LAYOUT = {
    "events_by_day": "ENGINE = MergeTree PARTITION BY toYYYYMMDD(ts) ORDER BY id",
    "plain": "ENGINE = MergeTree ORDER BY id",
    "by_bucket": "ENGINE = MergeTree PARTITION BY user % 4 ORDER BY (user, id)",
}


def default_jobs() -> int:
    from strongroom.engines.clickhouse.parallel import default_jobs as engine_default

    return engine_default()


# --- the child: one strongroom restore in its own process ---------------------------------


def child() -> int:
    t_entry = time.time()
    job = json.loads(sys.stdin.read())
    from pydantic import SecretStr

    from bench.signing import bench_repo
    from strongroom.config import EncryptionConfig
    from strongroom.engines.clickhouse.conn import ClickHouseConnection
    from strongroom.engines.clickhouse.restore import ChRestoreRequest, restore_clickhouse

    t_imported = time.time()
    conn = ClickHouseConnection(
        name="bench", http_port=job["http_port"], port=job["tcp_port"], read_timeout=3600
    )
    request = ChRestoreRequest(
        databases=[job["source_db"]], target_database=job["target_db"], jobs=job["jobs"]
    )
    report = restore_clickhouse(
        conn,
        bench_repo(job["repo"]),
        EncryptionConfig(identities=[SecretStr(job["identity"])]),
        request,
    )
    json.dump(
        {
            "import_s": round(t_imported - t_entry, 3),
            "in_process_s": report["duration_s"],
            "rows": report["rows"],
            "fingerprints_ok": report["fingerprints_ok"],
            "jobs": report.get("jobs"),
        },
        sys.stdout,
    )
    return 0


# --- the dataset and the baseline ---------------------------------------------------------


class Bench:
    def __init__(self, server: Any, work: Path, jobs: int) -> None:
        from strongroom.engines.clickhouse.conn import ClickHouseConnection
        from strongroom.engines.clickhouse.http_client import ClickHouseHTTP

        self.server = server
        self.work = work
        self.jobs = jobs
        self.client = ClickHouseHTTP(
            ClickHouseConnection(name="bench", http_port=server.http_port, read_timeout=3600)
        )
        self.dumps = work / "dumps"
        self.creates: dict[str, str] = {}

    def ch_client(self, query: str) -> list[str]:
        return [
            "clickhouse-client",
            "--host",
            self.server.host,
            "--port",
            str(self.server.tcp_port),
            "--query",
            query,
        ]

    def build(self, rows: dict[str, int]) -> int:
        """The source database; returns its Native size (bytes)."""
        self.client.execute(f"CREATE DATABASE {SOURCE_DB}")
        for table, count in rows.items():
            self.client.execute(f"CREATE TABLE {SOURCE_DB}.{table} {COLUMNS} {LAYOUT[table]}")
            self.client.execute(FILL.format(db=SOURCE_DB, table=table, rows=count))
            self.client.execute(f"OPTIMIZE TABLE {SOURCE_DB}.{table} FINAL")
        self.wait_quiet()
        return int(
            self.client.tuples(
                "SELECT sum(data_uncompressed_bytes) FROM system.parts "
                f"WHERE database = '{SOURCE_DB}' AND active"
            )[0][0]
        )

    def wait_quiet(self) -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and int(
            self.client.tuples("SELECT count() FROM system.merges")[0][0]
        ):
            time.sleep(0.5)

    def partitions(self) -> int:
        return int(
            self.client.tuples(
                "SELECT uniqExact(table, partition_id) FROM system.parts "
                f"WHERE database = '{SOURCE_DB}' AND active"
            )[0][0]
        )

    def dump(self, tables: list[str]) -> int:
        """One ``.native.zst`` per table, as an operator's dump; returns the bytes written."""
        self.dumps.mkdir(exist_ok=True)
        written = 0
        for table in tables:
            body = self.client.execute(f"SHOW CREATE TABLE {SOURCE_DB}.{table} FORMAT TSVRaw")
            self.creates[table] = body.decode().strip()
            target = self.dumps / f"{table}.native.zst"
            with open(target, "wb") as sink:
                select = subprocess.Popen(
                    self.ch_client(f"SELECT * FROM {SOURCE_DB}.{table} FORMAT Native"),
                    stdout=subprocess.PIPE,
                )
                assert select.stdout is not None
                zstd = subprocess.Popen(
                    ["zstd", "-T0", f"-{LEVEL}", "-q", "-c"], stdin=select.stdout, stdout=sink
                )
                select.stdout.close()
                if select.wait() != 0 or zstd.wait() != 0:
                    raise RuntimeError(f"dump of {table} failed")
            written += target.stat().st_size
        return written

    def _insert(self, db: str, table: str, http: bool) -> list[subprocess.Popen[bytes]]:
        zstd = subprocess.Popen(
            ["zstd", "-dc", "-q", str(self.dumps / f"{table}.native.zst")],
            stdout=subprocess.PIPE,
        )
        assert zstd.stdout is not None
        query = f"INSERT INTO {db}.{table} FORMAT Native"
        if http:  # chunked upload from stdin (``--data-binary @-`` would buffer it whole)
            url = f"{self.server.http_url}?" + urllib.parse.urlencode({"query": query})
            cmd = ["curl", "-sS", "--fail", "-X", "POST", "-T", "-", url]
        else:
            cmd = self.ch_client(query)
        insert = subprocess.Popen(cmd, stdin=zstd.stdout, stdout=subprocess.DEVNULL)
        zstd.stdout.close()
        return [zstd, insert]

    def cpu(self) -> tuple[float]:
        """CPU seconds so far of this process's finished children (the tools)."""
        import resource

        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (usage.ru_utime + usage.ru_stime,)

    def raw(self, db: str, jobs: int, *, http: bool = False) -> float:
        """CREATE DATABASE, CREATE TABLE and the inserts, ``jobs`` tables at a time."""
        os.sync()
        started = time.perf_counter()
        subprocess.run(self.ch_client(f"CREATE DATABASE {db}"), check=True)
        for table, create in self.creates.items():
            statement = create.replace(f"{SOURCE_DB}.{table}", f"{db}.{table}", 1)
            subprocess.run(self.ch_client(statement), check=True)
        pending = list(self.creates)
        running: list[list[subprocess.Popen[bytes]]] = []
        failed = False
        while pending or running:
            while pending and len(running) < jobs:
                running.append(self._insert(db, pending.pop(0), http))
            procs = running.pop(0)
            failed |= any(p.wait() != 0 for p in procs)
        took = time.perf_counter() - started
        if failed:
            raise RuntimeError(f"raw insert into {db} failed")
        return took

    def strongroom(self, db: str, repo: Path, identity: str) -> tuple[float, dict[str, Any]]:
        job = {
            "http_port": self.server.http_port,
            "tcp_port": self.server.tcp_port,
            "repo": str(repo),
            "identity": identity,
            "source_db": SOURCE_DB,
            "target_db": db,
            "jobs": self.jobs,
        }
        os.sync()
        started = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.restore_clickhouse", "--child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=Path(__file__).resolve().parents[1],
        )
        out, _ = proc.communicate(json.dumps(job).encode())
        took = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"strongroom restore into {db} failed (exit {proc.returncode})")
        return took, json.loads(out)

    def fingerprint(self, db: str) -> dict[str, Any]:
        from strongroom.engines.clickhouse import inspection

        out = {}
        for table in self.creates:
            columns = [
                (str(n), str(t))
                for n, t in self.client.tuples(
                    f"SELECT name, type FROM system.columns WHERE database = '{db}' "
                    f"AND table = '{table}'"
                )
            ]
            out[table] = inspection.fingerprint(self.client, db, table, columns, by_partition=False)
        return out

    def drop(self, db: str) -> None:
        self.client.execute(f"DROP DATABASE IF EXISTS {db}")


def _sample(bench: Bench, tool: str, db: str, repo: Path, identity: Any) -> dict[str, Any]:
    """One timed sample (after waiting for a quiet host), its CPU and its result's
    fingerprint; the restored database is dropped again."""
    waited, busy = wait_quiet(QUIET, timeout=QUIET_TIMEOUT_S)
    meter = CpuMeter(bench.server.proc.pid)
    sample: dict[str, Any] = {"tool": tool, "waited_s": round(waited, 1), "busy": round(busy, 2)}
    tool_before = bench.cpu()[0]
    before = meter.snapshot()
    if tool == "strongroom":
        took, child_out = bench.strongroom(db, repo, str(identity))
        sample.update(child_out)
    else:
        took = bench.raw(db, bench.jobs if tool == "raw_parallel" else 1, http=tool == "raw_http")
    tool_cpu = bench.cpu()[0] - tool_before
    cpu = meter.delta(before, tool_cpu)
    sample.update(
        wall_s=round(took, 3),
        tool_cpu_s=round(tool_cpu, 2),
        server_cpu_s=round(cpu["postgres_cpu_s"], 2),  # CpuMeter's name for the server
        other_cpu_s=round(cpu["other_cpu_s"], 2),
        ok=True,
    )
    sample["disturbed"] = is_disturbed(sample, DISTURBED)
    sample["fingerprint"] = bench.fingerprint(db)
    bench.drop(db)
    bench.wait_quiet()
    return sample


def _server(version: str, base: Path) -> Any:
    if version == "26":
        from strongroom.sandbox.clickhouse_modern import ModernClickHouseServer

        return ModernClickHouseServer(base)
    from strongroom.sandbox.clickhouse import ClickHouseServer

    return ClickHouseServer(base)


def _backup(bench: Bench, work: Path, recipient: str) -> Path:
    from bench.signing import bench_config, bench_repo
    from strongroom.config import EncryptionConfig
    from strongroom.engines.clickhouse.backup import backup_clickhouse
    from strongroom.engines.clickhouse.conn import ClickHouseConnection

    repo = work / "repo"
    conn = ClickHouseConnection(
        name="bench",
        http_port=bench.server.http_port,
        port=bench.server.tcp_port,
        databases=[SOURCE_DB],
        read_timeout=3600,
    )
    backup_clickhouse(
        conn,
        bench_repo(repo),
        bench_config(kind="local", path=str(repo), compression_level=LEVEL),
        EncryptionConfig(recipients=[recipient]),
        full=True,
    )
    return repo


def run(
    quick: bool, workdir: Path, *, server_version: str = "18", jobs: int | None = None
) -> dict[str, Any]:
    """Build, back up, then time raw inserts and strongroom restores; returns the figures."""
    from pyrage import x25519

    rows = QUICK_ROWS if quick else FULL_ROWS
    repeats = 1 if quick else 3
    jobs = jobs or default_jobs()
    work = Path(tempfile.mkdtemp(prefix="restore-ch-", dir=workdir))
    server = _server(server_version, work / "server")
    (work / "server").mkdir()
    samples: list[dict[str, Any]] = []
    try:
        server.start()
        bench = Bench(server, work, jobs)
        version = str(bench.client.tuples("SELECT version()")[0][0])
        log(f"ClickHouse {version} on :{server.http_port}, jobs {jobs}")
        t0 = time.perf_counter()
        native = bench.build(rows)
        log(
            f"built {sum(rows.values())} rows ({native / 2**20:.0f} MiB Native) "
            f"in {time.perf_counter() - t0:.1f} s"
        )
        identity = x25519.Identity.generate()
        t0 = time.perf_counter()
        repo = _backup(bench, work, str(identity.to_public()))
        dumped = bench.dump(list(rows))
        log(f"backup and dumps in {time.perf_counter() - t0:.1f} s")
        expected = bench.fingerprint(SOURCE_DB)
        for index in range(repeats):
            order = ["raw", "raw_parallel", "raw_http", "strongroom"]
            if index % 2:
                order.reverse()
            for tool in order:
                for attempt in range(1 + RETRIES):
                    sample = _sample(bench, tool, f"r{index}_{tool}_{attempt}", repo, identity)
                    sample.update(repeat=index, attempt=attempt)
                    sample["ok"] = sample["ok"] and sample.pop("fingerprint") == expected
                    samples.append(sample)
                    log(
                        f"repeat {index} {tool}: {sample['wall_s']:.2f} s, cpu "
                        f"{sample['tool_cpu_s']} + server {sample['server_cpu_s']} (other "
                        f"{sample['other_cpu_s']}), ok={sample['ok']}"
                    )
                    if not sample["disturbed"]:
                        break
                tries = [x for x in samples if x["tool"] == tool and x["repeat"] == index]
                min(tries, key=lambda x: x["other_cpu_s"] / max(x["wall_s"], 0.01))["final"] = True
        partitions = bench.partitions()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    final = [s for s in samples if s.get("final")]

    def median(tool: str) -> float:
        return round(statistics.median(s["wall_s"] for s in final if s["tool"] == tool), 3)

    def cpu(tool: str) -> float:
        return round(
            statistics.median(
                s["tool_cpu_s"] + s["server_cpu_s"] for s in final if s["tool"] == tool
            ),
            2,
        )

    raw_s, par_s, sr_s = median("raw"), median("raw_parallel"), median("strongroom")
    http_s = median("raw_http")
    return {
        "benchmark": "restore-clickhouse",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": quick,
        "server": f"ClickHouse {version}",
        "clickhouse_server_version": version,
        "clickhouse_mib": round(native / 2**20, 1),
        "clickhouse_dump_zst_mib": round(dumped / 2**20, 1),
        "clickhouse_tables": len(rows),
        "clickhouse_partitions": partitions,
        "rows": sum(rows.values()),
        "repeats": repeats,
        "cpus": os.cpu_count(),
        "jobs": jobs,
        "raw_baseline": "per table, one after the other: zstd -dc t.native.zst | "
        "clickhouse-client --query 'INSERT INTO db.t FORMAT Native' (CREATE DATABASE/TABLE "
        "by clickhouse-client included)",
        "clickhouse_raw_insert_s": raw_s,
        "clickhouse_raw_insert_parallel_s": par_s,
        "clickhouse_restore_s": sr_s,
        "clickhouse_restore_over_raw_insert": round(sr_s / raw_s, 3),
        "clickhouse_restore_over_raw_parallel_insert": round(sr_s / par_s, 3),
        "clickhouse_raw_http_insert_s": http_s,
        "clickhouse_restore_over_raw_http_insert": round(sr_s / http_s, 3),
        # CPU of the tools plus the server: what each costs, even on a busy host
        "clickhouse_raw_insert_cpu_s": cpu("raw"),
        "clickhouse_restore_cpu_s": cpu("strongroom"),
        "clickhouse_restore_over_raw_insert_cpu": round(cpu("strongroom") / cpu("raw"), 3),
        "paired_ratios": [
            round(s["wall_s"] / r["wall_s"], 3)
            for s in final
            if s["tool"] == "strongroom"
            for r in final
            if r["tool"] == "raw" and r["repeat"] == s["repeat"]
        ],
        "disturbed_final_samples": sum(1 for s in final if s["disturbed"]),
        "all_ok": all(s["ok"] for s in samples),
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.restore_clickhouse",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="~50 MB, 1 repeat")
    parser.add_argument("--server", choices=("18", "26"), default="18")
    parser.add_argument("--jobs", type=int, default=None, help="default: from the cores")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child()
    result = run(
        args.quick, Path(tempfile.gettempdir()), server_version=args.server, jobs=args.jobs
    )
    RESULTS_DIR.mkdir(exist_ok=True)
    suffix = "" if args.server == "18" else f"-{args.server}"
    name = f"restore-clickhouse{suffix}{'-quick' if args.quick else ''}.json"
    (RESULTS_DIR / name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    return 0 if result["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
