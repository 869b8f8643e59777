"""Signed manifests (strongroom.signing): real backups on real PostgreSQL, local and S3
repositories; a second strongroom set-up with its own key is a bucket writer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from strongroom.catalog import Catalog, Manifest, manifest_key
from strongroom.config import EncryptionConfig, RepositoryConfig
from strongroom.drills import DrillFailed, run_drill
from strongroom.drills.postgres import PostgresDrill
from strongroom.engines.postgres.backup import backup_postgres
from strongroom.engines.postgres.restore import PgRestoreRequest, restore_postgres
from strongroom.errors import IntegrityError, InvalidInput
from strongroom.policy.prune import plan
from strongroom.policy.retention import RetentionPolicy
from strongroom.repository import Repository
from strongroom.repository.local import LocalRepository
from strongroom.repository.s3 import S3Repository
from strongroom.signing import (
    KEY_ID_PREFIX,
    MAX_RECORD_SIZE,
    PublicKey,
    Signer,
    Trust,
    sig_key,
    verify_file,
)
from strongroom.verify import verify_backup
from tests.fixtures.postgres import PgDatabase
from tests.fixtures.strongroom_fixtures import (
    TEST_PUBLIC_KEY,
    TEST_SIGNER,
    pg_connection,
    signing_block_fields,
)

POPULATE = """
CREATE TABLE items (id int PRIMARY KEY, name text);
INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 500) g;
"""
REPOS = ["local_repo", "s3_repo"]


@pytest.fixture
def source(pg_db: PgDatabase) -> PgDatabase:
    pg_db.psql(POPULATE)
    return pg_db


def _same_storage(repo: Repository, config: RepositoryConfig, trust: Trust) -> Repository:
    """Another set-up's view of the same storage, with its own keys."""
    if isinstance(repo, LocalRepository):
        return LocalRepository(repo.root, trust=trust)
    assert isinstance(repo, S3Repository)
    return S3Repository(config, trust=trust)


def _backup(db: PgDatabase, repo: Repository, config: RepositoryConfig, key: Any) -> Manifest:
    return backup_postgres(pg_connection(db), repo, config, key)


# ---------------------------------------------------------------------- unit


def test_sign_and_verify_unit() -> None:
    signer = Signer.generate()
    assert signer.key_id.startswith(KEY_ID_PREFIX) and len(signer.key_id) == 8 + 16
    assert repr(signer) == f"Signer({signer.key_id})"
    body = b'{"backup_id": "x"}'
    signature = signer.sign(body)
    assert len(signature) == 64
    pem = signer.public.pem()
    assert verify_file(body, signature, pem) == signer.key_id
    assert PublicKey.parse(signer.public.one_line()).key_id == signer.key_id
    with pytest.raises(IntegrityError, match="does not verify"):
        verify_file(body + b" ", signature, pem)
    with pytest.raises(IntegrityError, match="does not verify"):
        verify_file(body, signature, TEST_PUBLIC_KEY)
    with pytest.raises(InvalidInput, match="not an Ed25519 public key"):
        PublicKey.parse("not a key")
    trust = Trust((signer.public,), signer)
    assert trust.check("k", body, signature, signer.key_id).trusted
    assert trust.check("k", body, None, None).status == "unsigned"
    assert trust.check("k", body, signature, TEST_SIGNER.key_id).status == "untrusted-key"
    assert trust.check("k", body + b"!", signature, signer.key_id).status == "bad-signature"
    assert trust.check("k", body, signature[:10], signer.key_id).status == "bad-signature"
    with pytest.raises(InvalidInput, match="not among the repository's trusted_signers"):
        Trust((), signer).require_signer()
    with pytest.raises(InvalidInput, match="no signing key"):
        Trust((signer.public,)).require_signer()


# ---------------------------------------------------------------------- forged backups


