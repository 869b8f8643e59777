"""PostgreSQL WAL file names, LSNs, timeline history files and segment headers.

Standard library only: ``strongroom-wal`` (archive_command / restore_command)
imports this on every call.

A segment name is ``TTTTTTTTXXXXXXXXYYYYYYYY``: timeline, then the segment
number split into a "log" part and a "segment within log" part (for the
default 16 MiB segments there are 256 segments per log). Other archived names:
``<segment>.partial`` (the last segment of a timeline a promoted server left),
``<segment>.<offset>.backup`` (backup history file) and ``<tli>.history``.
"""

from __future__ import annotations

# Start-up cost matters here: no re, struct, dataclasses or typing at import time.

DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024
WAL_BLOCK_SIZE = 8192
# XLOG_PAGE_MAGIC per major version (src/include/access/xlog_internal.h).
PAGE_MAGIC = {0xD10D: 14, 0xD110: 15, 0xD113: 16, 0xD116: 17}
XLP_LONG_HEADER = 0x0002

_HEX = frozenset("0123456789ABCDEF")
_ANY_HEX = frozenset("0123456789ABCDEFabcdef")


def _hex(text: str, length: int) -> bool:
    return len(text) == length and all(c in _HEX for c in text)


def is_segment(name: str) -> bool:
    return _hex(name, 24)


class WalNameError(ValueError):
    """Not a WAL file name PostgreSQL would archive."""


def kind(name: str) -> str:
    """``segment``, ``partial``, ``backup`` or ``history``; raises WalNameError otherwise."""
    if _hex(name, 24):
        return "segment"
    if len(name) == 16 and name.endswith(".history") and _hex(name[:8], 8):
        return "history"
    if len(name) == 32 and name.endswith(".partial") and _hex(name[:24], 24):
        return "partial"
    if (
        len(name) == 40
        and name.endswith(".backup")
        and _hex(name[:24], 24)
        and name[24] == "."
        and _hex(name[25:33], 8)
    ):
        return "backup"
    raise WalNameError(
        f"{name[:80]!r} is not a WAL file name (segment, .partial, .backup or .history)"
    )


def timeline_of(name: str) -> int:
    kind(name)
    return int(name[:8], 16)


