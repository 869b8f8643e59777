"""The hash-chained audit trail: append, verify, every kind of tampering, concurrent
writers (local folder and S3 over moto), the Prefect flow hook and the CLI."""

from __future__ import annotations

import itertools
import json
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from strongroom.audit import (
    GENESIS_SHA256,
    AuditEvent,
    action_for_flow,
    append_event,
    event_key,
    read_events,
    read_head,
    record_event,
    sha256_hex,
    verify_chain,
)
from strongroom.repository.base import Repository
from strongroom.repository.s3 import S3Repository
from tests.fixtures.strongroom_fixtures import make_local_repo, signed_config, signing_block_fields


def _fill(repo: Repository, n: int) -> list[AuditEvent]:
    return [
        record_event(
            repo,
            action="backup",
            engine="postgresql",
            target="db1",
            backup_id=None,
            result="success",
            details={"n": i},
            checksums={"db.dump": f"{i:064x}"},
        )
        for i in range(n)
    ]


def _s3(server: Any, bucket: str) -> S3Repository:
    return S3Repository(
        signed_config(
            kind="s3",
            bucket=bucket,
            prefix="p",
            endpoint_url=server.endpoint_url,
            access_key_id=server.access_key,
            secret_access_key=SecretStr(server.secret_key),
        )
    )


def _kinds(repo: Repository, **kwargs: Any) -> set[str]:
    return {p.kind for p in verify_chain(repo, **kwargs).problems}


def test_append_links_each_event_to_the_previous(tmp_path: Path) -> None:
    repo = make_local_repo(tmp_path)
    assert read_head(repo).seq == 0
    events = _fill(repo, 5)
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert events[0].prev_sha256 == GENESIS_SHA256
    for before, after in itertools.pairwise(events):
        assert after.prev_sha256 == sha256_hex(repo.get_bytes(event_key(before.seq)))
    assert (tmp_path / "audit" / "000000000003.json").is_file()
    report = verify_chain(repo)
    assert report.ok and report.events == 5 and report.head_seq == 5
    assert report.head_sha256 == read_head(repo).sha256
    # who: a plain process outside Prefect records the user and host
    assert events[0].actor["user"] and events[0].actor["host"]
    assert events[0].actor["kind"] in ("cli", "process")
    assert [e.seq for e in read_events(repo)] == [1, 2, 3, 4, 5]


def test_record_event_takes_checksums_from_the_manifest(tmp_path: Path) -> None:
    from tests.test_compliance import add_backup

    repo = make_local_repo(tmp_path)
    manifest = add_backup(repo, "postgresql", "db1", hours_ago=1)
    event = record_event(
        repo,
        action="backup",
        engine="postgresql",
        target="db1",
        backup_id=manifest.backup_id,
        result="success",
        details={"error": None, "note": "done"},
    )
    assert event.checksums == {a.name: a.stored_sha256 for a in manifest.artifacts}


def test_details_are_scrubbed_of_registered_secrets(tmp_path: Path) -> None:
    from strongroom.redact import register

    secret = f"pw-{uuid.uuid4().hex}"
    register(secret)
    repo = make_local_repo(tmp_path)
    record_event(
        repo,
        action="restore",
        engine="postgresql",
        target="db1",
        backup_id=None,
        result="failure",
        details={"error": f"connection failed for password {secret}", "nested": [secret]},
    )
    raw = (tmp_path / "audit" / "000000000001.json").read_text()
    assert secret not in raw and "**********" in raw


def _edit(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, sort_keys=True, separators=(",", ":")))


def test_detects_edited_event(tmp_path: Path) -> None:
    repo = make_local_repo(tmp_path)
    _fill(repo, 5)
    _edit(tmp_path / "audit" / "000000000002.json", result="failure")
    report = verify_chain(repo)
    assert not report.ok
    edited = [p for p in report.problems if p.kind == "edited"]
    assert edited and edited[0].seq == 2, report.problems


def test_detects_reformatted_event(tmp_path: Path) -> None:
    """Same content, different bytes (pretty-printed): the hash no longer matches."""
    repo = make_local_repo(tmp_path)
    _fill(repo, 3)
    path = tmp_path / "audit" / "000000000003.json"
    path.write_text(json.dumps(json.loads(path.read_text()), indent=2))
    assert "edited" in _kinds(repo)


def test_detects_removed_event(tmp_path: Path) -> None:
    repo = make_local_repo(tmp_path)
    _fill(repo, 5)
    (tmp_path / "audit" / "000000000003.json").unlink()
    report = verify_chain(repo)
    missing = [p for p in report.problems if p.kind == "missing"]
    assert missing and missing[0].seq == 3, report.problems


