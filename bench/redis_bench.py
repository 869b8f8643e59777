"""Redis benchmark: strongroom against the raw tools, measured in the same run.

Backup: ``redis-cli --rdb - | zstd -T0 -3 > file`` against strongroom's
``backup_redis`` (replication SYNC -> zstd -> age -> local repository) in its
own Python process, interleaved, with wall time and peak RSS (wait4: the
largest process of each contender). strongroom's time is reported twice: the
whole process (interpreter start-up and imports included) and the backup call
alone.

Live restore: strongroom's ``restore_redis`` (mode live: decrypt, load into a
scratch redis-server, MIGRATE COPY REPLACE in batches, then the count and
sample checks) against a naive copy in Python (SCAN, pipelined DUMP + PTTL,
pipelined RESTORE, 1000 keys per batch) from the source server, into an empty
target, interleaved; throughput in keys per second.

``python -m bench.redis_bench [--quick]`` (quick: 100k keys, 2 repeats; full:
1M keys, 3 repeats, plus a backup comparison on 1M keys of ~1 KB values, a ~0.55 GB
RDB once Redis's LZF has compressed the repetitive halves). Writes
``bench/results/redis-backup.json`` (``redis-backup-quick.json`` in quick mode).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.signing import bench_config, bench_repo

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
ZSTD = shutil.which("zstd") or "/usr/bin/zstd"


def _wait4(proc: subprocess.Popen[Any]) -> tuple[int, int]:
    """Reap ``proc``: (exit code, peak RSS in KiB of it or the largest child it waited for)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, int(usage.ru_maxrss)


