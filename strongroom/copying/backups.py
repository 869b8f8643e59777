"""Copying backups: signed manifests checked first, artifacts streamed and verified,
the manifest written last at the destination.

For each backup (oldest first, the backups an incremental builds on before it):

1. the manifest and its ``.sig`` are read once from the source (capped at
   ``MAX_RECORD_SIZE``) and the signature is checked against the source's trusted keys
   before anything it names is read; it must be stored under its own name and the
   destination must trust its signer too (otherwise nothing could restore the copy);
2. every artifact key must lie inside ``data/<engine>/<target>/`` (``check_key`` and
   ``catalog.inside``): a hostile manifest cannot make the copy read or write elsewhere;
3. each artifact is streamed (``stream.copy_object``) and committed only when its size
   and SHA-256 match the signed manifest; one already at the destination is kept when it
   is identical (read back and hashed) and refused when it differs (never overwritten);
4. the destination's own object lock applies (``policy.upload.upload_settings`` from
   the destination's config and optional retention policy), never the source's;
   artifacts an incremental references from earlier backups get their locks extended;
5. only when every artifact is committed: the ``.sig`` then the manifest bytes, exactly
   as signed; then the copy records (``records``) in the destination and the source.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from strongroom.artifacts import extend_locks
from strongroom.catalog import Artifact, Manifest, inside, manifest_key, owner_of, parents_of
from strongroom.config import RepositoryConfig
from strongroom.copying.records import CopyRecord, copy_record_key, write_copy_record
from strongroom.copying.report import CopyReport
from strongroom.copying.stream import Expected, copy_object, same_object
from strongroom.errors import (
    AccessDenied,
    IntegrityError,
    NotFound,
    ServiceUnavailable,
    StrongroomError,
)
from strongroom.policy.retention import RetentionPolicy
from strongroom.policy.upload import upload_settings
from strongroom.repository.base import Repository, StorageSettings, check_key
from strongroom.seal import parse_document
from strongroom.signing import MAX_RECORD_SIZE, SIGNATURE_SIZE, sig_key

_STORAGE_DOWN = (ServiceUnavailable, AccessDenied)
PolicyFor = Callable[[str, str], RetentionPolicy]


@dataclass(frozen=True)
class SourceBackup:
    """A manifest as read (and checked) from the source: its bytes, signature, model."""

    key: str
    raw: bytes
    signature: bytes
    manifest: Manifest


def read_signed_manifest(source: Repository, engine: str, target: str, bid: str) -> SourceBackup:
    """The manifest of one backup, its signature checked against ``source.trust`` on the
    very bytes that will be copied; ``IntegrityError`` when it is not trusted."""
    key = manifest_key(engine, target, bid)
    raw = source.get_bytes(key, max_size=MAX_RECORD_SIZE)
    try:
        signature: bytes | None = source.get_bytes(sig_key(key), max_size=SIGNATURE_SIZE)
    except NotFound:
        signature = None
    except IntegrityError:
        signature = b"\0" * (SIGNATURE_SIZE + 1)
    doc = parse_document(raw, key)
    claimed = doc.get("signed_by")
    verdict = source.trust.check(key, raw, signature, claimed if isinstance(claimed, str) else None)
    verdict.require("manifest")
    try:
        manifest = Manifest.model_validate(doc)
    except ValueError as exc:
        raise IntegrityError(f"manifest {key} is malformed: {str(exc)[:300]}") from None
    if manifest_key(manifest.engine, manifest.target, manifest.backup_id) != key:
        raise IntegrityError(f"manifest {key} describes another backup; it is not copied")
    assert signature is not None  # a trusted verdict has one
    return SourceBackup(key, raw, signature, manifest)


def _check_artifact_keys(manifest: Manifest) -> None:
    prefix = f"data/{manifest.engine}/{manifest.target}/"
    for artifact in manifest.artifacts:
        check_key(artifact.key)
        if not inside(artifact.key, prefix):
            raise IntegrityError(
                f"manifest of {manifest.backup_id} names {artifact.key[:120]!r}, outside "
                f"{prefix}: refused"
            )


def destination_settings(
    destination: Repository,
    config: RepositoryConfig,
    manifest: Manifest,
    policy: RetentionPolicy | None,
    now: dt.datetime,
) -> StorageSettings:
    """``policy``: the destination's retention policy for this backup's target (None:
    its ``retention_days`` alone)."""
    """The destination's own lock for the objects of ``manifest`` (a retain-until already
    past falls back to the destination's default: now + its retention days)."""
    settings = upload_settings(
        destination,
        config,
        manifest.engine,
        manifest.target,
        manifest.started_at,
        policy,
        kind=manifest.kind,
    )
    if settings.retain_until is not None and settings.retain_until <= now:
        return StorageSettings()
    return settings


