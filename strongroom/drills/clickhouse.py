"""ClickHouse restore drills: every database of a backup into a scratch database.

Scratch target: a throwaway ClickHouse server started for the drill
(``sandbox=True``; databases keep their names there), a configured scratch
server, or the source server itself; on a shared server each database is
restored as ``sr_drill_<token>_<n>`` (``target_database``) and dropped
afterwards. The restore is the engine's own (``restore_clickhouse``: staged,
fingerprint-checked, swapped). After the optional hook, the drill recomputes
every table's server-side fingerprint (``count()`` and the sum of
``cityHash64`` over the stored columns) and compares it with the manifest,
and optionally with the live source.
"""

from __future__ import annotations

import secrets
from typing import Any

from strongroom.catalog import Manifest
from strongroom.config import EncryptionConfig
from strongroom.drills.core import LiveMode, live_verdict
from strongroom.engines.clickhouse import inspection as inspect
from strongroom.engines.clickhouse.conn import ClickHouseConnection
from strongroom.engines.clickhouse.http_client import ClickHouseHTTP
from strongroom.engines.clickhouse.restore import ChRestoreRequest, restore_clickhouse
from strongroom.engines.clickhouse.sql import quote_ident
from strongroom.errors import NotFound, StrongroomError
from strongroom.redact import register, scrub
from strongroom.repository.base import Repository


def _whole(prints: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return inspect.total(prints) if prints else {"rows": 0, "hash": "0"}


class ClickHouseDrill:
    """ScratchAdapter for ClickHouse backups (see the module docstring)."""

    engine = "clickhouse"

    def __init__(
        self,
        source: ClickHouseConnection,
        repo: Repository,
        enc: EncryptionConfig,
        *,
        scratch: ClickHouseConnection | None = None,
        sandbox: bool = False,
        live: LiveMode = "off",
    ) -> None:
        self.source = source
        self.repo = repo
        self.enc = enc
        self.scratch_conn = scratch
        self.sandbox = sandbox
        self.live: LiveMode = live
        self.conn: ClickHouseConnection = scratch or source
        self.token = secrets.token_hex(4)
        self.databases: dict[str, str] = {}
        self._server: Any = None
        self._mode = "sandbox" if sandbox else ("scratch server" if scratch else "source server")
        register(*source.secrets(), *(scratch.secrets() if scratch else []), *enc.secrets())

    def describe(self) -> dict[str, Any]:
        return {"mode": self._mode, "server": self.conn.describe(), "databases": self.databases}

    def prepare(self, manifest: Manifest) -> None:
        dbs = [d["name"] for d in manifest.details.get("databases", [])]
        if not dbs:
            raise NotFound(f"backup {manifest.backup_id} holds no databases")
        if self.sandbox:
            from strongroom.sandbox.clickhouse import ClickHouseServer

            server = ClickHouseServer()
            self._server = server
            server.start()
            self.conn = ClickHouseConnection(
                name=self.source.name,
                host=server.host,
                port=server.tcp_port,
                http_port=server.http_port,
            )
            self.databases = {db: db for db in dbs}
        else:
            self.databases = {db: f"sr_drill_{self.token}_{i}" for i, db in enumerate(dbs)}

    def restore(self, manifest: Manifest) -> dict[str, Any]:
        report: dict[str, Any] = {"databases": []}
        for name, scratch in self.databases.items():
            result = restore_clickhouse(
                self.conn,
                self.repo,
                self.enc,
                ChRestoreRequest(
                    backup_id=manifest.backup_id,
                    source_target=manifest.target,
                    databases=[name],
                    target_database=None if scratch == name else scratch,
                ),
            )
            report["databases"].append(
                {
                    "database": name,
                    "scratch_database": scratch,
                    "seconds": result.get("duration_s"),
                    "rows": result.get("rows"),
                    "raw_size": result.get("raw_size"),
                }
            )
        return report

    def handle(self) -> dict[str, Any]:
        return {"connection": self.conn, "databases": dict(self.databases)}

    def _prints(
        self, client: ClickHouseHTTP, database: str, entry: dict[str, Any]
    ) -> dict[str, Any]:
        prints = inspect.fingerprint(
            client,
            database,
            entry["data_table"],
            inspect.stored_columns(entry["columns"]),
            by_partition=False,
            finalize_aggregates=entry.get("fingerprint_aggregates") == "finalized",
        )
        return _whole(prints)

    def compare(self, manifest: Manifest) -> list[dict[str, Any]]:
        client = ClickHouseHTTP(self.conn)
        live_client = ClickHouseHTTP(self.source) if self.live != "off" else None
        checks: list[dict[str, Any]] = []
        for db in manifest.details.get("databases", []):
            name = db["name"]
            scratch = self.databases[name]
            present = {t["name"] for t in inspect.list_tables(client, scratch)}
            for entry in db.get("tables", []):
                item = f"{name}.{entry['name']}"
                if entry["name"] not in present:
                    checks.append(
                        {
                            "item": item,
                            "check": "table present",
                            "ok": False,
                            "detail": f"{item} missing from the restored database",
                        }
                    )
                    continue
                if not entry.get("data") or not entry.get("data_table"):
                    checks.append({"item": item, "check": "schema only", "ok": True})
                    continue
                expected = entry.get("fingerprint") or {"rows": entry.get("rows"), "hash": None}
                actual = self._prints(client, scratch, entry)
                ok = int(actual["rows"]) == int(expected.get("rows") or 0) and (
                    expected.get("hash") is None or str(actual["hash"]) == str(expected["hash"])
                )
                check: dict[str, Any] = {
                    "item": item,
                    "check": "fingerprint vs manifest",
                    "expected_rows": expected.get("rows"),
                    "restored_rows": actual["rows"],
                    "fingerprint": actual["hash"],
                    "ok": ok,
                }
                if not ok:
                    check["detail"] = (
                        f"{item}: {actual['rows']} rows / hash {actual['hash']} restored, "
                        f"manifest says {expected.get('rows')} / {expected.get('hash')}"
                    )
                if live_client is not None:
                    try:
                        live = self._prints(live_client, name, entry)
                    except StrongroomError as exc:
                        live = {"rows": None, "hash": None, "error": scrub(str(exc))}
                    same = live.get("rows") == actual["rows"] and live.get("hash") == actual["hash"]
                    check.update(
                        {"live_rows": live.get("rows"), "live_fingerprint": live.get("hash")}
                    )
                    live_verdict(check, self.live, same, f"{item}: differs from the live source")
                checks.append(check)
        return checks

    def cleanup(self) -> dict[str, Any]:
        if self._server is not None:
            try:
                from strongroom.sandbox._process import remove_dir

                self._server.stop()
                remove_dir(self._server.base_dir)
            except Exception as exc:
                return {"ok": False, "error": f"stopping the sandbox server: {scrub(str(exc))}"}
            finally:
                self._server = None
            return {"ok": True, "sandbox_stopped": True}
        dropped: list[str] = []
        errors: list[str] = []
        client = ClickHouseHTTP(self.conn)
        for scratch in self.databases.values():
            try:
                client.execute(f"DROP DATABASE IF EXISTS {quote_ident(scratch)}")
                dropped.append(scratch)
            except StrongroomError as exc:
                errors.append(f"{scratch}: {scrub(str(exc))}")
        return {
            "ok": not errors,
            "dropped": dropped,
            **({"error": "; ".join(errors)} if errors else {}),
        }
