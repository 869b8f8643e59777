"""The Grafana dashboard (deployments/grafana/strongroom-dashboard.json) against what
the exporter really serves: a repository with backups, a failed run, WAL, a drill and a
compliance report is scraped over HTTP, and every panel query and template variable is
parsed as PromQL; each metric it selects must be in the scrape, with the labels it
matches on or groups by. Every exported metric must appear on some panel."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import promql_parser
import pytest
from prometheus_client.parser import text_string_to_metric_families

from strongroom.audit import record_event
from strongroom.compliance import TargetPolicy, evaluate, write_report
from tests.fixtures.strongroom_fixtures import make_local_repo, scrape_exporter
from tests.test_compliance import add_backup, add_drill, add_wal

DASHBOARD = Path(__file__).resolve().parents[1] / "deployments/grafana/strongroom-dashboard.json"
VARIABLES = {"$engine": ".*", "$target": ".*", "${datasource}": "prometheus"}

Scrape = dict[str, set[str]]  # sample name -> the label names its samples carry


@pytest.fixture(scope="module")
def scrape(tmp_path_factory: Any) -> Scrape:
    repo = make_local_repo(tmp_path_factory.mktemp("dash") / "repo")
    add_backup(repo, "postgresql", "shop", hours_ago=1, stored_size=4321, audit=True)
    add_backup(repo, "redis", "cache", hours_ago=2, stored_size=77)
    record_event(
        repo,
        action="backup",
        engine="postgresql",
        target="shop",
        backup_id=None,
        result="failure",
        details={"error": "pg_dump exited 1"},
    )
    add_drill(repo, "postgresql", "shop", days_ago=1, rto_s=321.5)
    add_wal(repo, "shop", [1, 2, 3])
    write_report(repo, evaluate(repo, targets=[TargetPolicy(engine="postgresql", target="shop")]))
    text = scrape_exporter(repo)
    found: Scrape = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("strongroom_") and not sample.name.endswith("_created"):
                found.setdefault(sample.name, set()).update(sample.labels)
    return found


def _queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and query variable, variables filled in."""
    out = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            out.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"]
            inner = query.removeprefix("label_values(").removesuffix(")")
            selector, _, label = inner.rpartition(",")
            out.append((f"variable {var['name']}", f"group by ({label.strip()}) ({selector})"))
    filled = []
    for where, expr in out:
        for name, value in VARIABLES.items():
            expr = expr.replace(name, value)
        filled.append((where, expr))
    return filled


def _selectors(node: Any) -> list[tuple[Any, list[str]]]:
    """Every vector selector under ``node`` with the labels grouped by above it."""
    if isinstance(node, promql_parser.VectorSelector):
        return [(node, [])]
    if isinstance(node, promql_parser.MatrixSelector):
        return _selectors(node.vector_selector)
    if isinstance(node, promql_parser.AggregateExpr):
        inner = _selectors(node.expr)
        grouped = list(node.modifier.labels) if node.modifier is not None else []
        if node.modifier is not None and str(node.modifier.type).lower().endswith("without"):
            grouped = []
        return [(sel, [*labels, *grouped]) for sel, labels in inner]
    if isinstance(node, promql_parser.BinaryExpr):
        return _selectors(node.lhs) + _selectors(node.rhs)
    if isinstance(node, promql_parser.Call):
        return [found for arg in node.args for found in _selectors(arg)]
    if isinstance(node, promql_parser.ParenExpr | promql_parser.UnaryExpr):
        return _selectors(node.expr)
    if isinstance(node, promql_parser.SubqueryExpr):
        return _selectors(node.expr)
    return []  # literals


def problems(queries: list[tuple[str, str]], scrape: Scrape) -> list[str]:
    """What in ``queries`` does not exist in ``scrape`` (empty when the dashboard fits)."""
    found = []
    for where, expr in queries:
        try:
            tree = promql_parser.parse(expr)
        except Exception as exc:  # the parser's own error type is not exported
            found.append(f"{where}: not PromQL ({exc}): {expr}")
            continue
        for selector, grouped in _selectors(tree):
            labels = scrape.get(selector.name)
            if labels is None:
                found.append(f"{where}: no metric {selector.name} in the scrape")
                continue
            wanted = {m.name for m in selector.matchers.matchers} | set(grouped)
            for missing in sorted(wanted - labels):
                found.append(f"{where}: {selector.name} has no label {missing!r}")
    return found


def test_every_query_names_metrics_and_labels_the_exporter_serves(scrape: Scrape) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert problems(_queries(dashboard), scrape) == []


def test_every_exported_metric_is_on_a_panel(scrape: Scrape) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    shown = {
        sel.name
        for _, expr in _queries(dashboard)
        for sel, _ in _selectors(promql_parser.parse(expr))
    }
    assert sorted(set(scrape) - shown) == []


def test_the_checker_catches_a_wrong_name_a_wrong_label_and_bad_syntax(scrape: Scrape) -> None:
    found = problems(
        [
            ("a", "strongroom_backup_age{engine='x'}"),
            ("b", 'sum by (database) (strongroom_backup_age_seconds{target="shop"})'),
            ("c", "rate(strongroom_backup_runs_total[5m"),
        ],
        scrape,
    )
    assert len(found) == 3, found
    assert "no metric strongroom_backup_age " in found[0] + " "
    assert "no label 'database'" in found[1]
    assert "not PromQL" in found[2]


def test_the_layout_is_importable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "strongroom-overview"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24, panel["title"]
        mine = {
            (x, y)
            for x in range(box["x"], box["x"] + box["w"])
            for y in range(box["y"], box["y"] + box["h"])
        }
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
