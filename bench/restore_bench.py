"""Restore time and operator overhead (issue 19): every section in one run, one JSON.

    .venv/bin/python -m bench.restore_bench            # 1 GB-class data, 3 rounds
    .venv/bin/python -m bench.restore_bench --quick    # small data, 1 round (smoke test)
    .venv/bin/python -m bench.restore_bench --sections pg,redis

Sections (each a module with ``run(quick, workdir) -> dict``, also runnable alone):
``pg`` (``bench.restore_pg``), ``operator`` (``bench.restore_operator``: flow-run fixed
cost, CLI reads), ``fleet`` (``bench.restore_fleet``), ``redis``
(``bench.restore_redis``), ``clickhouse`` (``bench.restore_clickhouse`` on 18.16; its
keys are the top-level ones) and ``clickhouse26`` (the same on 26.x, under
``sections`` only). They run one
after another, each on its own servers, so none disturbs another's timings. Writes
``bench/results/restore.json`` (``restore-quick.json`` with ``--quick``): the issue's
keys at the top level, each section's whole output under ``sections``, host facts, and
the error of a section that failed (the run still writes what the others measured;
exit code 1).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

# name -> (module, keyword arguments of its run(), whether its keys go to the top level)
SECTIONS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "pg": ("bench.restore_pg", {}, True),
    "operator": ("bench.restore_operator", {}, True),
    "fleet": ("bench.restore_fleet", {}, True),
    "redis": ("bench.restore_redis", {}, True),
    "clickhouse": ("bench.restore_clickhouse", {"server_version": "18"}, True),
    "clickhouse26": ("bench.restore_clickhouse", {"server_version": "26"}, False),
}

KEYS = [
    "pg_db_mib",
    "pg_restore_cli_s",
    "pg_raw_stream_restore_s",
    "pg_restore_over_raw_stream",
    "pg_restore_jobs2_s",
    "pg_raw_j2_restore_s",
    "pg_restore_jobs2_over_raw_j2",
    "pg_backup_cli_over_raw",
    "flow_run_fixed_s",
    "cli_list_s",
    "redis_rdb_mib",
    "redis_live_restore_over_load_floor",
    "clickhouse_restore_over_raw_insert",
    "fleet_targets",
    "fleet_wall_s",
    "fleet_overhead_per_run_s",
]


def main(argv: list[str] | None = None) -> int:
    from bench.run import host_facts

    parser = argparse.ArgumentParser(description="strongroom restore benchmarks (issue 19)")
    parser.add_argument("--quick", action="store_true", help="small data, one round")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument(
        "--from-results",
        action="store_true",
        help="assemble restore.json from each section's own last result file "
        "(bench/results/restore-<section>.json, written when a section runs alone) "
        "instead of running the sections; each section's file date is kept",
    )
    args = parser.parse_args(argv)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; known: {', '.join(SECTIONS)}")
    sections: dict[str, Any] = {}
    errors: dict[str, str] = {}
    top: dict[str, Any] = {}
    results_dir = Path(__file__).parent / "results"
    files = {"clickhouse": "restore-clickhouse", "clickhouse26": "restore-clickhouse-26"}
    for name in wanted if args.from_results else []:
        path = (
            results_dir
            / f"{files.get(name, 'restore-' + name)}{'-quick' if args.quick else ''}.json"
        )
        if not path.exists():
            errors[name] = f"no result file {path.name}"
            continue
        result = json.loads(path.read_text())
        result["source_file"] = path.name
        result["source_file_modified"] = dt.datetime.fromtimestamp(
            path.stat().st_mtime, dt.UTC
        ).isoformat()
        sections[name] = result
        if SECTIONS[name][2]:
            top.update({k: v for k, v in result.items() if k in KEYS})
    for name in [] if args.from_results else wanted:
        started = time.monotonic()
        print(f"[restore_bench] section {name}", file=sys.stderr, flush=True)
        try:
            module_name, kwargs, top_level = SECTIONS[name]
            module = importlib.import_module(module_name)
            with tempfile.TemporaryDirectory(prefix=f"strongroom-bench-{name}-") as tmp:
                result = module.run(args.quick, Path(tmp), **kwargs)
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"
            print(f"[restore_bench] section {name} failed: {exc}", file=sys.stderr, flush=True)
            continue
        result["section_wall_s"] = round(time.monotonic() - started, 1)
        sections[name] = result
        if top_level:
            top.update({k: v for k, v in result.items() if k in KEYS})
    document = {
        "benchmark": "restore",
        "quick": args.quick,
        "assembled_from_section_files": args.from_results,
        "finished_at": dt.datetime.now(dt.UTC).isoformat(),
        "host": host_facts(),
        **{k: top.get(k) for k in KEYS},
        "missing_keys": [k for k in KEYS if top.get(k) is None],
        "sections": sections,
        "errors": errors,
    }
    name = "restore-quick.json" if args.quick else "restore.json"
    out = args.output or Path(__file__).parent / "results" / name
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps({k: document[k] for k in KEYS}, indent=2))
    print(f"[restore_bench] wrote {out}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
