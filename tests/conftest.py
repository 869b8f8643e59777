"""Test-wide setup. Real services come from tests/fixtures (see tests/fixtures/*.py)."""

from typing import Any

import pytest

from tests.fixtures.prefect import isolate_prefect_env

# Before anything imports prefect: no analytics, throwaway PREFECT_HOME, no inherited API URL.
isolate_prefect_env()

from tests.fixtures.clickhouse import clickhouse_server, clickhouse_servers  # noqa: E402
from tests.fixtures.clickhouse_ch26 import clickhouse_ch26  # noqa: E402
from tests.fixtures.clickhouse_gauntlet import clickhouse_gauntlet  # noqa: E402
from tests.fixtures.pg_gauntlet import (  # noqa: E402
    pg_gauntlet,
    pg_gauntlet_local_backup,
    pg_gauntlet_s3_backup,
)
from tests.fixtures.postgres import pg_db, pg_server  # noqa: E402
from tests.fixtures.prefect import prefect_api  # noqa: E402
from tests.fixtures.redis import redis_server  # noqa: E402
from tests.fixtures.redis_cluster import (  # noqa: E402
    redis_cluster,
    redis_cluster_other_shape,
    redis_cluster_same_shape,
)
from tests.fixtures.redis_gauntlet import redis_gauntlet  # noqa: E402
from tests.fixtures.s3 import s3_bucket, s3_locked_bucket, s3_server  # noqa: E402
from tests.fixtures.seaweedfs import seaweed_locked_bucket, seaweed_server  # noqa: E402
from tests.fixtures.strongroom_fixtures import age_key, local_repo, s3_repo  # noqa: E402

__all__ = [
    "age_key",
    "clickhouse_ch26",
    "clickhouse_gauntlet",
    "clickhouse_server",
    "clickhouse_servers",
    "local_repo",
    "pg_db",
    "pg_gauntlet",
    "pg_gauntlet_local_backup",
    "pg_gauntlet_s3_backup",
    "pg_server",
    "prefect_api",
    "redis_cluster",
    "redis_cluster_other_shape",
    "redis_cluster_same_shape",
    "redis_gauntlet",
    "redis_server",
    "s3_bucket",
    "s3_locked_bucket",
    "s3_repo",
    "s3_server",
    "seaweed_locked_bucket",
    "seaweed_server",
]


# ---- suite-wide secrets scan --------------------------------------------------------------
# Every secret the code under test learned in this process (passwords, S3 secret keys, age
# identities, tokens: strongroom.redact's registry) must never show up in any test's
# captured stdout, stderr or log records. A hit fails that test, naming where it leaked
# (never the secret). Values shorter than 8 characters are left out: moto's "testing"
# credentials would match ordinary words.
SCAN_MIN_LENGTH = 8


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    from strongroom.redact import registered

    secrets = [s for s in registered() if len(s) >= SCAN_MIN_LENGTH]
    if not secrets:
        return
    leaked = [
        name
        for name, text in report.sections
        if name.endswith(f" {report.when}") and any(secret in text for secret in secrets)
    ]
    if leaked and not report.failed:
        report.outcome = "failed"
        report.longrepr = (
            f"a registered secret appeared in this test's captured output ({', '.join(leaked)}; "
            "the value is not shown)"
        )
