"""The checks of ``strongroom doctor``: one ``Check`` each (ok / warn / fail, a reason,
what to do, and for a failure the exit code of its error class, strongroom/errors.py).

Blocks are read over plain HTTP (``cli.preflight``, ``cli.repo_source``): no Prefect import.
Target connections reuse the engines' own code (``engines/postgres/connect.py``,
``engines/clickhouse/http_client.py``, ``engines/redis/conn.py``) so a refused password is
``AccessDenied`` (exit 7) exactly as a backup would see it.

The repository write probe: a few bytes under ``doctor/`` written, read back and
deleted. On a bucket with object lock the default retention covers every key (S3 has no
per-prefix exclusion), so a probe could not be deleted for the retention period: there
the probe is not written and the check is a ``warn`` saying so; only the reads (HEAD of
the bucket, a listing) are checked. ``age`` and ``zstd`` run in-process (pyrage,
zstandard), so their check is the library's version, not a binary on PATH.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import re
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from strongroom.errors import (
    AccessDenied,
    InvalidInput,
    NotFound,
    ServiceUnavailable,
    StrongroomError,
    ToolFailed,
    Unsupported,
)

OK, WARN, FAIL = "ok", "warn", "fail"
PROBE_PREFIX = "doctor/"
MAX_SKEW_S = 30.0  # S3 SigV4 refuses requests more than 15 minutes off; warn well before
MAX_ARCHIVE_LAG_S = 3600.0  # archived nothing for an hour while WAL was written
PITR_MIN_PG = 150000  # non-exclusive pg_backup_start (docs/physical.md)
BLOCK_TYPES = {
    "strongroom-postgres-target": "PostgreSQL target",
    "strongroom-clickhouse-target": "ClickHouse target",
    "strongroom-redis-target": "Redis target",
    "strongroom-repository": "repository",
    "strongroom-encryption-key": "encryption key",
    "strongroom-retention-policy": "retention policy",
}


@dataclass
class Check:
    name: str
    status: str
    reason: str
    fix: str = ""
    exit_code: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def ok(name: str, reason: str) -> Check:
    return Check(name, OK, reason)


def warn(name: str, reason: str, fix: str) -> Check:
    return Check(name, WARN, reason, fix)


def fail(name: str, exc: StrongroomError, fix: str) -> Check:
    return Check(name, FAIL, str(exc), fix, exc.exit_code)


def run_check(name: str, fix: str, body: Callable[[], Check | list[Check]]) -> list[Check]:
    """``body``'s checks; an error it raises is one failing line (a StrongroomError's exit
    code; 2 for a refused block field; 1 for anything unexpected, its message scrubbed)."""
    from pydantic import ValidationError

    from strongroom.errors import invalid_input
    from strongroom.redact import scrub

    try:
        result = body()
    except StrongroomError as exc:
        return [fail(name, exc, fix)]
    except ValidationError as exc:  # a block field the engine refuses (e.g. plaintext)
        return [fail(name, invalid_input(exc, "block"), fix)]
    except Exception as exc:
        return [Check(name, FAIL, f"unexpected {type(exc).__name__}: {scrub(str(exc))}", fix, 1)]
    return result if isinstance(result, list) else [result]


# ---- Prefect --------------------------------------------------------------------------------


def api_get(api_url: str, path: str) -> Any:
    """GET ``path`` of the Prefect API as JSON; None for a 404. Refused credentials are
    ``AccessDenied``, anything else ``ServiceUnavailable``."""
    import json
    import urllib.error
    import urllib.parse
    import urllib.request

    from strongroom.cli.preflight import api_headers

    if urllib.parse.urlsplit(api_url).scheme not in ("http", "https"):
        raise InvalidInput("PREFECT_API_URL must be an http(s) URL")
    request = urllib.request.Request(f"{api_url}{path}", headers=api_headers())  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (http(s))
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        if exc.code in (401, 403):
            raise AccessDenied(f"Prefect API {api_url} refused the credentials") from None
        raise ServiceUnavailable(f"Prefect API {api_url} answered {exc.code} to {path}") from None
    except (urllib.error.URLError, TimeoutError, OSError, ValueError) as exc:
        raise ServiceUnavailable(f"Prefect API unreachable at {api_url}: {exc}") from None


def prefect_api(api_url: str) -> Check:
    version = api_get(api_url, "/admin/version")
    if version is None:
        raise ServiceUnavailable(f"{api_url} answered 404 to /admin/version: not a Prefect API")
    return ok("prefect-api", f"{api_url} reachable, Prefect {version}")


def block_types(api_url: str) -> Check:
    missing = [s for s in BLOCK_TYPES if api_get(api_url, f"/block_types/slug/{s}") is None]
    if missing:
        raise NotFound(f"block types not registered: {', '.join(missing)}")
    return ok("block-types", f"all {len(BLOCK_TYPES)} strongroom block types registered")


# ---- keys -----------------------------------------------------------------------------------


def key_checks(data: dict[str, Any], name: str) -> list[Check]:
    from strongroom.pipeline import parse_identities, parse_recipients

    recipients = [str(r) for r in data.get("recipients") or []]
    if not recipients:
        raise InvalidInput(f"key block {name!r} has no recipients: backups cannot encrypt")
    parse_recipients(recipients)
    checks = [ok("key-recipients", f"key {name!r}: {len(recipients)} age recipient(s)")]
    identity = data.get("identity")
    if not identity:
        checks.append(
            warn(
                "key-identity",
                f"key {name!r} holds no identity: restores and verify cannot run here",
                "fine on a backup-only runner; where restores run, set the block's identity",
            )
        )
    else:
        parse_identities([str(identity)])
        checks.append(ok("key-identity", f"key {name!r}: identity present (restores can run)"))
    return checks


# ---- tools ----------------------------------------------------------------------------------


def _major(version_text: str) -> int | None:
    """The major version: ``pg_dump (PostgreSQL) 15.18 (Debian ...)`` -> 15, ``7.0.15`` -> 7."""
    match = re.search(r"\(PostgreSQL\)\s*(\d+)", version_text) or re.search(r"(\d+)", version_text)
    return int(match.group(1)) if match else None


def pg_tool_check(name: str, tool: str, server_num: int | None) -> Check:
    from strongroom.engines.postgres.backup import pg_tool

    path = pg_tool(tool)
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    text = out.stdout.strip()
    major = _major(text)
    if server_num is None or major is None:
        return ok(f"{name}: tool-{tool}", f"{text} ({path})")
    server_major = server_num // 10000
    if major < server_major:
        raise ToolFailed(
            f"{text} is older than the server (PostgreSQL {server_major}): it refuses to dump it"
        )
    return ok(f"{name}: tool-{tool}", f"{text} >= server {server_major} ({path})")


def library_tools() -> list[Check]:
    import importlib.metadata as md

    checks = []
    for tool, dist in (("age", "pyrage"), ("zstd", "zstandard")):
        checks.append(ok(f"tool-{tool}", f"in-process ({dist} {md.version(dist)})"))
    return checks


# ---- targets --------------------------------------------------------------------------------


def postgres_checks(name: str, data: dict[str, Any]) -> list[Check]:
    from blocks.target_config import postgres_connection
    from strongroom.engines.postgres.connect import connect
    from strongroom.engines.postgres.inspection import server_facts

    pitr = bool(data.get("pitr"))
    fix = f"check host/port/user/password of block strongroom-postgres-target/{name}"
    conn = postgres_connection(name, data).model_copy(update={"connect_timeout": 5})
    checks: list[Check] = []
    try:
        c = connect(conn)
    except StrongroomError as exc:
        return [fail(f"{name}: connect", exc, fix)]
    with c:
        facts = server_facts(c)
        checks.append(
            ok(f"{name}: connect", f"PostgreSQL {facts['version']} at {conn.host}:{conn.port}")
        )
        num = int(facts["version_num"])
        if pitr and num < PITR_MIN_PG:
            checks.append(
                fail(
                    f"{name}: version",
                    InvalidInput(f"PITR needs PostgreSQL 15+, server is {facts['version']}"),
                    "set pitr false (logical dumps only) or upgrade the server",
                )
            )
        else:
            checks.append(ok(f"{name}: version", "supported (logical dumps; PITR 15+)"))
        tools = ["pg_dump", "pg_restore", "psql"] + (["pg_basebackup"] if pitr else [])
        for tool in tools:
            checks += run_check(
                f"{name}: tool-{tool}",
                f"install the PostgreSQL {num // 10000} (or newer) client tools",
                lambda tool=tool: pg_tool_check(name, tool, num),  # type: ignore[misc]
            )
        if pitr:
            checks += archiving_checks(name, c)
    return checks


def archiving_checks(name: str, c: Any) -> list[Check]:
    settings = dict(
        c.execute(
            "SELECT name, setting FROM pg_settings"
            " WHERE name IN ('archive_mode', 'archive_command')"
        ).fetchall()
    )
    mode, command = settings.get("archive_mode", "off"), settings.get("archive_command", "")
    fix = "ALTER SYSTEM SET archive_mode = on; archive_command = 'strongroom-wal push %p'"
    if mode == "off":
        return [fail(f"{name}: wal-archiving", InvalidInput("archive_mode is off"), fix)]
    if "strongroom-wal" not in command:
        return [
            fail(
                f"{name}: wal-archiving",
                InvalidInput("archive_command does not run strongroom-wal"),
                fix,
            )
        ]
    checks = [
        ok(f"{name}: wal-archiving", f"archive_mode={mode}, archive_command runs strongroom-wal")
    ]
    row = c.execute(
        "SELECT archived_count, failed_count, last_archived_time, last_failed_time,"
        " last_failed_wal, now() - last_archived_time FROM pg_stat_archiver"
    ).fetchone()
    archived, failed, last_ok, last_failed, failed_wal, since = row
    if last_failed is not None and (last_ok is None or last_failed > last_ok):
        checks.append(
            fail(
                f"{name}: wal-archiver",
                ToolFailed(f"last archive attempt failed ({failed_wal}, {failed} failures)"),
                "read the PostgreSQL log for strongroom-wal's error (repository, credentials)",
            )
        )
    elif since is not None and since.total_seconds() > MAX_ARCHIVE_LAG_S and archived:
        checks.append(
            warn(
                f"{name}: wal-archiver",
                f"nothing archived for {int(since.total_seconds())} s",
                "quiet server? set archive_timeout so a segment ships at least hourly",
            )
        )
    else:
        checks.append(
            ok(f"{name}: wal-archiver", f"{archived} archived, {failed} failed, no failure pending")
        )
    return checks


def _model_fields(model: type, name: str, data: dict[str, Any]) -> Any:
    fields = getattr(model, "model_fields", {})
    return model(name=name, **{k: v for k, v in data.items() if k in fields and v is not None})


def clickhouse_checks(name: str, data: dict[str, Any]) -> list[Check]:
    from strongroom.engines.clickhouse import native_client
    from strongroom.engines.clickhouse.capabilities import read_capabilities
    from strongroom.engines.clickhouse.conn import ClickHouseConnection
    from strongroom.engines.clickhouse.http_client import ClickHouseHTTP

    fix = f"check host/http_port/user/password of block strongroom-clickhouse-target/{name}"
    conn = _model_fields(ClickHouseConnection, name, data)
    try:
        caps = read_capabilities(ClickHouseHTTP(conn))
    except StrongroomError as exc:
        return [fail(f"{name}: connect", exc, fix)]
    checks = [
        ok(f"{name}: connect", f"ClickHouse {caps.version_text} at {conn.host}:{conn.http_port}")
    ]
    if conn.incremental and not caps.part_checksums:
        checks.append(
            warn(
                f"{name}: version",
                "no part checksums on this server: every backup is full",
                "fine for small data; incremental backups need ClickHouse 22+",
            )
        )
    else:
        swap = "atomic EXCHANGE" if caps.exchange_tables else "two-rename"
        checks.append(ok(f"{name}: version", f"supported ({swap} swap on restore)"))
    path = native_client.tool()
    if path:
        checks.append(ok(f"{name}: tool-clickhouse-client", f"{native_client.version()} ({path})"))
    elif conn.export_via == "clickhouse-client":
        checks.append(
            fail(
                f"{name}: tool-clickhouse-client",
                ToolFailed("clickhouse-client is not installed (not on PATH)"),
                "install clickhouse-client or set export_via to auto/http",
            )
        )
    else:
        checks.append(
            warn(
                f"{name}: tool-clickhouse-client",
                "not installed: exports go over HTTP (slower on large tables)",
                "install clickhouse-client for native-protocol exports",
            )
        )
    return checks


def redis_checks(name: str, data: dict[str, Any]) -> list[Check]:
    from strongroom.engines.redis.conn import RedisConnection, server_info

    fix = f"check host/port/username/password of block strongroom-redis-target/{name}"
    conn = _model_fields(RedisConnection, name, data).model_copy(update={"connect_timeout": 5.0})
    try:
        info = server_info(conn.client(timeout=10), f"Redis {conn.address}")
    except StrongroomError as exc:
        return [fail(f"{name}: connect", exc, fix)]
    version = str(info.get("redis_version", "?"))
    checks = [ok(f"{name}: connect", f"Redis {version} at {conn.address}")]
    major = _major(version) or 0
    if major < 7:
        checks.append(
            warn(
                f"{name}: version",
                f"Redis {version}: no rdb-only SYNC (7+); backups fall back to BGSAVE or SCAN",
                "upgrade to Redis 7 for replication backups",
            )
        )
    else:
        checks.append(ok(f"{name}: version", "supported (replication SYNC backups)"))
    checks += run_check(
        f"{name}: tool-redis-server", "install redis-server", lambda: redis_tool(name)
    )
    return checks


def redis_tool(name: str) -> Check:
    from strongroom.engines.redis.scratch import local_redis_version, redis_server_binary

    path = redis_server_binary()  # live restores run a scratch server
    return ok(f"{name}: tool-redis-server", f"redis-server {local_redis_version()} ({path})")


TARGET_CHECKS: dict[str, Callable[[str, dict[str, Any]], list[Check]]] = {
    "postgresql": postgres_checks,
    "clickhouse": clickhouse_checks,
    "redis": redis_checks,
}


# ---- repository -----------------------------------------------------------------------------


def repository_checks(config: Any) -> list[Check]:
    from strongroom.repository import open_repository

    repo = open_repository(config)
    if config.kind == "local":
        return [*write_probe(repo, locked=False), ok("clock-skew", "local repository: no S3 clock")]
    from strongroom.repository.s3_client import s3_client_from_config

    client = s3_client_from_config(config)
    checks: list[Check] = []
    try:
        head = client.head_bucket(Bucket=config.bucket)
    except Exception as exc:
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise AccessDenied(f"S3 refused the credentials for bucket {config.bucket}") from None
        if code in ("404", "NoSuchBucket"):
            raise NotFound(f"S3 bucket {config.bucket} does not exist") from None
        raise ServiceUnavailable(f"S3 bucket {config.bucket} unreachable: {exc}") from None
    checks.append(ok("repository", f"{repo.describe()} reachable"))
    checks.append(clock_skew(head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")))
    lock: Any = None
    for setting in ("versioning", "object_lock"):
        try:
            value = repo.bucket_setting(setting)  # type: ignore[attr-defined]
        except Unsupported as exc:
            checks.append(
                warn(f"repository-{setting}", f"the store lacks {exc.api}", "unknown: not checked")
            )
            continue
        if setting == "versioning":
            status = (value or {}).get("Status") or "never enabled"
            checks.append(ok("repository-versioning", f"versioning {status}"))
        else:
            lock = value
            state = (value or {}).get("ObjectLockEnabled") if value else None
            if state == "Enabled":
                rule = (value or {}).get("Rule") or {}
                checks.append(ok("repository-object-lock", f"object lock enabled {rule or ''}"))
            elif config.lock_mode:
                checks.append(
                    fail(
                        "repository-object-lock",
                        InvalidInput(f"lock_mode {config.lock_mode} but the bucket has no lock"),
                        "create the bucket with object lock, or clear lock_mode",
                    )
                )
            else:
                checks.append(ok("repository-object-lock", "no object lock"))
    locked = bool(lock and lock.get("ObjectLockEnabled") == "Enabled")
    return [checks[0], *write_probe(repo, locked=locked), *checks[1:]]


def write_probe(repo: Any, *, locked: bool) -> list[Check]:
    fix = "give the runner write and delete permission on the repository"
    if locked:
        list(repo.list(PROBE_PREFIX))
        return [
            warn(
                "repository-write",
                "not probed: object lock would keep a probe object for its retention",
                "a backup run shows whether writes work; listing works",
            )
        ]
    key = f"{PROBE_PREFIX}probe-{uuid.uuid4().hex}"
    body = f"strongroom doctor {time.time()}".encode()

    def probe() -> Check:
        try:
            repo.put_bytes(key, body)
        except StrongroomError as exc:  # its class's exit code, said as the write it was
            reason = f"cannot write the probe {key} to {repo.describe()}: {exc}"
            return Check("repository-write", FAIL, reason, fix, exc.exit_code)
        try:
            if repo.get_bytes(key) != body:
                raise ServiceUnavailable("the probe read back differs from what was written")
        finally:
            repo.delete(key)
        return ok("repository-write", f"wrote, read and deleted {key}")

    return run_check("repository-write", fix, probe)


def clock_skew(date_header: str | None) -> Check:
    if not date_header:
        return warn("clock-skew", "the S3 response carries no Date header", "unknown: not checked")
    server = email.utils.parsedate_to_datetime(date_header)
    skew = (dt.datetime.now(dt.UTC) - server).total_seconds()
    if abs(skew) > MAX_SKEW_S:
        return warn(
            "clock-skew",
            f"local clock {skew:+.0f} s off S3's (over {MAX_SKEW_S:.0f} s; SigV4 fails at 900 s)",
            "sync the clock (chrony/ntpd)",
        )
    return ok("clock-skew", f"{skew:+.1f} s against S3 (within {MAX_SKEW_S:.0f} s)")
