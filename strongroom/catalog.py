"""Manifests and the catalog: what backups exist, what each holds, and "latest".

A backup exists only once its manifest is written to
``catalog/<engine>/<target>/<backup_id>.json``; the manifest is written last,
after every artifact is durable and verified, and never overwritten. It is
signed when written (``strongroom.signing``: its Ed25519 signature at ``<key>.sig``
is written first, the manifest names the key id in ``signed_by``) and sealed
(``strongroom.seal``).

Reading: ``load`` and ``resolve`` are strict (a manifest not signed by a key in
``repo.trust`` is an ``IntegrityError``); ``list`` and ``resolve("latest")`` skip
untrusted and malformed entries (non-JSON, odd keys, over ``MAX_RECORD_SIZE``) and
record each in ``catalog.findings`` (``list_with_findings`` returns both), so one
bad object never stops the readers of a whole repository.
"""

from __future__ import annotations

import builtins
import datetime as dt
import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, Field

from strongroom.errors import (
    AccessDenied,
    IntegrityError,
    InvalidInput,
    NotFound,
    ServiceUnavailable,
    StorageFull,
    StrongroomError,
)
from strongroom.ids import (
    BACKUP_ID_RE,
    check_backup_id,
    check_engine,
    check_name,
    nearest,
    scope_prefix,
)
from strongroom.repository.base import Repository, StorageSettings, check_key
from strongroom.seal import (
    SEAL_FIELD,
    SIGNED_FORMAT,
    Origin,
    attach,
    make_seal,
    origin_of,
    parse_document,
    recipients_of,
)
from strongroom.seal import check_name as check_stored_name
from strongroom.signing import MAX_RECORD_SIZE, SIG_SUFFIX, put_signed, verify_stored

FORMAT_VERSION = 1
# PostgreSQL physical backups (the pg_basebackup tar, file-level copies): PITR starts from
# any of them and WAL retention keeps the WAL each kept one needs
PHYSICAL_KINDS = ("base", "files")


class StoredChunks(BaseModel):
    """SHA-256 of each chunk of the stored object, in order: ``first`` bytes, then twice
    as many each time up to ``size`` (``first`` 0: every chunk ``size``); the last chunk
    may be shorter. A restore checks each chunk before its bytes are used."""

    size: int = Field(gt=0)
    first: int = Field(default=0, ge=0)
    sha256: list[str]


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
    stored_chunks: StoredChunks | None = None


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
    signed_by: str | None = Field(
        default=None, description="key id of the Ed25519 key that signed it (strongroom.signing)"
    )
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
            # incremental chains: the backup this one builds on (None: self-contained)
            "base_backup_id": self.details.get("base_backup_id"),
            # full / diff / incr (files backups name it; an engine's incremental is incr)
            "backup_type": backup_type_of(self),
        }


def artifact_totals(manifest: Mapping[str, Any]) -> tuple[int, int]:
    """(raw, stored) bytes summed over a manifest's artifacts (its JSON form)."""
    raw = sum(a["raw_size"] for a in manifest["artifacts"])
    stored = sum(a["stored_size"] for a in manifest["artifacts"])
    return raw, stored


def manifest_key(engine: str, target: str, backup_id: str) -> str:
    return f"catalog/{engine}/{target}/{backup_id}.json"


def data_key(engine: str, target: str, backup_id: str, artifact: str) -> str:
    return f"data/{engine}/{target}/{backup_id}/{artifact}"


def data_prefix(engine: str, target: str, backup_id: str) -> str:
    return f"data/{engine}/{target}/{backup_id}/"


def inside(key: str, prefix: str) -> bool:
    """``key`` lies under ``prefix`` with no empty, ``.`` or ``..`` segment after it."""
    if not key.startswith(prefix) or len(key) == len(prefix):
        return False
    return all(part not in ("", ".", "..") for part in key[len(prefix) :].split("/"))


