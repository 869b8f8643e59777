"""The table loads of a phased restore: groups of tables, and their indexes built early.

``data_groups`` splits the data section into ``jobs`` groups of about equal size.
``GroupLoads`` runs one ``pg_restore -L`` per group, each following the spool. When a
group is loaded (and the spool is complete), its tables' indexes and their primary
key, unique and exclusion constraints are built at once by a ``pg_restore -L`` of just
those entries, while the other groups still load: the same overlap ``pg_restore -j``
gets from its dependency tracking, which the section boundary would otherwise lose.
Which entries belong to which table comes from the manifest (``index_oids`` per table,
recorded at backup); foreign keys, triggers, rules and everything else wait for the
final ``post-data`` pass, when every table is loaded. The group's row counts start as
soon as its data is in.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from strongroom.engines.postgres import toc as pg_toc
from strongroom.engines.postgres.growing_spool import GrowingSpool
from strongroom.errors import IntegrityError
from strongroom.process import Tool

EARLY = ("INDEX", "CONSTRAINT")  # entry types built as soon as their table is loaded


class Counter(Protocol):
    def submit_oids(self, oids: list[int]) -> None: ...


class Producer(threading.Thread):
    """The one pass over the artifact, into the spool; an error aborts the spool."""

    def __init__(self, run: Callable[[], Any], spool: GrowingSpool) -> None:
        super().__init__(daemon=True, name="restore-read")
        self._run, self.spool = run, spool
        self.error: BaseException | None = None
        self.finished = 0.0

    def run(self) -> None:
        try:
            self._run()
            self.spool.finish()
        except BaseException as exc:
            self.error = exc
            self.spool.abort()
        finally:
            self.finished = time.monotonic()


def follow(argv: list[str], env: dict[str, str], spool: GrowingSpool, stdout: Any) -> Tool:
    """Start ``argv`` reading the spool from its start on stdin."""
    tool = Tool(argv, env, stdin=subprocess.PIPE, stdout=stdout)
    assert tool.proc.stdin is not None
    threading.Thread(target=spool.follow, args=(tool.proc.stdin,), daemon=True).start()
    return tool


def check(tool: Tool, what: str, producer: Producer) -> None:
    """A tool's failure, unless the read failed first (its error is the one that counts)."""
    try:
        tool.check(what)
    except Exception:
        # the reader records its error before it aborts the spool (which ends the tools)
        if producer.error is not None:
            raise producer.error from None
        raise


def _entries(listing: str) -> list[tuple[int, str, int, str]]:
    return [
        (index, line, int(m.group(3)), m.group(4))
        for index, line in enumerate(listing.splitlines())
        if (m := pg_toc.LINE.match(line)) is not None
    ]


def data_groups(listing: str, entry: dict[str, Any], jobs: int) -> list[list[tuple[str, int]]]:
    """``jobs`` groups of the data section's entries, ``(line, oid)`` in archive order.

    Tables go, largest first, to the group with the least so far; other data entries
    (sequence values, large objects) go to the first group."""
    weights: dict[int, int] = {}
    for table in entry.get("tables", []):
        if table.get("oid"):
            weights[int(table["oid"])] = int(table.get("bytes") or table.get("rows") or 0) + 1
    lines = _entries(listing)
    groups: list[list[tuple[int, str, int]]] = [[] for _ in range(max(1, jobs))]
    loads = [0] * len(groups)
    tables = [x for x in lines if x[3].startswith("TABLE DATA ")]
    for index, line, oid, _ in sorted(tables, key=lambda x: -weights.get(x[2], 1)):
        smallest = loads.index(min(loads))
        groups[smallest].append((index, line, oid))
        loads[smallest] += weights.get(oid, 1)
    others = [x for x in lines if not x[3].startswith("TABLE DATA ")]
    groups[0].extend((index, line, oid) for index, line, oid, _ in others)
    return [[(line, oid) for _, line, oid in sorted(g)] for g in groups if g]


