"""Chains of file-level backups: which earlier backup a differential or incremental one
is compared with, and whether a chain is whole before anything reads from it.

pgBackRest's semantics: a *differential* backup is compared with the last full one, an
*incremental* with the last backup of any type. A file unchanged since that *prior*
backup is not copied again: the new manifest lists the prior's record of it (the
artifact's key, under the backup that first stored it, sizes and digests), so restore
and verify read it like one of their own. Every backup whose folder holds a listed
artifact is named in ``details.depends_on`` (retention keeps those:
``strongroom.policy.owned``).

A prior is used only when it is a trusted file-level backup of the same database system
(system identifier) on the timeline the cluster is on now (a promoted or restored
cluster starts a new chain), encrypted to the same recipients, and its chain is whole;
otherwise the backup is a full one and says why. A chain is *whole* when every backup
it depends on is listed and trusted, every artifact lies in the folder of the backup
itself or of one it depends on, and every artifact is in the repository with the size
recorded. Restore checks that before it writes a byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from strongroom.catalog import (
    Artifact,
    Catalog,
    Manifest,
    data_prefix,
    inside,
    owner_of,
    parents_of,
)
from strongroom.config import EncryptionConfig
from strongroom.engines.postgres.pitr.files.blocks import CONTENT_BLOCKS, CONTENT_MAP
from strongroom.errors import IntegrityError, NotFound
from strongroom.repository.base import Repository

ENGINE = "postgresql"
KIND = "files"
CONTENT_FILE = "pg-data-file"
CONTENT_LABEL = "pg-backup-label"
CONTENT_SPCMAP = "pg-tablespace-map"
LABEL = "backup_label"
SPCMAP = "tablespace_map"
BackupType = Literal["full", "diff", "incr"]
BACKUP_TYPES: tuple[str, ...] = ("full", "diff", "incr")


@dataclass(frozen=True)
class Prior:
    """The backup a differential or incremental one is compared with."""

    manifest: Manifest
    records: dict[str, Artifact]  # path -> the artifact holding it (or its block map)
    sources: dict[str, Artifact]  # key -> a blocks artifact a block map names
    copy_started_ns: int  # the prior's copy start: the timestamp-granularity rule

    @property
    def backup_id(self) -> str:
        return self.manifest.backup_id


@dataclass(frozen=True)
class Choice:
    """The outcome of choosing a prior: ``prior`` None means a full backup, for ``reason``."""

    backup_type: str
    prior: Prior | None
    reason: str = ""


def file_records(manifest: Manifest) -> dict[str, Artifact]:
    """The data files a files backup lists, by path: the file's artifact, or for a large
    relation file its block map (``blocks``)."""
    return {
        str(a.meta["path"]): a
        for a in manifest.artifacts
        if a.content in (CONTENT_FILE, CONTENT_MAP) and isinstance(a.meta.get("path"), str)
    }


def block_sources(manifest: Manifest) -> dict[str, Artifact]:
    """The blocks artifacts a files backup lists, by key (block maps name them)."""
    return {a.key: a for a in manifest.artifacts if a.content == CONTENT_BLOCKS}


def files_backups(repo: Repository, target: str) -> list[Manifest]:
    """Trusted file-level backups of ``target``, oldest first."""
    return [m for m in Catalog(repo).list(ENGINE, target) if m.kind == KIND]


def _recipients(manifest: Manifest) -> set[str] | None:
    found = {tuple(sorted(a.recipients)) for a in manifest.artifacts}
    return set(found.pop()) if len(found) == 1 else None


def choose_prior(
    repo: Repository,
    target: str,
    backup_type: str,
    enc: EncryptionConfig,
    *,
    system_identifier: int,
    timeline: int,
) -> Choice:
    """The prior backup for a ``backup_type`` backup of ``target``, or why it is a full."""
    if backup_type not in BACKUP_TYPES:
        raise ValueError(f"backup type {backup_type!r}")
    if backup_type == "full":
        return Choice("full", None, "full requested")
    candidates = files_backups(repo, target)
    if backup_type == "diff":
        candidates = [m for m in candidates if m.details.get("backup_type") == "full"]
    if not candidates:
        return Choice("full", None, f"no earlier backup of {target} for a {backup_type} backup")
    latest = max(candidates, key=lambda m: (m.finished_at, m.started_at))
    details = latest.details
    why = ""
    if int(details.get("system_identifier", 0)) != system_identifier:
        why = f"backup {latest.backup_id} is of another database system"
    elif int(details.get("stop_timeline", details.get("timeline", 0))) != timeline:
        why = (
            f"the cluster is on timeline {timeline}, backup {latest.backup_id} on "
            f"{details.get('stop_timeline')} (promoted or restored since)"
        )
    elif _recipients(latest) != set(enc.recipients):
        why = f"encryption recipients differ from backup {latest.backup_id}"
    elif "copy_started_ns" not in details:
        why = f"backup {latest.backup_id} records no copy start time"
    if not why:
        try:
            check_chain(repo, latest)
        except (NotFound, IntegrityError) as exc:
            why = f"the chain of backup {latest.backup_id} is not whole ({exc})"
    if why:
        return Choice("full", None, why)
    prior = Prior(
        latest, file_records(latest), block_sources(latest), int(details["copy_started_ns"])
    )
    return Choice(backup_type, prior)


def unchanged(prior: Prior, path: str, size: int, mtime_ns: int, now_ns: int) -> Artifact | None:
    """The prior's artifact for ``path`` when size and mtime are what the prior recorded
    and the file was last modified in a second *before* the prior's copy started
    (pgBackRest's rule: a change within the same second as the copy may not move the
    mtime, so such a file is always copied again); None: copy it. A modification time
    in the future (clock trouble) is never trusted."""
    record = prior.records.get(path)
    if record is None or mtime_ns > now_ns:
        return None
    if int(record.meta.get("size", -1)) != size or int(record.meta.get("mtime_ns", -1)) != mtime_ns:
        return None
    if mtime_ns // 1_000_000_000 >= prior.copy_started_ns // 1_000_000_000:
        return None
    return record


def referenced(record: Artifact, path: str, size: int, mtime_ns: int, mode: int) -> Artifact:
    """The prior's artifact as this backup lists it (same key and digests; the file's
    metadata as seen now)."""
    doc = record.model_dump()
    doc["meta"] = {
        **doc["meta"],
        "path": path,
        "size": size,
        "mtime_ns": mtime_ns,
        "mode": mode,
        "stored_by": owner_of(record),
    }
    return Artifact.model_validate(doc)


def referenced_source(source: Artifact, path: str) -> Artifact:
    """An earlier backup's blocks artifact as this backup lists it (a block map of
    ``path`` names it)."""
    doc = source.model_dump()
    doc["meta"] = {**doc["meta"], "path": path, "stored_by": owner_of(source)}
    return Artifact.model_validate(doc)


def chain_details(choice: Choice, artifacts: list[Artifact], backup_id: str) -> dict[str, Any]:
    """The manifest fields a chain needs: type, prior, every backup it references."""
    owners = sorted({owner_of(a) for a in artifacts} - {backup_id, ""})
    out: dict[str, Any] = {"backup_type": choice.backup_type}
    if choice.prior is None:
        out["full_reason"] = choice.reason
        return out
    prior = choice.prior.manifest
    full = prior.backup_id if prior.details.get("backup_type") == "full" else None
    out["base_backup_id"] = prior.backup_id
    out["full_backup_id"] = full or prior.details.get("full_backup_id")
    out["depends_on"] = sorted({prior.backup_id, *owners})
    return out


def check_chain(repo: Repository, manifest: Manifest) -> list[Manifest]:
    """Refuse (``NotFound`` / ``IntegrityError``) a files backup whose chain is not whole:
    a backup it depends on missing or untrusted, an artifact outside the folders of the
    chain, or missing or of another size. Returns the loaded parents."""
    catalog = Catalog(repo)
    parents: list[Manifest] = []
    ids = parents_of(manifest)
    for parent in ids:
        try:
            loaded = catalog.load(ENGINE, manifest.target, parent)
        except NotFound:
            raise NotFound(
                f"the chain of backup {manifest.backup_id} is broken: backup {parent} it "
                "depends on is not in the catalog (deleted or pruned)"
            ) from None
        except IntegrityError as exc:
            raise IntegrityError(
                f"the chain of backup {manifest.backup_id} is broken: backup {parent} it "
                f"depends on is not trusted ({exc})"
            ) from None
        if loaded.kind != KIND:
            raise IntegrityError(f"backup {parent} in the chain is not a files backup")
        parents.append(loaded)
    prefixes = {
        bid: data_prefix(ENGINE, manifest.target, bid) for bid in (manifest.backup_id, *ids)
    }
    sizes: dict[str, dict[str, int]] = {}
    for artifact in manifest.artifacts:
        owner = next((b for b, p in prefixes.items() if inside(artifact.key, p)), None)
        if owner is None:
            raise IntegrityError(
                f"backup {manifest.backup_id} lists {artifact.key[:200]!r}, outside the "
                "folders of its chain"
            )
        if owner not in sizes:
            sizes[owner] = {i.key: i.size for i in repo.list(prefixes[owner])}
        found = sizes[owner].get(artifact.key)
        if found is None:
            raise NotFound(
                f"the chain of backup {manifest.backup_id} is broken: {artifact.name!r} "
                f"(stored by backup {owner}) is missing at {artifact.key}"
            )
        if found != artifact.stored_size:
            raise IntegrityError(
                f"{artifact.key} has {found} bytes, backup {manifest.backup_id} says "
                f"{artifact.stored_size}"
            )
    return parents
