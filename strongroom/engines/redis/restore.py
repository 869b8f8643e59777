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

The request and the checks before any change are in ``restore_plan``, staging in a
scratch server and the checks after in ``restore_stage``, the file mode with its
coordinated restart in ``restore_file``; this module plans and runs a restore.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from strongroom.artifacts import read_artifact
from strongroom.catalog import Catalog, Manifest
from strongroom.config import EncryptionConfig
from strongroom.engines.redis.backup import ENGINE
from strongroom.engines.redis.cluster_backup import KIND as CLUSTER_KIND
from strongroom.engines.redis.cluster_restore import restore_topology
from strongroom.engines.redis.conn import (
    RedisConnection,
    check_pattern,
    keyspace,
    redis_errors,
    server_info,
)
from strongroom.engines.redis.key_copy import (
    any_key,
    count_keys,
    flush_scope,
    migrate_keys,
    pipeline_copy,
)
from strongroom.engines.redis.replicate import (
    RdbFeeder,
    VerifiedGate,
    listen_host,
    replicate_into,
    replicate_preflight,
)
from strongroom.engines.redis.restore_file import (
    file_coordination,
    file_preflight,
    kube_facts,
    run_file_restore,
)
from strongroom.engines.redis.restore_plan import (
    RdbVersionTooNew,
    RedisRestoreRequest,
    check_replicate,
    check_versions,
    restore_scope,
    target_dbs_exist,
)
from strongroom.engines.redis.restore_stage import (
    fail_if_bad,
    load_scratch,
    scratch_state,
    verify_target,
)
from strongroom.engines.redis.scratch import ScratchRedis
from strongroom.errors import InvalidInput, TargetNotEmpty
from strongroom.pipeline import Progress
from strongroom.redact import register
from strongroom.repository.base import Repository

__all__ = ["RdbVersionTooNew", "RedisRestoreRequest", "restore_redis"]


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
    if manifest.kind == CLUSTER_KIND or conn.topology == "cluster":
        report = restore_topology(conn, repo, manifest, enc, req, progress)
        if not req.dry_run:
            report["restored_at"] = dt.datetime.now(dt.UTC).isoformat()
        return report
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
        restart = file_coordination(conn)
    else:
        restart = None
    copy_method = "pipeline" if req.copy_method == "auto" else req.copy_method
    replicate = req.mode == "live" and copy_method == "replicate"
    if replicate and conn.tls and not conn.is_loopback():
        raise InvalidInput(
            "copy_method=replicate sends the RDB in plain RESP (the feeder does not speak "
            "TLS) and this target uses TLS: use copy_method=pipeline. Nothing was changed"
        )
    client = conn.client()
    try:
        info = server_info(client, f"Redis target {conn.name!r} at {conn.address}")
        versions = check_versions(
            manifest,
            str(info.get("redis_version", "0")),
            local=req.mode == "live",
            payloads=not replicate,
        )
        target_ks = keyspace(info)
        if req.mode == "file":
            dbs = sorted(set(backup_ks) | set(target_ks))
            file_facts = file_preflight(conn, client)
        else:
            dbs = restore_scope(req, conn, backup_ks)
            file_facts = {}
            if replicate:
                check_replicate(req, manifest, dbs, backup_ks)
                file_facts = {"replicate": replicate_preflight(conn, client, info)}
                file_facts["replicate"]["listen_host"] = listen_host(conn, req.replicate_host)
    finally:
        client.close()
    if req.mode == "live":
        target_dbs_exist(conn, dbs)
    conflicts: dict[int, int] = {}
    if req.mode == "file" or replicate:  # the whole dataset is replaced
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
    libraries = int(file_facts.get("replicate", {}).get("function_libraries", 0))
    if (conflicts or libraries) and not req.flush_existing:
        what = f"the target holds keys matching {pattern!r}" if pattern else "the target holds keys"
        detail = ", ".join(f"db{db}: {n}" for db, n in sorted(conflicts.items()))
        if libraries:
            what = "the target holds data"
            detail = ", ".join([*filter(None, [detail]), f"function libraries: {libraries}"])
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
        report = run_file_restore(conn, repo, manifest, enc, req, plan, dbs, restart, progress)
    report["dry_run"] = False
    report["duration_s"] = round(time.monotonic() - started, 3)
    report["restored_at"] = dt.datetime.now(dt.UTC).isoformat()
    fail_if_bad(report)
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
    if plan["copy_method"] == "replicate":
        return _restore_replicate(conn, repo, manifest, enc, req, plan, dbs, progress)
    with ScratchRedis(databases=max(all_dbs, default=0) + 1, parent=req.scratch_dir) as scratch:
        load = load_scratch(scratch, repo, manifest, enc, req.batch_size, progress)
        loaded, samples = scratch_state(scratch, dbs, pattern, req.sample_size)
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
    checks = verify_target(conn, dbs, pattern, expected, loaded, samples)
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


def _restore_replicate(
    conn: RedisConnection,
    repo: Repository,
    manifest: Manifest,
    enc: EncryptionConfig,
    req: RedisRestoreRequest,
    plan: dict[str, Any],
    dbs: list[int],
    progress: Progress | None,
) -> dict[str, Any]:
    """The artifact's plaintext is streamed, as it is decrypted and checked, to the target
    and to an empty scratch server, both replicas of strongroom's feeder; the scratch
    server's copy is the reference for the checks after."""
    expected = {db: int(plan["manifest_keys"][str(db)]) for db in dbs}
    artifact = manifest.artifacts[0]
    # the scratch server skips the RDB's CRC64: the plaintext SHA-256 passes before the
    # RDB's end reaches it, the backup checked that CRC, and the target checks it again
    with ScratchRedis(
        databases=max(dbs, default=0) + 1, parent=req.scratch_dir, rdb_checksum=False
    ) as scratch:
        scratch.start()

        def feed(sink: RdbFeeder) -> None:
            if artifact.stored_chunks is None:  # stored before chunk lists: hold-back only
                read_artifact(repo, artifact, sink, encryption=enc, progress=progress)
                return
            gate = VerifiedGate(sink)
            read_artifact(
                repo, artifact, gate, encryption=enc, progress=progress, on_verified=gate.release
            )
            gate.release()

        reference: dict[str, Any] = {}

        def verify() -> dict[str, Any]:
            loaded, samples = scratch_state(scratch, dbs, None, req.sample_size)
            reference["loaded"] = loaded
            return verify_target(conn, dbs, None, expected, loaded, samples)

        sync, checks = replicate_into(
            conn,
            scratch.connection(),
            feed,
            artifact.raw_size,
            plan["replicate"]["listen_host"],
            timeout=conn.load_timeout,
            check=scratch.check_alive,
            verify=verify,
            target_was_empty=not plan["conflicts"],
        )
        stale = scratch.stale_removed
    loaded = reference["loaded"]
    keys = sum(loaded.values())
    return {
        **plan,
        "load_s": sync["seconds"],
        "flushed": dict(plan["conflicts"]),  # the full resync replaced them
        "stale_scratch_removed": stale,
        "copy": {
            "method": "replicate",
            "keys": keys,
            "seconds": sync["seconds"],
            "keys_per_s": round(keys / sync["seconds"]) if sync["seconds"] > 0 else None,
            "replication": sync,
        },
        **checks,
    }
