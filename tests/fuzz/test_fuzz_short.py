"""Short fuzz pass of every parser that reads bucket bytes (run by ``make test``).

Arbitrary bytes and mutations of valid seeds go through each target of
tests/fuzz/targets.py; a call must return or raise one of strongroom's own errors
within a few seconds. The long coverage-guided runs (1M+ inputs per parser) are
``python -m tests.fuzz.run all --runs 1000000`` (see docs/security.md).
"""

from __future__ import annotations

import random
import signal
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.mutate import mutate
from tests.fuzz.targets import ALLOWED, targets

TARGETS = targets()
LIMIT_S = 5.0


class Hang(BaseException):
    """A parser call ran longer than LIMIT_S (never one of strongroom's errors)."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: object) -> None:
        raise Hang(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def build_input(name: str, seed_index: int, mutation: int, raw: bytes) -> bytes:
    """Raw bytes (``mutation`` 0), a seed, or a mutation of a seed: the example's repr
    stays small (indices and a short byte string, never a 10 kB seed)."""
    seeds = TARGETS[name][1]
    if mutation == 0:
        return raw
    seed = seeds[seed_index % len(seeds)]
    return seed if mutation == 1 else mutate(seed, random.Random(mutation))


def run_one(name: str, data: bytes) -> None:
    target = TARGETS[name][0]
    with time_limit(LIMIT_S), suppress(ALLOWED):
        target(data)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_seeds_are_valid_inputs(name: str) -> None:
    target, seeds = TARGETS[name]
    for seed in seeds:
        target(seed)  # the seeds exercise the success path, not only errors


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_parser_survives_hostile_bytes(name: str) -> None:
    @settings(
        max_examples=400,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        seed_index=st.integers(min_value=0, max_value=15),
        mutation=st.integers(min_value=0, max_value=2**32),
        raw=st.binary(max_size=2048),
    )
    def check(seed_index: int, mutation: int, raw: bytes) -> None:
        run_one(name, build_input(name, seed_index, mutation, raw))

    check()


FOUND = Path(__file__).parent / "found"


@pytest.mark.parametrize("path", sorted(FOUND.iterdir()), ids=lambda p: p.name)
def test_inputs_the_long_runs_found_stay_fixed(path: Path) -> None:
    """Each file in tests/fuzz/found/ is an input a long run once crashed a parser with,
    named ``<target>-<what>``: it must now return or raise one of strongroom's errors."""
    run_one(path.name.split("-", 1)[0], path.read_bytes())
