"""An S3 (or S3-compatible) bucket as a backup repository.

Why this module: ``S3Repository`` is what the rest of strongroom opens (from a
``RepositoryConfig``, a boto3 client or prefect-aws blocks), with the plain
object verbs (put, get, head, list, delete) and the resuming reader. Its other
parts live beside it:

* ``s3_client``: client construction, retries, error translation (messages
  name the bucket, prefix and key, never the secret key);
* ``s3_multipart``: the streamed, bounded-memory multipart upload and the
  cleanup of incomplete uploads;
* ``s3_versions``: object versions, object lock / retention, bucket settings.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, BinaryIO

from botocore.exceptions import (
    ClientError,
    HTTPClientError,
    IncompleteReadError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from strongroom.config import RepositoryConfig
from strongroom.errors import (
    Conflict,
    IntegrityError,
    InvalidInput,
    NotFound,
    ServiceUnavailable,
    StrongroomError,
)
from strongroom.repository.base import (
    ObjectInfo,
    ObjectWriter,
    Repository,
    StorageSettings,
    too_large,
)
from strongroom.repository.s3_client import (
    check_list_prefix,
    content_md5,
    error_code,
    http_status,
    normalise_prefix,
    s3_client_from_aws_credentials,
    s3_client_from_config,
)
from strongroom.repository.s3_multipart import S3Multipart, S3ObjectWriter
from strongroom.repository.s3_versions import ObjectVersion, S3Versions
from strongroom.repository.throttle import RateLimit, ThrottledWriter, throttled_reader
from strongroom.signing import Trust

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from prefect_aws import AwsCredentials, S3Bucket

__all__ = [
    "ObjectVersion",
    "S3ObjectWriter",
    "S3Repository",
    "s3_client_from_aws_credentials",
    "s3_client_from_config",
]

log = logging.getLogger(__name__)


class S3Repository(S3Multipart, S3Versions, Repository):
    """A repository in ``s3://bucket/prefix``.

    ``S3Repository(config)`` builds its own client from ``config`` (botocore only,
    no Prefect import). Use ``from_client`` to hand over an already-built boto3 client,
    or ``from_aws_credentials`` / ``from_s3_bucket`` for prefect-aws blocks.
    """

    def __init__(
        self,
        config: RepositoryConfig,
        *,
        client: S3Client | None = None,
        conditional_writes: bool = True,
        retry_wait_initial: float = 0.5,
        retry_wait_max: float = 20.0,
        secrets: list[str] | None = None,
        trust: Trust | None = None,
    ) -> None:
        """``conditional_writes=False`` is for S3-compatible servers that ignore
        ``If-None-Match``: ``put_bytes(overwrite=False)`` then checks with HEAD
        first, which is racy (see ``put_bytes``). ``secrets`` are extra strings
        to scrub from any message (e.g. a secret held by a handed-over client).
        ``trust``: the keys readers trust and the signer (default: ``config.trust()``).
        """
        if not config.bucket:
            raise InvalidInput("an S3 repository needs a bucket name")
        self.config = config
        self.trust = trust if trust is not None else config.trust()
        self.bucket: str = config.bucket
        self.root = normalise_prefix(config.prefix)
        self._conditional_writes = conditional_writes
        self._max_attempts = max(1, config.max_attempts)
        self._wait_initial = retry_wait_initial
        self._wait_max = retry_wait_max
        self._secrets = [s for s in [*config.secrets(), *(secrets or [])] if s]
        self._client: S3Client = client if client is not None else s3_client_from_config(config)
        rate = config.max_bytes_per_second
        self.rate_limit = RateLimit(rate) if rate else None

    # ----------------------------------------------------------------- builders

    @classmethod
    def from_client(cls, client: S3Client, config: RepositoryConfig, **kwargs: Any) -> S3Repository:
        """Use an already-built boto3 S3 client (its own retry settings also apply)."""
        return cls(config, client=client, **kwargs)

    @classmethod
    def from_aws_credentials(
        cls, credentials: AwsCredentials, config: RepositoryConfig, **kwargs: Any
    ) -> S3Repository:
        """Client from a prefect-aws ``AwsCredentials``/``MinIOCredentials`` block."""
        client = s3_client_from_aws_credentials(
            credentials, endpoint_url=config.endpoint_url, region=config.region
        )
        secret = getattr(credentials, "aws_secret_access_key", None) or getattr(
            credentials, "minio_root_password", None
        )
        extra = [secret.get_secret_value()] if secret is not None else []
        return cls(config, client=client, secrets=extra, **kwargs)

    @classmethod
    def from_s3_bucket(
        cls, bucket: S3Bucket, config: RepositoryConfig | None = None, **kwargs: Any
    ) -> S3Repository:
        """From a prefect-aws ``S3Bucket`` block: its bucket name and ``bucket_folder``
        (used as prefix unless ``config.prefix`` is set) and its credentials.
        Protection settings (SSE, object lock, part size) come from ``config``.
        """
        base = config or RepositoryConfig(kind="s3")
        creds = bucket.credentials
        params = getattr(creds, "aws_client_parameters", None)
        merged = base.model_copy(
            update={
                "kind": "s3",
                "bucket": bucket.bucket_name,
                "prefix": base.prefix or bucket.bucket_folder or "",
                "endpoint_url": base.endpoint_url
                or (params.endpoint_url if params is not None else None),
            }
        )
        return cls.from_aws_credentials(creds, merged, **kwargs)  # type: ignore[arg-type]

    # ------------------------------------------------------------ object verbs

    def _put_object(
        self,
        key: str,
        body: io.BytesIO,
        extra: dict[str, Any],
        *,
        if_none_match: bool = False,
        on_conflict_retry: Callable[[], bool] | None = None,
    ) -> None:
        full = self._full(key)
        md5 = content_md5(body)
        cond: dict[str, Any] = {"IfNoneMatch": "*"} if if_none_match else {}

        def put(attempt: int) -> None:
            body.seek(0)
            try:
                self._client.put_object(
                    Bucket=self.bucket, Key=full, Body=body, ContentMD5=md5, **cond, **extra
                )
            except ClientError as exc:
                # A retried conditional put whose first try actually landed (the answer
                # was lost) sees its own object: not a conflict if the bytes are ours.
                if (
                    attempt > 1
                    and (error_code(exc) == "PreconditionFailed" or http_status(exc) == 412)
                    and on_conflict_retry is not None
                    and on_conflict_retry()
                ):
                    return
                raise

        self._call("PutObject", put, key=key)

    def open_write(self, key: str, settings: StorageSettings | None = None) -> ObjectWriter:
        self._full(key)
        writer = S3ObjectWriter(self, key, self._object_args(settings))
        return writer if self.rate_limit is None else ThrottledWriter(writer, self.rate_limit)

    def open_read(self, key: str) -> BinaryIO:
        reader = io.BufferedReader(_S3Reader(self, key), buffer_size=1024 * 1024)
        return reader if self.rate_limit is None else throttled_reader(reader, self.rate_limit)

    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        overwrite: bool = False,
        settings: StorageSettings | None = None,
    ) -> None:
        self._full(key)
        extra = self._object_args(settings)
        body = io.BytesIO(data)
        if overwrite:
            self._put_object(key, body, extra)
            return
        if not self._conditional_writes:
            # Fallback for servers without conditional writes. RACE: another writer
            # can create the key between this HEAD and the PUT below, and the PUT then
            # silently replaces it. Only safe with a single writer per key.
            if self.exists(key):
                raise Conflict(f"object {key!r} already exists in {self.describe()}")
            self._put_object(key, body, extra)
            return

        def ours() -> bool:
            try:
                return self.get_bytes(key) == data
            except StrongroomError:
                return False

        # If-None-Match: '*' makes S3 itself refuse to replace an existing key
        # (412 PreconditionFailed), so two concurrent writers cannot both succeed.
        self._put_object(key, body, extra, if_none_match=True, on_conflict_retry=ours)

    def get_bytes(self, key: str, *, max_size: int | None = None) -> bytes:
        full = self._full(key)

        def get(_attempt: int) -> bytes:
            resp = self._client.get_object(Bucket=self.bucket, Key=full)
            with resp["Body"] as stream:
                length = int(resp.get("ContentLength") or 0)
                if max_size is None:
                    return stream.read()
                if length > max_size:
                    raise too_large(key, length, max_size)
                data = stream.read(max_size + 1)
                if len(data) > max_size:
                    raise too_large(key, len(data), max_size)
                return data

        return self._call("GetObject", get, key=key)

    def head(self, key: str, version_id: str | None = None) -> dict[str, Any] | None:
        """HeadObject of ``key`` (or of one version); None when absent or a delete marker."""
        full = self._full(key)
        version: dict[str, Any] = {"VersionId": version_id} if version_id else {}

        def head(_attempt: int) -> dict[str, Any] | None:
            try:
                return dict(self._client.head_object(Bucket=self.bucket, Key=full, **version))
            except ClientError as exc:
                # HEAD has no body: a 404 here is "no such key" (or, indistinguishably,
                # no such bucket).
                if http_status(exc) == 404 or error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                    return None
                # HEAD of a delete marker's version id answers 405 Method Not Allowed.
                if version_id and (http_status(exc) == 405 or error_code(exc) == "405"):
                    return None
                raise

        return self._call("HeadObject", head, key=key)

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def size(self, key: str) -> int:
        head = self.head(key)
        if head is None:
            raise NotFound(f"object {key!r} not found in {self.describe()}")
        return int(head["ContentLength"])

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        check_list_prefix(prefix)
        full_prefix = f"{self.root}/{prefix}" if self.root else prefix
        token: str | None = None
        while True:
            args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full_prefix}
            if token:
                args["ContinuationToken"] = token

            def page(_attempt: int, args: dict[str, Any] = args) -> dict[str, Any]:
                return dict(self._client.list_objects_v2(**args))

            resp = self._call("ListObjectsV2", page)
            for obj in resp.get("Contents", []):
                full_key = str(obj["Key"])
                if full_key.endswith("/"):  # folder markers made by consoles
                    continue
                yield ObjectInfo(
                    key=self._relative(full_key),
                    size=int(obj["Size"]),
                    modified=obj["LastModified"].astimezone(dt.UTC),
                )
            if not resp.get("IsTruncated"):
                return
            token = resp.get("NextContinuationToken")
            if not token:
                return

    def delete(self, key: str) -> None:
        """Delete ``key``. In a versioned bucket this adds a delete marker; locked
        versions stay until their retention ends."""
        full = self._full(key)

        def delete(_attempt: int) -> None:
            self._client.delete_object(Bucket=self.bucket, Key=full)

        self._call("DeleteObject", delete, key=key)


class _S3Reader(io.RawIOBase):
    """A GetObject body that resumes with a Range request after a dropped connection.

    The resumed request carries ``If-Match`` with the first response's ETag, so a
    replaced object is detected instead of being spliced.
    """

    def __init__(self, repo: S3Repository, key: str) -> None:
        super().__init__()
        self._repo = repo
        self._key = key
        self._full = repo._full(key)
        self._pos = 0
        self._resumes = 0
        resp = self._get(None)
        self._etag = str(resp["ETag"])
        self._length = int(resp["ContentLength"])
        self._body: Any = resp["Body"]

    def _get(self, start: int | None) -> dict[str, Any]:
        repo = self._repo
        args: dict[str, Any] = {"Bucket": repo.bucket, "Key": self._full}
        if start is not None:
            args["Range"] = f"bytes={start}-"
            args["IfMatch"] = self._etag

        def get(_attempt: int) -> dict[str, Any]:
            return dict(repo._client.get_object(**args))

        try:
            return repo._call("GetObject", get, key=self._key)
        except Conflict as exc:  # 412 on If-Match
            raise IntegrityError(
                f"object {self._key!r} in {repo.describe()} changed while it was read"
            ) from exc

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        view = memoryview(buffer).cast("B")
        if not view or self._pos >= self._length:
            return 0
        while True:
            try:
                n = int(self._body.readinto(view))
            except (HTTPClientError, BotoConnectionError, IncompleteReadError) as exc:
                if self._resumes + 1 >= self._repo._max_attempts:
                    raise ServiceUnavailable(
                        f"reading {self._key!r} from {self._repo.describe()} failed at byte "
                        f"{self._pos} of {self._length} after {self._resumes + 1} "
                        f"attempt(s): {type(exc).__name__}"
                    ) from exc
                self._resumes += 1
                log.warning(
                    "reading %s from %s: connection dropped at byte %d, resuming",
                    self._key,
                    self._repo.describe(),
                    self._pos,
                )
                self._body.close()
                self._body = self._get(self._pos)["Body"]
                continue
            self._pos += n
            return n

    def close(self) -> None:
        if not self.closed:
            body = getattr(self, "_body", None)
            try:
                if body is not None:
                    body.close()
            finally:
                super().close()