def populate(server: Any, keys: int, value_size: tuple[int, int], seed: int = 7) -> None:
    """``keys`` keys: 90% strings, 10% small hashes; values half random, half repetitive
    (so the data compresses like real caches do, not like DEBUG POPULATE's)."""
    import redis

    rng = random.Random(seed)
    client = redis.Redis(host=server.host, port=server.port, password=server.password)
    client.flushall()
    batch = 2000
    lo, hi = value_size
    for start in range(0, keys, batch):
        pipe = client.pipeline(transaction=False)
        strings: dict[str, bytes] = {}
        for i in range(start, min(start + batch, keys)):
            size = rng.randint(lo, hi)
            value = rng.randbytes(size // 2) + (b"session-data:" * (size // 26 + 1))[: size // 2]
            if i % 10 == 0:
                pipe.hset(f"h:{i}", mapping={"a": value[:32], "b": str(i), "c": value[32:64]})
            else:
                strings[f"k:{i}"] = value
        if strings:
            pipe.mset(strings)  # type: ignore[arg-type]
        pipe.execute()
    client.close()


# -- backup contenders --------------------------------------------------------------------


def run_raw_backup(server: Any, work: Path) -> dict[str, Any]:
    out = work / "raw.rdb.zst"
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDISCLI_")}
    env["REDISCLI_AUTH"] = server.password
    script = (
        f"redis-cli -h {server.host} -p {server.port} --rdb - 2>/dev/null "
        f"| {ZSTD} -T0 -3 -q -c > {out}"
    )
    start = time.perf_counter()
    proc = subprocess.Popen(["bash", "-o", "pipefail", "-c", script], env=env)
    code, rss = _wait4(proc)
    wall = time.perf_counter() - start
    size = out.stat().st_size if out.exists() else 0
    out.unlink(missing_ok=True)
    return {"ok": code == 0 and size > 0, "wall_s": wall, "peak_rss_kib": rss, "stored_bytes": size}


def run_strongroom_backup(server: Any, work: Path, recipient: str) -> dict[str, Any]:
    repo = work / "repo"
    job = {
        "host": server.host,
        "port": server.port,
        "password": server.password,
        "repo": str(repo),
        "recipient": recipient,
    }
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.redis_bench", "--child-backup"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps(job).encode())  # the password never goes to argv
    proc.stdin.close()
    output = proc.stdout.read()
    code, rss = _wait4(proc)
    wall = time.perf_counter() - start
    shutil.rmtree(repo, ignore_errors=True)
    record: dict[str, Any] = {"ok": code == 0, "wall_s": wall, "peak_rss_kib": rss}
    if code == 0:
        record.update(json.loads(output))
    return record


def _child_backup() -> None:
    job = json.loads(sys.stdin.read())
    from pydantic import SecretStr

    from strongroom.config import EncryptionConfig
    from strongroom.engines.redis.backup import backup_redis
    from strongroom.engines.redis.conn import RedisConnection

    conn = RedisConnection(
        name="bench", host=job["host"], port=job["port"], password=SecretStr(job["password"])
    )
    repo_config = bench_config(kind="local", path=job["repo"])
    enc = EncryptionConfig(recipients=[job["recipient"]])
    start = time.perf_counter()
    manifest = backup_redis(conn, bench_repo(Path(job["repo"])), repo_config, enc)
    seconds = time.perf_counter() - start
    artifact = manifest.artifacts[0]
    sys.stdout.write(
        json.dumps(
            {
                "backup_s": seconds,
                "method": manifest.details["method"],
                "rdb_bytes": artifact.raw_size,
                "stored_bytes": artifact.stored_size,
            }
        )
    )


def _median(records: list[dict[str, Any]], field: str) -> float | None:
    values = [r[field] for r in records if r.get("ok") and r.get(field) is not None]
    return round(statistics.median(values), 3) if values else None


def compare_backups(server: Any, work: Path, recipient: str, repeats: int) -> dict[str, Any]:
    raw: list[dict[str, Any]] = []
    ours: list[dict[str, Any]] = []
    for i in range(repeats):
        pair = [("raw", raw), ("strongroom", ours)]
        if i % 2:
            pair.reverse()
        for name, bucket in pair:
            if name == "raw":
                bucket.append(run_raw_backup(server, work))
            else:
                bucket.append(run_strongroom_backup(server, work, recipient))
    raw_s = _median(raw, "wall_s")
    ours_proc = _median(ours, "wall_s")
    ours_call = _median(ours, "backup_s")
    rdb = ours[0].get("rdb_bytes") if ours and ours[0].get("ok") else None
    return {
        "raw_pipeline": {
            "command": "redis-cli --rdb - | zstd -T0 -3 > file",
            "median_s": raw_s,
            "median_peak_rss_mib": _rss(raw),
            "stored_bytes": raw[0].get("stored_bytes") if raw else None,
            "samples": raw,
        },
        "strongroom": {
            "what": "backup_redis (SYNC -> zstd -3 -> age -> local repo, fsync) in a subprocess",
            "median_process_s": ours_proc,
            "median_backup_call_s": ours_call,
            "median_peak_rss_mib": _rss(ours),
            "stored_bytes": ours[0].get("stored_bytes") if ours else None,
            "samples": ours,
        },
        "rdb_bytes": rdb,
        "ratio_backup_call_vs_raw": round(ours_call / raw_s, 3) if ours_call and raw_s else None,
        "ratio_process_vs_raw": round(ours_proc / raw_s, 3) if ours_proc and raw_s else None,
        "compression_ratio": round(rdb / ours[0]["stored_bytes"], 2)
        if rdb and ours[0].get("stored_bytes")
        else None,
    }


def _rss(records: list[dict[str, Any]]) -> float | None:
    values = [r["peak_rss_kib"] for r in records if r.get("ok")]
    return round(statistics.median(values) / 1024, 1) if values else None


# -- restore contenders -------------------------------------------------------------------


def naive_copy(source: Any, target: Any, batch: int = 1000) -> int:
    """SCAN + pipelined DUMP/PTTL from source, pipelined RESTORE into target."""
    import redis

    src = redis.Redis(host=source.host, port=source.port, password=source.password)
    dst = redis.Redis(host=target.host, port=target.port, password=target.password)
    moved = 0
    for_keys: list[bytes] = []
    cursor = 0
    while True:
        cursor, keys = src.scan(cursor, count=batch)
        for_keys = list(keys)
        if for_keys:
            pipe = src.pipeline(transaction=False)
            for key in for_keys:
                pipe.pttl(key)
                pipe.dump(key)
            replies = pipe.execute()
            out = dst.pipeline(transaction=False)
            for i, key in enumerate(for_keys):
                ttl, payload = replies[2 * i], replies[2 * i + 1]
                if payload is not None:
                    out.restore(key, max(int(ttl), 0), payload, replace=True)
                    moved += 1
            out.execute()
        if int(cursor) == 0:
            break
    src.close()
    dst.close()
    return moved


def compare_restores(
    source: Any, target: Any, work: Path, identity: str, recipient: str, repeats: int
) -> dict[str, Any]:
    import redis
    from pydantic import SecretStr

    from strongroom.config import EncryptionConfig
    from strongroom.engines.redis.backup import backup_redis
    from strongroom.engines.redis.conn import RedisConnection
    from strongroom.engines.redis.restore import RedisRestoreRequest, restore_redis

    repo_path = work / "restore-repo"
    repo = bench_repo(repo_path)
    enc = EncryptionConfig(recipients=[recipient], identities=[SecretStr(identity)])
    src_conn = RedisConnection(
        name="bench", host=source.host, port=source.port, password=SecretStr(source.password)
    )
    manifest = backup_redis(src_conn, repo, bench_config(kind="local", path=str(repo_path)), enc)
    keys = sum(v["keys"] for v in manifest.details["keyspace"].values())
    tgt_conn = RedisConnection(
        name="bench", host=target.host, port=target.port, password=SecretStr(target.password)
    )
    tclient = redis.Redis(host=target.host, port=target.port, password=target.password)
    naive: list[dict[str, Any]] = []
    ours: list[dict[str, Any]] = []
    for i in range(repeats):
        order = ["naive", "strongroom"] if i % 2 == 0 else ["strongroom", "naive"]
        for name in order:
            tclient.flushall()
            start = time.perf_counter()
            if name == "naive":
                moved = naive_copy(source, target)
                wall = time.perf_counter() - start
                ok = moved == keys and tclient.dbsize() == keys
                naive.append({"ok": ok, "wall_s": wall, "keys": moved, "keys_per_s": keys / wall})
            else:
                report = restore_redis(tgt_conn, repo, enc, RedisRestoreRequest(backup_id="latest"))
                wall = time.perf_counter() - start
                ours.append(
                    {
                        "ok": bool(report["keys_ok"]) and tclient.dbsize() == keys,
                        "wall_s": wall,
                        "keys_per_s": keys / wall,
                        "load_s": report["load_s"],
                        "copy_s": report["copy"]["seconds"],
                        "copy_keys_per_s": report["copy"]["keys_per_s"],
                    }
                )
    tclient.flushall()
    tclient.close()
    shutil.rmtree(repo_path, ignore_errors=True)
    naive_s = _median(naive, "wall_s")
    ours_s = _median(ours, "wall_s")
    return {
        "keys": keys,
        "naive_python_dump_restore": {
            "what": "SCAN + pipelined DUMP/PTTL -> pipelined RESTORE (redis-py + hiredis), "
            "source server to target, 1000 keys per batch",
            "median_s": naive_s,
            "median_keys_per_s": round(keys / naive_s) if naive_s else None,
            "samples": naive,
        },
        "strongroom_live_restore": {
            "what": "restore_redis mode=live end to end: read+decrypt from the repository, "
            "scratch redis-server load, MIGRATE COPY REPLACE batches, count and sample checks",
            "median_s": ours_s,
            "median_keys_per_s": round(keys / ours_s) if ours_s else None,
            "median_copy_phase_keys_per_s": _median(ours, "copy_keys_per_s"),
            "samples": ours,
        },
        "speedup_vs_naive": round(naive_s / ours_s, 2) if naive_s and ours_s else None,
    }


# -- driver -------------------------------------------------------------------------------


def run(quick: bool) -> dict[str, Any]:
    from pyrage import x25519

    from strongroom.sandbox.redis import RedisServer

    keys = 100_000 if quick else 1_000_000
    repeats = 2 if quick else 3
    identity = x25519.Identity.generate()
    recipient = str(identity.to_public())
    work = Path(tempfile.mkdtemp(prefix="strongroom-bench-redis-"))
    results: dict[str, Any] = {
        "benchmark": "redis",
        "quick": quick,
        "keys": keys,
        "repeats": repeats,
        "machine": {"cpus": os.cpu_count()},
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    source = RedisServer().start()
    target = RedisServer().start()
    try:
        t0 = time.perf_counter()
        populate(source, keys, (16, 96))
        results["populate_s"] = round(time.perf_counter() - t0, 2)
        results["backup"] = compare_backups(source, work, recipient, repeats)
        results["live_restore"] = compare_restores(
            source, target, work, str(identity), recipient, repeats
        )
        if not quick:
            t0 = time.perf_counter()
            populate(source, 1_000_000, (900, 1300), seed=11)
            results["large"] = {
                "keys": 1_000_000,
                "populate_s": round(time.perf_counter() - t0, 2),
                "backup": compare_backups(source, work, recipient, 2),
            }
    finally:
        source.stop()
        target.stop()
        shutil.rmtree(work, ignore_errors=True)
    results["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "redis-backup-quick.json" if quick else "redis-backup.json"
    (RESULTS / name).write_text(json.dumps(results, indent=2) + "\n")
    return results


def _summary(results: dict[str, Any]) -> str:
    b = results["backup"]
    r = results["live_restore"]
    lines = [
        f"Redis, {results['keys']} keys, RDB {b['rdb_bytes']} bytes",
        f"  backup: raw pipeline {b['raw_pipeline']['median_s']} s "
        f"({b['raw_pipeline']['median_peak_rss_mib']} MiB), strongroom call "
        f"{b['strongroom']['median_backup_call_s']} s / process "
        f"{b['strongroom']['median_process_s']} s ({b['strongroom']['median_peak_rss_mib']} MiB); "
        f"ratio call {b['ratio_backup_call_vs_raw']}, process {b['ratio_process_vs_raw']}",
        f"  live restore: naive {r['naive_python_dump_restore']['median_keys_per_s']} keys/s, "
        f"strongroom {r['strongroom_live_restore']['median_keys_per_s']} keys/s end to end "
        f"(copy phase {r['strongroom_live_restore']['median_copy_phase_keys_per_s']} keys/s); "
        f"speedup {r['speedup_vs_naive']}x",
    ]
    if "large" in results:
        lb = results["large"]["backup"]
        lines.append(
            f"  large ({lb['rdb_bytes']} bytes RDB): raw {lb['raw_pipeline']['median_s']} s, "
            f"strongroom call {lb['strongroom']['median_backup_call_s']} s / process "
            f"{lb['strongroom']['median_process_s']} s; ratio call "
            f"{lb['ratio_backup_call_vs_raw']}, process {lb['ratio_process_vs_raw']}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k keys, 2 repeats")
    parser.add_argument("--child-backup", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_backup:
        _child_backup()
        return
    results = run(args.quick)
    print(_summary(results))


if __name__ == "__main__":
    main()
