"""The logical Redis dump format (``redis-logical``): SCAN + PTTL + DUMP, framed.

Used when the server refuses replication and its data file is out of reach
(managed Redis). All integers are big-endian::

    file    = magic header record* trailer
    magic   = "SRRLOG" 0x00 0x01                     (8 bytes; the last byte is the version)
    header  = u32 length, JSON object                {"format", "version", "redis_version",
                                                      "rdb_version", "started_at", "dbs"}
    record  = "D" u32 db                             following keys belong to database db
            | "K" u32 keylen key i64 expire_at_ms    expire_at_ms: absolute Unix ms, -1 = none
                  u64 payloadlen payload             payload: the DUMP reply, verbatim
    trailer = "E" u32 length, JSON object            {"keys": {"<db>": count}, "vanished": n,
                                                      "finished_at"}

A DUMP payload ends with its RDB version (u16 little-endian) and a CRC64 of
everything before it, so every value carries its own checksum; ``RESTORE key
ttl payload REPLACE ABSTTL`` recreates it, and a key whose absolute expiry has
passed is not created (the same rule as loading an RDB).

The export is not a point-in-time snapshot: each key is consistent, but keys
written during the SCAN may or may not be included, and SCAN may return a key
twice while a database is rehashing (restores are idempotent: REPLACE).
"""

from __future__ import annotations

import datetime as dt
import json
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

from strongroom.catalog import Artifact, Manifest
from strongroom.engines.redis.conn import RedisConnection, redis_errors
from strongroom.engines.redis.rdb import crc64
from strongroom.errors import IntegrityError

MAGIC = b"SRRLOG\x00\x01"
FORMAT = "strongroom-redis-logical"
VERSION = 1
CONTENT_LOGICAL = "redis-logical"
_U32 = struct.Struct(">I")
_KEY_TAIL = struct.Struct(">qQ")
MAX_FRAME = 1 << 40


def _json_frame(tag: bytes, data: dict[str, Any]) -> bytes:
    body = json.dumps(data, sort_keys=True).encode()
    return tag + _U32.pack(len(body)) + body


def key_record(key: bytes, expire_at_ms: int, payload: bytes) -> bytes:
    return b"".join(
        (b"K", _U32.pack(len(key)), key, _KEY_TAIL.pack(expire_at_ms, len(payload)), payload)
    )


def payload_version(payload: bytes | memoryview) -> int:
    """The RDB version a DUMP payload was written with (its footer)."""
    if len(payload) < 10:
        raise IntegrityError("DUMP payload too short")
    return int.from_bytes(payload[-10:-8], "little")


def check_payload(payload: bytes | memoryview) -> None:
    """A DUMP payload's own CRC64 (zero means the server ran with rdbchecksum no)."""
    stored = int.from_bytes(payload[-8:], "little")
    if stored and crc64(payload[:-8]) != stored:
        raise IntegrityError("a DUMP payload's CRC64 does not match (corrupt value)")


class LogicalExport:
    """A file-like source producing the logical format from a live server."""

    def __init__(
        self,
        conn: RedisConnection,
        dbs: list[int],
        *,
        redis_version: str,
        batch: int = 1000,
    ) -> None:
        self.conn = conn
        self.dbs = dbs
        self.batch = batch
        self.redis_version = redis_version
        self.counts: dict[int, int] = {}
        self.vanished = 0
        self.max_payload_version = 0
        self.error: BaseException | None = None
        self._frames = self._generate()
        self._buffer = bytearray()
        self._done = False

    def _generate(self) -> Iterator[bytes]:
        yield MAGIC + _json_frame(
            b"",
            {
                "format": FORMAT,
                "version": VERSION,
                "redis_version": self.redis_version,
                "started_at": dt.datetime.now(dt.UTC).isoformat(),
                "dbs": self.dbs,
            },
        )
        for db in self.dbs:
            client = self.conn.client(db)
            yield b"D" + _U32.pack(db)
            count = 0
            cursor = 0
            with redis_errors(f"logical export of db {db} from {self.conn.address}"):
                while True:
                    cursor, keys = client.scan(cursor, count=self.batch)
                    if keys:
                        pipe = client.pipeline(transaction=False)
                        for key in keys:
                            pipe.pttl(key)
                            pipe.dump(key)
                        replies = pipe.execute()
                        now_ms = int(time.time() * 1000)
                        parts = []
                        for i, key in enumerate(keys):
                            ttl, payload = replies[2 * i], replies[2 * i + 1]
                            if payload is None or ttl == -2:
                                self.vanished += 1
                                continue
                            expire = now_ms + int(ttl) if int(ttl) >= 0 else -1
                            if not self.max_payload_version:
                                self.max_payload_version = payload_version(payload)
                            raw_key = key if isinstance(key, bytes) else key.encode()
                            parts.append(key_record(raw_key, expire, payload))
                            count += 1
                        yield b"".join(parts)
                    if int(cursor) == 0:
                        break
                client.close()
            self.counts[db] = count
        yield _json_frame(
            b"E",
            {
                "keys": {str(db): n for db, n in self.counts.items()},
                "vanished": self.vanished,
                "finished_at": dt.datetime.now(dt.UTC).isoformat(),
            },
        )

    def read(self, n: int = -1) -> bytes:
        try:
            want = n if n and n > 0 else 1024 * 1024
            while len(self._buffer) < want and not self._done:
                try:
                    self._buffer += next(self._frames)
                except StopIteration:
                    self._done = True
            out = bytes(self._buffer[:want])
            del self._buffer[:want]
            return out
        except BaseException as exc:
            self.error = exc
            raise

    def readable(self) -> bool:
        return True


