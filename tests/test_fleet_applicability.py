"""Fleet runs include only the targets their kind applies to (flows.fleet.not_applicable):
WAL checks and base backups need ``pitr`` in the target block, drills ``drills``. The
others are skipped and listed in the run's artifact, not failed. Real Prefect API."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any

import pytest


def _fleet(**params: Any) -> Any:
    from flows.fleet import backup_fleet

    return asyncio.run(backup_fleet(return_state=True, **params))  # type: ignore[call-overload]


def _artifacts(api: str, flow_run_id: str) -> list[dict[str, Any]]:
    body = json.dumps({"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}).encode()
    request = urllib.request.Request(
        f"{api.rstrip('/')}/artifacts/filter",
        data=body,
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return list(json.loads(response.read()))


@pytest.fixture(scope="module")
def targets(prefect_api: str) -> str:
    from blocks import PostgresTarget, register_all

    register_all()
    PostgresTarget(host="127.0.0.2", port=1).save("fleet-logical-only", overwrite=True)
    PostgresTarget(host="127.0.0.2", port=1, pitr=True, drills=True).save(
        "fleet-pitr", overwrite=True
    )
    return prefect_api


def test_wal_check_skips_a_logical_only_target(targets: str) -> None:
    state = _fleet(engine="postgresql", kind="wal-check", targets=["fleet-logical-only"])
    assert state.is_completed(), state.message
    result = state.result()
    assert result["runs"] == []
    assert "PITR not enabled" in result["skipped"]["fleet-logical-only"]
    texts = " ".join(
        str(a.get("data")) for a in _artifacts(targets, str(state.state_details.flow_run_id))
    )
    assert "fleet-logical-only" in texts and "SKIPPED" in texts


def test_a_pitr_target_is_included_and_the_other_still_skipped(targets: str) -> None:
    # a deployment no test creates (tests/test_deployments.py applies prefect.yaml's,
    # with no worker, so a real name would wait for a worker): the included target's
    # child cannot start, the fleet fails for it alone, the logical-only one is listed
    state = _fleet(
        engine="postgresql",
        kind="wal-check",
        targets=["fleet-logical-only", "fleet-pitr"],
        deployment="wal-check-postgresql/never-deployed",
    )
    assert state.is_failed()
    assert "fleet-pitr" in (state.message or "")
    assert "fleet-logical-only" not in (state.message or "")
    drill = _fleet(engine="postgresql", kind="drill", targets=["fleet-logical-only"])
    assert drill.is_completed(), drill.message
    assert "no drill policy" in drill.result()["skipped"]["fleet-logical-only"]
