"""The Kubernetes side of deployment, offline: the work pool's base job template and the
Job the prefect-kubernetes worker would create for a deployment's flow run.

``render_job`` runs the worker's own code (``KubernetesWorkerJobConfiguration``:
``from_template_and_values`` then ``prepare_for_flow_run``) on a synthetic flow run, so
the manifest it returns is what ``kubectl get job -o yaml`` would show minus the fields
the API server fills in. No cluster and no Prefect server are contacted.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # the project: strongroom/deploy/<this>
DEPLOYMENTS_DIR = ROOT / "deployments"
BASE_JOB_TEMPLATE = DEPLOYMENTS_DIR / "k8s-base-job-template.json"
K8S_MANIFESTS_DIR = DEPLOYMENTS_DIR / "k8s"
# Nothing listens here: the client is only handed to the worker's templating, which calls
# the API solely for {{ prefect.blocks... }} / {{ prefect.variables... }} references.
_UNUSED_API = "http://127.0.0.1:9/api"
# What a worker in the cluster would pass on to the Job (docs/deploy-kubernetes.md).
IN_CLUSTER_API = "http://prefect-server.prefect.svc.cluster.local:4200/api"


def load_base_job_template(path: Path = BASE_JOB_TEMPLATE) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


async def _render(
    template: dict[str, Any],
    job_variables: dict[str, Any],
    *,
    flow_name: str,
    deployment_name: str,
    tags: list[str],
    parameters: dict[str, Any],
    work_pool_name: str,
    api_url: str,
) -> dict[str, Any]:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.objects import Flow, FlowRun, WorkPool
    from prefect.client.schemas.responses import DeploymentResponse
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    flow = Flow(id=uuid.uuid4(), name=flow_name, labels={})
    work_pool = WorkPool(
        name=work_pool_name,
        type="kubernetes",
        base_job_template=template,
        default_queue_id=uuid.uuid4(),
    )
    deployment = DeploymentResponse(
        id=uuid.uuid4(),
        name=deployment_name,
        flow_id=flow.id,
        tags=tags,
        parameters=parameters,
        job_variables=job_variables,
        work_pool_name=work_pool_name,
        labels={},
    )
    flow_run = FlowRun(
        id=uuid.uuid4(),
        name="rendered-offline",
        flow_id=flow.id,
        deployment_id=deployment.id,
        parameters=parameters,
        tags=tags,
        work_pool_name=work_pool_name,
    )
    async with PrefectClient(_UNUSED_API) as client:
        config = await KubernetesWorkerJobConfiguration.from_template_and_values(
            base_job_template=template, values=dict(job_variables), client=client
        )
    # the environment the worker passes on comes from its own settings: an in-cluster API
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        config.prepare_for_flow_run(
            flow_run=flow_run,
            deployment=deployment,
            flow=flow,
            work_pool=work_pool,
            worker_name="strongroom-render",
        )
    manifest: dict[str, Any] = config.job_manifest
    return manifest


def render_job(
    job_variables: dict[str, Any],
    *,
    flow_name: str,
    deployment_name: str,
    tags: list[str] | None = None,
    parameters: dict[str, Any] | None = None,
    template: dict[str, Any] | None = None,
    work_pool_name: str = "strongroom-k8s",
    api_url: str = IN_CLUSTER_API,
) -> dict[str, Any]:
    """The batch/v1 Job the Kubernetes worker would submit for one run of a deployment."""
    return asyncio.run(
        _render(
            template if template is not None else load_base_job_template(),
            job_variables,
            flow_name=flow_name,
            deployment_name=deployment_name,
            tags=list(tags or []),
            parameters=dict(parameters or {}),
            work_pool_name=work_pool_name,
            api_url=api_url,
        )
    )


def validate_manifest(manifest: dict[str, Any], kubernetes_version: str) -> None:
    """Strict schema validation (unknown fields are errors). Needs ``kubernetes-validate``."""
    import kubernetes_validate

    kubernetes_validate.validate(manifest, kubernetes_version, strict=True)


def load_k8s_manifests(directory: Path = K8S_MANIFESTS_DIR) -> list[tuple[str, dict[str, Any]]]:
    """Every YAML document under deployments/k8s/, as (file name, document)."""
    import yaml

    docs: list[tuple[str, dict[str, Any]]] = []
    for path in sorted(directory.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs
