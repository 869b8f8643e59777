"""Connecting to PostgreSQL with bounded retries and classified, secret-free errors."""

from __future__ import annotations

import psycopg
from tenacity import (
    retry,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from strongroom.config import PostgresConnection
from strongroom.errors import AccessDenied, NotFound, ServiceUnavailable
from strongroom.redact import register, scrub

CONNECT_ATTEMPTS = 3


class _Transient(Exception):
    pass


def connect(conn: PostgresConnection, dbname: str | None = None) -> psycopg.Connection:
    """Open a connection (autocommit) or raise AccessDenied / ServiceUnavailable / NotFound."""
    register(*conn.secrets())
    database = dbname or conn.maintenance_db
    where = f"{conn.host}:{conn.port}/{database}"

    @retry(
        retry=retry_if_exception_type(_Transient),
        stop=stop_after_attempt(CONNECT_ATTEMPTS),
        wait=wait_exponential(multiplier=0.5, max=4),
        reraise=True,
    )
    def attempt() -> psycopg.Connection:
        try:
            return psycopg.connect(
                host=conn.host,
                port=conn.port,
                user=conn.user,
                password=conn.password.get_secret_value() if conn.password else None,
                dbname=database,
                sslmode=conn.sslmode,
                connect_timeout=conn.connect_timeout,
                application_name="strongroom",
                autocommit=True,
            )
        except psycopg.OperationalError as exc:
            text = scrub(str(exc)).strip().splitlines()
            message = text[-1] if text else "connection failed"
            lowered = str(exc).lower()
            if "password authentication failed" in lowered or "no password" in lowered:
                raise AccessDenied(f"PostgreSQL {where}: credentials refused") from None
            if "does not exist" in lowered and "database" in lowered:
                raise NotFound(f"PostgreSQL {where}: database does not exist") from None
            raise _Transient(message) from None

    try:
        return attempt()
    except _Transient as exc:
        raise ServiceUnavailable(
            f"PostgreSQL {where} unreachable after {CONNECT_ATTEMPTS} attempts: {exc}"
        ) from None
