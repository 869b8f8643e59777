"""Deep verification: which backups to re-read (a sampling policy), reading them back
with every check, and the evidence records that prove it was done.

Each run picks, per target (engine/target/kind series):

1. the newest ``newest_per_target`` backups (always: the one a restore would use);
2. backups never verified before (oldest first);
3. backups whose last verification is older than ``reverify_after_days``;
4. a random ``sample_fraction`` of the rest (so every backup is re-read now and then);

then caps the list at ``max_backups`` / ``max_bytes`` (in that priority order).
Every artifact of each picked backup is read back: stored checksum, decryption
(authenticated), decompression, plaintext checksum and the engine's structure
check (``strongroom.verify``). One evidence record per verified backup is written
to ``verifications/<engine>/<target>/<verification_id>.json``, signed
(``strongroom.signing``). A record not signed by a trusted key is not history: it
cannot make a backup look recently verified (``list_verifications`` skips it and
reports it in ``findings``).
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field

from strongroom.catalog import Catalog, Manifest
from strongroom.config import EncryptionConfig
from strongroom.errors import IntegrityError, NotFound
from strongroom.ids import (
    BACKUP_ID_RE,
    check_engine,
    check_name,
    new_backup_id,
    record_key_parts,
    scope_prefix,
)
from strongroom.repository.base import Repository
from strongroom.signing import get_verified_json, put_signed_json
from strongroom.verify import verify_backup

NEWEST = "newest"
NEVER = "never verified"
STALE = "verification stale"
RANDOM = "random sample"


class SamplingPolicy(BaseModel):
    newest_per_target: int = Field(default=1, ge=0)
    include_unverified: bool = True
    reverify_after_days: float | None = Field(default=30, ge=0)
    sample_fraction: float = Field(default=0.1, ge=0, le=1)
    max_backups: int | None = Field(default=None, ge=1)
    max_bytes: int | None = Field(default=None, ge=1)
    seed: int | None = None


@dataclass(frozen=True)
class Pick:
    manifest: Manifest
    reason: str


def select_backups(
    manifests: Sequence[Manifest],
    last_verified: dict[str, dt.datetime],
    policy: SamplingPolicy,
    now: dt.datetime,
    rng: random.Random | None = None,
) -> list[Pick]:
    """Pure: which backups to verify this run, in priority order, each with its reason."""
    rng = rng or random.Random(policy.seed)  # noqa: S311 (sampling, not security)
    series: dict[tuple[str, str, str], list[Manifest]] = defaultdict(list)
    for m in manifests:
        series[(m.engine, m.target, m.kind)].append(m)
    chosen: dict[str, Pick] = {}
    tiers: list[list[Pick]] = [[], [], [], []]
    for key in sorted(series):
        items = sorted(series[key], key=lambda m: m.backup_id)
        for m in items[::-1][: policy.newest_per_target]:
            tiers[0].append(Pick(m, NEWEST))
        for m in items:
            last = last_verified.get(m.backup_id)
            if last is None and policy.include_unverified:
                tiers[1].append(Pick(m, NEVER))
            elif (
                last is not None
                and policy.reverify_after_days is not None
                and now - last > dt.timedelta(days=policy.reverify_after_days)
            ):
                tiers[2].append(Pick(m, f"{STALE} (last {last.date().isoformat()})"))
    # oldest verification first among the stale ones
    tiers[2].sort(key=lambda p: last_verified[p.manifest.backup_id])
    for tier in tiers[:3]:
        for p in tier:
            chosen.setdefault(p.manifest.backup_id, p)
    rest = [m for m in sorted(manifests, key=lambda m: m.backup_id) if m.backup_id not in chosen]
    if rest and policy.sample_fraction > 0:
        count = max(1, round(len(rest) * policy.sample_fraction))
        for m in rng.sample(rest, min(count, len(rest))):
            chosen.setdefault(m.backup_id, Pick(m, RANDOM))
    picks = list(chosen.values())
    if policy.max_backups is not None:
        picks = picks[: policy.max_backups]
    if policy.max_bytes is not None:
        capped: list[Pick] = []
        total = 0
        for p in picks:
            if capped and total + p.manifest.stored_size > policy.max_bytes:
                continue
            capped.append(p)
            total += p.manifest.stored_size
        picks = capped
    return picks


def evidence_key(engine: str, target: str, verification_id: str) -> str:
    return (
        f"verifications/{check_engine(engine)}/{check_name(target, 'target name')}/"
        f"{verification_id}.json"
    )


def list_verifications(
    repo: Repository,
    engine: str | None = None,
    target: str | None = None,
    *,
    findings: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Evidence records signed by a trusted key (oldest first); untrusted or unreadable
    ones are skipped and, when ``findings`` is given, appended to it (``key``, ``error``)."""
    prefix = scope_prefix("verifications", engine, target)
    records = []
    for info in repo.list(prefix):
        parts = record_key_parts(info.key, target)
        if parts is None:
            continue
        try:
            record, verdict = get_verified_json(repo, info.key, strict=False)
        except NotFound:
            continue
        except IntegrityError as exc:
            if findings is not None:
                findings.append({"key": info.key, "status": "unreadable", "error": str(exc)})
            continue
        if not verdict.trusted:
            if findings is not None:
                findings.append(verdict.finding())
            continue
        records.append(record)
    return sorted(records, key=lambda r: str(r.get("verification_id", "")))


