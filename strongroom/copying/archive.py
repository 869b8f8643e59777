"""Copying the WAL archive and the evidence records.

WAL (``wal/<target>/<timeline>/<name>``: segments, ``.partial``, ``.history``,
``.backup``): a key must be exactly ``wal_key(target, name)`` for a valid WAL file
name; the object's first line (``SRWAL1 <name> ...``, ``engines.postgres.wal.store``)
must name the same file, checked before any byte is written. An object already at the
destination is kept when its size and first line (which holds the SHA-256 of its
frame) are the same; a different ``.partial`` (the receiver's growing segment) is
replaced by a source one that is at least as long; any other difference is refused.
The copy holds no decryption key, so the frame itself is checked at fetch time.

Evidence (``audit/``, ``drills/``, ``verifications/``, ``pins/``, ``pitr/``,
``reports/compliance/``): signed records, each read whole (capped at
``MAX_RECORD_SIZE``) and copied with its ``.sig`` only when it is signed by a key the
source trusts and the destination trusts too. Unsigned or wrongly signed records are
refused (reported), never spread. A pin (replaced in place by design) that differs is
replaced; any other record that differs is refused.

Both keep the destination's own object lock: retain-until is the source object's time
plus the destination's ``retention_days`` (the same on every run, so a resumed copy
ends with the same locks as an uninterrupted one).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from strongroom.config import RepositoryConfig
from strongroom.copying.report import CopyReport
from strongroom.copying.stream import Expected, copy_object
from strongroom.engines.postgres.wal import names
from strongroom.engines.postgres.wal.store import parse_header, read_stored_header, wal_key
from strongroom.errors import (
    AccessDenied,
    Conflict,
    IntegrityError,
    NotFound,
    ServiceUnavailable,
    StrongroomError,
)
from strongroom.ids import check_name
from strongroom.repository.base import ObjectInfo, Repository, StorageSettings, check_key
from strongroom.signing import SIG_SUFFIX, get_verified, sig_key

EVIDENCE_PREFIXES = ("audit/", "drills/", "verifications/", "pins/", "pitr/", "reports/")
REPLACEABLE_EVIDENCE = ("pins/",)
_STORAGE_DOWN = (ServiceUnavailable, AccessDenied)


def lock_for(config: RepositoryConfig, when: dt.datetime, now: dt.datetime) -> StorageSettings:
    """The destination's lock for an object the source stored at ``when``."""
    if not config.retention_days:
        return StorageSettings()
    until = when.astimezone(dt.UTC) + dt.timedelta(days=config.retention_days)
    return StorageSettings(retain_until=until) if until > now else StorageSettings()


def _parallel(jobs: int, items: Iterable[ObjectInfo], work: Callable[[ObjectInfo], None]) -> None:
    with ThreadPoolExecutor(max(1, jobs), thread_name_prefix="copy") as pool:
        for _ in pool.map(work, items):
            pass


def wal_objects(
    source: Repository, report: CopyReport, target: str | None, since: dt.datetime | None
) -> list[tuple[ObjectInfo, str]]:
    """(object, WAL file name) to copy; keys that are not WAL keys are refused."""
    prefix = f"wal/{check_name(target, 'target name')}/" if target else "wal/"
    found = []
    for info in source.list(prefix):
        parts = info.key.split("/")
        try:
            check_key(info.key)
            if len(parts) != 4:
                raise IntegrityError("not wal/<target>/<timeline>/<name>")
            check_name(parts[1], "target name")
            if wal_key(parts[1], parts[3]) != info.key:
                raise IntegrityError(f"not the key of WAL file {parts[3]}")
        except (StrongroomError, names.WalNameError) as exc:
            report.add("wal", info.key[:200], "refused", 0, f"not a WAL key: {exc}"[:300])
            continue
        if since is not None and info.modified < since:
            continue
        found.append((info, parts[3]))
    return found


