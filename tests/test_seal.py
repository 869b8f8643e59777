"""The manifest seal: written at publish time by every engine, checked by verify and
by every read of an artifact, and what it cannot stop (a holder of the recipient)."""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr
from pyrage import x25519

from strongroom.artifacts import publish_backup, read_artifact, store_artifact
from strongroom.catalog import Catalog, Manifest, data_key, manifest_key
from strongroom.config import EncryptionConfig, RepositoryConfig
from strongroom.errors import IntegrityError
from strongroom.ids import new_backup_id
from strongroom.repository.local import LocalRepository
from strongroom.seal import SIGNED_FORMAT, check_seal, digests, make_seal, parse_document
from strongroom.verify import verify_backup
from tests.fixtures.postgres import PgDatabase
from tests.fixtures.strongroom_fixtures import pg_connection

Repo = tuple[LocalRepository, RepositoryConfig]
PAYLOAD = b"line of sql text\n" * 200


def _publish(repo: LocalRepository, enc: EncryptionConfig, **extra: Any) -> Manifest:
    """A small real backup: one stored artifact (an SQL text), then the manifest."""
    bid = new_backup_id()
    artifact = store_artifact(
        repo,
        data_key("postgresql", "unit", bid, "globals.sql"),
        io.BytesIO(PAYLOAD),
        name="globals.sql",
        content="sql",
        encryption=enc,
        level=3,
    )
    now = dt.datetime.now(dt.UTC)
    manifest = Manifest(
        backup_id=bid,
        engine="postgresql",
        target="unit",
        started_at=now,
        finished_at=now,
        repository=repo.describe(),
        artifacts=[artifact],
        details={"databases": [{"name": "app", "tables": [{"name": "t", "rows": 3}]}]},
        **extra,
    )
    publish_backup(repo, manifest)
    return manifest


def _stored(repo: LocalRepository, m: Manifest) -> Path:
    return repo.root / manifest_key(m.engine, m.target, m.backup_id)


def _rewrite(path: Path, doc: dict[str, Any]) -> None:
    path.chmod(0o644)
    path.write_text(json.dumps(doc, indent=2))


def test_publish_seals_and_verify_checks_the_stored_manifest(
    local_repo: Repo, age_key: EncryptionConfig
) -> None:
    repo, _ = local_repo
    manifest = _publish(repo, age_key)
    stored = json.loads(_stored(repo, manifest).read_bytes())
    assert stored["format_version"] == SIGNED_FORMAT and manifest.seal == stored["seal"]
    # the seal is age ciphertext: no digest readable without the identity
    sealed = base64.b64decode(stored["seal"])
    assert sealed.startswith(b"age-encryption.org/v1")
    assert digests(stored)["sha256"].encode() not in sealed
    loaded = Catalog(repo).resolve(manifest.backup_id)
    assert loaded == manifest
    for given_manifest in (manifest, loaded):
        report = verify_backup(repo, given_manifest, age_key)
        assert report["ok"] and report["manifest"]["sealed"] and report["warnings"] == []
        assert [a["artifact"] for a in report["artifacts"]] == ["globals.sql"]
    sink = io.BytesIO()
    read_artifact(repo, loaded.artifact("globals.sql"), sink, encryption=age_key)
    assert sink.getvalue() == PAYLOAD


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_change_to_any_field_breaks_the_seal(
    local_repo: Repo, age_key: EncryptionConfig, data: st.DataObject
) -> None:
    repo, _ = local_repo
    doc: dict[str, Any] = json.loads(_stored(repo, _publish(repo, age_key)).read_bytes())
    seal = doc.pop("seal")
    identities = [i.get_secret_value() for i in age_key.identities]
    check_seal(doc, seal, identities, "m.json")  # untouched: passes
    # walk to a random node and replace one value there (an empty container: replace it)
    parent: Any = None
    at: Any = None
    node: Any = doc
    while True:
        keys = list(range(len(node))) if isinstance(node, list) else sorted(node)
        if not keys:
            parent[at] = [None]
            break
        key = data.draw(st.sampled_from(keys))
        child = node[key]
        if not isinstance(child, dict | list) or data.draw(st.booleans()):
            new = data.draw(JSON_VALUES)
            if new == child and type(new) is type(child):
                new = [child]
            node[key] = new
            break
        parent, at, node = node, key, child
    with pytest.raises(IntegrityError, match="does not match its seal") as caught:
        check_seal(doc, seal, identities, "m.json")
    assert "m.json" in str(caught.value)


