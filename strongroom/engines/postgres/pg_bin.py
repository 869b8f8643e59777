"""Where the PostgreSQL client tools are: PATH first, then Debian's versioned folders.

One place for the search path, so the backup path, the WAL receiver and its status
query find the same ``psql``/``pg_dump``/``pg_receivewal`` (standard library only: the
WAL hot path imports it).
"""

from __future__ import annotations

PG_BIN_DIRS = ("/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin")


def pg_tool(name: str) -> str:
    """The path of PostgreSQL's tool ``name`` (``ToolFailed``-style error when missing)."""
    from strongroom.process import tool_path

    return tool_path(name, PG_BIN_DIRS)
