"""The cluster and the two contenders of ``bench.pg_incremental_bench``: one archiving
PostgreSQL 15 cluster whose WAL goes to both a strongroom repository and a pgBackRest
stanza, and each contender's backup, restore and files-only (delta) restore as one call.

Kept apart from the benchmark's rounds and figures so each module stays readable; every
step here returns its own ``seconds`` (what is timed, without the bookkeeping around it).
"""

from __future__ import annotations

import datetime as dt
import inspect
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import pgbackrest as pgbr_mod
from bench.pitr_bench import _wait_no_process
from bench.run import wait_archived
from bench.signing import bench_config, bench_repo

DATABASE = "bench"
TARGET = "bench"
PGBENCH_TABLES = ("pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history")
ROWS_PER_SCALE = 100_000
# pgbench: ~15 MiB per scale unit (pgbench_accounts heap + primary key), plus ~7.5 MiB of
# an empty database's catalogs
MIB_PER_SCALE = 15.0
EMPTY_DB_MIB = 7.5


def pgbench_scale(size_mib: int) -> int:
    return max(1, round((size_mib - EMPTY_DB_MIB) / MIB_PER_SCALE))


def fingerprint_sql(tables: tuple[str, ...]) -> str:
    """One line: per table, its rows and the sum of a 64-bit hash of every row (order
    independent, so cheap on millions of rows)."""
    parts = [
        f"(SELECT '{t}=' || count(*) || ':' || coalesce(sum(hashtextextended(x::text, 0)), 0)"
        f" FROM {t} x)"
        for t in tables
    ]
    return "SELECT concat_ws(';', " + ", ".join(parts) + ")"


def accepts(fn: Callable[..., Any], name: str) -> bool:
    return name in inspect.signature(fn).parameters


