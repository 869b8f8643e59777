"""The stream: round trip, tamper detection, wrong key, holdback, stock-tool decryption."""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import subprocess
import tracemalloc

import pytest
from pyrage import x25519

from strongroom import pipeline
from strongroom.errors import IntegrityError, InvalidInput


@pytest.fixture(scope="module")
def identity() -> x25519.Identity:
    return x25519.Identity.generate()


def _data() -> bytes:
    return os.urandom(700_000) + b"strongroom " * 300_000


def _store(identity: x25519.Identity, data: bytes) -> tuple[bytes, pipeline.StreamStats]:
    out = io.BytesIO()
    stats = pipeline.store_stream(io.BytesIO(data), out, recipients=[str(identity.to_public())])
    return out.getvalue(), stats


def _restore(identity: x25519.Identity, blob: bytes, stats: pipeline.StreamStats) -> bytes:
    sink = io.BytesIO()
    pipeline.restore_stream(
        io.BytesIO(blob),
        sink,
        identities=[str(identity)],
        expected_stored_sha256=stats.stored_sha256,
        expected_raw_sha256=stats.raw_sha256,
        name="test",
    )
    return sink.getvalue()


def test_round_trip_records_sizes_and_checksums(identity: x25519.Identity) -> None:
    data = _data()
    blob, stats = _store(identity, data)
    assert stats.raw_size == len(data)
    assert stats.raw_sha256 == hashlib.sha256(data).hexdigest()
    assert stats.stored_size == len(blob)
    assert stats.stored_sha256 == hashlib.sha256(blob).hexdigest()
    assert stats.stored_size < stats.raw_size  # compressed
    assert _restore(identity, blob, stats) == data


def test_empty_stream_round_trips(identity: x25519.Identity) -> None:
    blob, stats = _store(identity, b"")
    assert stats.raw_size == 0
    assert _restore(identity, blob, stats) == b""


@pytest.mark.parametrize("where", [0.1, 0.5, 0.99])
def test_flipped_byte_fails(identity: x25519.Identity, where: float) -> None:
    blob, stats = _store(identity, _data())
    pos = int(len(blob) * where)
    bad = blob[:pos] + bytes([blob[pos] ^ 0x01]) + blob[pos + 1 :]
    with pytest.raises(IntegrityError, match="test"):
        _restore(identity, bad, stats)


@pytest.mark.parametrize("cut", [1, 100, 65_536 + 16, 200_000])
def test_truncation_fails(identity: x25519.Identity, cut: int) -> None:
    blob, stats = _store(identity, os.urandom(400_000))
    with pytest.raises(IntegrityError):
        _restore(identity, blob[:-cut], stats)


def test_reordered_chunks_fail(identity: x25519.Identity) -> None:
    blob, stats = _store(identity, os.urandom(400_000))
    chunk = 65_536 + 16  # age payload chunk size on the wire
    header_end = blob.index(b"\n---") + 1
    header_end = blob.index(b"\n", header_end) + 1 + 16  # header line + payload nonce
    a = blob[header_end : header_end + chunk]
    b = blob[header_end + chunk : header_end + 2 * chunk]
    swapped = blob[:header_end] + b + a + blob[header_end + 2 * chunk :]
    assert len(swapped) == len(blob)
    with pytest.raises(IntegrityError):
        _restore(identity, swapped, stats)


def test_wrong_key_fails_clearly(identity: x25519.Identity) -> None:
    blob, stats = _store(identity, _data())
    other = x25519.Identity.generate()
    with pytest.raises(IntegrityError, match="wrong key"):
        _restore(other, blob, stats)


def test_well_formed_replacement_is_caught_by_manifest_checksum(
    identity: x25519.Identity,
) -> None:
    """age recipients are public: a forged but valid file must still be refused."""
    _, stats = _store(identity, b"original" * 1000)
    forged, _ = _store(identity, b"forged!!" * 1000)
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        _restore(identity, forged, stats)


def test_holdback_keeps_tail_from_consumer_on_failure(identity: x25519.Identity) -> None:
    data = os.urandom(3 * 1024 * 1024)
    blob, stats = _store(identity, data)
    sink = io.BytesIO()
    with pytest.raises(IntegrityError):
        pipeline.restore_stream(
            io.BytesIO(blob),
            sink,
            identities=[str(identity)],
            expected_stored_sha256="0" * 64,
            expected_raw_sha256=stats.raw_sha256,
            name="held",
        )
    assert len(sink.getvalue()) <= len(data) - pipeline.HOLDBACK


def test_no_recipient_or_bad_identity_is_invalid_input(identity: x25519.Identity) -> None:
    with pytest.raises(InvalidInput):
        pipeline.store_stream(io.BytesIO(b"x"), io.BytesIO(), recipients=[])
    with pytest.raises(InvalidInput) as info:
        pipeline.parse_identities(["AGE-SECRET-KEY-1NOTREALLYAKEY"])
    assert "NOTREALLY" not in str(info.value)


