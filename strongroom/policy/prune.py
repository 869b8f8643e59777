"""Applying a retention policy to a repository, safely.

Order of operations for each backup the policy lets go:

1. read the lock state of its manifest and of every object under its data
   folder; if anything is still locked (retain-until in the future, or a legal
   hold) the backup is left whole and reported as "locked until ...";
2. delete the manifest first (the backup stops existing for every reader), then
   the artifacts. A crash in between leaves data without a manifest, which the
   orphan pass of a later run removes: never a manifest pointing at deleted data.

Then, optionally: orphans (data folders without a manifest, older than a grace
period, so a backup still uploading is never touched; lone catalog ``.sig`` objects
older than the same grace: ``strongroom.policy.orphan_sigs``), interrupted uploads
(``cleanup_incomplete`` with the same grace), and PITR WAL older than the oldest
retained base backup. ``dry_run`` reads everything (locks included) and
changes nothing.

What a backup owns comes from where its manifest is listed, never from the JSON in it
(``strongroom.policy.owned``): a manifest that lists keys outside its own prefix, or
names another engine/target/id than its path, is reported under ``findings`` and
left alone; it never counts toward keeping another backup.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from strongroom.catalog import PHYSICAL_KINDS, Catalog, Manifest, data_prefix, inside, parents_of
from strongroom.errors import StrongroomError
from strongroom.ids import (
    BACKUP_ID_RE,
    backup_id_time,
    scope_prefix,
)
from strongroom.policy.locks import LockState, ObjectStore, object_store
from strongroom.policy.orphan_sigs import catalog_scope, prune_orphan_signatures
from strongroom.policy.owned import (
    Finding,
    Ident,
    Listed,
    list_catalog,
    owned_keys,
    valid_ident,
)
from strongroom.policy.pins import label_pinned, list_pins
from strongroom.policy.retention import (
    BackupPoint,
    Decision,
    RetentionPolicy,
    evaluate,
    with_locks,
)
from strongroom.policy.wal import prune_wal, wal_targets
from strongroom.repository.base import Repository

log = logging.getLogger(__name__)

DEFAULT_ORPHAN_GRACE = dt.timedelta(hours=24)
PolicyLookup = Callable[[str, str], RetentionPolicy]


depends_on = parents_of


def point(entry: Listed, *, pinned: bool = False) -> BackupPoint:
    """The policy's view of one listed backup; its identity is the listing path's."""
    manifest = entry.manifest
    return BackupPoint(
        backup_id=entry.backup_id,
        started_at=manifest.started_at,
        finished_at=manifest.finished_at,
        engine=entry.engine,
        target=entry.target,
        kind=manifest.kind,
        pinned=pinned or label_pinned(manifest),
        depends_on=parents_of(manifest),
        stored_size=manifest.stored_size,
    )


def ident_of(decision: Decision) -> Ident:
    b = decision.backup
    return (b.engine, b.target, b.backup_id)


@dataclass
class BackupOutcome:
    decision: Decision
    action: str  # keep | delete | would-delete | locked | error
    detail: str = ""
    locked: list[dict[str, str]] = field(default_factory=list)
    freed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.decision.to_dict(),
            "action": self.action,
            "detail": self.detail,
            "locked_objects": self.locked,
            "bytes_freed": self.freed,
        }


@dataclass
class RetentionReport:
    dry_run: bool
    now: dt.datetime
    policies: dict[str, str] = field(default_factory=dict)
    backups: list[BackupOutcome] = field(default_factory=list)
    orphans: list[dict[str, Any]] = field(default_factory=list)
    orphan_signatures: list[dict[str, Any]] = field(default_factory=list)
    dangling: list[dict[str, Any]] = field(default_factory=list)
    incomplete_uploads_removed: int = 0
    wal: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # catalog and data objects retention does not trust: reported, never acted on
    findings: list[dict[str, Any]] = field(default_factory=list)

    def count(self, action: str) -> int:
        return sum(1 for b in self.backups if b.action == action)

    @property
    def ok(self) -> bool:
        return not self.errors and not any(b.action == "error" for b in self.backups)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "dry_run": self.dry_run,
            "now": self.now.isoformat(),
            "policies": self.policies,
            "summary": {
                "backups": len(self.backups),
                "kept": self.count("keep"),
                "deleted": self.count("deleted"),
                "would_delete": self.count("would-delete"),
                "locked": self.count("locked"),
                "errors": self.count("error") + len(self.errors),
                # in a dry run: what would be freed
                "bytes_freed": sum(b.freed for b in self.backups)
                + sum(
                    int(o.get("bytes", 0))
                    for o in self.orphans
                    if o["action"] in ("deleted", "would delete")
                )
                + sum(int(w.get("bytes_freed", 0)) for w in self.wal),
                "orphans": len(self.orphans),
                "orphan_signatures": len(self.orphan_signatures),
                "wal_segments_deleted": sum(int(w["deleted"]) for w in self.wal),
                "wal_segments_would_delete": sum(int(w["would_delete"]) for w in self.wal),
                "findings": len(self.findings),
            },
            "backups": [b.to_dict() for b in self.backups],
            "orphans": self.orphans,
            "orphan_signatures": self.orphan_signatures,
            "dangling": self.dangling,
            "incomplete_uploads_removed": self.incomplete_uploads_removed,
            "wal": self.wal,
            "errors": self.errors,
            "findings": self.findings,
        }


def _active_locks(store: ObjectStore, keys: list[str], now: dt.datetime) -> list[LockState]:
    if not store.supports_locks:
        return []
    found = []
    for key in keys:
        state = store.lock(key)
        if state is not None and state.active(now):
            found.append(state)
    return found


def _lock_summary(locks: list[LockState]) -> tuple[dt.datetime, str]:
    strongest = max(locks, key=lambda s: s.until)
    detail = strongest.describe()
    if len(locks) > 1:
        detail += f"; {len(locks)} objects locked"
    until = strongest.until if not strongest.legal_hold else dt.datetime.max.replace(tzinfo=dt.UTC)
    return until, detail


@dataclass
class RetentionPlan:
    """What the policy decided, for the backups retention trusts."""

    decisions: list[Decision]
    listed: dict[Ident, Listed]
    locks: dict[Ident, list[LockState]]
    findings: list[Finding]


def plan(
    repo: Repository,
    policy_for: PolicyLookup | RetentionPolicy,
    *,
    engine: str | None = None,
    target: str | None = None,
    now: dt.datetime | None = None,
    store: ObjectStore | None = None,
) -> RetentionPlan:
    """Evaluate the policy over the catalog; locks are read for deletion candidates.

    Suspect manifests (``strongroom.policy.owned``) are not evaluated: they are
    returned as findings, never kept or deleted, and never count toward keeping others.
    """
    moment = now or dt.datetime.now(dt.UTC)
    lookup = _lookup(policy_for)
    store = store or object_store(repo)
    entries, findings = list_catalog(repo, engine, target)
    trusted = [e for e in entries if not e.suspect]
    findings = [*findings, *(p for e in entries for p in e.problems)]
    pin_records = list_pins(repo, engine, target)
    pins = {(p["engine"], p["target"], p["backup_id"]) for p in pin_records}
    findings.extend(  # an untrusted pin still protects its backup (fail safe), reported
        Finding(p["key"], "untrusted-pin", p["untrusted"], p["engine"], p["target"], p["backup_id"])
        for p in pin_records
        if not p["trusted"]
    )
    listed = {e.ident: e for e in trusted}
    series: dict[tuple[str, str], list[BackupPoint]] = defaultdict(list)
    for e in trusted:
        series[(e.engine, e.target)].append(point(e, pinned=e.ident in pins))
    decisions: list[Decision] = []
    locks: dict[Ident, list[LockState]] = {}
    for (eng, tgt), points in sorted(series.items()):
        policy = lookup(eng, tgt)
        policy.check_usable()
        first = evaluate(points, policy, moment)
        found: dict[str, tuple[dt.datetime, str]] = {}
        for d in first:
            if d.keep:
                continue
            keys = [k for k, _ in owned_keys(repo, listed[ident_of(d)])]
            active = _active_locks(store, keys, moment)
            if active:
                locks[ident_of(d)] = active
                found[d.backup_id] = _lock_summary(active)
        decisions.extend(with_locks(first, found, policy, moment) if found else first)
    return RetentionPlan(decisions, listed, locks, findings)


def _lookup(policy_for: PolicyLookup | RetentionPolicy) -> PolicyLookup:
    if isinstance(policy_for, RetentionPolicy):
        fixed = policy_for
        return lambda _engine, _target: fixed
    return policy_for


def _delete_backup(
    repo: Repository,
    store: ObjectStore,
    entry: Listed,
    now: dt.datetime,
) -> tuple[str, str, list[dict[str, str]], int]:
    """Manifest first, then data (only what the backup owns: ``owned_keys``).
    Re-checks locks right before deleting."""
    keys = owned_keys(repo, entry)
    active = _active_locks(store, [k for k, _ in keys], now)
    if active:
        until, detail = _lock_summary(active)
        return "locked", f"locked until {until.isoformat()} ({detail})", _lock_rows(active), 0
    freed = 0
    mkey = keys[0][0]
    try:
        store.remove(mkey)
    except StrongroomError as exc:
        return "error", f"could not delete the manifest {mkey}: {exc}", [], 0
    failed: list[str] = []
    for key, size in keys[1:]:
        try:
            store.remove(key)
            freed += size
        except StrongroomError as exc:
            failed.append(f"{key}: {exc}")
    if failed:
        return (
            "error",
            "manifest deleted; some data could not be (an orphan, removed by a later run): "
            + "; ".join(failed[:3]),
            [],
            freed,
        )
    return "deleted", f"manifest and {len(keys) - 1} object(s) deleted", [], freed


def _lock_rows(locks: list[LockState]) -> list[dict[str, str]]:
    return [{"key": s.key, "locked": s.describe()} for s in locks]


def find_orphans(
    repo: Repository,
    *,
    engine: str | None = None,
    target: str | None = None,
    grace: dt.timedelta = DEFAULT_ORPHAN_GRACE,
    now: dt.datetime | None = None,
    loaded: dict[Ident, Listed] | None = None,
    findings: list[Finding] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(orphans, dangling): backup data folders (``data/<engine>/<target>/<id>/``, names
    checked) without a manifest at the matching catalog path, and manifests whose
    artifacts are missing. Orphans younger than ``grace`` are listed as 'recent'. Data
    objects outside any folder strongroom writes are added to ``findings`` (when given),
    never to the orphans: retention does not delete what it does not own."""
    moment = now or dt.datetime.now(dt.UTC)
    prefix = scope_prefix("data", engine, target)
    groups: dict[Ident, list[tuple[str, int, dt.datetime]]] = defaultdict(list)
    strays: dict[str, int] = defaultdict(int)
    present: set[str] = set()
    for info in repo.list(prefix):
        parts = info.key.split("/")
        if target and (len(parts) < 3 or parts[2] != target):
            continue
        present.add(info.key)
        eng, tgt, bid = [*parts, "", "", ""][1:4]
        if (
            len(parts) < 5
            or not valid_ident(eng, tgt, bid)
            or not inside(info.key, data_prefix(eng, tgt, bid))
        ):
            strays["/".join(parts[:4])] += 1
            continue
        groups[(eng, tgt, bid)].append((info.key, info.size, info.modified))
    for folder, count in sorted(strays.items()):
        if findings is not None:
            findings.append(
                Finding(
                    folder[:200],
                    "bad-name",
                    f"{count} data object(s) outside any backup folder strongroom writes "
                    "(data/<engine>/<target>/<backup id>/<artifact>): not deleted",
                )
            )
    catalog_prefix = "catalog/" + (f"{engine}/" if engine else "")
    if engine and target:
        catalog_prefix += f"{target}/"
    manifests = {
        tuple(info.key[: -len(".json")].split("/")[1:4])
        for info in repo.list(catalog_prefix)
        if info.key.endswith(".json") and info.key.count("/") == 3
    }
    orphans: list[dict[str, Any]] = []
    for (eng, tgt, bid), objects in sorted(groups.items()):
        if (eng, tgt, bid) in manifests:
            continue
        newest = max(modified for _, _, modified in objects)
        id_time = backup_id_time(bid) if BACKUP_ID_RE.fullmatch(bid) else None
        recent = moment - newest < grace or (id_time is not None and moment - id_time < grace)
        orphans.append(
            {
                "engine": eng,
                "target": tgt,
                "backup_id": bid,
                "prefix": data_prefix(eng, tgt, bid),
                "objects": [k for k, _, _ in objects],
                "bytes": sum(s for _, s, _ in objects),
                "newest_object": newest.isoformat(),
                "action": "recent" if recent else "orphan",
            }
        )
    dangling: list[dict[str, Any]] = []
    catalog = Catalog(repo)
    for eng, tgt, bid in sorted(manifests):
        if (engine and eng != engine) or (target and tgt != target):
            continue
        try:
            cached = (loaded or {}).get((eng, tgt, bid))
            manifest = cached.manifest if cached is not None else catalog.load(eng, tgt, bid)
        except StrongroomError as exc:
            dangling.append({"engine": eng, "target": tgt, "backup_id": bid, "error": str(exc)})
            continue
        missing = [a.key for a in manifest.artifacts if a.key not in present]
        if missing:
            dangling.append(
                {"engine": eng, "target": tgt, "backup_id": bid, "missing_artifacts": missing}
            )
    return orphans, dangling


