"""``strongroom show`` / ``list`` display of backup chains (``strongroom.chains``).

A real chain of file-level PostgreSQL backups (full, incr, diff, incr taken from a real
archiving cluster, signed manifests in a real repository), shown through the real CLI
with its repository from a Prefect block, intact and then broken (a base's manifest
deleted, an artifact deleted). Engine neutrality and hostile catalogs (a link signed by
an untrusted key, a dependency cycle) on signed ClickHouse-shaped incremental manifests
written by ``Catalog.write``.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pyrage import x25519
from typer.testing import CliRunner

from strongroom.catalog import (
    Artifact,
    Catalog,
    Manifest,
    backup_type_of,
    data_key,
    data_prefix,
    manifest_key,
)
from strongroom.chains import backup_chain
from strongroom.repository.base import Repository
from strongroom.repository.local import LocalRepository
from strongroom.sandbox._process import remove_dir
from strongroom.signing import Signer, Trust, sig_key
from tests.fixtures.strongroom_fixtures import make_local_repo
from tests.test_pg_files import _new_cluster, take
from tests.test_pitr import Cluster

ENGINE = "postgresql"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c, root = _new_cluster("pgchain", x25519.Identity.generate())
    try:
        yield c
    finally:
        c.server.stop()
        remove_dir(root)


def _stored_in_folder(repo: Repository, engine: str, target: str, backup_id: str) -> int:
    """Bytes stored in a backup's own data folder, by listing the repository."""
    return sum(i.size for i in repo.list(data_prefix(engine, target, backup_id)))


def _cli(*args: str) -> Any:
    from strongroom.cli.app import app

    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def _show(backup_id: str, repo_block: str) -> dict[str, Any]:
    result = _cli("show", backup_id, "-r", repo_block, "--json")
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.stdout))