def test_stock_age_and_zstd_can_decrypt(identity: x25519.Identity, tmp_path: object) -> None:
    """Disaster path: an operator with only `age` and `zstd` gets the plaintext back."""
    from pathlib import Path

    folder = Path(str(tmp_path))
    data = _data()
    blob, _ = _store(identity, data)
    (folder / "artifact.age").write_bytes(blob)
    (folder / "key.txt").write_text(str(identity) + "\n")
    age = subprocess.run(
        ["age", "-d", "-i", str(folder / "key.txt"), str(folder / "artifact.age")],
        capture_output=True,
        check=True,
    )
    plain = subprocess.run(["zstd", "-d", "-c"], input=age.stdout, capture_output=True, check=True)
    assert plain.stdout == data


class _Generated:
    """A source of ``total`` bytes of poorly compressible data, produced on the fly."""

    def __init__(self, total: int) -> None:
        self.left = total
        self.block = os.urandom(1 << 20)

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        size = min(self.left, 1 << 20)
        self.left -= size
        return self.block[:size]


def test_memory_does_not_grow_with_stream_size(identity: x25519.Identity) -> None:
    peaks = []
    for total in (16 << 20, 128 << 20):
        tracemalloc.start()
        pipeline.store_stream(
            _Generated(total), pipeline.NullSink(), recipients=[str(identity.to_public())]
        )
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 16 << 20
    assert peaks[1] < peaks[0] * 2 + (4 << 20)


def test_stored_chunks_are_recorded_and_checked_as_they_are_read(
    identity: x25519.Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every VERIFY_CHUNK of stored bytes has its digest; a reader given them publishes
    plaintext only after the chunks it came from matched, and a forged chunk stops the
    stream at that chunk: nothing derived from it was ever published."""
    monkeypatch.setattr(pipeline, "VERIFY_CHUNK", 64 * 1024)
    monkeypatch.setattr(pipeline, "VERIFY_FIRST_CHUNK", 16 * 1024)
    ramped, ramped_stats = _store(identity, os.urandom(300_000))
    bounds = [0, 16 * 1024, 48 * 1024, 112 * 1024, 176 * 1024, 240 * 1024, len(ramped)]
    assert list(ramped_stats.stored_chunk_sha256) == [
        hashlib.sha256(ramped[a:b]).hexdigest() for a, b in itertools.pairwise(bounds)
    ]
    monkeypatch.setattr(pipeline, "VERIFY_FIRST_CHUNK", 64 * 1024)  # equal chunks below
    data = os.urandom(1_500_000)  # incompressible: about 23 stored chunks
    blob, stats = _store(identity, data)
    size = stats.stored_chunk_size
    assert size == 64 * 1024 and stats.stored_chunk_first == size
    assert list(stats.stored_chunk_sha256) == [
        hashlib.sha256(blob[i : i + size]).hexdigest() for i in range(0, len(blob), size)
    ]

    def read(stored: bytes, sink: io.BytesIO, published: list[int]) -> None:
        pipeline.restore_stream(
            io.BytesIO(stored),
            sink,
            identities=[str(identity)],
            expected_stored_sha256=stats.stored_sha256,
            expected_raw_sha256=stats.raw_sha256,
            name="artifact",
            holdback=0,
            expected_chunks=(list(stats.stored_chunk_sha256), size, size),
            on_verified=lambda: published.append(sink.tell()),
        )

    sink, published = io.BytesIO(), []
    read(blob, sink, published)
    assert sink.getvalue() == data
    assert len(published) == len(blob) // size and published == sorted(published)

    def published_before_failure(stored: bytes) -> tuple[io.BytesIO, list[int], str]:
        sink, published = io.BytesIO(), []
        with pytest.raises(IntegrityError) as failure:
            read(stored, sink, published)
        return sink, published, str(failure.value)

    # a flipped byte in chunk 5: age's own authentication or the chunk check stops
    # the stream there; what was published is the original plaintext
    flipped = bytearray(blob)
    flipped[5 * size + 100] ^= 1
    sink, published, _ = published_before_failure(bytes(flipped))
    assert len(published) <= 5
    assert sink.getvalue()[: published[-1]] == data[: published[-1]]

    # a well-formed replacement (encrypted to the public recipient): its first chunk
    # already differs, so not one byte of it is published
    other, _ = _store(identity, data[:-1] + bytes([data[-1] ^ 1]))
    sink, published, message = published_before_failure(other)
    assert published == [] and "stored chunk 0 does not match" in message

    with pytest.raises(IntegrityError):
        read(blob + b"\x00" * 10, io.BytesIO(), [])
