"""S3 clients, retries and error translation, shared by every S3 repository module.

Why a module of its own: building a client (botocore directly for the WAL hot
path, or a prefect-aws block's session) and turning botocore's errors into
strongroom's are the same for every request the repository makes, whether a
plain put, a multipart part or a version listing.

* Transient errors (connection errors, timeouts, 5xx, throttling) are retried
  with exponential backoff and jitter, at most ``config.max_attempts`` tries in
  all, then raise ``ServiceUnavailable``. Clients this module builds itself
  turn botocore's own retries off so the two do not multiply.
* A request the store does not implement (``NotImplemented``, HTTP 501 and the
  like; S3-compatible stores each lack some bucket APIs) is not transient: it
  raises ``Unsupported`` (naming the API) at once, without retries.
* Error messages name the bucket, prefix and key, never the secret key.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, TypeVar

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
    InvalidInput,
    NotFound,
    ServiceUnavailable,
    StrongroomError,
    Unsupported,
)
from strongroom.repository.base import check_key

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from prefect_aws import AwsCredentials

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

# Error codes that mean "this store does not implement the request" (not transient).
_UNSUPPORTED_CODES = frozenset(
    {
        "NotImplemented",
        "NotSupported",
        "OperationNotSupported",
        "UnsupportedOperation",
        "XNotImplemented",
    }
)


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def http_status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def is_unsupported(exc: BaseException) -> bool:
    """The store does not implement the request (``NotImplemented``, 501, ...)."""
    if not isinstance(exc, ClientError):
        return False
    return error_code(exc) in _UNSUPPORTED_CODES or http_status(exc) == 501


def is_transient(exc: BaseException) -> bool:
    """Connection trouble, timeouts, 5xx (but 501) and throttling: worth another try."""
    if isinstance(exc, ClientError):
        if is_unsupported(exc):
            return False
        status = http_status(exc)
        return error_code(exc) in _TRANSIENT_CODES or status >= 500 or status == 429
    return isinstance(exc, HTTPClientError | BotoConnectionError | IncompleteReadError)


def brief_error(exc: BaseException | None) -> str:
    """A short, secret-free name for an error: the S3 code or the exception type."""
    if isinstance(exc, ClientError):
        return f"{error_code(exc) or 'HTTP'} ({http_status(exc)})"
    return type(exc).__name__


def content_md5(buf: IO[bytes]) -> str:
    """Base64 MD5 of a part or object body (in memory, or spooled to disk when large)."""
    if isinstance(buf, io.BytesIO):
        with buf.getbuffer() as view:
            digest = hashlib.md5(view, usedforsecurity=False).digest()
    else:
        buf.seek(0)
        md5 = hashlib.md5(usedforsecurity=False)
        while chunk := buf.read(1024 * 1024):
            md5.update(chunk)
        digest = md5.digest()
    return base64.b64encode(digest).decode("ascii")


def normalise_prefix(prefix: str) -> str:
    root = prefix.strip("/")
    if root:
        check_key(root)
    return root


def check_list_prefix(prefix: str) -> str:
    """A list prefix is '' or a key, optionally ending with '/' (or a partial last name)."""
    if prefix:
        check_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


def botocore_config(endpoint_url: str | None) -> Config:
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
    ours = botocore_config(endpoint)
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
        config=botocore_config(config.endpoint_url),
    )
    return client


class S3Calls:
    """The request runner of an S3 repository: key mapping, retries, error translation.

    A base of ``S3Repository`` (which sets these attributes in its ``__init__``),
    so that the multipart and the versions modules can make requests too.
    """

    config: RepositoryConfig
    bucket: str
    root: str
    _client: S3Client
    _secrets: list[str]
    _max_attempts: int
    _wait_initial: float
    _wait_max: float

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
            code, status = error_code(exc), http_status(exc)
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
            if is_unsupported(exc):
                return Unsupported(
                    f"S3 {op} on {where} is not supported by this store ({detail})", api=op
                )
            if is_transient(exc):
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
        if is_transient(exc):
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
            retry=retry_if_exception(is_transient),
            reraise=True,
            before_sleep=lambda state: log.warning(
                "S3 %s on %s: transient error %s (attempt %d of %d), retrying",
                op,
                self.describe(),
                brief_error(state.outcome.exception() if state.outcome else None),
                state.attempt_number,
                self._max_attempts,
            ),
        )
        try:
            return retrying(once)
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, op=op, key=key, attempts=attempt) from exc
