"""Reading a ``pg_basebackup -Ft -D -`` tar stream as it passes, without staging it.

``TarTap`` is a sink: feed it the tar bytes in any chunking and it tracks the
members, keeps the small files that describe the backup (``backup_label``,
``backup_manifest``, ``tablespace_map``) and can hash every regular file.

``BaseTarCheck`` (registered with ``strongroom.verify`` for content
``pg_basebackup-tar``) uses it to check a stored base backup without
extracting it: the tar is complete, ``backup_label`` and ``backup_manifest`` are
present, the manifest's own checksum holds, and every file the manifest lists
is in the tar with its size (and, for SHA-2 manifests, its checksum).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from strongroom.errors import IntegrityError

if TYPE_CHECKING:
    from strongroom.catalog import Artifact, Manifest

BLOCK = 512
CAPTURE = frozenset({"backup_label", "backup_manifest", "tablespace_map"})
CAPTURE_LIMIT = 64 * 1024 * 1024
_SHA = {"SHA224": "sha224", "SHA256": "sha256", "SHA384": "sha384", "SHA512": "sha512"}


@dataclass
class Member:
    name: str
    size: int
    type: str
    digest: str | None = None


def _octal(field_bytes: bytes) -> int:
    if field_bytes and field_bytes[0] & 0x80:  # base-256 (GNU) for large values
        value = int.from_bytes(field_bytes[1:], "big")
        return value
    text = field_bytes.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise IntegrityError("tar header has a malformed numeric field") from None


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of a pax extended header. Every record is
    ``"<length> <key>=<value>\\n"``; a length that is not a positive decimal number,
    that does not cover its own prefix, or that runs past the header is refused (a
    length of 0 would otherwise never advance)."""
    pos = 0
    path = None
    while pos < len(data):
        space = data.find(b" ", pos, pos + 21)
        digits = data[pos:space] if space > pos else b""
        if not digits or not digits.isdigit() or not digits.isascii():
            raise IntegrityError(f"tar pax header: malformed record length at byte {pos}")
        length = int(digits)
        if length < len(digits) + 3 or pos + length > len(data):
            raise IntegrityError(
                f"tar pax header: record length {length} at byte {pos} is out of bounds"
            )
        if data[pos + length - 1 : pos + length] != b"\n":
            raise IntegrityError(f"tar pax header: record at byte {pos} does not end a line")
        record = data[space + 1 : pos + length - 1]
        key, _, value = record.partition(b"=")
        if key == b"path":
            path = value.decode("utf-8", "replace")
        pos += length
    return path


@dataclass
class TarTap:
    """A streaming tar reader; ``write`` never blocks and keeps O(one header) state."""

    capture: frozenset[str] = CAPTURE
    hash_algorithm: str | None = None
    members: list[Member] = field(default_factory=list)
    captured: dict[str, bytes] = field(default_factory=dict)
    ended: bool = False
    _buf: bytearray = field(default_factory=bytearray)
    _remaining: int = 0  # data bytes left in the current member
    _padding: int = 0
    _current: Member | None = None
    _keep: bytearray | None = None
    _hasher: Any = None
    _special: str | None = None  # 'L' or 'x': the data is a name for the next member
    _next_name: str | None = None
    _zero_blocks: int = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        while view:
            if self._remaining:
                take = min(self._remaining, len(view))
                chunk = view[:take]
                if self._keep is not None:
                    if len(self._keep) + take > CAPTURE_LIMIT:
                        raise IntegrityError("tar member to capture is unreasonably large")
                    self._keep += chunk
                if self._hasher is not None:
                    self._hasher.update(chunk)
                self._remaining -= take
                view = view[take:]
                if not self._remaining:
                    self._end_member()
                continue
            if self._padding:
                take = min(self._padding, len(view))
                self._padding -= take
                view = view[take:]
                continue
            if self.ended:
                view = view[len(view) :]  # trailing zero padding after the end marker
                continue
            take = min(BLOCK - len(self._buf), len(view))
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) == BLOCK:
                header = bytes(self._buf)
                self._buf.clear()
                self._header(header)
        return n

    def _header(self, header: bytes) -> None:
        if header == b"\0" * BLOCK:
            self._zero_blocks += 1
            if self._zero_blocks >= 2:
                self.ended = True
            return
        self._zero_blocks = 0
        stored = _octal(header[148:156])
        computed = sum(header[:148]) + 8 * 32 + sum(header[156:])
        if stored != computed:
            raise IntegrityError("tar header checksum mismatch: the base backup stream is corrupt")
        name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if header[257:262] == b"ustar":
            prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
            if prefix:
                name = f"{prefix}/{name}"
        if self._next_name is not None:
            name, self._next_name = self._next_name, None
        size = _octal(header[124:136])
        kind = chr(header[156]) if header[156] else "0"
        self._padding = (-size) % BLOCK
        self._remaining = size
        self._keep = None
        self._hasher = None
        if kind in ("L", "x"):
            self._special = kind
            self._keep = bytearray()
            self._current = None
        elif kind == "g":
            self._special = "g"
            self._current = None
        else:
            self._special = None
            member = Member(name.removeprefix("./"), size if kind in ("0", "7") else 0, kind)
            self.members.append(member)
            self._current = member
            if member.name in self.capture:
                self._keep = bytearray()
            if self.hash_algorithm and kind in ("0", "7"):
                self._hasher = hashlib.new(self.hash_algorithm)
        if not size:
            self._end_member()

    def _end_member(self) -> None:
        if self._special == "L" and self._keep is not None:
            self._next_name = bytes(self._keep).split(b"\0", 1)[0].decode("utf-8", "replace")
        elif self._special == "x" and self._keep is not None:
            self._next_name = _pax_path(bytes(self._keep))
        elif self._current is not None:
            if self._keep is not None:
                self.captured[self._current.name] = bytes(self._keep)
            if self._hasher is not None:
                self._current.digest = self._hasher.hexdigest()
        self._special = None
        self._keep = None
        self._hasher = None
        self._current = None

    def flush(self) -> None:
        pass


