"""Human-readable byte sizes, shared by the engines' summaries, the flows and the CLI."""

from __future__ import annotations


def human_size(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'`` (binary units, whole bytes below 1 KiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
