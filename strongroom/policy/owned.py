"""What a backup owns: derived from where its manifest is listed, never from its content.

Anyone who can write to the bucket can put any JSON under ``catalog/``, so retention
deletes a backup by exactly two things, both taken from the listing path
``catalog/<engine>/<target>/<id>.json``: that manifest key, and the objects under the
same backup's own data prefix ``data/<engine>/<target>/<id>/``. The manifest's fields
(its engine, target, backup id, artifact keys, WAL target) never steer a deletion.

A listed manifest that strongroom could not have written is *suspect*: its JSON names
another engine, target or id than its path, an artifact key lies outside its own
prefix (or walks out of it with ``..``), or a base backup claims another target's WAL.
A suspect manifest is reported as a finding and kept out of retention: it is never
deleted and never counts toward keeping (or redundancy of) any other backup. An
unreadable manifest, or a catalog key whose names strongroom would never write, is
reported the same way, and so is a manifest not signed by a key the repository
trusts (reason ``untrusted``: ``strongroom.signing``): a bucket writer cannot make
retention keep, count or delete anything by planting one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from strongroom.catalog import PHYSICAL_KINDS, Catalog, Manifest, data_prefix, inside, parents_of
from strongroom.errors import (
    AccessDenied,
    NotFound,
    ServiceUnavailable,
    StorageFull,
    StrongroomError,
)
from strongroom.ids import (
    BACKUP_ID_RE,
    ENGINES,
    NAME_RE,
    scope_prefix,
)
from strongroom.repository.base import Repository
from strongroom.seal import origin_of
from strongroom.signing import Verdict, sig_key

Ident = tuple[str, str, str]  # (engine, target, backup id), from the listing path

# Errors that mean "the storage could not answer", not "this object is bad": they
# stop the run (retried by the flows) instead of becoming a finding.
_TRANSIENT = (ServiceUnavailable, AccessDenied, StorageFull)


def valid_ident(engine: str, target: str, backup_id: str) -> bool:
    """True when the three names are ones strongroom writes (so a prefix built from them
    is exactly one backup's folder)."""
    return (
        engine in ENGINES
        and NAME_RE.fullmatch(target) is not None
        and BACKUP_ID_RE.fullmatch(backup_id) is not None
    )


@dataclass(frozen=True)
class Finding:
    """A catalog object retention does not trust: reported, never acted on."""

    key: str
    # unreadable | untrusted | untrusted-pin | bad-name | identity-mismatch |
    # foreign-artifacts | wal-target
    reason: str
    detail: str
    engine: str | None = None
    target: str | None = None
    backup_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "reason": self.reason,
            "detail": self.detail,
            "engine": self.engine,
            "target": self.target,
            "backup_id": self.backup_id,
        }


@dataclass
class Listed:
    """One manifest with the identity of its listing path."""

    key: str
    engine: str
    target: str
    backup_id: str
    manifest: Manifest
    problems: list[Finding] = field(default_factory=list)

    @property
    def ident(self) -> Ident:
        return (self.engine, self.target, self.backup_id)

    @property
    def prefix(self) -> str:
        return data_prefix(self.engine, self.target, self.backup_id)

    @property
    def suspect(self) -> bool:
        return bool(self.problems)


def ownership_problems(entry: Listed) -> list[Finding]:
    """Why a listed manifest cannot be one strongroom wrote at that path (empty: none)."""
    m, problems = entry.manifest, []

    def finding(reason: str, detail: str) -> Finding:
        return Finding(entry.key, reason, detail, entry.engine, entry.target, entry.backup_id)

    claimed = (m.engine, m.target, m.backup_id)
    if claimed != entry.ident:
        problems.append(
            finding(
                "identity-mismatch",
                f"its JSON names {'/'.join(str(c)[:64] for c in claimed)}, "
                f"but it is listed as {'/'.join(entry.ident)}",
            )
        )
    # an incremental may reference its parents' artifacts (same engine and target)
    shared = [data_prefix(entry.engine, entry.target, p) for p in parents_of(m)]
    foreign = [
        a.key
        for a in m.artifacts
        if not inside(a.key, entry.prefix) and not any(inside(a.key, p) for p in shared)
    ]
    if foreign:
        shown = ", ".join(repr(k[:120]) for k in foreign[:3])
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        problems.append(
            finding(
                "foreign-artifacts",
                f"lists artifact key(s) outside its own prefix {entry.prefix}: {shown}{more}",
            )
        )
    wal_target = m.details.get("wal_target")
    if m.kind in PHYSICAL_KINDS and wal_target is not None and wal_target != entry.target:
        problems.append(
            finding(
                "wal-target",
                f"a base backup of {entry.target} claims the WAL of {str(wal_target)[:64]!r}",
            )
        )
    return problems


def list_catalog(
    repo: Repository, engine: str | None = None, target: str | None = None
) -> tuple[list[Listed], list[Finding]]:
    """Every manifest under ``catalog/`` (or one engine/target), oldest id first, with the
    identity of its path and its ownership problems; plus findings for catalog objects
    that are not readable manifests under names strongroom writes. Never raises for a
    bad object; storage outages propagate."""
    prefix = scope_prefix("catalog", engine, target)
    catalog = Catalog(repo)
    listed: list[Listed] = []
    findings: list[Finding] = []
    for info in repo.list(prefix):
        parts = info.key.split("/")
        if len(parts) != 4 or not parts[3].endswith(".json"):
            continue
        eng, tgt, bid = parts[1], parts[2], parts[3][: -len(".json")]
        if target and tgt != target:
            continue
        if not valid_ident(eng, tgt, bid):
            findings.append(
                Finding(
                    info.key,
                    "bad-name",
                    "not a name strongroom writes (engine, target name or backup id)",
                )
            )
            continue
        try:
            manifest = catalog.load(eng, tgt, bid, strict=False)
        except NotFound:
            continue  # deleted since the listing
        except _TRANSIENT:
            raise
        except (StrongroomError, ValueError) as exc:
            detail = str(exc) if isinstance(exc, StrongroomError) else "malformed"
            findings.append(Finding(info.key, "unreadable", detail[:300], eng, tgt, bid))
            continue
        verdict = stored_verdict(manifest)
        if verdict is None or not verdict.trusted:
            detail = verdict.message("manifest") if verdict else "no signature verdict"
            findings.append(Finding(info.key, "untrusted", detail[:300], eng, tgt, bid))
            continue
        entry = Listed(info.key, eng, tgt, bid, manifest)
        entry.problems = ownership_problems(entry)
        listed.append(entry)
    listed.sort(key=lambda e: (e.backup_id, e.engine, e.target))
    return listed, findings


def stored_verdict(manifest: Manifest) -> Verdict | None:
    """The signature verdict ``Catalog.load`` recorded for a manifest (None: not loaded
    from a repository)."""
    origin = origin_of(manifest)
    return origin.verdict if origin is not None else None


def owned_keys(repo: Repository, entry: Listed) -> list[tuple[str, int]]:
    """(key, size) of every object a backup owns: its manifest key first, its signature
    (``<manifest key>.sig``) next, then every object under its own data prefix (all
    from the listing path)."""
    data = [(i.key, i.size) for i in repo.list(entry.prefix) if inside(i.key, entry.prefix)]
    signature = [(sig_key(entry.key), 0)] if repo.exists(sig_key(entry.key)) else []
    return [(entry.key, 0), *signature, *data]
