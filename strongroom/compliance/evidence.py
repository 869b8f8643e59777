"""Everything the controls read, gathered once per evaluation (lazily, cached).

Readers are tolerant about the shape of records written by other parts of
strongroom (restore drills, deep-verify results): they pick the first field
present among a few documented names, so a record format change shows up as
"missing value" in a finding rather than as a crash.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import logging
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from strongroom.audit import AuditEvent, ChainReport, read_events, verify_chain
from strongroom.catalog import Catalog, Manifest
from strongroom.compliance.model import ComplianceSettings, TargetPolicy
from strongroom.config import RepositoryConfig
from strongroom.errors import IntegrityError, NotFound
from strongroom.ids import ENGINES
from strongroom.repository.base import ObjectInfo, Repository
from strongroom.signing import get_verified_json

log = logging.getLogger(__name__)

REPORTS_PREFIX = "reports/compliance/"
DRILLS_PREFIX = "drills/"
WAL_PREFIX = "wal/"
# Where deep-verify results may live (first that has records wins).
VERIFY_PREFIXES = ("verifications/", "verify/", "evidence/verify/", "deep-verify/")
# Modules whose presence means a feature exists in this installation.
FEATURE_MODULES: dict[str, tuple[str, ...]] = {
    "restore drills": ("strongroom.drills", "strongroom.drill"),
    "deep verify": ("strongroom.policy.verification", "strongroom.deep_verify"),
    "PITR (WAL archiving)": (
        "strongroom.engines.postgres.wal.store",
        "strongroom.engines.postgres.wal.check",
        "strongroom.engines.postgres.pitr.basebackup",
    ),
    "retention policy": ("strongroom.policy.retention",),
}
_SEGMENT_RE = re.compile(r"^([0-9A-Fa-f]{8})([0-9A-Fa-f]{8})([0-9A-Fa-f]{8})")
_SEGMENTS_PER_LOG = 0x100000000 // (16 * 1024 * 1024)
PITR_KINDS = ("base", "files", "basebackup", "base-backup", "physical")


def module_present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def feature_present(feature: str) -> bool:
    return any(module_present(m) for m in FEATURE_MODULES.get(feature, ()))


def pick(data: dict[str, Any], *paths: str) -> Any:
    """The first non-None value among dotted ``paths`` (``rto.seconds``)."""
    for path in paths:
        value: Any = data
        for part in path.split("."):
            if not isinstance(value, dict) or part not in value:
                value = None
                break
            value = value[part]
        if value is not None:
            return value
    return None


def parse_time(value: Any) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    if isinstance(value, int | float):
        return dt.datetime.fromtimestamp(float(value), dt.UTC)
    if isinstance(value, str) and value:
        text = value.strip().replace("Z", "+00:00")
        try:
            moment = dt.datetime.fromisoformat(text)
        except ValueError:
            match = re.match(r"^(\d{8}T\d{6}Z)", value)
            if not match:
                return None
            moment = dt.datetime.strptime(match.group(1), "%Y%m%dT%H%M%SZ")
        return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
    return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _as_ok(data: dict[str, Any]) -> bool | None:
    value = pick(data, "ok", "passed", "success", "clean")
    if isinstance(value, bool):
        return value
    word = pick(data, "result", "status", "outcome")
    if isinstance(word, str):
        word = word.lower()
        if word in ("ok", "pass", "passed", "success", "succeeded", "completed", "clean"):
            return True
        if word in ("fail", "failed", "failure", "error", "crashed", "mismatch"):
            return False
    return None


@dataclass
class DrillRecord:
    key: str
    engine: str
    target: str
    at: dt.datetime | None
    ok: bool | None
    rto_s: float | None
    rto_objective_s: float | None
    rpo_s: float | None
    backup_id: str | None
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @classmethod
    def parse(cls, key: str, engine: str, target: str, data: dict[str, Any]) -> DrillRecord:
        rto = _as_float(
            pick(
                data,
                "rto_seconds",
                "rto_s",
                "measured_rto_s",
                "rto.measured_s",
                "rto.seconds",
                "rto.actual_s",
                "restore_seconds",
                "restore_s",
                "timings.restore_s",
                "duration_s",
            )
        )
        objective = _as_float(
            pick(
                data,
                "rto_objective_s",
                "rto_target_s",
                "rto.objective_s",
                "rto.target_s",
                "objectives.rto_s",
            )
        )
        if objective is None:
            minutes = _as_float(pick(data, "rto_minutes", "objectives.rto_minutes"))
            objective = minutes * 60 if minutes is not None else None
        return cls(
            key=key,
            engine=str(pick(data, "engine") or engine),
            target=str(pick(data, "target") or target),
            at=parse_time(
                pick(data, "finished_at", "completed_at", "started_at", "created_at", "at")
            )
            or parse_time(key.rsplit("/", 1)[-1]),
            ok=_as_ok(data),
            rto_s=rto,
            rto_objective_s=objective,
            rpo_s=_as_float(pick(data, "rpo_seconds", "rpo_s", "rpo.measured_s", "data_age_s")),
            backup_id=pick(data, "backup_id", "backup.backup_id"),
            raw=data,
        )


@dataclass
class VerifyRecord:
    key: str
    engine: str | None
    target: str | None
    at: dt.datetime | None
    ok: bool | None
    backups: list[str]
    source: str  # "deep-verify" or "audit-trail"


@dataclass
class WalSegment:
    timeline: int
    segno: int
    name: str
    modified: dt.datetime


@dataclass
class WalArchive:
    target: str
    segments: list[WalSegment] = field(default_factory=list)
    history_files: list[str] = field(default_factory=list)

    @property
    def newest(self) -> WalSegment | None:
        return max(self.segments, key=lambda s: (s.segno, s.timeline), default=None)

    def gaps(self, start_segno: int | None = None) -> list[tuple[int, int]]:
        """Missing segment-number ranges between ``start_segno`` (or the oldest archived
        segment) and the newest, across timelines (a promotion continues the numbering)."""
        present = {s.segno for s in self.segments}
        if not present:
            return []
        low = min(present) if start_segno is None else start_segno
        high = max(present)
        found: list[tuple[int, int]] = []
        run_start: int | None = None
        for segno in range(low, high + 1):
            if segno not in present:
                if run_start is None:
                    run_start = segno
            elif run_start is not None:
                found.append((run_start, segno - 1))
                run_start = None
        if run_start is not None:
            found.append((run_start, high))
        return found


def segment_name(timeline: int, segno: int) -> str:
    return f"{timeline:08X}{segno // _SEGMENTS_PER_LOG:08X}{segno % _SEGMENTS_PER_LOG:08X}"


def segno_of(name: str) -> int | None:
    match = _SEGMENT_RE.match(name)
    if not match:
        return None
    return int(match.group(2), 16) * _SEGMENTS_PER_LOG + int(match.group(3), 16)


class Evidence:
    """Lazily read evidence for one evaluation. Every reader caches its result."""

    def __init__(
        self,
        repo: Repository,
        *,
        config: RepositoryConfig | None = None,
        targets: list[TargetPolicy] | None = None,
        settings: ComplianceSettings | None = None,
        now: dt.datetime | None = None,
        retention: dict[str, Any] | None = None,
        retention_for: Callable[[str, str], dict[str, Any] | None] | None = None,
        anchors: dict[int, str] | None = None,
    ) -> None:
        self.repo = repo
        self.config = config
        self.settings = settings or ComplianceSettings()
        self.now = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
        self.default_retention = retention
        self._retention_for = retention_for
        self._given_targets = list(targets or [])
        self._given_anchors = dict(anchors or {})
        self.read_problems: list[str] = []
        self.bad_manifests: list[tuple[str, str]] = []
        self.untrusted_records: list[tuple[str, str]] = []
        self._object_heads: dict[str, dict[str, Any] | None] = {}
        self._bucket_settings: dict[str, Any] = {}

    # ---------------------------------------------------------------- basics

    @property
    def is_s3(self) -> bool:
        from strongroom.repository.s3 import S3Repository

        return isinstance(self.repo, S3Repository)

    @property
    def is_local(self) -> bool:
        from strongroom.repository.local import LocalRepository

        return isinstance(self.repo, LocalRepository)

    def _list(self, prefix: str) -> list[ObjectInfo]:
        return list(self.repo.list(prefix))

    def _signed_json(self, key: str) -> dict[str, Any] | None:
        """A record that counts as evidence only if signed by a trusted key; an untrusted
        one is appended to ``untrusted_records`` (key, why), an unreadable one to
        ``read_problems``."""
        try:
            data, verdict = get_verified_json(self.repo, key, strict=False)
        except (IntegrityError, NotFound) as exc:
            self.read_problems.append(f"{key}: unreadable ({exc})")
            return None
        if not verdict.trusted:
            self.untrusted_records.append((key, verdict.message()))
            return None
        return data

    # --------------------------------------------------------------- catalog

    @cached_property
    def manifest_findings(self) -> list[dict[str, Any]]:
        """The catalog entries skipped (``strongroom.catalog.catalog_finding``: key,
        status, error), e.g. manifests not signed by a trusted key."""
        _ = self.manifests
        return self._manifest_findings

    @cached_property
    def manifests(self) -> dict[tuple[str, str], list[Manifest]]:
        """Every manifest, per (engine, target), oldest first. Unreadable ones are
        listed in ``bad_manifests``."""
        found: dict[tuple[str, str], list[Manifest]] = defaultdict(list)
        # through the catalog: manifests not signed by a trusted key (a bucket writer
        # faking fresh backups), malformed or oversized ones are skipped and reported
        catalog = Catalog(self.repo)
        for manifest in catalog.list():
            found[(manifest.engine, manifest.target)].append(manifest)
        self._manifest_findings = list(catalog.findings)
        for finding in catalog.findings:
            error = str(finding["error"]).splitlines()[0][:200]
            self.bad_manifests.append((str(finding["key"]), error))
        for items in found.values():
            items.sort(key=lambda m: (m.finished_at, m.backup_id))
        return dict(found)

    def latest(self, key: tuple[str, str]) -> Manifest | None:
        items = self.manifests.get(key) or []
        return items[-1] if items else None

    @cached_property
    def targets(self) -> list[TargetPolicy]:
        """Targets given (from blocks), plus any with backups, drills or WAL in the
        repository (with the default objectives)."""
        s = self.settings
        by_key: dict[tuple[str, str], TargetPolicy] = {}
        for t in self._given_targets:
            by_key[t.key] = t
        seen: set[tuple[str, str]] = set(self.manifests)
        seen.update((r.engine, r.target) for rs in self.drills.values() for r in rs)
        seen.update(("postgresql", t) for t in self.wal)
        for key in sorted(seen):
            if key not in by_key:
                by_key[key] = TargetPolicy(
                    engine=key[0],
                    target=key[1],
                    rpo_hours=s.default_rpo_hours,
                    rto_minutes=s.default_rto_minutes,
                    source="repository (default objectives)",
                )
        return [by_key[k] for k in sorted(by_key)]

    def is_pitr(self, target: TargetPolicy) -> bool:
        if target.pitr is not None:
            return target.pitr
        if target.engine != "postgresql":
            return False
        if target.target in self.wal:
            return True
        return any(m.kind in PITR_KINDS for m in self.manifests.get(target.key, []))

    def retention_for(self, target: TargetPolicy) -> dict[str, Any] | None:
        """The target's own policy, else ``retention_for(engine, target)``, else the default."""
        if target.retention is not None:
            return target.retention
        if self._retention_for is not None:
            found = self._retention_for(target.engine, target.target)
            if found is not None:
                return found
        return self.default_retention

    # ------------------------------------------------------------------- S3

    def bucket_setting(self, name: str) -> Any:
        """One bucket setting (``S3Repository.bucket_setting``), cached with its error: a
        store lacking one API (``Unsupported``) affects only the controls reading it."""
        if not self.is_s3:
            return None
        if name not in self._bucket_settings:
            try:
                self._bucket_settings[name] = self.repo.bucket_setting(name)  # type: ignore[attr-defined]
            except Exception as exc:  # re-raised to each control that reads it
                self._bucket_settings[name] = exc
        if isinstance(found := self._bucket_settings[name], Exception):
            raise found
        return found

    def head(self, key: str) -> dict[str, Any] | None:
        """HeadObject of ``key`` (S3 only; None when absent or not S3)."""
        from strongroom.repository.s3 import S3Repository

        if not isinstance(self.repo, S3Repository):
            return None
        if key not in self._object_heads:
            self._object_heads[key] = self.repo.head(key)
        return self._object_heads[key]

    def backup_objects(self) -> list[tuple[Manifest, str]]:
        """(manifest, key) of every manifest and artifact object, newest backups first,
        at most ``max_objects_checked``."""
        pairs: list[tuple[Manifest, str]] = []
        every = sorted(
            (m for items in self.manifests.values() for m in items),
            key=lambda m: m.finished_at,
            reverse=True,
        )
        for manifest in every:
            from strongroom.catalog import manifest_key

            pairs.append(
                (manifest, manifest_key(manifest.engine, manifest.target, manifest.backup_id))
            )
            pairs.extend((manifest, a.key) for a in manifest.artifacts)
        return pairs[: self.settings.max_objects_checked]

    def backup_object_count(self) -> int:
        return sum(1 + len(m.artifacts) for ms in self.manifests.values() for m in ms)

    # ---------------------------------------------------------------- drills

    @cached_property
    def drills(self) -> dict[tuple[str, str], list[DrillRecord]]:
        found: dict[tuple[str, str], list[DrillRecord]] = defaultdict(list)
        for info in self._list(DRILLS_PREFIX):
            parts = info.key.split("/")
            if len(parts) != 4 or not parts[3].endswith(".json"):
                continue
            data = self._signed_json(info.key)
            if data is None:
                continue
            record = DrillRecord.parse(info.key, parts[1], parts[2], data)
            if record.at is None:
                record.at = info.modified
            found[(record.engine, record.target)].append(record)
        for items in found.values():
            items.sort(key=lambda r: r.at or dt.datetime.min.replace(tzinfo=dt.UTC))
        return dict(found)

    @property
    def drills_feature(self) -> bool:
        return bool(self.drills) or feature_present("restore drills")

    # ---------------------------------------------------------- verification

    @cached_property
    def deep_verifications(self) -> dict[tuple[str, str], list[VerifyRecord]]:
        found: dict[tuple[str, str], list[VerifyRecord]] = defaultdict(list)
        for prefix in VERIFY_PREFIXES:
            for info in self._list(prefix):
                if not info.key.endswith(".json"):
                    continue
                data = self._signed_json(info.key)
                if data is None:
                    continue
                parts = info.key[len(prefix) :].split("/")
                engine = pick(data, "engine") or (parts[0] if len(parts) >= 3 else None)
                target = pick(data, "target") or (parts[1] if len(parts) >= 3 else None)
                backups = pick(data, "backups", "backup_ids", "checked")
                ids: list[str] = []
                if isinstance(backups, list):
                    ids = [str(b.get("backup_id") if isinstance(b, dict) else b) for b in backups]
                elif pick(data, "backup_id"):
                    ids = [str(pick(data, "backup_id"))]
                record = VerifyRecord(
                    key=info.key,
                    engine=engine,
                    target=target,
                    at=parse_time(
                        pick(data, "verified_at", "finished_at", "completed_at", "started_at")
                    )
                    or info.modified,
                    ok=_as_ok(data),
                    backups=ids,
                    source="deep-verify",
                )
                if engine and target:
                    found[(str(engine), str(target))].append(record)
                else:
                    found[("*", "*")].append(record)
            if found:
                break
        for items in found.values():
            items.sort(key=lambda r: r.at or dt.datetime.min.replace(tzinfo=dt.UTC))
        return dict(found)

    @property
    def deep_verify_feature(self) -> bool:
        return bool(self.deep_verifications) or feature_present("deep verify")

    @cached_property
    def audit_verifications(self) -> dict[tuple[str, str], list[VerifyRecord]]:
        """Verify runs recorded in the audit trail (the ``verify-backup`` flow)."""
        found: dict[tuple[str, str], list[VerifyRecord]] = defaultdict(list)
        for event in self.audit_events:
            if event.action not in ("verify", "deep-verify") or not event.target:
                continue
            engine = event.engine or "postgresql"
            found[(engine, event.target)].append(
                VerifyRecord(
                    key=f"audit/{event.seq}",
                    engine=engine,
                    target=event.target,
                    at=event.occurred_at,
                    ok=event.result == "success",
                    backups=[event.backup_id] if event.backup_id else [],
                    source="audit-trail",
                )
            )
        return dict(found)

    # ------------------------------------------------------------------- WAL

    @cached_property
    def wal(self) -> dict[str, WalArchive]:
        found: dict[str, WalArchive] = {}
        for info in self._list(WAL_PREFIX):
            parts = info.key.split("/")
            if len(parts) < 3:
                continue
            target, name = parts[1], parts[-1]
            archive = found.setdefault(target, WalArchive(target))
            if name.split(".")[0].endswith("history") or ".history" in name:
                archive.history_files.append(name)
                continue
            if ".backup" in name or ".partial" in name:
                continue
            segno = segno_of(name)
            if segno is None:
                continue
            archive.segments.append(WalSegment(int(name[:8], 16), segno, name[:24], info.modified))
        return found

    @property
    def pitr_feature(self) -> bool:
        return bool(self.wal) or feature_present("PITR (WAL archiving)")

    def base_start_segno(self, target: TargetPolicy) -> int | None:
        """First WAL segment the oldest base backup of ``target`` needs, if recorded."""
        bases = [m for m in self.manifests.get(target.key, []) if m.kind in PITR_KINDS]
        starts: list[int] = []
        for m in bases:
            name: Any = None
            if module_present("strongroom.policy.wal"):
                from strongroom.policy.wal import base_start_segment

                name = base_start_segment(m)
            if name is None:
                name = pick(m.details, "start_wal_segment", "start_segment", "start_wal_file")
            segno = segno_of(name) if isinstance(name, str) else None
            if segno is not None:
                starts.append(segno)
        return min(starts) if starts else None

    # ----------------------------------------------------------------- audit

    @cached_property
    def previous_reports(self) -> list[str]:
        return sorted(info.key for info in self._list(REPORTS_PREFIX) if info.key.endswith(".json"))

    @cached_property
    def anchors(self) -> dict[int, str]:
        """Audit-chain anchors: given ones plus the head the newest report recorded."""
        found = dict(self._given_anchors)
        for key in reversed(self.previous_reports):
            data = self._signed_json(key)  # a forged report must not set the anchor
            head = (data or {}).get("audit_head") or {}
            if isinstance(head.get("seq"), int) and isinstance(head.get("sha256"), str):
                if head["seq"] > 0:
                    found.setdefault(head["seq"], head["sha256"])
                break
        return found

    @cached_property
    def chain(self) -> ChainReport:
        return verify_chain(self.repo, anchors=self.anchors)

    @cached_property
    def audit_events(self) -> list[AuditEvent]:
        """Events signed by a trusted key (the others are listed in ``untrusted_records``;
        ``chain`` reports them too)."""
        findings: list[dict[str, Any]] = []
        events = read_events(self.repo, findings=findings)
        self.untrusted_records.extend((str(f["key"]), str(f["error"])) for f in findings)
        return events

    def evidence_objects(self) -> list[ObjectInfo]:
        """Audit events, drill records, verification records and reports."""
        prefixes = ("audit/", DRILLS_PREFIX, REPORTS_PREFIX, *VERIFY_PREFIXES)
        found = [info for prefix in prefixes for info in self._list(prefix)]
        return sorted(found, key=lambda i: i.modified, reverse=True)


def known_engines() -> tuple[str, ...]:
    return ENGINES
