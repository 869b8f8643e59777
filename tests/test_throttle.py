"""Repository bandwidth limit (``max_bytes_per_second``): the token bucket's schedule on a
simulated clock (no timing in the test), shared by concurrent streams, and applied to
artifact uploads and downloads of both backends (local folder, moto S3)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import SecretStr

from strongroom.config import RepositoryConfig
from strongroom.repository import Repository, open_repository
from strongroom.repository.throttle import RateLimit
from tests.fixtures.s3 import MotoServer
from tests.fixtures.strongroom_fixtures import signed_config

MIB = 1024 * 1024


class FakeClock:
    """A clock that only moves when someone sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds


def _limit(rate: int, clock: FakeClock) -> RateLimit:
    return RateLimit(rate, burst_s=0.25, clock=clock, sleep=clock.sleep)


def test_the_average_rate_holds_after_one_burst() -> None:
    clock = FakeClock()
    limit = _limit(MIB, clock)
    for _ in range(160):  # 10 MiB in 64 KiB writes
        limit.take(64 * 1024)
    assert clock.slept == pytest.approx(10 - 0.25)
    clock.now += 60  # idle: at most one burst is saved up, not a minute's worth
    start = clock.now
    limit.take(2 * MIB)
    assert clock.now - start == pytest.approx(2 - 0.25)


def test_streams_share_one_budget() -> None:
    clock = FakeClock()
    limit = _limit(4 * MIB, clock)
    for _ in range(8):  # two streams interleaved, 4 MiB each
        limit.take(512 * 1024)
        limit.take(512 * 1024)
    assert clock.slept == pytest.approx(8 / 4 - 0.25)
    with pytest.raises(ValueError):
        RateLimit(0)


def _round_trip(repo: Repository, clock: FakeClock) -> None:
    assert repo.rate_limit is not None
    repo.rate_limit = _limit(repo.rate_limit.bytes_per_second, clock)
    data = os.urandom(3 * MIB)
    with repo.open_write("artifacts/one") as writer:
        for start in range(0, len(data), 256 * 1024):
            writer.write(data[start : start + 256 * 1024])
        writer.commit()
    after_write = clock.slept
    assert after_write == pytest.approx(3 / 2 - 0.25)  # 2 MiB/s
    with repo.open_read("artifacts/one") as reader:
        assert reader.read() == data
    assert clock.slept - after_write == pytest.approx(3 / 2, abs=0.01)


def test_local_uploads_and_downloads_are_limited(tmp_path: Path) -> None:
    config = signed_config(kind="local", path=str(tmp_path / "repo"), max_bytes_per_second=2 * MIB)
    _round_trip(open_repository(config), FakeClock())
    unlimited = open_repository(signed_config(kind="local", path=str(tmp_path / "other")))
    assert unlimited.rate_limit is None


def test_s3_uploads_and_downloads_are_limited(s3_server: MotoServer) -> None:
    bucket = s3_server.create_bucket()
    try:
        config: RepositoryConfig = signed_config(
            kind="s3",
            bucket=bucket,
            endpoint_url=s3_server.endpoint_url,
            access_key_id=s3_server.access_key,
            secret_access_key=SecretStr(s3_server.secret_key),
            part_size=5 * MIB,
            max_bytes_per_second=2 * MIB,
        )
        _round_trip(open_repository(config), FakeClock())
    finally:
        s3_server.delete_bucket(bucket)