def test_edited_manifest_is_refused_before_any_byte_is_read(
    local_repo: Repo, age_key: EncryptionConfig
) -> None:
    repo, _ = local_repo
    manifest = _publish(repo, age_key)
    path = _stored(repo, manifest)
    doc = json.loads(path.read_bytes())
    doc["details"]["databases"][0]["tables"][0]["rows"] = 4
    _rewrite(path, doc)
    with pytest.raises(IntegrityError, match="not signed by a trusted key"):
        Catalog(repo).resolve(manifest.backup_id)
    # read leniently, the refusal still names what changed (the seal is opened)
    loaded = Catalog(repo).load(manifest.engine, manifest.target, manifest.backup_id, strict=False)
    sink = io.BytesIO()
    with pytest.raises(IntegrityError, match="does not match its seal") as caught:
        read_artifact(repo, loaded.artifact("globals.sql"), sink, encryption=age_key)
    assert str(path.relative_to(repo.root)) in str(caught.value) and "details" in str(caught.value)
    assert sink.getvalue() == b""
    report = verify_backup(repo, loaded, age_key)
    assert not report["ok"] and report["artifacts"][0]["artifact"] == "manifest"
    # the artifact itself is intact (verify reads it without trusting the manifest)
    assert report["artifacts"][1]["ok"]


def test_wrong_identity_cannot_open_the_seal(local_repo: Repo, age_key: EncryptionConfig) -> None:
    repo, _ = local_repo
    manifest = _publish(repo, age_key)
    other = x25519.Identity.generate()
    wrong = EncryptionConfig(
        recipients=[str(other.to_public())], identities=[SecretStr(str(other))]
    )
    loaded = Catalog(repo).resolve(manifest.backup_id)
    with pytest.raises(IntegrityError, match="wrong key"):
        read_artifact(repo, loaded.artifacts[0], io.BytesIO(), encryption=wrong)
    report = verify_backup(repo, loaded, wrong)
    assert "wrong key" in report["artifacts"][0]["error"]
    assert str(other) not in json.dumps(report)


def test_manifest_copied_to_another_id_is_refused(
    local_repo: Repo, age_key: EncryptionConfig
) -> None:
    """A genuine, sealed manifest copied under a new id is not a second backup."""
    repo, _ = local_repo
    manifest = _publish(repo, age_key)
    copy_id = new_backup_id()
    copied = repo.root / manifest_key("postgresql", "unit", copy_id)
    shutil.copy(_stored(repo, manifest), copied)
    shutil.copy(f"{_stored(repo, manifest)}.sig", f"{copied}.sig")  # genuinely signed bytes
    loaded = Catalog(repo).load("postgresql", "unit", copy_id)
    with pytest.raises(IntegrityError, match="describes another backup"):
        read_artifact(repo, loaded.artifacts[0], io.BytesIO(), encryption=age_key)
    report = verify_backup(repo, loaded, age_key)
    assert not report["ok"] and copy_id in report["artifacts"][0]["error"]


def test_manifest_without_recipients_is_unsealed_and_verify_warns(
    local_repo: Repo, age_key: EncryptionConfig
) -> None:
    """No recipient, no seal: written as before (no seal field), and verify says so."""
    repo, _ = local_repo
    now = dt.datetime.now(dt.UTC)
    empty = Manifest(
        backup_id=new_backup_id(),
        engine="postgresql",
        target="unit",
        kind="base",
        started_at=now,
        finished_at=now,
        repository=repo.describe(),
        artifacts=[],
    )
    Catalog(repo).write(empty)
    stored = json.loads(_stored(repo, empty).read_bytes())
    assert "seal" not in stored and stored["format_version"] == 1 and empty.seal is None
    report = verify_backup(repo, Catalog(repo).resolve(empty.backup_id), age_key)
    assert report["ok"] and not report["manifest"]["sealed"]
    assert report["warnings"] == [report["manifest"]["warning"]]
    assert "unsealed manifest" in report["warnings"][0]


def test_duplicated_key_in_a_stored_manifest_is_refused(
    local_repo: Repo, age_key: EncryptionConfig
) -> None:
    """A JSON key given twice could show one value to one reader and another to the next."""
    with pytest.raises(IntegrityError, match="duplicate key"):
        parse_document(b'{"kind": "logical", "kind": "base"}', "m.json")


