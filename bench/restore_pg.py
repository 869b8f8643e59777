"""PostgreSQL restores (and the backup) on the operator path against the raw tools, in
the same run: the ``strongroom`` CLI as a new process against a real Prefect server
(``bench.operator_stack``) versus what an operator would script.

| key | what is timed |
|---|---|
| ``pg_raw_stream_restore_s`` | ``createdb NEW && zstd -dc f.zst \\| pg_restore -d NEW`` |
| ``pg_raw_j2_restore_s`` | ``createdb NEW && pg_restore -j 2 -d NEW f.dump`` (from ``-f``) |
| ``pg_restore_cli_s`` | ``strongroom restore postgresql T --into NEW --jobs 1`` |
| ``pg_restore_jobs2_s`` | the same with ``--jobs 2`` |
| ``pg_raw_backup_s`` | ``pg_dump -Fc -Z0 \\| zstd -3 -T0 > f.zst`` |
| ``pg_backup_cli_s`` | ``strongroom backup postgresql T`` |

Every restore goes into a database that does not exist yet and is checked afterwards
(row count of the largest table, untimed); the order of the tools rotates each round,
``os.sync()`` runs and the host is let settle before each sample. Medians are reported.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.cpu import prioritize, wait_quiet
from bench.operator_stack import OperatorStack, operator_stack, strongroom_command
from strongroom.deploy.local_server import ROOT
from strongroom.sandbox.postgres import PostgresServer

DATABASE = "bench"
TARGET = "bench"


def _log(message: str) -> None:
    print(f"[restore_pg] {message}", file=sys.stderr, flush=True)


def _sh(script: str, env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(["bash", "-c", f"set -euo pipefail; {script}"], env=env, check=True)
    return time.perf_counter() - started


def _load(server: PostgresServer, size_mb: int) -> int:
    import psycopg

    from strongroom.sample_data import load_sample_data

    server.create_database(DATABASE)
    with psycopg.connect(server.dsn(DATABASE), autocommit=True) as conn:
        load_sample_data(conn, size_mb)
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")
    return int(server.psql(f"SELECT pg_database_size('{DATABASE}')"))


class _Samples:
    def __init__(self, server: PostgresServer, stack: OperatorStack, work: Path) -> None:
        self.server, self.stack, self.work = server, stack, work
        self.env = {**os.environ, **server.libpq_env()}
        self.count_sql = "SELECT count(*) FROM analytics.events"
        self.expected = server.psql(self.count_sql, db=DATABASE)
        self.serial = 0
        self.peak_rss_kib = 0

    def _fresh(self) -> str:
        self.serial += 1
        return f"restored_{self.serial}"

    def _checked(self, name: str) -> None:
        got = self.server.psql(self.count_sql, db=name)
        if got != self.expected:
            raise RuntimeError(
                f"restored {name}: {got} rows in analytics.events, not {self.expected}"
            )
        self.server.drop_database(name)

    def raw_stream(self) -> float:
        name = self._fresh()
        seconds = _sh(
            f"createdb {name} && zstd -dcq {self.work}/raw.dump.zst | pg_restore -d {name}",
            self.env,
        )
        self._checked(name)
        return seconds

    def raw_j2(self) -> float:
        name = self._fresh()
        seconds = _sh(
            f"createdb {name} && pg_restore -j 2 -d {name} {self.work}/raw.dump", self.env
        )
        self._checked(name)
        return seconds

    def _cli_restore(self, jobs: int) -> float:
        name = self._fresh()
        seconds, result, rss_kib = _timed_cli_rss(
            self.stack,
            "restore",
            "postgresql",
            TARGET,
            "--into",
            name,
            "--jobs",
            str(jobs),
            "--json",
        )
        self.peak_rss_kib = max(self.peak_rss_kib, rss_kib)
        if result.returncode != 0:
            raise RuntimeError(
                f"strongroom restore failed: {result.stdout[-800:]} {result.stderr[-800:]}"
            )
        report = json.loads(result.stdout)
        if not report.get("rows_ok"):
            raise RuntimeError(f"strongroom restore: row checks failed: {report.get('row_checks')}")
        self._checked(name)
        return seconds

    def cli_j1(self) -> float:
        return self._cli_restore(1)

    def cli_j2(self) -> float:
        return self._cli_restore(2)

    def raw_backup(self) -> float:
        return _sh(
            f"pg_dump -Fc -Z0 {DATABASE} | zstd -3 -T0 -q -f -o {self.work}/raw.dump.zst", self.env
        )

    def cli_backup(self) -> float:
        seconds, result = self.stack.timed_cli("backup", "postgresql", TARGET, "--json")
        if result.returncode != 0:
            raise RuntimeError(
                f"strongroom backup failed: {result.stdout[-800:]} {result.stderr[-800:]}"
            )
        return seconds


def _timed_cli_rss(
    stack: OperatorStack, *args: str
) -> tuple[float, subprocess.CompletedProcess[str], int]:
    """``strongroom ARGS`` as a new process: wall seconds, the result, and the peak RSS
    (KiB) of the largest process of its tree that it waited for (``wait4``)."""
    import tempfile

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(
            [*strongroom_command(), *args], stdout=out, stderr=err, env=stack.env, cwd=ROOT
        )
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(
            proc.args, proc.returncode, out.read().decode(), err.read().decode()
        )
    return seconds, result, usage.ru_maxrss


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def run(quick: bool, workdir: Path, repeats: int | None = None) -> dict[str, Any]:
    """The PostgreSQL keys of ``bench/results/restore.json``."""
    size_mb = 50 if quick else 1200
    rounds = repeats or (1 if quick else 3)
    workdir.mkdir(parents=True, exist_ok=True)
    server = PostgresServer(settings={"autovacuum": "off"})  # its own folder, for postgres
    with server, operator_stack(workdir / "stack") as stack:
        for pid in (
            server.proc.pid if server.proc else None,
            stack.server.proc.pid if stack.server.proc else None,
        ):
            if pid and os.geteuid() == 0:
                prioritize(pid, -10)
        _log(f"loading {size_mb} MB of sample data")
        db_bytes = _load(server, size_mb)
        stack.register_postgres_target(TARGET, server, DATABASE)
        samples = _Samples(server, stack, workdir)
        _sh(f"pg_dump -Fc -Z0 -f {workdir}/raw.dump {DATABASE}", samples.env)
        tools: dict[str, Callable[[], float]] = {
            "pg_raw_backup_s": samples.raw_backup,
            "pg_backup_cli_s": samples.cli_backup,  # also the backup the restores read
            "pg_raw_stream_restore_s": samples.raw_stream,
            "pg_raw_j2_restore_s": samples.raw_j2,
            "pg_restore_cli_s": samples.cli_j1,
            "pg_restore_jobs2_s": samples.cli_j2,
        }
        order = list(tools)
        times: dict[str, list[float]] = {k: [] for k in tools}
        samples.raw_backup()  # warm-up (untimed): caches, the first backup for the restores
        samples.cli_backup()
        for round_no in range(rounds):
            # backups first in every round (the restores read the latest backup)
            rotated = order[:2][round_no % 2 :] + order[:2][: round_no % 2]
            restores = order[2:]
            shift = round_no % len(restores)
            for key in rotated + restores[shift:] + restores[:shift]:
                os.sync()
                wait_quiet(0.15, timeout=30)
                seconds = tools[key]()
                times[key].append(round(seconds, 3))
                _log(f"round {round_no + 1}: {key} {seconds:.2f} s")
    med = {k: round(statistics.median(v), 3) for k, v in times.items()}
    return {
        "pg_db_mib": round(db_bytes / 2**20, 1),
        **med,
        "pg_restore_over_raw_stream": _ratio(
            med["pg_restore_cli_s"], med["pg_raw_stream_restore_s"]
        ),
        "pg_restore_jobs2_over_raw_j2": _ratio(
            med["pg_restore_jobs2_s"], med["pg_raw_j2_restore_s"]
        ),
        "pg_backup_cli_over_raw": _ratio(med["pg_backup_cli_s"], med["pg_raw_backup_s"]),
        "pg_restore_cli_peak_rss_mib": round(samples.peak_rss_kib / 1024, 1),
        "pg_samples_s": times,
        "pg_rounds": rounds,
    }


def main(argv: list[str] | None = None) -> int:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="50 MB, one round")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="strongroom-bench-pgr-") as tmp:
        result = run(args.quick, Path(tmp), args.repeats)
    name = "restore-pg-quick.json" if args.quick else "restore-pg.json"
    out = Path(__file__).parent / "results" / name
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
