"""A hostile Redis dataset and a content fingerprint, for round-trip tests and demos.

Small test datasets hide bugs that real keyspaces show: every value type in
each of its encodings (listpack/quicklist, intset/hashtable, listpack/skiplist),
keys and values holding every byte value and invalid UTF-8, a string of more
than 20 MB, HyperLogLog and bitmap strings, TTLs, a stream with two consumer
groups, pending entries, acknowledged and deleted entries, spread over
databases 0, 1 and 5. ``load_gauntlet`` writes it (deterministically: a fixed
seed) and ``fingerprint`` hashes what a server holds: per database, per key,
a SHA-256 of (key, type, full content, TTL presence), so two servers compare
equal exactly when their content does, whatever order SCAN returns keys in and
whatever encodings the servers chose.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Iterable
from typing import Any

import redis

from strongroom.engines.redis.conn import RedisConnection

GAUNTLET_DBS = (0, 1, 5)
BIG_VALUE_SIZE = 20 * 1024 * 1024 + 4099  # more than 20 MB, not a round number
CHUNK = 1024 * 1024
SEED = 20261206
USERS = 5000  # "user:*" keys in db 0: the key-pattern restore selects them
INVALID_UTF8 = (b"\xc3\x28", b"\xa0\xa1", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xff\xfe")

Fingerprint = dict[int, dict[bytes, str]]


def _rng() -> random.Random:
    return random.Random(SEED)  # noqa: S311 (test data, reproducible on purpose)


def big_value() -> bytes:
    """The > 20 MB string: pseudo-random bytes (incompressible), the same every run."""
    return _rng().randbytes(BIG_VALUE_SIZE)


def load_gauntlet(conn: RedisConnection) -> dict[str, Any]:
    """Flush the server and write the gauntlet; returns keys per db, bytes and seconds."""
    started = time.monotonic()
    rng = _rng()
    c0 = conn.client(0, timeout=120)
    c0.flushall()
    c0.set(b"big:blob", big_value())
    pipe = c0.pipeline(transaction=False)
    # strings: every byte value in keys and values, invalid UTF-8, numbers, empty
    for b in range(256):
        pipe.set(b"byte:" + bytes([b]), bytes([b]) * (b + 1))
    pipe.set(bytes(range(256)), bytes(range(256)) * 16)
    for i, bad in enumerate(INVALID_UTF8):
        pipe.set(b"utf8:bad:" + bad, bad * (i + 2))
    pipe.set("str:plain", "hello, gauntlet")
    pipe.set("str:unicode:ключ:鍵", "значение ✓ 値")
    pipe.set("str:empty", b"")
    pipe.set("str:int", 1234567890123)
    pipe.set("str:negative", -42)
    pipe.set("str:float", "3.14159265358979")
    pipe.set("str:spaces and\nnewlines\r\n", b"a b\r\nc\x00d")
    # HyperLogLog and bitmap (strings to Redis)
    pipe.pfadd("hll:visitors", *[f"visitor-{i}" for i in range(20_000)])
    for offset in (0, 7, 8, 1023, 65_537, 1_000_003):
        pipe.setbit("bitmap:flags", offset, 1)
    # lists: small (listpack) and large (quicklist), binary elements
    pipe.rpush("list:small", "a", b"\x00", b"\xff\xfe", "", "z" * 70)
    pipe.rpush("list:big", *[rng.randbytes(rng.randint(0, 90)) for _ in range(3000)])
    # hashes: small and large, binary fields
    pipe.hset("hash:small", mapping={"f1": "v1", b"\x00bin": b"\xff\xfe", "empty": ""})
    pipe.hset("hash:big", mapping={f"field{i}".encode(): rng.randbytes(40) for i in range(2000)})
    # sets: intset, listpack, hashtable
    pipe.sadd("set:ints", *range(-50, 50))
    pipe.sadd("set:small", "x", "y", b"\x00\x01")
    pipe.sadd("set:big", *[rng.randbytes(12) for _ in range(3000)])
    # sorted sets: small and large, awkward scores
    pipe.zadd("zset:small", {"neg": -1.5, "zero": 0, "inf": float("inf"), "ninf": float("-inf")})
    pipe.zadd("zset:big", {rng.randbytes(10): rng.uniform(-1e9, 1e9) for _ in range(2500)})
    # keys for the key-pattern restore
    for i in range(USERS):
        pipe.set(f"user:{i}", f"profile-{i}:{rng.getrandbits(64):016x}")
    # TTLs on several types
    pipe.set("ttl:str", "soon", ex=86_400)
    pipe.hset("ttl:hash", mapping={"a": "1"})
    pipe.pexpire("ttl:hash", 7_200_000)
    pipe.rpush("ttl:list", "1", "2")
    pipe.expire("ttl:list", 90_000)
    for i in range(200):
        pipe.set(f"session:{i}", rng.randbytes(16), ex=3600 + i)
    pipe.execute()
    _load_streams(c0)

    c1 = conn.client(1, timeout=120)
    pipe = c1.pipeline(transaction=False)
    pipe.set(b"db1:\x00\xff", bytes(range(255, -1, -1)))
    pipe.rpush("db1:list", *[f"item{i}" for i in range(500)])
    pipe.hset("db1:hash", mapping={f"k{i}": i for i in range(100)})
    pipe.sadd("db1:set", *[f"m{i}" for i in range(700)])
    pipe.zadd("db1:zset", {f"m{i}": i / 7 for i in range(300)})
    pipe.set("db1:ttl", "x", px=50_000_000)
    pipe.pfadd("db1:hll", "a", "b", "c")
    pipe.execute()
    c1.xadd("db1:stream", {"only": "entry"})

    c5 = conn.client(5, timeout=120)
    pipe = c5.pipeline(transaction=False)
    for i in range(1000):
        pipe.set(f"db5:{i}".encode() + bytes([i % 256]), rng.randbytes(i % 300))
    pipe.hset("db5:hash", mapping={bytes([b]): bytes([255 - b]) for b in range(256)})
    pipe.expire("db5:hash", 500_000)
    pipe.execute()

    info = c0.info("keyspace")
    return {
        "keys": {db: int(info.get(f"db{db}", {}).get("keys", 0)) for db in GAUNTLET_DBS},
        "used_memory": int(c0.info("memory")["used_memory"]),
        "big_value_bytes": BIG_VALUE_SIZE,
        "seconds": round(time.monotonic() - started, 2),
    }


def _load_streams(redis_client: redis.Redis) -> None:
    """A stream with two consumer groups and pending entries, and an emptied stream."""
    client: Any = redis_client  # redis-py's reply types are unions
    pipe = client.pipeline(transaction=False)
    for i in range(3000):
        pipe.xadd("stream:orders", {"n": str(i), "payload": bytes([i % 256]) * (i % 40)})
    pipe.execute()
    client.xgroup_create("stream:orders", "billing", id="0")
    client.xgroup_create("stream:orders", "audit", id="$")
    client.xgroup_createconsumer("stream:orders", "audit", "idle-reader")
    first = client.xreadgroup("billing", "alice", {"stream:orders": ">"}, count=70)
    client.xreadgroup("billing", "bob", {"stream:orders": ">"}, count=40)
    ids = [entry_id for entry_id, _ in first[0][1]]
    client.xack("stream:orders", "billing", *ids[:25])  # alice keeps 45 pending
    client.xdel("stream:orders", ids[30], ids[31])  # deleted while pending
    client.xadd("stream:emptied", {"gone": "1"})
    last = client.xadd("stream:emptied", {"gone": "2"})
    client.xgroup_create("stream:emptied", "late", id=last)
    client.xtrim("stream:emptied", maxlen=0)


def _feed(h: Any, *parts: Any) -> None:
    for part in parts:
        raw = part if isinstance(part, bytes) else str(part).encode()
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)


def _sorted_pairs(items: Iterable[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    return sorted(items, key=lambda kv: kv[0] if isinstance(kv[0], bytes) else str(kv[0]))


def key_digest(client: redis.Redis, key: bytes) -> str:
    """SHA-256 of (key, type, full content, TTL presence): content, never counts."""
    c: Any = client
    kind = c.type(key)
    kind_s = kind.decode() if isinstance(kind, bytes) else str(kind)
    h = hashlib.sha256()
    _feed(h, key, kind_s, int(c.pttl(key)) >= 0)
    if kind_s == "string":
        size = int(c.strlen(key))
        _feed(h, size)
        for start in range(0, size, CHUNK):
            h.update(c.getrange(key, start, min(start + CHUNK, size) - 1))
    elif kind_s == "list":
        _feed(h, *c.lrange(key, 0, -1))
    elif kind_s == "hash":
        for field, value in _sorted_pairs(c.hgetall(key).items()):
            _feed(h, field, value)
    elif kind_s == "set":
        _feed(h, *sorted(c.smembers(key)))
    elif kind_s == "zset":
        for member, score in c.zrange(key, 0, -1, withscores=True):
            _feed(h, member, repr(float(score)))
    elif kind_s == "stream":
        _stream_digest(c, key, h)
    else:
        _feed(h, f"<unsupported type {kind_s}>")
    return h.hexdigest()


def _stream_digest(c: Any, key: bytes, h: Any) -> None:
    info = c.xinfo_stream(key)
    _feed(h, info.get("length"), info.get("last-generated-id"))
    _feed(h, info.get("max-deleted-entry-id"), info.get("entries-added"))
    start = "-"
    while True:
        page = c.xrange(key, start, "+", count=1000)
        for entry_id, fields in page:
            _feed(h, entry_id, *[x for pair in _sorted_pairs(fields.items()) for x in pair])
        if len(page) < 1000:
            break
        start = "(" + (page[-1][0].decode() if isinstance(page[-1][0], bytes) else page[-1][0])
    for group in sorted(c.xinfo_groups(key), key=lambda g: g["name"]):
        name = group["name"]
        _feed(h, name, group.get("last-delivered-id"), group.get("pending"))
        _feed(h, group.get("entries-read"), group.get("consumers"))
        for consumer in sorted(c.xinfo_consumers(key, name), key=lambda x: x["name"]):
            _feed(h, consumer["name"], consumer["pending"])
        pending = c.xpending_range(key, name, min="-", max="+", count=1_000_000)
        for p in pending:
            _feed(h, p["message_id"], p["consumer"], p["times_delivered"])


def fingerprint(
    conn: RedisConnection, dbs: Iterable[int] = GAUNTLET_DBS, pattern: str | None = None
) -> Fingerprint:
    """Per database, every (matching) key's digest; empty databases map to {}."""
    out: Fingerprint = {}
    for db in dbs:
        client = conn.client(db, timeout=120)
        keys = {k for k in client.scan_iter(match=pattern, count=1000)}
        out[db] = {k: key_digest(client, k) for k in sorted(keys)}
    return out


def combined(fp: Fingerprint) -> dict[int, str]:
    """One order-independent hash per database (for reports and the demo)."""
    out = {}
    for db, keys in fp.items():
        h = hashlib.sha256()
        for key, digest in sorted(keys.items()):
            _feed(h, key, digest)
        out[db] = h.hexdigest()
    return out
