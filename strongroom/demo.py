"""``make demo``: the whole loop on embedded defaults, end to end.

``--gauntlet`` (``make demo GAUNTLET=1``) takes the PostgreSQL gauntlet dataset
instead of the sample shop database (``strongroom.demo_gauntlet``).

Starts throwaway database servers with realistic sample data, keeps the
repository in a local folder and Prefect's state in ``.strongroom-demo/``
(Prefect's local API), then per engine: backs up through the Prefect flows,
lists, verifies and restores into a fresh target; then runs a restore drill per
engine (measured RTO and RPO) and writes the compliance report. It prints what
happened (sizes, throughput, row and key comparisons) and stops every server it
started.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

DEMO_DIR = Path(os.environ.get("STRONGROOM_DEMO_DIR", ".strongroom-demo")).resolve()
SAMPLE_MB = int(os.environ.get("STRONGROOM_DEMO_MB", "300"))
REDIS_KEYS = int(os.environ.get("STRONGROOM_DEMO_REDIS_KEYS", "200000"))


CLICKHOUSE_ROWS = int(os.environ.get("STRONGROOM_DEMO_CH_ROWS", "2000000"))

CLICKHOUSE_DEMO_SCHEMA = """
CREATE DATABASE IF NOT EXISTS shop
;CREATE TABLE shop.events (ts DateTime, user_id UInt32, kind LowCardinality(String),
    url String, amount Nullable(Decimal(12, 2)), tags Array(String))
    ENGINE = MergeTree PARTITION BY toYYYYMM(ts) ORDER BY (user_id, ts)
;CREATE TABLE shop.daily (day Date, kind LowCardinality(String), events UInt64)
    ENGINE = SummingMergeTree ORDER BY (day, kind)
;CREATE MATERIALIZED VIEW shop.daily_mv TO shop.daily AS
    SELECT toDate(ts) AS day, kind, count() AS events FROM shop.events
    GROUP BY day, kind
;CREATE VIEW shop.purchases AS SELECT ts, user_id, amount FROM shop.events WHERE kind = 'buy'
;INSERT INTO shop.events SELECT toDateTime('2026-01-01 00:00:00') + intDiv(number * 7, 1),
    cityHash64(number) % 50000, ['view', 'click', 'buy', 'scroll'][number % 4 + 1],
    concat('https://shop.example/p/', toString(cityHash64(number) % 100000)),
    if(number % 4 = 2, toDecimal64((cityHash64(number) % 100000) / 100, 2), NULL),
    [concat('t', toString(number % 13))] FROM system.numbers LIMIT {rows}
"""


def _prefect_env() -> None:
    os.environ.setdefault("PREFECT_HOME", str(DEMO_DIR / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.pop("PREFECT_API_URL", None)  # Prefect's local (ephemeral) API


def _mb(n: float) -> str:
    return f"{n / 1024 / 1024:,.1f} MiB"


class Demo:
    """Shared state of one demo run: console, servers, timings for the summary."""

    def __init__(self, stack: ExitStack) -> None:
        from rich.console import Console
        from rich.table import Table

        self.stack = stack
        # a log file or CI gets a wide console; a terminal keeps its own width
        self.console = Console() if sys.stdout.isatty() else Console(width=140)
        self.summary = Table("engine", "step", "seconds", "figures", title="strongroom demo")
        self.ok = True

    def timed(self, engine: str, step: str, call: Callable[[], Any]) -> Any:
        self.console.rule(f"{engine}: {step}")
        started = time.monotonic()
        result = call()
        self.last_s = time.monotonic() - started
        return result

    def row(self, engine: str, step: str, figures: str) -> None:
        self.summary.add_row(engine, step, f"{self.last_s:.1f}", figures)

    def round_trip(
        self,
        engine: str,
        target: str,
        *,
        backup_figures: Callable[[dict[str, Any]], str],
        restore_step: str,
        restore_args: dict[str, Any],
        restore_figures: Callable[[dict[str, Any]], str],
    ) -> None:
        """Back up ``target`` through its engine's flow, verify the backup, restore it
        (``restore_args`` for the restore flow) and print the engine's checks; the
        demo fails unless the verify and the restore's checks pass."""
        from flows.by_engine import backup_flow, restore_flow
        from flows.verify import verify_backup_flow
        from strongroom.cli.common import print_summary
        from strongroom.engines.registry import get_engine

        manifest = self.timed(engine, "backup", lambda: backup_flow(engine)(target=target))
        self.row(engine, "backup", backup_figures(manifest))
        backup_id = manifest["backup_id"]
        verify = self.timed(
            engine,
            "verify",
            lambda: verify_backup_flow(backup_id=backup_id, engine=engine, target=target),
        )
        self.row(engine, "verify", f"{len(verify['artifacts'])} artifacts, ok={verify['ok']}")
        report = self.timed(
            engine,
            restore_step,
            lambda: restore_flow(engine)(backup_id=backup_id, **restore_args),
        )
        summary = get_engine(engine).restore_summary(report)
        print_summary(summary, console=self.console)
        self.row(engine, "restore", restore_figures(report))
        self.ok &= bool(verify["ok"] and summary.ok)


