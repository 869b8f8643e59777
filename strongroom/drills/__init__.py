"""Restore drills: prove a backup restores, within the recovery objectives.

``run_drill(adapter, repo, target=...)`` (``core``) does one drill with an
engine adapter from ``adapter_for`` (``engines``); records are stored at
``drills/<engine>/<target>/<drill_id>.json`` and listed with ``list_drills``.
"""

from strongroom.drills.core import (
    DrillFailed,
    EngineNotAvailable,
    Objectives,
    ScratchAdapter,
    drill_key,
    list_drills,
    load_drill,
    run_drill,
)
from strongroom.drills.engines import DRILL_ADAPTERS, adapter_for, available_engines

__all__ = [
    "DRILL_ADAPTERS",
    "DrillFailed",
    "EngineNotAvailable",
    "Objectives",
    "ScratchAdapter",
    "adapter_for",
    "available_engines",
    "drill_key",
    "list_drills",
    "load_drill",
    "run_drill",
]
