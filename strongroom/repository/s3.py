"""An S3 (or S3-compatible) bucket as a backup repository.

Design notes:

* Uploads stream through a bounded pipeline: the writer fills one part of
  ``config.part_size`` bytes while a background thread uploads the previous
  one; a queue of depth 1 sits between them, so at most two parts are pending
  (one queued, one on the wire) and peak memory is about three parts.
* Objects smaller than one part go up with a single ``PutObject``. Every
  ``PutObject`` and ``UploadPart`` carries ``Content-MD5`` (accepted by every
  S3 implementation, and what object-lock buckets require).
* Every failure leaves nothing behind: any exception in ``write``/``commit``
  (and the context manager exiting on an exception) aborts the multipart
  upload. ``cleanup_incomplete`` removes uploads left by a killed process.
* Transient errors (connection errors, timeouts, 5xx, throttling) are retried
  with exponential backoff and jitter, at most ``config.max_attempts`` tries in
  all, then raise ``ServiceUnavailable``. Clients this module builds itself
  turn botocore's own retries off so the two do not multiply.
* Error messages name the bucket, prefix and key, never the secret key.
"""

from __future__ import annotations

import base64
import builtins
import datetime as dt
import hashlib
import io
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from strongroom.config import RepositoryConfig
from strongroom.errors import (
    AccessDenied,
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
    check_key,
    too_large,
)
from strongroom.signing import Trust

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from prefect_aws import AwsCredentials, S3Bucket

log = logging.getLogger(__name__)

T = TypeVar("T")

_MASK = "**********"

# Error codes that mean "the credentials or the policy refused this request".
_ACCESS_CODES = frozenset(
    {
        "AccessDenied",
        "AccountProblem",
        "AllAccessDisabled",
        "ExpiredToken",
        "InvalidAccessKeyId",
        "InvalidClientTokenId",
        "InvalidSecurity",
        "InvalidToken",
        "NotSignedUp",
        "SignatureDoesNotMatch",
        "TokenRefreshRequired",
        "UnrecognizedClientException",
    }
)
# Error codes worth another try (botocore's standard retry mode uses the same set).
_TRANSIENT_CODES = frozenset(
    {
        "BandwidthLimitExceeded",
        "ConditionalRequestConflict",  # concurrent conditional writes: retry, then 412
        "EC2ThrottledException",
        "InternalError",
        "LimitExceededException",
        "PriorRequestNotComplete",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "RequestThrottledException",
        "RequestTimeout",
        "RequestTimeoutException",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequestsException",
        "TransactionInProgressException",
    }
)
_NOT_CONFIGURED_CODES = frozenset(
    {
        "NoSuchPublicAccessBlockConfiguration",
        "ObjectLockConfigurationNotFoundError",
        "ServerSideEncryptionConfigurationNotFoundError",
    }
)


@dataclass(frozen=True)
class ObjectVersion:
    """One version of an object in a versioned bucket, or a delete marker."""

    key: str  # relative to the repository's prefix
    version_id: str
    delete_marker: bool


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _is_transient(exc: BaseException) -> bool:
    """Connection trouble, timeouts, 5xx and throttling: worth another try."""
    if isinstance(exc, ClientError):
        status = _status(exc)
        return _code(exc) in _TRANSIENT_CODES or status >= 500 or status == 429
    return isinstance(exc, HTTPClientError | BotoConnectionError | IncompleteReadError)


def _brief(exc: BaseException | None) -> str:
    """A short, secret-free name for an error: the S3 code or the exception type."""
    if isinstance(exc, ClientError):
        return f"{_code(exc) or 'HTTP'} ({_status(exc)})"
    return type(exc).__name__


def _content_md5(buf: io.BytesIO) -> str:
    with buf.getbuffer() as view:
        digest = hashlib.md5(view, usedforsecurity=False).digest()
    return base64.b64encode(digest).decode("ascii")


def _normalise_prefix(prefix: str) -> str:
    root = prefix.strip("/")
    if root:
        check_key(root)
    return root


