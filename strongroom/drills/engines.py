"""Which engines can be drilled: a dispatch table from engine name to adapter factory.

``adapter_for(engine, ...)`` returns a ScratchAdapter or raises
``EngineNotAvailable`` with what is missing. An engine whose restore code is not
part of this installation has an entry that says so; it never pretends.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from strongroom.config import EncryptionConfig
from strongroom.drills.core import EngineNotAvailable, ScratchAdapter
from strongroom.repository.base import Repository

AdapterFactory = Callable[..., ScratchAdapter]


def _postgres(
    source: Any, repo: Repository, enc: EncryptionConfig, **options: Any
) -> ScratchAdapter:
    from strongroom.drills.postgres import PostgresDrill

    return PostgresDrill(source, repo, enc, **options)


def _needs(module: str, engine: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise EngineNotAvailable(
            f"{engine} restore drills need {module}, which this installation lacks ({exc}); "
            "drill a PostgreSQL target, or install a strongroom with the engine"
        ) from None


def _clickhouse(
    source: Any, repo: Repository, enc: EncryptionConfig, **options: Any
) -> ScratchAdapter:
    _needs("strongroom.engines.clickhouse.restore", "ClickHouse")
    from strongroom.drills.clickhouse import ClickHouseDrill

    return ClickHouseDrill(source, repo, enc, **options)


def _redis(source: Any, repo: Repository, enc: EncryptionConfig, **options: Any) -> ScratchAdapter:
    _needs("strongroom.engines.redis.restore", "Redis")
    from strongroom.drills.redis import RedisDrill

    return RedisDrill(source, repo, enc, **options)


DRILL_ADAPTERS: dict[str, AdapterFactory] = {
    "postgresql": _postgres,
    "clickhouse": _clickhouse,
    "redis": _redis,
}


def adapter_for(
    engine: str, source: Any, repo: Repository, enc: EncryptionConfig, **options: Any
) -> ScratchAdapter:
    """The drill adapter for ``engine`` (``source`` is the engine's connection config)."""
    factory = DRILL_ADAPTERS.get(engine)
    if factory is None:
        raise EngineNotAvailable(
            f"no restore drill for engine {engine!r}; known: {', '.join(DRILL_ADAPTERS)}"
        )
    return factory(source, repo, enc, **options)


def available_engines() -> list[str]:
    """Engines whose drill adapter can be built in this installation."""
    found = ["postgresql"]
    for engine, module in (
        ("clickhouse", "strongroom.engines.clickhouse.restore"),
        ("redis", "strongroom.engines.redis.restore"),
    ):
        try:
            importlib.import_module(module)
            importlib.import_module(f"strongroom.drills.{engine}")
        except ImportError:
            continue
        found.append(engine)
    return found
