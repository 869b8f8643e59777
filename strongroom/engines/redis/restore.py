"""Redis restore: ``live`` into a running server, or ``file`` with a coordinated restart.

Everything that can be checked is checked before the target changes: the
backup exists and is readable, its RDB version is one the target (and the
runner's own redis-server) can load, the target's databases exist, and the
target holds no keys in the restore's scope unless ``flush_existing`` says it
may. The backup is then loaded into a scratch ``redis-server`` (which proves
the checksums, the decryption and the RDB itself) before the first write to
the target.

live
    scratch server -> target in batches, TTLs included: pipelined PTTL+DUMP /
    ``RESTORE ... REPLACE`` on bare sockets (default, fastest measured), or
    ``MIGRATE host port "" db timeout COPY REPLACE [AUTH|AUTH2] KEYS ...``
    server to server (``copy_method="migrate"``). Logical backups are
    replayed into the scratch server with ``RESTORE ... REPLACE ABSTTL`` first.
    ``key_pattern`` restores the keys matching a Redis glob; ``dbs`` a subset
    of the databases.
file
    the RDB is written next to the server's data file and proven loadable by
    a scratch server; then the server is stopped (the configured command, or
    its StatefulSet scaled to 0 through the Kubernetes API, see redis_k8s),
    the old file is kept as ``<file>.pre-restore-<backup id>``, the new one is
    renamed into place and the server started again (the start command, or
    the StatefulSet scaled back to its replica count); strongroom waits until
    it has finished LOADING. A failure once the server is down puts the old
    file back and starts the server again.

Afterwards key counts per database are compared with the backup as loaded and
with the manifest, and a sample of values is compared key by key.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any, Literal

import redis
from pydantic import BaseModel, Field

from strongroom.artifacts import read_artifact
from strongroom.catalog import Catalog, Manifest
from strongroom.config import EncryptionConfig
from strongroom.engines.redis.backup import ENGINE
from strongroom.engines.redis.conn import (
    MAX_DB,
    RedisConnection,
    check_pattern,
    config_value,
    is_refusal,
    keyspace,
    redis_errors,
    server_info,
)
from strongroom.engines.redis.k8s import K8sSettings, StatefulSetRestart
from strongroom.engines.redis.key_copy import (
    RespSocket,
    any_key,
    compare_samples,
    count_keys,
    flush_scope,
    migrate_keys,
    pipeline_copy,
    sample_digests,
    wait_down,
    wait_ready,
)
from strongroom.engines.redis.logical import LogicalParser
from strongroom.engines.redis.rdb import first_release, max_rdb_version
from strongroom.engines.redis.scratch import ScratchRedis, local_redis_version
from strongroom.errors import (
    IntegrityError,
    InvalidInput,
    NotFound,
    StrongroomError,
    TargetNotEmpty,
    ToolFailed,
)
from strongroom.pipeline import Progress
from strongroom.private_files import create_private, minimal_env, private_folder
from strongroom.redact import register, scrub
from strongroom.repository.base import Repository

COMMAND_TIMEOUT = 600.0


class RdbVersionTooNew(InvalidInput):
    """The backup was written by a newer Redis than the one that would load it."""


class RedisRestoreRequest(BaseModel):
    """What to restore and how; every field is validated before anything changes."""

    backup_id: str = "latest"
    source_target: str | None = Field(
        default=None, description="target the backup was taken from (default: this target)"
    )
    mode: Literal["live", "file"] = "live"
    flush_existing: bool = Field(
        default=False,
        description="allow removing keys the target holds in the restore's scope",
    )
    key_pattern: str | None = Field(default=None, description="Redis glob (live mode)")
    dbs: list[int] = Field(default_factory=list, description="databases (live mode)")
    copy_method: Literal["auto", "pipeline", "migrate"] = Field(
        default="auto", description="auto = pipeline (pipelined DUMP/RESTORE); or MIGRATE"
    )
    batch_size: int = Field(default=1000, ge=1, le=100_000)
    sample_size: int = Field(default=20, ge=0, le=10_000)
    keep_previous: bool = Field(
        default=True, description="file mode: keep the replaced data file next to it"
    )
    scratch_dir: str | None = Field(default=None, description="parent folder for scratch data")
    dry_run: bool = False


def _check_versions(manifest: Manifest, target_version: str, *, local: bool) -> dict[str, Any]:
    rdb_version = int(manifest.details.get("rdb_version") or 0)
    target_max = max_rdb_version(target_version)
    facts: dict[str, Any] = {
        "rdb_version": rdb_version,
        "target_version": target_version,
        "target_max_rdb_version": target_max,
    }
    if rdb_version > target_max:
        raise RdbVersionTooNew(
            f"backup {manifest.backup_id} holds RDB version {rdb_version} (written by "
            f"{first_release(rdb_version)} or later, source Redis "
            f"{manifest.details.get('redis_version')}); the target runs Redis {target_version}, "
            f"which loads RDB versions up to {target_max}. Nothing was changed: restore into "
            "a Redis at least as new as the source"
        )
    if local:
        local_version = local_redis_version()
        local_max = max_rdb_version(local_version)
        facts["scratch_version"] = local_version
        if rdb_version > local_max:
            raise RdbVersionTooNew(
                f"backup {manifest.backup_id} holds RDB version {rdb_version}; this runner's "
                f"redis-server {local_version} loads up to {local_max}, so it cannot stage "
                "the backup. Nothing was changed: use a runner image with a newer redis-server"
            )
        if local_max > target_max:
            raise RdbVersionTooNew(
                f"this runner's redis-server {local_version} writes RDB {local_max} values "
                f"that the target (Redis {target_version}, RDB <= {target_max}) cannot "
                "RESTORE. Nothing was changed: use a runner with a redis-server no newer than "
                "the target, or mode=file"
            )
    return facts


def _scope(req: RedisRestoreRequest, conn: RedisConnection, backup_ks: dict[int, int]) -> list[int]:
    for db in req.dbs:
        if not 0 <= db <= MAX_DB:
            raise InvalidInput(f"db index {db} out of range 0..{MAX_DB}")
        if db not in backup_ks:
            raise NotFound(
                f"db {db} holds no keys in the backup; it has: "
                f"{', '.join(map(str, sorted(backup_ks))) or '(no keys at all)'}"
            )
    if req.dbs:
        return sorted(set(req.dbs))
    if conn.dbs:
        return [db for db in conn.dbs if db in backup_ks]
    return sorted(backup_ks)


def _target_dbs_exist(conn: RedisConnection, dbs: list[int]) -> None:
    for db in dbs:
        client = conn.client(db)
        try:
            client.ping()
        except redis.ResponseError as exc:
            if "out of range" in str(exc) or "invalid DB" in str(exc):
                raise InvalidInput(
                    f"the target has no database {db} (its 'databases' setting is lower)"
                ) from None
            with redis_errors(f"selecting db {db} on the target"):
                raise
        except redis.RedisError:
            with redis_errors(f"selecting db {db} on the target"):
                raise
        finally:
            client.close()


def _target_counts(conn: RedisConnection, dbs: list[int], pattern: str | None) -> dict[int, int]:
    out: dict[int, int] = {}
    for db in dbs:
        client = conn.client(db)
        try:
            with redis_errors(f"counting keys in db {db} of the target"):
                out[db] = count_keys(client, pattern) if pattern else int(client.dbsize())
        finally:
            client.close()
    return out


_RESTORE_ABS = (
    b"*6\r\n$7\r\nRESTORE\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n"
    b"$7\r\nREPLACE\r\n$6\r\nABSTTL\r\n"
)


class _Replayer:
    """Replays logical records into the scratch server: RESTORE ... REPLACE ABSTTL, pipelined."""

    def __init__(self, conn: RedisConnection, batch: int) -> None:
        self.conn = conn
        self.batch = batch
        self.db: int | None = None
        self.pending: list[bytes] = []
        self.restored = 0
        self.expired = 0
        self._sockets: dict[int, RespSocket] = {}

    def on_key(self, db: int, key: bytes, expire_at: int, payload: bytes) -> None:
        if db != self.db:
            self.flush()
            self.db = db
        if 0 <= expire_at <= int(time.time() * 1000):
            self.expired += 1
            return
        ttl = b"%d" % max(expire_at, 0)  # 0 with ABSTTL: no expiry
        self.pending.append(_RESTORE_ABS % (len(key), key, len(ttl), ttl, len(payload), payload))
        if len(self.pending) >= self.batch:
            self.flush()

    def flush(self) -> None:
        if not self.pending or self.db is None:
            return
        sock = self._sockets.get(self.db)
        if sock is None:
            sock = self._sockets[self.db] = RespSocket(self.conn, self.db)
        sock.send(b"".join(self.pending))
        for reply in sock.replies(len(self.pending)):
            if isinstance(reply, Exception):
                raise IntegrityError(
                    f"the scratch server rejected a value from the logical dump: {reply}"
                )
        self.restored += len(self.pending)
        self.pending.clear()

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()


def _load_scratch(
    scratch: ScratchRedis,
    repo: Repository,
    manifest: Manifest,
    enc: EncryptionConfig,
    batch: int,
    progress: Progress | None,
) -> dict[str, Any]:
    """Stage the backup in the scratch server; every checksum is checked on the way."""
    artifact = manifest.artifacts[0]
    started = time.monotonic()
    facts: dict[str, Any] = {}
    if manifest.kind == "rdb":
        with create_private(scratch.rdb_path) as handle:
            read_artifact(repo, artifact, handle, encryption=enc, progress=progress)
        scratch.start(timeout=120.0 + artifact.raw_size / (20 * 1024 * 1024))
    else:
        scratch.start()
        replayer = _Replayer(scratch.connection(), batch)
        parser = LogicalParser(replayer.on_key)
        try:
            with redis_errors("replaying the logical dump into the scratch server"):
                read_artifact(repo, artifact, parser, encryption=enc, progress=progress)
                replayer.flush()
            parser.finish()
        finally:
            replayer.close()
        facts["expired_since_backup"] = replayer.expired
    facts["load_s"] = round(time.monotonic() - started, 3)
    return facts


def _scratch_state(
    scratch: ScratchRedis, dbs: list[int], pattern: str | None, sample_size: int
) -> tuple[dict[int, int], dict[int, dict[bytes, dict[str, Any]]]]:
    counts: dict[int, int] = {}
    samples: dict[int, dict[bytes, dict[str, Any]]] = {}
    conn = scratch.connection()
    for db in dbs:
        client = conn.client(db)
        try:
            with redis_errors(f"reading db {db} of the scratch server"):
                counts[db] = count_keys(client, pattern)
                samples[db] = sample_digests(client, pattern, sample_size)
        finally:
            client.close()
    return counts, samples


def _key_checks(
    dbs: list[int],
    expected: dict[int, int],
    loaded: dict[int, int],
    restored: dict[int, int],
    pattern: str | None,
) -> list[dict[str, Any]]:
    rows = []
    for db in dbs:
        manifest_n = None if pattern else expected.get(db)
        rows.append(
            {
                "db": db,
                "manifest": manifest_n,
                "loaded": loaded.get(db),
                "restored": restored.get(db),
                "ok": restored.get(db) == loaded.get(db),
                "matches_manifest": None if manifest_n is None else manifest_n == restored.get(db),
            }
        )
    return rows


def _verify_target(
    conn: RedisConnection,
    dbs: list[int],
    pattern: str | None,
    expected: dict[int, int],
    loaded: dict[int, int],
    samples: dict[int, dict[bytes, dict[str, Any]]],
) -> dict[str, Any]:
    restored = _target_counts(conn, dbs, pattern)
    checks = _key_checks(dbs, expected, loaded, restored, pattern)
    mismatched: list[dict[str, Any]] = []
    checked = 0
    for db in dbs:
        client = conn.client(db)
        try:
            with redis_errors(f"comparing sample values in db {db}"):
                mismatched += compare_samples(client, samples.get(db, {}), db)
                checked += len(samples.get(db, {}))
        finally:
            client.close()
    result = {
        "key_checks": checks,
        "keys_ok": all(c["ok"] for c in checks),
        "matches_manifest": all(c["matches_manifest"] is not False for c in checks),
        "sample": {"checked": checked, "mismatched": mismatched, "ok": not mismatched},
    }
    return result


def _fail_if_bad(report: dict[str, Any]) -> None:
    if not report["keys_ok"]:
        bad = [c for c in report["key_checks"] if not c["ok"]]
        raise IntegrityError(f"restored key counts differ from the backup: {bad[:5]}")
    if not report["sample"]["ok"]:
        raise IntegrityError(
            f"restored values differ from the backup: {report['sample']['mismatched'][:5]}"
        )


def restore_redis(
    conn: RedisConnection,
    repo: Repository,
    enc: EncryptionConfig,
    req: RedisRestoreRequest,
    *,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Restore per ``req``; returns the plan (dry run) or a report with the checks."""
    register(*conn.secrets(), *enc.secrets())
    pattern = check_pattern(req.key_pattern)
    manifest = Catalog(repo).resolve(req.backup_id, ENGINE, req.source_target or conn.name)
    if manifest.kind not in ("rdb", "logical") or len(manifest.artifacts) != 1:
        raise InvalidInput(f"backup {manifest.backup_id} is not a strongroom Redis backup")
    artifact = manifest.artifacts[0]
    backup_ks = {
        int(db): int(v.get("keys", 0)) for db, v in (manifest.details.get("keyspace") or {}).items()
    }
    if req.mode == "file":
        if manifest.kind != "rdb":
            raise InvalidInput(
                f"backup {manifest.backup_id} is a logical export; file restores need an RDB "
                "backup: use mode=live"
            )
        if pattern is not None or req.dbs:
            raise InvalidInput(
                "file mode replaces the whole dataset: key_pattern and dbs need mode=live"
            )
        restart = _file_coordination(conn)
    else:
        restart = None
    client = conn.client()
    try:
        info = server_info(client, f"Redis target {conn.name!r} at {conn.address}")
        versions = _check_versions(
            manifest, str(info.get("redis_version", "0")), local=req.mode == "live"
        )
        target_ks = keyspace(info)
        if req.mode == "file":
            dbs = sorted(set(backup_ks) | set(target_ks))
            file_facts = _file_preflight(conn, client)
        else:
            dbs = _scope(req, conn, backup_ks)
            file_facts = {}
    finally:
        client.close()
    if req.mode == "live":
        _target_dbs_exist(conn, dbs)
    conflicts: dict[int, int] = {}
    if req.mode == "file":
        conflicts = {db: v["keys"] for db, v in target_ks.items() if v["keys"]}
    else:
        for db in dbs:
            c = conn.client(db)
            try:
                with redis_errors(f"checking db {db} of the target"):
                    if any_key(c, pattern):
                        conflicts[db] = count_keys(c, pattern)
            finally:
                c.close()
    copy_method = req.copy_method
    if copy_method == "auto":
        copy_method = "pipeline"
    plan: dict[str, Any] = {
        "backup_id": manifest.backup_id,
        "backup_finished_at": manifest.finished_at.isoformat(),
        "source_target": manifest.target,
        "kind": manifest.kind,
        "backup_method": manifest.details.get("method"),
        "mode": req.mode,
        "target": conn.name,
        "target_server": conn.address,
        **versions,
        "dbs": dbs,
        "key_pattern": pattern,
        "manifest_keys": {str(db): backup_ks.get(db, 0) for db in dbs},
        "conflicts": {str(db): n for db, n in conflicts.items()},
        "flush_existing": req.flush_existing,
        "copy_method": copy_method if req.mode == "live" else None,
        "artifact": artifact.name,
        "raw_size": artifact.raw_size,
        "stored_size": artifact.stored_size,
        **file_facts,
    }
    if req.mode == "file":
        plan["coordination"] = "kubernetes" if restart is not None else "commands"
        if restart is not None:
            plan["kubernetes"] = kube_facts(restart)
    if conflicts and not req.flush_existing:
        what = f"the target holds keys matching {pattern!r}" if pattern else "the target holds keys"
        detail = ", ".join(f"db{db}: {n}" for db, n in sorted(conflicts.items()))
        if not req.dry_run:
            raise TargetNotEmpty(
                f"refusing to overwrite: {what} ({detail}); pass flush_existing to replace "
                "them. Nothing was changed"
            )
        plan["blocked"] = f"{what} ({detail}); needs flush_existing"
    if req.dry_run:
        plan["dry_run"] = True
        return plan
    started = time.monotonic()
    if req.mode == "live":
        report = _restore_live(conn, repo, manifest, enc, req, plan, dbs, conflicts, progress)
    else:
        report = _restore_file(conn, repo, manifest, enc, req, plan, dbs, restart, progress)
    report["dry_run"] = False
    report["duration_s"] = round(time.monotonic() - started, 3)
    report["restored_at"] = dt.datetime.now(dt.UTC).isoformat()
    _fail_if_bad(report)
    return report


