"""strongroom's own way into a restored cluster, whatever its ``pg_hba.conf`` requires.

A restored cluster keeps the production ``pg_hba.conf``: hardened set-ups require
passwords (``scram-sha-256``, ``md5``) or ``peer`` even on local sockets, and the
restore host has no password for the restored roles. So while strongroom follows
recovery and runs the verification query, it admits itself with one rule of its own,
prepended (first match wins)::

    local all "<db_user>" trust  # strongroom-pitr temporary rule <token>

Why this is safe:

* ``local`` rules match Unix-socket connections only, and the restored server is
  started with ``-k <private folder>``: its only socket lives in a folder strongroom
  created with ``mkdtemp`` (mode 0700, owned by the cluster's OS user). Only root
  and that account can reach it, and that account already owns the data directory
  (it can read every table anyway). TCP connections still meet the production rules.
* The rule is removed (the file rewritten without it, then ``pg_ctl reload``) as
  soon as strongroom's own connections are done, before the server is handed over,
  and also when anything fails; a stopped server gets the file without the rule.
* The file is read and rewritten through the data directory's descriptor (random
  temporary name, ``O_EXCL | O_NOFOLLOW``, fchown, rename): a symlink planted there
  is never followed.
"""

from __future__ import annotations

import os
import secrets

from strongroom.engines.postgres.root_fs import Owner, UnsafePath, read_plain, write_new
from strongroom.errors import IntegrityError, InvalidInput

HBA_FILE = "pg_hba.conf"
MARK = "# strongroom-pitr temporary rule"


def _quoted_role(db_user: str) -> str:
    if not db_user or any(c in db_user for c in '"\n\r\t \x00,'):
        raise InvalidInput(
            "db_user for the restored server must be a role name without quotes, "
            "commas or whitespace"
        )
    return f'"{db_user}"'


def _read(dir_fd: int) -> tuple[str, int]:
    try:
        data = read_plain(dir_fd, HBA_FILE)
        mode = os.stat(HBA_FILE, dir_fd=dir_fd, follow_symlinks=False).st_mode & 0o777
    except (UnsafePath, FileNotFoundError) as exc:
        raise IntegrityError(f"the restored {HBA_FILE} is not a plain file: {exc}") from None
    if data is None:
        raise InvalidInput(
            f"the base backup has no {HBA_FILE} in its data directory; strongroom cannot "
            "admit its own connections to the restored server"
        )
    return data.decode("utf-8", "surrogateescape"), mode


def admit(dir_fd: int, db_user: str, owner: Owner) -> str:
    """Prepend strongroom's temporary rule; returns the line added."""
    line = f"local all {_quoted_role(db_user)} trust  {MARK} {secrets.token_hex(6)}\n"
    text, mode = _read(dir_fd)
    data = (line + text).encode("utf-8", "surrogateescape")
    write_new(dir_fd, HBA_FILE, data, mode=mode, owner=owner)
    return line


def withdraw(dir_fd: int, line: str, owner: Owner) -> bool:
    """Remove the rule ``admit`` added (that exact line, once), giving back the file's
    original bytes; True when it was there."""
    text, mode = _read(dir_fd)
    if line not in text:
        return False
    kept = text.replace(line, "", 1)
    write_new(dir_fd, HBA_FILE, kept.encode("utf-8", "surrogateescape"), mode=mode, owner=owner)
    return True


def has_rule(text: str) -> bool:
    return MARK in text