KeyHandler = Callable[[int, bytes, int, bytes], None]


class LogicalParser:
    """A sink that parses the format as bytes arrive and calls ``on_key(db, key, exp, payload)``."""

    def __init__(self, on_key: KeyHandler | None = None) -> None:
        self.on_key = on_key
        self.header: dict[str, Any] | None = None
        self.trailer: dict[str, Any] | None = None
        self.counts: dict[int, int] = {}
        self.db: int | None = None
        self._buf = bytearray()
        self._magic_seen = False

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._buf += data
        self._parse()
        return len(data)

    def _need(self, pos: int, n: int) -> bool:
        return len(self._buf) - pos >= n

    def _parse(self) -> None:
        buf = self._buf
        pos = 0
        if not self._magic_seen:
            if len(buf) < len(MAGIC) + 4:
                return
            if bytes(buf[: len(MAGIC)]) != MAGIC:
                raise IntegrityError("not a strongroom logical Redis dump (bad magic)")
            (size,) = _U32.unpack_from(buf, len(MAGIC))
            if len(buf) < len(MAGIC) + 4 + size:
                return
            self.header = json.loads(bytes(buf[len(MAGIC) + 4 : len(MAGIC) + 4 + size]))
            pos = len(MAGIC) + 4 + size
            self._magic_seen = True
        view = memoryview(buf)
        try:
            while pos < len(buf):
                if self.trailer is not None:
                    raise IntegrityError("data after the end of the logical dump")
                tag = buf[pos]
                if tag == 0x44:  # D
                    if not self._need(pos, 5):
                        break
                    (self.db,) = _U32.unpack_from(buf, pos + 1)
                    self.counts.setdefault(self.db, 0)
                    pos += 5
                elif tag == 0x4B:  # K
                    if not self._need(pos, 5):
                        break
                    (klen,) = _U32.unpack_from(buf, pos + 1)
                    if not self._need(pos, 5 + klen + 16):
                        break
                    expire, plen = _KEY_TAIL.unpack_from(buf, pos + 5 + klen)
                    if plen > MAX_FRAME:
                        raise IntegrityError("logical dump frame too large (corrupt)")
                    end = pos + 5 + klen + 16 + plen
                    if len(buf) < end:
                        break
                    if self.db is None:
                        raise IntegrityError("key record before any database record")
                    key = bytes(view[pos + 5 : pos + 5 + klen])
                    payload = bytes(view[pos + 21 + klen : end])
                    self.counts[self.db] += 1
                    if self.on_key is not None:
                        self.on_key(self.db, key, expire, payload)
                    pos = end
                elif tag == 0x45:  # E
                    if not self._need(pos, 5):
                        break
                    (size,) = _U32.unpack_from(buf, pos + 1)
                    if not self._need(pos, 5 + size):
                        break
                    self.trailer = json.loads(bytes(buf[pos + 5 : pos + 5 + size]))
                    pos += 5 + size
                else:
                    raise IntegrityError(f"unknown record type 0x{tag:02x} in logical dump")
        finally:
            view.release()
            del buf[:pos]

    def finish(self) -> dict[str, Any]:
        if self.header is None or self.header.get("format") != FORMAT:
            raise IntegrityError("logical dump has no valid header")
        if self.trailer is None or self._buf:
            raise IntegrityError("logical dump is truncated (no end record)")
        declared = {int(k): int(v) for k, v in self.trailer.get("keys", {}).items()}
        if declared != {db: n for db, n in self.counts.items()}:
            raise IntegrityError(
                f"logical dump key counts {self.counts} differ from its end record {declared}"
            )
        return {"keys": {str(db): n for db, n in self.counts.items()}, "header": self.header}


class LogicalCheck:
    """Verify-time check: framing, end record, every payload's CRC64 and RDB version."""

    def __init__(self, manifest: Manifest, artifact: Artifact) -> None:
        self._max_version = 0
        self._expected = {
            str(db): v.get("records", v.get("keys"))
            for db, v in (manifest.details.get("logical", {}).get("dbs", {}) or {}).items()
        }
        self._parser = LogicalParser(self._on_key)
        self._error: IntegrityError | None = None

    def _on_key(self, db: int, key: bytes, expire: int, payload: bytes) -> None:
        check_payload(payload)
        self._max_version = max(self._max_version, payload_version(payload))

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._error is None:
            try:
                self._parser.write(data)
            except IntegrityError as exc:
                self._error = exc
            except (ValueError, struct.error) as exc:
                self._error = IntegrityError(f"logical dump is malformed ({exc})")
        return len(data)

    def finish(self) -> dict[str, Any]:
        if self._error is not None:
            raise self._error
        found = self._parser.finish()
        if self._expected and found["keys"] != self._expected:
            raise IntegrityError(
                f"logical dump holds {found['keys']} keys, the manifest says {self._expected}"
            )
        return {"keys": found["keys"], "payload_rdb_version": self._max_version}
