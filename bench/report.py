"""Summaries (medians, ratios, peak RSS) and the printed table."""

from __future__ import annotations

import statistics
from typing import Any

MIB = 1024 * 1024
RSS_TARGET_MIB = 200.0
# ratio above which the report explains where strongroom's time goes
RATIO_NOTE = 1.25


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize_size(samples: list[dict[str, Any]], db_bytes: int) -> dict[str, Any]:
    """Medians per tool over the timed (non-warm-up, successful) samples of one size."""
    tools: dict[str, Any] = {}
    for tool in sorted({s["tool"] for s in samples}):
        timed = [s for s in samples if s["tool"] == tool and not s["warmup"] and s["final"]]
        good = [s for s in timed if s["ok"]]
        walls = [s["wall_s"] for s in good]
        entry: dict[str, Any] = {
            "samples": len(timed),
            "failed": len(timed) - len(good),
            "disturbed": sum(1 for s in timed if s.get("disturbed")),
            "disturbed_attempts_rerun": sum(
                1 for s in samples if s["tool"] == tool and not s["warmup"] and not s["final"]
            ),
            "median_wall_s": _median(walls),
            "min_wall_s": min(walls) if walls else None,
            "max_wall_s": max(walls) if walls else None,
        }
        median_wall = entry["median_wall_s"]
        entry["db_mib_per_s"] = db_bytes / MIB / median_wall if median_wall else None
        for key in ("cpu_s", "postgres_cpu_s", "other_cpu_s", "steal_s"):
            entry[f"median_{key}"] = _median([s[key] for s in good if s.get(key) is not None])
        # CPU-seconds the job cost (tool + server): far less sensitive than wall time to
        # other work on a shared machine
        entry["median_job_cpu_s"] = _median(
            [s["cpu_s"] + s["postgres_cpu_s"] for s in good if s.get("postgres_cpu_s") is not None]
        )
        stored = [s["stored_bytes"] for s in good if s.get("stored_bytes")]
        if stored:
            entry["median_stored_bytes"] = int(statistics.median(stored))
        if tool == "strongroom":
            entry["median_in_process_s"] = _median([s["in_process_s"] for s in good])
            rss = [s["peak_rss_kib"] for s in good]
            entry["peak_rss_mib"] = max(rss) / 1024 if rss else None
            entry["median_peak_rss_mib"] = _median([r / 1024 for r in rss])
            probes = sorted({k for s in good for k in s.get("probes_s", {})})
            entry["median_probes_s"] = {
                k: _median([s["probes_s"].get(k, 0.0) for s in good]) for k in probes
            }
            entry["median_phases_s"] = {
                phase: _median([s["phases_s"][phase] for s in good])
                for phase in (good[0]["phases_s"] if good else {})
            }
            entry["median_python_cpu_s"] = _median([s["python_cpu_s"] for s in good])
            entry["median_children_cpu_s"] = _median([s["children_cpu_s"] for s in good])
        if tool == "raw":
            entry["median_fsync_after_s"] = _median([s["fsync_after_s"] for s in good])
        tools[tool] = entry

    def med(tool: str, key: str = "median_wall_s") -> float | None:
        value = tools.get(tool, {}).get(key)
        return float(value) if value is not None else None

    ratios = {
        "strongroom_over_raw": _ratio(med("strongroom"), med("raw")),
        "strongroom_in_process_over_raw": _ratio(
            med("strongroom", "median_in_process_s"), med("raw")
        ),
        "strongroom_over_pgbackrest": _ratio(med("strongroom"), med("pgbackrest")),
        "raw_over_dump_only": _ratio(med("raw"), med("dump_only")),
        "strongroom_job_cpu_over_raw": _ratio(
            med("strongroom", "median_job_cpu_s"), med("raw", "median_job_cpu_s")
        ),
        "strongroom_job_cpu_over_pgbackrest": _ratio(
            med("strongroom", "median_job_cpu_s"), med("pgbackrest", "median_job_cpu_s")
        ),
        "strongroom_stored_over_raw_stored": _ratio(
            med("strongroom", "median_stored_bytes"), med("raw", "median_stored_bytes")
        ),
    }
    paired = _paired_ratios(samples, "strongroom", "raw")
    return {"tools": tools, "ratios": ratios, "paired_strongroom_over_raw": paired}


def _paired_ratios(samples: list[dict[str, Any]], a: str, b: str) -> list[float]:
    """strongroom/raw within each repeat (same conditions), for judging the noise."""
    out = []
    repeats = sorted({s["repeat"] for s in samples if not s["warmup"]})
    for r in repeats:
        sa = [s for s in samples if s["repeat"] == r and s["tool"] == a and s["ok"] and s["final"]]
        sb = [s for s in samples if s["repeat"] == r and s["tool"] == b and s["ok"] and s["final"]]
        if sa and sb and not sa[0]["warmup"]:
            out.append(sa[0]["wall_s"] / sb[0]["wall_s"])
    return out


def rss_verdict(sizes: list[dict[str, Any]]) -> dict[str, Any]:
    peaks = [
        (s["size_mb"], s["summary"]["tools"].get("strongroom", {}).get("peak_rss_mib"))
        for s in sizes
    ]
    known = [(size, p) for size, p in peaks if p is not None]
    if not known:
        return {"peaks_mib": {}, "under_target": None}
    smallest, largest = known[0][1], known[-1][1]
    return {
        "peaks_mib": {str(size): p for size, p in known},
        "target_mib": RSS_TARGET_MIB,
        "under_target": all(p < RSS_TARGET_MIB for _, p in known),
        "largest_over_smallest": largest / smallest if smallest else None,
    }


