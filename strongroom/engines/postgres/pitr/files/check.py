"""Verify checks for the artifacts of file-level backups (``strongroom.verify``).

``verify_backup`` reads every artifact a files backup lists, referenced ones of earlier
backups included, with both SHA-256 digests checked; these checks add what the bytes
must also be: a data file exactly as long as recorded, a relation segment a whole number
of 8 KiB pages (reported, not failed: a relation extended while it was copied may end
in a partial page that WAL replay rewrites), a backup label PostgreSQL can read and
identical to the one in the manifest. Before the artifacts, the chain is checked whole
(every backup it depends on listed and trusted).
"""

from __future__ import annotations

import re
from typing import Any

from strongroom.catalog import Artifact, Manifest
from strongroom.engines.postgres.pitr.files import blocks, chain
from strongroom.engines.postgres.pitr.tar import parse_backup_label
from strongroom.errors import IntegrityError
from strongroom.repository.base import Repository
from strongroom.verify import register_chain_check, register_check

BLOCK = 8192
_RELATION = re.compile(r"^(base/[0-9]+|global)/[0-9]+(_(fsm|vm|init))?(\.[0-9]+)?$")
LABEL_LIMIT = 64 * 1024


class DataFileCheck:
    """Counts the plaintext of one data file against its recorded size."""

    def __init__(self, manifest: Manifest, artifact: Artifact) -> None:
        self._expected = artifact.meta.get("size")
        self._path = str(artifact.meta.get("path", artifact.name))
        self._size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._size += len(data)
        return len(data)

    def finish(self) -> dict[str, Any]:
        if self._expected != self._size:
            raise IntegrityError(
                f"{self._path}: {self._size} bytes, the manifest records {self._expected}"
            )
        found: dict[str, Any] = {"bytes": self._size}
        if _RELATION.match(self._path):
            found["whole_pages"] = self._size % BLOCK == 0
        return found


class LabelCheck:
    """The stored backup label parses and equals the manifest's copy of it."""

    def __init__(self, manifest: Manifest, artifact: Artifact) -> None:
        self._expected = manifest.details.get("backup_label")
        self._data = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if len(self._data) + len(data) > LABEL_LIMIT:
            raise IntegrityError("backup_label is unreasonably large")
        self._data += data
        return len(data)

    def finish(self) -> dict[str, Any]:
        text = self._data.decode("utf-8", "replace")
        label = parse_backup_label(text)
        if text != self._expected:
            raise IntegrityError("backup_label differs from the manifest's copy")
        return {"start_lsn": label["start_lsn"]}


class BlockMapCheck:
    """A block map parses, names only blocks artifacts of its file that the backup
    lists, and points at positions those artifacts hold (the blocks' digests are
    checked when a restore writes them)."""

    def __init__(self, manifest: Manifest, artifact: Artifact) -> None:
        self._record = artifact
        path = artifact.meta.get("path")
        self._sizes = {
            a.key: a.raw_size
            for a in manifest.artifacts
            if a.content == blocks.CONTENT_BLOCKS and a.meta.get("path") == path
        }
        self._sink = blocks.MapSink()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        return self._sink.write(data)

    def finish(self) -> dict[str, Any]:
        bmap = blocks.parse_record(bytes(self._sink.data), self._record)
        held = []
        for key in bmap.sources:
            if key not in self._sizes:
                raise IntegrityError(f"block map names {key[-60:]!r}, not listed for its file")
            held.append(-(-self._sizes[key] // bmap.block))
        for index in range(bmap.blocks):
            _, source, position = bmap.entry(index)
            if position >= held[source]:
                raise IntegrityError(f"block {index} points past the end of its source")
        return {"bytes": bmap.size, "blocks": bmap.blocks, "sources": len(bmap.sources)}


def check_whole_chain(repo: Repository, manifest: Manifest) -> dict[str, Any]:
    """verify: every backup this one depends on is listed and trusted, every artifact is
    where it should be (``chain.check_chain``); the artifacts are then read one by one."""
    parents = chain.check_chain(repo, manifest)
    return {"depends_on": [p.backup_id for p in parents]}


register_chain_check(chain.KIND, check_whole_chain)
register_check(chain.CONTENT_FILE, DataFileCheck)
register_check(chain.CONTENT_LABEL, LabelCheck)
register_check(blocks.CONTENT_MAP, BlockMapCheck)
