"""A small ClickHouse HTTP client: queries, streamed SELECT ... FORMAT Native out, streamed
INSERT ... FORMAT Native in, and classified, secret-free errors.

The HTTP interface works on every server version (18.16 included) and moves
raw bytes without decoding them in Python, so it is as fast as the server.
Credentials go in the ``X-ClickHouse-User`` / ``X-ClickHouse-Key`` headers,
never in the URL. Settings (not secret) go in the URL.

Two facts about ClickHouse's HTTP interface shape this module:

- An error that happens after the first bytes of a SELECT were sent cannot
  change the ``200 OK`` any more: the server appends the exception text to the
  body. ``SelectStream`` keeps the tail of the body and fails if it ends with
  an exception.
- An INSERT whose body is cut off is NOT rolled back: blocks parsed before the
  cut stay committed (seen on 18.16: 2 of 3 blocks of an aborted 3M-row insert
  remained). Restores therefore load into scratch tables only.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import socket
import ssl
import time
import urllib.parse
from typing import Any

from strongroom.engines.clickhouse.conn import ClickHouseConnection
from strongroom.errors import (
    AccessDenied,
    Conflict,
    IntegrityError,
    NotFound,
    ServiceUnavailable,
    ToolFailed,
)
from strongroom.redact import register, scrub

CONNECT_ATTEMPTS = 3
ERROR_BODY_MAX = 64 * 1024
TAIL_KEEP = 64 * 1024
_CODE = re.compile(rb"Code: (\d+)")
# 18.16: "Code: 395, e.displayText() = DB::Exception: ..."; newer: "Code: 395. DB::Exception: ..."
_TRAILING_EXCEPTION = re.compile(
    rb"Code: (\d+)[.,] (?:e\.displayText\(\) = )?DB::Exception[^\n]*\n?\Z"
)
# 26.x: "__exception__" marker, then "Code: 395. DB::Exception: ..." and the stream is cut
_CUT_EXCEPTION = re.compile(rb"__exception__\s+\w*\s+Code: (\d+)[.,] DB::Exception")
_AUTH_CODES = {192, 193, 194, 195, 497, 516}
_READONLY = 164
_NOT_FOUND_CODES = {60, 81}
_EXISTS_CODES = {57, 82}


class ClickHouseQueryError(ToolFailed):
    """The server rejected a query (exit code 8, like a failed tool)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


