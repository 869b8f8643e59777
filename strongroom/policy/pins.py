"""Pinned ("keep forever") backups.

Manifests are never rewritten, so a pin is a small separate object:
``pins/<engine>/<target>/<backup_id>.json``. A manifest label ``keep=forever``
(or ``pinned=true``) set when the backup was taken pins it too. Unpinning
deletes the pin object (in a versioned bucket that adds a delete marker; the
old pin version is history, not a pin).

Pins are signed (``strongroom.signing``) like manifests. A pin that is not signed by a
trusted key still protects its backup from retention (fail safe: forging a pin can only
keep more data), but it is marked ``trusted: False`` and reported (``pin_findings``).
"""

from __future__ import annotations

import datetime as dt
import getpass
import logging
from typing import Any

from strongroom.catalog import Catalog, Manifest
from strongroom.errors import IntegrityError, InvalidInput, NotFound
from strongroom.ids import check_backup_id, check_engine, check_name, record_key_parts, scope_prefix
from strongroom.repository.base import Repository
from strongroom.signing import delete_signed, get_verified_json, put_signed_json

log = logging.getLogger(__name__)

PIN_LABELS = {"keep": "forever", "pinned": "true", "pin": "true"}


def pin_key(engine: str, target: str, backup_id: str) -> str:
    return f"pins/{check_engine(engine)}/{check_name(target, 'target name')}/{backup_id}.json"


def label_pinned(manifest: Manifest) -> bool:
    """True when the manifest's labels ask for the backup to be kept forever."""
    return any(manifest.labels.get(k, "").lower() == v for k, v in PIN_LABELS.items())


def pin(
    repo: Repository,
    backup_id: str,
    *,
    engine: str | None = None,
    target: str | None = None,
    reason: str = "",
    by: str | None = None,
) -> dict[str, Any]:
    """Pin a backup (it must exist). Pinning again replaces the reason. The pin is
    signed: a repository without a trusted signing key cannot pin."""
    repo.trust.require_signer("a pin")
    if backup_id == "latest" and not target:
        raise InvalidInput("pin 'latest' needs --engine and --target")
    manifest = Catalog(repo).resolve(backup_id, engine, target)
    if len(reason) > 500:
        raise InvalidInput("pin reason is longer than 500 characters")
    record = {
        "backup_id": manifest.backup_id,
        "engine": manifest.engine,
        "target": manifest.target,
        "pinned_at": dt.datetime.now(dt.UTC).isoformat(),
        "pinned_by": by if by is not None else _user(),
        "reason": reason,
    }
    key = pin_key(manifest.engine, manifest.target, manifest.backup_id)
    key_id = put_signed_json(repo, key, record, overwrite=True)
    return {**record, "key": key, "signed_by": key_id}


def unpin(
    repo: Repository, backup_id: str, *, engine: str | None = None, target: str | None = None
) -> dict[str, Any]:
    """Remove a pin. The backup becomes subject to the retention policy again."""
    check_backup_id(backup_id)
    pins = [p for p in list_pins(repo, engine, target) if p["backup_id"] == backup_id]
    if not pins:
        raise NotFound(f"backup {backup_id} is not pinned")
    if len(pins) > 1:
        raise InvalidInput(f"backup id {backup_id} is pinned for several targets; give --target")
    record = pins[0]
    delete_signed(repo, record["key"])
    return {**record, "unpinned_at": dt.datetime.now(dt.UTC).isoformat()}


def list_pins(
    repo: Repository, engine: str | None = None, target: str | None = None
) -> list[dict[str, Any]]:
    """Pin records (each with its ``key``), oldest backup first. Each has ``trusted``;
    an untrusted one (unsigned, foreign key, edited, malformed) is still listed (it
    still pins: fail safe) with ``untrusted`` saying why."""
    prefix = scope_prefix("pins", engine, target)
    found: list[dict[str, Any]] = []
    for info in repo.list(prefix):
        parts = record_key_parts(info.key, target)
        if parts is None:
            continue
        try:
            record, verdict = get_verified_json(repo, info.key, strict=False)
        except NotFound:
            continue
        except IntegrityError as exc:  # not JSON or oversized: still a pin (fail safe)
            record = {"trusted": False, "untrusted": f"pin {info.key} is unreadable: {exc}"}
        else:
            record["trusted"] = verdict.trusted
            if not verdict.trusted:
                record["untrusted"] = verdict.message("pin")
        if not record["trusted"]:
            log.warning("%s; it still protects its backup", record["untrusted"])
        record.update(
            {"engine": parts[1], "target": parts[2], "backup_id": parts[3][: -len(".json")]}
        )
        record["key"] = info.key
        found.append(record)
    return sorted(found, key=lambda r: (r["backup_id"], r["engine"], r["target"]))


def pinned_ids(
    repo: Repository, engine: str | None = None, target: str | None = None
) -> set[tuple[str, str, str]]:
    """(engine, target, backup_id) of every pinned backup."""
    return {(p["engine"], p["target"], p["backup_id"]) for p in list_pins(repo, engine, target)}


def pin_findings(
    repo: Repository, engine: str | None = None, target: str | None = None
) -> list[dict[str, Any]]:
    """Pins not signed by a trusted key (each: ``key``, ``backup_id``, ``error``): they
    still protect their backups, and retention reports should show them."""
    return [
        {"key": p["key"], "backup_id": p["backup_id"], "error": p["untrusted"]}
        for p in list_pins(repo, engine, target)
        if not p["trusted"]
    ]


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