def _restore_live(
    conn: RedisConnection,
    repo: Repository,
    manifest: Manifest,
    enc: EncryptionConfig,
    req: RedisRestoreRequest,
    plan: dict[str, Any],
    dbs: list[int],
    conflicts: dict[int, int],
    progress: Progress | None,
) -> dict[str, Any]:
    pattern = req.key_pattern
    all_dbs = [int(db) for db in (manifest.details.get("keyspace") or {})] + dbs
    expected = {db: int(plan["manifest_keys"][str(db)]) for db in dbs}
    with ScratchRedis(databases=max(all_dbs, default=0) + 1, parent=req.scratch_dir) as scratch:
        load = _load_scratch(scratch, repo, manifest, enc, req.batch_size, progress)
        loaded, samples = _scratch_state(scratch, dbs, pattern, req.sample_size)
        # the backup is proven: from here on the target changes
        flushed: dict[str, int] = {}
        for db in dbs:
            if db in conflicts:
                c = conn.client(db)
                try:
                    with redis_errors(f"flushing db {db} of the target"):
                        flushed[str(db)] = flush_scope(c, pattern)
                finally:
                    c.close()
        source = scratch.connection()
        copy = migrate_keys if plan["copy_method"] == "migrate" else pipeline_copy
        t0 = time.monotonic()
        moved = 0
        for db in dbs:
            moved += copy(source, conn, db, pattern, req.batch_size)
        seconds = time.monotonic() - t0
        stale = scratch.stale_removed
    checks = _verify_target(conn, dbs, pattern, expected, loaded, samples)
    return {
        **plan,
        **load,
        "flushed": flushed,
        "stale_scratch_removed": stale,
        "copy": {
            "method": plan["copy_method"],
            "keys": moved,
            "seconds": round(seconds, 3),
            "keys_per_s": round(moved / seconds) if seconds > 0 else None,
        },
        **checks,
    }


