"""A throwaway ClickHouse 18.16 server (runs as root) with a generated config, and the
HTTP query helpers every test server shares (``clickhouse_modern`` is the 26.x one)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Self
from xml.sax.saxutils import escape

from strongroom.sandbox._process import (
    listens_on,
    make_temp_dir,
    spawn,
    start_retrying_ports,
    stop_process,
)
from strongroom.sandbox.ports import free_port

CLICKHOUSE_SERVER = "clickhouse-server"
SYSTEM_USERS_XML = Path("/etc/clickhouse-server/users.xml")

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ClickHouseError(RuntimeError):
    pass


class HTTPQueries(ABC):
    """What every throwaway ClickHouse server offers tests: where it listens (``host``,
    ``http_port``, ``tcp_port``, ``user``), plain HTTP queries independent of the engine, and
    ``label``/``version_prefix`` naming the server version a test runs against."""

    host = "127.0.0.1"
    user = "default"
    label = ""
    version_prefix = ""
    # CREATE USER / users.xml with passwords: only clickhouse-server has access management
    has_users = False
    http_port: int
    tcp_port: int
    base_dir: Path

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}/"

    @abstractmethod
    def start(self) -> Self: ...

    @abstractmethod
    def stop(self) -> None: ...

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def query_bytes(
        self, sql: str, data: bytes | None = None, *, database: str | None = None
    ) -> bytes:
        """POST over HTTP. Without ``data`` the SQL is the body; with ``data`` (e.g. an
        ``INSERT ... FORMAT Native`` payload) the SQL goes in the ``query`` parameter."""
        params: dict[str, str] = {}
        if database:
            params["database"] = database
        if data is None:
            body = sql.encode()
        else:
            params["query"] = sql
            body = data
        url = self.http_url + ("?" + urllib.parse.urlencode(params) if params else "")
        req = urllib.request.Request(url, data=body, method="POST")
        try:
            with _NO_PROXY.open(req, timeout=300) as resp:
                return bytes(resp.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace").strip()
            raise ClickHouseError(f"HTTP {exc.code} for {sql[:200]!r}: {detail}") from None

    def query(self, sql: str, *, database: str | None = None) -> str:
        """Run one statement over HTTP; return the text output without the trailing newline."""
        return self.query_bytes(sql, database=database).decode().removesuffix("\n")

    def ping(self) -> bool:
        with _NO_PROXY.open(f"{self.http_url}ping", timeout=2) as resp:
            return bool(resp.read() == b"Ok.\n")


class ClickHouseServer(HTTPQueries):
    """clickhouse-server with all state under a temp dir. ``--pid-file`` is ignored by 18.16,
    so the server is stopped through the PID of the process we started."""

    label = "ch18"
    version_prefix = "18.16"
    has_users = True

    def __init__(self, base_dir: Path | None = None) -> None:
        self.base_dir = base_dir if base_dir is not None else make_temp_dir("clickhouse")
        self.path = self.base_dir / "data"
        self.config_path = self.base_dir / "config.xml"
        self.users_path = self.base_dir / "users.xml"
        self.log_path = self.base_dir / "clickhouse-server.log"
        self.err_log_path = self.base_dir / "clickhouse-server.err.log"
        self.stdout_path = self.base_dir / "stdout.log"
        self.http_port = 0
        self.tcp_port = 0
        self.interserver_http_port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return (
            f"ClickHouseServer(host={self.host!r}, http_port={self.http_port}, "
            f"tcp_port={self.tcp_port}, base_dir={self.base_dir})"
        )

    @property
    def logs(self) -> list[Path]:
        return [self.stdout_path, self.err_log_path, self.log_path]

    def _write_config(self) -> None:
        def d(name: str) -> str:
            p = self.base_dir / name
            p.mkdir(exist_ok=True)
            return escape(f"{p}/")

        shutil.copyfile(SYSTEM_USERS_XML, self.users_path)
        self.config_path.write_text(
            f"""<?xml version="1.0"?>
<yandex>
    <logger>
        <level>information</level>
        <log>{escape(str(self.log_path))}</log>
        <errorlog>{escape(str(self.err_log_path))}</errorlog>
        <size>100M</size>
        <count>1</count>
    </logger>
    <listen_host>{self.host}</listen_host>
    <http_port>{self.http_port}</http_port>
    <tcp_port>{self.tcp_port}</tcp_port>
    <interserver_http_port>{self.interserver_http_port}</interserver_http_port>
    <interserver_http_host>{self.host}</interserver_http_host>
    <path>{d("data")}</path>
    <tmp_path>{d("tmp")}</tmp_path>
    <user_files_path>{d("user_files")}</user_files_path>
    <format_schema_path>{d("format_schemas")}</format_schema_path>
    <users_config>{escape(str(self.users_path))}</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <mark_cache_size>268435456</mark_cache_size>
    <uncompressed_cache_size>268435456</uncompressed_cache_size>
    <mlock_executable>false</mlock_executable>
</yandex>
"""
        )

    def start(self) -> Self:
        start_retrying_ports("clickhouse-server", self._launch, self._ready, self.stop, timeout=60)
        return self

    def _launch(self) -> tuple[subprocess.Popen[bytes], list[Path]]:
        self.http_port, self.tcp_port, self.interserver_http_port = (
            free_port(),
            free_port(),
            free_port(),
        )
        self._write_config()
        for log in self.logs:
            log.write_text("")
        self.proc = spawn(
            [CLICKHOUSE_SERVER, f"--config-file={self.config_path}"],
            log_path=self.stdout_path,
            cwd=self.base_dir,
        )
        return self.proc, self.logs

    def _ready(self) -> bool:
        assert self.proc is not None
        ports = [self.http_port, self.tcp_port, self.interserver_http_port]
        if not listens_on(self.proc.pid, ports):
            return False
        return self.ping()

    def stop(self) -> None:
        stop_process(self.proc, [(signal.SIGTERM, 30.0)])
        self.proc = None
