"""Row counts read from a pg_dump archive as it streams past, instead of ``count(*)``.

Counting every table with ``count(*)`` reads the whole database a second time while
the dump runs. The archive already holds the answer: each table's data is its
``COPY ... TO stdout`` text, one line per row (newlines inside values are escaped as
``\\n``), closed by ``\\.`` and two blank lines. So the rows of a table are the
newlines in its data block minus three, and the counts describe exactly the bytes
that were stored.

``ArchiveRowCounter`` parses the archive header and table of contents of the custom
format (``pg_dump -Fc``, archive versions 1.12 to 1.15, uncompressed ``-Z0``) and the
length-prefixed data blocks that follow, fed in chunks of any size. The directory
format's ``toc.dat`` goes through the same parser; its ``<dumpId>.dat`` members are
counted by ``LineCounter``. Anything unexpected raises ``DumpFormatError`` so the
caller can fall back to ``count(*)`` in the dump's snapshot.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

MAGIC = b"PGDMP"
FORMAT_CUSTOM = 1
FORMAT_NAMED_MEMBERS = (3, 5)  # tar and directory: data in named member files
BLK_DATA = 1
BLK_BLOBS = 3
COPY_END = b"\\.\n\n\n"  # what pg_dump writes after the last row of a table
LARGE_OBJECT = -1  # pseudo dump id: large object bytes are passed over, not counted as rows


class DumpFormatError(Exception):
    """The archive is not what this parser understands (version, compression, layout)."""


@dataclass(frozen=True)
class TocEntry:
    dump_id: int
    desc: str
    namespace: str | None
    tag: str
    filename: str | None = None  # directory format: the member holding the data
    deps: tuple[int, ...] = ()


@dataclass
class LineCounter:
    """Newlines and the last bytes of one table's COPY data."""

    lines: int = 0
    tail: bytes = b""

    def feed(self, data: bytes | bytearray, start: int = 0, end: int | None = None) -> None:
        stop = len(data) if end is None else end
        self.lines += data.count(b"\n", start, stop)
        self.tail = (self.tail + bytes(data[max(start, stop - len(COPY_END)) : stop]))[
            -len(COPY_END) :
        ]

    def rows(self, what: str) -> int:
        if self.tail != COPY_END or self.lines < 3:
            raise DumpFormatError(f"data of {what} does not end with the COPY terminator")
        return self.lines - 3


# Requests the parser generator makes: read n bytes, count n bytes of table data, or
# read one block-type byte where the end of the archive is allowed.
@dataclass(frozen=True)
class _Read:
    n: int


@dataclass(frozen=True)
class _Count:
    n: int
    dump_id: int


@dataclass(frozen=True)
class _BlockStart:
    pass


_Request = _Read | _Count | _BlockStart


def _key(entry: TocEntry) -> tuple[str, str]:
    return (entry.namespace or "", entry.tag)


