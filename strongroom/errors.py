"""Error types with the exit codes the CLI maps them to.

Every failure an operator can cause or meet gets one of these, with a message
that says what was wrong and what was left untouched. Messages never carry
secrets: callers pass names and ids, never connection strings with passwords.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class StrongroomError(Exception):
    """Base class; ``exit_code`` is what the CLI returns."""

    exit_code = 1


class InvalidInput(StrongroomError):
    """A parameter is malformed (bad id, hostile name, bad time)."""

    exit_code = 2


class NotFound(StrongroomError):
    """A backup, artifact or target object does not exist."""

    exit_code = 3


class IntegrityError(StrongroomError):
    """Stored bytes do not match the manifest, or decryption failed."""

    exit_code = 4


class Unsupported(InvalidInput):
    """The storage does not implement a request (S3 ``NotImplemented``, HTTP 501): not
    transient, never retried. ``api`` names the request (``GetPublicAccessBlock``)."""

    def __init__(self, message: str, *, api: str) -> None:
        super().__init__(message)
        self.api = api


class TargetNotEmpty(StrongroomError):
    """A restore would overwrite data and was not told it may."""

    exit_code = 5


class ServiceUnavailable(StrongroomError):
    """A database server or the storage could not be reached after retries."""

    exit_code = 6


class AccessDenied(StrongroomError):
    """Credentials were refused by a database server or the storage."""

    exit_code = 7


class ToolFailed(StrongroomError):
    """An external tool (pg_dump, pg_restore, ...) exited non-zero."""

    exit_code = 8


class Conflict(StrongroomError):
    """Another run holds the lock for this target, or an object already exists."""

    exit_code = 9


class StorageFull(StrongroomError):
    """The repository or a spool/scratch folder has no space left (ENOSPC, EDQUOT)."""

    exit_code = 11


def invalid_input(exc: ValidationError, what: str) -> InvalidInput:
    """``InvalidInput`` for a pydantic validation failure: field names and reasons only,
    never the input (it may be long, binary or secret)."""
    parts = [
        f"{'.'.join(str(x) for x in e['loc']) or 'value'}: {e['msg']}" for e in exc.errors()[:5]
    ]
    return InvalidInput(f"invalid {what}: " + "; ".join(parts))
