"""Seed mutations shared by the short hypothesis pass and the long atheris runs."""

from __future__ import annotations

import random

INTERESTING = (b"\0", b"\xff", b"\x7f", b"\x80", b" ", b"0", b"9", b"\n", b"=", b"-1", b"99999999")


def mutate(seed: bytes, rng: random.Random, rounds: int = 4) -> bytes:
    """A few byte flips, inserted or deleted runs, truncations and splices of ``seed``."""
    data = bytearray(seed)
    for _ in range(rng.randint(1, rounds)):
        op = rng.randrange(6)
        at = rng.randrange(len(data) + 1)
        if op == 0 and data:
            data[min(at, len(data) - 1)] = rng.randrange(256)
        elif op == 1:
            data[at:at] = rng.choice(INTERESTING)
        elif op == 2:
            del data[at : at + rng.randint(1, 64)]
        elif op == 3:
            del data[at:]
        elif op == 4:
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
        elif data:
            start = rng.randrange(len(data))
            data[at:at] = data[start : start + rng.randint(1, 512)]
    return bytes(data)
