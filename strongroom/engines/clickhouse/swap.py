"""How a restore's checked scratch table takes the place of a table, and how that is undone.

Kept apart from ``restore`` so the swap (the one step that changes what users see) can be
read on its own. Two ways, chosen per table and recorded in the report as ``swap``:

- ``exchange`` (26.x, Atomic databases): ``EXCHANGE TABLES scratch AND final`` swaps both
  names in one atomic statement; the old table, now under the scratch name, is kept until
  the whole run succeeded and then dropped. Undo exchanges them back.
- ``rename`` (18.16, Ordinary databases, or no table to replace): the existing table is
  renamed aside, then the scratch table renamed into place. Two statements, each undone
  on failure (a multi-table RENAME is not atomic on 18.16 either).

Either way nothing changes before the swap statement, so a failure up to there leaves the
target as it was.
"""

from __future__ import annotations

import contextlib
import secrets

from strongroom.engines.clickhouse.capabilities import capabilities
from strongroom.engines.clickhouse.http_client import ClickHouseHTTP
from strongroom.engines.clickhouse.sql import qualified, quote_string
from strongroom.errors import StrongroomError

ASIDE_PREFIX = "__sr_old_"
EXCHANGE = "exchange"
RENAME = "rename"


class SwapState:
    """A restore run's scratch tables, the undo log and the tables kept aside."""

    def __init__(self, client: ClickHouseHTTP) -> None:
        self.client = client
        self.token = secrets.token_hex(3)
        self.scratch: dict[int, str] = {}  # action index -> scratch table (in target db)
        self.undo: list[tuple[str, str]] = []  # (description, SQL), run in reverse
        self.aside: list[tuple[str, str]] = []  # tables to drop once everything succeeded
        self.stopped: set[tuple[str, str]] = set()  # merges stopped by us
        self.db_engines: dict[str, str] = {}
        self.leftovers: list[str] = []
        self.seq = 0

    def ddl(self, sql: str, what: str) -> None:
        self.client.execute(sql, settings=capabilities(self.client).ddl_settings, what=what)

    def name(self, prefix: str) -> str:
        self.seq += 1
        return f"{prefix}{self.token}_{self.seq:03d}"

    def stop_merges(self, db: str, table: str) -> None:
        with contextlib.suppress(StrongroomError):
            self.ddl(f"SYSTEM STOP MERGES {qualified(db, table)}", f"stopping merges of {table}")
            self.stopped.add((db, table))

    def start_merges(self) -> None:
        for db, table in sorted(self.stopped):
            with contextlib.suppress(StrongroomError):
                self.ddl(f"SYSTEM START MERGES {qualified(db, table)}", "starting merges")
        self.stopped.clear()

    def can_exchange(self, tdb: str) -> bool:
        """EXCHANGE TABLES works only in Atomic databases of servers that parse it."""
        if not capabilities(self.client).exchange_tables:
            return False
        if tdb not in self.db_engines:
            rows = self.client.tuples(
                f"SELECT engine FROM system.databases WHERE name = {quote_string(tdb)}",
                what=f"reading the engine of database {tdb!r}",
            )
            self.db_engines[tdb] = str(rows[0][0]) if rows else ""
        return self.db_engines[tdb] == "Atomic"

    def _renamed(self, tdb: str, old: str, new: str) -> None:
        if (tdb, old) in self.stopped:  # merges stay stopped across RENAME
            self.stopped.discard((tdb, old))
            self.stopped.add((tdb, new))

    def move_in(self, index: int, tdb: str, final: str, *, existed: bool) -> str:
        """Put the checked scratch table in place of ``final``; returns the swap used."""
        scratch = self.scratch.pop(index)
        if existed and self.can_exchange(tdb):
            self._exchange(tdb, scratch, final)
            return EXCHANGE
        if existed:
            self.put_aside(tdb, final)
        self.undo.append((f"dropping restored data of {tdb}.{final}", _drop(tdb, scratch)))
        self.ddl(
            f"RENAME TABLE {qualified(tdb, scratch)} TO {qualified(tdb, final)}",
            f"moving restored data into {tdb}.{final}",
        )
        self.undo.append(
            (
                f"taking restored data out of {tdb}.{final}",
                f"RENAME TABLE {qualified(tdb, final)} TO {qualified(tdb, scratch)}",
            )
        )
        self._renamed(tdb, scratch, final)
        return RENAME

    def _uuid(self, tdb: str, table: str) -> str:
        rows = self.client.tuples(
            "SELECT toString(uuid) FROM system.tables "
            f"WHERE database = {quote_string(tdb)} AND name = {quote_string(table)}",
            what=f"reading the UUID of {tdb}.{table}",
        )
        return str(rows[0][0]) if rows else ""

    def _exchange(self, tdb: str, scratch: str, final: str) -> None:
        """One atomic statement. If it fails, the UUID under ``final`` tells whether it
        ran (a lost answer): the scratch name is dropped only when it surely holds the
        restored data, never the old table."""
        old = self._uuid(tdb, final)
        try:
            self.ddl(
                f"EXCHANGE TABLES {qualified(tdb, scratch)} AND {qualified(tdb, final)}",
                f"exchanging restored data with {tdb}.{final}",
            )
        except BaseException:
            try:
                now: str | None = self._uuid(tdb, final)
            except StrongroomError:
                now = None
            if old and now == old:  # not exchanged: the scratch table holds restored data
                self.undo.append((f"dropping restored data of {tdb}.{final}", _drop(tdb, scratch)))
            elif now is None:
                self.leftovers.append(f"{tdb}.{scratch} (kept: exchange with {final} unknown)")
            else:
                self._exchanged(tdb, scratch, final)
            raise
        self._exchanged(tdb, scratch, final)

    def _exchanged(self, tdb: str, scratch: str, final: str) -> None:
        """The old table is under the scratch name now: kept aside until the run
        succeeded (an undo never drops it: if exchanging back fails, it is what is left)."""
        self.aside.append((tdb, scratch))
        self.undo.append(
            (
                f"putting {tdb}.{final} back",
                f"EXCHANGE TABLES {qualified(tdb, scratch)} AND {qualified(tdb, final)}",
            )
        )
        at_scratch, at_final = (tdb, scratch) in self.stopped, (tdb, final) in self.stopped
        self.stopped -= {(tdb, scratch), (tdb, final)}  # merges stay stopped across EXCHANGE
        self.stopped |= {(tdb, final)} if at_scratch else set()
        self.stopped |= {(tdb, scratch)} if at_final else set()

    def put_aside(self, tdb: str, table: str) -> None:
        """Rename an existing object out of the way; undo renames it back."""
        old = self.name(ASIDE_PREFIX)
        self.ddl(
            f"RENAME TABLE {qualified(tdb, table)} TO {qualified(tdb, old)}",
            f"moving {tdb}.{table} aside",
        )
        self.undo.append(
            (
                f"putting {tdb}.{table} back",
                f"RENAME TABLE {qualified(tdb, old)} TO {qualified(tdb, table)}",
            )
        )
        self.aside.append((tdb, old))


def _drop(tdb: str, table: str) -> str:
    return f"DROP TABLE IF EXISTS {qualified(tdb, table)}"