def _throughput(demo: Demo, manifest: dict[str, Any], what: str) -> str:
    """``dump 1.0 MiB -> stored 0.4 MiB (40%), 120 MiB/s`` for a backup just timed."""
    from strongroom.catalog import artifact_totals

    raw, stored = artifact_totals(manifest)
    return (
        f"{what} {_mb(raw)} -> stored {_mb(stored)} ({stored / max(raw, 1):.0%}), "
        f"{raw / 1024 / 1024 / max(demo.last_s, 1e-3):,.0f} MiB/s"
    )


def _redis_figures(manifest: dict[str, Any]) -> str:
    keyspace = manifest["details"].get("keyspace", {})
    keys = sum(v.get("keys", 0) for v in keyspace.values())
    stored = sum(a["stored_size"] for a in manifest["artifacts"])
    return f"{manifest['details'].get('method')} snapshot, {keys:,} keys, stored {_mb(stored)}"


def _setup_common() -> None:
    from pydantic import SecretStr
    from pyrage import x25519

    from blocks import BackupRepository, EncryptionKey, SigningKey, register_all
    from strongroom.signing import key_file_signer

    register_all()
    identity = x25519.Identity.generate()
    EncryptionKey(recipients=[str(identity.to_public())], identity=SecretStr(str(identity))).save(
        "default", overwrite=True
    )
    key_file = DEMO_DIR / "age-identity.txt"
    key_file.write_text(str(identity) + "\n")
    key_file.chmod(0o600)
    signer = key_file_signer(DEMO_DIR / "signing-key.pem")
    BackupRepository(
        local_path=str(DEMO_DIR / "repository"),
        trusted_signers=[signer.public.pem()],
        signing_key=SigningKey(private_key=signer.private_pem()),
    ).save("default", overwrite=True)


def _postgres(demo: Demo) -> tuple[str, str]:
    import psycopg
    from pydantic import SecretStr

    from blocks import PostgresTarget
    from strongroom.sample_data import load_sample_data
    from strongroom.sandbox.postgres import PostgresServer

    pg = demo.stack.enter_context(PostgresServer())
    pg.create_database("shop")
    with psycopg.connect(pg.dsn("shop"), autocommit=True) as conn:
        counts = load_sample_data(conn, SAMPLE_MB)
        size = conn.execute("SELECT pg_database_size('shop')").fetchone()
    demo.console.print(
        f"PostgreSQL 15 on 127.0.0.1:{pg.port}: {sum(counts.values()):,} rows in "
        f"{len(counts)} tables, database {_mb(size[0] if size else 0)}"
    )
    PostgresTarget(
        host=pg.host,
        port=pg.port,
        user=pg.superuser,
        password=SecretStr(pg.password),
        databases=["shop"],
        rpo_hours=24,
        rto_minutes=30,
    ).save("demo-pg", overwrite=True)

    demo.round_trip(
        "postgresql",
        "demo-pg",
        backup_figures=lambda m: _throughput(demo, m, "dump"),
        restore_step="restore into shop_restored",
        restore_args={"target": "demo-pg", "target_database": "shop_restored"},
        restore_figures=lambda r: f"rows match manifest: {r['rows_ok']}",
    )
    return "postgresql", "demo-pg"


def _load_redis(host: str, port: int, password: str, keys: int) -> None:
    import redis

    client = redis.Redis(host=host, port=port, password=password)
    pipe = client.pipeline(transaction=False)
    for i in range(keys):
        kind = i % 5
        if kind == 0:
            pipe.set(f"session:{i}", os.urandom(24).hex(), ex=86_400)
        elif kind == 1:
            pipe.hset(f"user:{i}", mapping={"name": f"user {i}", "plan": "pro", "n": i})
        elif kind == 2:
            pipe.rpush(f"queue:{i % 500}", f"job-{i}")
        elif kind == 3:
            pipe.zadd("leaderboard", {f"player:{i}": i % 1000})
        else:
            pipe.set(f"cache:{i}".encode(), os.urandom(64))
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()
    client.close()


def _redis(demo: Demo) -> tuple[str, str]:
    from pydantic import SecretStr

    from blocks import RedisTarget
    from strongroom.sandbox.redis import RedisServer

    source = demo.stack.enter_context(RedisServer())
    spare = demo.stack.enter_context(RedisServer())
    _load_redis(source.host, source.port, source.password, REDIS_KEYS)
    demo.console.print(f"Redis on 127.0.0.1:{source.port}: {REDIS_KEYS:,} writes of 5 key types")
    for name, server in (("demo-redis", source), ("demo-redis-copy", spare)):
        RedisTarget(
            host=server.host,
            port=server.port,
            password=SecretStr(server.password),
            rpo_hours=24,
            rto_minutes=15,
        ).save(name, overwrite=True)
    demo.round_trip(
        "redis",
        "demo-redis",
        backup_figures=_redis_figures,
        restore_step="restore (live) into a second server",
        restore_args={"target": "demo-redis-copy", "source_target": "demo-redis"},
        restore_figures=lambda r: (
            f"{sum(c.get('restored') or 0 for c in r['key_checks']):,} keys; counts match: "
            f"{r['keys_ok']}, sampled values match: {r['sample']['ok']}"
        ),
    )
    RedisTarget.delete("demo-redis-copy")  # a restore destination, not a target to audit
    return "redis", "demo-redis"