def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def table(result: dict[str, Any]) -> str:
    lines: list[str] = []
    cfg = result["config"]
    lines.append(
        f"strongroom PostgreSQL backup benchmark  ({result['date']}, {result['host']['cpu_count']}"
        f" CPUs, repeats={cfg['repeats']}, zstd level {cfg['level']})"
    )
    for size in result["sizes"]:
        summary = size["summary"]
        lines.append("")
        lines.append(
            f"== sample data {size['size_mb']} MB requested: database {size['db_bytes'] / MIB:.0f}"
            f" MiB, cluster {size['cluster_bytes'] / MIB:.0f} MiB, {size['expected_rows']:,} rows"
        )
        header = (
            f"{'tool':<12}{'median s':>10}{'min s':>9}{'max s':>9}{'DB MiB/s':>10}"
            f"{'stored MiB':>12}{'peak RSS MiB':>14}{'CPU s':>8}{'PG CPU s':>10}{'other':>7}  ok"
        )
        lines.append(header)
        lines.append("-" * len(header))
        for tool in ("raw", "strongroom", "pgbackrest", "dump_only"):
            entry = summary["tools"].get(tool)
            if entry is None:
                continue
            stored = entry.get("median_stored_bytes")
            rss = entry.get("peak_rss_mib")
            lines.append(
                f"{tool:<12}{_fmt(entry['median_wall_s'], '.2f'):>10}"
                f"{_fmt(entry['min_wall_s']):>9}{_fmt(entry['max_wall_s']):>9}"
                f"{_fmt(entry['db_mib_per_s'], '.0f'):>10}"
                f"{_fmt(stored / MIB if stored else None, '.1f'):>12}"
                f"{_fmt(rss, '.1f'):>14}{_fmt(entry['median_cpu_s'], '.1f'):>8}"
                f"{_fmt(entry['median_postgres_cpu_s'], '.1f'):>10}"
                f"{_fmt(entry['median_other_cpu_s'], '.1f'):>7}"
                f"  {entry['samples'] - entry['failed']}/{entry['samples']}"
                + (f" ({entry['disturbed']} disturbed)" if entry["disturbed"] else "")
                + (
                    f" [{entry['disturbed_attempts_rerun']} re-run]"
                    if entry["disturbed_attempts_rerun"]
                    else ""
                )
            )
        r = summary["ratios"]
        lines.append(
            f"ratios: strongroom/raw {_fmt(r['strongroom_over_raw'], '.3f')}"
            f" (in-process {_fmt(r['strongroom_in_process_over_raw'], '.3f')},"
            f" per repeat {', '.join(f'{x:.3f}' for x in summary['paired_strongroom_over_raw'])})"
            f"   strongroom/pgbackrest {_fmt(r['strongroom_over_pgbackrest'], '.3f')}"
            f"   stored strongroom/raw {_fmt(r['strongroom_stored_over_raw_stored'], '.3f')}"
        )
        lines.append(
            f"CPU-seconds (tool + server) strongroom/raw"
            f" {_fmt(r['strongroom_job_cpu_over_raw'], '.3f')},"
            f" strongroom/pgbackrest {_fmt(r['strongroom_job_cpu_over_pgbackrest'], '.3f')}"
        )
        sr = summary["tools"].get("strongroom", {})
        phases = sr.get("median_phases_s") or {}
        if phases:
            lines.append(
                "strongroom phases (median s): "
                + ", ".join(f"{k} {v:.2f}" for k, v in phases.items() if v is not None)
            )
        probes = sr.get("median_probes_s") or {}
        if probes:
            lines.append(
                "strongroom in-process probes (median s): "
                + ", ".join(f"{k} {v:.2f}" for k, v in probes.items() if v is not None)
            )
        raw = summary["tools"].get("raw", {})
        if raw.get("median_fsync_after_s") is not None:
            lines.append(
                f"raw: fsync of its output after the timed run {raw['median_fsync_after_s']:.2f} s"
                " (untimed; strongroom and pgBackRest fsync inside their time)"
            )
    pgbr = result.get("pgbackrest", {})
    if pgbr.get("skipped"):
        lines.append("")
        lines.append(f"pgbackrest: skipped: {pgbr['skipped']}")
    rss = result["peak_rss"]
    if rss.get("peaks_mib"):
        lines.append("")
        lines.append(
            "strongroom peak RSS by size: "
            + ", ".join(f"{k} MB -> {v:.1f} MiB" for k, v in rss["peaks_mib"].items())
            + f"; under {rss['target_mib']:.0f} MiB: {rss['under_target']}"
            + f"; largest/smallest {_fmt(rss['largest_over_smallest'], '.2f')}"
        )
    failures = [
        s for size in result["sizes"] for s in size["samples"] if not s["ok"] and s["final"]
    ]
    if failures:
        lines.append("")
        lines.append(f"{len(failures)} FAILED sample(s):")
        for s in failures:
            lines.append(f"  {s['tool']} repeat {s['repeat']}: {s.get('error', '')[:300]}")
    return "\n".join(lines)
