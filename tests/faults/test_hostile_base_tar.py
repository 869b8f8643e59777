"""A forged base backup in the bucket must not reach outside the PITR data directory.

Each case is a tar a bucket writer could publish as ``base.tar`` (stored, encrypted and
checksummed exactly as strongroom writes one). The PITR restore refuses it with an
IntegrityError naming the member, the data directory stays empty and the file or
folder outside is untouched. The pax header parser of the verify path is checked on
crafted records too.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import tarfile
from pathlib import Path

import pytest

from strongroom.artifacts import publish_backup, store_artifact
from strongroom.catalog import Manifest, data_key, manifest_key
from strongroom.config import EncryptionConfig, RepositoryConfig
from strongroom.engines.postgres.pitr.extract import extract_stream
from strongroom.engines.postgres.pitr.plan import PitrRequest
from strongroom.engines.postgres.pitr.restore import pitr_restore
from strongroom.engines.postgres.pitr.tar import TarTap, _pax_path
from strongroom.engines.postgres.wal import names
from strongroom.engines.postgres.wal.store import wal_key
from strongroom.errors import IntegrityError
from strongroom.ids import new_backup_id
from strongroom.repository.local import LocalRepository
from strongroom.signing import Signer, Trust, sig_key

TARGET = "pitrtar"
START_LSN, STOP_LSN = 0x2000028, 0x2000138


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o600
    return info, data


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o666
    return info, None


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def _publish(repo: LocalRepository, enc: EncryptionConfig, tar: bytes) -> str:
    """Publish ``tar`` as a base backup of TARGET, as a bucket writer would; its id."""
    stopped = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    bid = new_backup_id(stopped)
    artifact = store_artifact(
        repo,
        data_key("postgresql", TARGET, bid, "base.tar"),
        io.BytesIO(tar),
        name="base.tar",
        content="pg_basebackup-tar",
        encryption=enc,
        level=3,
    )
    details = {
        "wal_segment_size": 16 * 1024 * 1024,
        "timeline": 1,
        "start_lsn": names.format_lsn(START_LSN),
        "stop_lsn": names.format_lsn(STOP_LSN),
        "start_wal": names.segment_of_lsn(1, START_LSN),
        "stop_time": stopped.isoformat(),
        "system_identifier": 7300000000000000002,
        "next_xid": 740,
    }
    manifest = Manifest(
        backup_id=bid,
        engine="postgresql",
        target=TARGET,
        kind="base",
        started_at=stopped,
        finished_at=stopped,
        repository=repo.describe(),
        artifacts=[artifact],
        details=details,
    )
    publish_backup(repo, manifest)
    for segno in (2, 3):
        repo.put_bytes(wal_key(TARGET, names.segment_name(1, segno)), b"not read by the plan")
    return bid


def _cases(outside: Path) -> dict[str, tuple[list[tuple[tarfile.TarInfo, bytes | None]], str]]:
    base = [_file("PG_VERSION", b"15\n"), _file("global/pg_control", b"c" * 64)]
    return {
        "auto_conf_symlink": (
            [*base, _special("postgresql.auto.conf", tarfile.SYMTYPE, str(outside / "victim"))],
            "postgresql.auto.conf",
        ),
        "pg_wal_symlink_dir": (
            [*base, _special("pg_wal/x", tarfile.SYMTYPE, str(outside / "dir"))],
            "pg_wal/x",
        ),
        "pg_wal_link_itself": (
            [*base, _special("pg_wal", tarfile.SYMTYPE, str(outside / "dir"))],
            "pg_wal",
        ),
        "dotdot": ([*base, _file("../escape", b"owned")], "../escape"),
        "dotdot_inside": ([*base, _file("base/../../escape", b"owned")], "base/../../escape"),
        "absolute": ([*base, _file(str(outside / "abs"), b"owned")], str(outside / "abs")),
        "char_device": ([*base, _special("dev", tarfile.CHRTYPE)], "dev"),
        "block_device": ([*base, _special("blk", tarfile.BLKTYPE)], "blk"),
        "fifo": ([*base, _special("fifo", tarfile.FIFOTYPE)], "fifo"),
        "hard_link_out": (
            [*base, _special("global/passwd", tarfile.LNKTYPE, str(outside / "victim"))],
            "global/passwd",
        ),
        "tblspc_link_elsewhere": (
            [*base, _special("base/16384", tarfile.SYMTYPE, str(outside / "dir"))],
            "base/16384",
        ),
        "wal_file": ([*base, _file("pg_wal/000000010000000000000002", b"w")], "pg_wal/0000"),
        "signal_file": ([*base, _file("recovery.signal", b"")], "recovery.signal"),
        "member_twice": ([*base, _file("PG_VERSION", b"16\n")], "PG_VERSION"),
    }


CASES = sorted(_cases(Path("/x")))


def _outside_state(outside: Path) -> list[tuple[str, bytes | None]]:
    found: list[tuple[str, bytes | None]] = []
    for folder, dirs, files in os.walk(outside):
        for name in sorted(dirs + files):
            path = Path(folder) / name
            found.append((str(path), path.read_bytes() if path.is_file() else None))
    return sorted(found)


@pytest.mark.parametrize("signed", ["trusted", "foreign", "unsigned"])
@pytest.mark.parametrize("case", CASES)
def test_forged_base_backup_member_is_refused_and_nothing_outside_changes(
    case: str,
    signed: str,
    local_repo: tuple[LocalRepository, RepositoryConfig],
    age_key: EncryptionConfig,
    tmp_path: Path,
) -> None:
    """``trusted``: a compromised runner signed the forgery with a trusted key, so the
    extractor is what refuses the member. ``foreign`` (a second set-up's own key) and
    ``unsigned``: the signature check refuses the backup before a byte is extracted."""
    repo, config = local_repo
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "victim").write_bytes(b"root's file\n")
    members, shown = _cases(outside)[case]
    other = Signer.generate()
    writer = (
        repo
        if signed == "trusted"
        else LocalRepository(repo.root, trust=Trust((other.public,), other))
    )
    bid = _publish(writer, age_key, _tar(members))
    mkey = manifest_key("postgresql", TARGET, bid)
    if signed == "unsigned":
        repo.delete(sig_key(mkey))
    before = _outside_state(outside)
    data_dir = tmp_path / "restore" / "data"
    req = PitrRequest(target=TARGET, data_dir=str(data_dir), backup_id=bid)
    with pytest.raises(IntegrityError) as caught:
        pitr_restore(repo, config, age_key, req)
    message = str(caught.value)
    expected = shown if signed == "trusted" else f"{mkey} is not signed by a trusted key"
    assert expected in message, message
    assert _outside_state(outside) == before
    assert not data_dir.exists() or list(data_dir.iterdir()) == []
    assert not (tmp_path / "escape").exists()
    assert not (tmp_path / "restore" / "escape").exists()


def test_pg_tblspc_link_is_the_one_symlink_kept(tmp_path: Path) -> None:
    """The tablespace links PostgreSQL itself makes are extracted as symlinks (never
    followed), plain files and folders get PostgreSQL's modes whatever the tar says."""
    info, data = _file("base/1/1259", b"heap")
    info.mode = 0o4777
    tar = _tar(
        [
            _file("PG_VERSION", b"15\n"),
            (info, data),
            _special("pg_tblspc/16400", tarfile.SYMTYPE, "/srv/tblspc"),
        ]
    )
    root = tmp_path / "data"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        counts = extract_stream(io.BytesIO(tar), fd, None)
    finally:
        os.close(fd)
    assert counts["files"] == 2 and counts["links"] == 1
    assert os.readlink(root / "pg_tblspc" / "16400") == "/srv/tblspc"
    assert (root / "base" / "1" / "1259").read_bytes() == b"heap"
    # group read survives (initdb -g clusters), set-id and world bits never do
    assert (root / "base" / "1" / "1259").stat().st_mode & 0o7777 == 0o640


@pytest.mark.parametrize(
    ("record", "why"),
    [
        (b"0 path=x\n", "out of bounds"),
        (b"abc path=x\n", "malformed record length"),
        (b"-5 path=x\n", "malformed record length"),
        (b"99 path=x\n", "out of bounds"),
        (b"12 path=xyz", "out of bounds"),
        (b"12 path=abcXX", "does not end a line"),
        (b"nospace", "malformed record length"),
        (b"\xd9\xa3 path=x\n", "malformed record length"),
    ],
)
def test_pax_record_lengths_are_checked(record: bytes, why: str) -> None:
    with pytest.raises(IntegrityError, match=why):
        _pax_path(record)


def test_pax_path_record_is_read() -> None:
    assert _pax_path(b"15 path=a/b/cd\n7 x=yz\n") == "a/b/cd"


def _with_pax(pax: bytes) -> bytes:
    """A tar whose first member has the pax header ``pax`` (checksum recomputed)."""
    raw = bytearray(_tar([_file("a" * 120, b"data")]))
    header = raw[:512]
    assert header[156:157] == b"x"
    size = int(header[124:136].split(b"\0")[0], 8)
    body_end = 512 + ((size + 511) // 512) * 512
    padded = pax + b"\0" * ((-len(pax)) % 512)
    header[124:136] = f"{len(pax):011o}\0".encode()
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}\0 ".encode()
    return bytes(header) + padded + bytes(raw[body_end:])


@pytest.mark.parametrize("pax", [b"0 path=x\n", b"zz path=x\n", b"999 path=x\n"])
@pytest.mark.parametrize("reader", ["verify_tap", "extractor"])
def test_crafted_pax_header_is_an_integrity_error_not_a_hang(
    pax: bytes, reader: str, tmp_path: Path
) -> None:
    data = _with_pax(pax)
    if reader == "verify_tap":
        with pytest.raises(IntegrityError):
            TarTap().write(data)
        return
    # Python's tarfile parses the pax records itself: a record it cannot read is either
    # refused (IntegrityError, nothing extracted) or skipped, and then the member keeps
    # its ustar name; never a hang, never another exception
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        extract_stream(io.BytesIO(data), fd, None)
    except IntegrityError:
        assert list(tmp_path.iterdir()) == []
    else:
        assert [p.name for p in tmp_path.iterdir()] == ["a" * 100]
    finally:
        os.close(fd)