def _check_list_prefix(prefix: str) -> str:
    """A list prefix is '' or a key, optionally ending with '/' (or a partial last name)."""
    if prefix:
        check_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


def _botocore_config(endpoint_url: str | None) -> Config:
    return Config(
        # tenacity does the retrying (bounded by config.max_attempts): one try here.
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=10,
        read_timeout=120,
        max_pool_connections=16,
        # We send Content-MD5 ourselves; skip botocore's extra default CRC32 pass,
        # which some S3-compatible servers reject.
        request_checksum_calculation="when_required",
        # S3-compatible endpoints (MinIO, moto, Ceph) want path-style addressing.
        s3={"addressing_style": "path"} if endpoint_url else None,
    )


def s3_client_from_aws_credentials(
    credentials: AwsCredentials, *, endpoint_url: str | None = None, region: str | None = None
) -> S3Client:
    """Build an S3 client from a prefect-aws ``AwsCredentials`` (or ``MinIOCredentials``).

    Uses the block's boto3 session and client parameters, with this module's
    botocore settings (single try, timeouts) underneath the block's own ``config``.
    """
    session = credentials.get_boto3_session()
    params: dict[str, Any] = credentials.aws_client_parameters.get_params_override()
    endpoint = params.get("endpoint_url") or endpoint_url
    if endpoint:
        params["endpoint_url"] = endpoint
    ours = _botocore_config(endpoint)
    theirs = params.get("config")
    params["config"] = ours.merge(theirs) if isinstance(theirs, Config) else ours
    region_name = credentials.region_name or region
    if region_name:
        params["region_name"] = region_name
    client: S3Client = session.client("s3", **params)
    return client


def s3_client_from_config(config: RepositoryConfig) -> S3Client:
    """Build an S3 client for ``config`` with botocore directly.

    With no access key in ``config`` botocore's default chain applies (environment,
    shared config, instance/IRSA role). Neither boto3 nor prefect-aws is imported:
    this is the path of ``strongroom-wal`` (PostgreSQL's archive_command), where
    Prefect's import time (seconds) would stall WAL archiving. Blocks go through
    ``S3Repository.from_aws_credentials`` / ``from_s3_bucket`` instead.
    """
    from botocore.session import Session

    session = Session()
    secret = config.secret_access_key.get_secret_value() if config.secret_access_key else None
    client: S3Client = session.create_client(  # type: ignore[assignment]
        "s3",
        region_name=config.region or None,
        endpoint_url=config.endpoint_url or None,
        aws_access_key_id=config.access_key_id or None,
        aws_secret_access_key=secret,
        config=_botocore_config(config.endpoint_url),
    )
    return client


