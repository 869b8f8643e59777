"""Block-level incrementals, parallel copies and delta restore of file-level PostgreSQL
backups, against a real archiving cluster: every restore starts PostgreSQL and compares
table fingerprints with the source."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyrage import x25519

from strongroom.catalog import Catalog, owner_of
from strongroom.engines.postgres.pitr.files import blocks
from strongroom.engines.postgres.pitr.files.backup import summary
from strongroom.engines.postgres.pitr.files.chain import file_records
from strongroom.errors import IntegrityError, InvalidInput, TargetNotEmpty
from strongroom.sandbox._process import make_temp_dir, remove_dir
from strongroom.verify import verify_backup
from tests.test_pg_files import (
    _new_cluster,
    fingerprint_sql,
    restore_and_check,
    take,
)
from tests.test_pitr import Cluster, _restore

ROWS = 200_000


@pytest.fixture(scope="module")
def age_identity() -> x25519.Identity:
    return x25519.Identity.generate()


@pytest.fixture(scope="module")
def wide(age_identity: x25519.Identity) -> Iterator[Cluster]:
    c, root = _new_cluster("pgb", age_identity)
    c.sql(
        "CREATE TABLE wide (id int PRIMARY KEY, n int, v text);"
        f"INSERT INTO wide SELECT g, 0, md5(g::text) || md5((g * 7)::text)"
        f" FROM generate_series(1, {ROWS}) g;"
    )
    # settled, as a table is some time after its load: hint bits set (they are written
    # without WAL, so the first read after a load changes every page once)
    c.sql("VACUUM (FREEZE, ANALYZE) wide")
    c.sql("SELECT count(*) FROM wide WHERE v <> ''; CHECKPOINT")
    try:
        yield c
    finally:
        c.server.stop()
        remove_dir(root)


@pytest.fixture
def pg_tmp() -> Iterator[Path]:
    from strongroom.sandbox.postgres import chown_to_postgres

    path = make_temp_dir("pgblocks-test")
    chown_to_postgres(path, 0o755)
    yield path
    remove_dir(path)


def _listing(path: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for top, _dirs, names in os.walk(path):
        for name in names:
            st = os.lstat(os.path.join(top, name))
            out[os.path.relpath(os.path.join(top, name), path)] = (st.st_size, st.st_mtime_ns)
    return out


def _write_mapped(fd: int, bmap: blocks.BlockMap, read: Any, *, existing_size: int = 0) -> int:
    """A mapped file written the way a restore does it, one source after another."""
    wanted = blocks.plan_mapped(fd, bmap, existing_size=existing_size)
    return sum(blocks.write_source(fd, bmap, s, slots, read) for s, slots in sorted(wanted.items()))


def _contents(path: Path) -> dict[str, tuple[str, int]]:
    import hashlib

    out = {}
    for name in _listing(path):
        st = os.lstat(path / name)
        out[name] = (hashlib.sha256((path / name).read_bytes()).hexdigest(), st.st_mode)
    return out


def test_block_incremental_parallel_and_delta_restore(
    wide: Cluster, pg_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = wide
    tables = ("wide",)
    path = c.sql("SELECT pg_relation_filepath('wide')")
    monkeypatch.setattr(blocks, "PART", 4 * 1024 * 1024)  # several parts, read in parallel
    full = take(c, "full", jobs=2)
    fp_full = c.sql(fingerprint_sql(tables))
    rec = file_records(full)[path]
    assert rec.content == blocks.CONTENT_MAP and full.details["jobs"] == 2
    assert rec.meta["blocks_stored"] == rec.meta["size"] // blocks.BLOCK  # a full stores all
    assert rec.meta["parts"] > 3 and len(rec.meta["sources"]) == rec.meta["parts"]

    # a stale copy: the full restored and started (recovered, promoted: a new timeline)
    stale = pg_tmp / "stale"
    restore_and_check(c, stale, full.backup_id, tables, fp_full, jobs=2)

    # 3% of the rows, one contiguous range, change; the incremental stores few blocks
    c.sql(f"UPDATE wide SET n = n + 1 WHERE id <= {ROWS * 3 // 100}; CHECKPOINT")
    c.sql("SELECT pg_sleep(1.1)")
    incr = take(c, "incr", jobs=2)
    fp_incr = c.sql(fingerprint_sql(tables))
    m = file_records(incr)[path]
    assert m.content == blocks.CONTENT_MAP and owner_of(m) == incr.backup_id
    total = m.meta["size"] // blocks.BLOCK
    assert 0 < m.meta["blocks_stored"] < 0.2 * total, (m.meta["blocks_stored"], total)
    assert full.backup_id in incr.details["depends_on"]
    s_full, s_incr = summary(full), summary(incr)
    assert s_incr["stored_bytes"] < 0.25 * s_full["stored_bytes"], (s_incr, s_full)
    assert s_incr["copied_bytes"] < 0.25 * s_full["copied_bytes"]
    loaded = Catalog(c.repo).load("postgresql", c.target, incr.backup_id)
    report = verify_backup(c.repo, loaded, c.enc)
    assert report["ok"], [a for a in report["artifacts"] if not a["ok"]]
    checked = [a for a in report["artifacts"] if (a.get("structure") or {}).get("blocks")]
    assert checked, report["artifacts"][:3]

    # the incremental restores (blocks from two backups, two jobs) into an empty folder
    restore_and_check(c, pg_tmp / "fresh", incr.backup_id, tables, fp_incr, jobs=2)

    # the files alone, onto a copy of the full's files: equal to a fresh restore's
    from strongroom.engines.postgres.pitr.files.restore import restore_files_backup

    copy, fresh = pg_tmp / "copy", pg_tmp / "fresh-files"
    restore_files_backup(c.repo, c.enc, c.target, full.backup_id, str(copy), jobs=2)
    done = restore_files_backup(c.repo, c.enc, c.target, incr.backup_id, str(copy), delta=True)
    restore_files_backup(c.repo, c.enc, c.target, incr.backup_id, str(fresh))
    assert _contents(copy) == _contents(fresh) and done["bytes"] < done["bytes_kept"]

    # refusals leave the stale copy as it was
    data = stale / "data"
    before = _listing(data)
    (data / "postmaster.pid").write_text("12345\n")
    with pytest.raises(InvalidInput, match=r"postmaster\.pid"):
        _restore(c, stale, backup_id=incr.backup_id, delta=True, recovery_target="immediate")
    (data / "postmaster.pid").unlink()
    assert _listing(data) == before

    # a delta restore that fails half way leaves no pg_control; run again, it finishes
    (data / "base" / "stray").write_bytes(b"x" * 10)
    (data / "stray_dir" / "deeper").mkdir(parents=True)
    assert list((data / "pg_wal").glob("0000000*"))  # the stale copy's own WAL
    original = blocks.write_source

    def failing(*args: Any, **kw: Any) -> int:
        raise OSError("disk on fire")

    monkeypatch.setattr(blocks, "write_source", failing)
    with pytest.raises(OSError, match="disk on fire"):
        _restore(c, stale, backup_id=incr.backup_id, delta=True, recovery_target="immediate")
    monkeypatch.setattr(blocks, "write_source", original)
    assert not (data / "global" / "pg_control").exists()
    assert (data / ".strongroom-delta").exists()
    assert not (data / "base" / "stray").exists() and not (data / "stray_dir").exists()

    report = restore_and_check(c, stale, incr.backup_id, tables, fp_incr, delta=True, jobs=2)
    extract = report["extract"]
    assert not (data / "base" / "stray").exists() and not (data / "stray_dir").exists()
    assert extract["bytes"] < 0.3 * (extract["bytes"] + extract["bytes_kept"]), extract
    assert not (data / ".strongroom-delta").exists()


def test_delta_restore_refuses_another_cluster(
    wide: Cluster, age_identity: x25519.Identity, pg_tmp: Path
) -> None:
    other, root = _new_cluster("pgo", age_identity)
    try:
        theirs = take(other, "full")
        restore_and_check(
            other,
            pg_tmp / "theirs",
            theirs.backup_id,
            ("keep",),
            other.sql(fingerprint_sql(("keep",))),
        )
    finally:
        other.server.stop()
        remove_dir(root)
    mine = take(wide, "incr")
    data = pg_tmp / "theirs" / "data"
    before = _listing(data)
    with pytest.raises(InvalidInput, match="database system"):
        _restore(wide, pg_tmp / "theirs", backup_id=mine.backup_id, delta=True)
    assert _listing(data) == before
    with pytest.raises(TargetNotEmpty, match="delta"):
        _restore(wide, pg_tmp / "theirs", backup_id=mine.backup_id)  # no delta: refused


@pytest.mark.parametrize("bs", [blocks.BLOCK, blocks.LARGE_BLOCK])
def test_block_maps_refuse_forged_blocks(tmp_path: Path, bs: int) -> None:
    """A source holding other bytes than its map says, or a map pointing past its
    source, is refused while the file is written."""
    data = os.urandom(bs * 4)
    src = tmp_path / "src"
    src.write_bytes(data)
    fd = os.open(src, os.O_RDONLY)
    try:
        changed = blocks.ChangedBlocks(fd, len(data), None, bs)
        stored = b"".join(iter(changed.read, b""))
    finally:
        os.close(fd)
    assert stored == data and changed.stored == 4
    bmap = changed.finish("own")
    assert bmap.sources == ["own"] and bmap.blocks == 4

    def reader(payload: bytes) -> blocks.Reader:
        def read(key: str, sink: Any) -> None:
            sink.write(payload)

        return read

    out = tmp_path / "out"
    fd = os.open(out, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert _write_mapped(fd, bmap, reader(data)) == len(data)
        assert out.read_bytes() == data
        # a delta onto the same bytes fetches nothing
        assert _write_mapped(fd, bmap, reader(b""), existing_size=len(data)) == 0
        tampered = bytearray(data)
        tampered[bs + 5] ^= 1
        os.ftruncate(fd, 0)
        with pytest.raises(IntegrityError, match="block 1"):
            _write_mapped(fd, bmap, reader(bytes(tampered)))
        with pytest.raises(IntegrityError, match="ends before"):
            _write_mapped(fd, bmap, reader(data[: bs * 2]))
    finally:
        os.close(fd)
    # an unchanged second read reuses every block, one changed block is stored alone
    changed_data = data[: bs * 2] + os.urandom(bs) + data[bs * 3 :]
    src.write_bytes(changed_data)
    fd = os.open(src, os.O_RDONLY)
    try:
        again = blocks.ChangedBlocks(fd, len(changed_data), bmap, bs)
        assert b"".join(iter(again.read, b"")) == changed_data[bs * 2 : bs * 3]
    finally:
        os.close(fd)
    second = again.finish("second")
    assert second.sources == ["own", "second"] and again.stored == 1
    assert second.entry(2)[1:] == (1, 0) and second.entry(3)[1:] == (0, 3)
    with pytest.raises(IntegrityError):
        blocks.BlockMap.parse(bytes(second.entries), len(changed_data), ["own"], bs)  # source 1?
    with pytest.raises(IntegrityError):
        blocks.BlockMap.parse(bytes(second.entries)[:-1], len(changed_data), ["a", "b"], bs)
    assert blocks.BlockMap.parse(bytes(second.entries), len(changed_data), ["a", "b"], bs)
    with pytest.raises(IntegrityError, match="block size"):
        blocks.BlockMap.parse(bytes(second.entries), len(changed_data), ["a", "b"], 4096)
    # a prior of another block size is not compared with (the file is stored whole)
    other = bs * 4 if bs == blocks.BLOCK else blocks.BLOCK
    fd = os.open(src, os.O_RDONLY)
    try:
        whole = blocks.ChangedBlocks(fd, len(changed_data), bmap, other)
        assert b"".join(iter(whole.read, b"")) == changed_data
    finally:
        os.close(fd)


def test_parts_assemble_and_a_truncated_part_ends_the_file() -> None:
    bs = blocks.BLOCK
    one = bytearray(blocks.ENTRY.pack(b"a" * 16, 0, 0) + blocks.ENTRY.pack(b"b" * 16, 0, 1))
    two = bytearray(blocks.ENTRY.pack(b"c" * 16, 1, 0))
    three = bytearray(blocks.ENTRY.pack(b"d" * 16, 2, 0))
    whole = blocks.assemble(
        [(one, 2 * bs, 2 * bs), (two, bs, bs), (three, bs, bs)], ["p", "q", "r"], bs
    )
    assert whole.size == 4 * bs and whole.sources == ["p", "q", "r"] and whole.blocks == 4
    # the second part read short: the file ends there, the third part's source goes
    cut = blocks.assemble(
        [(one, 2 * bs, 2 * bs), (two, bs, 2 * bs), (three, bs, bs)], ["p", "q", "r"], bs
    )
    assert cut.size == 3 * bs and cut.sources == ["p", "q"] and cut.blocks == 3
    assert blocks.parts_of(blocks.PART * 2 + 5) == [
        (0, blocks.PART),
        (blocks.PART, blocks.PART),
        (2 * blocks.PART, 5),
    ]


def test_maps_of_either_digest_restore(tmp_path: Path) -> None:
    """A map records its digest: older SHA-256 maps restore, an unknown one is refused."""
    bs = blocks.BLOCK
    data = os.urandom(bs * 3)
    entries = bytearray()
    for i in range(3):
        entries += blocks.ENTRY.pack(
            blocks.DIGESTS["sha256-128"](data[i * bs : (i + 1) * bs]), 0, i
        )
    old = blocks.BlockMap.parse(bytes(entries), len(data), ["k"], bs, "sha256-128")
    out = tmp_path / "out"
    fd = os.open(out, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert _write_mapped(fd, old, lambda key, sink: sink.write(data)) == len(data)
    finally:
        os.close(fd)
    assert out.read_bytes() == data
    with pytest.raises(IntegrityError, match="digest"):
        blocks.BlockMap.parse(bytes(entries), len(data), ["k"], bs, "md5")
    # a new read does not compare with a map of the other digest: every block is stored
    src = tmp_path / "src"
    src.write_bytes(data)
    fd = os.open(src, os.O_RDONLY)
    try:
        changed = blocks.ChangedBlocks(fd, len(data), old, bs)
        assert b"".join(iter(changed.read, b"")) == data
    finally:
        os.close(fd)
    assert changed.finish("new").algorithm == blocks.ALGORITHM == "blake3-128"
