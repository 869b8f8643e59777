"""A PostgresTarget block's fields -> ``PostgresConnection``, without importing Prefect.

One function for both forms of the block: the loaded ``PostgresTarget`` (its
``to_connection``) and the raw block document data the Prefect API returns, which the
CLI's read-only restore plans (``--dry-run``) use without starting a flow run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import SecretStr

from strongroom.config import PostgresConnection
from strongroom.transport import pg_default_sslmode

# the block's defaults, for raw block data that leaves a field out
_DEFAULTS: dict[str, Any] = {
    "host": "127.0.0.1",
    "port": 5432,
    "user": "postgres",
    "maintenance_db": "postgres",
    "dump_format": "custom",
    "jobs": 1,
    "wal_config_owner": "postgres",
    "primary_port": 5432,
}


def _get(obj: Any, key: str) -> Any:
    value = obj.get(key) if isinstance(obj, Mapping) else getattr(obj, key, None)
    return _DEFAULTS.get(key) if value is None else value


def postgres_connection(name: str, block: Any) -> PostgresConnection:
    """The connection of target ``name`` from a PostgresTarget or its raw block data."""
    password = _get(block, "password")
    if password is not None and not isinstance(password, SecretStr):
        password = SecretStr(str(password))
    host = str(_get(block, "host"))
    sslmode = _get(block, "sslmode")
    primary_host = _get(block, "primary_host") or None
    return PostgresConnection(
        name=name,
        host=host,
        port=int(_get(block, "port")),
        user=str(_get(block, "user")),
        password=password,
        databases=list(_get(block, "databases") or []),
        sslmode=sslmode or pg_default_sslmode(host),
        allow_plaintext=bool(_get(block, "allow_plaintext")),
        maintenance_db=str(_get(block, "maintenance_db")),
        dump_format=_get(block, "dump_format"),
        jobs=int(_get(block, "jobs")),
        spool_dir=_get(block, "spool_dir"),
        wal_config_path=_get(block, "wal_config_path"),
        wal_config_owner=_get(block, "wal_config_owner"),
        data_directory=_get(block, "data_directory"),
        primary_host=primary_host,
        primary_port=int(_get(block, "primary_port")),
        primary_sslmode=sslmode or pg_default_sslmode(primary_host or host),
    )