# ------------------------------------------------------------ backup metadata

_LABEL_RE = {
    "start_lsn": re.compile(r"^START WAL LOCATION: (\S+) \(file ([0-9A-F]{24})\)", re.M),
    "checkpoint_lsn": re.compile(r"^CHECKPOINT LOCATION: (\S+)", re.M),
    "start_time": re.compile(r"^START TIME: (.+)$", re.M),
    "label": re.compile(r"^LABEL: (.*)$", re.M),
    "start_timeline": re.compile(r"^START TIMELINE: (\d+)", re.M),
    "backup_from": re.compile(r"^BACKUP FROM: (\S+)", re.M),
}


def parse_backup_label(text: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, regex in _LABEL_RE.items():
        match = regex.search(text)
        if match is None:
            continue
        found[key] = match.group(1)
        if key == "start_lsn":
            found["start_wal"] = match.group(2)
    if "start_lsn" not in found:
        raise IntegrityError("backup_label has no START WAL LOCATION")
    if "start_timeline" in found:
        found["start_timeline"] = int(found["start_timeline"])
    return found


def check_manifest_checksum(raw: bytes) -> dict[str, Any]:
    """Parse ``backup_manifest`` and check its ``Manifest-Checksum`` (SHA-256 of the text
    before that line)."""
    marker = raw.rfind(b'"Manifest-Checksum"')
    if marker < 0:
        raise IntegrityError("backup_manifest has no Manifest-Checksum")
    line_start = raw.rfind(b"\n", 0, marker) + 1
    try:
        manifest = json.loads(raw)
    except ValueError:
        raise IntegrityError("backup_manifest is not valid JSON") from None
    if hashlib.sha256(raw[:line_start]).hexdigest() != manifest.get("Manifest-Checksum"):
        raise IntegrityError("backup_manifest checksum mismatch")
    return dict(manifest)


class BaseTarCheck:
    """verify: the stored tar is complete and agrees with PostgreSQL's backup_manifest."""

    def __init__(self, manifest: Manifest, artifact: Artifact) -> None:
        algorithm = str(artifact.meta.get("manifest_checksums", "")).upper()
        self._algorithm = _SHA.get(algorithm)
        self._tap = TarTap(hash_algorithm=self._algorithm)
        self._expected_label = manifest.details.get("start_lsn")

    def write(self, data: bytes | bytearray | memoryview) -> int:
        return self._tap.write(data)

    def finish(self) -> dict[str, Any]:
        tap = self._tap
        if not tap.ended:
            raise IntegrityError("tar stream ends without its end-of-archive marker (truncated)")
        for required in ("backup_label", "backup_manifest"):
            if required not in tap.captured:
                raise IntegrityError(f"base backup lacks {required}")
        label = parse_backup_label(tap.captured["backup_label"].decode("utf-8", "replace"))
        if self._expected_label and label["start_lsn"] != self._expected_label:
            raise IntegrityError(
                f"backup_label starts at {label['start_lsn']}, manifest says {self._expected_label}"
            )
        pg_manifest = check_manifest_checksum(tap.captured["backup_manifest"])
        members = {m.name: m for m in tap.members if m.type in ("0", "7")}
        problems: list[str] = []
        checked = 0
        for entry in pg_manifest.get("Files", []):
            path = entry.get("Path")
            member = members.get(path)
            if member is None:
                problems.append(f"missing {path}")
                continue
            if member.size != entry.get("Size"):
                problems.append(f"{path}: {member.size} bytes, manifest says {entry.get('Size')}")
                continue
            algorithm = _SHA.get(str(entry.get("Checksum-Algorithm", "")).upper())
            if algorithm and algorithm == self._algorithm and member.digest is not None:
                if member.digest != entry.get("Checksum"):
                    problems.append(f"{path}: checksum mismatch")
                    continue
                checked += 1
        if problems:
            shown = "; ".join(problems[:5])
            more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
            raise IntegrityError(f"base backup disagrees with its backup_manifest: {shown}{more}")
        return {
            "tar_members": len(tap.members),
            "manifest_files": len(pg_manifest.get("Files", [])),
            "file_checksums_verified": checked,
            "start_lsn": label["start_lsn"],
        }
