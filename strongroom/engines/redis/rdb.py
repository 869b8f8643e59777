"""RDB files: header and AUX fields, the trailing CRC64, and which Redis loads which version.

An RDB starts with ``REDIS`` and a 4-digit format version, then AUX fields
(``redis-ver``, ``ctime``, ``used-mem``, ...), and ends with the EOF opcode
``0xFF`` and a CRC64 (Jones polynomial, reflected; "CRC-64/REDIS") of every
byte before it, little-endian. A CRC of zero means the server had
``rdbchecksum no``. ``RdbTracker`` follows a stream chunk by chunk with
constant memory; ``RdbCheck`` is the verify-time structure check.
"""

from __future__ import annotations

import re
import struct
from typing import Any

import anycrc

from strongroom.catalog import Artifact, Manifest
from strongroom.errors import IntegrityError

MAGIC = b"REDIS"
HEADER_SIZE = 9
HEAD_KEEP = 64 * 1024
CONTENT_RDB = "redis-rdb"
_TAIL = 9  # EOF opcode + CRC64

# (first Redis release writing it, RDB version); each release loads versions <= its own.
RDB_RELEASES: tuple[tuple[tuple[int, int], int], ...] = (
    ((2, 6), 6),
    ((3, 2), 7),
    ((4, 0), 8),
    ((5, 0), 9),
    ((7, 0), 10),
    ((7, 2), 11),
    ((7, 4), 12),
)

_CRC = anycrc.Model("CRC64-REDIS")


def crc64(data: bytes | bytearray | memoryview, value: int | None = None) -> int:
    """CRC-64/REDIS of ``data``, continuing from ``value``."""
    return int(_CRC.calc(data) if value is None else _CRC.calc(data, value))


def parse_version(text: str) -> tuple[int, int, int]:
    """``7.0.15`` -> (7, 0, 15); unparsable parts count as 0."""
    nums = [int(n) for n in re.findall(r"\d+", text)[:3]]
    while len(nums) < 3:
        nums.append(0)
    return nums[0], nums[1], nums[2]


def max_rdb_version(redis_version: str) -> int:
    """The newest RDB format a Redis of ``redis_version`` can load."""
    major, minor, _ = parse_version(redis_version)
    best = 5
    for (rmaj, rmin), rdb in RDB_RELEASES:
        if (major, minor) >= (rmaj, rmin):
            best = rdb
    return best


def first_release(rdb_version: int) -> str:
    """A human hint: the first Redis release that writes ``rdb_version``."""
    for (rmaj, rmin), rdb in RDB_RELEASES:
        if rdb == rdb_version:
            return f"Redis {rmaj}.{rmin}"
    if rdb_version > RDB_RELEASES[-1][1]:
        return f"a Redis newer than {RDB_RELEASES[-1][0][0]}.{RDB_RELEASES[-1][0][1]}"
    return "an old Redis"


def parse_header(head: bytes) -> tuple[int, dict[str, str]]:
    """RDB version and AUX fields from the first bytes of a file."""
    if len(head) < HEADER_SIZE or not head.startswith(MAGIC) or not head[5:9].isdigit():
        raise IntegrityError(f"not an RDB file (starts with {bytes(head[:9])!r})")
    version = int(head[5:9])
    aux: dict[str, str] = {}
    pos = HEADER_SIZE
    try:
        while pos < len(head) and head[pos] == 0xFA:
            key, pos = _read_string(head, pos + 1)
            value, pos = _read_string(head, pos)
            aux[key] = value
    except (IndexError, struct.error, ValueError):
        pass  # the AUX section continued past what we kept: report what we have
    return version, aux