def _cleanup_incomplete(repo: Repository, grace: dt.timedelta) -> int:
    import inspect

    params = inspect.signature(repo.cleanup_incomplete).parameters
    if "older_than" in params:
        return int(repo.cleanup_incomplete("", older_than=grace))  # type: ignore[call-arg]
    log.warning("%s cannot spare recent uploads: interrupted uploads not cleaned", repo.describe())
    return 0


def prune(
    repo: Repository,
    policy_for: PolicyLookup | RetentionPolicy,
    *,
    engine: str | None = None,
    target: str | None = None,
    dry_run: bool = False,
    now: dt.datetime | None = None,
    orphan_grace: dt.timedelta = DEFAULT_ORPHAN_GRACE,
    clean_orphans: bool = True,
    prune_wal_archive: bool = True,
    purge_versions: bool = True,
) -> RetentionReport:
    """Apply the policy: delete what no rule keeps (see the module docstring)."""
    moment = now or dt.datetime.now(dt.UTC)
    lookup = _lookup(policy_for)
    store = object_store(repo, purge_versions=purge_versions)
    report = RetentionReport(dry_run=dry_run, now=moment)
    planned = plan(repo, lookup, engine=engine, target=target, now=moment, store=store)
    findings = list(planned.findings)
    for key in sorted({(d.backup.engine, d.backup.target) for d in planned.decisions}):
        report.policies["/".join(key)] = lookup(*key).describe()

    # newest first: an incremental goes before the backups it references, so a prune
    # killed half-way never leaves a manifest whose base is already gone
    outcomes: dict[int, BackupOutcome] = {}
    for index in _dependents_first(planned.decisions):
        d = planned.decisions[index]
        entry = planned.listed[ident_of(d)]
        if d.keep:
            locked_rule = next((r for r in d.rules if r.startswith("object-lock")), None)
            if locked_rule is not None and len(d.rules) == 1:
                outcome = BackupOutcome(
                    d,
                    "locked",
                    locked_rule.replace("object-lock", "locked", 1),
                    locked=_lock_rows(planned.locks.get(ident_of(d), [])),
                )
            else:
                outcome = BackupOutcome(d, "keep", d.reason)
        elif dry_run:
            freed = sum(size for _, size in owned_keys(repo, entry))
            outcome = BackupOutcome(d, "would-delete", d.reason, freed=freed)
        else:
            action, detail, locked_rows, freed = _delete_backup(repo, store, entry, moment)
            outcome = BackupOutcome(d, action, detail, locked=locked_rows, freed=freed)
            log.info("retention: %s %s: %s", action, d.backup_id, detail)
        outcomes[index] = outcome
    report.backups.extend(outcomes[i] for i in range(len(planned.decisions)))

    if clean_orphans:
        deleted = {ident_of(o.decision) for o in report.backups if o.action == "deleted"}
        referenced = _referenced_keys(planned, deleted)
        _orphan_pass(
            repo,
            store,
            report,
            (engine, target),
            orphan_grace,
            moment,
            dry_run,
            planned,
            findings,
            referenced,
        )

    if prune_wal_archive and engine in (None, "postgresql"):
        _wal_pass(repo, store, report, target, moment, dry_run, findings)
    report.findings = _unique(findings)
    for f in report.findings:
        log.warning("retention: not trusted, left alone: %s: %s", f["key"], f["detail"])
    return report


