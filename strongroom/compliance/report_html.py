"""The compliance report as one self-contained HTML page.

No external assets, no scripts, no CDN: the charts are inline SVG drawn here
(backup size and duration over time per target, freshness against RPO per
target, restore-drill RTO history) and the styles are inline CSS, so the file
can be mailed to an auditor, archived with the evidence, or opened offline.
Every drawn data point is an element with class ``mark`` and carries a
``<title>`` tooltip with its exact value.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from strongroom.compliance.evaluate import ComplianceReport

PALETTE = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#CC79A7",
    "#56B4E9",
    "#D55E00",
    "#7F7F7F",
    "#332288",
)
_SHORT = {"ISO/IEC 27001:2022": "ISO 27001"}
STATUS_COLOURS = {"pass": "#1a7f37", "warn": "#9a6700", "fail": "#cf222e"}
W, H = 560, 300
M_LEFT, M_RIGHT, M_TOP, M_BOTTOM = 70, 18, 18, 46


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _num(x: float) -> str:
    return f"{x:.1f}"


@dataclass
class Point:
    t: dt.datetime
    v: float
    tip: str


@dataclass
class Series:
    name: str
    colour: str
    points: list[Point]


# -------------------------------------------------------------------- scales


def nice_ceiling(value: float) -> float:
    """A round number >= value (1, 2, 2.5, 5 x 10^n)."""
    if value <= 0:
        return 1.0
    exp = math.floor(math.log10(value))
    base = 10**exp
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * base + 1e-12:
            return step * base
    return 10 * base


@dataclass(frozen=True)
class Unit:
    """Display unit of an axis: values are divided by ``scale`` and shown with ``name``."""

    name: str
    scale: float

    def fmt(self, v: float) -> str:
        return _short(v / self.scale)


def size_unit(max_value: float) -> Unit:
    for name, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if max_value >= scale:
            return Unit(name, scale)
    return Unit("B", 1)


def duration_unit(max_value: float) -> Unit:
    if max_value >= 2 * 3600:
        return Unit("hours", 3600)
    if max_value >= 120:
        return Unit("minutes", 60)
    return Unit("seconds", 1)


def _short(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}".rstrip("0").rstrip(".")
    return f"{v:.2f}".rstrip("0").rstrip(".")


def _time_label(t: dt.datetime, span: dt.timedelta) -> str:
    if span <= dt.timedelta(days=2):
        return t.strftime("%m-%d %H:%M")
    if span <= dt.timedelta(days=400):
        return t.strftime("%Y-%m-%d")
    return t.strftime("%Y-%m")


# -------------------------------------------------------------------- charts


def _frame(chart_id: str, title: str, height: int, body: list[str]) -> str:
    return (
        f'<svg class="chart" data-chart="{_e(chart_id)}" role="img" '
        f'aria-label="{_e(title)}" viewBox="0 0 {W} {height}" width="{W}" height="{height}" '
        f'xmlns="http://www.w3.org/2000/svg" preserveAspectRatio="xMidYMid meet">'
        f"<title>{_e(title)}</title>" + "".join(body) + "</svg>"
    )


def _empty(chart_id: str, title: str, why: str) -> str:
    return _frame(
        chart_id,
        title,
        H,
        [
            f'<rect x="0.5" y="0.5" width="{W - 1}" height="{H - 1}" fill="#fafafa" '
            'stroke="#ddd"/>',
            f'<text class="empty" x="{W / 2}" y="{H / 2}" text-anchor="middle" '
            f'fill="#777" font-size="14">{_e(why)}</text>',
        ],
    )


def time_chart(
    chart_id: str,
    title: str,
    series: Sequence[Series],
    unit: Unit,
    references: Sequence[tuple[float, str, str]] = (),
    empty_text: str = "no data",
) -> str:
    """Values over time, one coloured line per series, optional horizontal references
    (value, label, colour) such as an RTO objective."""
    points = [p for s in series for p in s.points]
    if not points:
        return _empty(chart_id, title, empty_text)
    t_min = min(p.t for p in points)
    t_max = max(p.t for p in points)
    if t_max - t_min < dt.timedelta(minutes=1):
        t_min -= dt.timedelta(hours=1)
        t_max += dt.timedelta(hours=1)
    span = t_max - t_min
    top = max([p.v for p in points] + [r[0] for r in references]) / unit.scale
    v_max = nice_ceiling(top * 1.08) * unit.scale
    pw, ph = W - M_LEFT - M_RIGHT, H - M_TOP - M_BOTTOM

    def x(t: dt.datetime) -> float:
        return M_LEFT + (t - t_min) / span * pw

    def y(v: float) -> float:
        return M_TOP + ph - (v / v_max) * ph

    out = [f'<rect x="{M_LEFT}" y="{M_TOP}" width="{pw}" height="{ph}" fill="#fcfcfd"/>']
    for i in range(6):  # y grid and labels
        v = v_max * i / 5
        yy = _num(y(v))
        out.append(
            f'<line x1="{M_LEFT}" x2="{M_LEFT + pw}" y1="{yy}" y2="{yy}" stroke="#e4e4e7"/>'
            f'<text x="{M_LEFT - 6}" y="{yy}" dy="0.32em" text-anchor="end" font-size="11" '
            f'fill="#555">{_e(unit.fmt(v))}</text>'
        )
    for i in range(5):  # x ticks
        t = t_min + span * (i / 4)
        xx = _num(x(t))
        anchor = "start" if i == 0 else "end" if i == 4 else "middle"
        out.append(
            f'<line x1="{xx}" x2="{xx}" y1="{M_TOP + ph}" y2="{M_TOP + ph + 4}" stroke="#999"/>'
            f'<text x="{xx}" y="{M_TOP + ph + 17}" text-anchor="{anchor}" font-size="11" '
            f'fill="#555">{_e(_time_label(t, span))}</text>'
        )
    out.append(
        f'<text x="14" y="{M_TOP + ph / 2}" transform="rotate(-90 14 {M_TOP + ph / 2})" '
        f'text-anchor="middle" font-size="11" fill="#555">{_e(unit.name)}</text>'
    )
    for value, label, colour in references:
        yy = _num(y(value))
        out.append(
            f'<line class="reference" x1="{M_LEFT}" x2="{M_LEFT + pw}" y1="{yy}" y2="{yy}" '
            f'stroke="{colour}" stroke-dasharray="6 4" stroke-width="1.5">'
            f"<title>{_e(label)}</title></line>"
            f'<text x="{M_LEFT + pw - 4}" y="{yy}" dy="-0.4em" text-anchor="end" '
            f'font-size="10" fill="{colour}">{_e(label)}</text>'
        )
    for s in series:
        pts = sorted(s.points, key=lambda p: p.t)
        if len(pts) > 1:
            path = " ".join(f"{_num(x(p.t))},{_num(y(p.v))}" for p in pts)
            out.append(
                f'<polyline class="series-line" points="{path}" fill="none" '
                f'stroke="{s.colour}" stroke-width="2" stroke-linejoin="round"/>'
            )
        for p in pts:
            out.append(
                f'<circle class="mark" cx="{_num(x(p.t))}" cy="{_num(y(p.v))}" r="3.5" '
                f'fill="{s.colour}" stroke="#fff" stroke-width="1"><title>{_e(p.tip)}</title>'
                "</circle>"
            )
    out.append(
        f'<line x1="{M_LEFT}" x2="{M_LEFT + pw}" y1="{M_TOP + ph}" y2="{M_TOP + ph}" '
        'stroke="#888"/>'
        f'<line x1="{M_LEFT}" x2="{M_LEFT}" y1="{M_TOP}" y2="{M_TOP + ph}" stroke="#888"/>'
    )
    return _frame(chart_id, title, H, out)


def freshness_chart(chart_id: str, title: str, rows: Sequence[dict[str, Any]]) -> str:
    """One horizontal bar per target: age of the latest backup as a share of its RPO,
    with the RPO as a dashed line at 100 %."""
    if not rows:
        return _empty(chart_id, title, "no targets")
    bar_h, top, label_w = 22, 26, 170
    # fill the same height as the other charts when there are few targets
    gap = min(max((H - top - 34) / len(rows) - bar_h, 12), 48)
    height = max(int(top + len(rows) * (bar_h + gap) + 34), H)
    ratios = [
        (r["age_hours"] / r["rpo_hours"])
        if r.get("age_hours") is not None and r["rpo_hours"]
        else None
        for r in rows
    ]
    known = [q for q in ratios if q is not None]
    want = max([1.0, *known]) * 1.05
    axis_max = next((m for m in (1.5, 2.0, 3.0, 4.0, 5.0) if m >= want), 5.0)
    x0, pw = label_w, W - label_w - 90

    def x(q: float) -> float:
        return x0 + min(q, axis_max) / axis_max * pw

    out: list[str] = []
    steps = int(axis_max / 0.5)
    for i in range(steps + 1):
        q = 0.5 * i
        xx = _num(x(q))
        out.append(
            f'<line x1="{xx}" x2="{xx}" y1="{top - 6}" y2="{height - 28}" stroke="#eee"/>'
            f'<text x="{xx}" y="{height - 12}" text-anchor="middle" font-size="11" '
            f'fill="#555">{q * 100:.0f}%</text>'
        )
    for i, (row, ratio) in enumerate(zip(rows, ratios, strict=True)):
        y = round(top + gap / 2 + i * (bar_h + gap), 1)
        name = _e(row["target"])
        out.append(
            f'<text x="{x0 - 8}" y="{y + bar_h / 2}" dy="0.32em" text-anchor="end" '
            f'font-size="12" fill="#222">{name}</text>'
        )
        if ratio is None:
            out.append(
                f'<rect class="mark" x="{x0}" y="{y}" width="{pw}" height="{bar_h}" '
                f'fill="{STATUS_COLOURS["fail"]}" fill-opacity="0.15" '
                f'stroke="{STATUS_COLOURS["fail"]}" stroke-dasharray="4 3">'
                f"<title>{name}: no backup (RPO {row['rpo_hours']:g} h)</title></rect>"
                f'<text x="{x0 + 8}" y="{y + bar_h / 2}" dy="0.32em" font-size="11" '
                f'fill="{STATUS_COLOURS["fail"]}">no backup</text>'
            )
            continue
        colour = STATUS_COLOURS["fail"] if ratio > 1 else STATUS_COLOURS["pass"]
        width = max(x(ratio) - x0, 2.0)
        tip = (
            f"{row['target']}: latest backup {row['age_hours']:.1f} h old, "
            f"RPO {row['rpo_hours']:g} h"
        )
        out.append(
            f'<rect class="mark" x="{x0}" y="{y}" width="{_num(width)}" height="{bar_h}" '
            f'fill="{colour}" rx="2"><title>{_e(tip)}</title></rect>'
            f'<text x="{_num(x0 + width + 6)}" y="{y + bar_h / 2}" dy="0.32em" font-size="11" '
            f'fill="#333">{row["age_hours"]:.1f} h / {row["rpo_hours"]:g} h'
            f"{' (over)' if ratio > axis_max else ''}</text>"
        )
    rpo_x = _num(x(1.0))
    out.append(
        f'<line class="reference" x1="{rpo_x}" x2="{rpo_x}" y1="{top - 10}" y2="{height - 28}" '
        f'stroke="#cf222e" stroke-dasharray="6 4" stroke-width="1.5"><title>RPO</title></line>'
        f'<text x="{rpo_x}" y="{top - 13}" text-anchor="middle" font-size="10" '
        f'fill="#cf222e">RPO</text>'
    )
    return _frame(chart_id, title, height, out)


# --------------------------------------------------------------------- page


def _parse(t: str | None) -> dt.datetime | None:
    if not t:
        return None
    moment = dt.datetime.fromisoformat(t)
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _colours(names: Sequence[str]) -> dict[str, str]:
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(sorted(names))}


def _legend(colours: dict[str, str]) -> str:
    if not colours:
        return ""
    items = "".join(
        f'<span class="key"><i style="background:{c}"></i>{_e(n)}</span>'
        for n, c in colours.items()
    )
    return f'<div class="legend">{items}</div>'


def _human_size(n: float) -> str:
    unit = size_unit(n)
    return f"{unit.fmt(n)} {unit.name}"


def _human_duration(seconds: float) -> str:
    unit = duration_unit(seconds)
    return f"{unit.fmt(seconds)} {unit.name}"


def _charts(report: ComplianceReport) -> list[tuple[str, str, str]]:
    """(title, svg, legend html) of every chart."""
    series = report.series
    backups: dict[str, list[dict[str, Any]]] = series.get("backups", {})
    drills: dict[str, list[dict[str, Any]]] = series.get("drills", {})
    objectives: dict[str, float] = series.get("rto_objectives_s", {})
    colours = _colours(sorted(set(backups) | set(drills)))

    def when(text: str | None) -> dt.datetime:
        return _parse(text) or report.generated_at

    size_series = [
        Series(
            name,
            colours[name],
            [
                Point(
                    when(b["finished_at"]),
                    float(b["stored_size"]),
                    f"{name} {b['backup_id']}: stored {_human_size(b['stored_size'])} "
                    f"(dump {_human_size(b['raw_size'])})",
                )
                for b in items
            ],
        )
        for name, items in backups.items()
    ]
    dur_series = [
        Series(
            name,
            colours[name],
            [
                Point(
                    when(b["finished_at"]),
                    float(b["duration_s"]),
                    f"{name} {b['backup_id']}: took {_human_duration(b['duration_s'])}",
                )
                for b in items
            ],
        )
        for name, items in backups.items()
    ]
    drill_series = [
        Series(
            name,
            colours[name],
            [
                Point(
                    when(d["at"]),
                    float(d["rto_s"]),
                    f"{name} {'PITR ' if d.get('kind') == 'pitr' else ''}drill "
                    f"{str(d['at'])[:19]}: restored in {_human_duration(d['rto_s'])}"
                    + (
                        f", RPO {_human_duration(d['rpo_s'])}"
                        if d.get("kind") == "pitr" and d.get("rpo_s") is not None
                        else ""
                    )
                    + (" (FAILED)" if d.get("ok") is False else ""),
                )
                for d in items
            ],
        )
        for name, items in drills.items()
        if items
    ]
    # One dashed line per distinct RTO objective (targets sharing one share the line).
    by_value: dict[float, list[str]] = {}
    for name in drills:
        if name in objectives:
            by_value.setdefault(objectives[name], []).append(name)
    references = [
        (
            value,
            f"RTO {_human_duration(value)}"
            + (f" ({names[0]})" if len(names) == 1 and len(by_value) > 1 else ""),
            colours[names[0]] if len(names) == 1 and len(by_value) > 1 else "#cf222e",
        )
        for value, names in sorted(by_value.items())
    ]
    sizes = [b["stored_size"] for items in backups.values() for b in items]
    durations = [b["duration_s"] for items in backups.values() for b in items]
    rtos = [d["rto_s"] for items in drills.values() for d in items] + list(by_value)
    backup_legend = _legend({n: colours[n] for n in backups})
    return [
        (
            "Backup size over time (stored bytes)",
            time_chart(
                "backup-size",
                "Backup size over time",
                size_series,
                size_unit(max(sizes, default=0)),
                empty_text="no backups",
            ),
            backup_legend,
        ),
        (
            "Backup duration over time",
            time_chart(
                "backup-duration",
                "Backup duration over time",
                dur_series,
                duration_unit(max(durations, default=0)),
                empty_text="no backups",
            ),
            backup_legend,
        ),
        (
            "Freshness per target against RPO (age of the newest backup)",
            freshness_chart(
                "freshness", "Freshness per target against RPO", series.get("freshness", [])
            ),
            "",
        ),
        (
            "Restore drill RTO history (dashed: RTO objective)",
            time_chart(
                "drill-rto",
                "Restore drill RTO history",
                drill_series,
                duration_unit(max(rtos, default=0)),
                references,
                empty_text="no restore drills on record",
            ),
            _legend({n: colours[n] for n in drills if drills[n]}),
        ),
    ]


_CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif;
  margin: 0; color: #1f2328; background: #f6f8fa; }
main { max-width: 1200px; margin: 0 auto; padding: 24px; }
header { display: flex; align-items: center; gap: 16px; flex-wrap: wrap; }
h1 { font-size: 22px; margin: 0; }
h2 { font-size: 17px; margin: 28px 0 10px; }
.badge { display: inline-block; padding: 2px 10px; border-radius: 12px; color: #fff;
  font-weight: 600; font-size: 12px; letter-spacing: .03em; }
.pass { background: #1a7f37; } .warn { background: #9a6700; } .fail { background: #cf222e; }
.meta { color: #57606a; margin: 6px 0 0; }
.counts span { margin-right: 12px; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(540px, 1fr)); gap: 16px; }
figure { margin: 0; background: #fff; border: 1px solid #d0d7de; border-radius: 8px;
  padding: 12px; }
figcaption { font-weight: 600; margin-bottom: 6px; }
svg.chart { width: 100%; height: auto; display: block; }
.legend { margin-top: 6px; color: #444; font-size: 12px; }
.legend .key { margin-right: 14px; white-space: nowrap; }
.legend i { display: inline-block; width: 10px; height: 10px; border-radius: 2px;
  margin-right: 5px; vertical-align: -1px; }
table { border-collapse: collapse; width: 100%; background: #fff; border: 1px solid #d0d7de; }
th, td { text-align: left; vertical-align: top; padding: 7px 10px;
  border-bottom: 1px solid #eaeef2; }
th { background: #f6f8fa; font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
td.refs { font-size: 12px; color: #444; }
td.id { white-space: nowrap; }
details { margin: 6px 0; background: #fff; border: 1px solid #d0d7de; border-radius: 6px;
  padding: 6px 10px; }
summary { cursor: pointer; }
ul.findings { margin: 6px 0; padding-left: 18px; }
ul.findings li { margin: 2px 0; }
code { font-size: 12px; }
footer { color: #57606a; font-size: 12px; margin-top: 28px; }
"""