# -- file mode ----------------------------------------------------------------------------


def _file_coordination(conn: RedisConnection) -> StatefulSetRestart | None:
    """How the server is restarted: local commands (None) or its StatefulSet, inspected
    through the Kubernetes API (which proves the permissions) before anything changes."""
    commands = bool(conn.stop_command and conn.start_command)
    if not commands and not conn.k8s_statefulset:
        raise InvalidInput(
            f"file restores need stop_command and start_command on target {conn.name!r} "
            "(how to stop and start the server), or k8s_statefulset (the StatefulSet to scale "
            "down and up through the Kubernetes API). Nothing was changed"
        )
    if not conn.data_path:
        raise InvalidInput(
            f"file restores need data_path on target {conn.name!r}: the RDB file the server "
            "loads at start, as this runner sees it. Nothing was changed"
        )
    folder = Path(conn.data_path).parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise InvalidInput(
            f"data_path folder {folder} is not a writable folder on this runner. "
            "Nothing was changed"
        )
    if commands:
        return None
    restart = StatefulSetRestart(K8sSettings.from_connection(conn))
    restart.inspect()
    return restart


def kube_facts(restart: StatefulSetRestart) -> dict[str, Any]:
    """What the plan shows about the StatefulSet (read by ``inspect``)."""
    return {**restart.facts, **restart.report()}


