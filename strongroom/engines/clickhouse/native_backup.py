"""ClickHouse backups by the server's own ``BACKUP DATABASE ... TO S3(...)`` (the
``native`` method of a target; not to be confused with ``FORMAT Native``, which the
logical method in ``backup.py`` exports).

Why a second method: the server copies its data parts as they are (no decompression,
no re-encoding, incrementals by ``base_backup`` at part level), which is far cheaper
than reading every row. The price: the server writes straight into the S3 repository,
so the data is **not** age-encrypted (server-side encryption of the bucket only), and
the server needs the repository's S3 credentials (sent only in the HTTP request body,
registered with ``strongroom.redact``; ClickHouse 26.x shows them as ``[HIDDEN]`` in
``system.backups``, but an older server may keep them in its ``query_log``).

What strongroom still guarantees: the backup goes under the backup's own data prefix
(``data/clickhouse/<target>/<id>/native/``), so retention owns and deletes it like any
other; every object the server wrote is listed, read back whole and its sha256 and
size recorded as an artifact (proof it is durable, and what verify re-checks); the
repository's object lock is put on each object; per-table fingerprints are taken
before and the table state re-checked after (a table that changed meanwhile makes
the run retry, like the logical method); only then is the signed manifest (kind
``native``) published. On any failure what the server wrote is deleted.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

from strongroom.artifacts import claim_backup_id, publish_backup, storage_settings
from strongroom.catalog import Artifact, Catalog, Manifest, data_key
from strongroom.config import EncryptionConfig, RepositoryConfig
from strongroom.engines.clickhouse import inspection as inspect
from strongroom.engines.clickhouse.conn import ClickHouseConnection
from strongroom.engines.clickhouse.http_client import ClickHouseHTTP
from strongroom.engines.clickhouse.inventory import ENGINE, inspect_database
from strongroom.engines.clickhouse.sql import quote_ident, quote_string
from strongroom.errors import Conflict, IntegrityError, InvalidInput, NotFound, StrongroomError
from strongroom.ids import new_backup_id
from strongroom.redact import register
from strongroom.repository.base import Repository
from strongroom.repository.s3 import S3Repository
from strongroom.verify import SERVER_WRITTEN

log = logging.getLogger(__name__)

NATIVE_KIND = "native"
FILE_CONTENT = "clickhouse-backup-file"
NO_CLIENT_ENCRYPTION = SERVER_WRITTEN  # artifact.encryption: the server wrote it, no age
SERVER_WRITTEN = "none (written by the ClickHouse server; its own part compression)"
FOLDER = "native"
CHANGE_ATTEMPTS = 3
READ_CHUNK = 1024 * 1024
SETTLE_TIMEOUT_S = 120.0
# ClickHouse's escapeForFileName keeps these, writes every other byte as %XX
_FILE_SAFE = re.compile(r"[A-Za-z0-9_]")
_KEY_PART_MAX = 200


# ----------------------------------------------------------------- where and how


def require_s3(repo: Repository, what: str) -> S3Repository:
    """The native method writes through the server into S3: refused for anything else."""
    if not isinstance(repo, S3Repository):
        raise InvalidInput(
            f"{what}: the native method needs an S3 repository (the ClickHouse server "
            f"writes the backup into the bucket itself); {repo.describe()} is not one. "
            "Use method 'logical' for a local repository"
        )
    return repo


def require_backup_statement(client: ClickHouseHTTP) -> str:
    """The server's version, if it has ``BACKUP``/``RESTORE`` (``system.backups`` is
    there exactly when it does); a clear refusal otherwise (18.16 has neither)."""
    version = str(client.tuples("SELECT version()", what="reading the server version")[0][0])
    found = client.tuples(
        "SELECT count() FROM system.tables WHERE database = 'system' AND name = 'backups'",
        what="asking whether the server has BACKUP",
    )
    if not int(found[0][0]):
        raise InvalidInput(
            f"ClickHouse {version} at {client.where} has no BACKUP/RESTORE statement "
            "(no system.backups; it arrived in 22.x): use method 'logical' for this target"
        )
    return version


def file_name(name: str) -> str:
    return "".join(
        ch if _FILE_SAFE.fullmatch(ch) else "".join(f"%{b:02X}" for b in ch.encode()) for ch in name
    )


def check_names(objects: list[dict[str, Any]], databases: list[str]) -> None:
    """Names the server's file names (escaped, %XX) fit into repository keys."""
    names = [*databases, *(o["name"] for o in objects), *(o["data_table"] or "" for o in objects)]
    for name in names:
        if len(file_name(name)) > _KEY_PART_MAX:
            raise InvalidInput(
                f"name {name[:60]!r} is too long for the native method's object keys "
                f"(over {_KEY_PART_MAX} bytes escaped); use method 'logical'"
            )