def early_entries(post_listing: str, entry: dict[str, Any], table_oids: list[int]) -> list[str]:
    """The post-data lines of ``table_oids``' indexes and index-backed constraints."""
    wanted = {
        int(oid)
        for table in entry.get("tables", [])
        if table.get("oid") and int(table["oid"]) in set(table_oids)
        for oid in table.get("index_oids") or []
    }
    return [
        line
        for _, line, oid, rest in _entries(post_listing)
        if oid in wanted
        and any(rest.startswith(kind + " ") for kind in EARLY)
        and not rest.startswith("INDEX ATTACH ")  # needs the parent's index: final pass
    ]


class GroupLoads:
    """One pg_restore per group of tables; then, per loaded group, its early indexes."""

    def __init__(
        self,
        base_args: list[str],
        env: dict[str, str],
        spool: GrowingSpool,
        folder: Path,
        producer: Producer,
        counter: Counter,
        tools: list[Tool],
        database: str,
        entry: dict[str, Any],
    ) -> None:
        self.base_args, self.env, self.spool, self.folder = base_args, env, spool, folder
        self.producer, self.counter, self.tools = producer, counter, tools
        self.database, self.entry = database, entry
        self.post_listing: str | None = None
        self.early_done: list[str] = []

    def run(self, groups: list[list[tuple[str, int]]], pg_restore: str) -> None:
        loading: dict[int, tuple[Tool, list[int]]] = {}
        for number, group in enumerate(groups):
            use_list = self._list(f"data-{number}", [line for line, _ in group])
            argv = [*self.base_args, "-L", str(use_list)]
            tool = follow(argv, self.env, self.spool, subprocess.DEVNULL)
            self.tools.append(tool)
            loading[number] = (tool, [oid for _, oid in group])
        loaded: list[tuple[int, list[int]]] = []
        building: dict[int, tuple[Tool, list[str]]] = {}
        while loading or loaded or building:
            for number, (tool, oids) in list(loading.items()):
                if tool.proc.poll() is not None:
                    what = f"pg_restore of table data (group {number + 1}) into {self.database!r}"
                    check(tool, what, self.producer)
                    self.counter.submit_oids(oids)
                    loaded.append((number, oids))
                    del loading[number]
            if loaded and not self.producer.is_alive() and self.producer.error is None:
                for number, oids in loaded:
                    started = self._build_early(number, oids, pg_restore)
                    if started is not None:
                        building[number] = started
                loaded = []
            for number, (tool, lines) in list(building.items()):
                if tool.proc.poll() is not None:
                    what = f"pg_restore of the indexes of group {number + 1} into {self.database!r}"
                    check(tool, what, self.producer)
                    self.early_done += lines
                    del building[number]
            if self.producer.error is not None:
                raise self.producer.error
            if loading or loaded or building:
                time.sleep(0.02)

    def _build_early(
        self, number: int, oids: list[int], pg_restore: str
    ) -> tuple[Tool, list[str]] | None:
        if self.post_listing is None:
            listing = subprocess.run(
                [pg_restore, "-l", "--section=post-data", str(self.spool.path)],
                capture_output=True,
                check=False,
                timeout=300,
            )
            if listing.returncode != 0:
                text = listing.stderr.decode("utf-8", "replace").strip()[:500]
                raise IntegrityError(f"pg_restore -l could not read the archive: {text}")
            self.post_listing = listing.stdout.decode("utf-8", "replace")
        lines = early_entries(self.post_listing, self.entry, oids)
        if not lines:
            return None
        use_list = self._list(f"early-{number}", lines)
        tool = Tool(
            [*self.base_args, "-L", str(use_list), str(self.spool.path)],
            self.env,
            stdout=subprocess.DEVNULL,
        )
        self.tools.append(tool)
        return tool, lines

    def remaining_post_data(self) -> Path | None:
        """A use-list of the post-data entries not built early (None: none were)."""
        if not self.early_done or self.post_listing is None:
            return None
        done = set(self.early_done)
        rest = [line for _, line, _, _ in _entries(self.post_listing) if line not in done]
        return self._list("post-data-rest", rest)

    def _list(self, name: str, lines: list[str]) -> Path:
        path = self.folder / f"{name}.list"
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return path
