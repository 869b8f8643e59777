"""One strongroom PostgreSQL backup in its own process, so its peak RSS can be measured.

Run as ``python -m bench._strongroom_child``; reads a JSON job from stdin (the password
travels there, never in argv) and writes a JSON result to the job's ``result_path``.
Heavy imports happen inside ``main`` so the import time is measured separately.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, cast

# Where the in-process time goes: seconds and calls per probe (see ``_instrument``).
TIMERS: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)


def _timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMERS[name] += time.perf_counter() - start
            CALLS[name] += 1

    return wrapper


class _TimedSource:
    """Wraps pg_dump's stdout: time blocked waiting for the dump, bytes per read."""

    def __init__(self, source: Any) -> None:
        self._source = source

    def read(self, n: int = -1) -> bytes:
        start = time.perf_counter()
        data: bytes = self._source.read(n)
        TIMERS["read_from_pg_dump"] += time.perf_counter() - start
        CALLS["read_from_pg_dump"] += 1
        CALLS["bytes_from_pg_dump"] += len(data)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)


class _TimedWriter:
    """Wraps a repository ObjectWriter: time in write() and in commit() (fsync, rename)."""

    def __init__(self, writer: Any) -> None:
        self._writer = writer
        self.write = _timed("repository_write", writer.write)
        self.commit = _timed("repository_commit_fsync", writer.commit)

    def __enter__(self) -> _TimedWriter:
        self._writer.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._writer.__exit__(*exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)


def _instrument() -> None:
    """Wrap the engine's steps with timers (cheap: a few calls per backup, one per read)."""
    import strongroom.engines.postgres.backup as engine
    from strongroom.catalog import Catalog
    from strongroom.engines.postgres import psql as pg_psql

    store = engine.store_artifact

    def store_artifact(repo: Any, key: str, source: Any, **kwargs: Any) -> Any:
        return store(repo, key, cast(IO[bytes], _TimedSource(source)), **kwargs)

    engine.store_artifact = _timed("store_artifact_total", store_artifact)
    engine.publish_backup = _timed("publish_backup", engine.publish_backup)
    pg_psql.open_session = _timed("psql_session_connect", pg_psql.open_session)
    pg_psql.server_and_databases = _timed("server_facts", pg_psql.server_and_databases)
    pg_psql.count_rows_result = _timed("count_rows_parse", pg_psql.count_rows_result)
    Catalog.write = _timed("catalog_write", Catalog.write)  # type: ignore[method-assign]


def _hwm_kib() -> int:
    """Peak RSS of this process's own memory (VmHWM). Unlike ru_maxrss it cannot include
    the parent's RSS inherited through vfork+exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


def main() -> int:
    t_entry = time.time()
    job: dict[str, Any] = json.loads(sys.stdin.read())

    from pydantic import SecretStr

    from bench.signing import bench_config
    from strongroom.config import EncryptionConfig, PostgresConnection
    from strongroom.engines.postgres.backup import backup_postgres
    from strongroom.fast_exit import freeze_heap
    from strongroom.repository.local import LocalRepository

    class TimedRepository(LocalRepository):
        def open_write(self, key: str, settings: Any = None) -> Any:
            return _TimedWriter(super().open_write(key, settings))

    _instrument()
    t_imported = time.time()
    out = Path(job["out_dir"])
    enc = EncryptionConfig(recipients=[job["recipient"]])
    conn = PostgresConnection(
        name="bench",
        host=job["host"],
        port=job["port"],
        user=job["user"],
        password=SecretStr(job["password"]),
        databases=[job["database"]],
    )
    repo_cfg = bench_config(kind="local", path=str(out), compression_level=job["level"])
    manifest = backup_postgres(
        conn, TimedRepository(out, trust=repo_cfg.trust()), repo_cfg, enc, include_globals=False
    )
    t_done = time.time()
    rows = sum(table["rows"] for db in manifest.details["databases"] for table in db["tables"])
    self_usage = resource.getrusage(resource.RUSAGE_SELF)
    children_usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = {
        "t_entry": t_entry,
        "t_imported": t_imported,
        "t_done": t_done,
        "started_at": manifest.started_at.timestamp(),
        "finished_at": manifest.finished_at.timestamp(),
        "in_process_s": (manifest.finished_at - manifest.started_at).total_seconds(),
        "backup_id": manifest.backup_id,
        "rows": rows,
        "tables": sum(len(db["tables"]) for db in manifest.details["databases"]),
        "raw_size": manifest.raw_size,
        "stored_size": manifest.stored_size,
        "artifacts": len(manifest.artifacts),
        "self_hwm_kib": _hwm_kib(),
        # Linux reports ru_maxrss in KiB
        "self_maxrss_kib": self_usage.ru_maxrss,
        "self_cpu_user_s": self_usage.ru_utime,
        "self_cpu_sys_s": self_usage.ru_stime,
        "children_maxrss_kib": children_usage.ru_maxrss,
        "children_cpu_user_s": children_usage.ru_utime,
        "children_cpu_sys_s": children_usage.ru_stime,
        "probes_s": dict(TIMERS),
        "probe_calls": dict(CALLS),
    }
    Path(job["result_path"]).write_text(json.dumps(result))
    freeze_heap()  # the process ends now, as the strongroom CLI's does
    return 0


if __name__ == "__main__":
    sys.exit(main())