def parents_of(manifest: Manifest) -> tuple[str, ...]:
    """Backups this one needs to be restored (incremental chains), by id."""
    found: list[str] = []
    for name in ("depends_on", "parent_backup_id", "parent", "base_backup_id", "based_on"):
        value = manifest.details.get(name)
        if isinstance(value, str) and BACKUP_ID_RE.fullmatch(value):
            found.append(value)
        elif isinstance(value, list):
            found.extend(v for v in value if isinstance(v, str) and BACKUP_ID_RE.fullmatch(v))
    return tuple(dict.fromkeys(found))


def backup_type_of(manifest: Manifest) -> str:
    """``full``, ``diff`` or ``incr``: what ``details.backup_type`` says (file-level
    PostgreSQL backups), else ``incr`` for a backup that needs others (an engine's
    incremental, e.g. ClickHouse) and ``full`` for a self-contained one."""
    named = manifest.details.get("backup_type")
    if named in ("full", "diff", "incr"):
        return str(named)
    return "incr" if parents_of(manifest) else "full"


def owner_of(artifact: Artifact) -> str:
    """The backup id whose data folder holds an artifact (``data/<e>/<t>/<id>/...``): its
    own, or for an incremental's referenced artifact the earlier backup that stored it."""
    parts = artifact.key.split("/")
    return parts[3] if len(parts) > 4 and parts[0] == "data" else ""


def catalog_finding(key: str, status: str, error: str) -> dict[str, Any]:
    """One catalog entry that was skipped: ``{"key", "status", "error"}``; ``status`` is
    a ``strongroom.signing.Verdict`` status, ``misplaced`` or ``malformed``."""
    return {"key": key, "status": status, "error": error}