def last_verified_at(records: Sequence[dict[str, Any]]) -> dict[str, dt.datetime]:
    """Per backup id, when it was last verified successfully."""
    found: dict[str, dt.datetime] = {}
    for r in records:
        if not r.get("ok") or not isinstance(r.get("backup_id"), str):
            continue
        try:
            when = dt.datetime.fromisoformat(str(r["verified_at"]))
        except (KeyError, ValueError):
            continue
        bid = r["backup_id"]
        if bid not in found or when > found[bid]:
            found[bid] = when
    return found


def deep_verify(
    repo: Repository,
    enc: EncryptionConfig,
    sampling: SamplingPolicy,
    *,
    engine: str | None = None,
    target: str | None = None,
    now: dt.datetime | None = None,
    on_backup: Callable[[Manifest, str], None] | None = None,
) -> dict[str, Any]:
    """Verify the sampled backups, store one evidence record each; returns a report."""
    moment = now or dt.datetime.now(dt.UTC)
    repo.trust.require_signer("verification evidence")  # before reading anything back
    manifests = Catalog(repo).list(engine, target)
    untrusted: list[dict[str, Any]] = []
    history = last_verified_at(list_verifications(repo, engine, target, findings=untrusted))
    picks = select_backups(manifests, history, sampling, moment)
    results: list[dict[str, Any]] = []
    for pick in picks:
        m = pick.manifest
        if on_backup is not None:
            on_backup(m, pick.reason)
        report = verify_backup(repo, m, enc)
        vid = new_backup_id()
        record = {
            "verification_id": vid,
            "kind": "deep-verify",
            "backup_id": m.backup_id,
            "engine": m.engine,
            "target": m.target,
            "backup_kind": m.kind,
            "backup_finished_at": m.finished_at.isoformat(),
            "reason": pick.reason,
            "verified_at": dt.datetime.now(dt.UTC).isoformat(),
            "ok": bool(report["ok"]),
            "structure_unchecked": [
                a["artifact"] for a in report["artifacts"] if a["ok"] and "structure" not in a
            ],
            "checks": [
                "stored sha256",
                "age decryption (authenticated)",
                "zstd decompression",
                "plaintext sha256",
                "engine structure check",
            ],
            "report": report,
        }
        key = evidence_key(m.engine, m.target, vid)
        put_signed_json(repo, key, json.loads(json.dumps(record, default=str)))
        results.append({**record, "evidence_key": key})
    failed = [r for r in results if not r["ok"]]
    return {
        "ok": not failed,
        "started_at": moment.isoformat(),
        "sampling": sampling.model_dump(),
        "backups_in_scope": len(manifests),
        "verified": len(results),
        "failed": len(failed),
        "bytes_read": sum(int(r["report"]["bytes_read"]) for r in results),
        "results": [
            {
                "backup_id": r["backup_id"],
                "engine": r["engine"],
                "target": r["target"],
                "reason": r["reason"],
                "ok": r["ok"],
                "seconds": r["report"]["duration_s"],
                "error": next(
                    (a.get("error") for a in r["report"]["artifacts"] if not a["ok"]), None
                ),
                "evidence_key": r["evidence_key"],
            }
            for r in results
        ],
        "untrusted_records": untrusted,
        "never_verified_left": sum(
            1
            for m in manifests
            if m.backup_id not in history
            and m.backup_id not in {r["backup_id"] for r in results}
            and BACKUP_ID_RE.fullmatch(m.backup_id)
        ),
    }
