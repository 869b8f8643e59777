"""What a copy did, object by object: the report every copy phase appends to."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Literal

Action = Literal["copied", "skipped", "refused", "failed"]
Area = Literal["backup", "artifact", "wal", "evidence", "record"]


@dataclass
class CopyReport:
    """Rows of ``{"area", "key", "action", "bytes", "detail"}``; ``ok`` when no object
    was refused or failed. Thread-safe appends (objects are copied in parallel)."""

    source: str
    destination: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    backups: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, area: Area, key: str, action: Action, size: int = 0, detail: str = "") -> None:
        with self._lock:
            self.rows.append(
                {"area": area, "key": key, "action": action, "bytes": size, "detail": detail}
            )

    def backup(self, engine: str, target: str, backup_id: str, action: Action, detail: str) -> None:
        with self._lock:
            self.backups.append(
                {
                    "engine": engine,
                    "target": target,
                    "backup_id": backup_id,
                    "action": action,
                    "detail": detail,
                }
            )

    @property
    def ok(self) -> bool:
        return not any(r["action"] in ("refused", "failed") for r in [*self.rows, *self.backups])

    @property
    def errors(self) -> list[str]:
        return [
            f"{r.get('key') or r.get('backup_id')}: {r['detail']}"
            for r in [*self.backups, *self.rows]
            if r["action"] in ("refused", "failed")
        ]

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for row in self.rows:
            name = f"{row['area']}_{row['action']}"
            counts[name] = counts.get(name, 0) + 1
        copied = sum(r["bytes"] for r in self.rows if r["action"] == "copied")
        return {
            "backups_copied": sum(1 for b in self.backups if b["action"] == "copied"),
            "backups_skipped": sum(1 for b in self.backups if b["action"] == "skipped"),
            "backups_refused": sum(1 for b in self.backups if b["action"] in ("refused", "failed")),
            "objects_copied": sum(1 for r in self.rows if r["action"] == "copied"),
            "objects_skipped": sum(1 for r in self.rows if r["action"] == "skipped"),
            "objects_refused": sum(1 for r in self.rows if r["action"] in ("refused", "failed")),
            "bytes_copied": copied,
            **counts,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "source": self.source,
            "destination": self.destination,
            "summary": self.summary(),
            "backups": list(self.backups),
            "errors": self.errors,
            "objects": list(self.rows),
        }
