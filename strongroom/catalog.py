"""Manifests and the catalog: what backups exist, what each holds, and "latest".

A backup exists only once its manifest is written to
``catalog/<engine>/<target>/<backup_id>.json``; the manifest is written last,
after every artifact is durable and verified, and never overwritten. It is
sealed when written (``strongroom.seal``): verify and restore refuse a manifest
that changed after it was published.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from pydantic import BaseModel, Field

from strongroom.errors import InvalidInput, NotFound, StrongroomError
from strongroom.ids import check_backup_id, check_engine, check_name, nearest
from strongroom.repository.base import Repository, StorageSettings
from strongroom.seal import (
    SEAL_FIELD,
    SEALED_FORMAT,
    Origin,
    attach,
    make_seal,
    parse_document,
    recipients_of,
)

FORMAT_VERSION = 1


class Artifact(BaseModel):
    """One stored file of a backup, with everything needed to check it."""

    name: str
    key: str
    content: str = Field(description="what the plaintext is, e.g. pg_dump-custom, sql")
    raw_size: int
    stored_size: int
    raw_sha256: str
    stored_sha256: str
    compression: str = "zstd"
    compression_level: int = 3
    encryption: str = "age-x25519"
    recipients: list[str] = Field(
        default_factory=list, description="public age recipients (never the identity)"
    )
    meta: dict[str, Any] = Field(default_factory=dict)


class Manifest(BaseModel):
    """Everything known about one backup."""

    format_version: int = FORMAT_VERSION
    backup_id: str
    engine: str
    target: str
    kind: str = "logical"
    started_at: dt.datetime
    finished_at: dt.datetime
    repository: str
    tool_versions: dict[str, str] = Field(default_factory=dict)
    server: dict[str, Any] = Field(default_factory=dict)
    artifacts: list[Artifact]
    details: dict[str, Any] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    seal: str | None = Field(
        default=None,
        description="age-encrypted digests of the rest of the manifest (strongroom.seal)",
    )

    def document(self) -> dict[str, Any]:
        """The manifest as JSON data, without its seal (what the seal covers)."""
        return dict(json.loads(self.model_dump_json(exclude={SEAL_FIELD})))

    @property
    def raw_size(self) -> int:
        return sum(a.raw_size for a in self.artifacts)

    @property
    def stored_size(self) -> int:
        return sum(a.stored_size for a in self.artifacts)

    @property
    def duration_s(self) -> float:
        return (self.finished_at - self.started_at).total_seconds()

    def artifact(self, name: str) -> Artifact:
        for item in self.artifacts:
            if item.name == name:
                return item
        raise NotFound(f"backup {self.backup_id} has no artifact {name!r}")

    def summary(self) -> dict[str, Any]:
        return {
            "backup_id": self.backup_id,
            "engine": self.engine,
            "target": self.target,
            "kind": self.kind,
            "finished_at": self.finished_at.isoformat(),
            "duration_s": round(self.duration_s, 3),
            "raw_size": self.raw_size,
            "stored_size": self.stored_size,
            "artifacts": len(self.artifacts),
        }


def artifact_totals(manifest: dict[str, Any]) -> tuple[int, int]:
    """(raw, stored) bytes summed over a manifest's artifacts (its JSON form)."""
    raw = sum(a["raw_size"] for a in manifest["artifacts"])
    stored = sum(a["stored_size"] for a in manifest["artifacts"])
    return raw, stored


def manifest_key(engine: str, target: str, backup_id: str) -> str:
    return f"catalog/{engine}/{target}/{backup_id}.json"


def data_key(engine: str, target: str, backup_id: str, artifact: str) -> str:
    return f"data/{engine}/{target}/{backup_id}/{artifact}"