def test_files_chain_intact_then_broken(
    prefect_api: str, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    from blocks import BackupRepository, register_all
    from strongroom.cli.common import out
    from tests.fixtures.strongroom_fixtures import signing_block_fields

    c = cluster
    full = take(c, "full")
    c.sql("INSERT INTO keep VALUES (-1, 'i'); CHECKPOINT")
    time.sleep(1.1)
    incr = take(c, "incr")
    c.sql("INSERT INTO keep VALUES (-2, 'd'); CHECKPOINT")
    time.sleep(1.1)
    diff = take(c, "diff")
    c.sql("INSERT INTO keep VALUES (-3, 'i'); CHECKPOINT")
    time.sleep(1.1)
    incr2 = take(c, "incr")
    assert diff.details["base_backup_id"] == full.backup_id
    assert incr2.details["base_backup_id"] == diff.backup_id
    assert full.backup_id in incr2.details["depends_on"]  # it references the full's files

    register_all()
    BackupRepository(**signing_block_fields(), local_path=str(c.repo.root)).save(
        "chainrepo", overwrite=True
    )

    # list: kind, type and base of every files backup
    result = _cli("list", "-r", "chainrepo", "--engine", ENGINE, "--json")
    assert result.exit_code == 0, result.output
    rows = {r["backup_id"]: r for r in json.loads(result.stdout)}
    expect = [(full, "full"), (incr, "incr"), (diff, "diff"), (incr2, "incr")]
    for m, kind in expect:
        assert rows[m.backup_id]["backup_type"] == kind
        assert rows[m.backup_id]["kind"] == "files"
        assert rows[m.backup_id]["base_backup_id"] == m.details.get("base_backup_id")
    monkeypatch.setattr(out, "width", 160)  # a terminal, not CliRunner's 80 columns
    human = _cli("list", "-r", "chainrepo", "--engine", ENGINE)
    assert human.exit_code == 0, human.output
    body = [line for line in human.stdout.splitlines() if line.startswith("│")]
    for line, (m, kind) in zip(body, expect, strict=True):  # one line each, oldest first
        assert m.backup_id in line and f"files {kind}" in line, line
        assert m.details.get("base_backup_id", "") in line

    # show: the whole chain, oldest first; the incr the diff does not build on is not in it
    shown = _show(incr2.backup_id, "chainrepo")
    assert shown["engine"] == ENGINE and shown["backup_id"] == incr2.backup_id
    chain = shown["chain"]
    assert [x["backup_id"] for x in chain] == [full.backup_id, diff.backup_id, incr2.backup_id]
    assert [x["type"] for x in chain] == ["full", "diff", "incr"]
    assert shown["chain_whole"] is True and shown["chain_missing"] == []
    for link, m in zip(chain, (full, diff, incr2), strict=True):
        assert link["status"] == "ok" and link["present"] and link["trusted"]
        assert link["finished_at"] == m.finished_at.isoformat()
        # its own artifacts' bytes: what its data folder holds
        assert link["stored_bytes"] == _stored_in_folder(c.repo, ENGINE, c.target, m.backup_id)
        assert link["stored_bytes"] + link["referenced_bytes"] == m.stored_size
    assert chain[-1]["referenced_bytes"] > 0 and chain[0]["referenced_bytes"] == 0
    assert chain[-1]["stored_bytes"] < chain[0]["stored_bytes"]
    assert backup_chain(Catalog(c.repo), incr2)["links"] == chain  # --json is the same list
    self_only = _show(full.backup_id, "chainrepo")["chain"]
    assert [x["backup_id"] for x in self_only] == [full.backup_id]
    human = _cli("show", incr2.backup_id, "-r", "chainrepo")
    assert human.exit_code == 0, human.output
    assert "chain whole: 3 backups" in human.stdout and diff.backup_id in human.stdout

    # broken: the diff's manifest deleted (a killed prune); shown as broken, not a crash
    mkey = manifest_key(ENGINE, c.target, diff.backup_id)
    c.repo.delete(mkey)
    c.repo.delete(sig_key(mkey))
    shown = _show(incr2.backup_id, "chainrepo")
    by_id = {x["backup_id"]: x for x in shown["chain"]}
    assert list(by_id) == [full.backup_id, diff.backup_id, incr2.backup_id]
    assert by_id[diff.backup_id]["status"] == "missing"
    assert not by_id[diff.backup_id]["present"] and by_id[diff.backup_id]["type"] is None
    assert by_id[full.backup_id]["status"] == "ok"
    assert shown["chain_whole"] is False and shown["chain_missing"] == [diff.backup_id]
    human = _cli("show", incr2.backup_id, "-r", "chainrepo")
    assert human.exit_code == 0, human.output
    assert "BROKEN" in human.stdout and f"missing {diff.backup_id}" in human.stdout
    # the incr on the full is still whole
    assert _show(incr.backup_id, "chainrepo")["chain_whole"] is True

    # an artifact of the full deleted: every manifest is there, the chain is not whole
    victim = next(a for a in full.artifacts if a.raw_size > 8192)
    assert any(a.key == victim.key for a in incr.artifacts)  # the incr references it
    c.repo.delete(victim.key)
    shown = _show(incr.backup_id, "chainrepo")
    assert [x["status"] for x in shown["chain"]] == ["ok", "ok"]
    assert shown["chain_whole"] is False and shown["chain_missing"] == []
    assert any("missing" in p for p in shown["chain_problems"])


# ---- engine-neutral: ClickHouse-shaped incrementals, hostile catalogs -----------------------


def _backup(
    repo: Repository,
    started: dt.datetime,
    base: Manifest | None,
    *,
    backup_id: str | None = None,
    details: dict[str, Any] | None = None,
) -> Manifest:
    """A signed incremental-shaped ClickHouse manifest: one artifact stored in its own
    folder, and (on a base) the base's artifacts referenced."""
    bid = backup_id or f"{started:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
    key = data_key("clickhouse", "ch1", bid, "db.t.part")
    body = secrets.token_bytes(100 + secrets.randbelow(400))
    repo.put_bytes(key, body)
    own = Artifact(
        name=f"db.t.{bid}",
        key=key,
        content="clickhouse-native",
        raw_size=len(body),
        stored_size=len(body),
        raw_sha256="0" * 64,
        stored_sha256="0" * 64,
    )
    extra: dict[str, Any] = {"incremental": {"mode": "incremental" if base else "full"}}
    artifacts = [own]
    if base is not None:
        artifacts += base.artifacts
        owners = {a.key.split("/")[3] for a in base.artifacts}
        extra.update(base_backup_id=base.backup_id, depends_on=sorted(owners))
    m = Manifest(
        backup_id=bid,
        engine="clickhouse",
        target="ch1",
        kind="logical",
        started_at=started,
        finished_at=started + dt.timedelta(minutes=1),
        repository="test",
        artifacts=artifacts,
        details=details if details is not None else extra,
    )
    Catalog(repo).write(m)
    return m


def test_clickhouse_chain_untrusted_link_and_cycle(tmp_path: Path) -> None:
    repo = make_local_repo(tmp_path)
    t0 = dt.datetime(2026, 11, 1, 2, tzinfo=dt.UTC)
    full = _backup(repo, t0, None)
    inc1 = _backup(repo, t0 + dt.timedelta(days=1), full)
    inc2 = _backup(repo, t0 + dt.timedelta(days=2), inc1)
    assert [backup_type_of(m) for m in (full, inc1, inc2)] == ["full", "incr", "incr"]
    catalog = Catalog(repo)
    chain = backup_chain(catalog, catalog.resolve(inc2.backup_id, "clickhouse", "ch1"))
    assert [x["backup_id"] for x in chain["links"]] == [
        full.backup_id,
        inc1.backup_id,
        inc2.backup_id,
    ]
    assert chain["whole"] and [x["type"] for x in chain["links"]] == ["full", "incr", "incr"]
    assert [x["stored_bytes"] for x in chain["links"]] == [
        m.artifacts[0].stored_size for m in (full, inc1, inc2)
    ]
    assert (
        chain["links"][-1]["referenced_bytes"] == full.stored_size + inc1.artifacts[0].stored_size
    )

    # a base re-signed by a key the repository does not trust: shown untrusted, not followed
    other = Signer(Ed25519PrivateKey.generate())
    stranger = LocalRepository(tmp_path, trust=Trust((other.public,), other))
    mkey = manifest_key("clickhouse", "ch1", inc1.backup_id)
    repo.delete(mkey)
    repo.delete(sig_key(mkey))
    Catalog(stranger).write(inc1.model_copy(update={"signed_by": None}))
    chain = backup_chain(catalog, catalog.resolve(inc2.backup_id, "clickhouse", "ch1"))
    by_id = {x["backup_id"]: x for x in chain["links"]}
    assert by_id[inc1.backup_id]["status"] not in ("ok", "missing")
    assert by_id[inc1.backup_id]["present"] and not by_id[inc1.backup_id]["trusted"]
    assert by_id[full.backup_id]["status"] == "ok"  # inc2 references the full directly
    assert not chain["whole"] and chain["missing"] == []

    # a dependency cycle (hostile or corrupt catalog): every link once, no hang
    t1 = t0 + dt.timedelta(days=10)
    a_id, b_id = (
        f"{t1 + dt.timedelta(hours=h):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}" for h in (0, 1)
    )
    _backup(repo, t1, None, backup_id=a_id, details={"base_backup_id": b_id})
    b = _backup(repo, t1, None, backup_id=b_id, details={"base_backup_id": a_id})
    chain = backup_chain(catalog, catalog.resolve(b.backup_id, "clickhouse", "ch1"))
    assert [x["backup_id"] for x in chain["links"]] == [a_id, b_id]
    assert not chain["whole"] and any("depends on it" in p for p in chain["problems"])