def render_html(report: ComplianceReport) -> str:
    s = report.summary()
    status = s["status"]
    charts = _charts(report)
    figures = "".join(
        f"<figure><figcaption>{_e(title)}</figcaption>{svg}{legend}</figure>"
        for title, svg, legend in charts
    )
    rows = []
    for c in report.controls:
        refs = "<br>".join(
            f"<b>{_e(_SHORT.get(k, k))}</b> {_e(', '.join(v))}" for k, v in c.frameworks.items()
        )
        rows.append(
            f'<tr data-control="{_e(c.id)}" data-status="{_e(c.status)}">'
            f'<td class="id"><code>{_e(c.id)}</code></td>'
            f'<td><span class="badge {_e(c.status)}">{_e(c.status.upper())}</span></td>'
            f"<td><b>{_e(c.title)}</b><br><small>{_e(c.description)}</small></td>"
            f'<td class="refs">{refs}</td>'
            f"<td>{_e(c.summary)}<br><small>evidence: {_e('; '.join(c.evidence))}</small></td>"
            "</tr>"
        )
    details = []
    for c in report.controls:
        items = "".join(
            f'<li><span class="badge {_e(f.status)}">{_e(f.status)}</span> '
            f"<b>{_e(f.subject)}</b>: {_e(f.message)}</li>"
            for f in c.findings
        )
        opened = " open" if c.status == "fail" else ""
        details.append(
            f"<details{opened}><summary><code>{_e(c.id)}</code> {_e(c.title)} "
            f'<span class="badge {_e(c.status)}">{_e(c.status.upper())}</span></summary>'
            f'<ul class="findings">{items}</ul></details>'
        )
    head = report.audit_head
    targets = [
        f"<tr><td><code>{_e(t.engine)}/{_e(t.target)}</code></td><td>{t.rpo_hours:g} h</td>"
        f"<td>{t.rto_minutes:g} min</td>"
        f"<td>{'yes' if t.pitr else 'no' if t.pitr is False else 'auto'}</td>"
        f"<td>{_e(t.source)}</td></tr>"
        for t in report.targets
    ]
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>strongroom compliance report {_e(report.report_id)}</title>
<style>{_CSS}</style>
</head>
<body>
<main>
<header>
<h1>strongroom compliance report</h1>
<span class="badge {_e(status)}" id="overall">{_e(status.upper())}</span>
</header>
<p class="meta">Repository <code>{_e(report.repository)}</code> ({_e(report.repository_kind)})
&middot; generated {_e(report.generated_at.isoformat(timespec="seconds"))}
&middot; report <code>{_e(report.report_id)}</code></p>
<p class="meta counts"><span><b>{s["pass"]}</b> pass</span><span><b>{s["warn"]}</b> warn</span>
<span><b>{s["fail"]}</b> fail</span><span>{len(report.targets)} target(s)</span>
<span>audit chain head #{_e(head.get("seq"))} <code>{_e(str(head.get("sha256", ""))[:16])}</code>
</span></p>
<h2>At a glance</h2>
<section class="grid" id="charts">{figures}</section>
<h2>Targets and objectives</h2>
<table id="targets">
<thead><tr><th>Target</th><th>RPO</th><th>RTO</th><th>PITR</th><th>Objectives from</th></tr></thead>
<tbody>{"".join(targets)}</tbody>
</table>
<h2>Controls</h2>
<table id="controls">
<thead><tr><th>Control</th><th>Result</th><th>What it checks</th><th>Frameworks</th>
<th>Finding</th></tr></thead>
<tbody>{"".join(rows)}</tbody>
</table>
<h2>Findings per control</h2>
<section id="findings">{"".join(details)}</section>
<footer>SOC 2: AICPA Trust Services Criteria. ISO/IEC 27001:2022 Annex A. HIPAA: 45 CFR Part 164
Security Rule. Self-contained report: no external resources.</footer>
</main>
</body>
</html>
"""
