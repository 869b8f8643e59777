"""Benchmark strongroom's PostgreSQL logical backup against the raw pipeline and pgBackRest.

    python -m bench.run                      # sizes 200,1000 MB, 3 repeats
    python -m bench.run --sizes 200,1000 --repeats 3
    python -m bench.run --quick              # 50 MB, 1 repeat: smoke test
    python -m bench.run --incremental [--quick]   # file-level incremental backups and
                                                  # delta restores vs pgBackRest (issue 18):
                                                  # bench.pg_incremental_bench, its options

For each size: a throwaway PostgreSQL 15 cluster (archiving to pgBackRest), sample data
loaded once, one untimed warm-up run of every tool, then ``--repeats`` rounds in which
the tools run one after the other (the order rotates each round). Results go to
``bench/results/postgres-backup.json`` and a table is printed. All data lives in one
temporary directory that is removed at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

try:
    from strongroom.sandbox.postgres import PostgresServer
except ImportError:  # pragma: no cover - before the move to strongroom.sandbox
    from tests.fixtures.postgres import PostgresServer

from bench import pgbackrest
from bench.cpu import (
    CpuMeter,
    current_priority,
    is_disturbed,
    prioritize,
    restore_priority,
    wait_quiet,
)
from bench.report import rss_verdict, summarize_size, table
from bench.tools import RUNNERS, ZSTD, Target

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_OUTPUT = RESULTS_DIR / "postgres-backup.json"
QUICK_OUTPUT = RESULTS_DIR / "postgres-backup-quick.json"
DATABASE = "bench"
TOOL_ORDER = ["raw", "strongroom", "pgbackrest", "dump_only"]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--sizes", default=None, help="database sizes in MB, comma-separated (default 200,1000)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: sizes 50, repeats 1, output postgres-backup-quick.json",
    )
    parser.add_argument(
        "--incremental",
        action="store_true",
        help="run bench.pg_incremental_bench instead (file-level full/incremental backups,"
        " restores and delta restores vs pgBackRest); the other options go to it"
        " (--quick, --size MiB, --rounds, --output)",
    )
    parser.add_argument("--level", type=int, default=3, help="zstd level for all tools")
    parser.add_argument("--no-pgbackrest", action="store_true", help="skip the pgBackRest peer")
    parser.add_argument("--output", type=Path, default=None, help="JSON result path")
    parser.add_argument(
        "--quiet",
        type=float,
        default=0.15,
        help="before each sample wait until other work uses less than this share of the"
        " CPUs (default 0.15)",
    )
    parser.add_argument(
        "--quiet-timeout", type=float, default=60.0, help="give up waiting after N s (60)"
    )
    parser.add_argument(
        "--disturbed",
        type=float,
        default=0.10,
        help="a sample is disturbed when other work used more than this share of the CPUs"
        " during it (default 0.10)",
    )
    parser.add_argument(
        "--retries", type=int, default=2, help="re-run a disturbed timed sample up to N times"
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=-10 if os.geteuid() == 0 else 0,
        help="CPU priority of the benchmark, the server and every tool (default -10 as root,"
        " to shield samples from unrelated work on a shared machine; 0 to disable)",
    )
    args = parser.parse_args(argv)
    sizes = args.sizes or ("50" if args.quick else "200,1000")
    try:
        args.size_list = [int(s) for s in sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes must be integers in MB, got {sizes!r}")
    if not args.size_list or any(s <= 0 for s in args.size_list):
        parser.error("--sizes needs at least one positive size")
    args.repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    args.output = args.output or (QUICK_OUTPUT if args.quick else DEFAULT_OUTPUT)
    return args


# ----------------------------------------------------------------------------- environment


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except OSError as exc:
        return f"unavailable ({exc})"
    return (
        (out.stdout.strip() or out.stderr.strip()).splitlines()[0]
        if (out.stdout or out.stderr)
        else ""
    )


def _package(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def host_facts() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "mem_total_mib": mem_kib // 1024,
        "kernel": platform.release(),
        "platform": platform.platform(),
    }


def versions(bin_dir: Path) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "strongroom": _package("strongroom"),
        "zstandard": _package("zstandard"),
        "pyrage": _package("pyrage"),
        "psycopg": _package("psycopg"),
        "pg_dump": _first_line([str(bin_dir / "pg_dump"), "--version"]),
        "zstd_cli": _first_line([ZSTD, "--version"]),
        "pgbackrest": pgbackrest.version() if pgbackrest.available() is None else None,
    }


# ----------------------------------------------------------------------------- one size


def wait_archived(server: PostgresServer, timeout: float = 600.0) -> None:
    """Switch WAL and wait until the archiver has pushed everything up to the switch."""
    segment = server.psql("SELECT pg_walfile_name(pg_switch_wal())")
    deadline = time.monotonic() + timeout
    while True:
        row = server.psql(
            "SELECT coalesce(last_archived_wal, ''), failed_count, coalesce(last_failed_wal, '')"
            " FROM pg_stat_archiver"
        )
        last, failed, last_failed = row.split("|")
        if last >= segment:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"WAL archiving did not reach {segment} (last {last!r}, {failed} failures,"
                f" last failed {last_failed!r})"
            )
        time.sleep(0.2)


def load_data(server: PostgresServer, size_mb: int) -> tuple[int, float]:
    import psycopg

    from strongroom.sample_data import load_sample_data

    server.create_database(DATABASE)
    start = time.perf_counter()
    with psycopg.connect(server.dsn(DATABASE), autocommit=True) as conn:
        counts = load_sample_data(conn, size_mb)
        conn.execute("VACUUM ANALYZE")  # hint bits and visibility map: no writes while dumping
        conn.execute("CHECKPOINT")
    return sum(counts.values()), time.perf_counter() - start


def run_sample(target: Target, tool: str, args: argparse.Namespace) -> dict[str, Any]:
    """One sample: flush, let the server's backends finish, wait for a quiet host, run."""
    os.sync()  # flush the previous sample's writes outside the timed region
    target.meter.settle()
    waited, busy = wait_quiet(args.quiet, timeout=args.quiet_timeout)
    try:
        record = RUNNERS[tool](target)
    except Exception as exc:
        record = {
            "wall_s": None,
            "ok": False,
            "error": f"{exc}\n{traceback.format_exc(limit=3)}",
        }
    record["quiet_wait_s"] = waited
    record["host_busy_before"] = busy
    record["disturbed"] = is_disturbed(record, args.disturbed)
    record["final"] = False
    return record