def _clickhouse(demo: Demo) -> tuple[str, str]:
    from blocks import ClickHouseTarget
    from strongroom.engines.clickhouse.capabilities import capabilities
    from strongroom.engines.clickhouse.conn import ClickHouseConnection
    from strongroom.engines.clickhouse.http_client import ClickHouseHTTP
    from strongroom.sandbox.clickhouse import ClickHouseServer

    server = demo.stack.enter_context(ClickHouseServer())
    client = ClickHouseHTTP(ClickHouseConnection(name="demo", http_port=server.http_port))
    settings = capabilities(client).ddl_settings
    for statement in CLICKHOUSE_DEMO_SCHEMA.format(rows=CLICKHOUSE_ROWS).split("\n;"):
        client.execute(statement, settings=settings)
    demo.console.print(
        f"ClickHouse 18.16 on 127.0.0.1:{server.http_port}: {CLICKHOUSE_ROWS:,} events "
        "(partitioned MergeTree), a materialized view and its target, a view"
    )
    ClickHouseTarget(
        host=server.host,
        port=server.tcp_port,
        http_port=server.http_port,
        databases=["shop"],
        rpo_hours=24,
        rto_minutes=30,
    ).save("demo-ch", overwrite=True)
    demo.round_trip(
        "clickhouse",
        "demo-ch",
        backup_figures=lambda m: (
            f"{len(m['artifacts'])} artifacts, " + _throughput(demo, m, "Native")
        ),
        restore_step="restore into shop_restored",
        restore_args={"target": "demo-ch", "target_database": "shop_restored"},
        restore_figures=lambda r: f"fingerprints match: {r['fingerprints_ok']}",
    )
    return "clickhouse", "demo-ch"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    unknown = [a for a in args if a != "--gauntlet"]
    if unknown:
        print(f"usage: python -m strongroom.demo [--gauntlet]; unknown: {' '.join(unknown)}")
        return 2
    gauntlet = "--gauntlet" in args
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    # Each run makes a new age identity, so it starts from an empty repository: backups
    # of an earlier run could not be decrypted (and deep verify would rightly fail).
    for leftover in ("repository", "reports"):
        shutil.rmtree(DEMO_DIR / leftover, ignore_errors=True)
    _prefect_env()
    started = time.monotonic()
    with ExitStack() as stack:
        demo = Demo(stack)
        demo.console.rule("[bold]strongroom demo")
        _setup_common()
        if gauntlet:
            from strongroom.demo_gauntlet import postgres_gauntlet

            targets = [postgres_gauntlet(demo), _clickhouse(demo), _redis(demo)]
        else:
            targets = [_postgres(demo), _clickhouse(demo), _redis(demo)]

        from rich.table import Table

        from flows.audit import write_compliance_report
        from strongroom.catalog import Catalog
        from strongroom.demo_drills import demo_drills
        from strongroom.repository.local import LocalRepository
        from strongroom.signing import Trust, key_file_signer

        demo.console.rule("catalog (strongroom list)")
        listing = Table("backup id", "engine", "target", "raw", "stored")
        public = key_file_signer(DEMO_DIR / "signing-key.pem").public
        demo_repo = LocalRepository(DEMO_DIR / "repository", trust=Trust((public,)))
        for m in Catalog(demo_repo).list():
            listing.add_row(m.backup_id, m.engine, m.target, _mb(m.raw_size), _mb(m.stored_size))
        demo.console.print(listing)

        demo.console.rule("restore drills (flow restore-drill)")
        records = demo_drills(targets, console=demo.console)
        demo.ok &= all(r["ok"] for r in records)

        from flows.deep_verify import deep_verify_flow

        verified = demo.timed("all", "deep verify", deep_verify_flow)
        demo.row(
            "all", "deep verify", f"{verified['verified']} backups re-read, ok={verified['ok']}"
        )

        demo.console.rule("compliance audit (flow compliance-audit)")
        report_path, cs = write_compliance_report(output_dir=DEMO_DIR / "reports")
        demo.console.print(demo.summary)
        demo.console.print(f"compliance report: {report_path}")
        failed = f" (failed: {', '.join(cs['failed'])})" if cs["failed"] else ""
        demo.console.print(
            f"controls: {cs['pass']} pass, {cs['warn']} warn, {cs['fail']} fail{failed}; "
            "a local folder cannot enforce object lock or versioning: use an S3 repository "
            "with object lock for a clean audit"
        )
        demo.console.print(
            f"repository {DEMO_DIR / 'repository'}; age identity {DEMO_DIR / 'age-identity.txt'}"
        )
    demo.console.print(f"done in {time.monotonic() - started:.0f} s; throwaway servers stopped")
    return 0 if demo.ok else 1


if __name__ == "__main__":
    sys.exit(main())