class S3Repository(Repository):
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
        self.root = _normalise_prefix(config.prefix)
        self._conditional_writes = conditional_writes
        self._max_attempts = max(1, config.max_attempts)
        self._wait_initial = retry_wait_initial
        self._wait_max = retry_wait_max
        self._secrets = [s for s in [*config.secrets(), *(secrets or [])] if s]
        self._client: S3Client = client if client is not None else s3_client_from_config(config)

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

    # -------------------------------------------------------------- internals

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.root}" if self.root else f"s3://{self.bucket}"

    def _full(self, key: str) -> str:
        check_key(key)
        return f"{self.root}/{key}" if self.root else key

    def _relative(self, full_key: str) -> str:
        return full_key[len(self.root) + 1 :] if self.root else full_key

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, _MASK)
        return text

    def _endpoint(self) -> str:
        return str(getattr(self._client.meta, "endpoint_url", "") or "the S3 endpoint")

    def _access_key_hint(self) -> str:
        akid = self.config.access_key_id
        if not akid:
            return "(from the default credential chain)"
        return f"{akid[:4]}…" if len(akid) > 8 else "(set)"

    def _translate(
        self, exc: BaseException, *, op: str, key: str | None, attempts: int
    ) -> StrongroomError:
        where = f"{self.describe()}/{key}" if key else self.describe()
        if isinstance(exc, ClientError):
            code, status = _code(exc), _status(exc)
            message = self._scrub(str(exc.response.get("Error", {}).get("Message", "")))[:300]
            detail = f"{code or status}" + (f": {message}" if message else "")
            if code in _ACCESS_CODES or status == 403:
                return AccessDenied(
                    f"S3 refused {op} on {where} ({detail}); check the access key id "
                    f"{self._access_key_hint()}, its secret and the bucket policy"
                )
            if code == "NoSuchBucket":
                return NotFound(f"S3 bucket {self.bucket!r} does not exist ({op})")
            if code in ("NoSuchKey", "NotFound") or (status == 404 and key):
                return NotFound(f"object {key!r} not found in {self.describe()}")
            if code == "NoSuchUpload":
                return NotFound(f"multipart upload for {where} no longer exists ({op})")
            if code == "PreconditionFailed" or status == 412:
                return Conflict(f"object {key!r} already exists in {self.describe()}")
            if _is_transient(exc):
                return ServiceUnavailable(
                    f"S3 {op} on {where} failed after {attempts} attempt(s): {detail}"
                )
            if status == 404:
                return NotFound(f"S3 {op} on {where}: {detail}")
            if 300 <= status < 500:
                return InvalidInput(f"S3 rejected {op} on {where}: {detail}")
            return StrongroomError(f"S3 {op} on {where} failed: {detail}")
        if isinstance(exc, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
            return AccessDenied(
                f"no usable S3 credentials for {self.describe()} ({type(exc).__name__})"
            )
        if isinstance(exc, ParamValidationError):
            return InvalidInput(f"invalid S3 request {op} on {where}: {self._scrub(str(exc))}")
        if _is_transient(exc):
            return ServiceUnavailable(
                f"S3 at {self._endpoint()} unreachable for {op} on {where} after "
                f"{attempts} attempt(s): {self._scrub(str(exc))[:300]}"
            )
        return StrongroomError(f"S3 {op} on {where} failed: {self._scrub(str(exc))[:300]}")

    def _call(
        self,
        op: str,
        fn: Callable[[int], T],
        *,
        key: str | None = None,
    ) -> T:
        """Run ``fn(attempt_number)`` with retries on transient errors, translating errors."""
        attempt = 0

        def once() -> T:
            nonlocal attempt
            attempt += 1
            return fn(attempt)

        retrying = Retrying(
            stop=stop_after_attempt(self._max_attempts),
            wait=wait_exponential(multiplier=self._wait_initial, max=self._wait_max)
            + wait_random(0, self._wait_initial),
            retry=retry_if_exception(_is_transient),
            reraise=True,
            before_sleep=lambda state: log.warning(
                "S3 %s on %s: transient error %s (attempt %d of %d), retrying",
                op,
                self.describe(),
                _brief(state.outcome.exception() if state.outcome else None),
                state.attempt_number,
                self._max_attempts,
            ),
        )
        try:
            return retrying(once)
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, op=op, key=key, attempts=attempt) from exc

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
        md5 = _content_md5(body)
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
                    and (_code(exc) == "PreconditionFailed" or _status(exc) == 412)
                    and on_conflict_retry is not None
                    and on_conflict_retry()
                ):
                    return
                raise

        self._call("PutObject", put, key=key)

    def _ensure_retention(self, key: str, version_id: str | None, extra: dict[str, Any]) -> None:
        """Check that a multipart object carries its lock; set it if the server
        dropped the CreateMultipartUpload lock headers (some S3-compatible servers,
        and moto, do). On AWS this costs one HEAD."""
        full = self._full(key)
        version: dict[str, Any] = {"VersionId": version_id} if version_id else {}

        def head(_attempt: int) -> dict[str, Any]:
            return dict(self._client.head_object(Bucket=self.bucket, Key=full, **version))

        found = self._call("HeadObject", head, key=key)
        if found.get("ObjectLockMode") and found.get("ObjectLockRetainUntilDate"):
            return
        log.warning(
            "%s/%s: the server did not apply the object lock of the multipart upload; "
            "setting the retention now",
            self.describe(),
            key,
        )

        def retain(_attempt: int) -> None:
            self._client.put_object_retention(
                Bucket=self.bucket,
                Key=full,
                Retention={
                    "Mode": extra["ObjectLockMode"],
                    "RetainUntilDate": extra["ObjectLockRetainUntilDate"],
                },
                **version,
            )

        self._call("PutObjectRetention", retain, key=key)

    def _upload_part(self, key: str, upload_id: str, number: int, body: io.BytesIO) -> str:
        full = self._full(key)
        md5 = _content_md5(body)

        def upload(_attempt: int) -> str:
            body.seek(0)
            resp = self._client.upload_part(
                Bucket=self.bucket,
                Key=full,
                UploadId=upload_id,
                PartNumber=number,
                Body=body,
                ContentMD5=md5,
            )
            return str(resp["ETag"])

        return self._call("UploadPart", upload, key=key)

    def _abort_upload(self, full_key: str, upload_id: str) -> None:
        def abort(_attempt: int) -> None:
            try:
                self._client.abort_multipart_upload(
                    Bucket=self.bucket, Key=full_key, UploadId=upload_id
                )
            except ClientError as exc:
                if _code(exc) != "NoSuchUpload":  # already gone: fine
                    raise

        self._call("AbortMultipartUpload", abort, key=self._relative(full_key))

    # ------------------------------------------------------------- interface

    def open_write(self, key: str, settings: StorageSettings | None = None) -> ObjectWriter:
        self._full(key)
        return S3ObjectWriter(self, key, self._object_args(settings))

    def open_read(self, key: str) -> BinaryIO:
        raw = _S3Reader(self, key)
        return io.BufferedReader(raw, buffer_size=1024 * 1024)

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
                if _status(exc) == 404 or _code(exc) in ("404", "NoSuchKey", "NotFound"):
                    return None
                # HEAD of a delete marker's version id answers 405 Method Not Allowed.
                if version_id and (_status(exc) == 405 or _code(exc) == "405"):
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
        _check_list_prefix(prefix)
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

    def object_versions(self, key: str) -> builtins.list[ObjectVersion]:
        """Every version and delete marker of exactly ``key``."""
        full = self._full(key)
        return [v for v in self._versions(full, key=key) if v.key == key]

    def list_versions(self, prefix: str) -> Iterator[ObjectVersion]:
        """Every version and delete marker of the objects whose key starts with ``prefix``."""
        _check_list_prefix(prefix)
        full_prefix = f"{self.root}/{prefix}" if self.root else prefix
        return self._versions(full_prefix, key=None)

    def list_incomplete(self, prefix: str = "") -> Iterator[tuple[str, str, dt.datetime]]:
        """Multipart uploads in progress under ``prefix``: (key, upload id, initiated)."""
        _check_list_prefix(prefix)
        full_prefix = f"{self.root}/{prefix}" if self.root else prefix
        markers: dict[str, Any] = {}
        while True:
            args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full_prefix, **markers}

            def page(_attempt: int, args: dict[str, Any] = args) -> dict[str, Any]:
                return dict(self._client.list_multipart_uploads(**args))

            resp = self._call("ListMultipartUploads", page)
            for upload in resp.get("Uploads", []):
                yield str(upload["Key"]), str(upload["UploadId"]), upload["Initiated"]
            if not resp.get("IsTruncated"):
                return
            markers = {
                "KeyMarker": resp.get("NextKeyMarker", ""),
                "UploadIdMarker": resp.get("NextUploadIdMarker", ""),
            }

    def cleanup_incomplete(
        self, prefix: str = "", *, older_than: dt.timedelta | None = None
    ) -> int:
        """Abort every multipart upload under ``prefix`` (they are ours: the repository
        has one writer per key). ``older_than`` spares uploads started more recently."""
        now = dt.datetime.now(dt.UTC)
        found = list(self.list_incomplete(prefix))
        removed = 0
        for full_key, upload_id, initiated in found:
            if older_than is not None and now - initiated < older_than:
                continue
            self._abort_upload(full_key, upload_id)
            log.info("aborted incomplete upload of %s/%s", self.describe(), full_key)
            removed += 1
        return removed

    def bucket_settings(self) -> dict[str, Any]:
        """The bucket's protection, for audits. Each entry is None when not configured:

        ``versioning`` ("Enabled"/"Suspended"), ``mfa_delete``, ``object_lock``
        (ObjectLockConfiguration), ``encryption`` (ServerSideEncryptionConfiguration),
        ``public_access_block`` (PublicAccessBlockConfiguration).
        """
        bucket = self.bucket

        def optional(fetch: Callable[[], Any], field: str) -> Callable[[int], Any]:
            def run(_attempt: int) -> Any:
                try:
                    value = fetch().get(field)
                except ClientError as exc:
                    if _code(exc) in _NOT_CONFIGURED_CODES:
                        return None
                    raise
                return dict(value) if isinstance(value, dict) else value

            return run

        versioning = self._call(
            "GetBucketVersioning",
            lambda _a: dict(self._client.get_bucket_versioning(Bucket=bucket)),
        )
        return {
            "versioning": versioning.get("Status"),
            "mfa_delete": versioning.get("MFADelete"),
            "object_lock": self._call(
                "GetObjectLockConfiguration",
                optional(
                    lambda: self._client.get_object_lock_configuration(Bucket=bucket),
                    "ObjectLockConfiguration",
                ),
            ),
            "encryption": self._call(
                "GetBucketEncryption",
                optional(
                    lambda: self._client.get_bucket_encryption(Bucket=bucket),
                    "ServerSideEncryptionConfiguration",
                ),
            ),
            "public_access_block": self._call(
                "GetPublicAccessBlock",
                optional(
                    lambda: self._client.get_public_access_block(Bucket=bucket),
                    "PublicAccessBlockConfiguration",
                ),
            ),
        }


