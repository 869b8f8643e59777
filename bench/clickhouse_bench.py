"""Benchmark strongroom's ClickHouse backup against the raw pipeline, in the same run.

    python -m bench.clickhouse_bench            # 20M rows (~1.6 GB Native), 5 rounds
    python -m bench.clickhouse_bench --quick    # 1M rows, 2 rounds: smoke test

A throwaway ClickHouse server (``strongroom.sandbox.clickhouse``) gets one MergeTree
table, filled on the server and merged into one part (``OPTIMIZE ... FINAL``), so
the table is quiet. Then one untimed warm-up of each tool and interleaved rounds
(the order alternates):

- ``raw``: ``clickhouse-client --query "SELECT * FROM t FORMAT Native" | zstd -T0 -3 > file``
  (two processes, no shell);
- ``strongroom``: ``python -m bench.clickhouse_bench --child``, a new interpreter that
  calls ``backup_clickhouse()`` (local repository, age recipient, zstd level 3); the
  whole process lifetime is timed, so start-up and imports count. Its work includes
  what raw does not do: SHA-256 twice, encryption, the server-side fingerprint
  (count + sum(cityHash64(...)), run concurrently with the export) and the
  before/after part-set check.

Peak RSS is each process's own high-water mark (VmHWM for strongroom, wait4's
ru_maxrss for the raw tools). In the full run strongroom is also timed once on a
1M-row table, to show its memory does not grow with the data.
Results: ``bench/results/clickhouse-backup.json`` (``--quick``: ``...-quick.json``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FULL_ROWS = 20_000_000
QUICK_ROWS = 1_000_000
SMALL_ROWS = 1_000_000
DATABASE = "bench"
LEVEL = 3

FILL = """
INSERT INTO {db}.{table} SELECT number, toDateTime('2024-01-01 00:00:00') + intDiv(number, 10),
  cityHash64(number) % 100000, ['view', 'click', 'buy', 'scroll'][number % 4 + 1],
  concat('https://example.com/p/', toString(cityHash64(number) % 1000000), '?ref=',
         toString(number % 977)),
  (cityHash64(number) % 100000) / 100, hex(cityHash64(number, 1))