def _dependents_first(decisions: list[Decision]) -> list[int]:
    """Indexes of ``decisions`` in the order to act on them: newest backup first."""
    return sorted(
        range(len(decisions)),
        key=lambda i: (decisions[i].backup.started_at, decisions[i].backup_id),
        reverse=True,
    )


def _unique(findings: list[Finding]) -> list[dict[str, Any]]:
    seen: dict[tuple[str, str], Finding] = {}
    for f in findings:
        seen.setdefault((f.key, f.reason), f)
    return [f.to_dict() for f in sorted(seen.values(), key=lambda f: (f.key, f.reason))]


def _referenced_keys(planned: RetentionPlan, deleted: set[Ident]) -> dict[str, str]:
    """Data keys outside their own folder that a trusted manifest still listed after this
    run lists (an incremental's references to its bases' artifacts): key -> backup id."""
    refs: dict[str, str] = {}
    for ident, entry in planned.listed.items():
        if entry.suspect or ident in deleted:
            continue
        for artifact in entry.manifest.artifacts:
            if not inside(artifact.key, entry.prefix):
                refs.setdefault(artifact.key, entry.backup_id)
    return refs


def _orphan_pass(
    repo: Repository,
    store: ObjectStore,
    report: RetentionReport,
    scope: tuple[str | None, str | None],
    grace: dt.timedelta,
    now: dt.datetime,
    dry_run: bool,
    planned: RetentionPlan,
    findings: list[Finding],
    referenced: dict[str, str],
) -> None:
    engine, target = scope
    orphans, dangling = find_orphans(
        repo,
        engine=engine,
        target=target,
        grace=grace,
        now=now,
        loaded=planned.listed,
        findings=findings,
    )
    report.dangling = dangling
    for orphan in orphans:
        users = sorted({referenced[k] for k in orphan["objects"] if k in referenced})
        if users:
            # its manifest is gone (a prune killed half-way, or deleted by hand), but a
            # kept incremental still lists some of its artifacts: never deleted
            orphan["action"] = "referenced"
            orphan["detail"] = "artifacts listed by kept backup(s) " + ", ".join(users[:5])
        elif orphan["action"] == "recent":
            orphan["action"] = "too recent (grace period)"
        else:
            active = _active_locks(store, orphan["objects"], now)
            if active:
                until, detail = _lock_summary(active)
                orphan["action"] = "locked"
                orphan["detail"] = f"locked until {until.isoformat()} ({detail})"
            elif dry_run:
                orphan["action"] = "would delete"
            else:
                try:
                    for key in orphan["objects"]:
                        store.remove(key)
                    orphan["action"] = "deleted"
                except StrongroomError as exc:
                    orphan["action"] = "error"
                    orphan["detail"] = str(exc)
                    report.errors.append(f"orphan {orphan['prefix']}: {exc}")
        orphan["objects"] = len(orphan["objects"])
        report.orphans.append(orphan)
    report.orphan_signatures = prune_orphan_signatures(
        repo,
        store,
        catalog_scope(engine, target),
        grace=grace,
        now=now,
        dry_run=dry_run,
        locked=lambda key: _lock_summary(a)[1] if (a := _active_locks(store, [key], now)) else "",
    )
    report.errors.extend(
        f"orphan signature {o['key']}: {o['detail']}"
        for o in report.orphan_signatures
        if o["action"] == "error"
    )
    if not dry_run:
        try:
            report.incomplete_uploads_removed = _cleanup_incomplete(repo, grace)
        except StrongroomError as exc:
            report.errors.append(f"cleaning interrupted uploads: {exc}")


