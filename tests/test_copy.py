"""Copies to a second repository (strongroom.copying): real PostgreSQL backups copied
between a local folder, moto S3 (object lock) and SeaweedFS, restored from the copy;
tampered artifacts, forged manifests and hostile keys refused; a copy killed by SIGKILL
in a subprocess resumes and ends identical; the SR-COPY-01 control."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from strongroom.catalog import Catalog, manifest_key
from strongroom.compliance.check_copies import check_offsite_copies
from strongroom.compliance.evidence import Evidence
from strongroom.compliance.model import ComplianceSettings, TargetPolicy
from strongroom.config import EncryptionConfig, RepositoryConfig
from strongroom.copying import list_copies
from strongroom.copying.engine import CopyOptions, copy_repository
from strongroom.copying.records import copy_record_key
from strongroom.engines.postgres.backup import backup_postgres
from strongroom.engines.postgres.restore import PgRestoreRequest, restore_postgres
from strongroom.engines.postgres.wal.store import push_bytes
from strongroom.errors import InvalidInput
from strongroom.repository import Repository, open_repository
from strongroom.repository.s3 import S3Repository
from strongroom.sandbox.postgres import PostgresServer
from strongroom.signing import Signer, put_signed_json, sig_key
from strongroom.verify import verify_backup
from tests.fixtures.compliant_bucket import compliant_bucket, s3_repository
from tests.fixtures.postgres import PgDatabase
from tests.fixtures.s3 import MotoServer
from tests.fixtures.seaweedfs import SeaweedServer
from tests.fixtures.strongroom_fixtures import (
    TEST_SIGNER,
    make_local_repo,
    pg_connection,
    signed_config,
)

ROOT = Path(__file__).resolve().parents[1]
TARGET = TargetPolicy(engine="postgresql", target="pg1")
POPULATE = """
CREATE TABLE t (id int PRIMARY KEY, body text);
INSERT INTO t SELECT g, md5(g::text) || md5((g * 7)::text) FROM generate_series(1, 40000) g;
"""
FINGERPRINT = "SELECT md5(string_agg(id::text || body, ',' ORDER BY id)) FROM t"
HISTORY = b"1\t0/3000000\tno recovery target specified\n"


@dataclass
class Source:
    root: Path
    config: RepositoryConfig
    db: PgDatabase
    backup_ids: list[str]

    def repo(self) -> Repository:
        return open_repository(self.config)

    def clone(self, into: Path) -> Source:
        """A throwaway copy of the source folder (to tamper with)."""
        shutil.copytree(self.root, into)
        return Source(into, signed_config(kind="local", path=str(into)), self.db, self.backup_ids)


@pytest.fixture(scope="module")
def source(
    pg_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory, age_key: EncryptionConfig
) -> Iterator[Source]:
    """Two real PostgreSQL backups, a WAL history file, a signed drill record and an audit
    event in a local repository (built once for the module)."""
    from strongroom.audit import record_event

    name = f"copy_{uuid.uuid4().hex[:10]}"
    pg_server.create_database(name)
    db = PgDatabase(pg_server, name)
    db.psql(POPULATE)
    root = tmp_path_factory.mktemp("copy-src") / "repo"
    config = signed_config(kind="local", path=str(root))
    repo = make_local_repo(root)
    # the copy goes in id order (two backups started in one second sort by their suffix)
    ids = sorted(
        backup_postgres(pg_connection(db), repo, config, age_key).backup_id for _ in range(2)
    )
    push_bytes(repo, "pg1", "00000002.history", HISTORY, age_key.recipients)
    put_signed_json(repo, f"drills/postgresql/pg1/{ids[0]}.json", {"ok": True, "rto_s": 1.0})
    record_event(
        repo, action="backup", engine="postgresql", target="pg1", backup_id=ids[0], result="success"
    )
    try:
        yield Source(root, config, db, ids)
    finally:
        pg_server.drop_database(name)


def _moto_locked(server: MotoServer, **changes: Any) -> tuple[S3Repository, RepositoryConfig]:
    bucket = compliant_bucket(server, **changes)
    return bucket.repo, bucket.config


def _objects(repo: Repository) -> dict[str, str]:
    """sha256 of every object but the copy records (they hold the time of the copy)."""
    return {
        info.key: hashlib.sha256(repo.get_bytes(info.key)).hexdigest()
        for info in repo.list("")
        if not info.key.startswith("copies/")
    }


def _locks(repo: S3Repository) -> dict[str, tuple[Any, Any]]:
    found = {}
    for info in repo.list(""):
        if info.key.startswith("copies/"):
            continue
        head = repo.head(info.key) or {}
        found[info.key] = (head.get("ObjectLockMode"), head.get("ObjectLockRetainUntilDate"))
    return found


def test_local_to_locked_s3_copy_restores_and_reruns_as_noop(
    source: Source, s3_server: MotoServer, age_key: EncryptionConfig
) -> None:
    dest, dest_config = _moto_locked(s3_server)
    report = copy_repository(source.repo(), dest, dest_config).to_dict()
    assert report["ok"], report["errors"]
    s = report["summary"]
    assert s["backups_copied"] == 2 and s["wal_copied"] == 1 and s["evidence_copied"] >= 2, s
    src = source.repo()
    # byte-identical: artifacts, manifests, signatures, WAL, evidence
    assert _objects(src) == _objects(dest)
    manifests = Catalog(dest).list("postgresql", "pg1")
    assert [m.backup_id for m in manifests] == source.backup_ids
    # the destination's own lock (COMPLIANCE, started_at + its retention_days), not the
    # source's (a local folder has none)
    first = manifests[0]
    for artifact in first.artifacts:
        head = dest.head(artifact.key) or {}
        assert head["ObjectLockMode"] == "COMPLIANCE"
        until = first.started_at + dt.timedelta(days=dest_config.retention_days)
        assert abs((head["ObjectLockRetainUntilDate"] - until).total_seconds()) < 2
    assert (dest.head(manifest_key("postgresql", "pg1", first.backup_id)) or {})[
        "ObjectLockMode"
    ] == "COMPLIANCE"
    # copy records on both sides name the destination
    for repo in (src, dest):
        records, findings = list_copies(repo)
        here = {r.backup_id for r in records if r.destination == dest.describe()}
        assert not findings and here == set(source.backup_ids)
    # the copy verifies and restores
    assert verify_backup(dest, manifests[-1], age_key)["ok"]
    into = f"{source.db.name}_from_copy"
    result = restore_postgres(
        pg_connection(source.db), dest, age_key, PgRestoreRequest(target_database=into)
    )
    assert result["rows_ok"]
    assert source.db.server.psql(FINGERPRINT, db=into) == source.db.psql(FINGERPRINT)
    source.db.server.drop_database(into)
    # idempotent: a second run copies nothing
    again = copy_repository(src, dest, dest_config).to_dict()
    assert again["ok"] and again["summary"]["objects_copied"] == 0, again["summary"]
    assert again["summary"]["backups_skipped"] == 2
    # SR-COPY-01 on the source: each backup copied within the window
    findings = check_offsite_copies(Evidence(src, targets=[TARGET]))
    assert [f.status for f in findings] == ["pass", "pass"], findings
    late = check_offsite_copies(
        Evidence(src, targets=[TARGET], settings=ComplianceSettings(offsite_copy_hours=1e-6))
    )
    assert {f.status for f in late} == {"warn"}
    held = check_offsite_copies(Evidence(dest, targets=[TARGET]))
    assert all(f.status == "pass" and "copy held here" in f.message for f in held)


def test_s3_to_seaweedfs_to_local(
    source: Source,
    s3_server: MotoServer,
    seaweed_server: SeaweedServer,
    seaweed_locked_bucket: str,
    tmp_path: Path,
    age_key: EncryptionConfig,
) -> None:
    """local -> moto S3 -> SeaweedFS (object lock) -> local: every hop byte-identical,
    the last copy verifies."""
    moto, moto_config = _moto_locked(s3_server, locked=False)
    assert copy_repository(source.repo(), moto, moto_config).ok
    dest, dest_config = s3_repository(seaweed_server, seaweed_locked_bucket)
    report = copy_repository(moto, dest, dest_config, CopyOptions(wal=False))
    assert report.ok, report.errors
    back_config = signed_config(kind="local", path=str(tmp_path / "back"))
    back = open_repository(back_config)
    assert copy_repository(dest, back, back_config).ok
    assert _objects(back) == {k: v for k, v in _objects(moto).items() if not k.startswith("wal/")}
    assert verify_backup(back, Catalog(back).resolve("latest"), age_key)["ok"]
    manifest = Catalog(dest).resolve("latest", "postgresql", "pg1")
    assert manifest.backup_id in source.backup_ids
    head = dest.head(manifest.artifacts[0].key) or {}
    assert head.get("ObjectLockMode") == "COMPLIANCE"
    assert not any(i.key.startswith("wal/") for i in dest.list(""))


def test_tampered_artifact_is_refused_and_nothing_half_copied(
    source: Source, tmp_path: Path
) -> None:
    bad = source.clone(tmp_path / "src")
    repo = bad.repo()
    victim = Catalog(repo).load("postgresql", "pg1", bad.backup_ids[1])
    artifact = max(victim.artifacts, key=lambda a: a.stored_size)
    path = bad.root / artifact.key
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit
    path.write_bytes(bytes(data))
    dest_root = tmp_path / "dest"
    dest_config = signed_config(kind="local", path=str(dest_root))
    report = copy_repository(repo, open_repository(dest_config), dest_config)
    assert not report.ok
    failed = [b for b in report.backups if b["action"] == "failed"]
    assert [b["backup_id"] for b in failed] == [bad.backup_ids[1]]
    assert "does not match the checksum" in failed[0]["detail"]
    dest = open_repository(dest_config)
    assert not dest.exists(artifact.key)  # aborted: no object, no temp file left
    assert not [p for p in dest_root.rglob("*") if ".tmp-" in p.name]
    assert not dest.exists(manifest_key("postgresql", "pg1", bad.backup_ids[1]))
    assert [m.backup_id for m in Catalog(dest).list()] == [bad.backup_ids[0]]


def test_forged_manifest_untrusted_signer_and_hostile_wal_key_are_refused(
    source: Source, tmp_path: Path
) -> None:
    bad = source.clone(tmp_path / "src")
    key = manifest_key("postgresql", "pg1", bad.backup_ids[0])
    doc = json.loads((bad.root / key).read_text())
    doc["artifacts"][0]["stored_sha256"] = "0" * 64  # edited under its old signature
    (bad.root / key).write_text(json.dumps(doc, indent=2))
    # a manifest signed by a key nobody trusts, naming artifacts outside its folder
    rogue_id = "20261201T000000Z-0bad00"
    rogue_key = manifest_key("postgresql", "pg1", rogue_id)
    rogue = {**doc, "backup_id": rogue_id, "signed_by": None}
    rogue["artifacts"] = [{**doc["artifacts"][0], "key": "data/postgresql/other/x/y"}]
    body = json.dumps(rogue).encode()
    (bad.root / rogue_key).write_bytes(body)
    (bad.root / sig_key(rogue_key)).write_bytes(Signer.generate().sign(body))
    # a manifest signed by the trusted key (a compromised runner) naming a key outside
    # its target's data folder: refused before anything is read
    escape_id = "20261201T000000Z-0bad01"
    escape_key = manifest_key("postgresql", "pg1", escape_id)
    escape = {**doc, "backup_id": escape_id, "signed_by": TEST_SIGNER.key_id}
    escape["artifacts"] = [{**doc["artifacts"][0], "key": "data/postgresql/other/x/y"}]
    body = json.dumps(escape).encode()
    (bad.root / escape_key).write_bytes(body)
    (bad.root / sig_key(escape_key)).write_bytes(TEST_SIGNER.sign(body))
    wal_dir = bad.root / "wal" / "pg1" / "00000001"
    wal_dir.mkdir(parents=True)
    (wal_dir / "notawal").write_bytes(b"SRWAL1 x")
    dest_config = signed_config(kind="local", path=str(tmp_path / "dest"))
    dest = open_repository(dest_config)
    report = copy_repository(bad.repo(), dest, dest_config).to_dict()
    assert not report["ok"]
    refused = {b["backup_id"]: b["detail"] for b in report["backups"] if b["action"] == "refused"}
    assert set(refused) == {bad.backup_ids[0], rogue_id}, report["backups"]
    assert all("not signed by a trusted key" in why for why in refused.values())
    failed = {b["backup_id"]: b["detail"] for b in report["backups"] if b["action"] == "failed"}
    assert list(failed) == [escape_id] and "outside data/postgresql/pg1/" in failed[escape_id]
    assert any(
        r["key"].endswith("/notawal") and r["action"] == "refused" for r in report["objects"]
    )
    # nothing named by a refused manifest was read into the destination
    stored = [i.key for i in dest.list("data/")] + [i.key for i in dest.list("catalog/")]
    assert stored and not any(bad.backup_ids[0] in k or "/other/" in k for k in stored)
    assert [m.backup_id for m in Catalog(dest).list()] == [bad.backup_ids[1]]
    with pytest.raises(InvalidInput):
        copy_repository(bad.repo(), bad.repo(), bad.config)


_CHILD = """
import json, sys
from tests.fixtures.strongroom_fixtures import signed_config
from strongroom.copying.engine import CopyOptions, copy_repository
from strongroom.repository import open_repository
src, dst = (signed_config(**json.loads(a)) for a in sys.argv[1:3])
copy_repository(open_repository(src), open_repository(dst), dst, CopyOptions(jobs=1))
"""


def _s3_fields(config: RepositoryConfig, **extra: Any) -> str:
    fields = config.model_dump(mode="json", exclude={"signing_key", "trusted_signers"})
    fields["secret_access_key"] = "testing"
    return json.dumps({**fields, **extra})


def test_killed_copy_resumes_and_ends_identical(
    source: Source, s3_server: MotoServer, tmp_path: Path
) -> None:
    """SIGKILL a copy in a subprocess once the first backup is visible at the
    destination, then run it again: same objects, checksums, signatures and locks as an
    uninterrupted copy."""
    dest, dest_config = _moto_locked(s3_server)
    src_fields = json.dumps({"kind": "local", "path": str(source.root)})
    slow = _s3_fields(dest_config, max_bytes_per_second=256 * 1024)
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, src_fields, slow],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    first = manifest_key("postgresql", "pg1", source.backup_ids[0])
    try:
        deadline = time.monotonic() + 60
        while not dest.exists(first):
            assert child.poll() is None, child.stderr.read() if child.stderr else ""
            assert time.monotonic() < deadline, "the copy made no progress"
            time.sleep(0.05)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    second = manifest_key("postgresql", "pg1", source.backup_ids[1])
    assert not dest.exists(second), "killed too late: the second backup was already copied"
    assert [m.backup_id for m in Catalog(dest).list()] == source.backup_ids[:1]
    resumed = copy_repository(source.repo(), dest, dest_config)
    assert resumed.ok, resumed.errors
    assert resumed.summary()["backups_skipped"] == 1 and resumed.summary()["backups_copied"] == 1
    reference, reference_config = _moto_locked(s3_server)
    assert copy_repository(source.repo(), reference, reference_config).ok
    assert _objects(dest) == _objects(reference) == _objects(source.repo())
    assert _locks(dest) == _locks(reference)
    assert all(mode == "COMPLIANCE" for mode, _ in _locks(dest).values())
    for bid in source.backup_ids:
        key = copy_record_key("postgresql", "pg1", bid, dest.describe())
        assert dest.exists(key) and dest.exists(sig_key(key))


def test_offsite_control_fails_without_a_copy(tmp_path: Path, source: Source) -> None:
    """A source never copied: due backups fail when copies are required; the pass
    without the requirement says so."""
    lone = source.clone(tmp_path / "lone")
    repo = lone.repo()
    for info in list(repo.list("copies/")):
        repo.delete(info.key)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    required = ComplianceSettings(offsite_copy_required=True)
    assert {
        f.status for f in check_offsite_copies(Evidence(repo, targets=[TARGET], settings=required))
    } == {"fail"}
    optional = check_offsite_copies(Evidence(repo, targets=[TARGET], now=later))
    assert [f.status for f in optional] == ["pass"] and "not required" in optional[0].message
    # one record present: the backup without a copy, 2 days old, fails
    dest_config = signed_config(kind="local", path=str(tmp_path / "dest"))
    dest = open_repository(dest_config)
    assert copy_repository(repo, dest, dest_config, CopyOptions(backup_ids=lone.backup_ids[:1])).ok
    statuses = {
        f.data["backup_id"]: f.status
        for f in check_offsite_copies(Evidence(repo, targets=[TARGET], now=later))
    }
    assert statuses == {lone.backup_ids[0]: "pass", lone.backup_ids[1]: "fail"}
    # a forged copy record is not evidence
    forged = copy_record_key("postgresql", "pg1", lone.backup_ids[1], "s3://elsewhere")
    (lone.root / forged).parent.mkdir(parents=True, exist_ok=True)
    (lone.root / forged).write_text("{}")
    found = check_offsite_copies(Evidence(repo, targets=[TARGET], now=later))
    assert any(f.status == "fail" and "not trusted" in f.message for f in found)


def test_cli_copy_runs_the_flow_and_list_shows_copies(
    source: Source, prefect_api: str, tmp_path: Path
) -> None:
    """`strongroom copy --from A --to B --json` runs the copy-backups flow (blocks with
    unique names); `strongroom list` shows where each backup was copied; a tampered
    source exits 4 (integrity) and names the artifact."""
    import typer
    from typer.testing import CliRunner

    from blocks import BackupRepository
    from strongroom.cli import catalog as catalog_cli
    from strongroom.cli import copy as copy_cli
    from tests.fixtures.strongroom_fixtures import signing_block_fields

    BackupRepository.register_type_and_schema()
    src = source.clone(tmp_path / "src")
    tag = uuid.uuid4().hex[:8]
    names = {"src": f"copy-src-{tag}", "dst": f"copy-dst-{tag}"}
    BackupRepository(**signing_block_fields(), local_path=str(src.root)).save(names["src"])
    BackupRepository(**signing_block_fields(), local_path=str(tmp_path / "dst")).save(names["dst"])
    app = typer.Typer()
    copy_cli.register(app)
    catalog_cli.register(app, typer.Typer())
    cli = CliRunner()
    copied = cli.invoke(app, ["copy", "--from", names["src"], "--to", names["dst"], "--json"])
    assert copied.exit_code == 0, copied.output
    report = json.loads(copied.output)
    assert report["ok"] and report["summary"]["backups_copied"] == 2
    listed = cli.invoke(app, ["list", "--repository", names["src"], "--json"])
    assert listed.exit_code == 0, listed.output
    dest_name = open_repository(signed_config(kind="local", path=str(tmp_path / "dst"))).describe()
    for row in json.loads(listed.output):
        assert dest_name in [c["repository"] for c in row["copies"]], row
    # a second source backup, tampered: exit code 4 and nothing of it at the destination
    repo = src.repo()
    victim = Catalog(repo).load("postgresql", "pg1", src.backup_ids[0])
    path = src.root / victim.artifacts[-1].key
    path.write_bytes(bytes(b ^ 0xFF for b in path.read_bytes()))
    fresh = f"copy-dst2-{tag}"
    BackupRepository(**signing_block_fields(), local_path=str(tmp_path / "dst2")).save(fresh)
    refused = cli.invoke(app, ["copy", "--from", names["src"], "--to", fresh, "--json"])
    assert refused.exit_code == 4, refused.output
    assert victim.artifacts[-1].key in refused.output


def test_a_different_object_at_the_destination_is_never_overwritten(
    source: Source, tmp_path: Path
) -> None:
    dest_config = signed_config(kind="local", path=str(tmp_path / "dest"))
    dest = open_repository(dest_config)
    first = CopyOptions(backup_ids=source.backup_ids[:1], wal=False, evidence=False)
    assert copy_repository(source.repo(), dest, dest_config, first).ok
    manifest = Catalog(dest).load("postgresql", "pg1", source.backup_ids[0])
    key = manifest_key("postgresql", "pg1", source.backup_ids[0])
    dest.delete(key)  # as if killed before the manifest, with a planted artifact
    planted = tmp_path / "dest" / manifest.artifacts[0].key
    planted.write_bytes(b"planted" + planted.read_bytes()[7:])
    report = copy_repository(source.repo(), dest, dest_config, first)
    assert not report.ok
    assert any(
        r["key"] == manifest.artifacts[0].key and "different object" in r["detail"]
        for r in report.rows
    )
    assert planted.read_bytes().startswith(b"planted") and not dest.exists(key)
