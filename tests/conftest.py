"""Test-wide setup. Real services come from tests/fixtures (see tests/fixtures/*.py)."""

from tests.fixtures.prefect import isolate_prefect_env

# Before anything imports prefect: no analytics, throwaway PREFECT_HOME, no inherited API URL.
isolate_prefect_env()

from tests.fixtures.clickhouse import clickhouse_server  # noqa: E402
from tests.fixtures.postgres import pg_db, pg_server  # noqa: E402
from tests.fixtures.prefect import prefect_api  # noqa: E402
from tests.fixtures.redis import redis_server  # noqa: E402
from tests.fixtures.s3 import s3_bucket, s3_locked_bucket, s3_server  # noqa: E402
from tests.fixtures.strongroom_fixtures import age_key, local_repo, s3_repo  # noqa: E402

__all__ = [
    "age_key",
    "clickhouse_server",
    "local_repo",
    "pg_db",
    "pg_server",
    "prefect_api",
    "redis_server",
    "s3_bucket",
    "s3_locked_bucket",
    "s3_repo",
    "s3_server",
]
