"""Plain SQL from a backup reaches ``psql`` only in restricted mode, fully verified first.

``psql`` runs meta-commands (``\\!`` runs a shell command, ``\\o`` writes files, ``\\copy``
reads and writes the client's files) found in its input, and a plain-SQL artifact
(``globals.sql``) is exactly such input. So it never streams into ``psql`` while it is
being read: it is spooled into a private file and checked end to end first (signature,
checksums), then lines that start a meta-command are refused before anything runs, and
the SQL goes to ``psql`` behind a ``\\restrict`` line with a key generated here per run.
In restricted mode ``psql`` refuses every meta-command except ``\\unrestrict <key>``,
and nobody who wrote the artifact knows the key, so a meta-command hidden in the middle
of a line or inside a construct the line scan cannot see is refused by ``psql`` itself.

``pg_dumpall`` (15.14 and later) writes its own ``\\restrict``/``\\unrestrict`` pair with
the key of the dump's run: those exact lines are dropped (a second ``\\restrict`` is an
error inside restricted mode, and a recorded key is no secret).
"""

from __future__ import annotations

import re
import secrets
import string
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from strongroom.errors import IntegrityError

KEY_ALPHABET = string.ascii_letters + string.digits
_DUMP_RESTRICT = re.compile(rb"^\\(un)?restrict [A-Za-z0-9]+\r?\n?$")


def new_restrict_key() -> str:
    """A fresh, unguessable ``\\restrict`` key (64 letters and digits)."""
    return "".join(secrets.choice(KEY_ALPHABET) for _ in range(64))


def check_no_meta_commands(path: Path, what: str) -> None:
    """Refuse ``path`` when a line starts a psql meta-command other than the dump's own
    ``\\restrict``/``\\unrestrict`` lines. Read line by line (bounded memory)."""
    with path.open("rb") as fh:
        for number, line in enumerate(fh, start=1):
            head = line.lstrip(b" \t")
            if head.startswith(b"\\") and not _DUMP_RESTRICT.match(line):
                command = head.split(maxsplit=1)[0][:20].decode("ascii", "replace")
                raise IntegrityError(
                    f"{what} holds the psql meta-command {command!r} on line {number}: "
                    "refused before anything ran (a backup's SQL never runs client "
                    "commands)"
                )


def restricted_lines(path: Path, key: str) -> Iterator[bytes]:
    """``\\restrict <key>`` then the file's lines without the dump's own restrict pair."""
    yield f"\\restrict {key}\n".encode()
    with path.open("rb") as fh:
        for line in fh:
            if not _DUMP_RESTRICT.match(line):
                yield line


def feed_restricted(path: Path, sink: IO[bytes], key: str, what: str) -> None:
    """Check ``path`` and copy it into ``sink`` (psql's stdin) in restricted mode."""
    check_no_meta_commands(path, what)
    for line in restricted_lines(path, key):
        sink.write(line)