class S3Location:
    """An ``S3('<url>', key, secret)`` clause for one folder of the repository. The
    secret appears only in ``clause()`` (which goes into a request body), never in
    ``url`` or ``describe()``."""

    def __init__(self, repo: S3Repository, conn: ClickHouseConnection, key_prefix: str) -> None:
        config = repo.config
        endpoint = (
            conn.native_s3_endpoint
            or config.endpoint_url
            or f"https://s3.{config.region}.amazonaws.com"
        ).rstrip("/")
        root = f"{repo.root}/" if repo.root else ""
        self.key_prefix = key_prefix
        self.url = f"{endpoint}/{repo.bucket}/{root}{key_prefix}"
        self._key_id = config.access_key_id
        secret = config.secret_access_key
        self._secret = secret.get_secret_value() if secret is not None else None
        register(self._secret)

    def clause(self) -> str:
        if self._key_id and self._secret:
            return (
                f"S3({quote_string(self.url)}, {quote_string(self._key_id)}, "
                f"{quote_string(self._secret)})"
            )
        # no keys in the repository config: the server's own S3 credentials are used
        return f"S3({quote_string(self.url)})"

    def describe(self) -> str:
        return f"S3({self.url})"


def native_prefix(target: str, backup_id: str) -> str:
    return data_key(ENGINE, target, backup_id, f"{FOLDER}/")


def location_of(repo: S3Repository, conn: ClickHouseConnection, manifest: Manifest) -> S3Location:
    return S3Location(repo, conn, native_prefix(manifest.target, manifest.backup_id))


# ----------------------------------------------------------------- table state


class TableState:
    """Fingerprints and the change-detecting state (active parts, or the row count of the
    append-only Log family and Memory) of every data-holding object of some databases."""

    def __init__(self, client: ClickHouseHTTP, objects: list[dict[str, Any]]) -> None:
        self.client = client
        self.objects = [o for o in objects if o["data"]]

    @staticmethod
    def ident(obj: dict[str, Any]) -> tuple[str, str]:
        return obj["database"], obj["name"]

    def marker(self, obj: dict[str, Any]) -> Any:
        db, table = obj["database"], obj["data_table"]
        if inspect.is_merge_tree(obj["data_engine"]):
            return [p["name"] for p in inspect.active_parts(self.client, db, table)]
        return inspect.count_rows(self.client, db, table)

    def prints(self, obj: dict[str, Any], database: str | None = None) -> dict[str, Any]:
        partitioned = inspect.is_merge_tree(obj["data_engine"]) and bool(obj["partition_key"])
        return inspect.fingerprint(
            self.client,
            database or obj["database"],
            obj["data_table"],
            inspect.stored_columns(obj["columns"]),
            by_partition=partitioned,
        )

    def markers(self) -> dict[tuple[str, str], Any]:
        return {self.ident(o): self.marker(o) for o in self.objects}

    def all_prints(self) -> dict[tuple[str, str], dict[str, Any]]:
        return {self.ident(o): self.prints(o) for o in self.objects}


def table_entry(obj: dict[str, Any], prints: dict[str, Any] | None) -> dict[str, Any]:
    """A manifest table entry (the shape the logical method's summary readers expect)."""
    entry = {
        k: obj[k]
        for k in (
            "name",
            "kind",
            "engine",
            "data",
            "data_table",
            "data_engine",
            "partition_key",
            "sorting_key",
            "columns",
            "note",
        )
    }
    entry["rows"] = inspect.total(prints)["rows"] if prints is not None else None
    entry["fingerprint"] = inspect.total(prints) if prints is not None else None
    entry["fingerprint_aggregates"] = "finalized"
    entry["partitions"] = (
        [{"id": pid, "rows": p["rows"], "hash": p["hash"]} for pid, p in sorted(prints.items())]
        if prints is not None and obj["partition_key"]
        else []
    )
    entry["artifacts"] = []
    return entry


# ----------------------------------------------------------------- objects written


