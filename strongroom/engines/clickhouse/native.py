"""A reader for ClickHouse's ``Native`` format, enough to walk a stream block by block
without a server: it checks column names and types and counts rows exactly.

Block layout (HTTP, no block info): varint column count, varint row count, then per
column its name, its type and the column data. Data sizes follow from the type;
a type this reader does not know stops the walk (reported, not failed), because
the length of its data cannot be known.
"""

from __future__ import annotations

import queue
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from strongroom.engines.clickhouse.sql import TypeNode, parse_type
from strongroom.errors import IntegrityError, InvalidInput

_FIXED = {
    "UInt8": 1, "Int8": 1, "Enum8": 1, "Bool": 1,
    "UInt16": 2, "Int16": 2, "Enum16": 2, "Date": 2,
    "UInt32": 4, "Int32": 4, "Float32": 4, "DateTime": 4, "Decimal32": 4, "IPv4": 4, "Date32": 4,
    "UInt64": 8, "Int64": 8, "Float64": 8, "Decimal64": 8, "DateTime64": 8,
    "UInt128": 16, "Int128": 16, "Decimal128": 16, "UUID": 16, "IPv6": 16,
    "UInt256": 32, "Int256": 32, "Decimal256": 32,
}  # fmt: skip
MAX_NAME = 1 << 20


class Unsupported(Exception):
    """A column type whose data length this reader cannot determine."""


class _EndOfStream(Exception):
    pass


class _Feed:
    """Bytes pushed by one thread (``put``), pulled by the reader thread."""

    def __init__(self) -> None:
        self.q: queue.Queue[bytes | None] = queue.Queue(maxsize=8)
        self.buf = b""
        self.pos = 0
        self.eof = False
        self.offset = 0  # bytes consumed before ``buf``

    def _more(self) -> bool:
        if self.eof:
            return False
        chunk = self.q.get()
        if chunk is None:
            self.eof = True
            return False
        self.offset += self.pos
        self.buf = self.buf[self.pos :] + chunk
        self.pos = 0
        return True

    def at_end(self) -> bool:
        while self.pos >= len(self.buf):
            if not self._more():
                return True
        return False

    def take(self, n: int) -> bytes:
        while len(self.buf) - self.pos < n:
            if not self._more():
                raise _EndOfStream
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def skip(self, n: int) -> None:
        while n > 0:
            avail = len(self.buf) - self.pos
            if avail >= n:
                self.pos += n
                return
            n -= avail
            self.pos = len(self.buf)
            if not self._more():
                raise _EndOfStream

    def varint(self) -> int:
        shift = result = 0
        while True:
            if self.pos >= len(self.buf) and not self._more():
                raise _EndOfStream
            b = self.buf[self.pos]
            self.pos += 1
            result |= (b & 0x7F) << shift
            if b < 0x80:
                return result
            shift += 7
            if shift > 63:
                raise IntegrityError("Native stream: malformed varint")

    def strings(self, count: int) -> None:
        """Skip ``count`` length-prefixed strings (the hot loop of the walk)."""
        for _ in range(count):
            if self.pos < len(self.buf) and self.buf[self.pos] < 0x80:
                length = self.buf[self.pos]
                self.pos += 1
            else:
                length = self.varint()
            if self.pos + length <= len(self.buf):
                self.pos += length
            else:
                self.skip(length)

    def drain(self) -> None:
        while not self.eof:
            self._more()


def _decimal_size(node: TypeNode) -> int:
    try:
        precision = int(str(node.args[0]))
    except (IndexError, ValueError):
        raise Unsupported(str(node)) from None
    return 4 if precision <= 9 else 8 if precision <= 18 else 16 if precision <= 38 else 32


