"""PostgreSQL file-level incremental backups and (delta) restores, strongroom against
pgBackRest (Debian's 2.45) in the same run: issue 18 item 8.

    python -m bench.pg_incremental_bench            # 2048 MiB, 3 rounds
    python -m bench.pg_incremental_bench --quick    # 200 MiB, 1 round (smoke test)
    python -m bench.pg_incremental_bench --size 1024 --rounds 5
    python -m bench.run --incremental [--quick]     # the same, through bench.run

Writes bench/results/pg-incremental.json (--quick: pg-incremental-quick.json).

One archiving PostgreSQL 15 cluster holds a pgbench database of ``--size`` MiB; its
``archive_command`` pushes every WAL file to both contenders (``strongroom-wal push``
into a local strongroom repository, then ``pgbackrest archive-push``), so both see the
very same cluster and both pay the same archiving. Each round:

1. full backups: ``files_backup_postgres(backup_type="full", jobs=2)`` and
   ``pgbackrest --type=full backup`` (``process-max=2``, zst at strongroom's
   ``RepositoryConfig.compression_level``), in a rotating order;
2. one day of changes: ``UPDATE pgbench_accounts SET abalance = abalance + 1`` on a
   contiguous 5% of the rows (by ``aid``, a different slice each round), ``CHECKPOINT``;
3. incremental backups of both (rotating order); stored bytes are each backup's own
   artifacts (``summary()``) and pgBackRest's ``info`` repository delta;
4. restores of the incrementals, files plus WAL replay up to consistency and promotion:
   ``pitr_restore(recovery_target="immediate", start=True)`` against ``pgbackrest
   restore --type=immediate --target-action=promote`` + ``pg_ctl start`` until the
   server accepts connections; the pgbench tables' fingerprints (rows and a sum of row
   hashes per table) of each restored cluster are compared with the source's;
5. delta restore: a copy restored from the round's full (one day stale) is brought to
   the incremental with ``restore_files_backup(..., delta=True)`` (when strongroom has
   it), timed against restoring the incremental's files into an empty directory; the
   delta-restored tree must equal the fresh one file by file. pgBackRest's
   ``restore --delta`` is measured the same way.

Figures are medians over ``--rounds``. Everything lives in one temporary directory that
is removed at the end. strongroom encrypts (age) and signs; pgBackRest runs without a
repository cipher.
"""

from __future__ import annotations