def test_a_re_sealed_forgery_is_refused_by_the_signature(
    local_repo: Repo, age_key: EncryptionConfig
) -> None:
    """The seal is encryption, not a signature: whoever holds the public recipient (it is
    in every manifest) and can write the repository can re-seal an edited manifest. The
    Ed25519 signature (strongroom.signing) is what refuses it."""
    repo, _ = local_repo
    manifest = _publish(repo, age_key)
    path = _stored(repo, manifest)
    doc = json.loads(path.read_bytes())
    doc.pop("seal")
    doc["labels"] = {"forged": "yes"}
    doc["seal"] = make_seal(doc, doc["artifacts"][0]["recipients"])
    _rewrite(path, doc)
    with pytest.raises(IntegrityError, match="not signed by a trusted key"):
        Catalog(repo).resolve(manifest.backup_id)
    forged = Catalog(repo).load(manifest.engine, manifest.target, manifest.backup_id, strict=False)
    report = verify_backup(repo, forged, age_key)
    assert not report["ok"] and "does not match its content" in json.dumps(report)


# -- every engine publishes sealed manifests ------------------------------------------------


def _assert_sealed(repo: LocalRepository, m: Manifest, enc: EncryptionConfig) -> None:
    doc = json.loads(_stored(repo, m).read_bytes())
    assert doc["format_version"] == SIGNED_FORMAT and doc["seal"] == m.seal
    report = verify_backup(repo, Catalog(repo).resolve(m.backup_id), enc)
    assert report["ok"] and report["manifest"]["sealed"] and not report["warnings"], report


def test_postgres_backup_is_sealed_and_restores(
    pg_db: PgDatabase, local_repo: Repo, age_key: EncryptionConfig
) -> None:
    from strongroom.engines.postgres.backup import backup_postgres
    from strongroom.engines.postgres.restore import PgRestoreRequest, restore_postgres

    pg_db.psql("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 50)")
    repo, config = local_repo
    manifest = backup_postgres(pg_connection(pg_db), repo, config, age_key)
    _assert_sealed(repo, manifest, age_key)
    pg_db.psql("DELETE FROM t WHERE id > 10")
    restore_postgres(
        pg_connection(pg_db),
        repo,
        age_key,
        PgRestoreRequest(backup_id=manifest.backup_id, drop_existing=True),
    )
    assert pg_db.psql("SELECT count(*) FROM t").strip() == "50"


def test_redis_backup_is_sealed(
    redis_server: Any, local_repo: Repo, age_key: EncryptionConfig
) -> None:
    from strongroom.engines.redis.backup import backup_redis
    from strongroom.engines.redis.conn import RedisConnection

    repo, config = local_repo
    conn = RedisConnection(
        name="cache",
        host=redis_server.host,
        port=redis_server.port,
        password=SecretStr(redis_server.password),
    )
    _assert_sealed(repo, backup_redis(conn, repo, config, age_key), age_key)


def test_clickhouse_backup_is_sealed(
    clickhouse_server: Any, local_repo: Repo, age_key: EncryptionConfig
) -> None:
    from strongroom.engines.clickhouse.backup import backup_clickhouse
    from strongroom.engines.clickhouse.conn import ClickHouseConnection
    from strongroom.engines.clickhouse.http_client import ClickHouseHTTP

    db = f"seal_{uuid.uuid4().hex[:8]}"
    setup = ClickHouseHTTP(ClickHouseConnection(name="s", http_port=clickhouse_server.http_port))
    setup.execute(f"CREATE DATABASE {db}")
    try:
        setup.execute(f"CREATE TABLE {db}.t (id UInt32) ENGINE = MergeTree ORDER BY id")
        setup.execute(f"INSERT INTO {db}.t SELECT number FROM system.numbers LIMIT 100")
        conn = ClickHouseConnection(
            name="ch1",
            host=clickhouse_server.host,
            port=clickhouse_server.tcp_port,
            http_port=clickhouse_server.http_port,
            databases=[db],
        )
        repo, config = local_repo
        _assert_sealed(repo, backup_clickhouse(conn, repo, config, age_key), age_key)
    finally:
        setup.execute(f"DROP DATABASE IF EXISTS {db}")
