"""Backup ids and names that end up in object keys: generation and validation.

Ids sort by time (``20261124T020000Z-1a2b3c``). Anything that becomes part of a
repository key is validated here so that ``../``, NUL bytes, slashes and other
hostile input never reach storage paths.
"""

from __future__ import annotations

import datetime as dt
import difflib
import re
import secrets

from strongroom.errors import InvalidInput

BACKUP_ID_RE = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
ENGINES = ("postgresql", "clickhouse", "redis")


def new_backup_id(now: dt.datetime | None = None) -> str:
    """A fresh id: UTC timestamp plus 6 random hex digits."""
    moment = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    return f"{moment:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def backup_id_time(backup_id: str) -> dt.datetime:
    """The UTC time encoded in a backup id."""
    check_backup_id(backup_id)
    return dt.datetime.strptime(backup_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)


def _shown(value: str) -> str:
    text = value if len(value) <= 80 else value[:77] + "..."
    return repr(text)


def check_backup_id(value: str) -> str:
    """Return ``value`` if it is a well-formed backup id, else raise InvalidInput."""
    if not isinstance(value, str) or not BACKUP_ID_RE.fullmatch(value):
        raise InvalidInput(
            f"invalid backup id {_shown(str(value))}: expected YYYYMMDDTHHMMSSZ-xxxxxx "
            "(or 'latest')"
        )
    return value


def check_name(value: str, what: str = "name") -> str:
    """Validate a target or artifact name used inside repository keys."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value) or ".." in value:
        raise InvalidInput(
            f"invalid {what} {_shown(str(value))}: use 1-63 letters, digits, '_', '-', '.'"
        )
    return value


def check_engine(value: str) -> str:
    if value not in ENGINES:
        raise InvalidInput(f"unknown engine {_shown(value)}: expected one of {', '.join(ENGINES)}")
    return value


def scope_prefix(area: str, engine: str | None = None, target: str | None = None) -> str:
    """The key prefix of ``<area>/<engine>/<target>/`` as far as given (a target narrows
    the prefix only with its engine); names are validated first."""
    prefix = f"{area}/"
    if engine:
        prefix += f"{check_engine(engine)}/"
        if target:
            prefix += f"{check_name(target, 'target name')}/"
    return prefix


def record_key_parts(key: str, target: str | None = None) -> list[str] | None:
    """``[area, engine, target, file]`` of a record key ``<area>/<engine>/<target>/<id>.json``
    (of ``target`` when given), None for any other key."""
    parts = key.split("/")
    if len(parts) != 4 or not parts[3].endswith(".json"):
        return None
    if target and parts[2] != target:
        return None
    return parts


def nearest(value: str, candidates: list[str], n: int = 3) -> list[str]:
    """Candidates closest to ``value`` (for 'did you mean' hints)."""
    close = difflib.get_close_matches(value, candidates, n=n, cutoff=0.3)
    if close:
        return close
    return sorted(candidates)[-n:]
