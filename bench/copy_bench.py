"""Copy throughput: ``strongroom.copying`` (local repository -> S3 with object lock)
against a plain boto3 upload of the same objects, same run; plus a real kill and resume.

    python -m bench.copy_bench [--quick]  -> bench/results/copy.json
                                            (copy-quick.json; --output to choose)

A local source repository gets ``--backups`` signed backups, each one artifact of
``--mib`` MiB of random bytes (stored through strongroom's own pipeline: zstd, age,
SHA-256; random data does not compress, so stored MiB ~= raw MiB), plus a few signed
evidence records. Destinations are buckets on a local moto S3 server (object lock,
COMPLIANCE, 1 day).

* ``copy_s`` / ``copy_mib_s``: ``copy_repository`` into a fresh bucket (signature of
  each manifest checked first, every artifact streamed with its SHA-256 checked against
  the signed manifest before commit, the destination's lock on every object, the
  manifest last, copy records in both repositories). ``copied_mib``: bytes copied.
* ``raw_s`` / ``raw_mib_s``: boto3 ``upload_fileobj`` of every object file of the
  source folder (what ``aws s3 cp --recursive`` does), into another bucket, with the
  same lock headers; no checks. ``copy_over_raw_s``: the ratio of the wall times.
* ``resume_after_kill_ok``: a copy in a child process (``jobs=1``) is SIGKILLed once the
  first backup's manifest is visible at the destination; the second run must skip what
  was committed, copy the rest, and end with every source object byte-identical at the
  destination, each locked, and every backup listed by the destination's catalog.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.signing import bench_config

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MIB = 1 << 20
TARGET = "bench"

_CHILD = """
import json, sys
from bench.signing import bench_config
from strongroom.copying.engine import CopyOptions, copy_repository
from strongroom.repository import open_repository
src, dst = (bench_config(**json.loads(a)) for a in sys.argv[1:3])
copy_repository(open_repository(src), open_repository(dst), dst, CopyOptions(jobs=1))
"""


def log(message: str) -> None:
    print(f"[copy-bench] {message}", file=sys.stderr, flush=True)


class _Random(io.RawIOBase):
    """``size`` bytes of random data, read in chunks (never whole in memory)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.left, MIB)
        if n <= 0:
            return 0
        buffer[:n] = os.urandom(n)
        self.left -= n
        return n


def make_source(root: Path, backups: int, mib: int) -> tuple[Any, list[str]]:
    """A signed local repository with ``backups`` one-artifact backups."""
    import datetime as dt

    from pyrage import x25519

    from strongroom.artifacts import store_artifact
    from strongroom.catalog import Catalog, Manifest, data_key
    from strongroom.config import EncryptionConfig
    from strongroom.ids import new_backup_id
    from strongroom.repository import open_repository
    from strongroom.signing import put_signed_json

    repo = open_repository(bench_config(kind="local", path=str(root)))
    enc = EncryptionConfig(recipients=[str(x25519.Identity.generate().to_public())])
    ids = []
    base = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    for index in range(backups):
        started = base + dt.timedelta(hours=index)
        bid = new_backup_id(started)
        key = data_key("postgresql", TARGET, bid, "data.bin")
        artifact = store_artifact(
            repo,
            key,
            io.BufferedReader(_Random(mib * MIB), buffer_size=MIB),
            name="data.bin",
            content="bench-random",
            encryption=enc,
            level=1,
        )
        manifest = Manifest(
            backup_id=bid,
            engine="postgresql",
            target=TARGET,
            started_at=started,
            finished_at=started + dt.timedelta(minutes=1),
            repository=repo.describe(),
            artifacts=[artifact],
        )
        Catalog(repo).write(manifest)
        put_signed_json(repo, f"drills/postgresql/{TARGET}/{bid}.json", {"ok": True})
        ids.append(bid)
    return repo, ids


def _dest(moto: Any, lock: bool = True) -> tuple[Any, Any]:
    from strongroom.repository import open_repository

    bucket = f"copy-{uuid.uuid4().hex[:12]}"
    moto.create_bucket(bucket, object_lock=lock)
    config = bench_config(
        kind="s3",
        bucket=bucket,
        prefix="offsite",
        endpoint_url=moto.endpoint_url,
        access_key_id=moto.access_key,
        secret_access_key=moto.secret_key,
        lock_mode="COMPLIANCE" if lock else None,
        retention_days=1 if lock else 0,
        part_size=8 * MIB,
    )
    return open_repository(config), config


def raw_upload(moto: Any, root: Path) -> dict[str, Any]:
    """boto3 upload_fileobj of every object file under ``root`` (as aws s3 cp does)."""
    import datetime as dt

    from boto3.s3.transfer import TransferConfig

    client = moto.s3()
    bucket = f"raw-{uuid.uuid4().hex[:12]}"
    moto.create_bucket(bucket, object_lock=True)
    until = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    extra = {"ObjectLockMode": "COMPLIANCE", "ObjectLockRetainUntilDate": until}
    transfer = TransferConfig(multipart_chunksize=8 * MIB, max_concurrency=4)
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    started = time.monotonic()
    size = 0
    for path in files:
        with path.open("rb") as f:
            client.upload_fileobj(
                f,
                bucket,
                f"offsite/{path.relative_to(root).as_posix()}",
                ExtraArgs=extra,
                Config=transfer,
            )
        size += path.stat().st_size
    elapsed = time.monotonic() - started
    return {"raw_s": round(elapsed, 3), "raw_mib": round(size / MIB, 2), "objects": len(files)}


