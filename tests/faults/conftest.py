"""Fixtures of the fault suite (the real servers come from tests/conftest.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from strongroom.config import PostgresConnection
from strongroom.sandbox.postgres import PostgresServer
from tests.faults._support import BIG_POPULATE
from tests.fixtures.postgres import PgDatabase
from tests.fixtures.s3 import MotoServer
from tests.fixtures.strongroom_fixtures import pg_connection


@pytest.fixture(scope="session")
def big_source(pg_server: PostgresServer) -> Iterator[PgDatabase]:
    """A ~45 MB database, created once; tests must not change it."""
    name = f"faults_big_{uuid.uuid4().hex[:8]}"
    pg_server.create_database(name)
    db = PgDatabase(pg_server, name)
    db.psql(BIG_POPULATE)
    try:
        yield db
    finally:
        pg_server.drop_database(name)


@pytest.fixture
def big_conn(big_source: PgDatabase) -> PostgresConnection:
    return pg_connection(big_source, "bigsrc")


@pytest.fixture
def own_moto() -> Iterator[MotoServer]:
    """A moto server of this test alone, which the test may stop (the session one is shared
    and must stay up)."""
    server = MotoServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
