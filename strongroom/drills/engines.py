"""Which engines can be drilled: engine name (``strongroom.engines.registry``) -> its
ScratchAdapter class.

``adapter_for(engine, ...)`` returns a ScratchAdapter or raises
``EngineNotAvailable`` with what is missing. An engine whose restore code is not
part of this installation has an entry that says so; it never pretends.
"""

from __future__ import annotations

import importlib
from typing import Any

from strongroom.config import EncryptionConfig
from strongroom.drills.core import EngineNotAvailable, ScratchAdapter
from strongroom.engines.registry import ENGINE_MODULES
from strongroom.repository.base import Repository

# engine -> (adapter module, adapter class)
DRILL_ADAPTERS: dict[str, tuple[str, str]] = {
    "postgresql": ("strongroom.drills.postgres", "PostgresDrill"),
    "clickhouse": ("strongroom.drills.clickhouse", "ClickHouseDrill"),
    "redis": ("strongroom.drills.redis", "RedisDrill"),
}


def _adapter_class(engine: str) -> Any:
    module, name = DRILL_ADAPTERS[engine]
    for needed in (ENGINE_MODULES[engine], module):
        try:
            loaded = importlib.import_module(needed)
        except ImportError as exc:
            raise EngineNotAvailable(
                f"{engine} restore drills need {needed}, which this installation lacks "
                f"({exc}); drill another engine, or install a strongroom with this one"
            ) from None
    return getattr(loaded, name)


def adapter_for(
    engine: str, source: Any, repo: Repository, enc: EncryptionConfig, **options: Any
) -> ScratchAdapter:
    """The drill adapter for ``engine`` (``source`` is the engine's connection config)."""
    if engine not in DRILL_ADAPTERS:
        raise EngineNotAvailable(
            f"no restore drill for engine {engine!r}; known: {', '.join(DRILL_ADAPTERS)}"
        )
    adapter: ScratchAdapter = _adapter_class(engine)(source, repo, enc, **options)
    return adapter


def available_engines() -> list[str]:
    """Engines whose drill adapter can be built in this installation."""
    found = []
    for engine in DRILL_ADAPTERS:
        try:
            _adapter_class(engine)
        except EngineNotAvailable:
            continue
        found.append(engine)
    return found
