"""No secret reaches the Prefect API: every flow-run log, task-run log, state message
and artifact of real backup and restore runs (one succeeding, two failing) is read back
through the Prefect client and searched for the PostgreSQL passwords, the S3 secret key
and the age identity.

The blocks are the ones operators use: a PostgresTarget with a password, a
BackupRepository wrapping prefect-aws S3Bucket/AwsCredentials (moto over HTTP, with a
secret key of the test's own) and an EncryptionKey holding the identity.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from pydantic import SecretStr
from pyrage import x25519

from strongroom.catalog import Catalog
from strongroom.repository.s3 import S3Repository
from tests.fixtures.postgres import PgDatabase
from tests.fixtures.s3 import MotoServer
from tests.fixtures.strongroom_fixtures import signing_block_fields

PAGE = 200


def _api(fn: Any) -> Any:
    from prefect.client.orchestration import get_client

    async def go() -> Any:
        async with get_client() as client:
            return await fn(client)

    return asyncio.run(go())


async def _all_logs(client: Any, **where: list[uuid.UUID]) -> list[Any]:
    from prefect.client.schemas.filters import LogFilter

    flt = LogFilter.model_validate({k: {"any_": v} for k, v in where.items()})
    found: list[Any] = []
    while True:
        page = await client.read_logs(log_filter=flt, limit=PAGE, offset=len(found))
        found.extend(page)
        if len(page) < PAGE:
            return found


async def _run_texts(client: Any, run_id: uuid.UUID) -> dict[str, list[str]]:
    """Every text the API holds for one flow run, by kind."""
    from prefect.client.schemas.filters import ArtifactFilter, FlowRunFilter

    flow_run = await client.read_flow_run(run_id)
    task_runs = await client.read_task_runs(
        flow_run_filter=FlowRunFilter.model_validate({"id": {"any_": [run_id]}})
    )
    task_ids = [t.id for t in task_runs]
    artifacts = await client.read_artifacts(
        artifact_filter=ArtifactFilter.model_validate({"flow_run_id": {"any_": [run_id]}})
    )
    flow_logs = await _all_logs(client, flow_run_id=[run_id])
    task_logs = await _all_logs(client, task_run_id=task_ids) if task_ids else []
    states = [flow_run.state, *(t.state for t in task_runs)]
    return {
        "flow-run log": [str(line.message) for line in flow_logs],
        "task-run log": [str(line.message) for line in task_logs],
        "artifact": [f"{a.key} {a.description} {a.data}" for a in artifacts],
        "state message": [str(s.message) for s in states if s is not None and s.message],
        "parameters": [str(flow_run.parameters)],
    }


def _run_id(state: Any) -> uuid.UUID:
    run_id = state.state_details.flow_run_id
    assert isinstance(run_id, uuid.UUID)
    return run_id


def test_no_secret_in_prefect_logs_artifacts_or_states(
    prefect_api: str, pg_db: PgDatabase, s3_server: MotoServer, s3_bucket: str
) -> None:
    from prefect.logging.handlers import APILogHandler
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    from blocks import BackupRepository, EncryptionKey, PostgresTarget, register_all
    from flows.postgres import backup_postgresql, restore_postgresql

    register_all()
    tag = uuid.uuid4().hex[:8]
    server = pg_db.server
    identity = x25519.Identity.generate()
    wrong_password = f"wrong-{uuid.uuid4().hex}"
    s3_secret = f"s3-secret-{uuid.uuid4().hex}"
    secrets = {
        "postgres password": server.password,
        "wrong postgres password": wrong_password,
        "s3 secret key": s3_secret,
        "age identity": str(identity),
    }
    key_block, repo_block = f"sec-key-{tag}", f"sec-repo-{tag}"
    EncryptionKey(recipients=[str(identity.to_public())], identity=SecretStr(str(identity))).save(
        key_block, overwrite=True
    )
    creds = AwsCredentials(
        aws_access_key_id="sr-access",
        aws_secret_access_key=SecretStr(s3_secret),
        region_name="us-east-1",
        aws_client_parameters=AwsClientParameters(endpoint_url=s3_server.endpoint_url),
    )
    BackupRepository(
        **signing_block_fields(),
        s3_bucket=S3Bucket(bucket_name=s3_bucket, credentials=creds),
        prefix="sec",
    ).save(repo_block, overwrite=True)
    good, bad = f"sec-{tag}", f"sec-bad-{tag}"
    for name, password in ((good, server.password), (bad, wrong_password)):
        PostgresTarget(
            host=server.host,
            port=server.port,
            user=server.superuser,
            password=SecretStr(password),
            databases=[pg_db.name],
        ).save(name, overwrite=True)
    pg_db.psql("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'x');")
    common = {"repository": repo_block, "encryption_key": key_block}

    # 1. a backup that succeeds
    backed = backup_postgresql(target=good, return_state=True, **common)
    assert backed.is_completed(), backed.message
    manifest = backed.result()
    # 2. a restore that fails on a truncated artifact (decryption and integrity errors)
    repo = BackupRepository.load(repo_block).to_config()  # type: ignore[union-attr]
    dump = next(a for a in manifest["artifacts"] if a["content"] == "pg_dump-custom")
    s3 = s3_server.s3()
    full = f"sec/{dump['key']}"
    body = s3.get_object(Bucket=s3_bucket, Key=full)["Body"].read()
    s3.put_object(Bucket=s3_bucket, Key=full, Body=body[:-10])
    assert [m.backup_id for m in Catalog(S3Repository(repo)).list()] == [manifest["backup_id"]]
    restored = restore_postgresql(
        target=good, target_database=f"{pg_db.name}_sec", return_state=True, **common
    )
    assert restored.is_failed(), restored
    # 3. a backup whose password the server refuses
    refused = backup_postgresql(target=bad, return_state=True, **common)
    assert refused.is_failed(), refused
    APILogHandler().flush()

    haystacks: dict[str, str] = {}
    counts: dict[str, int] = {}
    for what, state in (("backup", backed), ("failed restore", restored), ("refused", refused)):
        texts = _api(lambda c, s=state: _run_texts(c, _run_id(s)))
        for kind, items in texts.items():
            counts[f"{what} {kind}"] = len(items)
            haystacks[f"{what} {kind}"] = "\n".join(items)
    # the sweep read real material: logs of every run and of its tasks, the artifacts,
    # and the failures' messages
    for what in ("backup", "failed restore", "refused"):
        assert counts[f"{what} flow-run log"] > 0 and counts[f"{what} task-run log"] > 0, counts
    assert counts["backup artifact"] >= 2, counts
    assert counts["failed restore state message"] > 0, counts
    assert dump["name"] in haystacks["failed restore state message"], "the artifact is named"
    assert manifest["backup_id"] in haystacks["backup artifact"]

    leaks = [
        f"{what} found in {where}"
        for where, text in haystacks.items()
        for what, value in secrets.items()
        if value in text
    ]
    assert not leaks, leaks