class ArchiveCopier:
    """Copies WAL objects and evidence records into ``report``."""

    def __init__(
        self,
        source: Repository,
        destination: Repository,
        destination_config: RepositoryConfig,
        report: CopyReport,
        *,
        jobs: int = 4,
        now: dt.datetime | None = None,
    ) -> None:
        self.source = source
        self.destination = destination
        self.config = destination_config
        self.report = report
        self.jobs = jobs
        self.now = now or dt.datetime.now(dt.UTC)

    # ------------------------------------------------------------------------- WAL

    def copy_wal(self, target: str | None = None, since: dt.datetime | None = None) -> None:
        items = wal_objects(self.source, self.report, target, since)
        by_key = {info.key: name for info, name in items}
        _parallel(self.jobs, [info for info, _ in items], lambda i: self._wal(i, by_key[i.key]))

    def _wal(self, info: ObjectInfo, name: str) -> None:
        key = info.key
        try:
            action = self._wal_plan(info, name)
            if action == "skip":
                self.report.add("wal", key, "skipped", info.size, "identical")
                return

            def check_head(chunk: bytes) -> None:
                header = parse_header(chunk)
                if header.name != name:
                    raise IntegrityError(f"WAL object {key} holds {header.name[:40]!r}: refused")

            copied = copy_object(
                self.source,
                self.destination,
                key,
                expected=Expected(size=info.size),
                settings=lock_for(self.config, info.modified, self.now),
                check_head=check_head,
            )
        except _STORAGE_DOWN:
            raise
        except StrongroomError as exc:
            self.report.add("wal", key, "refused", 0, str(exc)[:500])
            return
        self.report.add("wal", key, "copied", copied.size, action)

    def _wal_plan(self, info: ObjectInfo, name: str) -> str:
        """'skip', 'new' or 'replace' (a shorter ``.partial``); raises to refuse."""
        try:
            size = self.destination.size(info.key)
        except NotFound:
            return "new"
        theirs = read_stored_header(self.destination, info.key)
        ours = read_stored_header(self.source, info.key)
        if size == info.size and (theirs.name, theirs.raw_size, theirs.frame_sha256) == (
            ours.name,
            ours.raw_size,
            ours.frame_sha256,
        ):
            return "skip"
        if names.kind(name) == "partial" and ours.raw_size >= theirs.raw_size:
            return "replace"
        raise Conflict(
            f"{self.destination.describe()} holds a different WAL object at {info.key}; "
            "it is never overwritten"
        )

    # -------------------------------------------------------------------- evidence

    def evidence_objects(self, since: dt.datetime | None) -> list[ObjectInfo]:
        found = []
        for prefix in EVIDENCE_PREFIXES:
            for info in self.source.list(prefix):
                if info.key.endswith(SIG_SUFFIX):
                    continue
                if since is not None and info.modified < since:
                    continue
                found.append(info)
        return found

    def copy_evidence(self, since: dt.datetime | None = None) -> None:
        _parallel(self.jobs, self.evidence_objects(since), self._evidence)

    def _evidence(self, info: ObjectInfo) -> None:
        key = info.key
        try:
            check_key(key)
            data, verdict = get_verified(self.source, key, strict=False)
            if not verdict.trusted:
                self.report.add("evidence", key, "refused", 0, verdict.message("record"))
                return
            if verdict.key_id is None or self.destination.trust.public_key(verdict.key_id) is None:
                self.report.add(
                    "evidence",
                    key,
                    "refused",
                    0,
                    f"{self.destination.describe()} does not trust its signer {verdict.key_id}",
                )
                return
            signature = self.source.get_bytes(sig_key(key))
            if self.source.trust.check(key, data, signature, verdict.key_id).status != "trusted":
                raise IntegrityError(f"{key}: its signature changed while it was copied")
            try:
                existing: bytes | None = self.destination.get_bytes(key, max_size=len(data))
            except (NotFound, IntegrityError):
                existing = None if not self.destination.exists(key) else b""
            settings = lock_for(self.config, info.modified, self.now)
            if existing == data:
                self.report.add("evidence", key, "skipped", len(data), "identical")
                return
            replace = existing is not None
            if replace and not key.startswith(REPLACEABLE_EVIDENCE):
                raise Conflict(
                    f"{self.destination.describe()} holds a different record at {key}; it is "
                    "never overwritten"
                )
            self.destination.put_bytes(sig_key(key), signature, overwrite=True, settings=settings)
            self.destination.put_bytes(key, data, overwrite=replace, settings=settings)
        except _STORAGE_DOWN:
            raise
        except StrongroomError as exc:
            self.report.add("evidence", key, "refused", 0, str(exc)[:500])
            return
        self.report.add("evidence", key, "copied", len(data), "replaced" if replace else "")
