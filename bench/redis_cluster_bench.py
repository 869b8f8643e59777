"""Redis Cluster benchmark: strongroom's cluster backup against raw per-shard dumps.

A 3-master/3-replica cluster (``strongroom.sandbox.redis_cluster``) is filled with
keys of ~200-byte random values. In the same run, interleaved:

- ``raw_parallel_rdb_s``: one ``redis-cli -h REPLICA --rdb - | zstd -3 -T0 > file``
  per shard, all shards at once (the same replicas strongroom reads);
- ``cluster_backup_s``: strongroom's ``backup_cluster`` (discovery, caught-up
  replica per shard, parallel replication streams -> zstd -> age -> local
  repository, manifest written and signed), the call's wall time;
- ``restore_other_shape_s``: the backup restored live into a 4-master cluster
  (slot-routed RESTORE, checks included).

``python -m bench.redis_cluster_bench [--quick]`` (quick: 200k keys, 2 repeats;
full: 2M keys, 3 repeats). Writes ``bench/results/redis-cluster.json``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from bench.signing import bench_config, bench_repo
from strongroom.config import EncryptionConfig
from strongroom.engines.redis.cluster_backup import backup_cluster
from strongroom.engines.redis.conn import RedisConnection
from strongroom.engines.redis.restore import RedisRestoreRequest, restore_redis
from strongroom.engines.redis.topology import discover_cluster
from strongroom.sandbox.redis_cluster import RedisClusterSandbox

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def _age_key() -> EncryptionConfig:
    import pyrage

    ident = pyrage.x25519.Identity.generate()
    return EncryptionConfig(recipients=[str(ident.to_public())], identities=[SecretStr(str(ident))])


def fill(cluster: RedisClusterSandbox, keys: int) -> None:
    rng = random.Random(7)
    c = cluster.client()
    batch = 5000
    for start in range(0, keys, batch):
        pipe = c.pipeline(transaction=False)
        for i in range(start, min(start + batch, keys)):
            pipe.set(f"k:{i}", rng.randbytes(200))
        pipe.execute()
    c.close()
    for node in cluster.masters_now():
        node.client().execute_command("WAIT", 1, 30_000)


def raw_parallel(cluster: RedisClusterSandbox, conn: RedisConnection, out: Path) -> float:
    replicas = [s.replicas[0].address for s in discover_cluster(conn).shards]
    env = cluster.env()

    def one(i: int, address: str) -> None:
        host, port = address.rsplit(":", 1)
        cmd = (
            f"redis-cli -h {host} -p {port} --rdb - 2>/dev/null "
            f"| zstd -3 -T0 -q -f -o {out}/{i}.zst"
        )
        subprocess.run(["bash", "-o", "pipefail", "-c", cmd], env=env, check=True)

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(len(replicas)) as pool:
        for f in [pool.submit(one, i, a) for i, a in enumerate(replicas)]:
            f.result()
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    keys, repeats = (200_000, 2) if args.quick else (2_000_000, 3)
    work = Path(tempfile.mkdtemp(prefix="strongroom-bench-cluster-"))
    source = RedisClusterSandbox(3, 1).start()
    other = RedisClusterSandbox(4, 0).start()
    enc = _age_key()
    try:
        fill(source, keys)
        conn = RedisConnection(
            name="bench",
            topology="cluster",
            seed_nodes=source.seeds[:1],
            password=SecretStr(source.password),
        )
        target = RedisConnection(
            name="bench-other",
            topology="cluster",
            seed_nodes=other.seeds[:1],
            password=SecretStr(other.password),
        )
        raw_s: list[float] = []
        backup_s: list[float] = []
        restore_s: list[float] = []
        rdb_bytes = 0
        shards = 0
        for rep in range(repeats):
            raw_dir = work / f"raw{rep}"
            raw_dir.mkdir()
            raw_s.append(raw_parallel(source, conn, raw_dir))
            root = work / f"repo{rep}"
            repo, config = bench_repo(root), bench_config(kind="local", path=str(root))
            t0 = time.monotonic()
            manifest = backup_cluster(conn, repo, config, enc)
            backup_s.append(time.monotonic() - t0)
            rdb_bytes = manifest.raw_size
            shards = len(manifest.artifacts)
            t0 = time.monotonic()
            report = restore_redis(
                target,
                repo,
                enc,
                RedisRestoreRequest(source_target="bench", flush_existing=True),
            )
            restore_s.append(time.monotonic() - t0)
            assert report["keys_ok"] and report["shape"] == "other shape"
            shutil.rmtree(raw_dir)
            shutil.rmtree(root)
        med_raw, med_backup = statistics.median(raw_s), statistics.median(backup_s)
        result: dict[str, Any] = {
            "bench": "redis-cluster",
            "mode": "quick" if args.quick else "full",
            "keys": keys,
            "value_bytes": 200,
            "shards": shards,
            "replicas_per_shard": 1,
            "rdb_mib_total": round(rdb_bytes / 2**20, 2),
            "cluster_backup_s": round(med_backup, 3),
            "raw_parallel_rdb_s": round(med_raw, 3),
            "backup_over_raw": round(med_backup / med_raw, 2),
            "restore_other_shape_s": round(statistics.median(restore_s), 3),
            "restore_keys_per_s": round(keys / statistics.median(restore_s)),
            "runs": {
                "cluster_backup_s": backup_s,
                "raw_parallel_rdb_s": raw_s,
                "restore_other_shape_s": restore_s,
            },
            "method": "medians of the repeats; raw and strongroom interleaved in each repeat, "
            "both reading the same replicas; restore = live into a 4-master cluster "
            "(slot-routed RESTORE, key count and sample checks)",
            "cpus": os.cpu_count(),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "redis-cluster.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    finally:
        source.cleanup()
        other.cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