import argparse
import datetime as dt
import difflib
import hashlib
import importlib.metadata
import json
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench import pgbackrest as pgbr_mod
from bench.cpu import CpuMeter, host_busy_fraction, wait_quiet
from bench.pg_incremental_steps import (
    DATABASE,
    PGBENCH_TABLES,
    Contenders,
    accepts,
    fingerprint_sql,
    pgbench_scale,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MIB = 1024 * 1024
JOBS = 2
CHANGE_SHARE = 0.05


def _log(message: str) -> None:
    print(f"[pg-incr-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.pg_incremental_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--size", type=int, default=None, help="database MiB (2048; quick 200)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (3; quick 1)")
    parser.add_argument("--quick", action="store_true", help="200 MiB, 1 round, -quick.json")
    parser.add_argument("--output", type=Path, default=None, help="JSON result path")
    parser.add_argument(
        "--quiet-timeout",
        type=float,
        default=None,
        help="before each timed step wait up to N s until the host's CPUs are < 15%% busy"
        " (30; quick 5)",
    )
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.size = args.size if args.size is not None else (200 if args.quick else 2048)
    args.rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    if args.size < 20 or args.rounds < 1:
        parser.error("--size must be >= 20 MiB and --rounds >= 1")
    if args.quiet_timeout is None:
        args.quiet_timeout = 5.0 if args.quick else 30.0
    name = "pg-incremental-quick.json" if args.quick else "pg-incremental.json"
    args.output = args.output or RESULTS / name
    return args


def _package(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_head() -> str | None:
    import subprocess

    out = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or None


def _tree_digest(root: Path) -> dict[str, str]:
    """Every file below ``root``: relative path -> sha256 of its bytes and its mode."""
    out: dict[str, str] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            digest = hashlib.sha256()
            if name == "postgresql.auto.conf":
                # pgBackRest's recovery settings carry the restore's time (a comment)
                # and the directory restored into (in restore_command)
                text = path.read_bytes().replace(str(root).encode(), b"<data>")
                lines = text.splitlines(keepends=True)
                digest.update(b"".join(x for x in lines if not x.startswith(b"#")))
            else:
                with path.open("rb") as f:
                    while chunk := f.read(MIB):
                        digest.update(chunk)
            mode = oct(path.stat().st_mode & 0o777)
            out[str(path.relative_to(root))] = f"{digest.hexdigest()} {mode}"
    return out


def _tree_diff(a: Path, b: Path) -> list[str]:
    """The files that differ (or exist on one side only); for a differing ``*.conf``
    its changed lines too (what a tool wrote differently)."""
    da, db = _tree_digest(a), _tree_digest(b)
    out: list[str] = []
    for name in sorted(set(da) | set(db)):
        if da.get(name) == db.get(name):
            continue
        out.append(name)
        if name.endswith(".conf") and name in da and name in db:
            lines = difflib.unified_diff(
                (a / name).read_text(errors="replace").splitlines(),
                (b / name).read_text(errors="replace").splitlines(),
                lineterm="",
                n=0,
            )
            out.extend(f"  {line}" for line in list(lines)[2:12])
    return out


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.c = Contenders(_log, JOBS)
        self.rounds: list[dict[str, Any]] = []

    def sample_guard(self) -> dict[str, float]:
        """os.sync() and a quiet host before a timed step (both outside the timing)."""
        os.sync()
        waited, busy = wait_quiet(0.15, timeout=self.args.quiet_timeout)
        return {"quiet_wait_s": round(waited, 2), "host_busy_before": round(busy, 3)}

    def timed(self, what: str, fn: Any) -> dict[str, Any]:
        guard = self.sample_guard()
        load0 = os.getloadavg()[0]
        host = CpuMeter(None)
        before = host.snapshot()
        t0 = time.perf_counter()
        out = fn() or {}
        wall = time.perf_counter() - t0
        busy = host.delta(before, None)["host_busy_cpu_s"]
        # a step's own "seconds" (without its bookkeeping) wins over the wall time here
        seconds = float(out.get("seconds", wall))
        record = {
            **out,
            "seconds": round(seconds, 3),
            **guard,
            "load_before": round(load0, 2),
            # every process on the host, this benchmark's and the servers' included: a
            # share near 1.0 with little work of our own means a disturbed sample
            "host_busy_share": round(busy / (wall * (os.cpu_count() or 1)), 3),
        }
        _log(f"{what}: {seconds:.2f} s")
        return record

    def one_round(self, r: int) -> dict[str, Any]:
        c = self.c
        rec: dict[str, Any] = {"round": r}
        order = ["strongroom", "pgbackrest"]
        order = order[r % 2 :] + order[: r % 2]
        rec["order"] = order
        for kind in ("full", "incr"):
            if kind == "incr":
                lo, hi = c.change_slice(r, CHANGE_SHARE)
                t0 = time.perf_counter()
                c.change(lo, hi)
                rec["change"] = {
                    "aid_from": lo,
                    "aid_to": hi,
                    "rows": hi - lo + 1,
                    "seconds": round(time.perf_counter() - t0, 3),
                }
                time.sleep(1.1)  # the incrementals' copy start lies in a later second
            for who in order:
                if who == "strongroom":
                    rec[f"sr_{kind}"] = self.timed(
                        f"round {r} strongroom {kind}", lambda k=kind: c.sr_backup(k)
                    )
                else:
                    rec[f"pgbr_{kind}"] = self.timed(
                        f"round {r} pgbackrest {kind}", lambda k=kind: c.pgbr_backup(k)
                    )
        source_fp = c.fingerprint()
        rec["source_fingerprint"] = source_fp
        # restores of the incrementals, files + replay + start
        for who in order:
            if who == "strongroom":
                res = self.timed(
                    f"round {r} strongroom restore",
                    lambda: c.sr_restore(rec["sr_incr"]["backup_id"], r),
                )
            else:
                res = self.timed(
                    f"round {r} pgbackrest restore",
                    lambda: c.pgbr_restore(rec["pgbr_incr"]["label"], r),
                )
            res["fingerprint_identical"] = res.pop("fingerprint") == source_fp
            rec[f"{'sr' if who == 'strongroom' else 'pgbr'}_restore"] = res
        # delta restores: files only, fresh (empty directory) vs onto a one-day-stale copy
        for who in order:
            if who == "strongroom":
                rec["sr_delta"] = self.sr_delta(r, rec)
            else:
                rec["pgbr_delta"] = self.pgbr_delta(r, rec)
        c.end_round()
        return rec

    def sr_delta(self, r: int, rec: dict[str, Any]) -> dict[str, Any]:
        c = self.c
        full_id, incr_id = rec["sr_full"]["backup_id"], rec["sr_incr"]["backup_id"]
        fresh = c.work / f"sr-fresh-{r}"
        out: dict[str, Any] = {
            "fresh": self.timed(
                f"round {r} strongroom files restore (empty dir)",
                lambda: c.sr_files(incr_id, fresh),
            )
        }
        if not accepts(c.restore_files_backup, "delta"):
            out["delta"] = None
            out["reason"] = "restore_files_backup has no delta parameter in this strongroom"
            shutil.rmtree(fresh, ignore_errors=True)
            return out
        stale = c.work / f"sr-stale-{r}"
        c.sr_files(full_id, stale)  # the one-day-stale copy, untimed
        out["delta"] = self.timed(
            f"round {r} strongroom delta restore", lambda: c.sr_files(incr_id, stale, delta=True)
        )
        diff = _tree_diff(fresh, stale)
        out["identical_to_fresh"] = not diff
        out["differences"] = diff[:40]
        shutil.rmtree(fresh, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)
        return out

    def pgbr_delta(self, r: int, rec: dict[str, Any]) -> dict[str, Any]:
        c = self.c
        full, incr = rec["pgbr_full"]["label"], rec["pgbr_incr"]["label"]
        fresh = c.work / f"pgbr-fresh-{r}"
        stale = c.work / f"pgbr-stale-{r}"
        out: dict[str, Any] = {
            "fresh": self.timed(
                f"round {r} pgbackrest files restore (empty dir)", lambda: c.pgbr_files(incr, fresh)
            )
        }
        c.pgbr_files(full, stale)
        out["delta"] = self.timed(
            f"round {r} pgbackrest delta restore", lambda: c.pgbr_files(incr, stale, delta=True)
        )
        diff = _tree_diff(fresh, stale)
        out["identical_to_fresh"] = not diff
        out["differences"] = diff[:40]
        shutil.rmtree(fresh, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)
        return out

    def run(self) -> dict[str, Any]:
        args = self.args
        started = dt.datetime.now(dt.UTC)
        scale = pgbench_scale(args.size)
        self.c.setup(scale)
        db_bytes = int(self.c.src.psql(f"SELECT pg_database_size('{DATABASE}')"))
        cluster_bytes = int(self.c.src.psql("SELECT sum(pg_database_size(oid)) FROM pg_database"))
        _log(f"database {db_bytes / MIB:.0f} MiB (pgbench scale {scale})")
        for r in range(args.rounds):
            self.rounds.append(self.one_round(r))
        return self.summarize(started, scale, db_bytes, cluster_bytes)

    def summarize(
        self, started: dt.datetime, scale: int, db_bytes: int, cluster_bytes: int
    ) -> dict[str, Any]:
        rounds = self.rounds

        def med(path: str) -> float | None:
            values = []
            for rec in rounds:
                value: Any = rec
                for part in path.split("."):
                    value = value.get(part) if isinstance(value, dict) else None
                if isinstance(value, int | float) and not isinstance(value, bool):
                    values.append(float(value))
            return round(statistics.median(values), 4) if values else None

        def ratio(a: float | None, b: float | None) -> float | None:
            return round(a / b, 4) if a is not None and b else None

        def per_round(num: str, den: str) -> float | None:
            values = []
            for rec in rounds:
                a, b = _get(rec, num), _get(rec, den)
                if a is not None and b:
                    values.append(a / b)
            return round(statistics.median(values), 4) if values else None

        delta_ok = all(rec["sr_delta"].get("delta") is not None for rec in rounds)
        fingerprints = all(
            rec["sr_restore"]["fingerprint_identical"]
            and rec["pgbr_restore"]["fingerprint_identical"]
            for rec in rounds
        )
        full_s, pgbr_full_s = med("sr_full.seconds"), med("pgbr_full.seconds")
        restore_s, pgbr_restore_s = med("sr_restore.seconds"), med("pgbr_restore.seconds")
        result: dict[str, Any] = {
            "benchmark": "pg-incremental",
            "date": started.isoformat(timespec="seconds"),
            "duration_s": round((dt.datetime.now(dt.UTC) - started).total_seconds(), 1),
            "command": "python -m bench.pg_incremental_bench " + " ".join(self.args.argv),
            "quick": self.args.quick,
            "config": {
                "size_mib": self.args.size,
                "rounds": self.args.rounds,
                "quiet_threshold": 0.15,
                "quiet_timeout_s": self.args.quiet_timeout,
            },
            "rounds": len(rounds),
            "db_mib": round(db_bytes / MIB, 1),
            "cluster_mib": round(cluster_bytes / MIB, 1),
            "pgbench_scale": scale,
            "changed_share": CHANGE_SHARE,
            "full_s": full_s,
            "pgbackrest_full_s": pgbr_full_s,
            "full_over_pgbackrest": per_round("sr_full.seconds", "pgbr_full.seconds"),
            "full_stored_bytes": med("sr_full.stored_bytes"),
            "pgbackrest_full_stored_bytes": med("pgbr_full.stored_bytes"),
            "incr_s": med("sr_incr.seconds"),
            "incr_stored_bytes": med("sr_incr.stored_bytes"),
            "incr_after_5pct_stored_over_full": per_round(
                "sr_incr.stored_bytes", "sr_full.stored_bytes"
            ),
            "incr_after_5pct_time_over_full": per_round("sr_incr.seconds", "sr_full.seconds"),
            "pgbackrest_incr_s": med("pgbr_incr.seconds"),
            "pgbackrest_incr_stored_bytes": med("pgbr_incr.stored_bytes"),
            "pgbackrest_incr_stored_over_full": per_round(
                "pgbr_incr.stored_bytes", "pgbr_full.stored_bytes"
            ),
            "pgbackrest_incr_time_over_full": per_round("pgbr_incr.seconds", "pgbr_full.seconds"),
            "incr_over_pgbackrest_incr": per_round("sr_incr.seconds", "pgbr_incr.seconds"),
            "restore_s": restore_s,
            "pgbackrest_restore_s": pgbr_restore_s,
            "restore_over_pgbackrest": per_round("sr_restore.seconds", "pgbr_restore.seconds"),
            "restore_files_s": med("sr_delta.fresh.seconds"),
            "delta_restore_s": med("sr_delta.delta.seconds") if delta_ok else None,
            "delta_restore_over_full_restore": (
                per_round("sr_delta.delta.seconds", "sr_delta.fresh.seconds") if delta_ok else None
            ),
            "delta_restore_identical": (
                all(rec["sr_delta"]["identical_to_fresh"] for rec in rounds) if delta_ok else None
            ),
            "pgbackrest_restore_files_s": med("pgbr_delta.fresh.seconds"),
            "pgbackrest_delta_restore_s": med("pgbr_delta.delta.seconds"),
            "pgbackrest_delta_restore_over_full_restore": per_round(
                "pgbr_delta.delta.seconds", "pgbr_delta.fresh.seconds"
            ),
            "fingerprints_identical": fingerprints,
        }
        if not delta_ok:
            result["delta_restore_reason"] = rounds[0]["sr_delta"].get("reason")
        result["goals"] = _goals(result)
        result.update(
            {
                "settings": self.c.settings(JOBS),
                # strongroom runs in this process (PostgreSQL, pgBackRest, pgbench are
                # children): its peak resident memory over every backup and restore,
                # to compare across database sizes (bounded memory)
                "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "host": {
                    "cpu_count": os.cpu_count(),
                    "cpu_affinity": len(os.sched_getaffinity(0)),
                    "load_at_end": os.getloadavg()[0],
                    "busy_at_end": round(host_busy_fraction(0.5), 3),
                },
                "versions": {
                    "python": sys.version.split()[0],
                    "strongroom": _package("strongroom"),
                    "strongroom_commit": _git_head(),
                    "postgres": self.c.src.psql("SHOW server_version"),
                    "pgbackrest": pgbr_mod.version(),
                },
                "fingerprint_sql": fingerprint_sql(PGBENCH_TABLES),
                "notes": [
                    "seconds are wall time; backups: from the call/command to its return "
                    "(start checkpoint, copy, stop, WAL archived); strongroom's run in this "
                    "process, pgBackRest as its command",
                    "restore_s / pgbackrest_restore_s: the incremental restored into an empty "
                    "directory, WAL replayed to consistency (recovery_target immediate), "
                    "server promoted and accepting connections",
                    "delta_restore_over_full_restore: files only (no replay); the incremental "
                    "onto a copy restored from the round's full, over the incremental into an "
                    "empty directory",
                    "the archive_command pushes every WAL file to both repositories, so both "
                    "contenders' backups wait on the same archiving",
                    "strongroom encrypts (age) every artifact; pgBackRest runs without a cipher",
                    "autovacuum=off: no background writes between backups",
                ],
                "rounds_detail": rounds,
            }
        )
        return result

    def cleanup(self) -> None:
        self.c.cleanup()


def _get(rec: dict[str, Any], path: str) -> float | None:
    value: Any = rec
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _goals(r: dict[str, Any]) -> dict[str, Any]:
    """Issue 18's 'done when' thresholds (meant for the 2 GB run)."""

    def at_most(key: str, limit: float) -> dict[str, Any]:
        value = r.get(key)
        return {"value": value, "limit": limit, "met": value is not None and value <= limit}

    return {
        "incr_after_5pct_stored_over_full": at_most("incr_after_5pct_stored_over_full", 0.10),
        "incr_after_5pct_time_over_full": at_most("incr_after_5pct_time_over_full", 0.30),
        "full_over_pgbackrest": at_most("full_over_pgbackrest", 1.0),
        "delta_restore_over_full_restore": at_most("delta_restore_over_full_restore", 0.50),
        "fingerprints_identical": {
            "value": r["fingerprints_identical"],
            "met": r["fingerprints_identical"],
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reason = pgbr_mod.available()
    if reason is not None:
        print(f"pgBackRest is needed: {reason}", file=sys.stderr)
        return 2
    bench = Bench(args)
    try:
        result = bench.run()
    finally:
        bench.cleanup()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    shown = {
        k: v for k, v in result.items() if k not in ("rounds_detail", "notes", "fingerprint_sql")
    }
    print(json.dumps(shown, indent=2))
    print(f"\nresults: {args.output}")
    ok = result["fingerprints_identical"] and result["delta_restore_identical"] is not False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
