"""Progress reporting hook: the CLI installs a rich progress bar, flows and tests install none.

Engines ask ``progress_for(name, total)`` for a callback that receives byte
counts; with no reporter installed it returns None and costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Reporter(Protocol):
    def __call__(self, name: str, total: int | None) -> Callable[[int], None]: ...


_reporter: Reporter | None = None


def install(reporter: Reporter | None) -> None:
    global _reporter
    _reporter = reporter


def current() -> Reporter | None:
    return _reporter