_LC_GLOBAL_DICTIONARY = 0x100
_LC_ADDITIONAL_KEYS = 0x200
_NAMED_ELEMENT = re.compile(r"(`(?:[^`\\]|\\.)*`|[A-Za-z_][A-Za-z0-9_]*)\s+(\S.*)", re.S)
_BASIC_DISCRIMINATORS = 0
_NULL_DISCRIMINATOR = 255
_DISCRIMINATOR_SLICE = 1 << 20
_SHARED_VARIANT = "SharedVariant"
_DYNAMIC_VERSIONS = (1, 2)  # 1: with max_dynamic_types, 2: without
_OBJECT_V1 = 0
_STRING = TypeNode("String")
_SHARED_DATA = TypeNode("Array", (TypeNode("Tuple", (_STRING, _STRING)),))

# A column is read in two steps, as ClickHouse writes it: the prefix of every nested
# serialization (LowCardinality's version, Variant's discriminator mode, Dynamic's and
# JSON's structure) comes first, before any data; ``_reader`` reads those prefixes and
# returns the function that skips the data of ``rows`` rows.
Skip = Callable[[int], None]


def _u64(feed: _Feed) -> int:
    return int.from_bytes(feed.take(8), "little")


def _read_string(feed: _Feed) -> str:
    length = feed.varint()
    if length > MAX_NAME:
        raise IntegrityError("Native stream: implausible name length")
    return feed.take(length).decode("utf-8", "surrogateescape")


def _one_type(node: TypeNode) -> TypeNode | None:
    """The single type argument of ``Nullable(T)``, ``Array(T)``, ``LowCardinality(T)``;
    None when the stream's type name has none, several or a non-type one (hostile)."""
    if len(node.args) == 1 and isinstance(node.args[0], TypeNode):
        return node.args[0]
    return None


def _fixed_string_size(node: TypeNode) -> int:
    try:
        size = int(str(node.args[0])) if len(node.args) == 1 else -1
    except ValueError:
        size = -1
    if size < 1:
        raise Unsupported(str(node))
    return size


def _element(arg: TypeNode | str) -> TypeNode:
    """A Tuple element's type: ``T`` or, in a named tuple, ``name T``."""
    if isinstance(arg, TypeNode):
        return arg
    found = _NAMED_ELEMENT.fullmatch(arg.strip())
    if found is None:
        raise Unsupported(f"Tuple element {arg[:40]!r}")
    try:
        return parse_type(found.group(2))
    except InvalidInput:
        raise Unsupported(f"Tuple element {arg[:40]!r}") from None


def _low_cardinality(feed: _Feed, inner: TypeNode) -> Skip:
    """Prefix: UInt64 version. Data, in granules: UInt64 flags (index width in the low
    byte), optional dictionary keys (UInt64 count + keys of the non-Nullable type),
    UInt64 rows, indexes."""
    if inner.name == "Nullable" and inner.args and isinstance(inner.args[0], TypeNode):
        inner = inner.args[0]
    if _u64(feed) != 1:
        raise Unsupported("LowCardinality (unknown serialization version)")
    keys = _reader(feed, inner)

    def skip(rows: int) -> None:
        done = 0
        while done < rows:
            flags = _u64(feed)
            width = flags & 0xFF
            if flags & _LC_GLOBAL_DICTIONARY or width > 3:
                raise Unsupported("LowCardinality (shared dictionary)")
            if flags & _LC_ADDITIONAL_KEYS:
                keys(_u64(feed))
            count = _u64(feed)
            if count == 0 or done + count > rows:
                raise IntegrityError("Native stream: malformed LowCardinality column")
            feed.skip(count << width)
            done += count

    return skip


def _variant(feed: _Feed, variants: list[TypeNode]) -> Skip:
    """Prefix: UInt64 discriminator mode (0: one byte a row), then every variant's prefix.
    Data: the discriminators (255: NULL), then every variant's column holding just its
    rows, in type order."""
    if _u64(feed) != _BASIC_DISCRIMINATORS:
        raise Unsupported("Variant (compact discriminators)")
    skips = [_reader(feed, v) for v in variants]

    def skip(rows: int) -> None:
        counts = [0] * len(skips)
        nulls = 0
        left = rows
        while left:  # in slices: memory stays bounded whatever the block claims
            discriminators = feed.take(min(left, _DISCRIMINATOR_SLICE))
            left -= len(discriminators)
            nulls += discriminators.count(_NULL_DISCRIMINATOR)
            for index in range(len(skips)):
                counts[index] += discriminators.count(index)
        if nulls + sum(counts) != rows:
            raise IntegrityError("Native stream: Variant discriminator out of range")
        for one, count in zip(skips, counts, strict=True):
            if count:
                one(count)

    return skip


