"""Where the engines are: engine name -> the module whose ``ENGINE`` implements it.

Modules are imported on first use, so a front end that touches one engine does not
import the others (nor their client libraries). Adding an engine is one line here.
"""

from __future__ import annotations

import importlib

from strongroom.engines.interface import Engine
from strongroom.errors import InvalidInput

ENGINE_MODULES: dict[str, str] = {
    "postgresql": "strongroom.engines.postgres.engine",
    "clickhouse": "strongroom.engines.clickhouse.engine",
    "redis": "strongroom.engines.redis.engine",
}


def engine_names() -> list[str]:
    return list(ENGINE_MODULES)


def get_engine(name: str) -> Engine:
    """The engine called ``name``; InvalidInput naming the known ones otherwise."""
    module = ENGINE_MODULES.get(name)
    if module is None:
        raise InvalidInput(f"unknown engine {name!r}: expected one of {', '.join(ENGINE_MODULES)}")
    engine: Engine = importlib.import_module(module).ENGINE
    return engine
