"""Compliance controls on real repositories (moto S3 over HTTP and a local folder):
each control passes on a compliant fixture and fails on a specific violation; the
compliance-audit and backup-health flows against a real Prefect API (report files,
artifact, events, audit event, failed run); the Prometheus exporter scraped over HTTP."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from strongroom.audit import event_key, record_event
from strongroom.catalog import Artifact, Catalog, Manifest, data_key
from strongroom.compliance import TargetPolicy, evaluate, write_report
from strongroom.compliance.controls import CONTROL_IDS
from strongroom.compliance.evaluate import ComplianceReport
from strongroom.ids import new_backup_id
from strongroom.repository.base import Repository
from strongroom.repository.local import LocalRepository
from strongroom.signing import put_signed_json
from tests.fixtures.compliant_bucket import (
    RETENTION,
    Bucket,
    compliant_bucket,
    s3_repository,
)
from tests.fixtures.strongroom_fixtures import (
    make_local_repo,
    scrape_exporter,
    signing_block_fields,
)

RECIPIENT = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"
# what pg_basebackup records (strongroom.engines.postgres.pitr.basebackup): WAL from segment 3
BASE_DETAILS = {
    "timeline": 1,
    "start_lsn": "0/3000028",
    "stop_lsn": "0/3000138",
    "stop_time": "2026-01-01T00:00:00+00:00",
    "start_wal": "000000010000000000000003",
    "wal_segment_size": 16 * 1024 * 1024,
}
TARGETS = [
    TargetPolicy(
        engine="postgresql",
        target="shop",
        rpo_hours=24,
        rto_minutes=30,
        pitr=True,
        transport="verified",
    ),
    TargetPolicy(engine="redis", target="cache", rpo_hours=12, rto_minutes=15, transport="local"),
]


# ------------------------------------------------------------------ builders


def add_backup(
    repo: Repository,
    engine: str,
    target: str,
    *,
    hours_ago: float,
    stored_size: int = 50_000_000,
    duration_s: float = 60.0,
    encryption: str = "age-x25519",
    kind: str = "logical",
    details: dict[str, Any] | None = None,
    now: dt.datetime | None = None,
    audit: bool = False,
) -> Manifest:
    """A backup as the engines write it: artifact object(s), then the manifest."""
    finished = (now or dt.datetime.now(dt.UTC)) - dt.timedelta(hours=hours_ago)
    started = finished - dt.timedelta(seconds=duration_s)
    bid = new_backup_id(started)
    payload = os.urandom(256)
    key = data_key(engine, target, bid, "dump.zst.age")
    repo.put_bytes(key, payload)
    manifest = Manifest(
        backup_id=bid,
        engine=engine,
        target=target,
        kind=kind,
        started_at=started,
        finished_at=finished,
        repository=repo.describe(),
        artifacts=[
            Artifact(
                name="dump.zst.age",
                key=key,
                content="dump",
                raw_size=stored_size * 4,
                stored_size=stored_size,
                raw_sha256=hashlib.sha256(b"raw" + payload).hexdigest(),
                stored_sha256=hashlib.sha256(payload).hexdigest(),
                encryption=encryption,
                recipients=[RECIPIENT] if encryption.startswith("age") else [],
            )
        ],
        details=details or {},
    )
    Catalog(repo).write(manifest)
    if audit:
        record_event(
            repo,
            action="backup",
            engine=engine,
            target=target,
            backup_id=bid,
            result="success",
            details={},
        )
    return manifest


def add_drill(
    repo: Repository,
    engine: str,
    target: str,
    *,
    days_ago: float,
    rto_s: float,
    ok: bool = True,
    rto_objective_s: float | None = None,
) -> str:
    """A drill record in the format strongroom.drills.core.run_drill stores."""
    at = dt.datetime.now(dt.UTC) - dt.timedelta(days=days_ago)
    drill_id = new_backup_id(at)
    record = {
        "format_version": 1,
        "drill_id": drill_id,
        "engine": engine,
        "target": target,
        "started_at": at.isoformat(),
        "finished_at": (at + dt.timedelta(seconds=rto_s + 5)).isoformat(),
        "objectives": {"rto_s": rto_objective_s, "rpo_s": None},
        "rto_s": rto_s,
        "rpo_s": 3600.0,
        "ok": ok,
        "failures": [] if ok else ["restored data differs"],
    }
    key = f"drills/{engine}/{target}/{drill_id}.json"
    put_signed_json(repo, key, record)
    return key


def add_verification(repo: Repository, manifest: Manifest, *, ok: bool = True) -> str:
    """A deep-verify evidence record (strongroom.policy.verification format)."""
    vid = new_backup_id()
    record = {
        "verification_id": vid,
        "kind": "deep-verify",
        "backup_id": manifest.backup_id,
        "engine": manifest.engine,
        "target": manifest.target,
        "verified_at": dt.datetime.now(dt.UTC).isoformat(),
        "ok": ok,
    }
    key = f"verifications/{manifest.engine}/{manifest.target}/{vid}.json"
    put_signed_json(repo, key, record)
    return key


def add_wal(repo: Repository, target: str, segnos: list[int], timeline: int = 1) -> None:
    for segno in segnos:
        name = f"{timeline:08X}{segno // 256:08X}{segno % 256:08X}"
        repo.put_bytes(f"wal/{target}/{timeline:08X}/{name}", b"SRWAL1 " + name.encode())


def populate(repo: Repository, targets: list[TargetPolicy] = TARGETS) -> dict[str, Manifest]:
    """A compliant history: backups over the last days (newest fresh), a recent drill under
    RTO per target, a clean deep verify of the newest backup, continuous WAL for PITR."""
    latest: dict[str, Manifest] = {}
    for n, t in enumerate(targets):
        for i, hours in enumerate((96, 72, 48, 24, 2)):
            m = add_backup(
                repo,
                t.engine,
                t.target,
                hours_ago=hours,
                stored_size=(40 + 10 * n + i * 3) * 1_000_000,
                duration_s=30 + 7 * i + 11 * n,
                kind="base" if t.pitr else "logical",
                details=BASE_DETAILS if t.pitr else {},
                audit=True,
            )
        latest[t.target] = m
        for days, rto in ((15, 400.0), (8, 350.0), (1, 300.0 + 60 * n)):
            add_drill(repo, t.engine, t.target, days_ago=days, rto_s=rto)
        add_verification(repo, m)
        if t.pitr:
            add_wal(repo, t.target, list(range(3, 12)))
    return latest


def run(bucket: Bucket, targets: list[TargetPolicy] = TARGETS, **kwargs: Any) -> ComplianceReport:
    kwargs.setdefault("retention", RETENTION)
    return evaluate(bucket.repo, config=bucket.config, targets=targets, **kwargs)


def statuses(report: ComplianceReport) -> dict[str, str]:
    return {c.id: c.status for c in report.controls}


def control(report: ComplianceReport, control_id: str) -> Any:
    return next(c for c in report.controls if c.id == control_id)


def messages(report: ComplianceReport, control_id: str, status: str = "fail") -> str:
    return "\n".join(f.message for f in control(report, control_id).findings if f.status == status)


# ------------------------------------------------------------------- controls


@pytest.fixture(scope="module")
def compliant(s3_server: Any) -> Bucket:
    bucket = compliant_bucket(s3_server)
    populate(bucket.repo)
    return bucket


def test_every_control_passes_on_a_compliant_repository(compliant: Bucket) -> None:
    report = run(compliant)
    bad = {
        c.id: [f.message for f in c.findings if f.status != "pass"]
        for c in report.controls
        if c.status != "pass"
    }
    assert not bad, bad
    assert len(report.controls) == len(CONTROL_IDS) == 15 and "SR-SIG-01" in CONTROL_IDS
    for c in report.controls:
        assert c.frameworks["SOC 2"] and c.frameworks["HIPAA"], c.id
        assert c.frameworks["ISO/IEC 27001:2022"], c.id
        assert c.evidence and c.description
    assert report.audit_head["seq"] == 10 and report.audit_head["ok"]
    iso = {c.id for c in report.controls if "A.8.13" in c.frameworks["ISO/IEC 27001:2022"]}
    assert {"SR-FRESH-01", "SR-LOCK-01", "SR-DRILL-01"} <= iso
    hipaa = {r for c in report.controls for r in c.frameworks["HIPAA"]}
    assert {
        "164.308(a)(7)(ii)(A)",
        "164.308(a)(7)(ii)(B)",
        "164.308(a)(7)(ii)(D)",
        "164.312(a)(2)(iv)",
    } <= hipaa
    soc2 = {r for c in report.controls for r in c.frameworks["SOC 2"]}
    assert {"A1.2", "A1.3", "CC7.2"} <= soc2


def test_stale_backup_fails_freshness(compliant: Bucket) -> None:
    tight = [TARGETS[0].model_copy(update={"rpo_hours": 1.0}), TARGETS[1]]
    report = run(compliant, tight)
    assert statuses(report)["SR-FRESH-01"] == "fail"
    text = messages(report, "SR-FRESH-01")
    assert "postgresql/shop" not in text and "RPO is 1 h" in text
    finding = next(f for f in control(report, "SR-FRESH-01").findings if f.status == "fail")
    assert (finding.engine, finding.target) == ("postgresql", "shop")
    # an unknown target with no backup at all fails too
    report = run(compliant, [*TARGETS, TargetPolicy(engine="clickhouse", target="events")])
    assert "no backup in the catalog" in messages(report, "SR-FRESH-01")


def test_missing_drill_and_slow_drill_fail(compliant: Bucket) -> None:
    extra = TargetPolicy(engine="postgresql", target="ledger", rto_minutes=1)
    add_backup(compliant.repo, "postgresql", "ledger", hours_ago=1)
    add_verification(
        compliant.repo, Catalog(compliant.repo).resolve("latest", "postgresql", "ledger")
    )
    report = run(compliant, [*TARGETS, extra])
    assert statuses(report)["SR-DRILL-01"] == "fail"
    assert "no restore drill on record" in messages(report, "SR-DRILL-01")
    add_drill(compliant.repo, "postgresql", "ledger", days_ago=0.1, rto_s=600)
    report = run(compliant, [*TARGETS, extra])
    assert "took 10.0 min, RTO is 1 min" in messages(report, "SR-DRILL-01")
    add_drill(compliant.repo, "postgresql", "ledger", days_ago=0.05, rto_s=20, ok=False)
    assert "failed" in messages(run(compliant, [*TARGETS, extra]), "SR-DRILL-01")


def test_old_drill_fails(s3_server: Any) -> None:
    bucket = compliant_bucket(s3_server)
    target = TargetPolicy(engine="postgresql", target="old", rto_minutes=30)
    m = add_backup(bucket.repo, "postgresql", "old", hours_ago=1)
    add_verification(bucket.repo, m)
    add_drill(bucket.repo, "postgresql", "old", days_ago=20, rto_s=60)
    report = run(bucket, [target])
    assert "interval is 8 days" in messages(report, "SR-DRILL-01")


def test_unencrypted_objects_fail(s3_server: Any) -> None:
    """S3 (and moto) encrypt every object of a bucket with default encryption, so an
    unencrypted object needs a bucket without it: both are reported."""
    bucket = compliant_bucket(s3_server, protect=False)
    populate(bucket.repo, TARGETS[1:])
    plain, _ = s3_repository(s3_server, bucket.name, sse="none")
    add_backup(plain, "redis", "cache", hours_ago=0.5)  # no SSE on its objects
    add_backup(bucket.repo, "redis", "cache", hours_ago=0.2, encryption="none")
    report = run(bucket, TARGETS[1:])
    st = statuses(report)
    assert st["SR-ENC-02"] == "fail"
    text = messages(report, "SR-ENC-02")
    assert "the bucket has no default encryption" in text
    assert text.count("is not encrypted at rest (no SSE)") == 2  # manifest and artifact
    assert st["SR-ENC-01"] == "fail"
    assert "is not encrypted client-side (encryption: none)" in messages(report, "SR-ENC-01")
    assert "no public access block" in messages(report, "SR-PAB-01")


def test_lock_too_short_fails(s3_server: Any) -> None:
    bucket = compliant_bucket(s3_server)
    populate(bucket.repo, TARGETS[1:])
    short, _ = s3_repository(s3_server, bucket.name, retention_days=1)
    add_backup(short, "redis", "cache", hours_ago=0.5)
    report = run(bucket, TARGETS[1:])
    assert statuses(report)["SR-LOCK-01"] == "fail"
    text = messages(report, "SR-LOCK-01")
    assert "is locked until" in text and "retention rule " in text
    # without a retention policy the minimum lock setting applies
    report = run(bucket, TARGETS[1:], retention=None)
    assert "minimum lock 30 days" in messages(report, "SR-LOCK-01")


def test_governance_mode_warns(s3_server: Any) -> None:
    bucket = compliant_bucket(s3_server)
    governance, config = s3_repository(s3_server, bucket.name, lock_mode="GOVERNANCE")
    populate(governance, TARGETS[1:])
    report = run(Bucket(governance, config, bucket.name), TARGETS[1:])
    assert statuses(report)["SR-LOCK-01"] == "warn"
    assert "GOVERNANCE" in messages(report, "SR-LOCK-01", "warn")


def test_versioning_off_and_no_lock_fail(s3_server: Any) -> None:
    bucket = compliant_bucket(s3_server, locked=False)
    populate(bucket.repo, TARGETS[1:])
    report = run(bucket, TARGETS[1:])
    st = statuses(report)
    assert st["SR-VERS-01"] == "fail"
    assert "versioning is off" in messages(report, "SR-VERS-01")
    assert "object lock is not enabled on the bucket" in messages(report, "SR-LOCK-01")
    assert st["SR-DOC-01"] == "fail"
    assert "must be kept 6 years" in messages(report, "SR-DOC-01")
    assert st["SR-ENC-02"] == "pass" and st["SR-FRESH-01"] == "pass"


def test_tampered_audit_event_fails(s3_server: Any) -> None:
    bucket = compliant_bucket(s3_server)
    populate(bucket.repo, TARGETS[1:])
    first = run(bucket, TARGETS[1:])
    assert statuses(first)["SR-AUDIT-01"] == "pass"
    write_report(bucket.repo, first)  # records the chain head as the next anchor
    key = event_key(3)
    data = json.loads(bucket.repo.get_bytes(key))
    data["result"] = "failure"
    bucket.repo.put_bytes(
        key, json.dumps(data, sort_keys=True, separators=(",", ":")).encode(), overwrite=True
    )
    report = run(bucket, TARGETS[1:])
    assert statuses(report)["SR-AUDIT-01"] == "fail"
    text = messages(report, "SR-AUDIT-01")
    assert "edited" in text and "overwritten" in text


def test_retention_below_floor_fails(compliant: Bucket) -> None:
    report = run(compliant, retention={"keep_last": 7, "yearly": 3, "compliance_floor_years": 0})
    assert statuses(report)["SR-RET-01"] == "fail"
    assert "compliance floor is 7" in messages(report, "SR-RET-01")
    assert statuses(run(compliant, retention=None))["SR-RET-01"] == "warn"


def test_failed_deep_verify_fails(s3_server: Any) -> None:
    bucket = compliant_bucket(s3_server)
    m = populate(bucket.repo, TARGETS[1:])["cache"]
    add_verification(bucket.repo, m, ok=False)
    report = run(bucket, TARGETS[1:])
    assert statuses(report)["SR-VERIFY-01"] == "fail"
    assert m.backup_id in messages(report, "SR-VERIFY-01")


def test_wal_gap_fails(s3_server: Any) -> None:
    bucket = compliant_bucket(s3_server)
    populate(bucket.repo, TARGETS[:1])
    assert control(run(bucket, TARGETS[:1]), "SR-WAL-01").findings[0].data["source"] == (
        "pg_wal_check"
    )
    add_wal(bucket.repo, "shop", [14, 15])  # 12 and 13 are missing
    report = run(bucket, TARGETS[:1])
    assert statuses(report)["SR-WAL-01"] == "fail"
    assert "WAL check: 2 missing segment(s)" in messages(report, "SR-WAL-01")


def test_wal_gap_from_the_listing_alone(tmp_path: Path) -> None:
    """Base backups without LSN details: continuity is checked from the archive listing."""
    repo = make_local_repo(tmp_path / "repo")
    target = TargetPolicy(engine="postgresql", target="old", pitr=True)
    add_backup(
        repo,
        "postgresql",
        "old",
        hours_ago=1,
        kind="base",
        details={"start_wal_segment": "000000010000000000000003"},
    )
    add_wal(repo, "old", [1, 2, 3, 4, 6, 7])  # 1-2 precede the base backup; 5 is missing
    report = evaluate(repo, targets=[target])
    assert "1 gap(s), 1 segment(s) missing, first 000000010000000000000005" in messages(
        report, "SR-WAL-01"
    )
    add_wal(repo, "old", [5])
    finding = control(evaluate(repo, targets=[target]), "SR-WAL-01").findings[0]
    assert finding.status == "pass" and "from the oldest base backup" in finding.message


def test_local_repository_results(tmp_path: Path) -> None:
    repo = make_local_repo(tmp_path / "repo")
    populate(repo)
    report = evaluate(repo, targets=TARGETS, retention=RETENTION)
    st = statuses(report)
    assert st["SR-LOCK-01"] == "fail" and st["SR-DOC-01"] == "fail"
    assert st["SR-ENC-02"] == "warn" and st["SR-VERS-01"] == "warn"
    assert st["SR-PAB-01"] == "pass"
    for control_id in ("SR-FRESH-01", "SR-ENC-01", "SR-DRILL-01", "SR-VERIFY-01", "SR-WAL-01"):
        assert st[control_id] == "pass", (control_id, control(report, control_id).findings)
    os.chmod(tmp_path / "repo" / "catalog", 0o777)
    report = evaluate(repo, targets=TARGETS, retention=RETENTION)
    assert "writable by every user" in messages(report, "SR-PAB-01")


def test_missing_features_warn_with_a_clear_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from strongroom.compliance import evidence

    monkeypatch.setattr(
        evidence,
        "FEATURE_MODULES",
        {k: ("strongroom.no_such_module",) for k in evidence.FEATURE_MODULES},
    )
    repo = make_local_repo(tmp_path / "repo")
    add_backup(repo, "postgresql", "shop", hours_ago=1)
    report = evaluate(repo, targets=TARGETS[:1])
    for control_id, feature in (
        ("SR-DRILL-01", "restore drills"),
        ("SR-VERIFY-01", "deep verify"),
        ("SR-WAL-01", "PITR (WAL archiving)"),
        ("SR-RET-01", "retention policy"),
    ):
        c = control(report, control_id)
        assert c.status == "warn", (control_id, c.findings)
        assert f"warn: no evidence found (feature {feature} not present)" in c.summary


def test_report_json_html_and_anchor(compliant: Bucket, tmp_path: Path) -> None:
    report = run(compliant)
    keys = write_report(compliant.repo, report, local_dir=tmp_path)
    assert compliant.repo.exists(keys["json_key"]) and compliant.repo.exists(keys["html_key"])
    saved = json.loads(Path(keys["json"]).read_text())
    assert saved["audit_head"]["seq"] == report.audit_head["seq"]
    assert {c["id"] for c in saved["controls"]} >= {"SR-FRESH-01", "SR-AUDIT-01"}
    html = Path(keys["html"]).read_text()
    assert html.count('data-chart="') == 4 and 'id="controls"' in html
    for forbidden in ("http://", "https://", "<script", "<link", "@import", "url("):
        if forbidden == "http://":
            assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
        else:
            assert forbidden not in html, forbidden
    # the next evaluation checks the chain against the head this report recorded
    again = run(compliant)
    assert control(again, "SR-AUDIT-01").findings[0].data["anchors_checked"] >= 1
    assert statuses(again)["SR-DOC-01"] == "pass"  # the reports themselves are locked


# ---------------------------------------------------------------------- flows


def _api(fn: Any) -> Any:
    from prefect.client.orchestration import get_client

    async def go() -> Any:
        async with get_client() as client:
            return await fn(client)

    return asyncio.run(go())


def _events(name: str, since: dt.datetime, want: int, timeout: float = 20.0) -> list[Any]:
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter

    flt = EventFilter(
        event=EventNameFilter(name=[name]),
        occurred=EventOccurredFilter(since=since, until=since + dt.timedelta(hours=1)),
    )
    deadline = time.monotonic() + timeout
    found: list[Any] = []
    while time.monotonic() < deadline:
        page = _api(lambda c: c.read_events(filter=flt, limit=50))
        found = list(page.events)
        if len(found) >= want:
            return found
        time.sleep(0.5)
    return found


@pytest.fixture
def flow_repo(prefect_api: str, tmp_path: Path) -> LocalRepository:
    from blocks import BackupRepository, PostgresTarget, register_all

    register_all()
    root = tmp_path / "repo"
    BackupRepository(**signing_block_fields(), local_path=str(root)).save(
        "compliance", overwrite=True
    )
    PostgresTarget(rpo_hours=6, rto_minutes=20).save("shop", overwrite=True)
    return make_local_repo(root)


def test_transport_control_reports_each_target_from_its_block_fields(
    compliant: Bucket,
) -> None:
    from strongroom.transport import transport_of

    assert transport_of("postgresql", {"host": "/run/postgresql"}) == "local"
    assert transport_of("postgresql", {"host": "db.internal"}) == "encrypted"  # require
    assert transport_of("postgresql", {"host": "db", "sslmode": "verify-full"}) == "verified"
    assert transport_of("postgresql", {"host": "db", "sslmode": "disable"}) == (
        "plaintext-by-opt-out"
    )
    assert transport_of("clickhouse", {"host": "ch", "secure": True}) == "verified"
    assert transport_of("clickhouse", {"host": "ch", "secure": True, "verify_tls": False}) == (
        "encrypted"
    )
    assert transport_of("redis", {"host": "10.0.0.5", "tls": False}) == "plaintext-by-opt-out"
    assert transport_of("redis", {"port": 6379}) is None
    targets = [
        TARGETS[0],
        TARGETS[1],
        TargetPolicy(engine="clickhouse", target="events", transport="encrypted"),
        TargetPolicy(engine="redis", target="sessions", transport="plaintext-by-opt-out"),
        TargetPolicy(engine="postgresql", target="adhoc"),
    ]
    found = {f.subject: f for f in control(run(compliant, targets), "SR-TLS-01").findings}
    expected = {
        "postgresql/shop": "pass",
        "redis/cache": "pass",
        "clickhouse/events": "warn",
        "redis/sessions": "fail",
        "postgresql/adhoc": "warn",
    }
    assert {subject: found[subject].status for subject in expected} == expected
    assert "allow_plaintext" in found["redis/sessions"].message
    assert "verify-full" in found["clickhouse/events"].message


def test_compliance_audit_flow(flow_repo: LocalRepository, tmp_path: Path) -> None:
    from flows.audit import compliance_audit, write_compliance_report
    from strongroom.audit import read_events, verify_chain
    from strongroom.compliance.model import ControlsFailed

    populate(flow_repo, TARGETS[:1])
    since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
    out = tmp_path / "out"
    with pytest.raises(ControlsFailed) as failed:
        compliance_audit(repository="compliance", output_dir=str(out), retention=RETENTION)
    result = failed.value.summary
    assert failed.value.exit_code == 10
    assert {"SR-LOCK-01", "SR-DOC-01"} <= set(result["summary"]["failed"])
    # objectives came from the PostgresTarget block "shop"
    html_path = Path(result["paths"]["html"])
    assert html_path.is_file() and html_path.parent == out
    assert flow_repo.exists(result["paths"]["html_key"])
    saved = json.loads(Path(result["paths"]["json"]).read_text())
    shop = next(t for t in saved["targets"] if t["target"] == "shop")
    assert shop["rpo_hours"] == 6 and shop["source"].startswith("block")
    assert shop["transport"] == "local"  # read from the block: a loopback host
    # one audit event for the audit itself, with the report's checksum; chain intact
    last = read_events(flow_repo)[-1]
    assert last.action == "compliance-audit" and last.result == "fail"
    assert result["paths"]["json_key"] in last.checksums
    assert last.actor["kind"] == "prefect-flow-run"
    assert verify_chain(flow_repo).ok
    # one Prefect event per failed finding, on the repository resource
    events = _events("strongroom.compliance.violation", since, result["violations"])
    assert len(events) == result["violations"] >= 2
    lock = [e for e in events if e.payload["control"] == "SR-LOCK-01"]
    assert len(lock) == 1 and lock[0].resource.id == "strongroom.repository.compliance"
    assert "local folder cannot enforce object lock" in lock[0].payload["detail"]
    assert "A.8.13" in lock[0].payload["framework"]
    assert any(r.id == "prefect.tag.strongroom" for r in lock[0].related)

    async def artifacts(client: Any) -> list[Any]:
        return list(await client.read_artifacts(limit=200))

    md = [a for a in _api(artifacts) if a.key == "compliance-audit-summary"]
    assert md and "SR-LOCK-01" in str(md[-1].data)

    # the flow run is Failed in Prefect
    async def runs(client: Any) -> list[Any]:
        return list(await client.read_flow_runs(limit=200))

    states = [r.state.name for r in _api(runs) if r.name and r.state and r.flow_id]
    assert "Failed" in states

    # for make demo: no failure, path and summary back; the retention policy block is read
    from blocks.policy import RetentionPolicyBlock

    RetentionPolicyBlock.register_type_and_schema()
    RetentionPolicyBlock(yearly=3, compliance_floor_years=0).save("cmp-policy", overwrite=True)
    path, summary = write_compliance_report(
        repository="compliance", output_dir=out, policy="cmp-policy"
    )
    assert path.is_file() and path.suffix == ".html"
    assert summary["fail"] >= 3 and summary["pass"] + summary["warn"] + summary["fail"] == len(
        CONTROL_IDS
    )
    assert "SR-RET-01" in summary["failed"]
    # the second audit anchored the chain at the head the first report saw
    assert verify_chain(flow_repo).ok

    # the CLI: `strongroom audit` prints the result and exits 10 on a failed control
    from typer import Typer
    from typer.testing import CliRunner

    from strongroom.cli.audit import register

    app = Typer()
    register(app)
    cli = CliRunner().invoke(app, ["audit", "-r", "compliance", "-o", str(out), "--json"])
    assert cli.exit_code == 10, cli.output
    printed = json.loads(cli.stdout)
    assert "SR-LOCK-01" in printed["summary"]["failed"] and Path(printed["paths"]["html"]).is_file()


def test_backup_health_emits_stale_events(flow_repo: LocalRepository) -> None:
    from flows.health import backup_health

    add_backup(flow_repo, "postgresql", "shop", hours_ago=8)  # RPO 6 h (block): stale
    add_backup(flow_repo, "redis", "cache", hours_ago=1)  # default RPO 24 h: fresh
    since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
    result = backup_health(repository="compliance")
    # other target blocks registered in this session have no backups here: stale too
    assert "postgresql/shop" in result["stale"] and "redis/cache" not in result["stale"]
    assert not result["ok"]
    events = _events("strongroom.backup.stale", since, len(result["stale"]))
    shop = [e for e in events if e.resource.id == "strongroom.target.postgresql.shop"]
    assert len(shop) == 1
    event = shop[0]
    assert event.resource.id == "strongroom.target.postgresql.shop"
    assert event.resource["strongroom.target"] == "shop"
    assert event.payload["rpo_hours"] == 6 and event.payload["age_hours"] > 7.9
    assert {r.id for r in event.related} >= {"prefect.tag.strongroom", "prefect.tag.postgresql"}


# -------------------------------------------------------------------- metrics


def test_metrics_endpoint(tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    repo = make_local_repo(tmp_path / "repo")
    now = dt.datetime.now(dt.UTC)
    add_backup(repo, "postgresql", "shop", hours_ago=5, stored_size=1000, audit=True)
    last = add_backup(
        repo, "postgresql", "shop", hours_ago=1, stored_size=4321, duration_s=42.5, audit=True
    )
    record_event(
        repo,
        action="backup",
        engine="postgresql",
        target="shop",
        backup_id=None,
        result="failure",
        details={"error": "pg_dump exited 1"},
    )
    add_backup(repo, "redis", "cache", hours_ago=2, stored_size=77)  # no audit events
    add_drill(repo, "postgresql", "shop", days_ago=1, rto_s=321.5)
    add_wal(repo, "shop", [1, 2, 3])
    text = scrape_exporter(repo)
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            values[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def v(name: str, **labels: str) -> float:
        return values[(name, tuple(sorted(labels.items())))]

    shop = {"engine": "postgresql", "target": "shop"}
    assert v("strongroom_backup_last_success_timestamp_seconds", **shop) == pytest.approx(
        last.finished_at.timestamp()
    )
    assert v("strongroom_backup_last_size_bytes", **shop) == 4321
    assert v("strongroom_backup_last_duration_seconds", **shop) == pytest.approx(42.5)
    assert v("strongroom_backup_age_seconds", **shop) == pytest.approx(3600, abs=120)
    assert v("strongroom_backup_runs_total", **shop, result="success") == 2
    assert v("strongroom_backup_runs_total", **shop, result="failure") == 1
    cache = {"engine": "redis", "target": "cache"}
    assert v("strongroom_backup_runs_total", **cache, result="success") == 1  # catalog count
    assert v("strongroom_backup_last_size_bytes", **cache) == 77
    assert v("strongroom_drill_rto_seconds", **shop) == pytest.approx(321.5)
    assert v("strongroom_drill_last_success", **shop) == 1
    assert v("strongroom_wal_segments", target="shop") == 3
    assert 0 <= v("strongroom_wal_archive_lag_seconds", target="shop") < 600
    assert (
        v("strongroom_wal_last_archived_timestamp_seconds", target="shop") <= now.timestamp() + 600
    )
    assert v("strongroom_scrape_success") == 1
