"""Hostile replication replies and RDB bytes end in strongroom errors, never raw exceptions.

A peer that speaks the replication protocol badly (a small TCP listener here, scripted
reply by reply) must make ``ReplicationSnapshot`` raise ToolFailed with the reply named;
random and truncated RDB bytes must make ``RdbTracker`` raise IntegrityError or pass.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strongroom.engines.redis.conn import RedisConnection
from strongroom.engines.redis.rdb import RdbTracker, crc64
from strongroom.engines.redis.sync import ReplicationSnapshot, bulk_length
from strongroom.errors import IntegrityError, StrongroomError, ToolFailed


def _peer(replies: list[bytes]) -> Iterator[int]:
    """Accept one connection; answer each received command with the next scripted reply."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            for reply in replies:
                if not conn.recv(65536):
                    return
                conn.sendall(reply)
            conn.recv(65536)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    listener.close()
    thread.join(timeout=5)


HANDSHAKE = [b"+OK\r\n", b"+OK\r\n"]  # REPLCONF capa, REPLCONF rdb-only


@pytest.mark.parametrize(
    ("replies", "message"),
    [
        ([b"$abc\r\n"], "malformed bulk length"),
        ([b"$-5\r\n"], "malformed bulk length"),
        ([b"$99999999999999999999999\r\n"], "malformed bulk length"),
        ([b"$999999999\r\n"], "exceeds the limit"),
        ([b"$0\r\n\r\n", b"+FULLRESYNC abc notanumber\r\n"], "malformed FULLRESYNC"),
        ([b"$0\r\n\r\n", b"+FULLRESYNC abc 0\r\n$12x\r\n"], "malformed bulk length"),
        ([b"$0\r\n\r\n", b"+FULLRESYNC abc 0\r\n$-1\r\n"], "malformed bulk length"),
        ([b"$0\r\n\r\n", b"+FULLRESYNC abc 0\r\n$EOF:short\r\n"], "malformed EOF marker"),
        ([b"$0\r\n\r\n", b"+FULLRESYNC abc 0\r\n*3\r\n"], "unexpected reply"),
    ],
)
def test_malformed_replication_replies_are_tool_failed(replies: list[bytes], message: str) -> None:
    port_iter = _peer(HANDSHAKE + replies)
    port = next(port_iter)
    try:
        snapshot = ReplicationSnapshot(RedisConnection(name="hostile", port=port), timeout=5)
        with pytest.raises(ToolFailed, match=message):
            snapshot.open()
        snapshot.close()
    finally:
        next(port_iter, None)


@pytest.mark.parametrize("line", ["$", "$ 1", "$1.5", "$+3", "$١٢", "$0x10", "$-0"])
def test_bulk_length_accepts_only_plain_digits(line: str) -> None:
    with pytest.raises(ToolFailed):
        bulk_length(line, "test", 100)
    assert bulk_length("$100", "test", 100) == 100 and bulk_length("$0", "t", 0) == 0


def _valid_rdb(body: bytes) -> bytes:
    data = b"REDIS0010" + body + b"\xff"
    return data + crc64(data).to_bytes(8, "little")


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=64))
def test_rdb_tracker_on_garbage_raises_only_integrity_errors(data: bytes, chunk: int) -> None:
    for candidate in (data, b"REDIS0010" + data, _valid_rdb(data)[: len(data) // 2 + 9]):
        tracker = RdbTracker()
        try:
            for i in range(0, len(candidate), chunk):
                tracker.update(candidate[i : i + chunk])
            tracker.finish()
        except IntegrityError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.integers(min_value=1, max_value=32), st.data())
def test_rdb_tracker_accepts_valid_and_refuses_any_cut_or_flip(
    body: bytes, chunk: int, data: st.DataObject
) -> None:
    rdb = _valid_rdb(body)
    tracker = RdbTracker()
    for i in range(0, len(rdb), chunk):
        tracker.update(rdb[i : i + chunk])
    assert tracker.finish()["version"] == 10
    cut = data.draw(st.integers(min_value=0, max_value=len(rdb) - 1))
    # a flip in the version digits can make a pre-CRC version (< 5): RdbCheck compares the
    # version with the manifest's for that; everywhere else the CRC or the magic catches it
    flip = data.draw(
        st.integers(min_value=0, max_value=len(rdb) - 1).filter(lambda p: p > 8 or p < 5)
    )
    damaged = bytearray(rdb)
    damaged[flip] ^= 0x01
    for bad in (rdb[:cut], bytes(damaged)):
        tracker = RdbTracker()
        with pytest.raises(StrongroomError):
            tracker.update(bad)
            tracker.finish()
