"""Redis backups behind the Engine interface (``strongroom.engines.interface``).

The snapshot and restore live in ``backup.py`` and ``restore.py``; this module adapts
them to the shared verbs and says what a backup's and a restore's summary show.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from strongroom.engines.interface import Engine, Summary
from strongroom.engines.redis.backup import backup_redis
from strongroom.engines.redis.cluster_backup import backup_cluster
from strongroom.engines.redis.conn import RedisConnection
from strongroom.engines.redis.restore import RedisRestoreRequest, restore_redis
from strongroom.errors import InvalidInput
from strongroom.sizes import human_size


def backup_target(
    conn: RedisConnection,
    repo: Any,
    repo_config: Any,
    enc: Any,
    *,
    method: str | None = None,
    from_masters: bool | None = None,
    **kwargs: Any,
) -> Any:
    """A backup of any topology: a cluster's shards, or one server (standalone)."""
    if from_masters is not None:
        conn = conn.model_copy(update={"from_masters": from_masters})
    if conn.topology == "cluster":
        if method not in (None, "auto", "sync"):
            raise InvalidInput(f"cluster targets are backed up by replication (sync), not {method}")
        return backup_cluster(conn, repo, repo_config, enc, **kwargs)
    return backup_redis(conn, repo, repo_config, enc, method=method, **kwargs)  # type: ignore[arg-type]


def _method_line(details: Mapping[str, Any]) -> str:
    attempts = details.get("attempts") or []
    fallback = "; ".join(f"{a['method']} {a['outcome']}" for a in attempts)
    return f"- method: **{details['method']}**" + (f" (fallback: {fallback})" if attempts else "")


def _cluster_lines(details: Mapping[str, Any]) -> list[str]:
    cluster = details.get("cluster")
    if not cluster:
        return []
    cut = cluster["consistency"]
    lines = [
        f"- cluster: {len(cluster['shards'])} shards, consistency **{cut['kind']}**"
        + (f" (writes paused {cut['pause_measured_ms']} ms)" if "pause_measured_ms" in cut else "")
    ]
    for shard in cluster["shards"]:
        slots = ",".join(f"{a}-{b}" for a, b in shard["slots"])
        src = shard["source"]
        lines.append(
            f"- shard {shard['index']} slots {slots}: {shard['keys']} keys from {src['role']} "
            f"{src['address']} ({src['node_id'][:8]})"
        )
    if cluster.get("topology_changed"):
        lines.append("- the topology changed during the backup (see slot_map_after)")
    return lines


def backup_summary(manifest: Mapping[str, Any], repository: str) -> Summary:
    details = manifest["details"]
    return Summary(
        f"Redis backup {manifest['backup_id']}",
        [
            f"- target: `{manifest['target']}` (Redis {details.get('redis_version')}, "
            f"used memory {human_size(details.get('used_memory') or 0)})",
            _method_line(details),
            *(
                f"- {a['method']} {a['outcome']}: {a['reason']}"
                for a in details.get("attempts") or []
            ),
            f"- RDB version: {details.get('rdb_version')}",
            f"- repository: `{repository}`",
            *(
                f"- {a['name']}: {human_size(a['raw_size'])}, stored {human_size(a['stored_size'])}"
                for a in manifest["artifacts"]
            ),
            *_cluster_lines(details),
            f"- finished: {manifest['finished_at']}",
        ],
        [
            {"db": int(db), "keys": v.get("keys"), "expires": v.get("expires", "")}
            for db, v in sorted(details.get("keyspace", {}).items(), key=lambda kv: int(kv[0]))
        ],
    )


def restore_summary(report: Mapping[str, Any]) -> Summary:
    planned = bool(report.get("dry_run"))
    lines = [
        f"- {'would restore' if planned else 'restored'} backup `{report['backup_id']}` "
        f"of `{report['source_target']}` ({report['kind']}, taken by "
        f"{report['backup_method']})",
        f"- into `{report['target_server']}` (Redis {report['target_version']}), "
        f"mode **{report['mode']}**",
        f"- databases: {', '.join(map(str, report['dbs'])) or '(none)'}"
        + (f", keys matching `{report['key_pattern']}`" if report.get("key_pattern") else ""),
        f"- size: {human_size(report['raw_size'])}",
    ]
    if report.get("copy"):
        copy = report["copy"]
        lines.append(
            f"- copied {copy['keys']} keys by {copy['method']} in {copy.get('seconds')} s "
            f"({copy['keys_per_s']} keys/s)"
        )
    if not planned:
        sample = report.get("sample", {})
        lines += [
            f"- key counts match the backup: {report.get('keys_ok')}, "
            f"the manifest: {report.get('matches_manifest')}",
            f"- sampled values equal: {sample.get('ok')} ({sample.get('checked')} keys)",
        ]
    if report.get("blocked"):
        lines.append(f"- blocked: {report['blocked']}")
    if report.get("previous_data_file"):
        lines.append(f"- previous data file kept at `{report['previous_data_file']}`")
    rows = report.get("key_checks") or [
        {"db": db, "manifest_keys": n} for db, n in report["manifest_keys"].items()
    ]
    return Summary(
        f"Redis restore {'plan ' if planned else ''}{report['backup_id']}",
        lines,
        rows,
        ok=planned or report.get("keys_ok") is not False,
    )


ENGINE = Engine(
    "redis",
    "Redis",
    RedisRestoreRequest,
    backup_fn=backup_target,
    restore_fn=restore_redis,
    backup_summary=backup_summary,
    restore_summary=restore_summary,
    one_stream=True,
)