def _dynamic(feed: _Feed) -> Skip:
    """Prefix: UInt64 version, [varint max types], varint count, type names, then the
    prefix of a Variant of those types and SharedVariant (values of other types, as
    strings), sorted by name."""
    version = _u64(feed)
    if version not in _DYNAMIC_VERSIONS:
        raise Unsupported(f"Dynamic (serialization version {version})")
    if version == 1:
        feed.varint()
    names = [_read_string(feed) for _ in range(feed.varint())]
    variants: list[TypeNode] = []
    for type_name in sorted([*names, _SHARED_VARIANT]):
        try:
            variants.append(_STRING if type_name == _SHARED_VARIANT else parse_type(type_name))
        except InvalidInput:
            raise IntegrityError(
                f"Native stream: unreadable Dynamic type {type_name[:60]!r}"
            ) from None
    return _variant(feed, variants)


def _typed_path(arg: TypeNode | str) -> bool:
    """A JSON type argument other than a setting (``max_dynamic_paths=N``) or ``SKIP``."""
    text = arg if isinstance(arg, str) else str(arg)
    return "=" not in text and not text.strip().upper().startswith("SKIP")


def _json(feed: _Feed, node: TypeNode) -> Skip:
    """JSON without typed paths. Prefix: UInt64 version (0), varint max paths, varint
    count, path names, every path's Dynamic prefix. Data: every path's Dynamic data, then
    the shared data (the other paths), an Array(Tuple(String, String))."""
    if any(_typed_path(a) for a in node.args):
        raise Unsupported(f"{str(node)[:60]} (typed paths)")
    version = _u64(feed)
    if version != _OBJECT_V1:
        raise Unsupported(f"JSON (serialization version {version})")
    feed.varint()
    paths = [_read_string(feed) for _ in range(feed.varint())]
    skips = [_dynamic(feed) for _ in paths]
    shared = _reader(feed, _SHARED_DATA)

    def skip(rows: int) -> None:
        for one in skips:
            one(rows)
        shared(rows)

    return skip


def _array(feed: _Feed, inner: TypeNode) -> Skip:
    elements = _reader(feed, inner)

    def skip(rows: int) -> None:
        last = 0
        if rows:
            feed.skip(8 * (rows - 1))
            last = int.from_bytes(feed.take(8), "little")
        elements(last)

    return skip


def _tuple(feed: _Feed, elements: list[TypeNode]) -> Skip:
    skips = [_reader(feed, e) for e in elements]

    def skip(rows: int) -> None:
        for one in skips:
            one(rows)

    return skip


def _nullable(feed: _Feed, inner: TypeNode) -> Skip:
    values = _reader(feed, inner)

    def skip(rows: int) -> None:
        feed.skip(rows)
        values(rows)

    return skip


def _fixed(feed: _Feed, size: int) -> Skip:
    return lambda rows: feed.skip(size * rows)


