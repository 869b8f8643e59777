"""The HTML compliance report rendered by a real browser (Debian's headless Chromium).

Chromium loads a copy of the report with a small probe script appended; the probe
measures, in the rendered page, every chart's box, its drawn data points (class
``mark``: visible size, inside the chart) and the controls table, and writes the
result into a ``data-render-check`` attribute that ``--dump-dom`` prints. A
screenshot of the untouched report is kept at tests/artifacts/compliance-report.png.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from strongroom.compliance import TargetPolicy, evaluate, write_report
from strongroom.compliance.controls import CONTROL_IDS
from tests.fixtures.strongroom_fixtures import make_local_repo
from tests.test_compliance import RETENTION, TARGETS, add_backup, populate

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
SCREENSHOT = ARTIFACTS / "compliance-report.png"
CHARTS = {"backup-size", "backup-duration", "freshness", "drill-rto"}

PROBE = """
<script>
(function () {
  function box(el) { const b = el.getBoundingClientRect();
    return {left: b.left, right: b.right, top: b.top, bottom: b.bottom,
            w: b.width, h: b.height}; }
  const out = {charts: [], table: null, height: document.documentElement.scrollHeight};
  for (const svg of document.querySelectorAll('svg[data-chart]')) {
    const r = box(svg), cs = getComputedStyle(svg);
    const marks = Array.from(svg.querySelectorAll('.mark')).map(box);
    out.charts.push({
      id: svg.dataset.chart, w: r.w, h: r.h, display: cs.display, visibility: cs.visibility,
      children: svg.childElementCount, marks: marks.length,
      visible: marks.filter(b => b.w > 0 && b.h > 0).length,
      inside: marks.filter(b => b.left >= r.left - 1 && b.right <= r.right + 1 &&
                                b.top >= r.top - 1 && b.bottom <= r.bottom + 1).length,
      lines: svg.querySelectorAll('polyline.series-line').length,
      empty: !!svg.querySelector('text.empty')});
  }
  const t = document.getElementById('controls');
  const rows = Array.from(t.querySelectorAll('tbody tr'));
  const tb = box(t);
  out.table = {w: tb.w, h: tb.h, display: getComputedStyle(t).display, rows: rows.length,
    ids: rows.map(r => r.dataset.control),
    statuses: rows.map(r => r.dataset.status),
    rowHeights: rows.map(r => r.getBoundingClientRect().height),
    cells: rows.map(r => Array.from(r.cells).map(c => c.innerText.trim().length))};
  document.body.setAttribute('data-render-check', JSON.stringify(out));
})();
</script>
"""


def _chromium() -> str:
    path = shutil.which("chromium") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
    )
    if path is None:
        pytest.fail("chromium is not installed: apt-get install chromium (make setup does)")
    return path


def _run_chromium(tmp_path: Path, args: list[str], name: str, timeout: float = 90) -> str:
    """Headless Chromium with a fresh profile; killed (its own process group) on timeout."""
    profile = tmp_path / f"profile-{name}"
    cmd = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--no-default-browser-check",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        *args,
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"chromium did not finish within {timeout} s")
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode(errors="replace")


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture(scope="module")
def report_html(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A report over a realistic repository: two targets with history, drills, WAL, plus
    a stale third target so the freshness chart shows both colours."""
    tmp = tmp_path_factory.mktemp("report")
    repo = make_local_repo(tmp / "repo")
    populate(repo)
    add_backup(repo, "clickhouse", "events", hours_ago=40, stored_size=63_000_000)
    targets = [*TARGETS, TargetPolicy(engine="clickhouse", target="events", rpo_hours=24)]
    report = evaluate(repo, targets=targets, retention=RETENTION)
    paths = write_report(repo, report, local_dir=tmp / "out")
    return Path(paths["html"])


def _probe(report_html: Path, tmp_path: Path) -> dict[str, Any]:
    """Render a copy of the report with the probe script; return what it measured."""
    page = tmp_path / "probe.html"
    page.write_text(report_html.read_text().replace("</body>", PROBE + "</body>"))
    dom = _run_chromium(
        tmp_path,
        ["--window-size=1280,1600", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        "dom",
    )
    match = re.search(r'data-render-check="([^"]*)"', dom)
    assert match, "the probe did not run: " + dom[:500]
    check: dict[str, Any] = json.loads(html.unescape(match.group(1)))
    return check


def test_report_renders_every_chart_and_the_controls_table(
    report_html: Path, tmp_path: Path
) -> None:
    check = _probe(report_html, tmp_path)

    charts = {c["id"]: c for c in check["charts"]}
    assert set(charts) == CHARTS
    for chart_id, c in charts.items():
        assert c["display"] != "none" and c["visibility"] == "visible", c
        assert c["w"] > 300 and c["h"] > 80, c
        assert not c["empty"], f"{chart_id} shows its no-data text"
        assert c["marks"] > 0 and c["visible"] == c["marks"] == c["inside"], c
    # 2 targets x 5 backups + 1: every backup is a point, one line per target
    assert charts["backup-size"]["marks"] == 11 and charts["backup-size"]["lines"] == 2
    assert charts["backup-duration"]["marks"] == 11
    assert charts["freshness"]["marks"] == 3  # one bar per target
    assert charts["drill-rto"]["marks"] == 6  # 3 drills x 2 targets

    table = check["table"]
    assert table["display"] != "none" and table["w"] > 600 and table["h"] > 200
    assert table["rows"] == len(CONTROL_IDS) == len(set(table["ids"]))
    assert set(table["statuses"]) <= {"pass", "warn", "fail"} and "fail" in table["statuses"]
    assert all(h > 20 for h in table["rowHeights"])
    assert all(all(n > 0 for n in cells) for cells in table["cells"]), table["cells"]


def test_report_screenshot_is_kept(report_html: Path, tmp_path: Path) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    gitignore = ARTIFACTS / ".gitignore"
    if not gitignore.exists():
        gitignore.write_text("*\n!.gitignore\n")
    SCREENSHOT.unlink(missing_ok=True)
    height = min(int(_probe(report_html, tmp_path)["height"]) + 8, 8000)  # the whole page
    assert height > 1500
    _run_chromium(
        tmp_path,
        [
            f"--window-size=1280,{height}",
            "--virtual-time-budget=5000",
            f"--screenshot={SCREENSHOT}",
            report_html.as_uri(),
        ],
        "shot",
    )
    assert SCREENSHOT.is_file() and SCREENSHOT.stat().st_size > 50_000
    assert _png_size(SCREENSHOT) == (1280, height)