def _disable_archiving(server: PostgresServer) -> None:
    server.psql("ALTER SYSTEM SET archive_command = ''; SELECT pg_reload_conf();")


def bench_size(
    size_mb: int,
    args: argparse.Namespace,
    tmp: Path,
    recipient: str,
    pgbr_state: dict[str, Any],
    priority_problems: list[str],
) -> dict[str, Any]:
    work = tmp / f"work-{size_mb}"
    work.mkdir()
    pg_base = tmp / f"pg-{size_mb}"
    pg_base.mkdir()
    pgbr: pgbackrest.PgBackRest | None = None
    if not pgbr_state.get("skipped"):
        pgbr = pgbackrest.PgBackRest(
            tmp / f"pgbackrest-{size_mb}", process_max=2, compress_level=args.level
        )
    server = PostgresServer(
        pg_base,
        archive_command=pgbr.archive_command() if pgbr else None,
        settings={"autovacuum": "off"},  # no background vacuum between samples
    )
    with server:
        if args.nice and server.proc is not None:
            # the server runs in its own session (autogroup): give it the same priority
            for problem in prioritize(server.proc.pid, args.nice):
                log(f"priority not applied: {problem}")
                priority_problems.append(problem)
        if pgbr is not None:
            try:
                pgbr.write_config(
                    data_dir=server.data_dir, port=server.port, socket_dir=server.socket_dir
                )
                pgbr.stanza_create()
            except Exception as exc:
                pgbr_state["skipped"] = f"pgBackRest setup failed: {exc}"
                log(f"pgbackrest skipped: {exc}")
                _disable_archiving(server)
                pgbr = None
        log(f"size {size_mb} MB: loading sample data")
        expected_rows, load_s = load_data(server, size_mb)
        if pgbr is not None:
            wait_archived(server)
        db_bytes = int(server.psql(f"SELECT pg_database_size('{DATABASE}')"))
        cluster_bytes = int(server.psql("SELECT sum(pg_database_size(oid)) FROM pg_database"))
        log(
            f"size {size_mb} MB: database {db_bytes / 2**20:.0f} MiB, {expected_rows:,} rows,"
            f" loaded in {load_s:.1f} s"
        )
        target = Target(
            host=server.host,
            port=server.port,
            user=server.superuser,
            password=server.password,
            database=DATABASE,
            bin_dir=server.bin_dir,
            work=work,
            recipient=recipient,
            level=args.level,
            expected_rows=expected_rows,
            pgbackrest=pgbr,
            meter=CpuMeter(server.proc.pid if server.proc else None),
        )
        tools = [t for t in TOOL_ORDER if t != "pgbackrest" or pgbr is not None]
        samples: list[dict[str, Any]] = []
        rounds = [("warmup", 0, tools)] + [
            ("timed", r, tools[r % len(tools) :] + tools[: r % len(tools)])
            for r in range(1, args.repeats + 1)
        ]
        for kind, repeat, order in rounds:
            for tool in order:
                retries = args.retries if kind == "timed" else 0
                for attempt in range(retries + 1):
                    record = run_sample(target, tool, args)
                    record = {
                        "tool": tool,
                        "repeat": repeat,
                        "warmup": kind == "warmup",
                        "attempt": attempt,
                        **record,
                    }
                    samples.append(record)
                    wall = record["wall_s"]
                    status = "ok" if record["ok"] else "FAILED"
                    if record["disturbed"]:
                        status += f" DISTURBED (other CPU {record['other_cpu_s']:.1f} s)"
                    log(
                        f"size {size_mb} MB {kind} {repeat} {tool}: "
                        f"{'-' if wall is None else f'{wall:.2f}'} s {status}"
                        + (f" ({record.get('error', '')[:200]})" if not record["ok"] else "")
                    )
                    if not record["disturbed"] or not record["ok"]:
                        break
                # medians use the last attempt of each slot
                record["final"] = True
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(pg_base, ignore_errors=True)
    if pgbr is not None:
        shutil.rmtree(pgbr.base, ignore_errors=True)
    return {
        "size_mb": size_mb,
        "db_bytes": db_bytes,
        "cluster_bytes": cluster_bytes,
        "expected_rows": expected_rows,
        "load_s": load_s,
        "tool_order_per_round": {str(r): o for _, r, o in rounds},
        "samples": samples,
        "summary": summarize_size(samples, db_bytes),
    }


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    if "--incremental" in given:
        from bench import pg_incremental_bench

        return pg_incremental_bench.main([a for a in given if a != "--incremental"])
    args = parse_args(argv)
    from pyrage import x25519

    from strongroom.sandbox.postgres import PG_BIN_DIR

    recipient = str(x25519.Identity.generate().to_public())
    pgbr_state: dict[str, Any] = {}
    if args.no_pgbackrest:
        pgbr_state["skipped"] = "disabled with --no-pgbackrest"
    elif (reason := pgbackrest.available()) is not None:
        pgbr_state["skipped"] = reason
    saved_priority = current_priority(os.getpid())
    priority_problems = prioritize(os.getpid(), args.nice) if args.nice else []
    for problem in priority_problems:
        log(f"priority not applied: {problem}")
    started = dt.datetime.now(dt.UTC)
    tmp = Path(tempfile.mkdtemp(prefix="strongroom-bench-"))
    tmp.chmod(0o711)  # the postgres OS user must reach its directories inside
    sizes: list[dict[str, Any]] = []
    try:
        for size_mb in args.size_list:
            sizes.append(bench_size(size_mb, args, tmp, recipient, pgbr_state, priority_problems))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        # our autogroup is the whole calling session (the shell): give it back its priority
        restore_priority(os.getpid(), saved_priority)
    result: dict[str, Any] = {
        "benchmark": "postgres-backup",
        "date": started.isoformat(timespec="seconds"),
        "duration_s": (dt.datetime.now(dt.UTC) - started).total_seconds(),
        "command": "python -m bench.run " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": {
            "sizes_mb": args.size_list,
            "repeats": args.repeats,
            "level": args.level,
            "warmup_runs": 1,
            "quiet_threshold": args.quiet,
            "quiet_timeout_s": args.quiet_timeout,
            "disturbed_threshold": args.disturbed,
            "retries": args.retries,
            "nice": args.nice,
            "priority_problems": priority_problems,
            "tools": {
                "raw": f"pg_dump -Fc -Z0 | zstd -{args.level} -T0 > file",
                "strongroom": "backup_postgres() in a separate Python process (local repository,"
                " include_globals=False); wall time includes interpreter start-up",
                "pgbackrest": "pgbackrest --type=full backup, compress-type=zst, compress-level="
                f"{args.level}, process-max=2, start-fast=y (whole cluster)",
                "dump_only": "pg_dump -Fc -Z0 > /dev/null (reference: the dump's own limit)",
            },
            "notes": [
                "Page cache is not dropped (needs privileges); one untimed warm-up of every"
                " tool, then rounds with a rotating tool order; os.sync() before each sample.",
                "The raw pipeline does not fsync its output (fsync time is recorded separately,"
                " untimed); strongroom and pgBackRest fsync inside their time.",
                "pgBackRest backs up the whole cluster (physical); the others one database.",
                "Peak RSS is the strongroom Python process's own VmHWM (pg_dump excluded;"
                " ru_maxrss after vfork+exec may include the parent's RSS).",
                "cpu_s: the tool's own process tree (wait4); postgres_cpu_s: the server"
                " (backends, archive-push); other_cpu_s: the rest of the host during the"
                " sample (other work on a shared machine: high values mean a disturbed"
                " sample).",
                "Shared machine: before each sample the run waits (up to quiet_timeout_s)"
                " until other work uses < quiet_threshold of the CPUs; a sample during which"
                " other work used > disturbed_threshold of the CPUs is flagged disturbed and"
                " re-run up to `retries` times; medians use the last attempt (final: true)"
                " of each tool and round.",
                "With --nice (default -10 as root) the benchmark, the server and every tool run"
                " at the same raised CPU priority (process nice and autogroup nice), so other"
                " work on a shared machine disturbs the samples less; all contenders get the"
                " same priority.",
                "autovacuum=off on the throwaway cluster; VACUUM ANALYZE + CHECKPOINT after"
                " the load.",
            ],
        },
        "host": host_facts(),
        "versions": versions(PG_BIN_DIR),
        "pgbackrest": pgbr_state or {"skipped": None},
        "sizes": sizes,
        "peak_rss": rss_verdict(sizes),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"\nresults: {args.output}")
    failed = any(not s["ok"] for size in sizes for s in size["samples"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
