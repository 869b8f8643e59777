"""The operator path's fixed costs (issue 19, items 4 and 6): a flow run through the
``strongroom`` CLI against a real Prefect server, and the CLI's read commands.

    python -m bench.restore_operator            # 5 timed runs of each command
    python -m bench.restore_operator --quick    # 2 runs: smoke test

A throwaway PostgreSQL with a near-empty database and ``bench.operator_stack`` (a Prefect
server, strongroom's blocks, a local repository); every command is a new process of
``.venv/bin/strongroom`` with ``PREFECT_API_URL`` set. Figures are medians:

- ``flow_run_fixed_s``: ``strongroom backup postgresql TARGET`` minus the raw
  ``pg_dump -Fc -Z0 | zstd -3 -T0 > f`` of the same database;
- ``cli_list_s``, ``cli_show_s``, ``cli_wal_check_s``: the read commands as an operator
  runs them (repository descriptor cached after the first read), with
  ``cli_list_block_s`` (cache off: the block read over one HTTP GET) and
  ``cli_list_url_s`` (``--repository-url file://...``, no Prefect API in the
  environment);
- ``cli_restore_plan_s``: ``strongroom restore postgresql TARGET --into NEW --dry-run``
  (a flow run: it loads the target and key blocks);
- ``cli_help_s`` and ``import_flows_s`` (``python -c "import flows.postgres"``: what
  importing Prefect costs every flow run), for the breakdown.

Writes ``bench/results/restore-operator.json`` (``--quick``: ``restore-operator-quick.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.operator_stack import OperatorStack, operator_stack
from strongroom.sandbox.postgres import PostgresServer

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DATABASE = "tiny"
TARGET = "tiny"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _raw_backup(pg: PostgresServer, out: Path) -> float:
    """``pg_dump -Fc -Z0 | zstd -3 -T0 > out`` (two processes, no shell): wall seconds."""
    started = time.perf_counter()
    with out.open("wb") as sink:
        dump = subprocess.Popen(
            [str(pg.bin_dir / "pg_dump"), "-Fc", "-Z0"],
            stdout=subprocess.PIPE,
            env=pg.libpq_env(DATABASE),
        )
        zstd = subprocess.Popen(["zstd", "-3", "-T0", "-q", "-c"], stdin=dump.stdout, stdout=sink)
        assert dump.stdout is not None
        dump.stdout.close()
        zrc, drc = zstd.wait(), dump.wait()
    elapsed = time.perf_counter() - started
    if drc or zrc or out.stat().st_size == 0:
        raise RuntimeError(f"raw pipeline failed: pg_dump {drc}, zstd {zrc}")
    return elapsed


CPU: dict[str, list[float]] = {}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(
    stack: OperatorStack,
    *args: str,
    env: dict[str, str | None] | None = None,
    command: list[str] | None = None,
    ok: tuple[int, ...] = (0,),
) -> float:
    """Wall seconds of one CLI process; its CPU seconds go to ``CPU[args[0]]``."""
    cpu = _children_cpu()
    elapsed, result = stack.timed_cli(*args, env=env, command=command)
    CPU.setdefault(("baseline " if command else "") + args[0], []).append(
        round(_children_cpu() - cpu, 3)
    )
    if result.returncode not in ok:
        raise RuntimeError(
            f"strongroom {' '.join(args)} exited {result.returncode}:\n"
            f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        )
    return elapsed


def _median(samples: list[float]) -> float:
    return round(statistics.median(samples), 3)


def _process_s(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, check=True, capture_output=True, cwd=Path(__file__).parents[1])
    return time.perf_counter() - started


def measure(
    stack: OperatorStack, pg: PostgresServer, repeats: int, baseline: list[str] | None = None
) -> dict[str, Any]:
    """Medians over ``repeats`` rounds; with ``baseline`` (another checkout's CLI), its
    backup, list, show and restore plan in the same rounds (``baseline_*``)."""
    samples: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        samples.setdefault(key, []).append(round(value, 3))

    raw_out = stack.workdir / "raw.dump.zst"
    log("warm-up: one CLI backup and one raw pipeline (untimed)")
    _timed(stack, "backup", "postgresql", TARGET)
    if baseline:
        _timed(stack, "backup", "postgresql", TARGET, command=baseline)
    _raw_backup(pg, raw_out)
    for i in range(repeats):
        log(f"round {i + 1}/{repeats}: backup through the CLI and the raw pipeline")
        # alternate the order so that neither always runs right after the other
        if i % 2:
            add("raw_backup_s", _raw_backup(pg, raw_out))
            add("cli_backup_s", _timed(stack, "backup", "postgresql", TARGET))
        else:
            add("cli_backup_s", _timed(stack, "backup", "postgresql", TARGET))
            add("raw_backup_s", _raw_backup(pg, raw_out))
        if baseline:
            add(
                "baseline_backup_s", _timed(stack, "backup", "postgresql", TARGET, command=baseline)
            )
    trust = stack.workdir / "trusted.pem"
    trust.write_text(stack.signer.public.pem())
    url = stack.repository.resolve().as_uri()
    into = f"{DATABASE}_plan"
    for i in range(repeats):
        log(f"round {i + 1}/{repeats}: read commands and the restore plan")
        add("cli_list_s", _timed(stack, "list"))
        add("cli_show_s", _timed(stack, "show", "latest"))
        add("cli_wal_check_s", _timed_wal_check(stack))
        add("cli_list_block_s", _timed(stack, "list", env={"STRONGROOM_REPOSITORY_CACHE_S": "0"}))
        add(
            "cli_list_url_s",
            _timed(
                stack,
                "list",
                "--repository-url",
                url,
                "--trust",
                str(trust),
                env={"PREFECT_API_URL": None},
            ),
        )
        add(
            "cli_restore_plan_s",
            _timed(stack, "restore", "postgresql", TARGET, "--into", into, "--dry-run"),
        )
        add("cli_help_s", _timed(stack, "--help"))
        if baseline:
            add("baseline_list_s", _timed(stack, "list", command=baseline))
            add("baseline_show_s", _timed(stack, "show", "latest", command=baseline))
            plan = ("restore", "postgresql", TARGET, "--into", into, "--dry-run")
            add("baseline_restore_plan_s", _timed(stack, *plan, command=baseline))
        add(
            "import_flows_s", _process_s([sys.executable, "-c", "import flows.postgres"], stack.env)
        )
    listed = json.loads(stack.cli("list", "--json").stdout)
    medians = {k: _median(v) for k, v in samples.items()}
    return {
        **medians,
        "flow_run_fixed_s": round(medians["cli_backup_s"] - medians["raw_backup_s"], 3),
        "cli_backup_over_raw": round(medians["cli_backup_s"] / medians["raw_backup_s"], 2),
        **(
            {
                "baseline_flow_run_fixed_s": round(
                    medians["baseline_backup_s"] - medians["raw_backup_s"], 3
                )
            }
            if "baseline_backup_s" in medians
            else {}
        ),
        "backups_listed": len(listed),
        "median_cpu_s": {k: _median(v) for k, v in CPU.items()},
        "samples": samples,
    }


def _timed_wal_check(stack: OperatorStack) -> float:
    # no WAL archive here: wal-check reports the gap and exits 4; the read is what is timed
    return _timed(stack, "wal-check", TARGET, ok=(0, 4))


def run(quick: bool, workdir: Path, baseline: Path | None = None) -> dict[str, Any]:
    """The section's figures (see the module docstring); ``baseline``: a checkout whose
    ``.venv/bin/strongroom`` is timed in the same rounds, for a before/after."""
    repeats = 2 if quick else 5
    started = time.monotonic()
    load_before = os.getloadavg()
    with PostgresServer() as pg, operator_stack(workdir / "stack") as stack:
        pg.create_database(DATABASE)
        pg.psql(
            "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'x');", DATABASE
        )
        stack.register_postgres_target(TARGET, pg, DATABASE)
        command = [str(baseline / ".venv" / "bin" / "strongroom")] if baseline else None
        figures = measure(stack, pg, repeats, command)
    return {
        "section": "restore-operator",
        "quick": quick,
        "repeats": repeats,
        "database": "one table, one row (near-empty)",
        "cpus": os.cpu_count(),
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "wall_s": round(time.monotonic() - started, 1),
        "baseline": str(baseline) if baseline else None,
        **figures,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.restore_operator", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2 runs of each command")
    parser.add_argument("--output", type=Path, default=None, help="JSON output path")
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="a checkout (e.g. /work/main) whose .venv/bin/strongroom runs in the same rounds",
    )
    args = parser.parse_args(argv)
    output = args.output or RESULTS_DIR / (
        "restore-operator-quick.json" if args.quick else "restore-operator.json"
    )
    with tempfile.TemporaryDirectory(prefix="strongroom-bench-operator-") as tmp:
        result = run(args.quick, Path(tmp), args.baseline)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    log(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
