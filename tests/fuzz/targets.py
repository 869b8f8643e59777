"""Fuzz targets: every parser that reads bytes an attacker in the bucket can write.

Each target takes arbitrary bytes and must end in one of two ways: it returns, or it
raises one of strongroom's own errors (``ALLOWED``). Anything else (a raw ValueError,
IndexError, struct.error, RecursionError, MemoryError) is a crash, and a call that does not
return within the runner's time limit is a hang. The seeds are small valid inputs built
here (no checked-in blobs), so mutations start from the formats' real shapes.

Used by the short pass in ``make test`` (tests/fuzz/test_fuzz_short.py, hypothesis) and
by the long coverage-guided runs (``python -m tests.fuzz.run``, atheris).
"""

from __future__ import annotations

import io
import struct
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from strongroom.engines.clickhouse.native import _Feed, walk
from strongroom.engines.postgres.pitr.tar import TarTap, check_manifest_checksum, parse_backup_label
from strongroom.engines.postgres.wal import names as pg_wal_names
from strongroom.engines.redis.rdb import RdbTracker, crc64
from strongroom.errors import StrongroomError
from tests.fixtures.strongroom_fixtures import make_local_repo

#: strongroom's own errors; WalNameError is the WAL parsers' (a ValueError subclass).
ALLOWED: tuple[type[BaseException], ...] = (StrongroomError, pg_wal_names.WalNameError)


def _chunks(data: bytes) -> list[bytes]:
    """Split ``data`` at places taken from its own bytes (streams arrive in pieces)."""
    cut = data[0] if data else 0
    step = 1 + (cut % 97) * 7
    return [data[i : i + step] for i in range(0, len(data), step)]


# ---------------------------------------------------------------------- tar stream


def tar_stream(data: bytes) -> None:
    tap = TarTap(hash_algorithm="sha256")
    for piece in _chunks(data):
        tap.write(piece)
    label = tap.captured.get("backup_label")
    if label is not None:
        parse_backup_label(label.decode("utf-8", "replace"))
    manifest = tap.captured.get("backup_manifest")
    if manifest is not None:
        check_manifest_checksum(manifest)


