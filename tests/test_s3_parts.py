"""Multipart part sizes: parts grow with the part number so an artifact of any size fits
the store's part-count limit (``max_parts``), large parts are spooled to disk rather
than memory, and the object that arrives is byte-for-byte what was written (moto S3)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest

from strongroom.repository.s3 import S3Repository
from strongroom.repository.s3_multipart import (
    IN_MEMORY_PART_BYTES,
    MAX_OBJECT_BYTES,
    MAX_PART_BYTES,
    capacity,
    part_size_for,
)
from tests.fixtures.s3 import MotoServer
from tests.test_repository import MIB, PART, PREFIX, _data, _Recorder, _s3_config


@pytest.fixture
def bucket(s3_server: MotoServer) -> Iterator[str]:
    name = s3_server.create_bucket()
    try:
        yield name
    finally:
        s3_server.delete_bucket(name)


def test_every_size_s3_allows_fits_and_small_artifacts_keep_small_parts() -> None:
    base = 16 * MIB
    assert capacity(base, 10000) >= MAX_OBJECT_BYTES  # AWS: 10,000 parts
    assert capacity(base, 1000) >= 2 * 1024**4  # a 1,000-part store: over 2 TiB
    assert part_size_for(1, base, 10000) == base
    assert part_size_for(625, base, 10000) == base  # the first 1/16 of parts
    assert part_size_for(626, base, 10000) == 2 * base
    assert part_size_for(10000, base, 10000) == MAX_PART_BYTES  # never over 5 GiB
    sizes = [part_size_for(n, base, 1000) for n in range(1, 1001)]
    assert sizes == sorted(sizes)
    assert sum(sizes) == capacity(base, 1000)


def test_parts_grow_and_large_ones_spool_to_disk(s3_server: MotoServer, bucket: str) -> None:
    # max_parts 16: every part twice the one before (5, 10, 20, 40, 80 MiB ...); the
    # fifth part's buffer is over IN_MEMORY_PART_BYTES, so it is a temporary file
    assert part_size_for(5, PART, 16) > IN_MEMORY_PART_BYTES
    client = s3_server.s3()
    recorder = _Recorder(client)
    repo = S3Repository.from_client(client, _s3_config(s3_server, bucket, max_parts=16))
    data = _data(81 * MIB)
    with repo.open_write("big/object") as writer:
        for start in range(0, len(data), 3 * MIB + 17):  # writes not aligned to parts
            writer.write(data[start : start + 3 * MIB + 17])
        writer.commit()
    lengths = [int(h["content-length"]) for h in recorder.ops("UploadPart")]
    assert lengths == [5 * MIB, 10 * MIB, 20 * MIB, 40 * MIB, 6 * MIB]
    body = s3_server.s3().get_object(Bucket=bucket, Key=f"{PREFIX}/big/object")["Body"].read()
    assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