def _wal_pass(
    repo: Repository,
    store: ObjectStore,
    report: RetentionReport,
    target: str | None,
    now: dt.datetime,
    dry_run: bool,
    findings: list[Finding],
) -> None:
    targets = wal_targets(repo)
    if target:
        targets = [t for t in targets if t == target]
    if not targets:
        return
    gone = {
        ident_of(o.decision)
        for o in report.backups
        if o.action in ("deleted", "would-delete")
        or (o.action == "error" and o.detail.startswith("manifest deleted"))
    }
    # listed after the deletions: what is in the catalog now is the truth. A base backup's
    # WAL is wal/<its listed target>/; the manifest's own fields never choose the folder.
    trusted: dict[str, list[Manifest]] = defaultdict(list)
    untrusted: dict[str, list[Manifest]] = defaultdict(list)
    entries, _ = list_catalog(repo, "postgresql")
    for e in entries:
        if e.manifest.kind not in PHYSICAL_KINDS or e.ident in gone:
            continue
        (untrusted if e.suspect else trusted)[e.target].append(e.manifest)
    for tgt in targets:
        wal = prune_wal(
            repo,
            store,
            tgt,
            trusted.get(tgt, []),
            dry_run=dry_run,
            now=now,
            untrusted_bases=untrusted.get(tgt, []),
        )
        report.wal.append(wal.to_dict())
        report.errors.extend(f"WAL {e}" for e in wal.errors)
        findings.extend(Finding(key, "bad-name", detail) for key, detail in wal.strays)
