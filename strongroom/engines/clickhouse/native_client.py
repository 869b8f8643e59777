"""A SELECT's ``FORMAT Native`` output through ``clickhouse-client`` (the native protocol).

Why the data does not come over HTTP when this tool is there: ClickHouse 18.16 writes
an HTTP response in 4 KiB chunks, one ``send`` each, and Python's HTTP client decodes
every chunk on its own. For a 20M-row (1.6 GB Native) table that cost the server
~1.5 CPU-s and strongroom ~3 CPU-s more than the native protocol, which moves 1 MiB
blocks (same export + zstd + age on 2 cores: 8.0-8.7 s over HTTP, 5.8-6.1 s here).
clickhouse-client writes the Native bytes to a pipe that strongroom reads like
pg_dump's output.

Safety: the native protocol ends a result with an explicit EndOfStream packet, and
clickhouse-client exits non-zero when the query fails or the connection breaks, so a
short stream can never pass as a whole one. The password reaches the tool through a
config document in an inherited pipe (``--config-file /dev/fd/N``): never in argv,
the environment or a file on disk.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from xml.sax.saxutils import escape

from strongroom.engines.clickhouse.conn import ClickHouseConnection
from strongroom.engines.clickhouse.http_client import classify
from strongroom.errors import InvalidInput, ServiceUnavailable, ToolFailed
from strongroom.process import Tool
from strongroom.redact import register

TOOL = "clickhouse-client"
NATIVE = "native"
HTTP = "http"
_CODE = re.compile(r"Code: (\d+)")
# the connection broke or never came up: NETWORK_ERROR, SOCKET_TIMEOUT, reading after EOF,
# UNEXPECTED_PACKET_FROM_SERVER, TIMEOUT_EXCEEDED, ALL_CONNECTION_TRIES_FAILED
_UNAVAILABLE_CODES = {32, 101, 159, 209, 210, 279}


def tool() -> str | None:
    return shutil.which(TOOL)


# In auto mode an export of less Native data than this (its parts' uncompressed bytes) goes
# over HTTP: clickhouse-client's start-up (~50 ms) costs more than the HTTP chunks do on
# little data (measured, client side: 16 MiB 58 ms over HTTP vs 77 ms through the tool,
# 32 MiB 119 vs 95 ms). Tables with many small partitions would otherwise pay it per
# partition. Tables whose size is not known up front (Log family, Memory) are small by
# design, so they go over HTTP too.
NATIVE_MIN_BYTES = 32 * 1024 * 1024


def version() -> str:
    path = tool()
    if path is None:
        return "not installed"
    return _tool_version(path)


@functools.cache
def _tool_version(path: str) -> str:
    out = subprocess.run(
        [path, "--version"], capture_output=True, text=True, check=False, timeout=30
    )
    return out.stdout.strip() or f"unknown (exit code {out.returncode})"


_VERSION = re.compile(r"(\d+)\.(\d+)")


def _major_minor(text: str) -> tuple[int, int] | None:
    found = _VERSION.search(text)
    return (int(found.group(1)), int(found.group(2))) if found else None


def older_than(server_version: str) -> bool:
    """Whether the installed clickhouse-client is an older release than the server.

    An older client cannot decode the newer types a server sends (18.16's client fails
    on ``SimpleAggregateFunction``, ``Map``, ``JSON``, ``Variant``...: it parses each block
    before writing it out), so ``auto`` exports over HTTP then."""
    tool_mm, server_mm = _major_minor(version()), _major_minor(server_version)
    return tool_mm is None or server_mm is None or tool_mm < server_mm


def transport(conn: ClickHouseConnection, server_version: str | None = None) -> str:
    """``native`` (clickhouse-client) or ``http`` for data exports of this connection.

    ``auto`` takes clickhouse-client when it is installed, the connection is plain and
    (``server_version`` given) the tool is not older than the server; TLS connections
    export over HTTPS (its certificate checks are the ones strongroom configures and
    tests), and so does a machine without the tool."""
    if conn.export_via == HTTP:
        return HTTP
    if conn.export_via == TOOL:
        if conn.secure:
            raise InvalidInput(
                "export_via=clickhouse-client does not support secure (TLS) connections: "
                "use export_via=auto or http"
            )
        if tool() is None:
            raise InvalidInput("export_via=clickhouse-client, but clickhouse-client is not on PATH")
        return NATIVE
    if tool() is None or conn.secure:
        return HTTP
    if server_version is not None and older_than(server_version):
        return HTTP
    return NATIVE


def for_export(conn: ClickHouseConnection, preferred: str, size: int | None) -> str:
    """The transport for one export of about ``size`` Native bytes (None: unknown)."""
    small = size is None or size < NATIVE_MIN_BYTES
    if preferred == NATIVE and conn.export_via == "auto" and small:
        return HTTP
    return preferred


def wire_compression(conn: ClickHouseConnection) -> bool:
    """LZ4 between server and client: worth it across a network, pure cost on loopback."""
    if conn.wire_compression is not None:
        return conn.wire_compression
    host = conn.host.strip("[]")
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


def _config(conn: ClickHouseConnection) -> bytes:
    """The one secret clickhouse-client needs (the user goes in argv: it is no secret)."""
    password = conn.password.get_secret_value() if conn.password is not None else ""
    return f"<config><password>{escape(password)}</password></config>".encode()


def native_select(conn: ClickHouseConnection, sql: str, settings: Mapping[str, object]) -> Tool:
    """A running ``clickhouse-client --query "... FORMAT Native"``: its stdout is the data,
    its ``check`` raises a classified error unless it ended cleanly."""
    register(*conn.secrets())
    path = tool()
    if path is None:
        raise ToolFailed(f"{TOOL} is not installed (not on PATH)")
    where = f"{conn.host}:{conn.port}"
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, _config(conn))  # a few hundred bytes: fits the pipe
        os.close(write_end)
        write_end = -1
        argv = [
            path,
            f"--config-file=/dev/fd/{read_end}",
            f"--host={conn.host}",
            f"--port={conn.port}",
            f"--user={conn.user}",
            f"--compression={1 if wire_compression(conn) else 0}",
            f"--connect_timeout={max(1, int(conn.connect_timeout))}",
            *(f"--{name}={value}" for name, value in settings.items()),
            f"--query={sql}",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLICKHOUSE_")}
        return Tool(
            argv,
            env,
            stdin=subprocess.DEVNULL,
            pass_fds=(read_end,),
            classify=lambda _name, what, code, stderr: classify_failure(what, where, code, stderr),
        )
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def classify_failure(what: str, where: str, code: int, stderr: str) -> Exception:
    """The error for a failed clickhouse-client: unreachable, refused, missing, or failed."""
    found = _CODE.search(stderr)
    server_code = int(found.group(1)) if found else None
    text = stderr.strip()
    lowered = text.lower()
    # a result cut short arrives as "Cannot read all data ... while receiving packet from"
    broken = "while receiving packet" in lowered or "connection refused" in lowered
    if server_code in _UNAVAILABLE_CODES or broken:
        return ServiceUnavailable(
            f"{what}: connection to the ClickHouse native port {where} failed ({text})"
        )
    if server_code is not None:
        return classify(500, text.encode(), what)
    return ToolFailed(f"{what}: {TOOL} failed with exit code {code}: {text or 'no message'}")