def _digests(repo: Any, prefixes: tuple[str, ...]) -> dict[str, str]:
    found = {}
    for prefix in prefixes:
        for info in repo.list(prefix):
            digest = hashlib.sha256()
            with repo.open_read(info.key) as f:
                while chunk := f.read(MIB):
                    digest.update(chunk)
            found[info.key] = digest.hexdigest()
    return found


def kill_and_resume(moto: Any, source: Any, source_root: Path, ids: list[str]) -> dict[str, Any]:
    from strongroom.catalog import Catalog, manifest_key
    from strongroom.copying.engine import copy_repository

    dest, config = _dest(moto)
    fields = config.model_dump(mode="json", exclude={"signing_key", "trusted_signers"})
    fields["secret_access_key"] = moto.secret_key
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _CHILD,
            json.dumps({"kind": "local", "path": str(source_root)}),
            json.dumps(fields),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    first = manifest_key("postgresql", TARGET, ids[0])
    deadline = time.monotonic() + 300
    try:
        while not dest.exists(first) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    visible_after_kill = [m.backup_id for m in Catalog(dest).list()]
    started = time.monotonic()
    report = copy_repository(source, dest, config)
    resume_s = time.monotonic() - started
    prefixes = ("catalog/", "data/", "drills/")
    identical = _digests(source, prefixes) == _digests(dest, prefixes)
    locked = all(
        (dest.head(info.key) or {}).get("ObjectLockMode") == "COMPLIANCE"
        for prefix in prefixes
        for info in dest.list(prefix)
    )
    listed = [m.backup_id for m in Catalog(dest).list()]
    summary = report.summary()
    return {
        "killed_midway": 0 < len(visible_after_kill) < len(ids),
        "backups_visible_after_kill": len(visible_after_kill),
        "resume_s": round(resume_s, 3),
        "resume_backups_skipped": summary["backups_skipped"],
        "resume_backups_copied": summary["backups_copied"],
        "resume_report_ok": report.ok,
        "identical": identical,
        "all_locked": locked,
        "all_listed": listed == ids,
        "ok": bool(
            report.ok
            and identical
            and locked
            and listed == ids
            and 0 < len(visible_after_kill) < len(ids)
            and summary["backups_skipped"] == len(visible_after_kill)
        ),
    }


def run(backups: int, mib: int, jobs: int) -> dict[str, Any]:
    from strongroom.copying.engine import CopyOptions, copy_repository
    from tests.fixtures.s3 import MotoServer

    work = Path(tempfile.mkdtemp(prefix="strongroom-bench-copy-"))
    (work / "moto").mkdir()
    moto = MotoServer(work / "moto")
    try:
        moto.start()
        log(f"source: {backups} backups x {mib} MiB")
        source_root = work / "source"
        source, ids = make_source(source_root, backups, mib)
        dest, config = _dest(moto)
        log("strongroom copy")
        started = time.monotonic()
        report = copy_repository(source, dest, config, CopyOptions(jobs=jobs))
        copy_s = time.monotonic() - started
        if not report.ok:
            raise SystemExit(f"copy failed: {report.errors[:3]}")
        copied_mib = report.summary()["bytes_copied"] / MIB
        log("raw boto3 upload")
        raw = raw_upload(moto, source_root)
        log("kill and resume")
        resume = kill_and_resume(moto, source, source_root, ids)
    finally:
        moto.stop()
        shutil.rmtree(work, ignore_errors=True)
    return {
        "backups": backups,
        "artifact_mib": mib,
        "jobs": jobs,
        "copied_mib": round(copied_mib, 2),
        "copy_s": round(copy_s, 3),
        "copy_mib_s": round(copied_mib / copy_s, 2),
        **raw,
        "raw_mib_s": round(raw["raw_mib"] / raw["raw_s"], 2),
        "copy_over_raw_s": round(copy_s / raw["raw_s"], 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "resume_after_kill_ok": resume["ok"],
        "resume": resume,
        "destination": "moto S3 (object lock COMPLIANCE, 1 day), local moto_server",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 x 16 MiB: a smoke test")
    parser.add_argument("--backups", type=int, default=None)
    parser.add_argument("--mib", type=int, default=None, help="artifact size per backup")
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    backups = args.backups or (4 if args.quick else 8)
    mib = args.mib or (16 if args.quick else 128)
    result = {"quick": args.quick, **run(backups, mib, args.jobs)}
    out = args.output or RESULTS / ("copy-quick.json" if args.quick else "copy.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if not result["resume_after_kill_ok"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
