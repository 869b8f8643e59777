"""Each engine's backup and restore flows, found by engine name.

For front ends that treat engines alike (the demo, fleet runs): ``backup_flow("redis")``
is ``flows.redis.backup_redis_flow``. Modules are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from strongroom.errors import InvalidInput

# engine -> (module, backup flow, restore flow)
ENGINE_FLOWS: dict[str, tuple[str, str, str]] = {
    "postgresql": ("flows.postgres", "backup_postgresql", "restore_postgresql"),
    "clickhouse": ("flows.clickhouse", "backup_clickhouse_flow", "restore_clickhouse_flow"),
    "redis": ("flows.redis", "backup_redis_flow", "restore_redis_flow"),
}


def _flow(engine: str, which: int) -> Any:
    entry = ENGINE_FLOWS.get(engine)
    if entry is None:
        raise InvalidInput(f"unknown engine {engine!r}: expected one of {', '.join(ENGINE_FLOWS)}")
    return getattr(importlib.import_module(entry[0]), entry[which])


def backup_flow(engine: str) -> Any:
    """The ``backup-<engine>`` flow."""
    return _flow(engine, 1)


def restore_flow(engine: str) -> Any:
    """The ``restore-<engine>`` flow."""
    return _flow(engine, 2)
