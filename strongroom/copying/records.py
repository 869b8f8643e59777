"""Copy records: which repositories hold a copy of which backup.

After a backup's manifest is committed at a destination (so the copy is whole and
visible there), the copy writes one signed record
``copies/<engine>/<target>/<backup_id>/<destination id>.json`` into the
destination (it holds the copy) and into the source (its catalog then knows where
its backups were copied, without opening the destination). ``<destination id>`` is
the first 16 hex digits of the SHA-256 of the destination's ``describe()``.

A record is evidence only when it is signed by a trusted key (``strongroom.signing``):
``list_copies`` skips the others and reports them in its findings, like the catalog.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
from collections import defaultdict
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from strongroom.catalog import Manifest, catalog_finding
from strongroom.errors import AccessDenied, Conflict, ServiceUnavailable, StrongroomError
from strongroom.ids import BACKUP_ID_RE, check_backup_id, check_engine, check_name
from strongroom.repository.base import Repository, StorageSettings
from strongroom.signing import (
    MAX_RECORD_SIZE,
    SIG_SUFFIX,
    get_verified_json,
    put_signed_json,
)

COPIES_PREFIX = "copies/"
COPY_RECORD_FORMAT = 1


def repository_id(description: str) -> str:
    """A stable, key-safe id of a repository from its ``describe()``."""
    return hashlib.sha256(description.encode()).hexdigest()[:16]


def copy_record_key(engine: str, target: str, backup_id: str, destination: str) -> str:
    return (
        f"{COPIES_PREFIX}{check_engine(engine)}/{check_name(target, 'target name')}/"
        f"{check_backup_id(backup_id)}/{repository_id(destination)}.json"
    )


class CopyRecord(BaseModel):
    """One backup copied from ``source`` to ``destination`` (both ``describe()``)."""

    format: int = COPY_RECORD_FORMAT
    engine: str
    target: str
    backup_id: str
    kind: str
    source: str
    destination: str
    destination_id: str
    backup_finished_at: dt.datetime
    copied_at: dt.datetime
    manifest_sha256: str = Field(description="SHA-256 of the manifest bytes copied")
    manifest_signed_by: str | None = Field(default=None, description="the manifest's signer")
    artifacts: int
    stored_bytes: int
    signed_by: str | None = Field(default=None, description="key id that signed this record")

    @property
    def delay_hours(self) -> float:
        return (self.copied_at - self.backup_finished_at).total_seconds() / 3600

    @classmethod
    def for_manifest(
        cls,
        manifest: Manifest,
        manifest_bytes: bytes,
        source: str,
        destination: str,
        copied_at: dt.datetime,
    ) -> CopyRecord:
        return cls(
            engine=manifest.engine,
            target=manifest.target,
            backup_id=manifest.backup_id,
            kind=manifest.kind,
            source=source,
            destination=destination,
            destination_id=repository_id(destination),
            backup_finished_at=manifest.finished_at.astimezone(dt.UTC),
            copied_at=copied_at.astimezone(dt.UTC),
            manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest(),
            manifest_signed_by=manifest.signed_by,
            artifacts=len(manifest.artifacts),
            stored_bytes=manifest.stored_size,
        )

    def document(self) -> dict[str, Any]:
        return dict(self.model_dump(mode="json", exclude={"signed_by"}))


def write_copy_record(
    repo: Repository, record: CopyRecord, settings: StorageSettings | None = None
) -> str | None:
    """Store ``record`` signed in ``repo``; its key, or None when ``repo`` has no signing
    key (nothing is written: an unsigned record would not be evidence). A record already
    there (an earlier run) is kept as it is."""
    if repo.trust.signer is None:
        return None
    key = copy_record_key(record.engine, record.target, record.backup_id, record.destination)
    with contextlib.suppress(Conflict):
        put_signed_json(repo, key, record.document(), overwrite=False, settings=settings)
    return key


def _parse_key(key: str) -> tuple[str, str, str] | None:
    parts = key.split("/")
    if len(parts) != 5 or parts[0] != "copies" or not parts[4].endswith(".json"):
        return None
    engine, target, backup_id = parts[1], parts[2], parts[3]
    if not BACKUP_ID_RE.fullmatch(backup_id):
        return None
    try:
        check_engine(engine)
        check_name(target, "target name")
    except StrongroomError:
        return None
    return engine, target, backup_id


def list_copies(
    repo: Repository, engine: str | None = None, target: str | None = None
) -> tuple[list[CopyRecord], list[dict[str, Any]]]:
    """(trusted copy records, findings about the records skipped) in ``repo``."""
    prefix = COPIES_PREFIX
    if engine:
        prefix += f"{check_engine(engine)}/"
        if target:
            prefix += f"{check_name(target, 'target name')}/"
    records: list[CopyRecord] = []
    findings: list[dict[str, Any]] = []
    for info in repo.list(prefix):
        if info.key.endswith(SIG_SUFFIX):
            continue
        parsed = _parse_key(info.key)
        if parsed is None or info.size > MAX_RECORD_SIZE:
            findings.append(catalog_finding(info.key[:200], "malformed", "not a copy record"))
            continue
        try:
            doc, verdict = get_verified_json(repo, info.key, strict=False)
        except (ServiceUnavailable, AccessDenied):
            raise
        except StrongroomError as exc:
            findings.append(catalog_finding(info.key, "malformed", str(exc)[:300]))
            continue
        if not verdict.trusted:
            findings.append(catalog_finding(info.key, verdict.status, verdict.message("record")))
            continue
        try:
            record = CopyRecord.model_validate(doc)
        except ValidationError as exc:
            findings.append(catalog_finding(info.key, "malformed", str(exc)[:300]))
            continue
        if (record.engine, record.target, record.backup_id) != parsed or info.key != (
            copy_record_key(*parsed, record.destination)
        ):
            findings.append(
                catalog_finding(info.key, "misplaced", "copy record stored under another name")
            )
            continue
        records.append(record)
    return records, findings


def copies_by_backup(records: list[CopyRecord]) -> dict[str, list[CopyRecord]]:
    """Records grouped by backup id, each group in copy order."""
    grouped: dict[str, list[CopyRecord]] = defaultdict(list)
    for record in sorted(records, key=lambda r: r.copied_at):
        grouped[record.backup_id].append(record)
    return dict(grouped)
