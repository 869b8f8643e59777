"""Read back every archived WAL file of a target and check it the way a recovery would.

``pg_wal_check`` works from the listing alone (no key: an auditor can run it), so it
finds missing segments but cannot see a segment whose object was replaced or altered
in place. This module decrypts and checks each object with the identity, exactly as
``strongroom-wal fetch`` does before handing a file to PostgreSQL (age authentication,
the frame checksum recorded at push, zstd's checksum, the size, the WAL page header
against the name), and names every file that fails, so damage is found before a
restore needs the file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from strongroom.engines.postgres.wal.store import archived_files, decode, decode_into, wal_key
from strongroom.errors import StrongroomError

if TYPE_CHECKING:
    from strongroom.repository.base import Repository


class _Sink:
    """Counts and discards decoded bytes (16 MiB per segment need not be kept)."""

    def write(self, data: bytes) -> int:
        return len(data)


def verify_archive(
    repo: Repository,
    target: str,
    identities: list[str],
    *,
    segment_size: int | None = None,
    system_identifier: int | None = None,
) -> dict[str, Any]:
    """Check every archived WAL file of ``target``; returns a JSON-ready report with
    ``ok``, ``checked`` and ``failed`` (a list of ``{"name", "error"}``)."""
    from strongroom.redact import register, scrub

    register(*identities)
    checked = 0
    failed: list[dict[str, str]] = []
    for info, name, kind in archived_files(repo, target):
        checked += 1
        try:
            if info.key != wal_key(target, name):
                raise StrongroomError(f"WAL {name}: stored under the wrong folder ({info.key})")
            blob = repo.get_bytes(info.key)
            options: dict[str, Any] = {
                "segment_size": segment_size,
                "system_identifier": system_identifier,
            }
            if kind in ("segment", "partial"):
                decode_into(name, blob, identities, _Sink(), **options)  # type: ignore[arg-type]
            else:
                decode(name, blob, identities, **options)
        except StrongroomError as exc:
            failed.append({"name": name, "error": scrub(str(exc))})
    return {"target": target, "ok": not failed, "checked": checked, "failed": failed}