class Catalog:
    """Reads and writes manifests in one repository (trusting ``repo.trust``).

    ``findings`` collects the entries the last ``list``/``resolve`` skipped."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.findings: list[dict[str, Any]] = []

    def write(self, manifest: Manifest, settings: StorageSettings | None = None) -> str:
        """Publish a backup: signed with ``repo.trust``'s signer (its signature first),
        sealed to the recipients its artifacts were encrypted to (a manifest without
        recipients is written unsealed). Refuses to overwrite an existing manifest.
        ``manifest`` gets its format, ``signed_by`` and seal."""
        signer = self.repo.trust.require_signer(f"backup {manifest.backup_id}")
        key = manifest_key(manifest.engine, manifest.target, manifest.backup_id)
        recipients = recipients_of(manifest.document())
        version = (
            max(manifest.format_version, SIGNED_FORMAT) if recipients else manifest.format_version
        )
        signed = manifest.model_copy(
            update={"format_version": version, "signed_by": signer.key_id, SEAL_FIELD: None}
        )
        if recipients:
            seal: str | None = make_seal(signed.document(), recipients)
            body = signed.model_copy(update={SEAL_FIELD: seal}).model_dump_json(indent=2)
        else:
            seal = None
            body = signed.model_dump_json(indent=2, exclude={SEAL_FIELD})
        put_signed(self.repo, key, body.encode(), overwrite=False, settings=settings)
        manifest.format_version, manifest.signed_by, manifest.seal = (
            version,
            signer.key_id,
            seal,
        )
        return key

    def entries(
        self, engine: str | None = None, target: str | None = None
    ) -> builtins.list[tuple[str, str, str]]:
        """(engine, target, id) of every manifest object, oldest first; objects under
        catalog/ that cannot be manifests (odd keys, over the size cap) are findings."""
        prefix = scope_prefix("catalog", engine, target)
        found = []
        for info in self.repo.list(prefix):
            parts = info.key.split("/")
            if info.key.endswith(SIG_SUFFIX) and len(parts) == 4:
                continue
            if len(parts) != 4 or not parts[3].endswith(".json"):
                continue
            eng, tgt, bid = parts[1], parts[2], parts[3][: -len(".json")]
            if target and tgt != target:
                continue
            try:
                check_key(info.key)
                check_engine(eng)
                check_name(tgt, "target name")
                check_backup_id(bid)
            except InvalidInput as exc:
                self.findings.append(catalog_finding(info.key[:200], "malformed", str(exc)))
                continue
            if info.size > MAX_RECORD_SIZE:
                self.findings.append(
                    catalog_finding(
                        info.key,
                        "malformed",
                        f"manifest {info.key} has {info.size} bytes, over the "
                        f"{MAX_RECORD_SIZE}-byte limit; not read",
                    )
                )
                continue
            found.append((eng, tgt, bid))
        return sorted(found, key=lambda t: t[2])

    def load(self, engine: str, target: str, backup_id: str, *, strict: bool = True) -> Manifest:
        """Read one manifest (refused over ``MAX_RECORD_SIZE`` before it is read whole).
        Strict (default): ``IntegrityError`` unless it is signed by a key the repository
        trusts. Either way it remembers the stored document, seal and signature verdict
        (``strongroom.seal.Origin``), so reading its artifacts (``read_artifact``)
        refuses it unless it is trusted, stored under its own name and matches its seal."""
        key = manifest_key(engine, target, backup_id)
        raw = self.repo.get_bytes(key, max_size=MAX_RECORD_SIZE)
        try:
            doc = parse_document(raw, key)
            manifest = Manifest.model_validate(doc)
        except ValueError as exc:
            raise IntegrityError(f"manifest {key} is malformed: {str(exc)[:300]}") from None
        seal = doc.pop(SEAL_FIELD, None)
        claimed = doc.get("signed_by")
        verdict = verify_stored(self.repo, key, raw, claimed if isinstance(claimed, str) else None)
        if strict:
            verdict.require("manifest")
        origin = Origin(
            key=key,
            document=doc,
            seal=seal if isinstance(seal, str) else None,
            format_version=manifest.format_version,
            claimed_key=manifest_key(manifest.engine, manifest.target, manifest.backup_id),
            verdict=verdict,
        )
        attach(manifest, origin)
        for artifact in manifest.artifacts:
            attach(artifact, origin)
        return manifest

    def _lenient(self, found: tuple[str, str, str]) -> Manifest | None:
        """A trusted manifest stored under its own name, or None (and a finding)."""
        key = manifest_key(*found)
        try:
            manifest = self.load(*found, strict=False)
        except NotFound:
            return None  # removed since it was listed
        except (ServiceUnavailable, AccessDenied, StorageFull):
            raise  # the storage could not answer: not a finding about this object
        except StrongroomError as exc:
            self.findings.append(catalog_finding(key, "malformed", str(exc)))
            return None
        origin = origin_of(manifest)
        verdict = origin.verdict if origin is not None else None
        if verdict is not None and not verdict.trusted:
            self.findings.append(catalog_finding(key, verdict.status, verdict.message("manifest")))
            return None
        try:
            claimed = manifest_key(manifest.engine, manifest.target, manifest.backup_id)
            check_stored_name(key, claimed)
        except IntegrityError as exc:
            self.findings.append(catalog_finding(key, "misplaced", str(exc)))
            return None
        return manifest

    def list(self, engine: str | None = None, target: str | None = None) -> list[Manifest]:
        """Trusted manifests, oldest first; every entry skipped is in ``findings``."""
        self.findings = []
        found = (self._lenient(t) for t in self.entries(engine, target))
        return [m for m in found if m is not None]

    def list_with_findings(
        self, engine: str | None = None, target: str | None = None
    ) -> tuple[builtins.list[Manifest], builtins.list[dict[str, Any]]]:
        """(trusted manifests oldest first, the entries skipped: see ``catalog_finding``)."""
        manifests = self.list(engine, target)
        return manifests, list(self.findings)

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
        self.findings = []
        ids = self.entries(engine, target)
        scope = "/".join(x for x in (engine, target) if x) or "the repository"
        if backup_id == "latest":
            # ids sort by their start second; backups started within the same second
            # are told apart by when they finished
            pending: builtins.list[Manifest] = []
            for index, found in enumerate(reversed(ids)):
                latest = self._lenient(found)
                if latest is not None and (kind is None or latest.kind == kind):
                    pending.append(latest)
                following = ids[-index - 2][2][:16] if index + 1 < len(ids) else ""
                if pending and following != found[2][:16]:
                    return max(pending, key=lambda m: (m.finished_at, m.started_at))
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
        skipped = [f for f in self.findings if f["key"].endswith(f"/{backup_id}.json")]
        if not matches and skipped:
            raise IntegrityError(skipped[0]["error"])
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