def _read_string(buf: bytes, pos: int) -> tuple[str, int]:
    first = buf[pos]
    kind = first >> 6
    if kind == 0:
        length, pos = first & 0x3F, pos + 1
    elif kind == 1:
        length, pos = ((first & 0x3F) << 8) | buf[pos + 1], pos + 2
    elif first == 0x80:
        length, pos = struct.unpack_from(">I", buf, pos + 1)[0], pos + 5
    elif first == 0x81:
        length, pos = struct.unpack_from(">Q", buf, pos + 1)[0], pos + 9
    elif first == 0xC0:
        return str(struct.unpack_from("<b", buf, pos + 1)[0]), pos + 2
    elif first == 0xC1:
        return str(struct.unpack_from("<h", buf, pos + 1)[0]), pos + 3
    elif first == 0xC2:
        return str(struct.unpack_from("<i", buf, pos + 1)[0]), pos + 5
    else:
        raise ValueError("compressed or unknown string encoding in AUX")
    if pos + length > len(buf):
        raise IndexError("string runs past the kept header")
    return bytes(buf[pos : pos + length]).decode("utf-8", "replace"), pos + length


class RdbTracker:
    """Follows an RDB stream: keeps its head, size and CRC64 of all but the last 8 bytes."""

    def __init__(self) -> None:
        self.head = bytearray()
        self.size = 0
        self._crc: int | None = None
        self._tail = b""

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        n = view.nbytes
        if not n:
            return
        self.size += n
        if len(self.head) < HEAD_KEEP:
            self.head += view[: HEAD_KEEP - len(self.head)]
            if len(self.head) >= HEADER_SIZE and not self.head.startswith(MAGIC):
                raise IntegrityError(f"not an RDB stream (starts with {bytes(self.head[:9])!r})")
        if n >= _TAIL:
            if self._tail:
                self._crc = crc64(self._tail, self._crc)
            self._crc = crc64(view[:-_TAIL], self._crc)
            self._tail = bytes(view[-_TAIL:])
        else:
            joined = self._tail + bytes(view)
            if len(joined) > _TAIL:
                self._crc = crc64(joined[:-_TAIL], self._crc)
            self._tail = joined[-_TAIL:]

    @property
    def version(self) -> int | None:
        if len(self.head) >= HEADER_SIZE and self.head[5:9].isdigit():
            return int(self.head[5:9])
        return None

    def finish(self) -> dict[str, Any]:
        """Check the end of the stream; returns version, AUX fields and checksum."""
        if self.size < HEADER_SIZE + 9:
            raise IntegrityError(f"RDB stream too short ({self.size} bytes)")
        version, aux = parse_header(bytes(self.head))
        if self._tail[0] != 0xFF:
            raise IntegrityError("RDB does not end with the EOF opcode (truncated?)")
        computed = crc64(self._tail[:1], self._crc)
        stored = int.from_bytes(self._tail[1:], "little")
        facts: dict[str, Any] = {"version": version, "size": self.size, "aux": aux}
        if version >= 5:
            if stored == 0:
                facts["crc64"] = "disabled (rdbchecksum no)"
            else:
                if computed != stored:
                    raise IntegrityError(
                        f"RDB CRC64 mismatch: file says {stored:016x}, "
                        f"content gives {computed:016x} (truncated or corrupt)"
                    )
                facts["crc64"] = f"{stored:016x}"
        return facts


class RdbCheck:
    """Verify-time check: RDB magic, version (matching the manifest) and trailing CRC64."""

    def __init__(self, manifest: Manifest, artifact: Artifact) -> None:
        self._tracker = RdbTracker()
        self._expected = (manifest.details.get("rdb") or {}).get("version")
        self._error: IntegrityError | None = None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._error is None:
            try:
                self._tracker.update(data)
            except IntegrityError as exc:
                self._error = exc
        return len(data)

    def finish(self) -> dict[str, Any]:
        if self._error is not None:
            raise self._error
        facts = self._tracker.finish()
        if self._expected is not None and facts["version"] != self._expected:
            raise IntegrityError(
                f"RDB version {facts['version']} differs from the manifest ({self._expected})"
            )
        return {
            "rdb_version": facts["version"],
            "crc64": facts["crc64"],
            "redis_ver": facts["aux"].get("redis-ver"),
        }
