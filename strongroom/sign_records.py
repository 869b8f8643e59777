"""Signing records written before signing existed (``strongroom sign --records KIND``).

Why: pins, drill and verification records, restore points, audit events and compliance
reports written by an older strongroom have no ``.sig``, so every reader now treats
them as untrusted. An operator who confirms they are genuine signs them here. Like
``strongroom sign`` for manifests: only records with no signature at all are signed (a
bad or foreign signature is refused), every record named is checked before any
signature is written, a record is never rewritten (only its ``.sig`` is written, the
record names no key: readers check it against every trusted key) and each signature
is recorded in the audit trail.
"""

from __future__ import annotations

import hashlib
from typing import Any

from strongroom.errors import IntegrityError, InvalidInput
from strongroom.repository.base import Repository
from strongroom.signing import SIG_SUFFIX, Signer, get_verified, sig_key

# kind -> (prefix, number of key segments, allowed suffixes)
RECORD_KINDS: dict[str, tuple[str, int, tuple[str, ...]]] = {
    "pins": ("pins/", 4, (".json",)),
    "drills": ("drills/", 4, (".json",)),
    "verifications": ("verifications/", 4, (".json",)),
    "restore-points": ("pitr/", 4, (".json",)),
    "audit": ("audit/", 2, (".json",)),
    "reports": ("reports/compliance/", 3, (".json", ".html")),
}


def record_keys(repo: Repository, kind: str) -> list[str]:
    """The keys of every record of ``kind`` (never their ``.sig``)."""
    if kind not in RECORD_KINDS:
        raise InvalidInput(f"unknown record kind {kind!r}; one of {', '.join(RECORD_KINDS)}")
    prefix, depth, suffixes = RECORD_KINDS[kind]
    keys = []
    for info in repo.list(prefix):
        key = info.key
        if key.endswith(SIG_SUFFIX) or not key.endswith(suffixes):
            continue
        parts = key.split("/")
        if len(parts) != depth or (kind == "restore-points" and parts[2] != "restore_points"):
            continue
        keys.append(key)
    return sorted(keys)


def sign_unsigned_records(
    repo: Repository, signer: Signer, kind: str, wanted: set[str], *, yes: bool
) -> list[dict[str, Any]]:
    """Sign the unsigned records of ``kind`` (only the keys in ``wanted`` when it is not
    empty); without ``yes`` only list them. Rows: ``key``, ``action``, ``detail``."""
    keys = record_keys(repo, kind)
    missing = sorted(wanted - set(keys))
    if missing:
        raise InvalidInput(f"no {kind} record at {', '.join(missing)}")
    rows: list[dict[str, Any]] = []
    todo: list[tuple[str, bytes, dict[str, Any]]] = []
    for key in keys:
        if wanted and key not in wanted:
            continue
        data, verdict = get_verified(repo, key, strict=False)
        if verdict.trusted:
            rows.append({"key": key, "action": "already-signed", "detail": verdict.key_id})
        elif verdict.status != "unsigned":
            raise IntegrityError(f"refusing to sign {key}: {verdict.message(kind)}")
        else:
            todo.append((key, data, {"details": {"record": key, "kind": kind}}))
    return rows + write_signatures(repo, signer, todo, yes=yes)


def write_signatures(
    repo: Repository,
    signer: Signer,
    todo: list[tuple[str, bytes, dict[str, Any]]],
    *,
    yes: bool,
) -> list[dict[str, Any]]:
    """Sign each checked ``(key, stored bytes, audit fields)`` (only list them without
    ``yes``): the ``.sig`` is written, never the record, and each signature is an audit
    event ``sign`` with the record's checksum and the signing key id added to the
    fields' ``details``. Callers check every record before calling this."""
    from strongroom.audit import append_event

    rows: list[dict[str, Any]] = []
    for key, data, fields in todo:
        if not yes:
            rows.append({"key": key, "action": "would-sign", "detail": signer.key_id})
            continue
        repo.put_bytes(sig_key(key), signer.sign(data), overwrite=False)
        details = {"key_id": signer.key_id, **fields.get("details", {})}
        append_event(
            repo,
            action="sign",
            result="ok",
            checksums={key: hashlib.sha256(data).hexdigest()},
            **{**fields, "details": details},
        )
        rows.append({"key": key, "action": "signed", "detail": signer.key_id})
    return rows