class S3ObjectWriter(ObjectWriter):
    """Streams an object into S3: PutObject when it fits one part, else multipart.

    Memory: the part being filled, one queued part and one on the wire.
    """

    def __init__(self, repo: S3Repository, key: str, extra: dict[str, Any]) -> None:
        self._repo = repo
        self._key = key
        self._full = repo._full(key)
        self._extra = extra
        self._part_size = repo.config.part_size
        self._buf = io.BytesIO()
        self._buf_len = 0
        self._size = 0
        self._upload_id: str | None = None
        self._next_part = 1
        self._parts: list[dict[str, Any]] = []
        self._queue: queue.Queue[tuple[int, io.BytesIO] | None] = queue.Queue(maxsize=1)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._state = "open"  # open -> committed | aborted
        self._lock = threading.Lock()

    # ------------------------------------------------------------ pipeline

    def _worker(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._upload(item)
            del item  # do not hold the part's buffer while waiting for the next

    def _upload(self, item: tuple[int, io.BytesIO]) -> None:
        number, body = item
        try:
            if self._error is None and self._state == "open" and self._upload_id:
                etag = self._repo._upload_part(self._key, self._upload_id, number, body)
                with self._lock:
                    self._parts.append({"PartNumber": number, "ETag": etag})
        except BaseException as exc:
            self._error = exc
        finally:
            body.close()

    def _raise_worker_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _start_multipart(self) -> None:
        repo = self._repo

        def create(_attempt: int) -> str:
            resp = repo._client.create_multipart_upload(
                Bucket=repo.bucket, Key=self._full, **self._extra
            )
            return str(resp["UploadId"])

        self._upload_id = repo._call("CreateMultipartUpload", create, key=self._key)
        self._thread = threading.Thread(
            target=self._worker, name=f"s3-upload-{self._key}", daemon=True
        )
        self._thread.start()

    def _flush_part(self) -> None:
        self._raise_worker_error()
        if self._upload_id is None:
            self._start_multipart()
        body, self._buf, self._buf_len = self._buf, io.BytesIO(), 0
        number = self._next_part
        self._next_part += 1
        if number > 10000:
            raise InvalidInput(
                f"{self._key}: more than 10000 parts; raise part_size (now {self._part_size} bytes)"
            )
        self._queue.put((number, body))  # blocks while two parts are pending
        del body
        self._raise_worker_error()

    def _finish_worker(self) -> None:
        """Let the worker upload every queued part, then stop it."""
        thread = self._thread
        if thread is None:
            return
        if thread.is_alive():
            self._queue.put(None)
        thread.join()

    def _stop_worker(self) -> None:
        """Stop the worker, dropping parts not yet sent (abort)."""
        thread = self._thread
        if thread is None:
            return
        while thread.is_alive():
            try:  # drop parts not yet sent, then tell the worker to stop
                while True:
                    item = self._queue.get_nowait()
                    if item is not None:
                        item[1].close()
            except queue.Empty:
                pass
            try:
                self._queue.put(None, timeout=0.5)
                break
            except queue.Full:
                continue
        thread.join()

    # ----------------------------------------------------------- interface

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._state != "open":
            raise InvalidInput(f"writer for {self._key!r} is already {self._state}")
        view = memoryview(data).cast("B")
        n = len(view)
        try:
            while view:
                if self._buf_len >= self._part_size:
                    # Only flush when more data follows: an object of exactly one
                    # part still goes up with a single PutObject.
                    self._flush_part()
                take = min(self._part_size - self._buf_len, len(view))
                self._buf.write(view[:take])
                self._buf_len += take
                view = view[take:]
        except BaseException:
            self.abort()
            raise
        self._size += n
        return n

    def commit(self) -> int:
        if self._state == "committed":
            return self._size
        if self._state != "open":
            raise InvalidInput(f"writer for {self._key!r} is already {self._state}")
        try:
            if self._upload_id is None:
                self._repo._put_object(self._key, self._buf, self._extra)
            else:
                if self._buf_len:
                    self._flush_part()
                self._finish_worker()
                self._raise_worker_error()
                self._complete()
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        self._buf.close()
        return self._size

    def _complete(self) -> None:
        repo, upload_id = self._repo, self._upload_id
        assert upload_id is not None
        parts = sorted(self._parts, key=lambda p: int(p["PartNumber"]))
        if [p["PartNumber"] for p in parts] != list(range(1, self._next_part)):
            raise IntegrityError(f"{self._key}: parts missing from the multipart upload")

        def complete(attempt: int) -> str | None:
            try:
                resp = repo._client.complete_multipart_upload(
                    Bucket=repo.bucket,
                    Key=self._full,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},  # type: ignore[typeddict-item]
                )
                return resp.get("VersionId")
            except ClientError as exc:
                # A retried Complete whose first try landed (answer lost) finds the
                # upload gone; the object with our part count is then ours.
                if attempt > 1 and _code(exc) == "NoSuchUpload":
                    head = repo.head(self._key)
                    if head is not None and str(head.get("ETag", "")).strip('"').endswith(
                        f"-{len(parts)}"
                    ):
                        return head.get("VersionId")
                raise

        version_id = repo._call("CompleteMultipartUpload", complete, key=self._key)
        if "ObjectLockMode" in self._extra:
            repo._ensure_retention(self._key, version_id, self._extra)

    def abort(self) -> None:
        """Stop the upload and abort the multipart upload. Never raises: if the abort
        request itself fails, the upload is logged and ``cleanup_incomplete`` removes it.
        A no-op after ``commit``."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._stop_worker()
        self._buf.close()
        if self._upload_id is not None:
            try:
                self._repo._abort_upload(self._full, self._upload_id)
            except StrongroomError as exc:
                log.warning(
                    "could not abort the multipart upload of %s/%s (%s); "
                    "cleanup_incomplete will remove it",
                    self._repo.describe(),
                    self._key,
                    exc,
                )


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
