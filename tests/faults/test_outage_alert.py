"""A backup flow that fails because S3 is down emits a ``strongroom.backup.failed`` event.

The real ``backup-postgresql`` flow runs against a real Prefect API (test harness) with
an S3 repository block whose moto server has been stopped. The flow gets the alert hook
of ``flows.alerts`` (``with_options``, as the flow decorator will wire it); the event is
read back from the Prefect API.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from typing import Any

import pytest
from pydantic import SecretStr
from pyrage import x25519

from strongroom.errors import ServiceUnavailable
from tests.fixtures.postgres import PgDatabase
from tests.fixtures.s3 import MotoServer
from tests.fixtures.strongroom_fixtures import signing_block_fields

pytestmark = pytest.mark.slow


def _api(fn: Any) -> Any:
    from prefect.client.orchestration import get_client

    async def go() -> Any:
        async with get_client() as client:
            return await fn(client)

    return asyncio.run(go())


def _events(name: str, resource_id: str, since: dt.datetime, timeout: float = 30) -> list[Any]:
    from prefect.events.filters import (
        EventFilter,
        EventNameFilter,
        EventOccurredFilter,
        EventResourceFilter,
    )

    flt = EventFilter(
        event=EventNameFilter(name=[name]),
        resource=EventResourceFilter(id=[resource_id]),
        occurred=EventOccurredFilter.model_validate(
            {"since": since, "until": since + dt.timedelta(hours=1)}
        ),
    )
    deadline = time.monotonic() + timeout
    while True:
        found = list(_api(lambda c: c.read_events(filter=flt, limit=50)).events)
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_s3_outage_fails_the_backup_flow_and_emits_an_alert_event(
    prefect_api: str, pg_db: PgDatabase, own_moto: MotoServer
) -> None:
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    from blocks import BackupRepository, EncryptionKey, PostgresTarget, register_all
    from flows.alerts import alert_hook
    from flows.postgres import backup_postgresql

    register_all()
    tag = uuid.uuid4().hex[:8]
    identity = x25519.Identity.generate()
    s3_secret = f"s3-secret-{uuid.uuid4().hex}"
    server = pg_db.server
    secrets = {"postgres password": server.password, "s3 secret key": s3_secret}
    secrets["age identity"] = str(identity)
    EncryptionKey(recipients=[str(identity.to_public())], identity=SecretStr(str(identity))).save(
        f"outage-key-{tag}", overwrite=True
    )
    bucket = own_moto.create_bucket()
    creds = AwsCredentials(
        aws_access_key_id="sr-access",
        aws_secret_access_key=SecretStr(s3_secret),
        region_name="us-east-1",
        aws_client_parameters=AwsClientParameters(endpoint_url=own_moto.endpoint_url),
    )
    repository = f"outage-repo-{tag}"
    BackupRepository(
        **signing_block_fields(), s3_bucket=S3Bucket(bucket_name=bucket, credentials=creds)
    ).save(repository, overwrite=True)
    target = f"outage-{tag}"
    PostgresTarget(
        host=server.host,
        port=server.port,
        user=server.superuser,
        password=SecretStr(server.password),
        databases=[pg_db.name],
    ).save(target, overwrite=True)
    pg_db.psql("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1);")

    own_moto.stop()  # the storage is down for the whole run
    since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
    alerted = backup_postgresql.with_options(on_failure=[alert_hook], on_crashed=[alert_hook])
    with pytest.raises(ServiceUnavailable):
        alerted(target=target, repository=repository, encryption_key=f"outage-key-{tag}")

    events = _events("strongroom.backup.failed", f"strongroom.target.postgresql.{target}", since)
    assert len(events) == 1, events
    event = events[0]
    assert event.resource["strongroom.engine"] == "postgresql"
    assert event.resource["strongroom.target"] == target
    payload = event.payload
    assert payload["error_class"] == "ServiceUnavailable"
    assert payload["exit_code"] == ServiceUnavailable.exit_code
    assert payload["state"] == "Failed"
    assert (payload["engine"], payload["target"], payload["repository"]) == (
        "postgresql",
        target,
        repository,
    )
    assert payload["message"], "the alert must say what happened"
    related = {r.id: r for r in event.related}
    assert {"prefect.tag.strongroom", "prefect.tag.postgresql"} <= set(related)
    assert f"strongroom.repository.{repository}" in related
    run_id = payload["flow_run_id"]
    assert f"prefect.flow-run.{run_id}" in related
    flow_run = _api(lambda c: c.read_flow_run(uuid.UUID(run_id)))
    assert flow_run.state is not None and flow_run.state.is_failed()

    text = event.model_dump_json()
    leaks = [what for what, value in secrets.items() if value in text]
    assert not leaks, leaks