@pytest.mark.parametrize("repo_fixture", REPOS)
def test_foreign_backup_refused_by_strict_readers_and_reported_by_lenient(
    repo_fixture: str,
    request: pytest.FixtureRequest,
    source: PgDatabase,
    age_key: EncryptionConfig,
) -> None:
    repo, config = request.getfixturevalue(repo_fixture)
    genuine = _backup(source, repo, config, age_key)
    assert genuine.signed_by == TEST_SIGNER.key_id
    mkey = manifest_key("postgresql", genuine.target, genuine.backup_id)
    assert repo.exists(sig_key(mkey))

    # a bucket writer without any signing key is refused before any byte is written
    unsigned = _same_storage(repo, config, Trust())
    before = sorted(i.key for i in repo.list(""))
    with pytest.raises(InvalidInput, match="no signing key"):
        _backup(source, unsigned, config, age_key)
    assert sorted(i.key for i in repo.list("")) == before

    # a second set-up with its own key (knows the public age recipient) publishes one
    other = Signer.generate()
    intruder = _same_storage(repo, config, Trust((other.public,), other))
    forged = _backup(source, intruder, config, age_key)
    fkey = manifest_key("postgresql", forged.target, forged.backup_id)
    assert forged.signed_by == other.key_id

    catalog = Catalog(repo)
    assert [m.backup_id for m in catalog.list()] == [genuine.backup_id]
    assert [(f["key"], f["status"]) for f in catalog.findings] == [(fkey, "untrusted-key")]
    assert catalog.resolve("latest").backup_id == genuine.backup_id
    with pytest.raises(IntegrityError, match="not signed by a trusted key"):
        catalog.resolve(forged.backup_id)
    with pytest.raises(IntegrityError, match="not signed by a trusted key"):
        restore_postgres(
            pg_connection(source),
            repo,
            age_key,
            PgRestoreRequest(backup_id=forged.backup_id, target_database=f"{source.name}_x"),
        )
    assert (
        source.server.psql(f"SELECT count(*) FROM pg_database WHERE datname = '{source.name}_x'")
        == "0"
    )
    loaded = catalog.load("postgresql", forged.target, forged.backup_id, strict=False)
    report = verify_backup(repo, loaded, age_key)
    assert not report["ok"]
    assert "not signed by a trusted key" in json.dumps(report)
    assert verify_backup(repo, catalog.resolve("latest"), age_key)["ok"]

    # a drill of the forged backup fails at resolve and restores nothing
    with pytest.raises(DrillFailed, match="not signed by a trusted key") as failed:
        run_drill(
            PostgresDrill(pg_connection(source), repo, age_key),
            repo,
            target=forged.target,
            backup_id=forged.backup_id,
        )
    assert failed.value.record["ok"] is False
    assert "sr_drill" not in source.server.psql("SELECT string_agg(datname, ',') FROM pg_database")

    # retention: the forged backup is a finding, never kept, counted or deleted
    retention = plan(repo, RetentionPolicy(keep_last=1, compliance_floor_years=0))
    assert [f.key for f in retention.findings if f.reason == "untrusted"] == [fkey]
    assert {d.backup_id for d in retention.decisions} == {genuine.backup_id}


@pytest.mark.parametrize("repo_fixture", REPOS)
def test_malformed_oversized_and_badly_named_entries_are_skipped(
    repo_fixture: str, request: pytest.FixtureRequest, source: PgDatabase, age_key: EncryptionConfig
) -> None:
    repo, config = request.getfixturevalue(repo_fixture)
    genuine = _backup(source, repo, config, age_key)
    target = genuine.target
    bad_json = manifest_key("postgresql", target, "20200101T000000Z-aaaaaa")
    huge = manifest_key("postgresql", target, "20200102T000000Z-bbbbbb")
    repo.put_bytes(bad_json, b"{not json")
    with repo.open_write(huge) as w:  # over the cap, streamed in (never held whole)
        chunk = b" " * (1024 * 1024)
        for _ in range(MAX_RECORD_SIZE // len(chunk) + 1):
            w.write(chunk)
        w.commit()
    catalog = Catalog(repo)
    assert [m.backup_id for m in catalog.list()] == [genuine.backup_id]
    found = {f["key"]: f for f in catalog.findings}
    assert set(found) == {bad_json, huge}
    assert "over the" in found[huge]["error"]
    assert catalog.resolve("latest").backup_id == genuine.backup_id
    with pytest.raises(IntegrityError, match="over the 16777216-byte limit"):
        repo.get_bytes(huge, max_size=MAX_RECORD_SIZE)
    with pytest.raises(IntegrityError):
        catalog.load("postgresql", target, "20200101T000000Z-aaaaaa")
    retention = plan(repo, RetentionPolicy(keep_last=1, compliance_floor_years=0))
    assert {f.key for f in retention.findings} == {bad_json, huge}


# ---------------------------------------------------------------------- offline


def _openssl_verify(pub: Path, data: Path, sig: Path) -> subprocess.CompletedProcess[str]:
    argv = ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(pub), "-rawin"]
    argv.extend(["-in", str(data), "-sigfile", str(sig)])
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        check=False,
    )


def _strongroom(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "strongroom"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, check=False)


@pytest.mark.parametrize("repo_fixture", REPOS)
def test_offline_verification_by_strongroom_and_openssl(
    repo_fixture: str,
    request: pytest.FixtureRequest,
    source: PgDatabase,
    age_key: EncryptionConfig,
    tmp_path: Path,
) -> None:
    assert shutil.which("openssl")
    repo, config = request.getfixturevalue(repo_fixture)
    m = _backup(source, repo, config, age_key)
    mkey = manifest_key("postgresql", m.target, m.backup_id)
    data, sig, pub = tmp_path / "manifest.json", tmp_path / "manifest.json.sig", tmp_path / "p.pem"
    data.write_bytes(repo.get_bytes(mkey))
    sig.write_bytes(repo.get_bytes(sig_key(mkey)))
    pub.write_text(TEST_PUBLIC_KEY)
    assert json.loads(data.read_bytes())["signed_by"] == TEST_SIGNER.key_id

    ok = _openssl_verify(pub, data, sig)
    assert ok.returncode == 0 and "Signature Verified Successfully" in ok.stdout, ok
    cli = _strongroom("verify-signature", str(data), "--public-key", str(pub), "--json")
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["key_id"] == TEST_SIGNER.key_id

    other = tmp_path / "other.pem"
    other.write_text(Signer.generate().public.pem())
    assert _openssl_verify(other, data, sig).returncode != 0
    assert _strongroom("verify-signature", str(data), "--public-key", str(other)).returncode == 4

    data.write_bytes(data.read_bytes().replace(b'"postgresql"', b'"postgresql" '))
    assert _openssl_verify(pub, data, sig).returncode != 0
    edited = _strongroom("verify-signature", str(data), "--public-key", str(pub), "--sig", str(sig))
    assert edited.returncode == 4 and "does not verify" in edited.stderr