def _file_preflight(conn: RedisConnection, client: redis.Redis) -> dict[str, Any]:
    """The server must load this file at start: no AOF, same dir/dbfilename when visible."""
    facts: dict[str, Any] = {"data_path": conn.data_path}
    try:
        appendonly = config_value(client, "appendonly")
        folder = config_value(client, "dir")
        dbfile = config_value(client, "dbfilename")
    except redis.ResponseError as exc:
        if not is_refusal(exc):
            raise ToolFailed(f"CONFIG GET failed: {scrub(str(exc))}") from None
        facts["config_checked"] = False
        return facts
    facts["config_checked"] = True
    if appendonly == "yes":
        raise InvalidInput(
            "the target runs with appendonly yes: at start it would load its AOF, not the "
            "restored RDB. Disable AOF for the restore or use mode=live. Nothing was changed"
        )
    if folder and dbfile and conn.data_path:
        served = Path(folder) / dbfile
        mine = Path(conn.data_path)
        if Path(folder).exists():
            same = served.resolve() == mine.resolve()
        else:  # the runner mounts the volume elsewhere: only the file name can be compared
            same = served.name == mine.name
        if not same:
            raise InvalidInput(
                f"data_path {mine} is not the file the server loads ({served}). Nothing was changed"
            )
    return facts


