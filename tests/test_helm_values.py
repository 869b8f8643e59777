"""deployments/helm/prefect-worker-values.yaml, the values for the official Prefect
worker chart (PrefectHQ/prefect-helm, chart prefect-worker), checked without Helm:

- the keys we set are keys of the chart (a typed model of the part of the chart's values
  we use, unknown keys refused);
- the worker Deployment the chart renders from them is valid Kubernetes, strictly, for
  the versions the raw manifests are validated for. ``chart_deployment`` mirrors what
  the chart's templates/deployment.yaml puts around our values: its own HOME, API URL and
  observer env, an emptyDir ``scratch`` mounted at /home/prefect and /tmp, the probe on
  port 8080; so a value that collides with those (a second ``scratch`` volume, a mount
  at /tmp, an env var set twice) fails here;
- it runs the same worker as deployments/k8s/worker.yaml: pool, API, image, security
  contexts, resources and the API-key Secret wiring.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from pydantic import BaseModel, ConfigDict

from strongroom.deploy.k8s import load_k8s_manifests, validate_manifest
from tests.test_deployments import K8S_VERSIONS

VALUES = Path(__file__).resolve().parents[1] / "deployments/helm/prefect-worker-values.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Image(_Strict):
    repository: str
    prefectTag: str
    pullPolicy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"


class Config(_Strict):
    workPool: str
    type: str = "kubernetes"
    installPolicy: Literal["always", "if-not-present", "never", "prompt"] = "prompt"
    workQueues: list[str] = []


class SelfHosted(_Strict):
    apiUrl: str


class Liveness(_Strict):
    enabled: bool
    config: dict[str, int] = {}


class Worker(_Strict):
    image: Image
    config: Config
    apiConfig: Literal["cloud", "customerManagedCloud", "selfHostedServer", "selfManagedCloud"]
    selfHostedServerApiConfig: SelfHosted | None = None
    livenessProbe: Liveness
    resources: dict[str, dict[str, str]]
    podSecurityContext: dict[str, Any]
    containerSecurityContext: dict[str, Any]
    extraEnvVars: list[dict[str, Any]] = []
    extraVolumes: list[dict[str, Any]] = []
    extraVolumeMounts: list[dict[str, Any]] = []


class ServiceAccount(_Strict):
    create: bool
    name: str


class Values(_Strict):
    namespaceOverride: str
    fullnameOverride: str
    serviceAccount: ServiceAccount
    worker: Worker


def chart_deployment(values: Values) -> dict[str, Any]:
    """The worker Deployment the chart renders for ``values`` (see the module docstring)."""
    w = values.worker
    assert w.selfHostedServerApiConfig is not None
    labels = {"app.kubernetes.io/name": "prefect-worker"}
    env = [
        {"name": "HOME", "value": "/home/prefect"},
        {"name": "PREFECT_WORKER_PREFETCH_SECONDS", "value": "10"},
        {"name": "PREFECT_WORKER_QUERY_SECONDS", "value": "5"},
        {"name": "PREFECT_API_ENABLE_HTTP2", "value": "true"},
        {"name": "PREFECT_API_URL", "value": w.selfHostedServerApiConfig.apiUrl},
        {"name": "PREFECT_KUBERNETES_CLUSTER_UID", "value": ""},
        {"name": "PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES", "value": "strongroom"},
        {"name": "PREFECT_DEBUG_MODE", "value": "false"},
        *w.extraEnvVars,
    ]
    args = ["prefect", "worker", "start", "--type", w.config.type, "--pool", w.config.workPool]
    args += ["--install-policy", w.config.installPolicy]
    container: dict[str, Any] = {
        "name": "prefect-worker",
        "image": f"{w.image.repository}:{w.image.prefectTag}",
        "imagePullPolicy": w.image.pullPolicy,
        "args": [*args, *(["--with-healthcheck"] if w.livenessProbe.enabled else [])],
        "workingDir": "/home/prefect",
        "env": env,
        "resources": w.resources,
        "securityContext": w.containerSecurityContext,
        "volumeMounts": [
            {"mountPath": "/home/prefect", "name": "scratch", "subPathExpr": "home"},
            {"mountPath": "/tmp", "name": "scratch", "subPathExpr": "tmp"},
            *w.extraVolumeMounts,
        ],
    }
    if w.livenessProbe.enabled:
        probe = {"httpGet": {"path": "/health", "port": 8080}, **w.livenessProbe.config}
        container["livenessProbe"] = probe
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": values.fullnameOverride, "namespace": values.namespaceOverride},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": values.serviceAccount.name,
                    "securityContext": w.podSecurityContext,
                    "containers": [container],
                    "volumes": [{"name": "scratch", "emptyDir": {}}, *w.extraVolumes],
                },
            },
        },
    }


def _values() -> Values:
    return Values.model_validate(yaml.safe_load(VALUES.read_text()))


def _duplicates(items: list[dict[str, Any]], key: str) -> list[str]:
    seen: list[str] = [item[key] for item in items]
    return sorted({k for k in seen if seen.count(k) > 1})


def _collisions(deployment: dict[str, Any]) -> list[str]:
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    return [
        *(f"volume {n}" for n in _duplicates(pod["volumes"], "name")),
        *(f"mount {p}" for p in _duplicates(container["volumeMounts"], "mountPath")),
        *(f"env {n}" for n in _duplicates(container["env"], "name")),
    ]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_chart_renders_a_valid_worker_from_our_values(version: str) -> None:
    deployment = chart_deployment(_values())
    assert _collisions(deployment) == []
    validate_manifest(deployment, version)


def test_a_value_colliding_with_the_chart_is_caught() -> None:
    raw = yaml.safe_load(VALUES.read_text())
    raw["worker"]["extraVolumes"] = [{"name": "scratch", "emptyDir": {}}]
    raw["worker"]["extraVolumeMounts"] = [{"name": "scratch", "mountPath": "/tmp"}]
    raw["worker"]["extraEnvVars"].append({"name": "HOME", "value": "/scratch"})
    found = _collisions(chart_deployment(Values.model_validate(raw)))
    assert found == ["volume scratch", "mount /tmp", "env HOME"]
    raw["worker"]["extraEnvVar"] = []  # a misspelt key
    with pytest.raises(ValueError, match="extraEnvVar"):
        Values.model_validate(raw)


def test_it_runs_the_same_worker_as_the_raw_manifest() -> None:
    raw = dict(((n, d["kind"]), d) for n, d in load_k8s_manifests())
    pod = raw[("worker.yaml", "Deployment")]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = container["args"]
    values = _values()
    w = values.worker
    assert w.config.workPool == args[args.index("--pool") + 1]
    assert w.config.type == args[args.index("--type") + 1]
    assert ("--with-healthcheck" in args) == w.livenessProbe.enabled
    env = {e["name"]: e for e in container["env"]}
    assert w.selfHostedServerApiConfig is not None
    assert w.selfHostedServerApiConfig.apiUrl == env["PREFECT_API_URL"]["value"]
    assert f"{w.image.repository}:{w.image.prefectTag}" == container["image"]
    assert w.podSecurityContext == pod["securityContext"]
    assert w.containerSecurityContext == container["securityContext"]
    assert w.resources == container["resources"]
    assert values.serviceAccount.name == pod["serviceAccountName"]
    assert values.namespaceOverride == raw[("worker.yaml", "Deployment")]["metadata"]["namespace"]
    ours = {e["name"]: e for e in w.extraEnvVars}
    for name, entry in env.items():
        if name.startswith("PREFECT_INTEGRATIONS_KUBERNETES_WORKER_") or name == "PREFECT_API_KEY":
            assert ours[name] == entry, name
    assert "value" not in ours["PREFECT_API_KEY"]  # the key only ever comes from the Secret
