"""Object versions, object lock and retention, and bucket protection for S3 repositories.

Why a module of its own: what makes a repository tamper-resistant (versioning,
object-lock retention on every object, the bucket settings an audit reads) and
what retention needs to purge for good (listing and deleting single versions)
is a concern of its own, apart from moving bytes.

* Objects written under ``config.lock_mode`` carry ``ObjectLockMode`` and a
  retain-until date (per object, or ``config.retention_days`` from now).
* Some S3-compatible servers (and moto) drop the lock headers of a multipart
  upload; ``_ensure_retention`` checks and sets the retention afterwards.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from strongroom.errors import InvalidInput, Unsupported
from strongroom.repository.base import StorageSettings
from strongroom.repository.s3_client import S3Calls, check_list_prefix, error_code

log = logging.getLogger(__name__)

_NOT_CONFIGURED_CODES = frozenset(
    {
        "NoSuchPublicAccessBlockConfiguration",
        "ObjectLockConfigurationNotFoundError",
        "ServerSideEncryptionConfigurationNotFoundError",
    }
)

# The bucket settings an audit reads, and the request that reads each.
BUCKET_APIS: dict[str, str] = {
    "versioning": "GetBucketVersioning",
    "object_lock": "GetObjectLockConfiguration",
    "encryption": "GetBucketEncryption",
    "public_access_block": "GetPublicAccessBlock",
}
_BUCKET_FIELDS: dict[str, str | None] = {
    "versioning": None,
    "object_lock": "ObjectLockConfiguration",
    "encryption": "ServerSideEncryptionConfiguration",
    "public_access_block": "PublicAccessBlockConfiguration",
}


@dataclass(frozen=True)
class ObjectVersion:
    """One version of an object in a versioned bucket, or a delete marker."""

    key: str  # relative to the repository's prefix
    version_id: str
    delete_marker: bool


class S3Versions(S3Calls):
    """Lock, retention and version requests of ``S3Repository`` (one of its bases)."""

    def _retain_until(self, settings: StorageSettings | None) -> dt.datetime:
        now = dt.datetime.now(dt.UTC)
        if settings is not None and settings.retain_until is not None:
            until = settings.retain_until
            if until.tzinfo is None:  # naive datetimes are taken as UTC
                until = until.replace(tzinfo=dt.UTC)
        elif self.config.retention_days > 0:
            until = now + dt.timedelta(days=self.config.retention_days)
        else:
            raise InvalidInput(
                f"{self.describe()}: lock_mode {self.config.lock_mode} needs retention_days > 0 "
                "or a retain_until date for each object"
            )
        if until <= now:
            raise InvalidInput(f"retain_until {until.isoformat()} is not in the future")
        return until

    def _object_args(self, settings: StorageSettings | None) -> dict[str, Any]:
        """SSE and object-lock parameters for PutObject/CreateMultipartUpload."""
        args: dict[str, Any] = {}
        if self.config.sse == "AES256":
            args["ServerSideEncryption"] = "AES256"
        elif self.config.sse == "aws:kms":
            args["ServerSideEncryption"] = "aws:kms"
            if self.config.kms_key_id:
                args["SSEKMSKeyId"] = self.config.kms_key_id
        if self.config.lock_mode:
            args["ObjectLockMode"] = self.config.lock_mode
            args["ObjectLockRetainUntilDate"] = self._retain_until(settings)
        elif settings is not None and settings.retain_until is not None:
            log.debug("%s: no lock_mode configured, retain_until ignored", self.describe())
        return args

    def _head(self, key: str, version_id: str | None = None) -> dict[str, Any]:
        full = self._full(key)
        version: dict[str, Any] = {"VersionId": version_id} if version_id else {}

        def head(_attempt: int) -> dict[str, Any]:
            return dict(self._client.head_object(Bucket=self.bucket, Key=full, **version))

        return self._call("HeadObject", head, key=key)

    def _put_retention(
        self, key: str, mode: Any, until: dt.datetime, version_id: str | None = None
    ) -> None:
        full = self._full(key)
        version: dict[str, Any] = {"VersionId": version_id} if version_id else {}

        def retain(_attempt: int) -> None:
            self._client.put_object_retention(
                Bucket=self.bucket,
                Key=full,
                Retention={"Mode": mode, "RetainUntilDate": until},
                **version,
            )

        self._call("PutObjectRetention", retain, key=key)

    def _ensure_retention(self, key: str, version_id: str | None, extra: dict[str, Any]) -> None:
        """Check that a multipart object carries its lock; set it if the server
        dropped the CreateMultipartUpload lock headers (some S3-compatible servers,
        and moto, do). On AWS this costs one HEAD."""
        found = self._head(key, version_id)
        if found.get("ObjectLockMode") and found.get("ObjectLockRetainUntilDate"):
            return
        log.warning(
            "%s/%s: the server did not apply the object lock of the multipart upload; "
            "setting the retention now",
            self.describe(),
            key,
        )
        self._put_retention(
            key, extra["ObjectLockMode"], extra["ObjectLockRetainUntilDate"], version_id
        )

    def apply_lock(self, key: str, settings: StorageSettings | None) -> bool:
        """Put the repository's object lock (``lock_mode``, retain-until) on an object
        written by someone else (a ClickHouse server's native BACKUP). False when the
        repository has no lock mode (nothing to apply)."""
        if not self.config.lock_mode:
            return False
        self._put_retention(key, self.config.lock_mode, self._retain_until(settings))
        return True

    def extend_lock(self, key: str, settings: StorageSettings | None) -> dt.datetime | None:
        """Lengthen an existing object's lock to this backup's retain-until, never shorten
        it (an incremental references artifacts an older backup stored: they must stay
        locked as long as the newest manifest listing them). Returns the new retain-until,
        or None when nothing changed (no lock mode, or already locked long enough)."""
        if not self.config.lock_mode:
            return None
        until = self._retain_until(settings)
        current = self._head(key).get("ObjectLockRetainUntilDate")
        if isinstance(current, dt.datetime) and current >= until:
            return None
        self._put_retention(key, self.config.lock_mode, until)
        return until

    def delete_version(self, key: str, version_id: str) -> None:
        """Delete one version (or delete marker) of ``key`` for good; locked ones are refused."""
        full = self._full(key)

        def delete(_attempt: int) -> None:
            self._client.delete_object(Bucket=self.bucket, Key=full, VersionId=version_id)

        self._call("DeleteObject", delete, key=key)

    def bucket_versioning(self) -> str | None:
        """The bucket's versioning status: "Enabled", "Suspended", or None (never enabled)."""

        def get(_attempt: int) -> dict[str, Any]:
            return dict(self._client.get_bucket_versioning(Bucket=self.bucket))

        status = self._call("GetBucketVersioning", get).get("Status")
        return str(status) if status else None

    def _versions(self, full_prefix: str, *, key: str | None) -> Iterator[ObjectVersion]:
        """ListObjectVersions under a full (prefixed) key prefix, page by page."""
        markers: dict[str, Any] = {}
        while True:
            args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full_prefix, **markers}

            def page(_attempt: int, args: dict[str, Any] = args) -> dict[str, Any]:
                return dict(self._client.list_object_versions(**args))

            resp = self._call("ListObjectVersions", page, key=key)
            for v in resp.get("Versions", []):
                yield ObjectVersion(self._relative(str(v["Key"])), str(v["VersionId"]), False)
            for m in resp.get("DeleteMarkers", []):
                yield ObjectVersion(self._relative(str(m["Key"])), str(m["VersionId"]), True)
            if not resp.get("IsTruncated"):
                return
            markers = {
                "KeyMarker": resp.get("NextKeyMarker", ""),
                "VersionIdMarker": resp.get("NextVersionIdMarker", ""),
            }

    def object_versions(self, key: str) -> list[ObjectVersion]:
        """Every version and delete marker of exactly ``key``."""
        full = self._full(key)
        return [v for v in self._versions(full, key=key) if v.key == key]

    def list_versions(self, prefix: str) -> Iterator[ObjectVersion]:
        """Every version and delete marker of the objects whose key starts with ``prefix``."""
        check_list_prefix(prefix)
        full_prefix = f"{self.root}/{prefix}" if self.root else prefix
        return self._versions(full_prefix, key=None)

    def bucket_setting(self, name: str) -> Any:
        """One bucket protection setting, from its own request (``BUCKET_APIS[name]``):
        ``versioning`` ({"Status", "MFADelete"}), ``object_lock``
        (ObjectLockConfiguration), ``encryption`` (ServerSideEncryptionConfiguration),
        ``public_access_block`` (PublicAccessBlockConfiguration). None when not
        configured; raises ``Unsupported`` (not retried) when the store lacks the API."""
        api = BUCKET_APIS[name]
        bucket = self.bucket
        fetch: dict[str, Callable[[], Any]] = {
            "versioning": lambda: self._client.get_bucket_versioning(Bucket=bucket),
            "object_lock": lambda: self._client.get_object_lock_configuration(Bucket=bucket),
            "encryption": lambda: self._client.get_bucket_encryption(Bucket=bucket),
            "public_access_block": lambda: self._client.get_public_access_block(Bucket=bucket),
        }
        field = _BUCKET_FIELDS[name]

        def run(_attempt: int) -> Any:
            try:
                answer = dict(fetch[name]())
            except ClientError as exc:
                if error_code(exc) in _NOT_CONFIGURED_CODES:
                    return None
                raise
            if field is None:  # versioning: the answer itself
                return {k: answer.get(k) for k in ("Status", "MFADelete")}
            value = answer.get(field)
            return dict(value) if isinstance(value, dict) else value

        return self._call(api, run)

    def bucket_settings(self) -> dict[str, Any]:
        """The bucket's protection, for audits, each setting asked on its own. Each entry
        is None when not configured: ``versioning`` ("Enabled"/"Suspended"),
        ``mfa_delete``, ``object_lock``, ``encryption``, ``public_access_block``;
        ``unsupported`` maps a setting whose API the store lacks to the API's name."""
        found: dict[str, Any] = {}
        unsupported: dict[str, str] = {}
        for name in BUCKET_APIS:
            try:
                found[name] = self.bucket_setting(name)
            except Unsupported as exc:
                found[name] = None
                unsupported[name] = exc.api
        versioning = found.pop("versioning") or {}
        return {
            "versioning": versioning.get("Status"),
            "mfa_delete": versioning.get("MFADelete"),
            **found,
            "unsupported": unsupported,
        }