FROM system.numbers LIMIT {rows}
"""
SCHEMA = (
    "CREATE TABLE {db}.{table} (id UInt64, ts DateTime, user UInt32, kind String, url String, "
    "value Float64, token String) ENGINE = MergeTree ORDER BY id"
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


def _host_busy_s() -> float:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _proc_cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait(proc: subprocess.Popen[Any]) -> tuple[int, resource.struct_rusage]:
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage


# --- the child: one strongroom backup in its own process ----------------------------------


def child() -> int:
    t_entry = time.time()
    job = json.loads(sys.stdin.read())
    from bench.signing import bench_config, bench_repo
    from strongroom.config import EncryptionConfig
    from strongroom.engines.clickhouse.backup import backup_clickhouse
    from strongroom.engines.clickhouse.conn import ClickHouseConnection

    t_imported = time.time()
    out = Path(job["out_dir"])
    conn = ClickHouseConnection(
        name="bench", http_port=job["http_port"], port=job["tcp_port"], databases=[job["db"]]
    )
    manifest = backup_clickhouse(
        conn,
        bench_repo(out),
        bench_config(kind="local", path=str(out), compression_level=LEVEL),
        EncryptionConfig(recipients=[job["recipient"]]),
    )
    tables = manifest.details["databases"][0]["tables"]
    json.dump(
        {
            "import_s": t_imported - t_entry,
            "in_process_s": manifest.duration_s,
            "rows": sum(t["rows"] or 0 for t in tables),
            "raw_size": manifest.raw_size,
            "stored_size": manifest.stored_size,
            "self_hwm_kib": _hwm_kib(),
        },
        sys.stdout,
    )
    return 0


# --- samples ------------------------------------------------------------------------------


class Bench:
    def __init__(self, server: Any, work: Path, recipient: str) -> None:
        self.server = server
        self.work = work
        self.recipient = recipient

    def _cpu_start(self) -> tuple[float, float]:
        assert self.server.proc is not None
        return _host_busy_s(), _proc_cpu_s(self.server.proc.pid)

    def _cpu_end(self, start: tuple[float, float], tool_cpu: float) -> dict[str, float]:
        assert self.server.proc is not None
        host = _host_busy_s() - start[0]
        server = _proc_cpu_s(self.server.proc.pid) - start[1]
        return {
            "tool_cpu_s": round(tool_cpu, 2),
            "server_cpu_s": round(server, 2),
            "other_cpu_s": round(max(0.0, host - server - tool_cpu), 2),
        }

    def raw(self, db: str, table: str) -> dict[str, Any]:
        target = self.work / "raw.native.zst"
        os.sync()
        cpu = self._cpu_start()
        started = time.perf_counter()
        with open(target, "wb") as sink:
            client = subprocess.Popen(
                [
                    "clickhouse-client",
                    "--host",
                    self.server.host,
                    "--port",
                    str(self.server.tcp_port),
                    "--query",
                    f"SELECT * FROM {db}.{table} FORMAT Native",
                ],
                stdout=subprocess.PIPE,
            )
            assert client.stdout is not None
            zstd = subprocess.Popen(
                ["zstd", "-T0", f"-{LEVEL}", "-q", "-c"], stdin=client.stdout, stdout=sink
            )
            client.stdout.close()
            code_c, use_c = _wait(client)
            code_z, use_z = _wait(zstd)
        wall = time.perf_counter() - started
        tool_cpu = sum(u.ru_utime + u.ru_stime for u in (use_c, use_z))
        size = target.stat().st_size
        target.unlink()
        return {
            "tool": "raw",
            "ok": code_c == 0 and code_z == 0 and size > 0,
            "wall_s": round(wall, 3),
            "stored_size": size,
            "peak_rss_mib": {
                "clickhouse-client": round(use_c.ru_maxrss / 1024, 1),
                "zstd": round(use_z.ru_maxrss / 1024, 1),
            },
            **self._cpu_end(cpu, tool_cpu),
        }

    def strongroom(self, db: str, rows: int) -> dict[str, Any]:
        out = self.work / "repo"
        job = {
            "out_dir": str(out),
            "http_port": self.server.http_port,
            "tcp_port": self.server.tcp_port,
            "db": db,
            "recipient": self.recipient,
        }
        os.sync()
        cpu = self._cpu_start()
        started = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.clickhouse_bench", "--child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=Path(__file__).resolve().parents[1],
        )
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(job).encode())
        proc.stdin.close()
        body = proc.stdout.read()
        code, usage = _wait(proc)
        wall = time.perf_counter() - started
        shutil.rmtree(out, ignore_errors=True)
        result: dict[str, Any] = json.loads(body) if code == 0 and body else {}
        return {
            "tool": "strongroom",
            "ok": code == 0 and result.get("rows") == rows,
            "wall_s": round(wall, 3),
            "in_process_s": result.get("in_process_s"),
            "import_s": round(result.get("import_s", 0.0), 3),
            "raw_size": result.get("raw_size"),
            "stored_size": result.get("stored_size"),
            "peak_rss_mib": {"strongroom": round(result.get("self_hwm_kib", -1) / 1024, 1)},
            **self._cpu_end(cpu, usage.ru_utime + usage.ru_stime),
        }


def _fill(server: Any, table: str, rows: int) -> None:
    from strongroom.engines.clickhouse.conn import ClickHouseConnection
    from strongroom.engines.clickhouse.http_client import ClickHouseHTTP

    client = ClickHouseHTTP(
        ClickHouseConnection(name="fill", http_port=server.http_port, read_timeout=3600)
    )
    client.execute(SCHEMA.format(db=DATABASE, table=table))
    client.execute(FILL.format(db=DATABASE, table=table, rows=rows))
    client.execute(f"OPTIMIZE TABLE {DATABASE}.{table} FINAL")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:  # a quiet table: no merge running or pending
        merges = client.tuples("SELECT count() FROM system.merges")[0][0]
        parts = client.tuples(
            f"SELECT count() FROM system.parts WHERE database = '{DATABASE}' "
            f"AND table = '{table}' AND active"
        )[0][0]
        if int(merges) == 0 and int(parts) == 1:
            return
        client.execute(f"OPTIMIZE TABLE {DATABASE}.{table} FINAL")
        time.sleep(1)


def run(quick: bool, rounds_wanted: int | None = None) -> dict[str, Any]:
    """Start a sandbox server, fill it, time both pipelines; returns (and writes) the figures."""
    from pyrage import x25519

    from strongroom.sandbox.clickhouse import ClickHouseServer

    rows = QUICK_ROWS if quick else FULL_ROWS
    rounds = rounds_wanted or (2 if quick else 5)
    work = Path(tempfile.mkdtemp(prefix="strongroom-bench-ch-"))
    server = ClickHouseServer(work / "server")
    (work / "server").mkdir()
    samples: list[dict[str, Any]] = []
    small: dict[str, Any] | None = None
    try:
        server.start()
        log(f"ClickHouse {server.query('SELECT version()')} on :{server.http_port}")
        server.query(f"CREATE DATABASE {DATABASE}")
        t0 = time.perf_counter()
        _fill(server, "t", rows)
        native_bytes = int(
            server.query(
                "SELECT sum(data_uncompressed_bytes) FROM system.parts "
                f"WHERE database = '{DATABASE}' AND table = 't' AND active"
            )
        )
        took = time.perf_counter() - t0
        log(f"filled {rows} rows ({native_bytes / 2**20:.0f} MiB) in {took:.1f} s")
        bench = Bench(server, work, str(x25519.Identity.generate().to_public()))
        log("warm-up")
        bench.raw(DATABASE, "t")
        bench.strongroom(DATABASE, rows)
        for index in range(rounds):
            order = ["raw", "strongroom"] if index % 2 == 0 else ["strongroom", "raw"]
            for tool in order:
                sample = (
                    bench.raw(DATABASE, "t") if tool == "raw" else bench.strongroom(DATABASE, rows)
                )
                sample["round"] = index
                samples.append(sample)
                log(f"round {index} {tool}: {sample['wall_s']:.2f} s, rss {sample['peak_rss_mib']}")
        if not quick:
            server.query(f"CREATE DATABASE {DATABASE}_small")
            _fill_small = SCHEMA.format(db=f"{DATABASE}_small", table="t")
            server.query(_fill_small)
            server.query(FILL.format(db=f"{DATABASE}_small", table="t", rows=SMALL_ROWS))
            small = bench.strongroom(f"{DATABASE}_small", SMALL_ROWS)
            log(f"strongroom on {SMALL_ROWS} rows: rss {small['peak_rss_mib']}")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    def median(tool: str) -> float:
        return statistics.median(s["wall_s"] for s in samples if s["tool"] == tool)

    def cpu(tool: str) -> float:
        return statistics.median(
            s["tool_cpu_s"] + s["server_cpu_s"] for s in samples if s["tool"] == tool
        )

    def peak(tool: str) -> float:
        return max(sum(s["peak_rss_mib"].values()) for s in samples if s["tool"] == tool)

    pairs = [
        s["wall_s"] / r["wall_s"]
        for s in samples
        if s["tool"] == "strongroom"
        for r in samples
        if r["tool"] == "raw" and r["round"] == s["round"]
    ]
    result: dict[str, Any] = {
        "benchmark": "clickhouse-backup",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": quick,
        "server": "ClickHouse 18.16 (Debian), sandbox on 127.0.0.1",
        "rows": rows,
        "native_bytes": native_bytes,
        "rounds": rounds,
        "cpus": os.cpu_count(),
        "median_wall_s": {"raw": median("raw"), "strongroom": median("strongroom")},
        "ratio_strongroom_vs_raw": round(median("strongroom") / median("raw"), 3),
        "paired_ratios": [round(p, 3) for p in pairs],
        # CPU of the tool plus the server: what each pipeline costs, even on a busy host
        "median_cpu_s_tool_plus_server": {"raw": cpu("raw"), "strongroom": cpu("strongroom")},
        "cpu_ratio_strongroom_vs_raw": round(cpu("strongroom") / cpu("raw"), 3),
        "median_other_cpu_s": {
            tool: statistics.median(s["other_cpu_s"] for s in samples if s["tool"] == tool)
            for tool in ("raw", "strongroom")
        },
        "peak_rss_mib": {"raw_client_plus_zstd": peak("raw"), "strongroom": peak("strongroom")},
        "strongroom_rss_small_table_mib": small["peak_rss_mib"]["strongroom"] if small else None,
        "all_ok": all(s["ok"] for s in samples) and (small is None or small["ok"]),
        "samples": samples,
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    name = "clickhouse-backup-quick.json" if quick else "clickhouse-backup.json"
    (RESULTS_DIR / name).write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.clickhouse_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="1M rows, 2 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child()
    result = run(args.quick, args.rounds)
    summary = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(summary, indent=2))
    return 0 if result["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
