"""Private files and minimal environments for restores that write clear data to disk.

A decrypted RDB or a spooled globals.sql holds data in clear: it is created 0600 with
``O_EXCL|O_NOFOLLOW`` inside a fresh ``mkdtemp`` folder, so neither another
local user nor a symlink planted at a predictable name can read or redirect it.
Stop/start commands run with a minimal environment: the worker's own
environment holds repository keys and passwords that a restart script has no
business seeing.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO

PRIVATE_MODE = 0o600
PRIVATE_PREFIX = ".strongroom-restore-"
ENV_KEEP = ("PATH", "HOME", "LANG")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def private_folder(parent: Path) -> Path:
    """A new 0700 folder under ``parent`` (same filesystem: renames out of it are atomic)."""
    return Path(tempfile.mkdtemp(prefix=PRIVATE_PREFIX, dir=parent))


def create_private(path: Path) -> BinaryIO:
    """Open a new file for writing: 0600, refuses an existing name or a symlink."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, PRIVATE_MODE)
    try:
        os.fchmod(fd, PRIVATE_MODE)  # the umask can only remove bits; be explicit anyway
        return os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise


def minimal_env(extra: dict[str, str]) -> dict[str, str]:
    """PATH, HOME and LANG of the worker plus ``extra``; nothing else is inherited."""
    env = {key: os.environ[key] for key in ENV_KEEP if key in os.environ}
    env.setdefault("PATH", DEFAULT_PATH)
    env.update(extra)
    return env