def _reader(feed: _Feed, node: TypeNode) -> Skip:
    """Read the prefixes of a column of type ``node``; returns its data skipper."""
    name = node.name
    inner = _one_type(node)
    if name in _FIXED:
        return _fixed(feed, _FIXED[name])
    if name == "Decimal":
        return _fixed(feed, _decimal_size(node))
    if name == "FixedString":
        return _fixed(feed, _fixed_string_size(node))
    if name == "Nothing":
        return _fixed(feed, 1)
    if name == "String":
        return feed.strings
    if name == "Nullable" and inner is not None:
        return _nullable(feed, inner)
    if name == "Array" and inner is not None:
        return _array(feed, inner)
    if name == "LowCardinality" and inner is not None:
        return _low_cardinality(feed, inner)
    if name == "Tuple" and node.args:
        return _tuple(feed, [_element(a) for a in node.args])
    if name == "Map" and len(node.args) == 2:  # stored as Array(Tuple(K, V))
        return _array(feed, TypeNode("Tuple", node.args))
    if name == "SimpleAggregateFunction" and node.args and isinstance(node.args[-1], TypeNode):
        return _reader(feed, node.args[-1])  # stored like its value type
    if name == "Variant" and node.args and all(isinstance(a, TypeNode) for a in node.args):
        return _variant(feed, [a for a in node.args if isinstance(a, TypeNode)])
    if name == "Dynamic":
        return _dynamic(feed)
    if name == "JSON":
        return _json(feed, node)
    raise Unsupported(str(node))


def _skip_column(feed: _Feed, node: TypeNode, rows: int) -> None:
    _reader(feed, node)(rows)


@dataclass
class NativeSummary:
    blocks: int = 0
    rows: int = 0
    columns: list[tuple[str, str]] = field(default_factory=list)
    complete: bool = True  # False: stopped at a type it cannot walk
    stopped_at: str = ""


def walk(feed: _Feed) -> NativeSummary:
    summary = NativeSummary()
    types: dict[str, TypeNode] = {}
    while not feed.at_end():
        start = feed.offset + feed.pos
        try:
            ncols = feed.varint()
            nrows = feed.varint()
            header: list[tuple[str, str]] = []
            for _ in range(ncols):
                nlen = feed.varint()
                if nlen > MAX_NAME:
                    raise IntegrityError(f"Native stream: implausible block at byte {start}")
                cname = feed.take(nlen).decode("utf-8", "surrogateescape")
                tlen = feed.varint()
                if tlen > MAX_NAME:
                    raise IntegrityError(f"Native stream: implausible block at byte {start}")
                ctype = feed.take(tlen).decode("utf-8", "surrogateescape")
                header.append((cname, ctype))
                if ctype not in types:
                    try:
                        types[ctype] = parse_type(ctype)
                    except InvalidInput:
                        raise IntegrityError(
                            f"Native stream: unreadable type {ctype[:60]!r} at byte {start}"
                        ) from None
                _skip_column(feed, types[ctype], nrows)
        except _EndOfStream:
            raise IntegrityError(f"Native stream: block at byte {start} is cut short") from None
        except Unsupported as exc:
            summary.complete = False
            summary.stopped_at = str(exc)
            summary.columns = summary.columns or header
            feed.drain()
            return summary
        if summary.columns and header != summary.columns:
            raise IntegrityError(
                f"Native stream: block at byte {start} has columns {header[:4]}..., "
                f"the first block had {summary.columns[:4]}..."
            )
        summary.columns = header
        summary.blocks += 1
        summary.rows += nrows
    return summary


class NativeWalker:
    """Push bytes with ``write``; ``finish`` returns the summary or raises IntegrityError."""

    def __init__(self) -> None:
        self._feed = _Feed()
        self._result: NativeSummary | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = walk(self._feed)
        except BaseException as exc:
            self._error = exc
            self._feed.drain()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if data:
            self._feed.q.put(bytes(data))
        return len(data)

    def finish(self) -> NativeSummary:
        self._feed.q.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def close(self) -> None:
        if self._thread.is_alive():
            self._feed.q.put(None)
            self._thread.join(timeout=30)


def iter_chunks(data: bytes, size: int = 1 << 16) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def summarize(data: bytes) -> dict[str, Any]:
    """Walk an in-memory Native payload (tests and small artifacts)."""
    walker = NativeWalker()
    for chunk in iter_chunks(data):
        walker.write(chunk)
    result = walker.finish()
    return {"blocks": result.blocks, "rows": result.rows, "complete": result.complete}
