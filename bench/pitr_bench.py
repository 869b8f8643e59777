"""PITR benchmark: WAL archiving throughput and PITR restore + replay time, strongroom
against pgBackRest (Debian's 2.45, local repository, zst level 3), in the same run.

    python -m bench.pitr_bench [--quick]      -> bench/results/pitr.json (pitr-quick.json)

(a) **WAL archiving drain** (FIELD-NOTES: a live load cannot rank archivers, so
    measure capacity): a cluster with ``archive_mode = on`` and
    ``archive_command = ''`` accumulates a backlog of ``.ready`` segments
    (pgbench plus less compressible random rows, >= 1 GiB of WAL in full
    mode); the stopped cluster is the template. For each contender a copy of it
    starts, the archive_command is set with ``ALTER SYSTEM`` + reload, and the
    time until no ``.ready`` file is left is the drain time. Contenders:
    ``strongroom-wal push`` (async: background pusher, 4 in flight; and sync),
    ``pgbackrest archive-push`` (sync, and ``archive-async=y`` with
    process-max 2), both at zstd level ``WAL_LEVEL``. Each starts from the
    archive state right after the base backups.
(b) **PITR restore + replay**: restore the base backup taken before the
    backlog into an empty directory and replay the whole archive (target
    latest), from the restore command to "ready to accept connections":
    ``strongroom`` (pitr_restore: tar stream + pg_verifybackup + wal-fetch with
    prefetch) vs ``pgbackrest restore`` with archive-get sync and async.

Both write with fsync into a local repository on the same disk; strongroom also
encrypts (age) every file, pgBackRest does not (no repo cipher configured).
Ratios > 1 mean strongroom is faster.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import pgbackrest as pgbr_mod
from bench.signing import bench_config, bench_repo
from strongroom.engines.postgres.wal.config import load_wal_config
from strongroom.engines.postgres.wal.fast import archive_command

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MIB = 1024 * 1024
# zstd level for WAL, the same for both tools (strongroom's WAL default; pgBackRest's
# compress-level for zst defaults to 3, set here to match so the CPU work is equal)
WAL_LEVEL = 1


def _log(message: str) -> None:
    print(f"[pitr-bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _copytree(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)


def _du(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _ready(data_dir: Path) -> int:
    status = data_dir / "pg_wal" / "archive_status"
    return sum(1 for n in os.listdir(status) if n.endswith(".ready"))


def _wait_no_process(marker: str, timeout: float = 120.0) -> None:
    """Wait until no process has ``marker`` in its command line (async helpers)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = False
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if marker.encode() in cmd:
                busy = True
                break
        if not busy:
            return
        time.sleep(0.1)


