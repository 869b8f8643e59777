"""The structure check ``strongroom verify`` runs on ``pg_dump -Fc`` artifacts.

Registered with ``strongroom.verify`` (which imports this module by name when it
verifies): the dump streams into ``pg_restore --list``, and every table the manifest
says has data must have its TABLE DATA entry.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from typing import Any

from strongroom.catalog import Artifact, Manifest
from strongroom.engines.postgres import toc as pg_toc
from strongroom.engines.postgres.backup import pg_tool
from strongroom.engines.postgres.relations import data_entry
from strongroom.errors import IntegrityError
from strongroom.verify import register_check


class PgDumpListCheck:
    """Feeds the dump to ``pg_restore --list`` and checks every table's data is listed."""

    def __init__(self, manifest: Manifest, artifact: Artifact) -> None:
        self._expected: list[dict[str, Any]] = []
        for db in manifest.details.get("databases", []):
            if db.get("artifact") == artifact.name:
                # data exactly where pg_dump emits it: not for partitioned parents,
                # foreign tables or unpopulated materialized views
                self._expected = [t for t in db["tables"] if data_entry(t) is not None]
        # output goes to files: a pipe could fill while we are still writing its stdin
        self._out = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        self._err = tempfile.TemporaryFile()  # noqa: SIM115
        self._proc = subprocess.Popen(
            [pg_tool("pg_restore"), "--list"],
            stdin=subprocess.PIPE,
            stdout=self._out,
            stderr=self._err,
            bufsize=0,
        )
        self._open = True

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._open:
            assert self._proc.stdin is not None
            try:
                self._proc.stdin.write(data)
            except (BrokenPipeError, OSError):
                self._open = False  # pg_restore has read the table of contents it needs
        return len(data)

    def finish(self) -> dict[str, Any]:
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        code = self._proc.wait(timeout=300)
        self._out.seek(0)
        self._err.seek(0)
        out, err = self._out.read(), self._err.read()
        self.close()
        if code != 0:
            raise IntegrityError(
                f"pg_restore --list rejected the dump: {err.decode(errors='replace').strip()}"
            )
        listing = out.decode("utf-8", "replace")
        entries = [line for line in listing.splitlines() if line and not line.startswith(";")]
        oids, names = pg_toc.data_entries(listing)
        missing = [
            f"{t['schema']}.{t['name']}"
            for t in self._expected
            if not pg_toc.has_data(t, oids, names)
        ]
        if missing:
            raise IntegrityError(f"dump lacks data for tables: {', '.join(missing[:10])}")
        return {
            "toc_entries": len(entries),
            "table_data_entries": len(oids),
            "tables_with_data": len(self._expected),
        }

    def close(self) -> None:
        """Stop pg_restore if it still runs (after a failed read) and drop its output files."""
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)
        self._out.close()
        self._err.close()


register_check("pg_dump-custom", PgDumpListCheck)
