"""Verify and restore ClickHouse backups of the ``native`` method (``native_backup``)
with the server's own ``RESTORE DATABASE ... FROM S3(...)``.

Why a module of its own: a native backup is opaque to strongroom (the server's part
files, not a stream strongroom can walk), so the proof that it restores is a restore.
``verify_native_backup`` restores every database under a scratch name
(``__sr_verify_<random>``), compares each table's fingerprint with the manifest and
drops the scratch databases again. ``restore_native`` (reached through
``restore_clickhouse`` for a manifest of kind ``native``) restores whole databases,
renamed with ``target_database``; an existing database is refused unless
``drop_existing``, and then it is renamed aside first and only dropped once the
restored one's fingerprints match (on a mismatch the restored one is dropped and the
old one renamed back). Before the server reads anything: every object of the backup
and of its base chain must be present with its recorded size, and the CREATE
statements it will run (read back and checked against their recorded sha256) must
pass the engine allowlist (``table_engines``), as in a logical restore.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
import uuid
from typing import Any

from strongroom.catalog import Artifact, Catalog, Manifest
from strongroom.config import EncryptionConfig
from strongroom.engines.clickhouse import inspection as inspect
from strongroom.engines.clickhouse.conn import ClickHouseConnection
from strongroom.engines.clickhouse.http_client import ClickHouseHTTP
from strongroom.engines.clickhouse.inventory import ENGINE, inspect_database
from strongroom.engines.clickhouse.native_backup import (
    FOLDER,
    NATIVE_KIND,
    TableState,
    file_name,
    location_of,
    require_backup_statement,
    require_s3,
)
from strongroom.engines.clickhouse.plan import ChRestoreRequest, check_name
from strongroom.engines.clickhouse.sql import quote_ident
from strongroom.engines.clickhouse.table_engines import check_objects
from strongroom.errors import IntegrityError, InvalidInput, NotFound, TargetNotEmpty
from strongroom.redact import register
from strongroom.repository.base import Repository
from strongroom.repository.s3 import S3Repository
from strongroom.signing import MAX_RECORD_SIZE
from strongroom.verify import check_manifest

VERIFY_PREFIX = "__sr_verify_"
ASIDE_PREFIX = "__sr_old_"
READ_CHUNK = 1024 * 1024


# ----------------------------------------------------------------- the backup's objects


def chain_of(repo: Repository, manifest: Manifest) -> list[Manifest]:
    """The backup and the base backups it needs, newest first (each one loaded strictly:
    signed by a trusted key)."""
    chain = [manifest]
    catalog = Catalog(repo)
    while (base_id := chain[-1].details.get("base_backup_id")) is not None:
        if len(chain) > 1000 or any(m.backup_id == base_id for m in chain):
            raise IntegrityError(f"backup {manifest.backup_id}: its base chain loops")
        base = catalog.load(ENGINE, manifest.target, str(base_id))
        if base.kind != NATIVE_KIND:
            raise IntegrityError(f"base backup {base_id} is not a native backup")
        chain.append(base)
    return chain


def check_present(repo: S3Repository, chain: list[Manifest]) -> int:
    """Every object of every backup of the chain is there with its recorded size (one
    listing per backup); returns how many were checked."""
    checked = 0
    for m in chain:
        listed = {info.key: info.size for info in repo.list(f"data/{ENGINE}/{m.target}/")}
        for a in m.artifacts:
            if listed.get(a.key) != a.stored_size:
                found = "missing" if a.key not in listed else f"{listed[a.key]} bytes"
                raise IntegrityError(
                    f"backup {m.backup_id}: object {a.key} is {found}, the manifest records "
                    f"{a.stored_size} bytes; nothing restored"
                )
            checked += 1
    return checked


def read_checked(repo: S3Repository, artifact: Artifact, max_size: int | None = None) -> bytes:
    """An object's bytes (a small one, whole) or b'' (``max_size`` 0: only hashed),
    refused unless its sha256 is the recorded one."""
    digest, kept = hashlib.sha256(), bytearray()
    with repo.open_read(artifact.key) as source:
        while chunk := source.read(READ_CHUNK):
            digest.update(chunk)
            if max_size is None or len(kept) < max_size:
                kept += chunk
    if digest.hexdigest() != artifact.stored_sha256:
        raise IntegrityError(
            f"object {artifact.key} does not match the sha256 its manifest records "
            "(changed since the backup)"
        )
    return bytes(kept)


def hash_all(repo: S3Repository, chain: list[Manifest]) -> int:
    """Read back every object of the chain against its sha256; bytes read."""
    total = 0
    for m in chain:
        for a in m.artifacts:
            read_checked(repo, a, max_size=0)
            total += a.stored_size
    return total


def _metadata(chain: list[Manifest]) -> dict[str, Artifact]:
    """``metadata/...sql`` name -> artifact, from the newest backup holding it (an
    incremental stores only what changed; the rest is in its bases)."""
    found: dict[str, Artifact] = {}
    prefix = f"{FOLDER}/metadata/"
    for m in chain:
        for a in m.artifacts:
            if a.name.startswith(prefix) and a.name.endswith(".sql"):
                found.setdefault(a.name[len(prefix) :], a)
    return found


def check_ddl(
    repo: S3Repository, chain: list[Manifest], databases: list[str], allow: list[str]
) -> dict[str, Any]:
    """The CREATE statements the server will run, checked against their sha256 and the
    engine allowlist before anything is created."""
    files = _metadata(chain)
    docs: dict[str, dict[str, Any]] = {}
    objects: list[dict[str, Any]] = []
    for db in databases:
        esc = file_name(db)
        doc: dict[str, Any] = {"objects": {}}
        if f"{esc}.sql" in files:
            doc["create_database"] = _text(repo, files[f"{esc}.sql"])
        for rel, artifact in sorted(files.items()):
            if rel.startswith(f"{esc}/"):
                name = rel[len(esc) + 1 : -len(".sql")]
                doc["objects"][name] = {"create": _text(repo, artifact)}
                objects.append({"database": db, "name": name})
        docs[db] = doc
    return check_objects(docs, objects, allow)


def _text(repo: S3Repository, artifact: Artifact) -> str:
    if artifact.stored_size > MAX_RECORD_SIZE:
        raise IntegrityError(f"{artifact.key}: a CREATE statement of {artifact.stored_size} B")
    return read_checked(repo, artifact).decode("utf-8", "surrogateescape")


# ----------------------------------------------------------------- restore and compare


def _restore_statement(pairs: dict[str, str], where: str) -> str:
    items = ", ".join(f"DATABASE {quote_ident(s)} AS {quote_ident(t)}" for s, t in pairs.items())
    return f"RESTORE {items} FROM {where}"


def compare(
    client: ClickHouseHTTP, manifest: Manifest, source: str, restored: str, stage: str
) -> list[dict[str, Any]]:
    """Each data table of ``source`` in the manifest against the restored database."""
    entries = next(d for d in manifest.details["databases"] if d["name"] == source)["tables"]
    found = {o["name"]: o for o in inspect_database(client, {"name": restored, "engine": ""})}
    state = TableState(client, [])
    checks = []
    for entry in entries:
        if not entry["data"]:
            continue
        expected = (
            {p["id"]: {"rows": p["rows"], "hash": p["hash"]} for p in entry["partitions"]}
            if entry["partitions"]
            else ({"": entry["fingerprint"]} if entry["fingerprint"]["rows"] else {})
        )
        obj = found.get(entry["name"])
        actual = state.prints(obj) if obj is not None and obj["data"] else None
        if actual is not None and not entry["partitions"] and len(actual) > 1:
            actual = {"": inspect.total(actual)}
        checks.append(
            {
                "table": f"{restored}.{entry['name']}",
                "stage": stage,
                "partitions": len(expected),
                "expected_rows": entry["rows"],
                "actual_rows": inspect.total(actual)["rows"] if actual is not None else None,
                "ok": actual == expected,
            }
        )
    return checks


def _drop(client: ClickHouseHTTP, database: str) -> None:
    client.execute(
        f"DROP DATABASE IF EXISTS {quote_ident(database)} SYNC", what=f"dropping {database}"
    )


def _native_request(req: ChRestoreRequest, manifest: Manifest) -> dict[str, str]:
    """Source database -> target database, or a clear refusal of what a native restore
    cannot do (it restores whole databases)."""
    unsupported = [
        name
        for name, used in (
            ("tables", req.tables),
            ("partitions", req.partitions),
            ("schema_only", req.schema_only),
            ("data_only", req.data_only),
        )
        if used
    ]
    if unsupported:
        raise InvalidInput(
            f"backup {manifest.backup_id} is a native BACKUP: it restores whole databases; "
            f"{', '.join(unsupported)} need a logical backup"
        )
    names = [d["name"] for d in manifest.details["databases"]]
    chosen = req.databases or names
    missing = [d for d in chosen if d not in names]
    if missing:
        raise NotFound(f"backup {manifest.backup_id} has no database {missing[0]!r}: {names}")
    if req.target_database is not None and len(chosen) != 1:
        raise InvalidInput("target_database needs exactly one selected database")
    return {d: check_name(req.target_database or d, "target database") for d in chosen}


def restore_native(
    conn: ClickHouseConnection,
    repo: Repository,
    enc: EncryptionConfig,
    manifest: Manifest,
    req: ChRestoreRequest,
) -> dict[str, Any]:
    """Restore a native backup per ``req``; returns the plan (dry run) or the report."""
    register(*conn.secrets(), *enc.secrets())
    s3 = require_s3(repo, f"restore of native backup {manifest.backup_id}")
    pairs = _native_request(req, manifest)
    client = ClickHouseHTTP(conn)
    require_backup_statement(client)
    chain = chain_of(repo, manifest)
    existing = {d["name"] for d in inspect.list_databases(client)}
    taken = [t for t in pairs.values() if t in existing]
    plan: dict[str, Any] = {
        "backup_id": manifest.backup_id,
        "backup_finished_at": manifest.finished_at.isoformat(),
        "source_target": manifest.target,
        "target_server": conn.describe(),
        "mode": "native (RESTORE DATABASE, whole databases)",
        "databases": pairs,
        "tables": [
            f"{pairs[d['name']]}.{t['name']}"
            for d in manifest.details["databases"]
            if d["name"] in pairs
            for t in d["tables"]
        ],
        "rows": sum(
            t["rows"] or 0
            for d in manifest.details["databases"]
            if d["name"] in pairs
            for t in d["tables"]
        ),
        "raw_size": sum(a.raw_size for m in chain for a in m.artifacts),
        "chain": [m.backup_id for m in chain],
        "drop_existing": req.drop_existing,
        "would_replace": taken,
    }
    plan["objects_checked"] = check_present(s3, chain)
    plan["engines"] = check_ddl(s3, chain, list(pairs), req.allow_engines)
    if taken and not req.drop_existing:
        blocked = f"database(s) {', '.join(taken)} exist on the server"
        if req.dry_run:
            return {**plan, "dry_run": True, "blocked": blocked}
        raise TargetNotEmpty(f"refusing to overwrite: {blocked}; pass drop_existing to replace")
    if req.dry_run:
        return {**plan, "dry_run": True}
    started = time.monotonic()
    run = uuid.uuid4().hex[:12]
    aside: dict[str, str] = {}
    restored: list[str] = []
    try:
        for target in taken:
            aside[target] = f"{ASIDE_PREFIX}{run}_{len(aside)}"
            client.execute(
                f"RENAME DATABASE {quote_ident(target)} TO {quote_ident(aside[target])}",
                what=f"renaming {target} aside",
            )
        restored = list(pairs.values())
        client.execute(
            _restore_statement(pairs, location_of(s3, conn, manifest).clause()),
            settings={"max_execution_time": 0},
            what=f"RESTORE of backup {manifest.backup_id}",
        )
        checks = [c for s, t in pairs.items() for c in compare(client, manifest, s, t, "final")]
        bad = [c["table"] for c in checks if not c["ok"]]
        if bad:
            raise IntegrityError(
                f"restored tables differ from the backup's fingerprints: {', '.join(bad[:5])}"
            )
    except BaseException:
        for target in restored:
            _drop(client, target)
        for target, old in aside.items():
            client.execute(
                f"RENAME DATABASE {quote_ident(old)} TO {quote_ident(target)}",
                what=f"renaming {target} back",
            )
        raise
    for old in aside.values():
        _drop(client, old)
    return {
        **plan,
        "dry_run": False,
        "duration_s": round(time.monotonic() - started, 3),
        "restored_at": dt.datetime.now(dt.UTC).isoformat(),
        "checks": checks,
        "fingerprints_ok": True,
        "leftovers": [],
    }


def verify_native_backup(
    conn: ClickHouseConnection,
    repo: Repository,
    manifest: Manifest,
    enc: EncryptionConfig,
    *,
    read_objects: bool = True,
) -> dict[str, Any]:
    """Prove a native backup restores: signature, objects (sha256 of every object of
    the chain when ``read_objects``), a scratch RESTORE of every database on ``conn``'s
    server, fingerprints equal to the manifest's; the scratch databases are dropped."""
    register(*conn.secrets(), *enc.secrets())
    s3 = require_s3(repo, f"verify of native backup {manifest.backup_id}")
    client = ClickHouseHTTP(conn)
    require_backup_statement(client)
    started = time.monotonic()
    report: dict[str, Any] = {
        "backup_id": manifest.backup_id,
        "engine": manifest.engine,
        "target": manifest.target,
        "kind": manifest.kind,
        "manifest": check_manifest(repo, manifest, enc),
        "checks": [],
    }
    try:
        chain = chain_of(repo, manifest)
        report["chain"] = [m.backup_id for m in chain]
        report["objects_present"] = check_present(s3, chain)
        report["bytes_read"] = hash_all(s3, chain) if read_objects else 0
        sources = [d["name"] for d in manifest.details["databases"]]
        check_ddl(s3, chain, sources, [])
    except (IntegrityError, NotFound, InvalidInput) as exc:
        report.update(ok=False, error=str(exc), duration_s=round(time.monotonic() - started, 3))
        return report
    scratch = {s: f"{VERIFY_PREFIX}{uuid.uuid4().hex[:12]}" for s in sources}
    try:
        client.execute(
            _restore_statement(scratch, location_of(s3, conn, manifest).clause()),
            settings={"max_execution_time": 0},
            what=f"scratch RESTORE of backup {manifest.backup_id}",
        )
        for source, name in scratch.items():
            report["checks"] += compare(client, manifest, source, name, "scratch restore")
    finally:
        for name in scratch.values():
            _drop(client, name)
    report["scratch_databases"] = list(scratch.values())
    report["ok"] = bool(report["manifest"]["ok"]) and all(c["ok"] for c in report["checks"])
    report["duration_s"] = round(time.monotonic() - started, 3)
    return report
