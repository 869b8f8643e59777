"""The archive's table of contents for selective restores, and reading a dump to its end.

``pg_restore -t`` selects a table's definition and data but not the ``TABLE ATTACH``
entries that hang partitions under their parent, and ``-n``/``-t`` combine as a cross
product across schemas. A selective table restore therefore reads the archive's table
of contents first (``pg_restore -l``, which reads only the start of the stream) and
hands pg_restore a use-list (``-L``) of exactly the entries wanted, matched by the
relation's oid that the manifest recorded.

pg_restore stops reading its input once it has what it needs; ``DrainingSink`` then
keeps reading the rest of the artifact through the hash/decrypt pipeline (discarding
it), so every checksum is checked before the restore's transaction commits.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import tempfile
from pathlib import Path
from typing import IO, Any

from strongroom.artifacts import read_artifact
from strongroom.catalog import Artifact
from strongroom.config import EncryptionConfig
from strongroom.engines.postgres.relations import Key, key_of, parent_of
from strongroom.errors import IntegrityError
from strongroom.repository.base import Repository

LINE = re.compile(r"^(\d+); (\d+) (\d+) (.*)$")
DEFINITIONS = ("TABLE", "FOREIGN TABLE", "MATERIALIZED VIEW")
DATA = ("TABLE DATA", "MATERIALIZED VIEW DATA")
# longest first, so "TABLE DATA" is never read as "TABLE" + a schema called DATA
_DESCS = sorted((*DEFINITIONS, *DATA, "TABLE ATTACH"), key=len, reverse=True)


class DrainingSink:
    """Writes into a tool's stdin until the tool stops reading, then discards the rest
    (the caller keeps reading the artifact to its end, so its checksums are checked)."""

    def __init__(self, pipe: IO[bytes]) -> None:
        self._pipe = pipe
        self.stopped = False
        self.drained = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if not self.stopped:
            try:
                self._pipe.write(data)
                return len(data)
            except BrokenPipeError:
                self.stopped = True
        self.drained += len(data)
        return len(data)

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self._pipe.close()


class _ListDone(Exception):
    """pg_restore -l has read the table of contents: stop reading the artifact."""


class _ListSink:
    def __init__(self, pipe: IO[bytes]) -> None:
        self._pipe = pipe

    def write(self, data: bytes | bytearray | memoryview) -> int:
        try:
            self._pipe.write(data)
        except BrokenPipeError:
            raise _ListDone from None
        return len(data)


def _sanitize(name: str) -> str:
    return name.replace("\r", " ").replace("\n", " ")


def list_stream(
    repo: Repository, artifact: Artifact, enc: EncryptionConfig, pg_restore: str
) -> str:
    """``pg_restore -l`` of a custom-format artifact; reads only as far as the TOC.

    The listing only chooses entries; the restore itself reads and checks every byte
    before anything commits, so a listing of a tampered artifact changes nothing."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [pg_restore, "-l"], stdin=subprocess.PIPE, stdout=out, stderr=err, bufsize=0
        )
        assert proc.stdin is not None
        try:
            with contextlib.suppress(_ListDone):
                read_artifact(repo, artifact, _ListSink(proc.stdin), encryption=enc, holdback=0)
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
            code = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        return _listing(code, out, err)


def list_folder(folder: Path, pg_restore: str) -> str:
    """``pg_restore -l`` of a (verified, spooled) directory-format dump."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        code = subprocess.run(
            [pg_restore, "-l", str(folder)], stdout=out, stderr=err, check=False, timeout=300
        ).returncode
        return _listing(code, out, err)


def _listing(code: int, out: IO[bytes], err: IO[bytes]) -> str:
    out.seek(0)
    err.seek(0)
    if code != 0:
        text = err.read().decode("utf-8", "replace").strip()[:500]
        raise IntegrityError(f"pg_restore -l could not read the archive: {text}")
    return out.read().decode("utf-8", "replace")


def parse(listing: str) -> list[tuple[str, int, str, str]]:
    """``(line, oid, desc, rest)`` per entry of the kinds a table selection uses."""
    entries: list[tuple[str, int, str, str]] = []
    for line in listing.splitlines():
        match = LINE.match(line)
        if match is None:
            continue
        rest = match.group(4)
        for desc in _DESCS:
            if rest.startswith(desc + " "):
                entries.append((line, int(match.group(3)), desc, rest[len(desc) + 1 :]))
                break
    return entries


def _names(schema: str, name: str) -> str:
    return f"{_sanitize(schema)} {_sanitize(name)} "


def use_list(
    listing: str,
    entry: dict[str, Any],
    selected: list[Key],
    *,
    schema_only: bool = False,
    data_only: bool = False,
) -> str:
    """The ``-L`` list for ``selected``: definitions, data, and the TABLE ATTACH entries
    of partitions whose parent is selected too (a lone partition stays standalone)."""
    by_key = {key_of(t): t for t in entry["tables"]}
    chosen = set(selected)
    oids = {int(by_key[k]["oid"]): k for k in selected if by_key.get(k, {}).get("oid")}
    attach = {
        _names(*k)
        for k in selected
        if (p := parent_of(by_key.get(k, {}))) is not None and p in chosen
    }
    by_name = {_names(*k) for k in selected if not by_key.get(k, {}).get("oid")}
    wanted: list[str] = []
    for line, oid, desc, rest in parse(listing):
        if desc == "TABLE ATTACH":
            keep = not data_only and any(rest.startswith(n) for n in attach)
        elif desc in DATA:
            keep = not schema_only and (oid in oids or any(rest.startswith(n) for n in by_name))
        else:
            keep = not data_only and (oid in oids or any(rest.startswith(n) for n in by_name))
        if keep:
            wanted.append(line)
    return "\n".join(wanted) + "\n"


def data_entries(listing: str) -> tuple[set[int], set[str]]:
    """The oids and ``schema name `` texts of every TABLE DATA / MATERIALIZED VIEW DATA."""
    oids: set[int] = set()
    names: set[str] = set()
    for _, oid, desc, rest in parse(listing):
        if desc in DATA:
            oids.add(oid)
            names.add(rest)
    return oids, names


def has_data(table: dict[str, Any], oids: set[int], names: set[str]) -> bool:
    if table.get("oid"):
        return int(table["oid"]) in oids
    prefix = _names(str(table["schema"]), str(table["name"]))
    return any(n.startswith(prefix) for n in names)
