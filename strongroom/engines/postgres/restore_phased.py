"""Whole-database restores of a custom-format dump, its tables loading in parallel.

The restore's target is a scratch database that replaces the real one only after every
checksum and row count matched (``restore.py``), so pg_restore may write into it
directly: no ``psql`` in between and no single transaction around the whole load.

One pass over the artifact (signature, hash, decrypt, decompress, checksums) writes its
plaintext into a ``GrowingSpool`` on local disk, and the restore runs in pg_restore's
three sections while that pass is still reading. pg_restore only ever reads plaintext
from stored chunks that already matched the signed manifest (``VERIFY_CHUNK`` of
``strongroom.pipeline``): nothing a bucket writer forged runs, not even in the scratch
database. An artifact stored without chunk digests (older backups) is published
whole, once it is verified, and then restored the same way, without the overlap.

1. ``pre-data`` (types, tables, functions) and a listing of the data entries, both
   read from the spool's start (the archive's table of contents comes first);
2. ``data``: the tables are split into ``jobs`` groups of about equal size (bytes the
   manifest recorded, else rows) and one ``pg_restore -L`` per group loads its tables,
   each following the spool at its own pace; as soon as a group is loaded its row
   counts start and its tables' indexes and index-backed constraints are built while
   the other groups still load (``restore_groups.py``);
3. ``post-data`` (the rest: foreign keys, triggers, ...) with ``pg_restore -j jobs``
   from the complete spool, which is by then an ordinary, verified, seekable archive.

Every session runs with a larger ``maintenance_work_mem`` (index builds sort in memory)
and ``synchronous_commit=off`` (the swap's commit, with synchronous commit, flushes the
WAL of everything restored before it). Memory on the server: ``jobs`` times
``maintenance_work_mem``. Disk: the dump's raw size, in the temp folder (``TMPDIR``).
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from strongroom.artifacts import read_artifact
from strongroom.catalog import Manifest
from strongroom.config import EncryptionConfig, PostgresConnection
from strongroom.engines.postgres import inspection as pg_inspect
from strongroom.engines.postgres import relations as pg_relations
from strongroom.engines.postgres import toc as pg_toc
from strongroom.engines.postgres.backup import pg_tool
from strongroom.engines.postgres.connect import connect
from strongroom.engines.postgres.growing_spool import GrowingSpool
from strongroom.engines.postgres.relations import Key
from strongroom.engines.postgres.restore_groups import (
    GroupLoads,
    Producer,
    check,
    data_groups,
    follow,
)
from strongroom.pipeline import Progress
from strongroom.process import Tool
from strongroom.repository.base import Repository

SPOOL_MARGIN = 64 * 1024 * 1024


@dataclass(frozen=True)
class LoadOptions:
    """How a whole-database load runs (from the restore request)."""

    jobs: int
    memory_mb: int
    schema_only: bool
    no_owner: bool


def session_env(conn: PostgresConnection, database: str, memory_mb: int) -> dict[str, str]:
    """libpq environment of every restore session: the scratch database and its settings."""
    env = {**conn.libpq_env(), "PGDATABASE": database}
    ours = f"-c maintenance_work_mem={memory_mb}MB -c synchronous_commit=off"
    env["PGOPTIONS"] = f"{env.get('PGOPTIONS', '')} {ours}".strip()
    return env


class RowCounter:
    """Exact row counts of the restored tables, counted in the background as soon as a
    group of tables is loaded; ``finish`` counts what is left and returns them all."""

    def __init__(
        self, conn: PostgresConnection, database: str, entry: dict[str, Any], workers: int
    ) -> None:
        self._conn, self._database = conn, database
        self._only = pg_relations.counts_only(entry)
        self._expected = set(pg_relations.expected_rows(entry))
        self._by_oid = {
            int(t["oid"]): pg_relations.key_of(t) for t in entry["tables"] if t.get("oid")
        }
        self._submitted: set[Key] = set()
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="count")
        self._futures: list[Future[dict[Key, int]]] = []

    def submit_oids(self, oids: list[int]) -> None:
        self.submit([self._by_oid[o] for o in oids if o in self._by_oid])

    def submit(self, keys: list[Key]) -> None:
        todo = [k for k in keys if k in self._expected and k not in self._submitted]
        if todo:
            self._submitted.update(todo)
            self._futures.append(self._pool.submit(self._count, todo))

    def _count(self, keys: list[Key]) -> dict[Key, int]:
        with connect(self._conn, self._database) as c:
            return pg_inspect.count_rows(c, keys, only=self._only)

    def finish(self, keys: list[Key]) -> dict[Key, int]:
        self.submit(keys)
        counts: dict[Key, int] = {}
        try:
            for future in self._futures:
                counts.update(future.result())
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
        return counts

    def cancel(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def load_whole(
    repo: Repository,
    manifest: Manifest,
    entry: dict[str, Any],
    conn: PostgresConnection,
    enc: EncryptionConfig,
    scratch: str,
    options: LoadOptions,
    progress: Progress | None,
    phases: dict[str, float],
) -> dict[Key, int]:
    """A custom-format dump into the empty scratch database by pg_restore itself (no
    psql, no transaction around it: the swap is the commit); returns the row counts.

    In phases with ``jobs`` parallel loads when the spool fits on local disk, else one
    pg_restore straight from the artifact stream."""
    base = [pg_tool("pg_restore"), "--exit-on-error"] + (["--no-owner"] if options.no_owner else [])
    artifact = manifest.artifact(entry["artifact"])
    with tempfile.TemporaryDirectory(prefix="strongroom-restore-") as folder:
        if spool_fits(Path(folder), artifact.raw_size):
            return restore_phased(
                repo,
                manifest,
                entry,
                conn,
                enc,
                scratch,
                base,
                options,
                Path(folder),
                progress,
                phases,
            )
    env = session_env(conn, scratch, options.memory_mb)
    schema = ["--schema-only"] if options.schema_only else []
    tool = Tool(
        [*base, *schema, "-d", scratch], env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL
    )
    try:
        assert tool.proc.stdin is not None
        sink = pg_toc.DrainingSink(tool.proc.stdin)
        started = time.monotonic()
        read_artifact(repo, artifact, sink, encryption=enc, progress=progress)
        sink.close()
        tool.check(f"pg_restore into {scratch!r}")
        phases["one_stream_s"] = round(time.monotonic() - started, 3)
    finally:
        tool.kill()
    if options.schema_only:
        return {}
    started = time.monotonic()
    counter = RowCounter(conn, scratch, entry, options.jobs)
    counts = counter.finish(sorted(pg_relations.expected_rows(entry)))
    phases["row_counts_s"] = round(time.monotonic() - started, 3)
    return counts


def spool_fits(folder: Path, raw_size: int) -> bool:
    """Whether the dump's plaintext fits in ``folder`` with room to spare."""
    import shutil

    return shutil.disk_usage(folder).free >= raw_size + SPOOL_MARGIN


