"""Staging a Redis backup in a scratch server, and checking the target against it.

Both restore modes load the backup into a scratch ``redis-server`` first (which proves
the checksums, the decryption and the RDB or the logical dump) and, once the target has
changed, compare its key counts and a sample of values with what the scratch server
held. A failed comparison raises ``IntegrityError``.
"""

from __future__ import annotations

import time
from typing import Any

from strongroom.artifacts import read_artifact
from strongroom.catalog import Manifest
from strongroom.config import EncryptionConfig
from strongroom.engines.redis.conn import RedisConnection, redis_errors
from strongroom.engines.redis.key_copy import (
    RespSocket,
    compare_samples,
    count_keys,
    sample_digests,
)
from strongroom.engines.redis.logical import LogicalParser
from strongroom.engines.redis.scratch import ScratchRedis
from strongroom.errors import IntegrityError
from strongroom.pipeline import Progress
from strongroom.private_files import create_private
from strongroom.repository.base import Repository


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


def stage_rdb(
    scratch: ScratchRedis,
    repo: Repository,
    manifest: Manifest,
    enc: EncryptionConfig,
    progress: Progress | None,
) -> dict[str, Any]:
    """Write the RDB artifact into the scratch folder (0600); it is complete only once every
    checksum (stored and plaintext SHA-256, age authentication) has passed."""
    started = time.monotonic()
    with create_private(scratch.rdb_path) as handle:
        read_artifact(repo, manifest.artifacts[0], handle, encryption=enc, progress=progress)
    return {"read_s": round(time.monotonic() - started, 3)}


def load_scratch(
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
        stage_rdb(scratch, repo, manifest, enc, progress)
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


def scratch_state(
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


def verify_target(
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


def fail_if_bad(report: dict[str, Any]) -> None:
    if not report["keys_ok"]:
        bad = [c for c in report["key_checks"] if not c["ok"]]
        raise IntegrityError(f"restored key counts differ from the backup: {bad[:5]}")
    if not report["sample"]["ok"]:
        raise IntegrityError(
            f"restored values differ from the backup: {report['sample']['mismatched'][:5]}"
        )