class BackupCopier:
    """Copies whole backups from ``source`` to ``destination`` into ``report``."""

    def __init__(
        self,
        source: Repository,
        destination: Repository,
        destination_config: RepositoryConfig,
        report: CopyReport,
        *,
        policy_for: PolicyFor | None = None,
        jobs: int = 4,
        now: Callable[[], dt.datetime] | None = None,
    ) -> None:
        self.source = source
        self.destination = destination
        self.config = destination_config
        self.report = report
        self.policy_for = policy_for
        self.jobs = max(1, jobs)
        self._now = now or (lambda: dt.datetime.now(dt.UTC))

    def copy(self, backup: SourceBackup) -> bool:
        """Copy one checked backup; True when the destination holds it afterwards."""
        m = backup.manifest
        try:
            self._copy(backup)
        except _STORAGE_DOWN:
            raise
        except StrongroomError as exc:
            self.report.backup(m.engine, m.target, m.backup_id, "failed", str(exc)[:500])
            return False
        return True

    def _copy(self, backup: SourceBackup) -> None:
        m = backup.manifest
        dest = self.destination
        if m.signed_by is None or dest.trust.public_key(m.signed_by) is None:
            raise IntegrityError(
                f"{dest.describe()} does not trust {m.signed_by or 'the signer'} of backup "
                f"{m.backup_id}: add that public key to its trusted_signers, or nothing could "
                "restore the copy"
            )
        _check_artifact_keys(m)
        try:
            existing = dest.get_bytes(backup.key, max_size=MAX_RECORD_SIZE)
        except NotFound:
            existing = None
        if existing is not None:
            if existing != backup.raw:
                raise IntegrityError(
                    f"{dest.describe()} holds a different manifest at {backup.key}; it is "
                    "never overwritten"
                )
            self._records(backup)
            self.report.backup(m.engine, m.target, m.backup_id, "skipped", "already copied")
            return
        policy = self.policy_for(m.engine, m.target) if self.policy_for else None
        settings = destination_settings(dest, self.config, m, policy, self._now())
        with ThreadPoolExecutor(self.jobs, thread_name_prefix="copy") as pool:
            outcomes = list(pool.map(lambda a: self._artifact(a, settings), m.artifacts))
        failed = [why for why in outcomes if why]
        if failed:
            raise IntegrityError(
                f"{len(failed)} artifact(s) not copied, manifest not written: {failed[0]}"
            )
        extend_locks(dest, m.artifacts, m.backup_id, settings)
        # the manifest last: its signature first (as put_signed writes it), then the
        # very bytes that were signed; only now is the backup visible at the destination
        dest.put_bytes(sig_key(backup.key), backup.signature, overwrite=True, settings=settings)
        dest.put_bytes(backup.key, backup.raw, overwrite=False, settings=settings)
        self.report.add("backup", backup.key, "copied", len(backup.raw))
        self._records(backup)
        self.report.backup(
            m.engine, m.target, m.backup_id, "copied", f"{len(m.artifacts)} artifacts"
        )

    def _artifact(self, artifact: Artifact, settings: StorageSettings) -> str:
        """'' when the destination holds the artifact afterwards, else why not."""
        expected = Expected(artifact.stored_size, artifact.stored_sha256)
        key = artifact.key
        try:
            present = same_object(self.destination, key, expected)
            if present is True:
                self.report.add("artifact", key, "skipped", artifact.stored_size, "identical")
                return ""
            if present is False:
                why = f"{self.destination.describe()} holds a different object at {key}"
                self.report.add("artifact", key, "refused", 0, why)
                return why
            copied = copy_object(
                self.source, self.destination, key, expected=expected, settings=settings
            )
        except _STORAGE_DOWN:
            raise
        except StrongroomError as exc:
            self.report.add("artifact", key, "refused", 0, str(exc)[:500])
            return str(exc)
        self.report.add("artifact", key, "copied", copied.size)
        return ""

    def _records(self, backup: SourceBackup) -> None:
        """The copy records, in the destination and the source (each once)."""
        m = backup.manifest
        dest_name = self.destination.describe()
        key = copy_record_key(m.engine, m.target, m.backup_id, dest_name)
        record: CopyRecord | None = None
        for repo in (self.destination, self.source):
            if repo.exists(key):
                continue
            record = record or CopyRecord.for_manifest(
                m, backup.raw, self.source.describe(), dest_name, self._now()
            )
            where = "destination" if repo is self.destination else "source"
            try:
                written = write_copy_record(repo, record)
            except StrongroomError as exc:
                if repo is self.destination:
                    raise
                # a read-only source: the copy stands, only the index there is missing
                self.report.add("record", key, "skipped", 0, f"source: {str(exc)[:200]}")
                continue
            if written is None:
                self.report.add("record", key, "skipped", 0, f"{where} has no signing key")
            else:
                self.report.add("record", key, "copied", 0, where)


def with_parents(
    chosen: list[tuple[str, str, str]],
    all_entries: list[tuple[str, str, str]],
    load: Callable[[tuple[str, str, str]], Manifest | None],
) -> list[tuple[str, str, str]]:
    """``chosen`` plus every backup they build on (same engine/target), oldest first."""
    known = set(all_entries)
    wanted: set[tuple[str, str, str]] = set()
    todo = list(chosen)
    while todo:
        entry = todo.pop()
        if entry in wanted:
            continue
        wanted.add(entry)
        manifest = load(entry)
        if manifest is None:
            continue
        for parent in parents_of(manifest):
            candidate = (entry[0], entry[1], parent)
            if candidate in known:
                todo.append(candidate)
        for artifact in manifest.artifacts:
            owner = owner_of(artifact)
            candidate = (entry[0], entry[1], owner)
            if owner and owner != entry[2] and candidate in known:
                todo.append(candidate)
    return sorted(wanted, key=lambda e: e[2])