class Bench:
    def __init__(self, quick: bool) -> None:
        from pydantic import SecretStr
        from pyrage import x25519

        from strongroom.config import EncryptionConfig
        from strongroom.sandbox._process import make_temp_dir
        from strongroom.sandbox.postgres import chown_to_postgres

        self.quick = quick
        self.work = make_temp_dir("pitr-bench")
        chown_to_postgres(self.work, 0o755)
        identity = x25519.Identity.generate()
        self.enc = EncryptionConfig(
            recipients=[str(identity.to_public())], identities=[SecretStr(str(identity))]
        )
        self.servers: list[Any] = []
        self.result: dict[str, Any] = {
            "quick": quick,
            "started_at": dt.datetime.now(dt.UTC).isoformat(),
            "host": {"cpus": os.cpu_count(), "load_at_start": os.getloadavg()[0]},
        }

    # ------------------------------------------------------------------ helpers

    def wal_config(self, path: Path, repo: Path, mode: str) -> Path:
        from strongroom.engines.postgres.wal.config import write_wal_config

        return write_wal_config(
            path,
            target="bench",
            repository=bench_config(kind="local", path=str(repo)),
            recipients=self.enc.recipients,
            owner="postgres",
            push={
                "mode": mode,
                "parallel": int(os.environ.get("PITR_BENCH_PUSH_PARALLEL", "4")),
                "linger_seconds": 2.0,
                "compression_level": WAL_LEVEL,
            },
        )

    def pgbackrest(self, base: Path, server: Any, *, asynchronous: bool) -> pgbr_mod.PgBackRest:
        from strongroom.sandbox.postgres import chown_to_postgres

        pgbr = pgbr_mod.PgBackRest(base, compress_level=WAL_LEVEL)
        pgbr.write_config(data_dir=server.data_dir, port=server.port, socket_dir=server.socket_dir)
        if asynchronous:
            spool = base / "spool"
            chown_to_postgres(spool, 0o750)
            with pgbr.config.open("a") as f:
                f.write(f"archive-async=y\nspool-path={spool}\narchive-get-queue-max=1GiB\n")
        return pgbr

    # -------------------------------------------------------------------- setup

    def setup(self) -> None:
        from strongroom.config import PostgresConnection
        from strongroom.engines.postgres.pitr.basebackup import base_backup_postgres
        from strongroom.engines.postgres.pitr.restore import default_wal_command
        from strongroom.sandbox.postgres import PostgresServer, chown_to_postgres

        self.wal_cmd = default_wal_command("postgres")
        self.sr_repo = self.work / "sr-repo"
        chown_to_postgres(self.sr_repo)
        sr_cfg = self.wal_config(self.work / "wal.toml", self.sr_repo, "async")
        pgbr_base = self.work / "pgbr"
        pgbr_cfg = pgbr_base / "pgbackrest.conf"
        archive = (
            f"{self.wal_cmd} push --config {sr_cfg} %p && "
            f"{pgbr_mod.binary()} --config={pgbr_cfg} --stanza={pgbr_mod.STANZA} archive-push %p"
        )
        src = PostgresServer(
            self.work / "src",
            archive_command=archive,
            settings={
                "max_wal_size": "8GB",
                "checkpoint_timeout": "30min",
                "shared_buffers": "256MB",
            },
        )
        self.servers.append(src)
        src.start()
        self.src = src
        self.pgbr = self.pgbackrest(pgbr_base, src, asynchronous=False)
        _log("pgBackRest stanza-create")
        self.pgbr.stanza_create()
        from pydantic import SecretStr

        conn = PostgresConnection(
            name="bench", host=src.host, port=src.port, password=SecretStr(src.password)
        )
        t0 = time.perf_counter()
        self.sr_manifest = base_backup_postgres(
            conn,
            bench_repo(self.sr_repo),
            bench_config(kind="local", path=str(self.sr_repo)),
            self.enc,
        )
        _log(f"strongroom base backup {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        self.pgbr.run("--type=full", "backup")
        _log(f"pgBackRest base backup {time.perf_counter() - t0:.1f} s")
        # snapshots of both archives right after the base backups
        self.sr_snapshot = self.work / "sr-repo.snapshot"
        _copytree(self.sr_repo, self.sr_snapshot)
        self.pgbr_snapshot = self.work / "pgbr-repo.snapshot"
        _copytree(self.pgbr.repo, self.pgbr_snapshot)

    def make_backlog(self) -> None:
        from strongroom.engines.postgres.backup import pg_tool

        src = self.src
        src.psql("ALTER SYSTEM SET archive_command = ''; SELECT pg_reload_conf();")
        time.sleep(1.0)
        deadline = time.monotonic() + 60
        while _ready(src.data_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        start_lsn = src.psql("SELECT pg_current_wal_insert_lsn()")
        scale, noise_rows, txns = (5, 400_000, 2000) if self.quick else (40, 3_000_000, 8000)
        src.create_database("bench")
        env = src.libpq_env("bench")
        t0 = time.perf_counter()
        subprocess.run(
            [pg_tool("pgbench"), "-i", "-q", "-s", str(scale), "bench"],
            env=env,
            check=True,
            capture_output=True,
        )
        src.psql(
            "CREATE TABLE noise (id bigint, payload text);"
            "INSERT INTO noise SELECT g, md5(random()::text) || md5(random()::text) ||"
            f" md5(random()::text) || md5(random()::text) FROM generate_series(1, {noise_rows}) g;",
            db="bench",
        )
        subprocess.run(
            [pg_tool("pgbench"), "-c", "2", "-j", "2", "-t", str(txns), "bench"],
            env=env,
            check=True,
            capture_output=True,
        )
        src.psql("CHECKPOINT; SELECT pg_switch_wal();")
        end_lsn = src.psql("SELECT pg_current_wal_insert_lsn()")
        from strongroom.engines.postgres.wal.names import parse_lsn

        wal_bytes = parse_lsn(end_lsn) - parse_lsn(start_lsn)
        time.sleep(0.5)
        self.segments = _ready(src.data_dir)
        _log(
            f"backlog: {wal_bytes / MIB:.0f} MiB of WAL, {self.segments} .ready files "
            f"(generated in {time.perf_counter() - t0:.1f} s)"
        )
        self.result["wal"] = {
            "bytes": wal_bytes,
            "mib": round(wal_bytes / MIB, 1),
            "ready_files": self.segments,
            "pgbench_scale": scale,
            "random_rows": noise_rows,
            "pgbench_transactions": txns * 2,
        }
        src.stop()
        self.template = src.data_dir

    # -------------------------------------------------------------------- drain

    def drain(self, contender: str, run: int) -> dict[str, Any]:
        from strongroom.sandbox.postgres import PostgresServer, chown_to_postgres

        base = self.work / f"drain-{contender}-{run}"
        chown_to_postgres(base, 0o755)
        _copytree(self.template, base / "data")
        server = PostgresServer(base, archive_command="")
        self.servers.append(server)
        server.start()
        if contender.startswith("strongroom"):
            repo = base / "sr-repo"
            _copytree(self.sr_snapshot, repo)
            mode = "sync" if contender.endswith("sync") else "async"
            cfg = self.wal_config(base / "wal.toml", repo, mode)
            # the recommended archive_command (docs/pitr.md): a shell test, then the tool
            repo_id = load_wal_config(str(cfg)).repo_id
            command = archive_command(self.wal_cmd, str(cfg), repo_id)
            archive_dir = repo / "wal"
        else:
            pgbr = self.pgbackrest(base / "pgbr", server, asynchronous=contender.endswith("async"))
            shutil.rmtree(pgbr.repo)
            _copytree(self.pgbr_snapshot, pgbr.repo)
            command = pgbr.archive_command()
            archive_dir = pgbr.repo / "archive"
        status = server.data_dir / "pg_wal" / "archive_status"
        backlog_names = sorted(
            n[: -len(".ready")] for n in os.listdir(status) if n.endswith(".ready")
        )
        backlog = len(backlog_names)
        quoted = command.replace("'", "''")
        t0 = time.perf_counter()
        server.psql(f"ALTER SYSTEM SET archive_command = '{quoted}'; SELECT pg_reload_conf();")
        deadline = time.monotonic() + 1800
        while _ready(server.data_dir) and time.monotonic() < deadline:
            time.sleep(0.01)
        seconds = time.perf_counter() - t0
        stats = server.psql("SELECT archived_count, failed_count FROM pg_stat_archiver").split("|")
        server.stop()
        _wait_no_process(str(base))
        shutil.rmtree(base / "data", ignore_errors=True)  # the archive is what PITR needs
        archived = {
            p.name.split("-")[0].split(".")[0] for p in archive_dir.rglob("*") if p.is_file()
        }
        missing = [n for n in backlog_names if n not in archived]
        if missing:
            raise RuntimeError(f"drain {contender}: {len(missing)} file(s) not in the archive")
        record = {
            "contender": contender,
            "run": run,
            "segments": backlog,
            "seconds": round(seconds, 3),
            "segments_per_s": round(backlog / seconds, 2),
            "mib_per_s": round(backlog * 16 / seconds, 1),
            "archived_count": int(stats[0]),
            "failed_count": int(stats[1]),
            "archive_bytes": _du(archive_dir),
        }
        _log(
            f"drain {contender} #{run}: {backlog} files in {seconds:.2f} s = "
            f"{record['segments_per_s']} seg/s (failures {record['failed_count']})"
        )
        self.last_base[contender] = base
        return record

    # --------------------------------------------------------------------- pitr

    def pitr_strongroom(self, run: int) -> dict[str, Any]:
        from strongroom.engines.postgres.pitr.plan import PitrRequest
        from strongroom.engines.postgres.pitr.restore import pitr_restore
        from strongroom.engines.postgres.pitr.server import RestoredServer
        from strongroom.sandbox.ports import free_port
        from strongroom.sandbox.postgres import chown_to_postgres

        repo_dir = self.last_base["strongroom"] / "sr-repo"
        base = self.work / f"pitr-strongroom-{run}"
        chown_to_postgres(base, 0o755)
        port = free_port()
        req = PitrRequest(
            target="bench",
            data_dir=str(base / "data"),
            start=True,
            port=port,
            socket_dir=str(base),
            wait_timeout_s=1800,
        )
        t0 = time.perf_counter()
        try:
            report = pitr_restore(
                bench_repo(repo_dir),
                bench_config(kind="local", path=str(repo_dir)),
                self.enc,
                req,
            )
            total = time.perf_counter() - t0
        finally:
            RestoredServer(base / "data", port, base, base / "data.pitr.log", "postgres").stop(
                "immediate"
            )
            _wait_no_process(str(base))
        record = {
            "contender": "strongroom",
            "run": run,
            "total_s": round(total, 3),
            "restore_s": report["extract"]["seconds"],
            "replay_s": report["recovery"]["seconds"],
            "replayed_to": report["recovery"]["replay_lsn"],
        }
        _log(f"pitr strongroom #{run}: total {total:.2f} s, replay {record['replay_s']} s")
        shutil.rmtree(base, ignore_errors=True)
        return record

    def pitr_pgbackrest(self, asynchronous: bool, run: int) -> dict[str, Any]:
        from strongroom.engines.postgres.pitr.server import RestoredServer
        from strongroom.sandbox.ports import free_port
        from strongroom.sandbox.postgres import chown_to_postgres

        name = "pgbackrest-async" if asynchronous else "pgbackrest"
        source = self.last_base[name] / "pgbr"
        base = self.work / f"pitr-{name}-{run}"
        chown_to_postgres(base, 0o755)
        data = base / "data"
        chown_to_postgres(data, 0o700)
        t0 = time.perf_counter()
        subprocess.run(
            [
                *pgbr_mod.as_postgres(),
                pgbr_mod.binary(),
                f"--config={source / 'pgbackrest.conf'}",
                f"--stanza={pgbr_mod.STANZA}",
                f"--pg1-path={data}",
                "--archive-mode=off",
                "restore",
            ],
            check=True,
            capture_output=True,
            cwd=base,
        )
        restore_s = time.perf_counter() - t0
        port = free_port()
        log = base / "pitr.log"
        log.touch()
        chown_to_postgres(log, 0o600)
        server = RestoredServer(data, port, base, log, "postgres")
        t1 = time.perf_counter()
        try:
            server.start(120)
            server.wait_recovery("promote", 1800)
            replay = time.perf_counter() - t1
            total = time.perf_counter() - t0
            lsn = server.psql("SELECT pg_current_wal_lsn()")
        finally:
            server.stop("immediate")
            _wait_no_process(str(source))
            _wait_no_process(str(base))
        record = {
            "contender": name,
            "run": run,
            "total_s": round(total, 3),
            "restore_s": round(restore_s, 3),
            "replay_s": round(replay, 3),
            "replayed_to": lsn,
        }
        _log(f"pitr {name} #{run}: total {total:.2f} s, replay {replay:.2f} s")
        shutil.rmtree(base, ignore_errors=True)
        return record

    # ---------------------------------------------------------------------- run

    def run(self) -> dict[str, Any]:
        repeats = 1 if self.quick else 5
        self.last_base: dict[str, Path] = {}
        self.setup()
        self.make_backlog()
        contenders = ["strongroom", "strongroom-sync", "pgbackrest", "pgbackrest-async"]
        drains: list[dict[str, Any]] = []
        for run in range(repeats):
            # rotate the order: the machine's background load drifts over minutes
            for contender in contenders[run % 4 :] + contenders[: run % 4]:
                drains.append(self.drain(contender, run))
                if run < repeats - 1:
                    shutil.rmtree(self.work / f"drain-{contender}-{run}", ignore_errors=True)
        drain_summary = {
            c: {
                "median_s": statistics.median(d["seconds"] for d in drains if d["contender"] == c),
                "median_segments_per_s": statistics.median(
                    d["segments_per_s"] for d in drains if d["contender"] == c
                ),
                "archive_mib": round(
                    max(d["archive_bytes"] for d in drains if d["contender"] == c) / MIB, 1
                ),
                "failures": sum(d["failed_count"] for d in drains if d["contender"] == c),
            }
            for c in contenders
        }
        pitrs: list[dict[str, Any]] = []
        for run in range(1 if self.quick else 3):
            order = [
                lambda r=run: self.pitr_strongroom(r),
                lambda r=run: self.pitr_pgbackrest(False, r),
                lambda r=run: self.pitr_pgbackrest(True, r),
            ]
            for measure in order[run % 3 :] + order[: run % 3]:
                pitrs.append(measure())
        pitr_names = ["strongroom", "pgbackrest", "pgbackrest-async"]
        pitr_summary = {
            c: {
                "median_total_s": statistics.median(
                    p["total_s"] for p in pitrs if p["contender"] == c
                ),
                "median_replay_s": statistics.median(
                    p["replay_s"] for p in pitrs if p["contender"] == c
                ),
            }
            for c in pitr_names
        }
        best_pgbr_drain = min(
            drain_summary["pgbackrest"]["median_s"], drain_summary["pgbackrest-async"]["median_s"]
        )
        best_sr_drain = min(
            drain_summary["strongroom"]["median_s"], drain_summary["strongroom-sync"]["median_s"]
        )
        best_pgbr_pitr = min(
            pitr_summary["pgbackrest"]["median_total_s"],
            pitr_summary["pgbackrest-async"]["median_total_s"],
        )
        self.result.update(
            {
                "drain_runs": drains,
                "drain": drain_summary,
                "pitr_runs": pitrs,
                "pitr": pitr_summary,
                "ratios": {
                    "wal_push_speedup_vs_pgbackrest_best": round(
                        best_pgbr_drain / best_sr_drain, 2
                    ),
                    "wal_push_async_speedup_vs_pgbackrest_async": round(
                        drain_summary["pgbackrest-async"]["median_s"]
                        / drain_summary["strongroom"]["median_s"],
                        2,
                    ),
                    "wal_push_sync_speedup_vs_pgbackrest_sync": round(
                        drain_summary["pgbackrest"]["median_s"]
                        / drain_summary["strongroom-sync"]["median_s"],
                        2,
                    ),
                    "pitr_speedup_vs_pgbackrest_best": round(
                        best_pgbr_pitr / pitr_summary["strongroom"]["median_total_s"], 2
                    ),
                    "replay_speedup_vs_pgbackrest_best": round(
                        min(
                            pitr_summary["pgbackrest"]["median_replay_s"],
                            pitr_summary["pgbackrest-async"]["median_replay_s"],
                        )
                        / pitr_summary["strongroom"]["median_replay_s"],
                        2,
                    ),
                },
                "versions": {"pgbackrest": pgbr_mod.version(), "wal_command": self.wal_cmd},
                "settings": {
                    "zstd_level_both": WAL_LEVEL,
                    "strongroom_push_parallel": 4,
                    "strongroom_fetch_prefetch": 8,
                    "pgbackrest_process_max": 2,
                    "repository": "local directory, same disk, fsync on write",
                },
                "notes": [
                    "ratios > 1: strongroom faster; drain = time from archive_command reload "
                    "until no .ready file is left (backlog method, FIELD-NOTES)",
                    "strongroom encrypts every WAL file (age) and checks WAL headers; "
                    "pgBackRest runs without a repository cipher",
                    "pitr total = restore command start to 'ready to accept connections' "
                    "after replaying the whole archive (target latest)",
                ],
                "finished_at": dt.datetime.now(dt.UTC).isoformat(),
                "load_at_end": os.getloadavg()[0],
            }
        )
        return self.result

    def cleanup(self) -> None:
        from strongroom.sandbox._process import remove_dir

        for server in self.servers:
            try:
                server.stop()
            except Exception as exc:  # keep cleaning up
                _log(f"stopping a server: {exc}")
        _wait_no_process(str(self.work), timeout=30)
        remove_dir(self.work)


def run(quick: bool) -> dict[str, Any]:
    """Run the PITR benchmark; returns the results (also written to bench/results/)."""
    reason = pgbr_mod.available()
    if reason is not None:
        return {"skipped": reason}
    bench = Bench(quick)
    try:
        result = bench.run()
    finally:
        bench.cleanup()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("pitr-quick.json" if quick else "pitr.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smaller WAL volume, one run each")
    args = parser.parse_args(argv)
    result = run(args.quick)
    print(json.dumps({k: result.get(k) for k in ("wal", "drain", "pitr", "ratios")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
