"""PITR drills (strongroom.drills.pitr): base backup + WAL recovered to a point in a
throwaway cluster, checked, RTO and RPO measured against the live source, the signed
record in the compliance report. Real PostgreSQL with archive_command (test_pitr's
cluster), the real strongroom-wal fetch path, the real audit evaluation.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pyrage import x25519

from strongroom.compliance.evaluate import evaluate
from strongroom.compliance.model import TargetPolicy
from strongroom.drills import DrillFailed, Objectives, list_drills, load_drill
from strongroom.drills.pitr import measure_rpo, run_pitr_drill
from strongroom.engines.postgres.pitr.basebackup import base_backup_postgres
from strongroom.sandbox._process import make_temp_dir, remove_dir
from tests.test_pitr import Cluster, _cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    root = make_temp_dir("drillpitr")
    c = _cluster(root, "pgdrill", x25519.Identity.generate())
    try:
        # no autovacuum: an ANALYZE between the drill's reference and its restore would
        # assign a transaction id the drill rightly counts as not recovered
        c.sql("ALTER SYSTEM SET autovacuum = off")
        c.sql("SELECT pg_reload_conf()")
        c.sql("CREATE TABLE t (x int, at timestamptz DEFAULT clock_timestamp())")
        c.sql("INSERT INTO t VALUES (1)")
        base_backup_postgres(c.conn, c.repo, c.repo_config, c.enc)
        yield c
    finally:
        c.server.stop()
    remove_dir(root)


def _drill(c: Cluster, **kw: Any) -> dict[str, Any]:
    return run_pitr_drill(
        c.repo,
        c.repo_config,
        c.enc,
        target=c.target,
        wait_timeout_s=120,
        **kw,
    )


def test_drill_to_latest_recovers_every_archived_commit(cluster: Cluster) -> None:
    c = cluster
    c.sql("INSERT INTO t SELECT g FROM generate_series(2, 500) g")
    c.switch_and_wait()
    record = _drill(
        c,
        source=c.conn,
        verify_query="SELECT count(*) FROM t",
        verify_expect="500",
        objectives=Objectives(rto_minutes=10, rpo_hours=1),
    )
    assert record["ok"], record["failures"]
    assert record["kind"] == "pitr" and record["restored"] is True
    assert record["rpo"] == {
        "rpo_s": 0.0,
        "lost_xids": 0,
        "basis": "every assigned transaction recovered",
    }
    assert isinstance(record["rto_s"], float) and record["rto_s"] > 0
    checks = {(ch["check"], ch["item"]): ch for ch in record["checks"]}
    assert checks[("verification query", "postgres")]["ok"]
    assert checks[("database answers", "postgres")]["ok"]
    assert record["cleanup"]["ok"]
    stored = load_drill(c.repo, "postgresql", c.target, str(record["drill_id"]))  # signed
    assert stored["kind"] == "pitr" and stored["rpo_s"] == 0.0


def test_drill_to_a_time_stops_there_and_measures_the_gap(cluster: Cluster) -> None:
    c = cluster
    c.sql("INSERT INTO t VALUES (1001)")
    time.sleep(0.5)
    point = dt.datetime.fromisoformat(c.sql("SELECT now()"))
    time.sleep(0.5)
    c.sql("INSERT INTO t VALUES (1002)")
    c.switch_and_wait()
    record = _drill(
        c,
        recovery_target="time",
        target_time=point,
        verify_query="SELECT max(x) FROM t",
        verify_expect="1001",
    )
    assert record["ok"], record["failures"]
    rpo = record["rpo"]
    assert rpo["basis"] == "target time"
    # the last commit before the point was ~0.5 s before it
    assert 0.3 <= rpo["rpo_s"] <= 5
    target = next(ch for ch in record["checks"] if ch["item"] == "recovery target")
    assert target["ok"]


def test_commits_not_archived_are_measured_as_rpo_and_fail_the_objective(
    cluster: Cluster,
) -> None:
    c = cluster
    c.sql("INSERT INTO t VALUES (2001)")  # never archived: the segment is not complete
    time.sleep(1.0)
    with pytest.raises(DrillFailed, match="RPO") as failed:
        _drill(c, source=c.conn, objectives=Objectives(rpo_hours=0.5 / 3600))
    record = failed.value.record
    assert record["rpo"]["lost_xids"] >= 1
    assert record["rpo"]["basis"] == "drill start"
    assert record["rpo_s"] >= 1.0 and record["rpo_ok"] is False
    assert record["restored"] is True and record["cleanup"]["ok"]
    c.switch_and_wait()


def test_a_bad_point_is_refused_before_anything_runs(cluster: Cluster) -> None:
    from strongroom.errors import InvalidInput

    before = len(list_drills(cluster.repo, "postgresql", cluster.target))
    with pytest.raises(InvalidInput):
        _drill(cluster, recovery_target="time")  # a time target without a time
    assert len(list_drills(cluster.repo, "postgresql", cluster.target)) == before


def test_measure_rpo_bases() -> None:
    t0 = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    recovered = {"next_xid": 10, "last_xact_at": t0.isoformat()}
    later = t0 + dt.timedelta(seconds=3)
    assert measure_rpo({"next_xid": 10}, recovered, started=later, target_time=None)["rpo_s"] == 0
    commit = {"next_xid": 12, "last_commit_at": (t0 + dt.timedelta(seconds=2)).isoformat()}
    got = measure_rpo(commit, recovered, started=later, target_time=None)
    assert got == {"rpo_s": 2.0, "lost_xids": 2, "basis": "source's last commit"}
    assert measure_rpo(None, recovered, started=later, target_time=None)["rpo_s"] == 3.0


def test_the_compliance_report_shows_the_pitr_drill(cluster: Cluster) -> None:
    c = cluster
    policy = TargetPolicy(engine="postgresql", target=c.target, pitr=True, rto_minutes=30)
    report = evaluate(c.repo, targets=[policy])
    control = next(r for r in report.controls if r.id == "SR-DRILL-01")
    found = next(f for f in control.findings if f.data.get("pitr_drill"))
    assert "PITR drill to" in found.message and "RPO" in found.message
    assert found.data["pitr_rpo_s"] is not None and found.data["pitr_rto_s"] > 0
    series = report.series["drills"][f"postgresql/{c.target}"]
    assert any(d["kind"] == "pitr" and d["rpo_s"] is not None for d in series)


def test_the_drill_flow_reads_its_point() -> None:
    from flows.drill import parse_point
    from strongroom.errors import InvalidInput

    assert parse_point("latest") == {"recovery_target": "latest"}
    assert parse_point("0/3000060") == {"recovery_target": "lsn", "target_lsn": "0/3000060"}
    at = parse_point("2026-12-01T10:00:00")
    assert at["recovery_target"] == "time" and at["target_time"].tzinfo is not None
    with pytest.raises(InvalidInput, match="point must be"):
        parse_point("yesterday; DROP TABLE t")
