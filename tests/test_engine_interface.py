"""The Engine interface: the registry finds every engine, each satisfies the verbs, and
bad input (an unknown engine, a request of another engine) is refused clearly."""

from __future__ import annotations

import pytest

from blocks import REPOSITORY_BLOCK_SLUG, TARGET_BLOCK_SLUGS, TARGET_BLOCKS, BackupRepository
from flows.by_engine import ENGINE_FLOWS, backup_flow, restore_flow
from strongroom.drills.engines import DRILL_ADAPTERS, available_engines
from strongroom.engines.clickhouse.restore import ChRestoreRequest
from strongroom.engines.postgres.restore import PgRestoreRequest
from strongroom.engines.registry import engine_names, get_engine
from strongroom.errors import InvalidInput


def test_every_engine_is_registered_everywhere() -> None:
    names = engine_names()
    assert names == ["postgresql", "clickhouse", "redis"]
    # one registration per table: blocks, flows, drills all know the same engines
    assert list(TARGET_BLOCKS) == names
    # the static slugs (no import of every block class) name the same block types
    assert {e: b.get_block_type_slug() for e, b in TARGET_BLOCKS.items()} == TARGET_BLOCK_SLUGS
    assert BackupRepository.get_block_type_slug() == REPOSITORY_BLOCK_SLUG
    assert list(ENGINE_FLOWS) == names
    assert list(DRILL_ADAPTERS) == names
    assert available_engines() == names
    for name in names:
        engine = get_engine(name)
        assert engine.name == name
        assert backup_flow(name).name == f"backup-{name}"
        assert restore_flow(name).name == f"restore-{name}"
        for verb in ("backup", "restore", "backup_summary", "restore_summary"):
            assert callable(getattr(engine, verb))


def test_unknown_engine_is_refused() -> None:
    with pytest.raises(InvalidInput, match="unknown engine 'mysql': expected one of"):
        get_engine("mysql")
    with pytest.raises(InvalidInput, match="unknown engine 'mysql'"):
        backup_flow("mysql")


def test_a_request_of_another_engine_is_refused_before_anything_runs() -> None:
    engine = get_engine("postgresql")
    with pytest.raises(TypeError, match="PostgreSQL restore takes a PgRestoreRequest"):
        engine.restore(None, None, None, ChRestoreRequest(), progress=None)  # type: ignore[arg-type]
    assert engine.request_type is PgRestoreRequest


def test_restore_summary_reports_failed_checks() -> None:
    report = {
        "backup_id": "20260101T000000Z-abcdef",
        "source_database": "shop",
        "target_database": "shop_restored",
        "target_server": "127.0.0.1:5432",
        "mode": "new database",
        "raw_size": 2048,
        "rows_ok": False,
        "row_checks": [{"table": "public.t", "expected": 3, "actual": 2, "ok": False}],
    }
    summary = get_engine("postgresql").restore_summary(report)
    assert not summary.ok
    assert summary.rows == [
        {"table": "public.t", "expected rows": 3, "restored rows": 2, "ok": False}
    ]
    assert "- size: 2.0 KiB" in summary.lines
    assert get_engine("postgresql").restore_summary({**report, "rows_ok": True}).ok