def restore_phased(
    repo: Repository,
    manifest: Manifest,
    entry: dict[str, Any],
    conn: PostgresConnection,
    enc: EncryptionConfig,
    database: str,
    base_args: list[str],
    options: LoadOptions,
    folder: Path,
    progress: Progress | None,
    phases: dict[str, float],
) -> dict[Key, int]:
    """Restore ``entry`` into the empty ``database`` in the three phases; returns the
    restored row counts and records each phase's seconds in ``phases``."""
    started = time.monotonic()

    def mark(name: str, since: float) -> float:
        now = time.monotonic()
        phases[name] = round(now - since, 3)
        return now

    jobs, schema_only = options.jobs, options.schema_only
    artifact = manifest.artifact(entry["artifact"])
    env = session_env(conn, database, options.memory_mb)
    base_args = [*base_args, "-d", database]
    spool = GrowingSpool(folder / "archive.pgdump")
    producer = Producer(
        lambda: read_artifact(
            repo,
            artifact,
            spool,
            encryption=enc,
            holdback=0,
            progress=progress,
            on_verified=spool.publish,
        ),
        spool,
    )
    counter = RowCounter(conn, database, entry, jobs)
    tools: list[Tool] = []
    done = False
    producer.start()
    try:
        with tempfile.TemporaryFile() as listing_out:
            listing = follow(
                [pg_tool("pg_restore"), "-l", "--section=data"], env, spool, listing_out
            )
            pre = follow([*base_args, "--section=pre-data"], env, spool, subprocess.DEVNULL)
            tools += [listing, pre]
            check(listing, "pg_restore -l of the archive", producer)
            check(pre, f"pg_restore of the definitions into {database!r}", producer)
            at = mark("definitions_s", started)
            listing_out.seek(0)
            text = listing_out.read().decode("utf-8", "replace")
        groups = [] if schema_only else data_groups(text, entry, jobs)
        loads = GroupLoads(base_args, env, spool, folder, producer, counter, tools, database, entry)
        loads.run(groups, pg_tool("pg_restore"))
        at = mark("table_data_and_early_indexes_s", at)
        producer.join()
        phases["read_and_verify_s"] = round(producer.finished - started, 3)
        if producer.error is not None:
            raise producer.error
        rest = loads.remaining_post_data()
        post = Tool(
            [*base_args, "--section=post-data", f"-j{jobs}"]
            + (["-L", str(rest)] if rest is not None else [])
            + [str(spool.path)],
            env,
            stdout=subprocess.DEVNULL,
        )
        tools.append(post)
        post.check(f"pg_restore -j{jobs} of indexes and constraints into {database!r}")
        at = mark("indexes_and_constraints_s", at)
        counts = {} if schema_only else counter.finish(sorted(pg_relations.expected_rows(entry)))
        mark("row_counts_wait_s", at)
        done = True
        return counts
    finally:
        if not done:
            spool.abort()
            counter.cancel()
            for tool in tools:
                tool.kill()
        producer.join(timeout=30)
