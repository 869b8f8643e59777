"""Every record strongroom trusts later is signed: each kind, each reader.

For each record kind (manifests, pins, verification and drill records, PITR restore
points, audit events, compliance reports) a record signed by the suite's key is
accepted; one written unsigned, one signed by a foreign key (a second strongroom set-up
writing into the same bucket) and one whose body was edited after signing (original
``.sig`` kept) are refused by strict readers (``IntegrityError`` naming the record) and
skipped and reported by lenient ones. A pin is the exception that fails safe: an
untrusted pin still protects its backup from retention, and is reported.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from strongroom.audit import AuditEvent, append_event, event_key, read_events, verify_chain
from strongroom.catalog import Catalog, Manifest, manifest_key
from strongroom.compliance.evidence import REPORTS_PREFIX, Evidence
from strongroom.config import RepositoryConfig
from strongroom.drills.core import drill_key, list_drills, load_drill
from strongroom.engines.postgres.pitr.points import (
    list_restore_points,
    load_restore_point,
    point_key,
)
from strongroom.errors import IntegrityError, InvalidInput
from strongroom.policy import pins as pins_mod
from strongroom.policy.prune import prune
from strongroom.policy.retention import RetentionPolicy
from strongroom.policy.verification import evidence_key, list_verifications
from strongroom.repository.base import Repository
from strongroom.repository.local import LocalRepository
from strongroom.repository.s3 import S3Repository
from strongroom.signing import (
    SIGNED_BY_FIELD,
    Signer,
    Trust,
    get_verified_json,
    put_signed_json,
    sig_key,
)
from tests.fixtures.strongroom_fixtures import TEST_SIGNER, make_local_repo

UTC = dt.UTC
VARIANTS = ("signed", "unsigned", "foreign", "tampered")
UNTRUSTED = VARIANTS[1:]
STATUS = {"unsigned": "unsigned", "foreign": "untrusted-key", "tampered": "bad-signature"}

# A second strongroom set-up: its own signing key, trusting only itself.
FOREIGN = Signer.generate()


def foreign_view(repo: Repository, config: RepositoryConfig | None) -> Repository:
    """The same storage as ``repo``, seen by the foreign set-up."""
    trust = Trust((FOREIGN.public,), FOREIGN)
    if isinstance(repo, LocalRepository):
        return LocalRepository(repo.root, trust=trust)
    assert isinstance(repo, S3Repository) and config is not None
    return S3Repository(config, trust=trust)


def unsigned_view(repo: LocalRepository) -> LocalRepository:
    """The same folder, trusting the suite's key but holding no signing key."""
    return LocalRepository(repo.root, trust=Trust((TEST_SIGNER.public,), None))


def tamper(repo: Repository, key: str, edit: Callable[[dict[str, Any]], None]) -> None:
    """Edit the stored JSON record at ``key`` in place; its ``.sig`` stays as it was."""
    doc = json.loads(repo.get_bytes(key))
    edit(doc)
    repo.put_bytes(key, json.dumps(doc, indent=2, sort_keys=True).encode(), overwrite=True)