def _sha256(repo: S3Repository, key: str) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with repo.open_read(key) as source:
        while chunk := source.read(READ_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def written_objects(repo: S3Repository, prefix: str) -> Iterator[tuple[str, int]]:
    for info in repo.list(prefix):
        yield info.key, info.size


def record_objects(repo: S3Repository, target: str, backup_id: str) -> list[Artifact]:
    """Every object the server wrote, read back whole: sizes, sha256, server-side
    encryption as the storage reports it."""
    prefix = native_prefix(target, backup_id)
    base = data_key(ENGINE, target, backup_id, "")
    artifacts: list[Artifact] = []
    for key, listed in written_objects(repo, prefix):
        sha, size = _sha256(repo, key)
        if size != listed:
            raise IntegrityError(f"{key}: listed with {listed} bytes, {size} read back")
        head = repo.head(key) or {}
        artifacts.append(
            Artifact(
                name=key[len(base) :],
                key=key,
                content=FILE_CONTENT,
                raw_size=size,
                stored_size=size,
                raw_sha256=sha,
                stored_sha256=sha,
                compression=SERVER_WRITTEN,
                compression_level=0,
                encryption=NO_CLIENT_ENCRYPTION,
                recipients=[],
                meta={"server_side_encryption": str(head.get("ServerSideEncryption") or "none")},
            )
        )
    if not any(a.name == f"{FOLDER}/.backup" for a in artifacts):
        raise IntegrityError(f"the server wrote no {FOLDER}/.backup under {prefix}")
    return artifacts


def require_sse(repo_config: RepositoryConfig, artifacts: list[Artifact]) -> None:
    """A repository configured with SSE promises it on every object; the server cannot
    ask for it per object (ClickHouse sends no SSE headers), only the bucket's default
    encryption provides it."""
    if repo_config.sse == "none":
        return
    plain = [a.name for a in artifacts if a.meta["server_side_encryption"] == "none"]
    if plain:
        raise IntegrityError(
            f"the repository requires server-side encryption ({repo_config.sse}) but "
            f"{len(plain)} object(s) the ClickHouse server wrote have none (e.g. "
            f"{plain[0]}): the server cannot request it per object, so give the bucket "
            "a default encryption (PutBucketEncryption) for the native method"
        )


def delete_written(repo: S3Repository, prefix: str) -> int:
    """Remove what the server wrote (best effort per object; returns how many)."""
    removed = 0
    for key, _size in list(written_objects(repo, prefix)):
        try:
            repo.delete(key)
            removed += 1
        except StrongroomError as exc:
            log.warning("native backup: could not delete %s: %s", key, exc)
    return removed


def settle(client: ClickHouseHTTP, backup_run: str, timeout: float = SETTLE_TIMEOUT_S) -> str:
    """Wait until the server no longer works on BACKUP ``backup_run`` (a dropped HTTP
    answer does not stop it); returns its last status ('' when unknown)."""
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        try:
            rows = client.tuples(
                f"SELECT status FROM system.backups WHERE id = {quote_string(backup_run)}",
                what="reading the BACKUP's status",
            )
        except StrongroomError:
            return status
        status = str(rows[0][0]) if rows else ""
        if status not in ("CREATING_BACKUP", "RESTORING"):
            return status
        time.sleep(0.5)
    return status


# ----------------------------------------------------------------- the backup


def _base_manifest(
    repo: S3Repository, conn: ClickHouseConnection, base_backup_id: str | None, full: bool
) -> Manifest | None:
    """The native backup this one is based on: the one asked for, or (the target's
    ``incremental``, not ``full``) the latest native one; a full one when the chain holds
    ``full_every`` backups."""
    catalog = Catalog(repo)
    if base_backup_id is not None:
        base = catalog.resolve(base_backup_id, ENGINE, conn.name)
        if base.kind != NATIVE_KIND:
            raise InvalidInput(
                f"base backup {base.backup_id} is a {base.kind} backup; a native backup can "
                "only be based on a native one"
            )
        return base
    if full or not conn.incremental:
        return None
    try:
        latest = catalog.resolve("latest", ENGINE, conn.name, kind=NATIVE_KIND)
    except NotFound:
        return None
    if int(latest.details.get("chain_length", 1)) >= conn.full_every:
        return None
    return latest


def _backup_statement(databases: list[str], where: S3Location, run: str, base: str | None) -> str:
    items = ", ".join(f"DATABASE {quote_ident(d)}" for d in databases)
    settings = f"id = {quote_string(run)}" + (f", base_backup = {base}" if base else "")
    return f"BACKUP {items} TO {where.clause()} SETTINGS {settings}"


def backup_native(
    conn: ClickHouseConnection,
    repo: Repository,
    repo_config: RepositoryConfig,
    enc: EncryptionConfig,
    *,
    backup_id: str | None = None,
    labels: dict[str, str] | None = None,
    base_backup_id: str | None = None,
    full: bool = False,
) -> Manifest:
    """``BACKUP DATABASE ... TO S3`` of the target's databases; returns the published
    manifest. ``base_backup_id`` (or the target's ``incremental`` unless ``full``) makes
    it incremental (``base_backup``)."""
    register(*conn.secrets(), *repo_config.secrets(), *enc.secrets())
    s3 = require_s3(repo, f"native backup of {conn.name}")
    client = ClickHouseHTTP(conn)
    version = require_backup_statement(client)
    started = dt.datetime.now(dt.UTC)
    bid = backup_id or new_backup_id(started)
    claim_backup_id(repo, ENGINE, conn.name, bid)
    settings = storage_settings(repo_config, started)
    base = _base_manifest(s3, conn, base_backup_id, full)
    server = inspect.server_facts(client)
    databases = inspect.select_databases(
        inspect.list_databases(client), conn.databases, conn.exclude_databases
    )
    names = [d["name"] for d in databases]
    objects = [o for d in databases for o in inspect_database(client, d)]
    check_names(objects, names)
    state = TableState(client, objects)
    where = S3Location(s3, conn, native_prefix(conn.name, bid))
    base_clause = location_of(s3, conn, base).clause() if base is not None else None
    for attempt in range(CHANGE_ATTEMPTS):
        run = f"sr-{bid}-{attempt}-{uuid.uuid4().hex[:8]}"
        try:
            before = state.markers()
            prints = state.all_prints()
            t0 = time.monotonic()
            client.execute(
                _backup_statement(names, where, run, base_clause),
                settings={"max_execution_time": 0},
                what=f"BACKUP of {', '.join(names)[:200]} to {where.describe()}",
            )
            seconds = round(time.monotonic() - t0, 3)
            if state.markers() != before and state.all_prints() != prints:
                delete_written(s3, where.key_prefix)
                log.warning("native backup %s: tables changed during BACKUP, again", bid)
                continue
            artifacts = record_objects(s3, conn.name, bid)
            require_sse(repo_config, artifacts)
            locked = sum(s3.apply_lock(a.key, settings) for a in artifacts)
            manifest = _manifest(
                conn, s3, bid, started, server, version, artifacts, databases, objects, prints, base
            )
            manifest.details.update(
                backup_seconds=seconds,
                object_lock=f"{locked} object(s) locked" if locked else "no lock_mode",
            )
            manifest.labels = dict(labels or {})
            publish_backup(repo, manifest, settings)
            return manifest
        except BaseException:
            settle(client, run)
            delete_written(s3, where.key_prefix)
            raise
    raise Conflict(
        f"the tables of {conn.name} kept changing during BACKUP ({CHANGE_ATTEMPTS} attempts); "
        "stop writes for the backup (docs/clickhouse.md)"
    )


def _manifest(
    conn: ClickHouseConnection,
    repo: S3Repository,
    bid: str,
    started: dt.datetime,
    server: dict[str, Any],
    version: str,
    artifacts: list[Artifact],
    databases: list[dict[str, str]],
    objects: list[dict[str, Any]],
    prints: dict[tuple[str, str], dict[str, Any]],
    base: Manifest | None,
) -> Manifest:
    by_db: dict[str, list[dict[str, Any]]] = {d["name"]: [] for d in databases}
    engines = {d["name"]: d["engine"] for d in databases}
    for obj in objects:
        entry = table_entry(obj, prints.get(TableState.ident(obj)) if obj["data"] else None)
        by_db.setdefault(obj["database"], []).append(entry)
    encryptions = sorted({str(a.meta["server_side_encryption"]) for a in artifacts})
    details: dict[str, Any] = {
        "format": "clickhouse-backup",
        "method": "BACKUP DATABASE ... TO S3 (the server writes into the repository)",
        "location": f"{FOLDER}/",
        "encryption": "server-side only (no age client-side encryption); objects report "
        f"SSE: {', '.join(encryptions)}",
        "consistency": "per table, like the logical method: fingerprints taken before the "
        "BACKUP, every table's parts (row count for the Log family) checked unchanged after",
        "fingerprint": "count() and sum(cityHash64(stored columns)) per partition",
        "databases": [
            {"name": d, "engine": engines[d], "tables": tables} for d, tables in by_db.items()
        ],
        "incremental": base is not None,
        "chain_length": int(base.details.get("chain_length", 1)) + 1 if base else 1,
    }
    if base is not None:
        details["base_backup_id"] = base.backup_id  # retention keeps it (owned.parents_of)
    return Manifest(
        backup_id=bid,
        engine=ENGINE,
        target=conn.name,
        kind=NATIVE_KIND,
        started_at=started,
        finished_at=dt.datetime.now(dt.UTC),
        repository=repo.describe(),
        tool_versions={"clickhouse-server": version, "method": "native BACKUP"},
        server={"host": conn.host, "http_port": conn.http_port, **server},
        artifacts=artifacts,
        details=details,
    )
