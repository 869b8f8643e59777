"""Orphan signatures: ``<key>.sig`` objects whose record no longer (or never) exists.

``strongroom.signing.put_signed`` writes a record's signature BEFORE the record, and
``delete_signed`` / retention delete the record first: a crash in between leaves a lone
``.sig``. Retention removes those under the catalog it owns, but only once they are
older than the orphan grace period (``DEFAULT_ORPHAN_GRACE``): a younger one may belong
to a backup whose manifest is being written right now.

The listing is sorted (S3 order), so a record ``K`` comes before ``K.sig`` and every key
between them starts with ``K``: a stack of the keys that prefix the current one finds
each record's signature in one pass, in bounded memory.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from typing import Any

from strongroom.errors import StrongroomError
from strongroom.policy.locks import ObjectStore
from strongroom.repository.base import ObjectInfo, Repository
from strongroom.signing import SIG_SUFFIX


def lone_signatures(listing: Iterable[ObjectInfo]) -> list[ObjectInfo]:
    """The ``.sig`` objects of a sorted listing whose record is not in it."""
    stack: list[str] = []
    lone: list[ObjectInfo] = []
    for info in listing:
        while stack and not info.key.startswith(stack[-1]):
            stack.pop()
        if info.key.endswith(SIG_SUFFIX) and info.key[: -len(SIG_SUFFIX)] not in stack:
            lone.append(info)
        stack.append(info.key)
    return lone


def catalog_scope(engine: str | None, target: str | None) -> str:
    prefix = "catalog/"
    if engine:
        prefix += f"{engine}/"
        if target:
            prefix += f"{target}/"
    return prefix


def prune_orphan_signatures(
    repo: Repository,
    store: ObjectStore,
    prefix: str,
    *,
    grace: dt.timedelta,
    now: dt.datetime,
    dry_run: bool,
    locked: Callable[[str], str] | None = None,
) -> list[dict[str, Any]]:
    """Delete (or, ``dry_run``, list) the lone signatures under ``prefix`` older than
    ``grace``; younger ones are kept. ``locked(key)`` (optional) returns a description
    when the object is still locked (then it is kept). One row per lone signature:
    key, modified, action (deleted | would delete | too recent (grace period) | locked |
    error), detail."""
    rows: list[dict[str, Any]] = []
    for info in lone_signatures(repo.list(prefix)):
        row: dict[str, Any] = {
            "key": info.key,
            "record": info.key[: -len(SIG_SUFFIX)],
            "modified": info.modified.isoformat(),
            "bytes": info.size,
            "detail": "",
        }
        lock = locked(info.key) if locked is not None else None
        if now - info.modified < grace:
            row["action"] = "too recent (grace period)"
            row["detail"] = f"younger than {grace}: its record may still be being written"
        elif lock:
            row["action"], row["detail"] = "locked", str(lock)
        elif repo.exists(row["record"]):  # written since the listing
            continue
        elif dry_run:
            row["action"] = "would delete"
        else:
            try:
                store.remove(info.key)
                row["action"] = "deleted"
            except StrongroomError as exc:
                row["action"], row["detail"] = "error", str(exc)
        rows.append(row)
    return rows