def test_detects_removed_first_event(tmp_path: Path) -> None:
    repo = make_local_repo(tmp_path)
    _fill(repo, 3)
    (tmp_path / "audit" / "000000000001.json").unlink()
    assert "missing" in _kinds(repo)


def test_detects_reordered_events(tmp_path: Path) -> None:
    repo = make_local_repo(tmp_path)
    _fill(repo, 5)
    a, b = tmp_path / "audit" / "000000000002.json", tmp_path / "audit" / "000000000004.json"
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    report = verify_chain(repo)
    reordered = sorted(p.seq or 0 for p in report.problems if p.kind == "reordered")
    assert reordered == [2, 4], report.problems


def test_detects_renumbered_rewrite(tmp_path: Path) -> None:
    """Removing event 3 and renumbering the rest without re-hashing breaks the links."""
    repo = make_local_repo(tmp_path)
    _fill(repo, 5)
    folder = tmp_path / "audit"
    (folder / "000000000003.json").unlink()
    for seq in (4, 5):
        path = folder / f"{seq:012d}.json"
        _edit(path, seq=seq - 1)
        path.rename(folder / f"{seq - 1:012d}.json")
    assert "edited" in _kinds(repo)


def test_anchor_detects_edited_or_truncated_tail(tmp_path: Path) -> None:
    repo = make_local_repo(tmp_path)
    _fill(repo, 4)
    head = read_head(repo)
    assert verify_chain(repo, anchors={head.seq: head.sha256}).ok
    # the newest event has no successor to vouch for it: its signature and the anchor
    # catch this (the chain alone cannot)
    _edit(tmp_path / "audit" / "000000000004.json", result="failure")
    assert _kinds(repo) == {"untrusted"}
    assert "anchor-mismatch" in _kinds(repo, anchors={head.seq: head.sha256})
    (tmp_path / "audit" / "000000000004.json").unlink()
    assert "truncated" in _kinds(repo, anchors={head.seq: head.sha256})


def test_malformed_and_stray_objects(tmp_path: Path) -> None:
    repo = make_local_repo(tmp_path)
    _fill(repo, 2)
    (tmp_path / "audit" / "000000000002.json").write_text("{not json")
    repo.put_bytes("audit/notes.txt", b"hello")
    assert {"malformed", "unexpected-object"} <= _kinds(repo)