def _server_message(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip()
    text = text.replace(", e.what() = DB::Exception", "")
    text = text.replace("e.displayText() = ", "")
    return scrub(text[:2000])


def classify(status: int, body: bytes, what: str) -> Exception:
    """An error for an HTTP status and the server's message."""
    m = _CODE.search(body)
    code = int(m.group(1)) if m else None
    message = _server_message(body) or f"HTTP {status}"
    if status in (401, 403) or code in _AUTH_CODES:
        return AccessDenied(f"{what}: ClickHouse refused the credentials ({message})")
    if code == _READONLY:
        return AccessDenied(f"{what}: the ClickHouse user may not write ({message})")
    if code in _NOT_FOUND_CODES:
        return NotFound(f"{what}: {message}")
    if code in _EXISTS_CODES:
        return Conflict(f"{what}: {message}")
    if status in (502, 503, 504):
        return ServiceUnavailable(f"{what}: ClickHouse unavailable (HTTP {status}: {message})")
    return ClickHouseQueryError(f"{what}: ClickHouse error: {message}", code)


class ClickHouseHTTP:
    """Runs statements against one server over HTTP(S)."""

    def __init__(self, conn: ClickHouseConnection) -> None:
        self.conn = conn
        register(*conn.secrets())

    @property
    def where(self) -> str:
        return self.conn.describe()

    # -- plumbing --------------------------------------------------------------------------

    def _connect_once(self) -> http.client.HTTPConnection:
        c = self.conn
        connection: http.client.HTTPConnection
        if c.secure:
            context = ssl.create_default_context(cafile=c.ca_file)
            if not c.verify_tls:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            connection = http.client.HTTPSConnection(
                c.host, c.http_port, timeout=c.connect_timeout, context=context
            )
        else:
            connection = http.client.HTTPConnection(c.host, c.http_port, timeout=c.connect_timeout)
        connection.connect()
        assert connection.sock is not None
        connection.sock.settimeout(c.read_timeout)
        return connection

    def open(self) -> http.client.HTTPConnection:
        """A connected socket, with bounded retries on refusal/timeouts."""
        last: BaseException | None = None
        for attempt in range(CONNECT_ATTEMPTS):
            try:
                return self._connect_once()
            except ssl.SSLError as exc:
                raise ServiceUnavailable(f"ClickHouse {self.where}: TLS failed ({exc})") from None
            except OSError as exc:
                last = exc
                if attempt + 1 < CONNECT_ATTEMPTS:
                    time.sleep(0.5 * 2**attempt)
        raise ServiceUnavailable(
            f"ClickHouse {self.where} unreachable after {CONNECT_ATTEMPTS} attempts: "
            f"{scrub(str(last))}"
        )

    def headers(self) -> dict[str, str]:
        h = {"X-ClickHouse-User": self.conn.user, "User-Agent": "strongroom"}
        if self.conn.password is not None and self.conn.password.get_secret_value():
            h["X-ClickHouse-Key"] = self.conn.password.get_secret_value()
        return h

    @staticmethod
    def path(settings: dict[str, Any] | None, query: str | None = None) -> str:
        params = {k: str(v) for k, v in (settings or {}).items()}
        if query is not None:
            params["query"] = query
        return "/?" + urllib.parse.urlencode(params) if params else "/"

    def _request(
        self, sql: str, settings: dict[str, Any] | None
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        connection = self.open()
        try:
            connection.request(
                "POST",
                self.path(settings),
                body=sql.encode("utf-8", "surrogateescape"),
                headers=self.headers(),
            )
            return connection, connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            reason = scrub(str(exc)) or type(exc).__name__
            raise ServiceUnavailable(
                f"ClickHouse {self.where}: connection lost ({reason})"
            ) from None

    # -- statements ------------------------------------------------------------------------

    def execute(
        self, sql: str, *, settings: dict[str, Any] | None = None, what: str | None = None
    ) -> bytes:
        """Run one statement; returns the whole response body."""
        connection, resp = self._request(sql, settings)
        try:
            body = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ServiceUnavailable(
                f"ClickHouse {self.where}: connection lost while reading ({scrub(str(exc))})"
            ) from None
        finally:
            connection.close()
        if resp.status != 200:
            raise classify(resp.status, body[:ERROR_BODY_MAX], what or _summary(sql))
        return body

    def rows(
        self, sql: str, *, settings: dict[str, Any] | None = None, what: str | None = None
    ) -> list[dict[str, Any]]:
        """Rows of a SELECT as dicts (``FORMAT JSON`` is appended)."""
        body = self.execute(sql + " FORMAT JSON", settings=settings, what=what)
        data = json.loads(body.decode("utf-8", "surrogateescape"))
        return list(data.get("data", []))

    def tuples(
        self, sql: str, *, settings: dict[str, Any] | None = None, what: str | None = None
    ) -> list[list[Any]]:
        """Rows of a SELECT as lists (``FORMAT JSONCompact``): no aliases needed, so none
        can shadow a column of the same name."""
        body = self.execute(sql + " FORMAT JSONCompact", settings=settings, what=what)
        data = json.loads(body.decode("utf-8", "surrogateescape"))
        return [list(r) for r in data.get("data", [])]

    def select_stream(
        self, sql: str, *, settings: dict[str, Any] | None = None, what: str | None = None
    ) -> SelectStream:
        connection, resp = self._request(sql, settings)
        if resp.status != 200:
            try:
                body = resp.read(ERROR_BODY_MAX)
            finally:
                connection.close()
            raise classify(resp.status, body, what or _summary(sql))
        return SelectStream(connection, resp, what or _summary(sql), self.where)

    def insert_stream(
        self,
        sql: str,
        length: int,
        *,
        settings: dict[str, Any] | None = None,
        what: str | None = None,
    ) -> InsertStream:
        return InsertStream(self, sql, length, settings, what or _summary(sql))


def _summary(sql: str) -> str:
    text = " ".join(sql.split())
    return text if len(text) <= 120 else text[:117] + "..."


class SelectStream:
    """The body of a streamed SELECT: ``read(n)`` until b"". Fails (and records the error in
    ``error``) if the connection drops or the body ends with a server exception."""

    def __init__(
        self,
        connection: http.client.HTTPConnection,
        resp: http.client.HTTPResponse,
        what: str,
        where: str,
    ) -> None:
        self._connection = connection
        self._resp = resp
        self._what = what
        self._where = where
        self._tail = b""
        self.size = 0
        self.error: BaseException | None = None
        self.done = False

    def read(self, n: int = -1) -> bytes:
        if self.done:
            return b""
        try:
            data = self._resp.read(n if n and n > 0 else 1024 * 1024)
        except (OSError, http.client.HTTPException) as exc:
            # 26.x writes the exception into the body and then cuts the chunked stream
            partial = exc.partial if isinstance(exc, http.client.IncompleteRead) else b""
            tail = (self._tail + partial)[-TAIL_KEEP:]
            m = _TRAILING_EXCEPTION.search(tail) or _CUT_EXCEPTION.search(tail)
            if m:
                self.done = True
                self.error = ClickHouseQueryError(
                    f"{self._what}: ClickHouse failed while streaming after "
                    f"{self.size + len(partial)} bytes: {_server_message(tail[m.start() :])}",
                    int(m.group(1)),
                )
                raise self.error from None
            self.error = ServiceUnavailable(
                f"{self._what}: connection to ClickHouse {self._where} lost after "
                f"{self.size} bytes ({scrub(str(exc)) or type(exc).__name__})"
            )
            raise self.error from None
        if data:
            self.size += len(data)
            self._tail = (
                data[-TAIL_KEEP:] if len(data) >= TAIL_KEEP else (self._tail + data)[-TAIL_KEEP:]
            )
            return data
        self.done = True
        m = _TRAILING_EXCEPTION.search(self._tail)
        if m:
            self.error = ClickHouseQueryError(
                f"{self._what}: ClickHouse failed while streaming after {self.size} bytes: "
                f"{_server_message(self._tail[m.start() :])}",
                int(m.group(1)),
            )
            raise self.error
        return b""

    def readinto(self, buffer: bytearray | memoryview) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._connection.close()

    def __enter__(self) -> SelectStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InsertStream:
    """A streamed ``INSERT ... FORMAT Native`` with a known body length.

    ``write`` sends bytes as they come; ``finish`` waits for the server's verdict;
    ``abort`` drops the connection (the server then sees a short body). Never
    insert into a table that must stay untouched on failure: blocks received
    before an abort stay committed.
    """

    def __init__(
        self,
        client: ClickHouseHTTP,
        sql: str,
        length: int,
        settings: dict[str, Any] | None,
        what: str,
    ) -> None:
        self._client = client
        self._what = what
        self.length = length
        self.sent = 0
        self._connection = client.open()
        try:
            self._connection.putrequest(
                "POST", client.path(settings, sql), skip_accept_encoding=True
            )
            for key, value in client.headers().items():
                self._connection.putheader(key, value)
            self._connection.putheader("Content-Length", str(length))
            self._connection.putheader("Content-Type", "application/octet-stream")
            self._connection.endheaders()
        except OSError as exc:
            self.abort()
            raise ServiceUnavailable(
                f"{what}: connection to ClickHouse {client.where} failed ({scrub(str(exc))})"
            ) from None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data)
        if self.sent + view.nbytes > self.length:
            raise IntegrityError(f"{self._what}: more data than the manifest records")
        try:
            self._connection.send(view)
        except OSError:
            # the server stopped reading: its response says why
            raise self._failure() from None
        self.sent += view.nbytes
        return view.nbytes

    def _failure(self) -> Exception:
        try:
            assert self._connection.sock is not None
            self._connection.sock.settimeout(10)
            resp = self._connection.getresponse()
            body = resp.read(ERROR_BODY_MAX)
            return classify(resp.status, body, self._what)
        except Exception as exc:
            return ServiceUnavailable(
                f"{self._what}: connection to ClickHouse {self._client.where} lost after "
                f"{self.sent} bytes ({scrub(str(exc)) or type(exc).__name__})"
            )
        finally:
            self.abort()

    def finish(self) -> None:
        if self.sent != self.length:
            self.abort()
            raise IntegrityError(
                f"{self._what}: sent {self.sent} of {self.length} bytes; insert abandoned"
            )
        try:
            resp = self._connection.getresponse()
            body = resp.read(ERROR_BODY_MAX)
        except (OSError, http.client.HTTPException) as exc:
            self.abort()
            raise ServiceUnavailable(
                f"{self._what}: connection to ClickHouse {self._client.where} lost "
                f"({scrub(str(exc)) or type(exc).__name__})"
            ) from None
        self._connection.close()
        if resp.status != 200:
            raise classify(resp.status, body, self._what)

    def abort(self) -> None:
        sock = self._connection.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(Exception):
            self._connection.close()