def _tar_seed(pax: bool) -> bytes:
    out = io.BytesIO()
    fmt = tarfile.PAX_FORMAT if pax else tarfile.GNU_FORMAT
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for name, body in (
            ("backup_label", b"START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n"),
            ("base/1/1259", b"\0" * 600),
            ("d" * 120 + "/long-name-\u00e9", b"x"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
        folder = tarfile.TarInfo("pg_wal")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
    return out.getvalue()


# ------------------------------------------------------------- ClickHouse Native


def clickhouse_native(data: bytes) -> None:
    feed = _Feed()
    feed.buf = data
    feed.q.put(None)
    walk(feed)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _column(name: str, type_: str, payload: bytes) -> bytes:
    return (
        _varint(len(name.encode()))
        + name.encode()
        + _varint(len(type_.encode()))
        + type_.encode()
        + payload
    )


def _native_seed() -> bytes:
    rows = 3
    block = _varint(5) + _varint(rows)
    block += _column("id", "UInt64", struct.pack("<3Q", 1, 2, 3))
    block += _column("s", "String", b"".join(_varint(len(v)) + v for v in (b"a", b"", b"\xff")))
    block += _column("n", "Nullable(Int32)", b"\0\1\0" + struct.pack("<3i", 7, 0, -1))
    block += _column("a", "Array(UInt8)", struct.pack("<3Q", 1, 1, 3) + b"\1\2\3")
    block += _column("d", "Decimal(18, 4)", struct.pack("<3q", 1, -1, 10**10))
    return block + block


# ------------------------------------------------------------------- Redis RDB


def rdb_stream(data: bytes) -> None:
    tracker = RdbTracker()
    for piece in _chunks(data):
        tracker.update(piece)
    tracker.finish()


def _rdb_string(value: bytes) -> bytes:
    return bytes([len(value)]) + value


def _rdb_seed() -> bytes:
    body = b"REDIS0011"
    for key, value in ((b"redis-ver", b"7.0.15"), (b"redis-bits", b"64")):
        body += b"\xfa" + _rdb_string(key) + _rdb_string(value)
    body += b"\xfa" + _rdb_string(b"ctime") + b"\xc2" + struct.pack("<i", 1_700_000_000)
    body += b"\xfe\x00\xfb\x01\x00\x00" + _rdb_string(b"k") + _rdb_string(b"v") + b"\xff"
    return body + struct.pack("<Q", crc64(body))


# --------------------------------------------------------------- WAL names, headers

_WAL_NAMES = (
    "000000010000000000000001",
    "000000010000000000000001.partial",
    "00000002.history",
    "000000010000000000000001.00000028.backup",
)


def wal_file(data: bytes) -> None:
    """First line: a file name as a listing gives it (or an LSN as an operator types
    it); the rest: the file's bytes."""
    raw_name, _, content = data.partition(b"\n")
    name = raw_name.decode("utf-8", "replace")
    try:
        pg_wal_names.kind(name)
    except pg_wal_names.WalNameError:
        pg_wal_names.format_lsn(pg_wal_names.parse_lsn(name))
        return
    pg_wal_names.timeline_of(name)
    pg_wal_names.check_segment(name, content, system_identifier=7)


def _wal_seeds() -> list[bytes]:
    size = 16 * 1024 * 1024
    header = struct.pack("<HHIQI4xQII", 0xD110, 0x0002, 1, size, 0, 7, size, 8192)
    history = b"1\t0/3000060\tno recovery target specified\n"
    label = b"START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n"
    return [
        _WAL_NAMES[1].encode() + b"\n" + header + b"\0" * 200,
        _WAL_NAMES[1].encode() + b"\n" + header,
        b"0/16B3740\n",
        _WAL_NAMES[2].encode() + b"\n" + history,
        _WAL_NAMES[3].encode() + b"\n" + label,
    ]


# -------------------------------------------------------------------- manifests


class _ManifestTarget:
    """Bytes stored as a manifest in a local repository, then read as every reader does.

    Most inputs are signed with the suite's trusted key (so the bytes get past the
    signature to the JSON and model parsers, as a leaked signing key would); inputs
    whose length is a multiple of 5 get a signature made of their first 64 bytes instead, which
    exercises the refusal path."""

    def __init__(self) -> None:
        from strongroom.signing import sig_key
        from tests.fixtures.strongroom_fixtures import TEST_SIGNER

        self.folder = Path(tempfile.mkdtemp(prefix="sr-fuzz-catalog-"))
        self.repo = make_local_repo(self.folder)
        self.signer = TEST_SIGNER
        self.key = "catalog/postgresql/pg1/20261124T020000Z-1a2b3c.json"
        self.sig = sig_key(self.key)

    def __call__(self, data: bytes) -> None:
        from strongroom.catalog import Catalog

        path = self.folder / self.key
        path.parent.mkdir(parents=True, exist_ok=True)
        forged = len(data) % 5 == 0
        signature = data[:64].ljust(64, b"\0") if forged else self.signer.sign(data)
        (self.folder / self.sig).write_bytes(signature)
        path.write_bytes(data)
        catalog = Catalog(self.repo)
        catalog.list()
        catalog.load("postgresql", "pg1", "20261124T020000Z-1a2b3c")


def _manifest_seed() -> bytes:
    import datetime as dt

    from strongroom.catalog import Artifact, Manifest

    at = dt.datetime(2026, 11, 24, 2, tzinfo=dt.UTC)
    manifest = Manifest(
        backup_id="20261124T020000Z-1a2b3c",
        engine="postgresql",
        target="pg1",
        started_at=at,
        finished_at=at,
        repository="local",
        artifacts=[
            Artifact(
                name="db.pgdump",
                key="data/postgresql/pg1/20261124T020000Z-1a2b3c/db.pgdump",
                content="pg_dump custom",
                raw_size=10,
                stored_size=20,
                raw_sha256="0" * 64,
                stored_sha256="1" * 64,
            )
        ],
    )
    seed = manifest.model_dump_json().encode()
    pad = ""
    while len(seed) % 5 == 0:  # such lengths get a forged signature (see _ManifestTarget)
        pad += "x"
        seed = manifest.model_copy(update={"labels": {"seed": pad}}).model_dump_json().encode()
    return seed


Target = Callable[[bytes], None]


def targets() -> dict[str, tuple[Target, list[bytes]]]:
    """Each target and its seeds, by name."""
    return {
        "tar": (tar_stream, [_tar_seed(pax=True), _tar_seed(pax=False)]),
        "native": (clickhouse_native, [_native_seed()]),
        "rdb": (rdb_stream, [_rdb_seed()]),
        "wal": (wal_file, _wal_seeds()),
        "manifest": (_ManifestTarget(), [_manifest_seed()]),
    }