class Contenders:
    """The source cluster, strongroom's repository and pgBackRest's stanza."""

    def __init__(self, log: Callable[[str], None], jobs: int = 2) -> None:
        from pydantic import SecretStr
        from pyrage import x25519

        from strongroom.config import EncryptionConfig
        from strongroom.engines.postgres.pitr.files.restore import restore_files_backup
        from strongroom.sandbox._process import make_temp_dir
        from strongroom.sandbox.postgres import chown_to_postgres

        self.log = log
        self.jobs = jobs
        self.work = make_temp_dir("pg-incr-bench")
        chown_to_postgres(self.work, 0o755)
        identity = x25519.Identity.generate()
        self.enc = EncryptionConfig(
            recipients=[str(identity.to_public())], identities=[SecretStr(str(identity))]
        )
        self.restore_files_backup = restore_files_backup
        self.src: Any = None
        self.rows = 0

    # -------------------------------------------------------------------- setup

    def setup(self, scale: int) -> None:
        from pydantic import SecretStr

        from strongroom.config import PostgresConnection
        from strongroom.engines.postgres.backup import pg_tool
        from strongroom.engines.postgres.pitr.restore import default_wal_command
        from strongroom.engines.postgres.wal.config import load_wal_config, write_wal_config
        from strongroom.engines.postgres.wal.fast import archive_command
        from strongroom.sandbox.postgres import PostgresServer, chown_to_postgres

        self.sr_dir = self.work / "sr-repo"
        chown_to_postgres(self.sr_dir)
        self.repo_config = bench_config(kind="local", path=str(self.sr_dir))
        self.repo = bench_repo(self.sr_dir)
        wal_cfg = write_wal_config(
            self.work / "wal.toml",
            target=TARGET,
            repository=self.repo_config,
            recipients=self.enc.recipients,
            owner="postgres",
            push={"parallel": 2, "linger_seconds": 1.0},
        )
        self.wal_cmd = default_wal_command("postgres")
        sr_archive = archive_command(
            self.wal_cmd, str(wal_cfg), load_wal_config(str(wal_cfg)).repo_id
        )
        self.level = self.repo_config.compression_level
        self.pgbr = pgbr_mod.PgBackRest(
            self.work / "pgbr", process_max=self.jobs, compress_level=self.level
        )
        self.archive = f"( {sr_archive} ) && {self.pgbr.archive_command()}"
        self.src = PostgresServer(
            self.work / "src",
            archive_command=self.archive,
            settings={
                "autovacuum": "off",
                "archive_timeout": 0,
                "max_wal_size": "2GB",
                "checkpoint_timeout": "30min",
                "shared_buffers": "256MB",
            },
        )
        self.src.start()
        src = self.src
        self.pgbr.write_config(data_dir=src.data_dir, port=src.port, socket_dir=src.socket_dir)
        self.log("pgBackRest stanza-create + check")
        self.pgbr.stanza_create()
        self.conn = PostgresConnection(
            name=TARGET, host=src.host, port=src.port, password=SecretStr(src.password)
        )
        # the load's WAL is discarded (no backup needs it): archiving it twice would only
        # make the setup slower
        src.psql("ALTER SYSTEM SET archive_command = '/bin/true'; SELECT pg_reload_conf();")
        src.create_database(DATABASE)
        self.log(f"pgbench -i -s {scale}")
        t0 = time.perf_counter()
        subprocess.run(
            [pg_tool("pgbench"), "-i", "-q", "-I", "dtGvp", "-s", str(scale), DATABASE],
            env=src.libpq_env(DATABASE),
            check=True,
            capture_output=True,
        )
        src.psql("CHECKPOINT")
        src.psql("ALTER SYSTEM RESET archive_command; SELECT pg_reload_conf();")
        time.sleep(0.5)
        wait_archived(src)
        self.rows = scale * ROWS_PER_SCALE
        self.load_s = round(time.perf_counter() - t0, 1)
        self.log(f"loaded in {self.load_s} s")
        time.sleep(1.1)  # a cluster older than a second, as clusters are

    def change_slice(self, r: int, share: float) -> tuple[int, int]:
        """A contiguous ``share`` of pgbench_accounts by aid, a different one each round."""
        count = max(1, int(self.rows * share))
        slices = max(1, self.rows // count)
        lo = (r % slices) * count + 1
        return lo, lo + count - 1

    def change(self, lo: int, hi: int) -> None:
        self.src.psql(
            f"UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid BETWEEN {lo} AND {hi}",
            db=DATABASE,
        )
        self.src.psql("CHECKPOINT")

    def fingerprint(self) -> str:
        return str(self.src.psql(fingerprint_sql(PGBENCH_TABLES), db=DATABASE))

    # ------------------------------------------------------------------ backups

    def sr_backup(self, kind: str) -> dict[str, Any]:
        from strongroom.engines.postgres.pitr.files.backup import files_backup_postgres, summary

        extra: dict[str, Any] = {}
        if accepts(files_backup_postgres, "jobs"):
            extra["jobs"] = self.jobs
        t0 = time.perf_counter()
        manifest = files_backup_postgres(
            self.conn,
            self.repo,
            self.repo_config,
            self.enc,
            data_directory=str(self.src.data_dir),
            backup_type=kind,
            wal_timeout_s=1800,
            **extra,
        )
        seconds = time.perf_counter() - t0
        d = manifest.details
        stopped = dt.datetime.fromisoformat(d["stop_time"])
        return {
            "seconds": round(seconds, 3),
            "jobs": extra.get("jobs"),
            **summary(manifest),
            # pg_backup_start (fast checkpoint) .. pg_backup_stop returned: the copy
            "start_to_stop_s": round((stopped - manifest.started_at).total_seconds(), 3),
            # then until its WAL was in the repository and the manifest published
            "stop_to_published_s": round((manifest.finished_at - stopped).total_seconds(), 3),
        }

    def pgbr_backup(self, kind: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.pgbr.run(f"--type={kind}", "backup", timeout=7200)
        seconds = time.perf_counter() - t0
        info = self.pgbr.latest_backup()
        if info.get("type") != kind:
            raise RuntimeError(f"pgbackrest took a {info.get('type')} backup, not {kind}")
        return {
            "seconds": round(seconds, 3),
            "label": info["label"],
            "type": info["type"],
            "stored_bytes": info["info"]["repository"]["delta"],
            "repo_size_bytes": info["info"]["repository"]["size"],
            "copied_bytes": info["info"]["delta"],
            "db_bytes": info["info"]["size"],
            "prior": info.get("prior"),
        }

    # ----------------------------------------------------------------- restores

    def sr_restore(self, backup_id: str, r: int) -> dict[str, Any]:
        """pitr_restore of ``backup_id`` to its consistency point, promoted."""
        from strongroom.engines.postgres.pitr.plan import PitrRequest
        from strongroom.engines.postgres.pitr.restore import pitr_restore
        from strongroom.engines.postgres.pitr.server import RestoredServer
        from strongroom.sandbox.ports import free_port
        from strongroom.sandbox.postgres import chown_to_postgres

        base = self.work / f"sr-restore-{r}"
        chown_to_postgres(base, 0o755)
        port = free_port()
        extra: dict[str, Any] = {}
        if "jobs" in PitrRequest.model_fields:
            extra["jobs"] = self.jobs
        req = PitrRequest(
            target=TARGET,
            data_dir=str(base / "data"),
            backup_id=backup_id,
            recovery_target="immediate",
            start=True,
            port=port,
            socket_dir=str(base),
            wait_timeout_s=3600,
            **extra,
        )
        t0 = time.perf_counter()
        try:
            report = pitr_restore(self.repo, self.repo_config, self.enc, req)
            seconds = time.perf_counter() - t0
            rec = report["recovery"]
            server = RestoredServer(
                base / "data", port, Path(rec["socket_dir"]), Path(rec["log"]), "postgres"
            )
            fingerprint = server.psql(fingerprint_sql(PGBENCH_TABLES), database=DATABASE)
        finally:
            RestoredServer(base / "data", port, base, base / "data.pitr.log", "postgres").stop(
                "immediate"
            )
            _wait_no_process(str(base))
        shutil.rmtree(base, ignore_errors=True)
        return {
            "seconds": round(seconds, 3),
            "jobs": extra.get("jobs"),
            "files_s": report["extract"].get("seconds"),
            "recovery_s": rec.get("seconds"),
            "files_bytes": report["extract"].get("bytes"),
            "fingerprint": fingerprint,
        }

    def pgbr_restore(self, label: str, r: int) -> dict[str, Any]:
        """pgbackrest restore of ``label`` to its consistency point, started, promoted."""
        from strongroom.engines.postgres.pitr.server import RestoredServer
        from strongroom.sandbox.ports import free_port
        from strongroom.sandbox.postgres import chown_to_postgres

        base = self.work / f"pgbr-restore-{r}"
        chown_to_postgres(base, 0o755)
        data = base / "data"
        chown_to_postgres(data, 0o700)
        log = base / "server.log"
        log.touch()
        chown_to_postgres(log, 0o600)
        server = RestoredServer(data, free_port(), base, log, "postgres")
        t0 = time.perf_counter()
        try:
            self._pgbr_restore(label, data)
            files_s = time.perf_counter() - t0
            server.start(120)
            server.wait_recovery("promote", 3600)
            seconds = time.perf_counter() - t0
            fingerprint = server.psql(fingerprint_sql(PGBENCH_TABLES), database=DATABASE)
        finally:
            server.stop("immediate")
            _wait_no_process(str(base))
        shutil.rmtree(base, ignore_errors=True)
        return {
            "seconds": round(seconds, 3),
            "files_s": round(files_s, 3),
            "recovery_s": round(seconds - files_s, 3),
            "fingerprint": fingerprint,
        }

    def _pgbr_restore(self, label: str, data: Path, *, delta: bool = False) -> None:
        subprocess.run(
            self.pgbr.command(
                f"--pg1-path={data}",
                f"--set={label}",
                "--type=immediate",
                "--target-action=promote",
                "--archive-mode=off",
                *(["--delta"] if delta else []),
                "restore",
            ),
            check=True,
            capture_output=True,
            cwd=self.pgbr.base,
            env=pgbr_mod._clean_env(),
            timeout=7200,
        )

    def sr_files(self, backup_id: str, data: Path, *, delta: bool = False) -> dict[str, Any]:
        """restore_files_backup of ``backup_id`` into ``data`` (empty, or with ``delta``
        a copy of an older backup of the cluster): files only."""
        extra: dict[str, Any] = {"delta": True} if delta else {}
        if accepts(self.restore_files_backup, "jobs"):
            extra["jobs"] = self.jobs
        t0 = time.perf_counter()
        report = self.restore_files_backup(
            self.repo, self.enc, TARGET, backup_id, str(data), os_user="postgres", **extra
        )
        seconds = time.perf_counter() - t0
        keep = ("files", "bytes", "fetched", "fetched_bytes", "removed", "kept", "unchanged")
        return {
            "seconds": round(seconds, 3),
            "jobs": extra.get("jobs"),
            **{k: v for k, v in report.items() if k in keep or k.startswith(("delta", "skipped"))},
        }

    def pgbr_files(self, label: str, data: Path, *, delta: bool = False) -> dict[str, Any]:
        from strongroom.sandbox.postgres import chown_to_postgres

        if not delta:
            chown_to_postgres(data, 0o700)
        t0 = time.perf_counter()
        self._pgbr_restore(label, data, delta=delta)
        return {"seconds": round(time.perf_counter() - t0, 3)}

    # --------------------------------------------------------------------- misc

    def end_round(self) -> None:
        """Untimed: pgBackRest keeps only the newest full (and what depends on it)."""
        self.pgbr.expire_all_but_latest()

    def settings(self, jobs: int) -> dict[str, Any]:
        from strongroom.engines.postgres.pitr.files.backup import files_backup_postgres
        from strongroom.engines.postgres.pitr.plan import PitrRequest

        return {
            "jobs": jobs,
            "strongroom_backup_jobs_supported": accepts(files_backup_postgres, "jobs"),
            "strongroom_restore_files_jobs_supported": accepts(self.restore_files_backup, "jobs"),
            "strongroom_pitr_jobs_supported": "jobs" in PitrRequest.model_fields,
            "strongroom_delta_supported": accepts(self.restore_files_backup, "delta"),
            "pgbackrest_process_max": self.pgbr.process_max,
            "compression": f"zstd level {self.level} (both)",
            "strongroom_encryption": "age (one X25519 recipient)",
            "pgbackrest_cipher": "none",
            "repository": "local directory, same disk",
            "archive_command": "strongroom-wal push (async pusher, 2 in flight), then "
            "pgbackrest archive-push (sync)",
            "source_settings": {
                "autovacuum": "off",
                "shared_buffers": "256MB",
                "max_wal_size": "2GB",
                "checkpoint_timeout": "30min",
            },
            "load_s": getattr(self, "load_s", None),
        }

    def cleanup(self) -> None:
        from strongroom.sandbox._process import remove_dir

        if self.src is not None:
            try:
                self.src.stop()
            except Exception as exc:  # keep cleaning up
                self.log(f"stopping the source: {exc}")
        _wait_no_process(str(self.work), timeout=30)
        remove_dir(self.work)