class ArchiveRowCounter:
    """Feed it the archive's bytes in order; ``table_rows`` then gives rows per table."""

    def __init__(self) -> None:
        self.entries: list[TocEntry] = []
        self.version = (0, 0, 0)
        self.server_version = ""
        self.format = 0
        self._int_size = 4
        self._blocks: dict[int, LineCounter] = {}
        self._pending = bytearray()
        self._request: _Request | None = None
        self._count_left = 0
        self._counting: LineCounter | None = None
        self._error: DumpFormatError | None = None
        self._parser = self._parse()
        self._request = next(self._parser)

    # -- feeding -----------------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Consume the next bytes of the archive; never raises (errors surface later)."""
        if self._error is not None:
            return
        chunk = bytes(data) if isinstance(data, memoryview) else data
        try:
            self._consume(chunk)
        except DumpFormatError as exc:
            self._error = exc
        except (StopIteration, UnicodeDecodeError, ValueError) as exc:
            self._error = DumpFormatError(f"unreadable archive: {exc!r}")

    def _consume(self, chunk: bytes | bytearray) -> None:
        pos, end = 0, len(chunk)
        while pos < end:
            if self._count_left:
                take = min(self._count_left, end - pos)
                assert self._counting is not None
                self._counting.feed(chunk, pos, pos + take)
                pos += take
                self._count_left -= take
                if not self._count_left:
                    self._answer(b"")
                continue
            request = self._request
            if request is None:
                raise DumpFormatError("bytes after the end of the archive")
            want = 1 if isinstance(request, _BlockStart) else request.n
            take = min(want - len(self._pending), end - pos)
            self._pending += chunk[pos : pos + take]
            pos += take
            if len(self._pending) == want:
                data = bytes(self._pending)
                self._pending.clear()
                self._answer(data)

    def _answer(self, data: bytes) -> None:
        try:
            request = self._parser.send(data)
        except StopIteration:
            self._request = None
            return
        self._request = request
        while isinstance(request, _Count):
            if request.n:
                self._count_left = request.n
                self._counting = self._blocks.setdefault(request.dump_id, LineCounter())
                return
            request = self._parser.send(b"")
            self._request = request

    # -- results -----------------------------------------------------------------------

    def finish(self) -> None:
        """Check the archive ended at a block boundary; raises ``DumpFormatError``."""
        if self._error is not None:
            raise self._error
        if self._pending or self._count_left or not isinstance(self._request, _BlockStart):
            raise DumpFormatError("the archive ends in the middle of a record")

    def table_rows(
        self, members: dict[str, LineCounter] | None = None
    ) -> dict[tuple[str, str], int]:
        """Rows per top-level (schema, table): partitions add up into their root table.

        Every table of the archive is listed, with 0 rows when it has no data.
        ``members`` are the directory format's data files by name; the custom
        format's data blocks were counted while they streamed past.
        """
        self.finish()
        tables = {e.dump_id: e for e in self.entries if e.desc == "TABLE"}
        parent: dict[int, int] = {}
        for entry in self.entries:
            if entry.desc == "TABLE ATTACH":
                ids = [d for d in entry.deps if d in tables]
                child = [d for d in ids if _key(tables[d]) == _key(entry)]
                others = [d for d in ids if d not in child]
                if len(child) != 1 or len(others) != 1:
                    raise DumpFormatError(f"partition {_key(entry)} without its parent")
                parent[child[0]] = others[0]

        def root(dump_id: int) -> tuple[str, str]:
            seen: set[int] = set()
            while dump_id in parent and dump_id not in seen:
                seen.add(dump_id)
                dump_id = parent[dump_id]
            return _key(tables[dump_id])

        rows = {_key(t): 0 for i, t in tables.items() if i not in parent}
        for entry in self.entries:
            if entry.desc != "TABLE DATA":
                continue
            what = f"table {entry.namespace}.{entry.tag} (dump id {entry.dump_id})"
            if members is not None:
                counter = members.get(entry.filename or "")
            else:
                counter = self._blocks.get(entry.dump_id)
            if counter is None:
                raise DumpFormatError(f"no data for {what} in the archive")
            owner = next((d for d in entry.deps if d in tables), None)
            key = root(owner) if owner is not None else _key(entry)
            rows[key] = rows.get(key, 0) + counter.rows(what)
        return rows

    # -- the archive format ------------------------------------------------------------

    def _int(self) -> Generator[_Request, bytes, int]:
        raw = yield _Read(1 + self._int_size)
        value = int.from_bytes(raw[1:], "little")
        return -value if raw[0] else value

    def _str(self) -> Generator[_Request, bytes, str | None]:
        length = yield from self._int()
        if length <= 0:
            return None if length < 0 else ""
        raw = yield _Read(length)
        return raw.decode("utf-8")

    def _parse(self) -> Generator[_Request, bytes, None]:
        head = yield _Read(11)
        if head[:5] != MAGIC:
            raise DumpFormatError("not a pg_dump archive (no PGDMP magic)")
        self.version = (head[5], head[6], head[7])
        self._int_size, off_size, self.format = head[8], head[9], head[10]
        if self.version[0] != 1 or not 12 <= self.version[1] <= 15:
            raise DumpFormatError(f"archive version {self.version} is not supported")
        if (
            self.format not in (FORMAT_CUSTOM, *FORMAT_NAMED_MEMBERS)
            or not 1 <= self._int_size <= 8
        ):
            raise DumpFormatError(f"archive format {self.format} is not supported")
        if self.version[1] >= 15:
            compressed = (yield _Read(1)) != b"\x00"  # compression algorithm
        else:
            compressed = (yield from self._int()) != 0  # compression level
        if compressed:
            raise DumpFormatError("compressed archive (strongroom dumps with -Z0)")
        for _ in range(7):  # creation time: sec, min, hour, mday, mon, year, isdst
            yield from self._int()
        yield from self._str()  # database name
        self.server_version = (yield from self._str()) or ""
        yield from self._str()  # pg_dump version

        count = yield from self._int()
        for _ in range(count):
            dump_id = yield from self._int()
            yield from self._int()  # had a data dumper
            yield from self._str()  # catalog table oid
            yield from self._str()  # oid
            tag = (yield from self._str()) or ""
            desc = (yield from self._str()) or ""
            yield from self._int()  # section
            for _ in range(3):  # defn, dropStmt, copyStmt
                yield from self._str()
            namespace = yield from self._str()
            yield from self._str()  # tablespace
            if self.version[1] >= 14:
                yield from self._str()  # table access method
            yield from self._str()  # owner
            yield from self._str()  # "false" (with oids)
            deps: list[int] = []
            while (dep := (yield from self._str())) is not None:  # dependencies
                deps.append(int(dep))
            filename = None
            if self.format == FORMAT_CUSTOM:
                yield _Read(1 + off_size)  # data offset (unset when written to a pipe)
            else:
                filename = yield from self._str()
            self.entries.append(TocEntry(dump_id, desc, namespace, tag, filename, tuple(deps)))

        while True:
            block = yield _BlockStart()
            dump_id = yield from self._int()
            if block[0] == BLK_DATA:
                yield from self._chunks(dump_id)
            elif block[0] == BLK_BLOBS:
                while (yield from self._int()) != 0:  # large object oid, 0 ends the list
                    yield from self._chunks(LARGE_OBJECT)
            else:
                raise DumpFormatError(f"unknown data block type {block[0]}")

    def _chunks(self, dump_id: int) -> Generator[_Request, bytes, None]:
        while True:
            length = yield from self._int()
            if length == 0:
                return
            if length < 0:
                raise DumpFormatError("negative data chunk length")
            yield _Count(length, dump_id)