class Catalog:
    """Reads and writes manifests in one repository."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo

    def write(self, manifest: Manifest, settings: StorageSettings | None = None) -> str:
        """Publish a backup, sealed to the recipients its artifacts were encrypted to
        (a manifest without recipients cannot be sealed and is written unsealed).
        Refuses to overwrite an existing manifest. ``manifest`` gets its seal."""
        key = manifest_key(manifest.engine, manifest.target, manifest.backup_id)
        recipients = recipients_of(manifest.document())
        if recipients:
            version = max(manifest.format_version, SEALED_FORMAT)
            sealed = manifest.model_copy(update={"format_version": version, SEAL_FIELD: None})
            seal = make_seal(sealed.document(), recipients)
            body = sealed.model_copy(update={SEAL_FIELD: seal}).model_dump_json(indent=2)
        else:
            version, seal = manifest.format_version, None
            body = manifest.model_dump_json(indent=2, exclude={SEAL_FIELD})
        self.repo.put_bytes(key, body.encode(), overwrite=False, settings=settings)
        manifest.format_version, manifest.seal = version, seal
        return key

    def _ids(self, engine: str | None, target: str | None) -> list[tuple[str, str, str]]:
        prefix = "catalog/"
        if engine:
            prefix += f"{check_engine(engine)}/"
            if target:
                prefix += f"{check_name(target, 'target name')}/"
        found = []
        for info in self.repo.list(prefix):
            parts = info.key.split("/")
            if len(parts) != 4 or not parts[3].endswith(".json"):
                continue
            eng, tgt, bid = parts[1], parts[2], parts[3][: -len(".json")]
            if target and tgt != target:
                continue
            found.append((eng, tgt, bid))
        return sorted(found, key=lambda t: t[2])

    def load(self, engine: str, target: str, backup_id: str) -> Manifest:
        """Read one manifest. It remembers the stored document and seal, so reading its
        artifacts (``read_artifact``) refuses it if the seal does not match."""
        key = manifest_key(engine, target, backup_id)
        raw = self.repo.get_bytes(key)
        try:
            manifest = Manifest.model_validate_json(raw)
            doc = parse_document(raw, key)
        except ValueError as exc:
            raise StrongroomError(f"manifest {key} is malformed: {exc}") from None
        seal = doc.pop(SEAL_FIELD, None)
        origin = Origin(
            key=key,
            document=doc,
            seal=seal if isinstance(seal, str) else None,
            format_version=manifest.format_version,
            claimed_key=manifest_key(manifest.engine, manifest.target, manifest.backup_id),
        )
        attach(manifest, origin)
        for artifact in manifest.artifacts:
            attach(artifact, origin)
        return manifest

    def list(self, engine: str | None = None, target: str | None = None) -> list[Manifest]:
        """Manifests, oldest first."""
        return [self.load(e, t, b) for e, t, b in self._ids(engine, target)]

    def resolve(
        self,
        backup_id: str,
        engine: str | None = None,
        target: str | None = None,
        *,
        kind: str | None = None,
    ) -> Manifest:
        """Find one backup by id (or ``latest``), optionally within engine/target and of
        one kind (e.g. ``logical`` dumps, not ``base`` backups of the same target)."""
        ids = self._ids(engine, target)
        scope = "/".join(x for x in (engine, target) if x) or "the repository"
        if backup_id == "latest":
            for found in reversed(ids):
                manifest = self.load(*found)
                if kind is None or manifest.kind == kind:
                    return manifest
            raise NotFound(f"no backups in {scope}" + (f" of kind {kind}" if kind else ""))
        if not isinstance(backup_id, str) or not backup_id:
            raise InvalidInput("backup id is empty")
        try:
            check_backup_id(backup_id)
        except InvalidInput as exc:
            hint = nearest(backup_id[:40], [b for _, _, b in ids]) if ids else []
            suffix = f"; nearest ids: {', '.join(hint)}" if hint else ""
            raise InvalidInput(f"{exc}{suffix}") from None
        matches = [t for t in ids if t[2] == backup_id]
        if not matches:
            hint = nearest(backup_id, [b for _, _, b in ids])
            suffix = f"; nearest ids: {', '.join(hint)}" if hint else " (it holds no backups)"
            raise NotFound(f"backup {backup_id} not found in {scope}{suffix}")
        if len(matches) > 1:
            raise InvalidInput(
                f"backup id {backup_id} exists for several targets; give --engine/--target"
            )
        manifest = self.load(*matches[0])
        if kind is not None and manifest.kind != kind:
            raise InvalidInput(f"backup {backup_id} is a {manifest.kind} backup, not a {kind} one")
        return manifest
