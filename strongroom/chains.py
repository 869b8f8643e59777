"""The chain of a backup, as ``strongroom show`` prints it: every backup it depends on.

Differential and incremental backups (file-level PostgreSQL ``files`` backups,
ClickHouse incremental ones) can only be restored together with the backups they build
on. Operators need to see that chain before they prune, copy or restore; this module
walks it from manifests alone (``catalog.parents_of``, transitively), never reading an
artifact, so ``show`` stays fast. A backup of the chain that is missing (pruned, deleted)
or not trusted is a *link* with that status, not an error: a broken chain is shown as
broken, with the ids that are missing. For ``files`` backups whose parents are all there,
``files.chain.check_chain`` also checks (by listing the chain's data folders) that every
artifact is present with its recorded size.
"""

from __future__ import annotations

from typing import Any

from strongroom.catalog import Catalog, Manifest, backup_type_of, owner_of, parents_of
from strongroom.errors import (
    AccessDenied,
    IntegrityError,
    NotFound,
    ServiceUnavailable,
    StorageFull,
    StrongroomError,
)
from strongroom.seal import origin_of

# a chain longer than this is refused as hostile (a real one is a full and a few dozen)
MAX_LINKS = 10_000


def own_bytes(manifest: Manifest) -> tuple[int, int]:
    """(stored bytes of the artifacts in this backup's own folder, stored bytes of the
    ones it references in earlier backups' folders)."""
    own = referenced = 0
    for artifact in manifest.artifacts:
        if owner_of(artifact) in (manifest.backup_id, ""):
            own += artifact.stored_size
        else:
            referenced += artifact.stored_size
    return own, referenced


def _link(manifest: Manifest | None, backup_id: str, status: str, error: str) -> dict[str, Any]:
    row: dict[str, Any] = {
        "backup_id": backup_id,
        "status": status,  # ok | missing | malformed | untrusted | misplaced | <verdict>
        "present": status != "missing",  # a manifest is stored under that id
        "trusted": status == "ok",
        "type": None,
        "kind": None,
        "base_backup_id": None,
        "depends_on": [],
        "finished_at": None,
        "stored_bytes": None,
        "referenced_bytes": None,
        "artifacts": None,
        "error": error,
    }
    if manifest is not None and status == "ok":
        own, referenced = own_bytes(manifest)
        row.update(
            type=backup_type_of(manifest),
            kind=manifest.kind,
            base_backup_id=manifest.details.get("base_backup_id"),
            depends_on=list(parents_of(manifest)),
            finished_at=manifest.finished_at.isoformat(),
            stored_bytes=own,
            referenced_bytes=referenced,
            artifacts=len(manifest.artifacts),
        )
    return row


def _load(
    catalog: Catalog, engine: str, target: str, backup_id: str
) -> tuple[Manifest | None, str, str]:
    """(the manifest if it could be read, status, error): never raises for one bad entry."""
    try:
        manifest = catalog.load(engine, target, backup_id, strict=False)
    except NotFound:
        return None, "missing", f"backup {backup_id} is not in the catalog (deleted or pruned)"
    except (ServiceUnavailable, AccessDenied, StorageFull):
        raise  # the storage could not answer: not a finding about this backup
    except StrongroomError as exc:
        return None, "malformed", str(exc)[:500]
    origin = origin_of(manifest)
    verdict = origin.verdict if origin is not None else None
    if verdict is not None and not verdict.trusted:
        return None, verdict.status, verdict.message("manifest")
    if (manifest.engine, manifest.target, manifest.backup_id) != (engine, target, backup_id):
        return None, "misplaced", f"the manifest stored as {backup_id} names another backup"
    return manifest, "ok", ""


def backup_chain(catalog: Catalog, manifest: Manifest) -> dict[str, Any]:
    """The chain of ``manifest`` (a trusted one, e.g. from ``Catalog.resolve``):

    ``{"backup_id", "whole", "missing", "problems", "links"}`` where ``links`` holds every
    backup it depends on, directly or through another, oldest first (every backup after
    the ones it depends on, then by id, i.e. start time), the backup itself last; each
    link has ``backup_id``, ``type``, ``kind``, ``finished_at``, ``stored_bytes`` (its own
    artifacts), ``referenced_bytes``, ``status``, ``present``, ``trusted``,
    ``base_backup_id``, ``depends_on`` and ``error``. ``missing`` lists the ids not in the
    catalog; ``whole`` is False when any link is not a trusted manifest, the dependencies
    loop, or (``files`` backups) an artifact is missing."""
    engine, target = manifest.engine, manifest.target
    root = manifest.backup_id
    links: dict[str, dict[str, Any]] = {root: _link(manifest, root, "ok", "")}
    cycles: list[str] = []
    order: list[str] = []  # depth-first post-order: parents before what needs them
    done: set[str] = set()
    stack = [(root, iter(sorted(parents_of(manifest))))]
    while stack:
        backup_id, parents = stack[-1]
        parent_id = next(parents, None)
        if parent_id is None:
            stack.pop()
            done.add(backup_id)
            order.append(backup_id)
            continue
        if parent_id in done:
            continue
        if parent_id in links:  # on the current path: a loop
            cycles.append(f"backup {backup_id} depends on {parent_id}, which depends on it")
            continue
        if len(links) >= MAX_LINKS:
            raise IntegrityError(f"the chain of backup {root} has over {MAX_LINKS} backups")
        parent, status, error = _load(catalog, engine, target, parent_id)
        links[parent_id] = _link(parent, parent_id, status, error)
        # an untrusted manifest's own dependencies are not followed
        stack.append((parent_id, iter(sorted(parents_of(parent)) if parent else [])))
    rows = [links[b] for b in order]
    problems = [f"{r['backup_id']}: {r['error']}" for r in rows if r["status"] != "ok"]
    problems += cycles
    if not problems and manifest.kind == "files":
        from strongroom.engines.postgres.pitr.files.chain import check_chain

        try:
            check_chain(catalog.repo, manifest)
        except (NotFound, IntegrityError) as exc:
            problems.append(str(exc))
    return {
        "backup_id": manifest.backup_id,
        "whole": not problems,
        "missing": [r["backup_id"] for r in rows if r["status"] == "missing"],
        "problems": problems,
        "links": rows,
    }
