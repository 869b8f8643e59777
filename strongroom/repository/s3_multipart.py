"""Streamed multipart upload into S3, and the cleanup of uploads left behind.

Why a module of its own: the bounded upload pipeline (a writer thread filling
parts, an uploader thread, a queue between them) and its failure rules are the
most delicate part of the S3 repository and are read and tested on their own.

* Uploads stream through a bounded pipeline: the writer fills one part of
  ``config.part_size`` bytes while a background thread uploads the previous
  one; a queue of depth 1 sits between them, so at most two parts are pending
  (one queued, one on the wire) and peak memory is about three parts.
* Parts grow with the part number (``part_size_for``): the first
  ``max_parts // 16`` parts are ``config.part_size``, each next run of as many parts
  twice as large, up to S3's 5 GiB per part, so an artifact of any size up to S3's
  5 TiB object limit fits the store's part-count limit (``config.max_parts``: 10,000
  on AWS, 1,000 on some S3-compatible stores) while small artifacts keep small parts.
  A part over 64 MiB is spooled to a temporary file, not memory: peak memory stays
  about three parts of at most 64 MiB whatever the artifact's size.
* Objects smaller than one part go up with a single ``PutObject``. Every
  ``PutObject`` and ``UploadPart`` carries ``Content-MD5`` (accepted by every
  S3 implementation, and what object-lock buckets require).
* Every failure leaves nothing behind: any exception in ``write``/``commit``
  (and the context manager exiting on an exception) aborts the multipart
  upload. ``cleanup_incomplete`` removes uploads left by a killed process.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import queue
import tempfile
import threading
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from strongroom.errors import IntegrityError, InvalidInput, StrongroomError
from strongroom.repository.base import ObjectWriter
from strongroom.repository.s3_client import (
    S3Calls,
    check_list_prefix,
    content_md5,
    error_code,
)

if TYPE_CHECKING:
    from strongroom.repository.s3 import S3Repository

log = logging.getLogger(__name__)

MAX_PART_BYTES = 5 * 1024**3  # S3's limit per part
MAX_OBJECT_BYTES = 5 * 1024**4  # S3's limit per object
IN_MEMORY_PART_BYTES = 64 * 1024 * 1024  # larger parts are spooled to a temporary file


def part_size_for(number: int, base: int, max_parts: int) -> int:
    """Bytes of part ``number`` (1-based): ``base`` doubled after every ``max_parts // 16``
    parts, at most 5 GiB."""
    run = max(1, max_parts // 16)
    return min(MAX_PART_BYTES, base << min(32, (number - 1) // run))


def capacity(base: int, max_parts: int) -> int:
    """The largest object ``max_parts`` parts of ``part_size_for`` can hold."""
    run = max(1, max_parts // 16)
    total, number = 0, 1
    while number <= max_parts:
        size = part_size_for(number, base, max_parts)
        count = min(run - (number - 1) % run, max_parts - number + 1)
        if size == MAX_PART_BYTES:
            count = max_parts - number + 1
        total += size * count
        number += count
    return total


def _part_buffer(size: int) -> IO[bytes]:
    if size <= IN_MEMORY_PART_BYTES:
        return io.BytesIO()
    return tempfile.SpooledTemporaryFile(max_size=IN_MEMORY_PART_BYTES, prefix="strongroom-part-")


class S3Multipart(S3Calls):
    """Multipart requests of ``S3Repository`` (one of its bases)."""

    def _upload_part(self, key: str, upload_id: str, number: int, body: IO[bytes]) -> str:
        full = self._full(key)
        md5 = content_md5(body)

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
                if error_code(exc) != "NoSuchUpload":  # already gone: fine
                    raise

        self._call("AbortMultipartUpload", abort, key=self._relative(full_key))

    def list_incomplete(self, prefix: str = "") -> Iterator[tuple[str, str, dt.datetime]]:
        """Multipart uploads in progress under ``prefix``: (key, upload id, initiated)."""
        check_list_prefix(prefix)
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


class S3ObjectWriter(ObjectWriter):
    """Streams an object into S3: PutObject when it fits one part, else multipart.

    Memory: the part being filled, one queued part and one on the wire.
    """

    def __init__(self, repo: S3Repository, key: str, extra: dict[str, Any]) -> None:
        self._repo = repo
        self._key = key
        self._full = repo._full(key)
        self._extra = extra
        self._base_part = repo.config.part_size
        self._max_parts = repo.config.max_parts
        self._part_size = self._base_part
        self._buf: IO[bytes] = io.BytesIO()
        self._buf_len = 0
        self._size = 0
        self._upload_id: str | None = None
        self._next_part = 1
        self._parts: list[dict[str, Any]] = []
        self._queue: queue.Queue[tuple[int, IO[bytes]] | None] = queue.Queue(maxsize=1)
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

    def _upload(self, item: tuple[int, IO[bytes]]) -> None:
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
        number = self._next_part
        if number > self._max_parts:
            limit = capacity(self._base_part, self._max_parts)
            raise InvalidInput(
                f"{self._key}: larger than {limit} bytes, the most {self._max_parts} parts "
                f"from part_size {self._base_part} hold; raise part_size or max_parts"
            )
        self._next_part += 1
        self._part_size = part_size_for(self._next_part, self._base_part, self._max_parts)
        body, self._buf, self._buf_len = self._buf, _part_buffer(self._part_size), 0
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
                assert isinstance(self._buf, io.BytesIO)  # the first part's buffer
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
                if attempt > 1 and error_code(exc) == "NoSuchUpload":
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