def test_keygen_signing_writes_private_0600_and_prints_public(tmp_path: Path) -> None:
    key_file = tmp_path / "signing.pem"
    made = _strongroom("keygen-signing", "--private-key-file", str(key_file), "--json")
    assert made.returncode == 0, made.stderr
    assert key_file.stat().st_mode & 0o777 == 0o600
    printed = json.loads(made.stdout)
    signer = Signer.parse(key_file.read_text())
    assert printed["key_id"] == signer.key_id
    assert PublicKey.parse(printed["public_key"]).key_id == signer.key_id
    assert "PRIVATE" not in made.stdout
    again = _strongroom("keygen-signing", "--private-key-file", str(key_file))
    assert again.returncode != 0 and "never overwritten" in again.stderr


# ---------------------------------------------------------------------- rotation


@pytest.mark.parametrize("repo_fixture", REPOS)
def test_rotation_two_trusted_keys(
    repo_fixture: str, request: pytest.FixtureRequest, source: PgDatabase, age_key: EncryptionConfig
) -> None:
    repo, config = request.getfixturevalue(repo_fixture)
    old = _backup(source, repo, config, age_key)
    new_key = Signer.generate()
    both = (TEST_SIGNER.public, new_key.public)
    rotated = _same_storage(repo, config, Trust(both, new_key))
    new = _backup(source, rotated, config, age_key)
    assert (old.signed_by, new.signed_by) == (TEST_SIGNER.key_id, new_key.key_id)
    assert {m.backup_id for m in Catalog(rotated).list()} == {old.backup_id, new.backup_id}
    assert verify_backup(rotated, Catalog(rotated).resolve(old.backup_id), age_key)["ok"]
    # the old key retired: its backups are no longer trusted
    retired = _same_storage(repo, config, Trust((new_key.public,)))
    catalog = Catalog(retired)
    assert [m.backup_id for m in catalog.list()] == [new.backup_id]
    assert [f["status"] for f in catalog.findings] == ["untrusted-key"]


# ---------------------------------------------------------------------- strongroom sign


def test_sign_command_signs_confirmed_unsigned_manifests_audited(
    prefect_api: str, source: PgDatabase, age_key: EncryptionConfig, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from blocks import BackupRepository, EncryptionKey, register_all
    from strongroom.audit import read_events
    from strongroom.cli.app import app
    from tests.fixtures.strongroom_fixtures import make_local_repo, signed_config

    register_all()
    root = tmp_path / "repo"
    BackupRepository(**signing_block_fields(), local_path=str(root)).save(
        "signrepo", overwrite=True
    )
    EncryptionKey(recipients=age_key.recipients, identity=age_key.identities[0]).save(
        "signkey", overwrite=True
    )
    repo, config = make_local_repo(root), signed_config(kind="local", path=str(root))
    first = _backup(source, repo, config, age_key)
    second = _backup(source, repo, config, age_key)
    keys = [manifest_key("postgresql", m.target, m.backup_id) for m in (first, second)]
    for key in keys:  # as written before signing existed
        repo.delete(sig_key(key))
    assert Catalog(repo).list() == []
    # the second one was edited while unsigned: its seal no longer matches
    path = root.joinpath(*keys[1].split("/"))
    path.write_bytes(path.read_bytes().replace(b'"labels": {}', b'"labels": {"x": "y"}'))

    runner = CliRunner()
    base = ["sign", "-r", "signrepo", "-k", "signkey", "--json"]
    dry = runner.invoke(app, [*base, first.backup_id])
    assert dry.exit_code == 0, dry.output
    assert [r["action"] for r in json.loads(dry.stdout)["manifests"]] == ["would-sign"]
    assert not repo.exists(sig_key(keys[0]))
    refused = runner.invoke(app, [*base, "--all-unsigned", "--yes"])
    assert refused.exit_code == 4 and "seal" in refused.output
    done = runner.invoke(app, [*base, first.backup_id, "--yes"])
    assert done.exit_code == 0, done.output
    assert [m.backup_id for m in Catalog(repo).list()] == [first.backup_id]
    events = [e for e in read_events(repo) if e.action == "sign"]
    assert [(e.backup_id, e.details["key_id"]) for e in events] == [
        (first.backup_id, TEST_SIGNER.key_id)
    ]
    again = runner.invoke(app, [*base, first.backup_id, "--yes"])
    assert json.loads(again.stdout)["manifests"][0]["action"] == "already-signed"