def test_concurrent_writers_never_fork_the_chain_local(tmp_path: Path) -> None:
    repo = make_local_repo(tmp_path)
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            own = make_local_repo(tmp_path)  # separate objects, like separate processes
            for j in range(8):
                append_event(
                    own, action="backup", result="success", target=f"t{i}", details={"j": j}
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    report = verify_chain(repo)
    assert report.ok, report.problems
    assert report.events == 48 and report.head_seq == 48


def test_concurrent_writers_s3_and_overwrite_detection(
    s3_server: Any, s3_locked_bucket: str
) -> None:
    """If-None-Match keeps the chain linear on S3; an overwritten event (new version in the
    versioned bucket) is reported even when its content is restored byte for byte."""
    repo = _s3(s3_server, s3_locked_bucket)
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            own = _s3(s3_server, s3_locked_bucket)
            for j in range(4):
                append_event(
                    own, action="verify", result="success", target=f"t{i}", details={"j": j}
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    report = verify_chain(repo)
    assert report.ok and report.events == 16 and report.versions_checked, report.problems

    key = event_key(5)
    original = repo.get_bytes(key)
    edited = json.loads(original)
    edited["result"] = "failure"
    repo.put_bytes(key, json.dumps(edited).encode(), overwrite=True)
    assert {"edited", "overwritten"} <= _kinds(repo)
    repo.put_bytes(key, original, overwrite=True)  # content back, history stays
    kinds = _kinds(repo)
    assert kinds == {"overwritten"}, kinds
    repo.delete(event_key(16))
    assert "deleted" in _kinds(repo)


def test_action_for_flow_names() -> None:
    assert action_for_flow("backup-postgresql", {}) == ("backup", "postgresql")
    assert action_for_flow("restore-redis", {}) == ("restore", "redis")
    assert action_for_flow("pitr-restore-postgresql", {}) == ("pitr-restore", "postgresql")
    assert action_for_flow("verify-backup", {"engine": "clickhouse"}) == ("verify", "clickhouse")
    assert action_for_flow("apply-retention", {}) == ("prune", None)
    assert action_for_flow("restore-drill", {"engine": "redis"}) == ("drill", "redis")


def test_prefect_hook_records_runs_and_cli_verifies(prefect_api: str, tmp_path: Path) -> None:
    from prefect import flow
    from typer import Typer
    from typer.testing import CliRunner

    from blocks import BackupRepository, register_all
    from flows.audit import audit_hook
    from strongroom.cli.audit import register

    register_all()
    root = tmp_path / "repo"
    BackupRepository(**signing_block_fields(), local_path=str(root)).save(
        "audit-hook", overwrite=True
    )

    hooks = {"on_completion": [audit_hook], "on_failure": [audit_hook], "on_crashed": [audit_hook]}

    @flow(name="backup-postgresql", **hooks)  # type: ignore[arg-type]
    def fake_backup(target: str, repository: str = "default") -> dict[str, Any]:
        return {
            "backup_id": "20261124T020000Z-1a2b3c",
            "engine": "postgresql",
            "target": target,
            "artifacts": [{"name": "db.dump", "stored_sha256": "ab" * 32}],
        }

    @flow(name="restore-postgresql", **hooks)  # type: ignore[arg-type]
    def fake_restore(target: str, backup_id: str = "latest", repository: str = "default") -> None:
        raise RuntimeError("pg_restore exited 1")

    fake_backup(target="shop", repository="audit-hook")
    with pytest.raises(RuntimeError):
        fake_restore(target="shop", backup_id="20261124T020000Z-1a2b3c", repository="audit-hook")

    repo = make_local_repo(root)
    events = read_events(repo)
    assert [(e.action, e.engine, e.target, e.result) for e in events] == [
        ("backup", "postgresql", "shop", "success"),
        ("restore", "postgresql", "shop", "failure"),
    ]
    backup, restore = events
    assert backup.backup_id == "20261124T020000Z-1a2b3c"
    assert backup.checksums == {"db.dump": "ab" * 32}
    assert backup.actor["kind"] == "prefect-flow-run" and backup.actor["flow_run_id"]
    assert backup.actor["flow_name"] == "backup-postgresql"
    assert restore.backup_id == "20261124T020000Z-1a2b3c"
    assert "pg_restore exited 1" in restore.details["error"]

    app = Typer()
    register(app)
    runner = CliRunner()
    ok = runner.invoke(app, ["audit", "verify", "-r", "audit-hook", "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["events"] == 2
    log = runner.invoke(app, ["audit", "log", "-r", "audit-hook", "--json"])
    assert log.exit_code == 0 and len(json.loads(log.stdout)) == 2
    _edit(root / "audit" / "000000000001.json", result="failure")
    bad = runner.invoke(app, ["audit", "verify", "-r", "audit-hook"])
    assert bad.exit_code == 4
    assert "edited" in bad.output


def test_hook_on_the_real_backup_and_verify_flows(
    prefect_api: str, pg_db: Any, tmp_path: Path
) -> None:
    """The hook as it will be wired: on backup-postgresql and verify-backup (via
    with_options), recording the manifest's checksums."""
    from pyrage import x25519

    from blocks import BackupRepository, EncryptionKey, PostgresTarget, register_all
    from flows.audit import audit_hook
    from flows.postgres import backup_postgresql
    from flows.verify import verify_backup_flow

    register_all()
    identity = x25519.Identity.generate()
    EncryptionKey(recipients=[str(identity.to_public())], identity=str(identity)).save(
        "audit-key", overwrite=True
    )
    BackupRepository(**signing_block_fields(), local_path=str(tmp_path / "repo")).save(
        "audit-real", overwrite=True
    )
    server = pg_db.server
    PostgresTarget(
        host=server.host,
        port=server.port,
        user=server.superuser,
        password=server.password,
        databases=[pg_db.name],
    ).save("audit-pg", overwrite=True)
    pg_db.psql("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1), (2);")
    hooks = {"on_completion": [audit_hook], "on_failure": [audit_hook], "on_crashed": [audit_hook]}
    manifest = backup_postgresql.with_options(**hooks)(  # type: ignore[arg-type]
        target="audit-pg", repository="audit-real", encryption_key="audit-key"
    )
    verify_backup_flow.with_options(**hooks)(  # type: ignore[arg-type]
        backup_id=manifest["backup_id"], repository="audit-real", encryption_key="audit-key"
    )
    events = read_events(make_local_repo(tmp_path / "repo"))
    bid = manifest["backup_id"]
    assert [(e.action, e.engine, e.target, e.backup_id, e.result) for e in events] == [
        ("backup", "postgresql", "audit-pg", bid, "success"),
        ("verify", "postgresql", "audit-pg", bid, "success"),
    ]
    sums = {a["name"]: a["stored_sha256"] for a in manifest["artifacts"]}
    assert events[0].checksums == sums and events[1].checksums == sums
    assert events[1].actor["flow_name"] == "verify-backup"
    assert verify_chain(make_local_repo(tmp_path / "repo")).ok
