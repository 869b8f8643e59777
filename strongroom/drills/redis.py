"""Redis restore drills: the backup goes into a throwaway redis-server started for the drill.

The restore is the engine's own ``live`` restore (``restore_redis``): the backup is
loaded (and proven) in the engine's scratch server, then copied server to server
into the drill's scratch server, with key counts and a sample of values checked.
After the optional hook, the drill compares the scratch server's key count per
database with the counts the backup held as loaded (exact) and reports the match
with the manifest's ``keyspace`` (taken by INFO around the snapshot: keys that
expired in between make it approximate), and optionally with the live source.

``scratch`` may name a dedicated scratch Redis instead; it is flushed in the
restored databases before and after (``flush_scratch`` must say so).
"""

from __future__ import annotations

from typing import Any

from strongroom.catalog import Manifest
from strongroom.config import EncryptionConfig
from strongroom.drills.core import LiveMode, live_verdict
from strongroom.engines.redis.conn import RedisConnection, redis_errors
from strongroom.engines.redis.restore import RedisRestoreRequest, restore_redis
from strongroom.engines.redis.scratch import ScratchRedis
from strongroom.errors import InvalidInput, StrongroomError
from strongroom.redact import register, scrub
from strongroom.repository.base import Repository


def _dbsize(conn: RedisConnection, db: int) -> int:
    client = conn.client(db)
    try:
        with redis_errors(f"DBSIZE of db {db} on {conn.address}"):
            return int(client.dbsize())
    finally:
        client.close()


class RedisDrill:
    """ScratchAdapter for Redis backups (see the module docstring)."""

    engine = "redis"

    def __init__(
        self,
        source: RedisConnection,
        repo: Repository,
        enc: EncryptionConfig,
        *,
        scratch: RedisConnection | None = None,
        flush_scratch: bool = False,
        live: LiveMode = "off",
        sandbox: bool = True,
        sample_size: int = 20,
    ) -> None:
        if scratch is not None and not flush_scratch:
            raise InvalidInput(
                "a Redis drill into a configured scratch server flushes the restored "
                "databases there: pass flush_scratch=True to allow it (or use the sandbox)"
            )
        self.source = source
        self.repo = repo
        self.enc = enc
        self.scratch_conn = scratch
        self.live: LiveMode = live
        self.sample_size = sample_size
        self.conn: RedisConnection | None = scratch
        self._server: ScratchRedis | None = None
        self._dbs: list[int] = []
        self._loaded: dict[int, int] = {}
        register(*source.secrets(), *(scratch.secrets() if scratch else []), *enc.secrets())
        _ = sandbox  # the default: a throwaway server when no scratch is configured

    def describe(self) -> dict[str, Any]:
        conn = self.conn
        return {
            "mode": "scratch server" if self.scratch_conn else "sandbox",
            "server": conn.address if conn else None,
            "databases": list(self._dbs),
        }

    def prepare(self, manifest: Manifest) -> None:
        keyspace = manifest.details.get("keyspace") or {}
        self._dbs = sorted(int(db) for db in keyspace) or [0]
        if self.scratch_conn is None:
            server = ScratchRedis(databases=max(self._dbs) + 1)
            self._server = server
            server.start()
            self.conn = server.connection().model_copy(update={"name": self.source.name})

    def restore(self, manifest: Manifest) -> dict[str, Any]:
        assert self.conn is not None
        report = restore_redis(
            self.conn,
            self.repo,
            self.enc,
            RedisRestoreRequest(
                backup_id=manifest.backup_id,
                source_target=manifest.target,
                mode="live",
                flush_existing=self.scratch_conn is not None,
                sample_size=self.sample_size,
            ),
        )
        checks = report.get("key_checks", [])
        self._loaded = {int(c["db"]): int(c["loaded"] or 0) for c in checks}
        self._dbs = sorted(self._loaded) or self._dbs
        return {
            "seconds": report.get("duration_s"),
            "copy_method": report.get("copy_method"),
            "raw_size": report.get("raw_size"),
            "key_checks": checks,
            "sample": report.get("sample"),
        }

    def handle(self) -> dict[str, Any]:
        return {"connection": self.conn, "dbs": list(self._dbs)}

    def compare(self, manifest: Manifest) -> list[dict[str, Any]]:
        assert self.conn is not None
        keyspace = {
            int(db): int(v.get("keys", 0))
            for db, v in (manifest.details.get("keyspace") or {}).items()
        }
        checks: list[dict[str, Any]] = []
        for db in self._dbs:
            restored = _dbsize(self.conn, db)
            loaded = self._loaded.get(db)
            check: dict[str, Any] = {
                "item": f"db{db}",
                "check": "keys vs backup",
                "backup_keys": loaded,
                "manifest_keys": keyspace.get(db),
                "restored_keys": restored,
                "matches_manifest": keyspace.get(db) == restored if db in keyspace else None,
                "ok": loaded is not None and restored == loaded,
            }
            if not check["ok"]:
                check["detail"] = f"db{db}: {restored} keys restored, the backup holds {loaded}"
            if self.live != "off":
                live = _dbsize(self.source, db)
                check["live_keys"] = live
                live_verdict(
                    check,
                    self.live,
                    live == restored,
                    f"db{db}: {restored} keys restored, live source has {live}",
                )
            checks.append(check)
        return checks

    def cleanup(self) -> dict[str, Any]:
        if self._server is not None:
            try:
                self._server.cleanup()
            except Exception as exc:
                return {"ok": False, "error": f"stopping the scratch server: {scrub(str(exc))}"}
            finally:
                self._server = None
            return {"ok": True, "sandbox_stopped": True}
        if self.scratch_conn is None:
            return {"ok": True}
        flushed = []
        try:
            for db in self._dbs:
                client = self.scratch_conn.client(db)
                try:
                    with redis_errors(f"flushing db {db} of the scratch server"):
                        client.flushdb()
                finally:
                    client.close()
                flushed.append(db)
        except StrongroomError as exc:
            return {"ok": False, "flushed": flushed, "error": scrub(str(exc))}
        return {"ok": True, "flushed": flushed}
