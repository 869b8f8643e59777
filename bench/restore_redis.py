"""Redis live restore against the load floor, measured in the same run.

The dataset is ``bench.redis_bench.populate`` (90% strings, 10% small hashes, values
half random, half repetitive) plus a few thousand lists, sets, sorted sets and
keys with TTLs; quick: 100k keys (~50 MB RDB), full: 1M keys (~1 GB RDB). One
strongroom backup goes into a local repository (signed, age-encrypted), then, per
repeat (quick 1, full 3), interleaved:

- the **load floor**: ``redis-server`` started on the backup's RDB file, from spawn
  until it answers PING with loading done;
- strongroom's **live restore** (``copy_method=replicate``) into an empty running
  server, as a whole new Python process (``--child-restore``: imports, reading and
  decrypting the artifact, scratch load, the target's load, the checks); the
  target is emptied between repeats.

Once per run (full size only with ``--pipeline``) the default ``copy_method=pipeline``
is timed the same way for comparison. ``python -m bench.restore_redis [--quick]``
prints the JSON and writes ``bench/results/restore-redis[-quick].json``;
``run(quick, workdir)`` is the section another module assembles into restore.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.cpu import CLK_TCK, _host_ticks, _stat_fields, wait_quiet
from bench.redis_bench import populate
from bench.signing import bench_config, bench_repo

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def add_other_types(server: Any, n: int, seed: int = 5) -> None:
    """``n`` lists, sets, sorted sets and strings with TTLs (a fifth of them expiring)."""
    import redis

    rng = random.Random(seed)
    client = redis.Redis(host=server.host, port=server.port, password=server.password)
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        kind = i % 4
        if kind == 0:
            pipe.rpush(f"l:{i}", *[rng.randbytes(20) for _ in range(20)])
        elif kind == 1:
            pipe.sadd(f"s:{i}", *[f"m{j}" for j in range(rng.randint(5, 40))])
        elif kind == 2:
            pipe.zadd(f"z:{i}", {f"m{j}": rng.random() for j in range(30)})
        else:
            pipe.set(f"t:{i}", rng.randbytes(64), px=rng.randint(600_000, 3_600_000))
        if i % 5 == 0 and kind != 3:
            pipe.pexpire(f"{'lsz'[kind]}:{i}", 3_600_000)
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()
    client.close()


def _ping_loaded(port: int, password: str, deadline: float) -> None:
    """Poll ``AUTH`` + ``PING`` on a bare socket until +PONG (not -LOADING)."""
    auth = b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%b\r\n" % (len(password), password.encode())
    while time.perf_counter() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(auth + b"*1\r\n$4\r\nPING\r\n")
                data = b""
                while data.count(b"\r\n") < 2:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                if data.endswith(b"+PONG\r\n"):
                    return
        except OSError:
            pass
        time.sleep(0.01)
    raise TimeoutError("redis-server did not finish loading")


def _pid_cpu(pid: int) -> float:
    fields = _stat_fields(pid)
    return sum(int(x) for x in fields[11:13]) / CLK_TCK if fields else 0.0


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _sample(fn: Any, own_cpu: Any) -> dict[str, Any]:
    """Wait for a quiet host (up to 20 s), run ``fn``; wall, own and other CPU seconds."""
    waited, busy = wait_quiet(0.25, timeout=20.0)
    host0 = _host_ticks()[0]
    record: dict[str, Any] = fn()
    host = (_host_ticks()[0] - host0) / CLK_TCK
    cpu = own_cpu(record)
    record.update(
        cpu_s=round(cpu, 3),
        other_cpu_s=round(max(0.0, host - cpu), 3),
        host_busy_before=round(busy, 2),
        quiet_wait_s=round(waited, 1),
    )
    return record


def load_floor(rdb: Path, work: Path) -> dict[str, Any]:
    """Seconds from spawning redis-server on ``rdb`` until it answers PING, loaded, and
    the CPU seconds the server used for it."""
    from strongroom.sandbox.ports import free_port

    folder = work / "floor"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    os.link(rdb, folder / "dump.rdb")
    port = free_port()
    password = "floor-" + os.urandom(8).hex()
    conf = folder / "redis.conf"
    conf.write_text(
        f'port {port}\nbind 127.0.0.1\nrequirepass "{password}"\ndir "{folder}"\n'
        'dbfilename dump.rdb\nsave ""\nappendonly no\nlogfile ""\n'
    )
    start = time.perf_counter()
    proc = subprocess.Popen(
        ["redis-server", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _ping_loaded(port, password, start + 600)
        wall = time.perf_counter() - start
        return {"ok": True, "wall_s": wall, "server_cpu_s": _pid_cpu(proc.pid)}
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def run_restore_child(target: Any, repo: Path, identity: str, method: str) -> dict[str, Any]:
    """One ``restore_redis`` in a fresh interpreter; wall time includes start-up."""
    job = {
        "host": target.host,
        "port": target.port,
        "password": target.password,
        "repo": str(repo),
        "identity": identity,
        "copy_method": method,
    }
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.restore_redis", "--child-restore"],
        cwd=ROOT,
        input=json.dumps(job).encode(),  # secrets travel on stdin, never argv
        capture_output=True,
        check=False,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"ok": False, "wall_s": wall, "error": proc.stderr.decode()[-2000:]}
    return {"ok": True, "wall_s": wall, **json.loads(proc.stdout)}


def _child_restore() -> None:
    t0 = time.perf_counter()
    job = json.loads(sys.stdin.read())
    from pydantic import SecretStr

    from strongroom.config import EncryptionConfig
    from strongroom.engines.redis.conn import RedisConnection
    from strongroom.engines.redis.restore import RedisRestoreRequest, restore_redis

    imported = time.perf_counter() - t0
    conn = RedisConnection(
        name="bench", host=job["host"], port=job["port"], password=SecretStr(job["password"])
    )
    enc = EncryptionConfig(identities=[SecretStr(job["identity"])])
    start = time.perf_counter()
    report = restore_redis(
        conn,
        bench_repo(Path(job["repo"])),
        enc,
        RedisRestoreRequest(copy_method=job["copy_method"]),
    )
    call = time.perf_counter() - start
    out = {
        "import_s": round(imported, 3),
        "restore_call_s": round(call, 3),
        "read_s": report.get("read_s"),
        "load_s": report.get("load_s"),
        "copy_s": report["copy"]["seconds"],
        "keys": report["copy"]["keys"],
        "replication": report["copy"].get("replication"),
        "keys_ok": report["keys_ok"],
        "sample_ok": report["sample"]["ok"],
    }
    sys.stdout.write(json.dumps(out))


def restore_once(target: Any, repo: Path, identity: Any) -> dict[str, Any]:
    """The replicate restore in a child; CPU of the child (and its scratch server) and of
    the target server during it."""
    before = (_children_cpu(), _pid_cpu(target.proc.pid))
    record = run_restore_child(target, repo, str(identity), "replicate")
    record["child_cpu_s"] = round(_children_cpu() - before[0], 3)
    record["target_cpu_s"] = round(_pid_cpu(target.proc.pid) - before[1], 3)
    return record


def _cpu(record: dict[str, Any]) -> float:
    return float(record["child_cpu_s"] + record["target_cpu_s"])


def _median(records: list[dict[str, Any]], field: str) -> float | None:
    values = [r[field] for r in records if r.get("ok") and r.get(field) is not None]
    return round(statistics.median(values), 3) if values else None


def run(quick: bool, workdir: Path, *, pipeline: bool | None = None) -> dict[str, Any]:
    """The restore.json section: build, back up, then time floor and restore."""
    import redis
    from pydantic import SecretStr
    from pyrage import x25519

    from strongroom.artifacts import read_artifact
    from strongroom.config import EncryptionConfig
    from strongroom.engines.redis.backup import backup_redis
    from strongroom.engines.redis.conn import RedisConnection
    from strongroom.sandbox.redis import RedisServer

    keys, sizes, repeats = (100_000, (800, 1200), 1) if quick else (1_000_000, (1700, 2300), 3)
    pipeline = quick if pipeline is None else pipeline
    workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="restore-redis-", dir=workdir))
    identity = x25519.Identity.generate()
    enc = EncryptionConfig(recipients=[str(identity.to_public())])
    dec = EncryptionConfig(identities=[SecretStr(str(identity))])
    repo_path = work / "repo"
    repo = bench_repo(repo_path)
    out: dict[str, Any] = {"quick": quick, "repeats": repeats}
    (work / "source").mkdir()
    source = RedisServer(work / "source").start()
    try:
        t0 = time.perf_counter()
        populate(source, keys, sizes)
        add_other_types(source, keys // 50)
        out["redis_populate_s"] = round(time.perf_counter() - t0, 2)
        conn = RedisConnection(
            name="bench", host=source.host, port=source.port, password=SecretStr(source.password)
        )
        t0 = time.perf_counter()
        manifest = backup_redis(conn, repo, bench_config(kind="local", path=str(repo_path)), enc)
        out["redis_backup_s"] = round(time.perf_counter() - t0, 2)
        out["redis_keys"] = sum(v["keys"] for v in manifest.details["keyspace"].values())
    finally:
        source.stop()
    rdb = work / "backup.rdb"
    with rdb.open("wb") as handle:
        read_artifact(repo, manifest.artifacts[0], handle, encryption=dec)
    out["redis_rdb_mib"] = round(rdb.stat().st_size / 2**20, 1)
    (work / "target").mkdir()
    target = RedisServer(work / "target").start()
    client = redis.Redis(host=target.host, port=target.port, password=target.password)
    floors: list[dict[str, Any]] = []
    ours: list[dict[str, Any]] = []
    try:
        for i in range(repeats):
            order = ["floor", "ours"] if i % 2 == 0 else ["ours", "floor"]
            for name in order:
                if name == "floor":
                    floors.append(
                        _sample(lambda: load_floor(rdb, work), lambda r: r["server_cpu_s"])
                    )
                else:
                    client.flushall()
                    ours.append(_sample(lambda: restore_once(target, repo_path, identity), _cpu))
                    ours[-1]["ok"] = ours[-1]["ok"] and client.dbsize() == out["redis_keys"]
        if pipeline:
            client.flushall()
            out["redis_live_restore_pipeline"] = run_restore_child(
                target, repo_path, str(identity), "pipeline"
            )
    finally:
        client.close()
        target.stop()
        shutil.rmtree(work, ignore_errors=True)
    floor_s, ours_s = _median(floors, "wall_s"), _median(ours, "wall_s")
    pairs = [o["wall_s"] / f["wall_s"] for f, o in zip(floors, ours, strict=True) if o["ok"]]
    floor_cpu, ours_cpu = _median(floors, "cpu_s"), _median(ours, "cpu_s")
    out.update(
        {
            "redis_load_floor_s": floor_s,
            "redis_live_restore_s": ours_s,
            "redis_live_restore_over_load_floor": round(ours_s / floor_s, 3)
            if floor_s and ours_s
            else None,
            "redis_live_restore_method": "replicate",
            "redis_pair_ratios": [round(r, 3) for r in pairs],
            "redis_load_floor_cpu_s": floor_cpu,
            "redis_live_restore_cpu_s": ours_cpu,
            "redis_live_restore_over_load_floor_cpu": round(ours_cpu / floor_cpu, 3)
            if floor_cpu and ours_cpu
            else None,
            "redis_live_restore_samples": ours,
            "redis_load_floor_samples": floors,
        }
    )
    if pipeline and floor_s and out["redis_live_restore_pipeline"].get("ok"):
        out["redis_live_restore_pipeline_over_load_floor"] = round(
            out["redis_live_restore_pipeline"]["wall_s"] / floor_s, 3
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k keys (~50 MB RDB), 1 repeat")
    parser.add_argument("--pipeline", action="store_true", help="also time copy_method=pipeline")
    parser.add_argument("--child-restore", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_restore:
        _child_restore()
        return
    workdir = Path(tempfile.mkdtemp(prefix="strongroom-bench-"))
    try:
        results = run(args.quick, workdir, pipeline=args.quick or args.pipeline)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    text = json.dumps(results, indent=2)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "restore-redis-quick.json" if args.quick else "restore-redis.json"
    (RESULTS / name).write_text(text + "\n")


if __name__ == "__main__":
    main()
