"""Transport policy: plaintext to a non-loopback host is refused unless the target says so.

A man in the middle can strip TLS from libpq's ``sslmode=prefer`` and read
everything sent over ClickHouse's plain HTTP or Redis without TLS. So the
connection models call :func:`require_encrypted` when they are built, before
anything connects: a host that is not loopback (``localhost``, ``127.0.0.0/8``,
``::1``) or a unix socket must use TLS, or its target block must set
``allow_plaintext: true``. Host names other than ``localhost`` count as
non-loopback without being resolved (no DNS lookup, no packet sent): a name
that happens to resolve to 127.0.0.1 needs ``127.0.0.1`` or the opt-out.
"""

from __future__ import annotations

import ipaddress
from typing import Literal

from strongroom.errors import InvalidInput

Transport = Literal["local", "encrypted", "verified", "plaintext-by-opt-out"]

#: libpq modes that may fall back to (or always use) plaintext.
PG_PLAINTEXT_MODES = frozenset({"disable", "allow", "prefer"})
#: libpq modes that check the server certificate.
PG_VERIFIED_MODES = frozenset({"verify-ca", "verify-full"})
PG_MODES = PG_PLAINTEXT_MODES | {"require"} | PG_VERIFIED_MODES


def is_local(host: str) -> bool:
    """True for loopback addresses, ``localhost`` and unix-socket folders (absolute paths)."""
    if not host or host.startswith("/") or host.startswith("@"):
        return True
    if host.lower() in ("localhost", "localhost.", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def require_encrypted(
    *, engine: str, target: str, host: str, encrypted: bool, field: str, allow_plaintext: bool
) -> None:
    """Raise InvalidInput when ``host`` is remote, the transport is plaintext and not opted out."""
    if encrypted or allow_plaintext or is_local(host):
        return
    raise InvalidInput(
        f"{engine} target {target!r}: host {host!r} is not loopback and {field} leaves the "
        "connection unencrypted; use TLS or set allow_plaintext: true in the target block"
    )


def pg_default_sslmode(host: str) -> str:
    """libpq's ``prefer`` for loopback and unix sockets, ``require`` for every other host."""
    return "prefer" if is_local(host) else "require"


def classify(*, host: str, encrypted: bool, verified: bool) -> Transport:
    """What the compliance control reports for one target."""
    if encrypted:
        return "verified" if verified else "encrypted"
    return "local" if is_local(host) else "plaintext-by-opt-out"


def transport_of(engine: str, data: dict[str, object]) -> Transport | None:
    """The transport of a target from its block's fields (no secrets needed, nothing
    contacted); None when the engine is unknown or the block names no host."""
    host = data.get("host")
    if not isinstance(host, str):
        return None
    if engine == "postgresql":
        mode = data.get("sslmode") or pg_default_sslmode(host)
        return classify(
            host=host, encrypted=mode not in PG_PLAINTEXT_MODES, verified=mode in PG_VERIFIED_MODES
        )
    if engine == "clickhouse":
        secure = bool(data.get("secure"))
        return classify(
            host=host,
            encrypted=secure,
            verified=secure and data.get("verify_tls", True) is not False,
        )
    if engine == "redis":
        tls = bool(data.get("tls"))
        return classify(host=host, encrypted=tls, verified=tls)  # redis-py verifies by default
    return None
