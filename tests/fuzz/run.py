"""Long coverage-guided fuzz runs (atheris / libFuzzer) of the targets in targets.py.

    python -m tests.fuzz.run all --runs 1000000      # every parser, one process each
    python -m tests.fuzz.run tar --runs 200000       # one parser

Each target runs in its own process with the strongroom modules instrumented for
coverage, its seeds as the starting corpus (in a temporary folder), a per-input time
limit (``--timeout``, libFuzzer reports a hang as a crash) and a memory limit. An input
that raises anything but strongroom's own errors is a crash: libFuzzer writes it as
``crash-<sha1>`` into ``--artifacts`` and the run exits non-zero. ``all`` prints one
JSON line per target with the number of inputs run, the time and the outcome, and a
summary in ``bench/results/fuzz.json`` when ``--record`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
NAMES = ("tar", "native", "rdb", "wal", "manifest")
_DONE = re.compile(r"Done (\d+) runs in (\d+) second")


def _child(name: str, runs: int, timeout: int, artifacts: Path) -> None:
    """Inside the fuzzing process: instrument, load the target, hand over to libFuzzer."""
    import atheris

    with atheris.instrument_imports(include=["strongroom"]):
        from tests.fuzz.targets import ALLOWED, targets

    target, seeds = targets()[name]
    corpus = Path(tempfile.mkdtemp(prefix=f"sr-fuzz-{name}-"))
    for i, seed in enumerate(seeds):
        (corpus / f"seed-{i}").write_bytes(seed)

    def one_input(data: bytes) -> None:
        with contextlib.suppress(ALLOWED):
            target(data)

    argv = [
        sys.argv[0],
        f"-runs={runs}",
        f"-timeout={timeout}",
        "-rss_limit_mb=2048",
        "-max_len=65536",
        f"-artifact_prefix={artifacts}/{name}-",
        "-print_final_stats=1",
        str(corpus),
    ]
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


def _run(name: str, runs: int, timeout: int, artifacts: Path) -> dict[str, object]:
    started = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fuzz.run",
            name,
            "--child",
            f"--runs={runs}",
            f"--timeout={timeout}",
            f"--artifacts={artifacts}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    done = _DONE.search(proc.stderr)
    crashes = sorted(p.name for p in artifacts.glob(f"{name}-*"))
    return {
        "target": name,
        "runs": int(done.group(1)) if done else None,
        "seconds": round(time.monotonic() - started, 1),
        "exit_code": proc.returncode,
        "ok": proc.returncode == 0 and not crashes,
        "findings": crashes,
        "tail": proc.stderr.strip().splitlines()[-12:] if proc.returncode else [],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=(*NAMES, "all"))
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--timeout", type=int, default=10, help="seconds per input")
    parser.add_argument("--artifacts", type=Path, default=ROOT / "bench" / "results" / "fuzz")
    parser.add_argument("--record", action="store_true", help="write bench/results/fuzz.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.artifacts.mkdir(parents=True, exist_ok=True)
    if args.child:
        _child(args.target, args.runs, args.timeout, args.artifacts)
        return 0
    names = NAMES if args.target == "all" else (args.target,)
    results = []
    for name in names:
        result = _run(name, args.runs, args.timeout, args.artifacts)
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.record:
        _record(results)
    return 0 if all(r["ok"] for r in results) else 1


def _record(results: list[dict[str, Any]]) -> None:
    """Merge into bench/results/fuzz.json by target: each target keeps its newest run, so
    the targets can be run one at a time (``run tar --record``, ``run manifest ...``)."""
    out = ROOT / "bench" / "results" / "fuzz.json"
    known: dict[str, dict[str, Any]] = {}
    if out.exists():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            known = {r["target"]: r for r in json.loads(out.read_text())["results"]}
    stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    for result in results:
        known[result["target"]] = {**result, "finished_at": stamp}
    ordered = [known[n] for n in NAMES if n in known]
    out.write_text(json.dumps({"results": ordered}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