def _run_command(conn: RedisConnection, command: str, what: str) -> None:
    env = minimal_env(
        {
            "STRONGROOM_REDIS_HOST": conn.host,
            "STRONGROOM_REDIS_PORT": str(conn.port),
            "STRONGROOM_REDIS_DATA_PATH": conn.data_path or "",
        }
    )
    if conn.password is not None:
        env["REDISCLI_AUTH"] = conn.password.get_secret_value()
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise InvalidInput(f"{what} command cannot be parsed: {exc}") from None
    try:
        done = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )
    except FileNotFoundError:
        raise ToolFailed(f"{what} command not found: {argv[0]!r}") from None
    except subprocess.TimeoutExpired:
        raise ToolFailed(f"{what} command did not finish in {COMMAND_TIMEOUT:.0f} s") from None
    if done.returncode != 0:
        tail = scrub((done.stderr or done.stdout).strip())[-500:]
        raise ToolFailed(f"{what} command exited with {done.returncode}: {tail}")


def _restore_file(
    conn: RedisConnection,
    repo: Repository,
    manifest: Manifest,
    enc: EncryptionConfig,
    req: RedisRestoreRequest,
    plan: dict[str, Any],
    dbs: list[int],
    restart: StatefulSetRestart | None,
    progress: Progress | None,
) -> dict[str, Any]:
    data_path = Path(conn.data_path or "")
    folder = data_path.parent
    artifact = manifest.artifacts[0]
    private = private_folder(folder)
    temp = private / f"{manifest.backup_id}.rdb"
    previous = data_path.with_name(f"{data_path.name}.pre-restore-{manifest.backup_id}")
    expected = {db: int(plan["manifest_keys"][str(db)]) for db in dbs}
    stopped = False
    swapped = False
    had_previous = data_path.exists()
    try:
        # 1. the new file next to the old one (same filesystem: the rename is atomic)
        with create_private(temp) as handle:
            read_artifact(repo, artifact, handle, encryption=enc, progress=progress)
            handle.flush()
            os.fsync(handle.fileno())
        # 2. proven loadable by a scratch server before the target is touched
        with ScratchRedis(databases=max(dbs, default=0) + 1, parent=req.scratch_dir) as scratch:
            scratch.rdb_path.symlink_to(temp)
            scratch.start(timeout=120.0 + artifact.raw_size / (20 * 1024 * 1024))
            loaded, samples = _scratch_state(scratch, dbs, None, req.sample_size)
        # 3. stop, swap, start
        if restart is not None:
            try:
                restart.scale_down()  # returns once no pod of the StatefulSet is left
            finally:
                stopped = restart.changed
        else:
            _run_command(conn, conn.stop_command or "", "stop")
            wait_down(conn, 120.0)
            stopped = True
        if had_previous:
            os.replace(data_path, previous)
        os.replace(temp, data_path)
        swapped = True
        private.rmdir()
        _fsync_dir(folder)
        _start(conn, restart)
        waited = wait_ready(conn, conn.load_timeout)
        stopped = False
    except BaseException as exc:
        with contextlib.suppress(OSError):
            temp.unlink()
        with contextlib.suppress(OSError):
            private.rmdir()
        if not stopped:
            raise
        steps = _roll_back(conn, restart, data_path, previous, swapped, had_previous)
        if isinstance(exc, StrongroomError):
            exc.args = (f"{exc.args[0] if exc.args else exc}; {steps}",)
            raise
        if isinstance(exc, OSError):
            raise ToolFailed(
                f"file restore failed after the server was stopped: {scrub(str(exc))}; {steps}"
            ) from exc
        raise
    if had_previous and not req.keep_previous:
        previous.unlink()
    checks = _verify_target(conn, dbs, None, expected, loaded, samples)
    coordination: dict[str, Any] = {}
    if restart is not None:
        coordination["kubernetes"] = kube_facts(restart)
    return {
        **plan,
        **coordination,
        "previous_data_file": str(previous) if had_previous and req.keep_previous else None,
        "load_wait_s": round(waited, 3),
        **checks,
    }