def write_variant(
    repo: Repository,
    foreign: Repository,
    key: str,
    doc: dict[str, Any],
    variant: str,
    edit: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """``doc`` at ``key``: signed by the suite's key, unsigned, signed by the foreign
    key, or signed and then edited (``edit``, default: a changed ``note``)."""
    if variant == "signed":
        put_signed_json(repo, key, doc)
    elif variant == "unsigned":
        repo.put_bytes(key, json.dumps(doc, indent=2).encode())
    elif variant == "foreign":
        put_signed_json(foreign, key, doc)
    else:
        put_signed_json(repo, key, doc)
        tamper(repo, key, edit or (lambda d: d.update(note="edited after signing")))


@pytest.fixture(params=["local", "s3"])
def any_repo(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[Repository, Repository]]:
    """(the suite's view, the foreign set-up's view) of one local folder or S3 bucket."""
    if request.param == "local":
        repo: Repository = make_local_repo(tmp_path / "repo")
        yield repo, foreign_view(repo, None)
    else:
        s3, config = request.getfixturevalue("s3_repo")
        yield s3, foreign_view(s3, config)


@pytest.fixture
def local(tmp_path: Path) -> tuple[LocalRepository, Repository]:
    repo = make_local_repo(tmp_path / "repo")
    return repo, foreign_view(repo, None)


def _manifest(target: str, started: dt.datetime) -> Manifest:
    return Manifest(
        backup_id=f"{started:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}",
        engine="postgresql",
        target=target,
        kind="logical",
        started_at=started,
        finished_at=started + dt.timedelta(minutes=3),
        repository="test",
        artifacts=[],
    )


# ------------------------------------------------------------------ any record


@pytest.mark.parametrize("variant", VARIANTS)
def test_verdict_of_each_variant(any_repo: tuple[Repository, Repository], variant: str) -> None:
    repo, foreign = any_repo
    key = "verifications/postgresql/db1/v1.json"
    write_variant(repo, foreign, key, {"verification_id": "v1", "ok": True}, variant)
    doc, verdict = get_verified_json(repo, key, strict=False)
    if variant == "signed":
        assert verdict.trusted and doc[SIGNED_BY_FIELD] == TEST_SIGNER.key_id
        assert get_verified_json(repo, key)[0] == doc
        return
    assert not verdict.trusted and verdict.status == STATUS[variant]
    with pytest.raises(IntegrityError, match=f"{key} is not signed by a trusted key"):
        get_verified_json(repo, key)
    # the foreign set-up trusts its own records only
    assert get_verified_json(foreign, key, strict=False)[1].trusted == (variant == "foreign")


# ------------------------------------------------------------------- manifests


@pytest.mark.parametrize("variant", VARIANTS)
def test_manifest(any_repo: tuple[Repository, Repository], variant: str) -> None:
    repo, foreign = any_repo
    m = _manifest("db1", dt.datetime.now(UTC) - dt.timedelta(hours=1))
    key = manifest_key(m.engine, m.target, m.backup_id)
    if variant == "signed":
        Catalog(repo).write(m)
    elif variant == "foreign":
        Catalog(foreign).write(m)
    elif variant == "unsigned":
        repo.put_bytes(key, m.model_dump_json(indent=2, exclude={"seal"}).encode())
    else:
        Catalog(repo).write(m)
        tamper(repo, key, lambda d: d.update(repository="edited"))
    catalog = Catalog(repo)
    listed = catalog.list()
    if variant == "signed":
        assert [x.backup_id for x in listed] == [m.backup_id] and not catalog.findings
        assert catalog.load("postgresql", "db1", m.backup_id).signed_by == TEST_SIGNER.key_id
        return
    assert listed == []
    assert [(f["key"], f["status"]) for f in catalog.findings] == [(key, STATUS[variant])]
    with pytest.raises(IntegrityError, match="not signed by a trusted key"):
        catalog.load("postgresql", "db1", m.backup_id)


# ------------------------------------------------------------------------ pins


@pytest.mark.parametrize("variant", VARIANTS)
def test_pin_protects_its_backup_and_an_untrusted_one_is_reported(
    any_repo: tuple[Repository, Repository], variant: str
) -> None:
    repo, foreign = any_repo
    now = dt.datetime.now(UTC)
    old, new = (_manifest("db1", now - dt.timedelta(days=d)) for d in (30, 1))
    for m in (old, new):
        Catalog(repo).write(m)
    key = pins_mod.pin_key("postgresql", "db1", old.backup_id)
    if variant == "signed":
        pins_mod.pin(repo, old.backup_id, reason="legal hold", by="tester")
    else:
        record = {"backup_id": old.backup_id, "engine": "postgresql", "target": "db1"}
        write_variant(repo, foreign, key, {**record, "reason": "forged"}, variant)

    (listed,) = pins_mod.list_pins(repo)
    assert listed["key"] == key and listed["trusted"] == (variant == "signed")
    findings = pins_mod.pin_findings(repo)
    policy = RetentionPolicy(keep_last=1, compliance_floor_years=0)
    report = prune(repo, policy).to_dict()
    actions = {b["backup_id"]: (b["action"], b["rule"]) for b in report["backups"]}
    assert actions == {old.backup_id: ("keep", "pinned"), new.backup_id: ("keep", "keep-last 1")}
    assert repo.exists(manifest_key("postgresql", "db1", old.backup_id))
    pin_rows = [f for f in report["findings"] if f["reason"] == "untrusted-pin"]
    if variant == "signed":
        assert findings == [] and pin_rows == [] and report["ok"]
        return
    assert [f["key"] for f in findings] == [key] and findings[0]["backup_id"] == old.backup_id
    assert "not signed by a trusted key" in findings[0]["error"]
    assert [(f["key"], f["backup_id"]) for f in pin_rows] == [(key, old.backup_id)]
    assert report["ok"]  # reported, not an error: the backup is simply kept


def test_unreadable_pin_still_protects(local: tuple[LocalRepository, Repository]) -> None:
    repo, _ = local
    now = dt.datetime.now(UTC)
    old, new = (_manifest("db1", now - dt.timedelta(days=d)) for d in (30, 1))
    for m in (old, new):
        Catalog(repo).write(m)
    key = pins_mod.pin_key("postgresql", "db1", old.backup_id)
    repo.put_bytes(key, b"\xff not json")
    report = prune(repo, RetentionPolicy(keep_last=1, compliance_floor_years=0)).to_dict()
    assert {b["backup_id"]: b["action"] for b in report["backups"]}[old.backup_id] == "keep"
    assert [f["key"] for f in report["findings"] if f["reason"] == "untrusted-pin"] == [key]


# ---------------------------------------------------- verification and drills


@pytest.mark.parametrize("variant", VARIANTS)
def test_verification_record(local: tuple[LocalRepository, Repository], variant: str) -> None:
    repo, foreign = local
    put_signed_json(repo, evidence_key("postgresql", "db1", "v0"), {"verification_id": "v0"})
    key = evidence_key("postgresql", "db1", "v1")
    write_variant(repo, foreign, key, {"verification_id": "v1", "ok": True}, variant)
    findings: list[dict[str, Any]] = []
    ids = [r["verification_id"] for r in list_verifications(repo, findings=findings)]
    if variant == "signed":
        assert ids == ["v0", "v1"] and findings == []
        return
    assert ids == ["v0"]
    assert [(f["key"], f["status"]) for f in findings] == [(key, STATUS[variant])]


def _drill(drill_id: str) -> dict[str, Any]:
    return {
        "drill_id": drill_id,
        "engine": "postgresql",
        "target": "db1",
        "backup_id": "20260101T000000Z-abcdef",
        "started_at": dt.datetime.now(UTC).isoformat(),
        "ok": True,
        "rto_s": 1.5,
        "rpo_s": 60.0,
        "objectives": {"rto_s": 600, "rpo_s": 3600},
        "failures": [],
    }


@pytest.mark.parametrize("variant", VARIANTS)
def test_drill_record(local: tuple[LocalRepository, Repository], variant: str) -> None:
    repo, foreign = local
    key = drill_key("postgresql", "db1", "d1")
    write_variant(repo, foreign, key, _drill("d1"), variant, lambda d: d.update(ok=False))
    findings: list[dict[str, Any]] = []
    rows = list_drills(repo, findings=findings)
    evidence = Evidence(repo)
    by_target = evidence.drills
    if variant == "signed":
        assert [r["drill_id"] for r in rows] == ["d1"] and findings == []
        assert load_drill(repo, "postgresql", "db1", "d1")["ok"] is True
        assert len(by_target[("postgresql", "db1")]) == 1 and evidence.untrusted_records == []
        return
    assert rows == [] and [(f["key"], f["status"]) for f in findings] == [(key, STATUS[variant])]
    with pytest.raises(IntegrityError, match=f"drill record {key} is not signed"):
        load_drill(repo, "postgresql", "db1", "d1")
    assert by_target == {} and [k for k, _ in evidence.untrusted_records] == [key]


# -------------------------------------------------------------- restore points


@pytest.mark.parametrize("variant", VARIANTS)
def test_restore_point(local: tuple[LocalRepository, Repository], variant: str) -> None:
    repo, foreign = local
    key = point_key("pg1", "before-upgrade")
    record = {"name": "before-upgrade", "lsn": "0/3000028", "target": "pg1"}
    write_variant(repo, foreign, key, record, variant, lambda d: d.update(lsn="0/1000000"))
    if variant == "signed":
        (point,) = list_restore_points(repo, "pg1")
        assert point["lsn"] == "0/3000028"
        loaded = load_restore_point(repo, "pg1", "before-upgrade")
        assert loaded is not None and loaded["lsn"] == "0/3000028"
        return
    match = f"restore point record {key} is not signed by a trusted key"
    with pytest.raises(IntegrityError, match=match):
        list_restore_points(repo, "pg1")
    with pytest.raises(IntegrityError, match=match):
        load_restore_point(repo, "pg1", "before-upgrade")
    findings: list[dict[str, Any]] = []
    assert list_restore_points(repo, "pg1", findings=findings) == []
    assert [f["key"] for f in findings] == [key]


# ---------------------------------------------------------------- audit events


@pytest.mark.parametrize("variant", VARIANTS)
def test_audit_event(local: tuple[LocalRepository, Repository], variant: str) -> None:
    repo, foreign = local
    append_event(repo, action="backup", result="ok", actor={"user": "t"})
    writer = {"unsigned": unsigned_view(repo), "foreign": foreign}.get(variant, repo)
    append_event(writer, action="restore", result="ok", actor={"user": "t"})
    key = event_key(2)
    if variant == "tampered":  # still canonical, still chained: only the signature says
        event = AuditEvent.model_validate_json(repo.get_bytes(key))
        edited = event.model_copy(update={"result": "failed"}).canonical_bytes()
        repo.put_bytes(key, edited, overwrite=True)
    append_event(repo, action="prune", result="ok", actor={"user": "t"})
    assert repo.exists(sig_key(key)) == (variant != "unsigned")

    findings: list[dict[str, Any]] = []
    seqs = [e.seq for e in read_events(repo, findings=findings)]
    report = verify_chain(repo, check_versions=False)
    problems = [(p.seq, p.kind) for p in report.problems]
    evidence = Evidence(repo)
    events = evidence.audit_events
    if variant == "signed":
        assert seqs == [1, 2, 3] and findings == [] and problems == []
        assert len(events) == 3 and evidence.untrusted_records == []
        return
    assert seqs == [1, 3] and [(f["key"], f["status"]) for f in findings] == [
        (key, STATUS[variant])
    ]
    kind = "unsigned" if variant == "unsigned" else "untrusted"
    assert (2, kind) in problems
    assert [e.seq for e in events] == [1, 3]
    assert [k for k, _ in evidence.untrusted_records] == [key]


# ---------------------------------------------------------- compliance reports


@pytest.mark.parametrize("variant", VARIANTS)
def test_compliance_report_anchor(local: tuple[LocalRepository, Repository], variant: str) -> None:
    """A forged or edited report must not set the audit anchor the next evaluation
    checks the chain against."""
    repo, foreign = local
    key = f"{REPORTS_PREFIX}20260101T000000Z-abcdef.json"
    head = {"seq": 7, "sha256": "a" * 64}
    write_variant(
        repo,
        foreign,
        key,
        {"report_id": "r1", "audit_head": head},
        variant,
        lambda d: d.update(audit_head={"seq": 7, "sha256": "b" * 64}),
    )
    evidence = Evidence(repo)
    anchors = evidence.anchors
    if variant == "signed":
        assert anchors == {7: "a" * 64} and evidence.untrusted_records == []
        return
    assert anchors == {} and [k for k, _ in evidence.untrusted_records] == [key]


# ------------------------------------------------- signing old records later


def test_sign_records_signs_only_confirmed_unsigned_records_audited(
    local: tuple[LocalRepository, Repository],
) -> None:
    from strongroom.sign_records import record_keys, sign_unsigned_records

    repo, foreign = local
    old = _manifest("db1", dt.datetime.now(UTC) - dt.timedelta(days=3))
    Catalog(repo).write(old)
    pin = pins_mod.pin_key("postgresql", "db1", old.backup_id)
    record = {"backup_id": old.backup_id, "engine": "postgresql", "target": "db1"}
    write_variant(repo, foreign, pin, record, "unsigned")
    drills = {v: drill_key("postgresql", "db1", f"d-{v}") for v in VARIANTS}
    for variant, key in drills.items():
        write_variant(repo, foreign, key, _drill(f"d-{variant}"), variant)
    assert record_keys(repo, "drills") == sorted(drills.values())
    before = {k: repo.get_bytes(k) for k in [pin, *drills.values()]}

    # a foreign or edited record among those asked for: refused, nothing written
    for bad in ("foreign", "tampered"):
        with pytest.raises(IntegrityError, match=f"refusing to sign {drills[bad]}"):
            sign_unsigned_records(repo, TEST_SIGNER, "drills", set(), yes=True)
        assert not repo.exists(sig_key(drills["unsigned"]))
        repo.delete(drills[bad])
        repo.delete(sig_key(drills[bad]))
    with pytest.raises(InvalidInput, match="no drills record at drills/x"):
        sign_unsigned_records(repo, TEST_SIGNER, "drills", {"drills/x"}, yes=True)

    dry = sign_unsigned_records(repo, TEST_SIGNER, "drills", set(), yes=False)
    assert [(r["key"], r["action"]) for r in dry] == [
        (drills["signed"], "already-signed"),
        (drills["unsigned"], "would-sign"),
    ]
    assert not repo.exists(sig_key(drills["unsigned"]))
    done = sign_unsigned_records(repo, TEST_SIGNER, "drills", {drills["unsigned"]}, yes=True)
    assert [(r["key"], r["action"]) for r in done] == [(drills["unsigned"], "signed")]
    assert sorted(r["drill_id"] for r in list_drills(repo)) == ["d-signed", "d-unsigned"]
    assert pins_mod.pin_findings(repo) != []
    sign_unsigned_records(repo, TEST_SIGNER, "pins", set(), yes=True)
    assert pins_mod.pin_findings(repo) == [] and pins_mod.list_pins(repo)[0]["trusted"]
    # records are never rewritten: only their .sig was added
    assert all(repo.get_bytes(k) == v for k, v in before.items() if repo.exists(k))
    signed = [e for e in read_events(repo) if e.action == "sign"]
    assert [e.details["record"] for e in signed] == [drills["unsigned"], pin]
    assert all(e.details["key_id"] == TEST_SIGNER.key_id for e in signed)

    # audit events appended without a signing key are signed the same way
    append_event(unsigned_view(repo), action="restore", result="ok", actor={"user": "t"})
    problems = verify_chain(repo, check_versions=False).problems
    assert [p.kind for p in problems] == ["unsigned"]
    sign_unsigned_records(repo, TEST_SIGNER, "audit", set(), yes=True)
    assert verify_chain(repo, check_versions=False).problems == []


def test_sign_command_records_option(
    prefect_api: str, local: tuple[LocalRepository, Repository]
) -> None:
    from typer.testing import CliRunner

    from blocks import BackupRepository, register_all
    from strongroom.cli.app import app
    from tests.fixtures.strongroom_fixtures import signing_block_fields

    repo, foreign = local
    register_all()
    BackupRepository(**signing_block_fields(), local_path=str(repo.root)).save(
        "recsignrepo", overwrite=True
    )
    key = evidence_key("postgresql", "db1", "v1")
    write_variant(repo, foreign, key, {"verification_id": "v1", "ok": True}, "unsigned")
    runner = CliRunner()
    base = ["sign", "-r", "recsignrepo", "--records", "verifications", "--json"]
    dry = runner.invoke(app, [*base, "--all-unsigned"])
    assert dry.exit_code == 0, dry.output
    assert [r["action"] for r in json.loads(dry.stdout)["records"]] == ["would-sign"]
    assert list_verifications(repo) == []
    done = runner.invoke(app, [*base, key, "--yes"])
    assert done.exit_code == 0, done.output
    assert [r["verification_id"] for r in list_verifications(repo)] == ["v1"]
    unknown = runner.invoke(app, ["sign", "-r", "recsignrepo", "--records", "x", "--all-unsigned"])
    assert unknown.exit_code == 2 and "unknown record kind" in unknown.output