def segments_per_log(segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    return 0x100000000 // segment_size


def segno_of(name: str, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    """The segment number of a segment (or .partial / .backup) name."""
    if kind(name) == "history":
        raise WalNameError(f"{name} is a history file, not a segment")
    return int(name[8:16], 16) * segments_per_log(segment_size) + int(name[16:24], 16)


def segment_name(tli: int, segno: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> str:
    per = segments_per_log(segment_size)
    return f"{tli:08X}{segno // per:08X}{segno % per:08X}"


def partial_name(segment: str) -> str:
    """The name a partial (still growing) copy of ``segment`` is archived under."""
    if not is_segment(segment):
        raise WalNameError(f"{segment[:80]!r} is not a WAL segment name")
    return f"{segment}.partial"


def segment_of_partial(name: str) -> str:
    """The segment a ``<segment>.partial`` name is a partial copy of."""
    if kind(name) != "partial":
        raise WalNameError(f"{name[:80]!r} is not a .partial WAL file name")
    return name[:24]


def history_name(tli: int) -> str:
    return f"{tli:08X}.history"


def timeline_dir(tli: int) -> str:
    return f"{tli:08X}"


def parse_lsn(text: str) -> int:
    parts = text.strip().split("/") if isinstance(text, str) else []
    if len(parts) != 2 or not all(
        1 <= len(p) <= 8 and all(c in _ANY_HEX for c in p) for p in parts
    ):
        raise WalNameError(f"invalid LSN {str(text)[:40]!r}: expected e.g. 0/16B3740")
    return (int(parts[0], 16) << 32) | int(parts[1], 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def segno_of_lsn(lsn: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    return lsn // segment_size


def segment_of_lsn(tli: int, lsn: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> str:
    return segment_name(tli, segno_of_lsn(lsn, segment_size), segment_size)


class HistoryEntry:
    """One line of a timeline history file: ``parent`` ended at ``switchpoint``."""

    __slots__ = ("parent", "reason", "switchpoint")

    def __init__(self, parent: int, switchpoint: int, reason: str) -> None:
        self.parent = parent
        self.switchpoint = switchpoint
        self.reason = reason

    def __repr__(self) -> str:
        return f"HistoryEntry({self.parent}, {format_lsn(self.switchpoint)})"


def parse_history(text: str) -> list[HistoryEntry]:
    """Parse ``<tli>.history``: ``parentTLI <tab> switchpoint <tab> reason`` per line."""
    entries: list[HistoryEntry] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].isdigit():
            raise WalNameError(f"malformed timeline history line {line[:80]!r}")
        entries.append(
            HistoryEntry(int(parts[0]), parse_lsn(parts[1]), parts[2] if len(parts) > 2 else "")
        )
    return entries


class TimelineSpan:
    """Timeline ``tli`` holds the WAL from ``begin`` up to ``end`` (None: open-ended)."""

    __slots__ = ("begin", "end", "tli")

    def __init__(self, tli: int, begin: int, end: int | None) -> None:
        self.tli = tli
        self.begin = begin
        self.end = end


def timeline_path(tli: int, history: list[HistoryEntry]) -> list[TimelineSpan]:
    """The WAL path of timeline ``tli``, oldest first, from its history file entries
    (empty history: timeline 1 alone)."""
    spans: list[TimelineSpan] = []
    begin = 0
    for entry in history:
        spans.append(TimelineSpan(entry.parent, begin, entry.switchpoint))
        begin = entry.switchpoint
    spans.append(TimelineSpan(tli, begin, None))
    return spans


def span_for_segno(
    path: list[TimelineSpan], segno: int, segment_size: int = DEFAULT_SEGMENT_SIZE
) -> TimelineSpan:
    """The timeline PostgreSQL reads segment ``segno`` from when following ``path``
    (the newest timeline whose first segment is at or before ``segno``)."""
    for span in reversed(path):
        if segno >= span.begin // segment_size:
            return span
    return path[0]


class SegmentHeader:
    __slots__ = ("block_size", "magic", "pageaddr", "seg_size", "sysid", "tli")

    def __init__(
        self, magic: int, tli: int, pageaddr: int, sysid: int, seg_size: int, block_size: int
    ) -> None:
        self.magic = magic
        self.tli = tli
        self.pageaddr = pageaddr
        self.sysid = sysid
        self.seg_size = seg_size
        self.block_size = block_size


def read_segment_header(data: bytes | memoryview) -> SegmentHeader:
    """The long page header at the start of every WAL segment."""
    import struct

    if len(data) < 40:
        raise WalNameError("shorter than a WAL page header")
    magic, info, tli, pageaddr, _rem, sysid, seg_size, blcksz = struct.unpack_from(
        "<HHIQI4xQII", bytes(data[:40])
    )
    if not info & XLP_LONG_HEADER:
        raise WalNameError("first page lacks the long header")
    return SegmentHeader(magic, tli, pageaddr, sysid, seg_size, blcksz)


def check_segment(
    name: str,
    data: bytes | memoryview,
    *,
    segment_size: int | None = None,
    system_identifier: int | None = None,
) -> SegmentHeader | None:
    """Check that ``data`` is the WAL segment ``name`` claims to be (size, page magic,
    page address, segment size, system identifier). Returns its header, or None for
    history/backup files (checked for being text). Raises WalNameError with the reason.
    """
    what = kind(name)
    if what in ("history", "backup"):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise WalNameError(f"{name}: not a text file") from None
        if what == "history":
            parse_history(text)
        elif "START WAL LOCATION" not in text:
            raise WalNameError(f"{name}: not a backup history file")
        return None
    header = read_segment_header(data)
    if header.magic not in PAGE_MAGIC:
        raise WalNameError(f"{name}: unknown WAL page magic 0x{header.magic:04X}")
    size = segment_size or header.seg_size
    if header.seg_size != size:
        raise WalNameError(f"{name}: segment size {header.seg_size}, expected {size}")
    if what == "segment" and len(data) != size:
        raise WalNameError(f"{name}: {len(data)} bytes, a segment has {size}")
    if what == "partial" and len(data) > size:
        raise WalNameError(f"{name}: {len(data)} bytes, more than a segment")
    expected_addr = segno_of(name, size) * size
    if header.pageaddr != expected_addr:
        raise WalNameError(
            f"{name}: first page is at {format_lsn(header.pageaddr)}, "
            f"expected {format_lsn(expected_addr)} (a segment stored under the wrong name?)"
        )
    if system_identifier is not None and header.sysid != system_identifier:
        raise WalNameError(
            f"{name}: belongs to database system {header.sysid}, expected {system_identifier}"
        )
    return header
