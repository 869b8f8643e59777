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
from strongroom.engines.postgres.psql import CONNECT_ATTEMPTS, connect_refusal
from strongroom.errors import ServiceUnavailable
from strongroom.redact import register, scrub


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
            refused = connect_refusal(where, str(exc))
            if refused is not None:
                raise refused from None
            raise _Transient(message) from None

    try:
        return attempt()
    except _Transient as exc:
        raise ServiceUnavailable(
            f"PostgreSQL {where} unreachable after {CONNECT_ATTEMPTS} attempts: {exc}"
        ) from None
