"""The contenders: each runs one timed backup sample and returns a record of it.

- ``raw``: ``pg_dump -Fc -Z0 | zstd -3 -T0 > file`` (the baseline strongroom must approach).
- ``strongroom``: ``backup_postgres`` in its own Python process (wall time includes
  interpreter start-up and imports; its peak RSS is read from the process itself).
- ``pgbackrest``: ``pgbackrest --type=full backup`` (zst, process-max 2), a physical peer.
- ``dump_only``: ``pg_dump -Fc -Z0 > /dev/null``, a reference for the dump's own limit.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.cpu import CpuMeter, CpuSnapshot
from bench.pgbackrest import PgBackRest

ROOT = Path(__file__).resolve().parent.parent
ZSTD = shutil.which("zstd") or "/usr/bin/zstd"
KIB = 1024
MIB = 1024 * 1024


@dataclass
class Target:
    """What every contender backs up: one database on one throwaway cluster."""

    host: str
    port: int
    user: str
    password: str
    database: str
    bin_dir: Path
    work: Path  # scratch directory for this size (outputs are removed after each sample)
    recipient: str
    level: int
    expected_rows: int
    pgbackrest: PgBackRest | None
    meter: CpuMeter

    def cpu_before(self) -> CpuSnapshot:
        return self.meter.snapshot()

    def cpu_after(self, before: CpuSnapshot, tool_cpu_s: float) -> dict[str, float]:
        """Host, server and other CPU since ``before`` (call right after the tool ended)."""
        return self.meter.delta(before, tool_cpu_s)

    def libpq_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(
            PGHOST=self.host,
            PGPORT=str(self.port),
            PGUSER=self.user,
            PGPASSWORD=self.password,
            PGDATABASE=self.database,
        )
        return env


def wait_rusage(proc: subprocess.Popen[Any]) -> resource.struct_rusage:
    """Reap ``proc`` with wait4: its exit code plus the resource use of it and of the
    descendants it waited for (ru_maxrss is then the largest of them)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage


def _cpu(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


def run_raw(t: Target) -> dict[str, Any]:
    out = t.work / "raw.dump.zst"
    err = t.work / "raw.stderr"
    with err.open("wb") as errf, out.open("wb") as outf:
        before = t.cpu_before()
        start = time.perf_counter()
        dump = subprocess.Popen(
            [str(t.bin_dir / "pg_dump"), "-Fc", "-Z0", "--no-password"],
            env=t.libpq_env(),
            stdout=subprocess.PIPE,
            stderr=errf,
        )
        assert dump.stdout is not None
        zstd = subprocess.Popen(
            [ZSTD, f"-{t.level}", "-T0", "-q", "-c"], stdin=dump.stdout, stdout=outf, stderr=errf
        )
        dump.stdout.close()
        zstd_usage = wait_rusage(zstd)
        dump_usage = wait_rusage(dump)
        wall = time.perf_counter() - start
        cpu = t.cpu_after(before, _cpu(dump_usage) + _cpu(zstd_usage))
        # not part of the timed pipeline (`> file` never fsyncs); recorded for fairness,
        # since strongroom and pgBackRest both fsync what they write
        fsync_start = time.perf_counter()
        os.fsync(outf.fileno())
        fsync_s = time.perf_counter() - fsync_start
    size = out.stat().st_size
    ok = dump.returncode == 0 and zstd.returncode == 0 and size > 0
    record = {
        "wall_s": wall,
        "cpu_s": _cpu(dump_usage) + _cpu(zstd_usage),
        "ok": ok,
        "stored_bytes": size,
        "fsync_after_s": fsync_s,
        "pg_dump_cpu_s": _cpu(dump_usage),
        "zstd_cpu_s": _cpu(zstd_usage),
        **cpu,
    }
    if not ok:
        record["error"] = f"exit codes pg_dump={dump.returncode} zstd={zstd.returncode}: " + _tail(
            err
        )
    out.unlink(missing_ok=True)
    err.unlink(missing_ok=True)
    return record


def run_dump_only(t: Target) -> dict[str, Any]:
    err = t.work / "dump.stderr"
    with err.open("wb") as errf:
        before = t.cpu_before()
        start = time.perf_counter()
        dump = subprocess.Popen(
            [str(t.bin_dir / "pg_dump"), "-Fc", "-Z0", "--no-password"],
            env=t.libpq_env(),
            stdout=subprocess.DEVNULL,
            stderr=errf,
        )
        usage = wait_rusage(dump)
        wall = time.perf_counter() - start
        cpu = t.cpu_after(before, _cpu(usage))
    record: dict[str, Any] = {
        "wall_s": wall,
        "cpu_s": _cpu(usage),
        **cpu,
        "ok": dump.returncode == 0,
    }
    if dump.returncode != 0:
        record["error"] = f"pg_dump exit code {dump.returncode}: {_tail(err)}"
    err.unlink(missing_ok=True)
    return record


def run_strongroom(t: Target) -> dict[str, Any]:
    out = t.work / "strongroom-repo"
    out.mkdir()
    result_path = t.work / "strongroom-result.json"
    log = t.work / "strongroom.log"
    job = {
        "host": t.host,
        "port": t.port,
        "user": t.user,
        "password": t.password,  # via stdin, never argv
        "database": t.database,
        "recipient": t.recipient,
        "level": t.level,
        "out_dir": str(out),
        "result_path": str(result_path),
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    with log.open("wb") as logf:
        before = t.cpu_before()
        t_spawn = time.time()
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench._strongroom_child"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(job).encode())
        proc.stdin.close()
        usage = wait_rusage(proc)
        wall = time.perf_counter() - start
        t_end = time.time()
        cpu = t.cpu_after(before, _cpu(usage))
    record: dict[str, Any] = {"wall_s": wall, "cpu_s": _cpu(usage), **cpu, "ok": False}
    try:
        if proc.returncode != 0:
            record["error"] = f"exit code {proc.returncode}: {_tail(log)}"
            return record
        child = json.loads(result_path.read_text())
        on_disk = sum(p.stat().st_size for p in out.rglob("*.pgdump") if p.is_file())
        rows_ok = child["rows"] > 0 and child["rows"] == t.expected_rows
        record.update(
            ok=rows_ok and on_disk == child["stored_size"] and child["stored_size"] > 0,
            in_process_s=child["in_process_s"],
            stored_bytes=child["stored_size"],
            raw_dump_bytes=child["raw_size"],
            rows=child["rows"],
            expected_rows=t.expected_rows,
            tables=child["tables"],
            artifact_bytes_on_disk=on_disk,
            peak_rss_kib=child["self_hwm_kib"],
            ru_maxrss_kib=child["self_maxrss_kib"],
            python_cpu_s=child["self_cpu_user_s"] + child["self_cpu_sys_s"],
            children_cpu_s=child["children_cpu_user_s"] + child["children_cpu_sys_s"],
            phases_s={
                "interpreter_start": child["t_entry"] - t_spawn,
                "imports": child["t_imported"] - child["t_entry"],
                "setup_before_backup": child["started_at"] - child["t_imported"],
                "backup_postgres": child["in_process_s"],
                "after_backup": child["t_done"] - child["finished_at"],
                "exit": t_end - child["t_done"],
            },
            probes_s=child["probes_s"],
            probe_calls=child["probe_calls"],
        )
        if not record["ok"]:
            record["error"] = (
                f"check failed: rows {child['rows']} (expected {t.expected_rows}), "
                f"stored {child['stored_size']} bytes, on disk {on_disk} bytes"
            )
        return record
    finally:
        shutil.rmtree(out, ignore_errors=True)
        result_path.unlink(missing_ok=True)
        log.unlink(missing_ok=True)


def run_pgbackrest(t: Target) -> dict[str, Any]:
    pgbr = t.pgbackrest
    assert pgbr is not None
    log = t.work / "pgbackrest.out"
    with log.open("wb") as logf:
        before = t.cpu_before()
        start = time.perf_counter()
        proc = subprocess.Popen(
            pgbr.backup_command(),
            cwd=pgbr.base,
            env={k: v for k, v in os.environ.items() if not k.startswith("PG")},
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
        usage = wait_rusage(proc)
        wall = time.perf_counter() - start
        cpu = t.cpu_after(before, _cpu(usage))
    record: dict[str, Any] = {
        "wall_s": wall,
        "ok": False,
        "cpu_s": _cpu(usage),  # archive-push runs under the server: in postgres_cpu_s
        **cpu,
    }
    try:
        if proc.returncode != 0:
            record["error"] = f"exit code {proc.returncode}: {_tail(log)}\n{pgbr.log_tail()}"
            return record
        latest = pgbr.latest_backup()
        info = latest.get("info", {})
        repo_info = info.get("repository", {})
        record.update(
            ok=latest.get("type") == "full" and repo_info.get("delta", 0) > 0,
            label=latest.get("label"),
            stored_bytes=repo_info.get("delta"),
            cluster_bytes=info.get("size"),
            backup_internal_s=latest.get("timestamp", {}).get("stop", 0)
            - latest.get("timestamp", {}).get("start", 0),
        )
        if not record["ok"]:
            record["error"] = f"unexpected pgbackrest info: {json.dumps(latest)[:500]}"
        return record
    finally:
        log.unlink(missing_ok=True)
        # untimed: keep only the newest backup so the repository does not grow
        pgbr.expire_all_but_latest()


RUNNERS = {
    "raw": run_raw,
    "strongroom": run_strongroom,
    "pgbackrest": run_pgbackrest,
    "dump_only": run_dump_only,
}
