"""Object-lock awareness: read an object's lock before touching it, delete only what
the storage will let go.

S3: the lock state is read with ``HeadObject`` (``ObjectLockMode``,
``ObjectLockRetainUntilDate``, ``ObjectLockLegalHoldStatus``) for every version
of the key (``GetObjectRetention`` is not used: not every S3-compatible server
implements it). In a versioned bucket (object lock implies versioning) a plain
delete only adds a delete marker and leaves the bytes; retention removes every
version by id instead (``purge_versions``), and never sends the governance
bypass header. A local folder has no locks.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING

from strongroom.repository.base import Repository

if TYPE_CHECKING:
    from strongroom.repository.s3 import S3Repository

# A lock ending within this margin counts as still active: clocks differ, and a delete
# the storage refuses (403) must never be attempted on purpose.
CLOCK_MARGIN = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class LockState:
    key: str
    retain_until: dt.datetime | None = None
    mode: str | None = None
    legal_hold: bool = False

    def active(self, now: dt.datetime) -> bool:
        if self.legal_hold:
            return True
        return self.retain_until is not None and self.retain_until > now - CLOCK_MARGIN

    @property
    def until(self) -> dt.datetime:
        """For sorting and reports: a legal hold counts as 'forever'."""
        if self.legal_hold:
            return dt.datetime.max.replace(tzinfo=dt.UTC)
        return self.retain_until or dt.datetime.min.replace(tzinfo=dt.UTC)

    def describe(self) -> str:
        parts = []
        if self.retain_until is not None:
            parts.append(f"{self.mode or 'locked'} until {self.retain_until.isoformat()}")
        if self.legal_hold:
            parts.append("legal hold")
        return ", ".join(parts) or "not locked"


class ObjectStore:
    """Lock inspection and deletion for one repository (no locks: local folders)."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo

    supports_locks = False

    def lock(self, key: str) -> LockState | None:
        """The strongest lock on any version of ``key`` (None: not locked / absent)."""
        return None

    def remove(self, key: str) -> None:
        self.repo.delete(key)


class S3ObjectStore(ObjectStore):
    """Reads locks with HeadObject per version; deletes versions by id when purging."""

    supports_locks = True

    def __init__(self, repo: S3Repository, *, purge_versions: bool = True) -> None:
        super().__init__(repo)
        self._s3 = repo
        self.purge_versions = purge_versions
        self._versioning: bool | None = None

    def versioned(self) -> bool:
        if self._versioning is None:
            status = self._s3.bucket_versioning()
            self._versioning = status in ("Enabled", "Suspended")
        return self._versioning

    def versions(self, key: str) -> list[tuple[str, bool]]:
        """(version id, is delete marker) of every version of ``key``."""
        return [(v.version_id, v.delete_marker) for v in self._s3.object_versions(key)]

    def lock(self, key: str) -> LockState | None:
        s3 = self._s3
        if self.versioned():
            heads = [s3.head(key, vid) for vid, marker in self.versions(key) if not marker]
        else:
            heads = [s3.head(key)]
        best: LockState | None = None
        for head in heads:
            if not head:
                continue
            until = head.get("ObjectLockRetainUntilDate")
            hold = str(head.get("ObjectLockLegalHoldStatus", "")).upper() == "ON"
            if until is None and not hold:
                continue
            if isinstance(until, str):
                until = dt.datetime.fromisoformat(until.replace("Z", "+00:00"))
            state = LockState(
                key=key,
                retain_until=until.astimezone(dt.UTC) if until else None,
                mode=head.get("ObjectLockMode"),
                legal_hold=hold,
            )
            if best is None or state.until > best.until:
                best = state
        return best

    def remove(self, key: str) -> None:
        if not (self.purge_versions and self.versioned()):
            self.repo.delete(key)
            return
        for version_id, _marker in self.versions(key):
            self._s3.delete_version(key, version_id)


def object_store(repo: Repository, *, purge_versions: bool = True) -> ObjectStore:
    from strongroom.repository.s3 import S3Repository

    if isinstance(repo, S3Repository):
        return S3ObjectStore(repo, purge_versions=purge_versions)
    return ObjectStore(repo)