def _start(conn: RedisConnection, restart: StatefulSetRestart | None) -> None:
    """Start command, or the StatefulSet back at its replica count with all pods Ready."""
    if restart is not None:
        restart.scale_up()
    else:
        _run_command(conn, conn.start_command or "", "start")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _roll_back(
    conn: RedisConnection,
    restart: StatefulSetRestart | None,
    data_path: Path,
    previous: Path,
    swapped: bool,
    had_previous: bool,
) -> str:
    """The server was stopped and did not come back with the restored file: put the old one
    back and start it again. Returns what was done (and what state things are left in)."""
    steps: list[str] = []
    try:
        if swapped:
            if restart is not None:
                # pods may be up (or crash-looping) on the restored file: none may run while
                # the files move back
                restart.scale_down()
                steps.append(f"{restart.settings.label} scaled to 0 again")
            failed = data_path.with_name(f"{data_path.name}.failed-restore")
            os.replace(data_path, failed)
            steps.append(f"restored file moved to {failed}")
            if had_previous:
                os.replace(previous, data_path)
                steps.append("previous data file put back")
        _start(conn, restart)
        if restart is not None:
            steps.append(
                f"{restart.settings.label} scaled back to {restart.original_replicas} "
                "replica(s), all Ready"
            )
        wait_ready(conn, conn.load_timeout)
        steps.append("server started again with its previous data")
    except (StrongroomError, OSError) as exc:
        steps.append(f"rollback incomplete: {scrub(str(exc))}")
        if restart is not None and restart.changed:
            steps.append(_last_resort_scale_up(restart))
    return "; ".join(steps)


def _last_resort_scale_up(restart: StatefulSetRestart) -> str:
    """The rollback failed while the StatefulSet was at 0: at least ask for the replicas back."""
    label, n = restart.settings.label, restart.original_replicas
    try:
        restart.scale_up()
    except StrongroomError as exc:
        if restart.changed:
            return f"{label} is left at 0 replicas ({exc}): scale it to {n} by hand"
        return f"{label} scaled back to {n} replica(s) but not Ready yet ({exc})"
    return f"{label} scaled back to {n} replica(s), all Ready (check which data file it loaded)"
