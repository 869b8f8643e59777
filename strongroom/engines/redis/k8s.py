"""Restart a Redis StatefulSet through the Kubernetes API, for file restores.

Loading an RDB file means restarting Redis. On Kubernetes that is: read the
StatefulSet (its replica count and pod selector), scale it to 0 through the
``statefulsets/scale`` subresource, wait until none of its pods is left, let the
caller put the file on the volume (as the runner mounts it), scale back to the
replica count it had and wait until that many pods are Ready.

Credentials: the pod's service account (in-cluster) by default, or a kubeconfig
file and context. The bearer token is registered with the scrubber and never
put in a message; API errors are turned into strongroom errors that name the
verb and resource RBAC refused (see deployments/k8s/rbac-redis-restart.yaml).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config import ConfigException, load_kube_config
from kubernetes_asyncio.config.incluster_config import InClusterConfigLoader

from strongroom.engines.redis.conn import RedisConnection
from strongroom.errors import (
    AccessDenied,
    Conflict,
    InvalidInput,
    NotFound,
    ServiceUnavailable,
    StrongroomError,
    ToolFailed,
)
from strongroom.redact import register, scrub

TOKEN_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/token"  # noqa: S105 (a path)
CA_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
RBAC_FILE = "deployments/k8s/rbac-redis-restart.yaml"
POLL_INTERVAL = 0.25
MERGE_PATCH = "application/merge-patch+json"

T = TypeVar("T")


@dataclass(frozen=True)
class K8sSettings:
    """Which StatefulSet, and how to reach the API server."""

    statefulset: str
    namespace: str = "default"
    kubeconfig: str | None = None
    context: str | None = None
    timeout: float = 600.0

    @classmethod
    def from_connection(cls, conn: RedisConnection) -> K8sSettings:
        if not conn.k8s_statefulset:
            raise InvalidInput(f"target {conn.name!r} names no k8s_statefulset")
        return cls(
            statefulset=conn.k8s_statefulset,
            namespace=conn.k8s_namespace,
            kubeconfig=conn.k8s_kubeconfig,
            context=conn.k8s_context,
            timeout=conn.k8s_timeout,
        )

    @property
    def label(self) -> str:
        return f"StatefulSet {self.namespace}/{self.statefulset}"


def run_sync(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from sync code, also when this thread runs a loop."""
    try:
        asyncio.get_running_loop()
        in_loop = True
    except RuntimeError:
        in_loop = False
    if not in_loop:  # outside the except block: errors do not chain a RuntimeError
        return asyncio.run(factory())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


def selector_string(selector: k8s.V1LabelSelector | None) -> str:
    """A V1LabelSelector as the ``labelSelector`` query syntax."""
    if selector is None:
        return ""
    parts = [f"{k}={v}" for k, v in sorted((selector.match_labels or {}).items())]
    for expr in selector.match_expressions or []:
        values = ",".join(expr.values or [])
        op = expr.operator
        if op == "In":
            parts.append(f"{expr.key} in ({values})")
        elif op == "NotIn":
            parts.append(f"{expr.key} notin ({values})")
        elif op == "Exists":
            parts.append(expr.key)
        elif op == "DoesNotExist":
            parts.append(f"!{expr.key}")
        else:
            raise InvalidInput(f"unsupported label selector operator {op!r}")
    return ",".join(parts)


def _status_message(exc: ApiException) -> str:
    """The ``message`` of the Status object the API server sent, scrubbed."""
    try:
        body = json.loads(exc.body) if exc.body else {}
    except (ValueError, TypeError):
        body = {}
    message = body.get("message") if isinstance(body, dict) else None
    return scrub(str(message or exc.reason or "no details"))


@dataclass
class StatefulSetRestart:
    """Scale one StatefulSet down and back up, remembering what it had.

    ``environ``, ``token_file`` and ``ca_file`` are where the in-cluster credentials
    are read from (the service account mount by default).
    """

    settings: K8sSettings
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)
    token_file: str = TOKEN_FILE
    ca_file: str = CA_FILE
    original_replicas: int | None = None
    selector: str = ""
    uid: str | None = None
    api_host: str | None = None
    changed: bool = False
    facts: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    _api: k8s.ApiClient | None = field(default=None, repr=False)

    # -- credentials and calls ------------------------------------------------------

    async def _configuration(self) -> k8s.Configuration:
        cfg = k8s.Configuration()
        s = self.settings
        if s.kubeconfig:
            path = Path(s.kubeconfig)
            if not path.is_file():
                raise InvalidInput(f"k8s_kubeconfig {path} is not a file on this runner")
            try:
                await load_kube_config(
                    config_file=str(path),
                    context=s.context,
                    client_configuration=cfg,
                    persist_config=False,
                )
            except (ConfigException, OSError, ValueError, KeyError) as exc:
                raise InvalidInput(
                    f"k8s_kubeconfig {path}"
                    f"{f' context {s.context!r}' if s.context else ''} cannot be used: "
                    f"{scrub(str(exc))}"
                ) from None
        else:
            if s.context:
                raise InvalidInput("k8s_context needs k8s_kubeconfig (the file it is in)")
            try:
                InClusterConfigLoader(
                    token_filename=self.token_file,
                    cert_filename=self.ca_file,
                    environ=dict(self.environ),
                ).load_and_set(cfg)
            except (ConfigException, OSError) as exc:
                raise InvalidInput(
                    f"no Kubernetes credentials for {s.label}: this runner is not in a cluster "
                    f"({scrub(str(exc))}) and k8s_kubeconfig is not set. Run the flow in the "
                    f"cluster with a service account allowed by {RBAC_FILE}, set "
                    "k8s_kubeconfig (and k8s_context), or configure local commands instead, "
                    f"e.g. stop_command='kubectl -n {s.namespace} scale "
                    f"statefulset/{s.statefulset} --replicas=0' and start_command='kubectl "
                    f"-n {s.namespace} scale statefulset/{s.statefulset} --replicas=1'. "
                    "Nothing was changed"
                ) from None
        for value in cfg.api_key.values():
            if isinstance(value, str):
                register(value, value.removeprefix("Bearer ").strip())
        register(cfg.password or None)
        self.api_host = cfg.host
        return cfg

    async def _session(self, step: Callable[[], Awaitable[T]]) -> T:
        """Run one step (several API calls) on one client, with credentials loaded afresh."""
        cfg = await self._configuration()
        async with k8s.ApiClient(configuration=cfg) as api:
            self._api = api
            try:
                return await step()
            finally:
                self._api = None

    async def _call(
        self,
        verb: str,
        resource: str,
        body: Callable[[k8s.ApiClient], Awaitable[T]],
    ) -> T:
        """One API round trip; failures become strongroom errors."""
        if self._api is None:
            raise RuntimeError("Kubernetes API call outside a session")
        try:
            return await body(self._api)
        except ApiException as exc:
            raise self._api_error(exc, verb, resource) from None
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise ServiceUnavailable(
                f"Kubernetes API at {self.api_host} unreachable while trying to {verb} "
                f"{resource} of {self.settings.label}: {scrub(str(exc)) or type(exc).__name__}"
            ) from None
        except ValueError as exc:  # a reply the client models cannot hold
            raise ToolFailed(
                f"unexpected reply from the Kubernetes API to {verb} {resource} of "
                f"{self.settings.label}: {scrub(str(exc))}"
            ) from None

    def _api_error(self, exc: ApiException, verb: str, resource: str) -> StrongroomError:
        s = self.settings
        detail = _status_message(exc)
        where = f"{resource} in namespace {s.namespace!r}"
        if exc.status == 404:
            return NotFound(
                f"{s.label} does not exist or is not visible to these credentials "
                f"({verb} {where}: 404 {detail})"
            )
        if exc.status == 403:
            names = (
                f", resourceNames must include {s.statefulset!r}"
                if resource.startswith("statefulsets")
                else ""
            )
            return AccessDenied(
                f"RBAC refused verb {verb!r} on {where} for {s.label} (403 Forbidden: "
                f"{detail}); grant it to the runner's service account (see {RBAC_FILE}{names})"
            )
        if exc.status == 401:
            return AccessDenied(
                f"the Kubernetes API at {self.api_host} rejected the credentials (401 "
                f"Unauthorized) while trying to {verb} {where}: the service account token or "
                "the kubeconfig user is not valid"
            )
        if exc.status == 409:
            return Conflict(f"{verb} {where} for {s.label} conflicted (409: {detail})")
        return ToolFailed(f"{verb} {where} for {s.label} failed ({exc.status}: {detail})")

    def _timeout(self) -> float:
        return min(30.0, self.settings.timeout)

    async def _read(self) -> k8s.V1StatefulSet:
        s = self.settings

        async def get(api: k8s.ApiClient) -> k8s.V1StatefulSet:
            return await k8s.AppsV1Api(api).read_namespaced_stateful_set(
                s.statefulset, s.namespace, _request_timeout=self._timeout()
            )

        return await self._call("get", "statefulsets", get)

    async def _scale(self, replicas: int, *, dry_run: bool = False) -> None:
        s = self.settings

        async def patch(api: k8s.ApiClient) -> None:
            kwargs: dict[str, Any] = {
                "_request_timeout": self._timeout(),
                "_content_type": MERGE_PATCH,
            }
            if dry_run:
                kwargs["dry_run"] = "All"
            await k8s.AppsV1Api(api).patch_namespaced_stateful_set_scale(
                s.statefulset,
                s.namespace,
                {"spec": {"replicas": replicas}},
                **kwargs,
            )

        await self._call("patch", "statefulsets/scale", patch)

    async def _pods(self) -> list[k8s.V1Pod]:
        s = self.settings

        async def listing(api: k8s.ApiClient) -> list[k8s.V1Pod]:
            pods = await k8s.CoreV1Api(api).list_namespaced_pod(
                s.namespace, label_selector=self.selector, _request_timeout=self._timeout()
            )
            return list(pods.items or [])

        items = await self._call("list", "pods", listing)
        return [p for p in items if self._owned(p)]

    def _owned(self, pod: k8s.V1Pod) -> bool:
        refs = (pod.metadata.owner_references if pod.metadata else None) or []
        for ref in refs:
            if ref.kind == "StatefulSet" and ref.name == self.settings.statefulset:
                return self.uid is None or ref.uid in (None, self.uid)
        return False

    # -- the steps --------------------------------------------------------------------

    def inspect(self) -> dict[str, Any]:
        """Read the StatefulSet and prove every permission the restart needs; changes nothing."""
        return run_sync(lambda: self._session(self._inspect))

    async def _inspect(self) -> dict[str, Any]:
        sts = await self._read()
        s = self.settings
        self.uid = sts.metadata.uid if sts.metadata else None
        replicas = sts.spec.replicas if sts.spec and sts.spec.replicas is not None else 1
        if replicas < 1:
            raise InvalidInput(
                f"{s.label} is scaled to 0: Redis is not running, so there is nothing to "
                "restart. Scale it up first. Nothing was changed"
            )
        self.selector = selector_string(sts.spec.selector if sts.spec else None)
        if not self.selector:
            raise InvalidInput(f"{s.label} has an empty pod selector. Nothing was changed")
        self.original_replicas = replicas
        # authorization of the write, without persisting anything (dryRun=All)
        await self._scale(replicas, dry_run=True)
        pods = await self._pods()
        self.facts = {
            "statefulset": s.statefulset,
            "namespace": s.namespace,
            "api_server": self.api_host,
            "auth": "kubeconfig" if s.kubeconfig else "in-cluster",
            "original_replicas": replicas,
            "ready_replicas": (sts.status.ready_replicas or 0) if sts.status else 0,
            "selector": self.selector,
            "pods": sorted(p.metadata.name for p in pods if p.metadata),
        }
        return self.facts

    def scale_down(self) -> None:
        """Scale to 0 and wait until no pod of the StatefulSet is left."""
        run_sync(lambda: self._session(self._scale_down))

    async def _scale_down(self) -> None:
        if self.original_replicas is None:
            raise InvalidInput("inspect() the StatefulSet before scaling it")
        started = time.monotonic()
        try:
            await self._scale(0)
        except (AccessDenied, NotFound, InvalidInput, Conflict):
            raise  # refused: nothing was applied
        except BaseException:
            self.changed = True  # the request may have been applied
            raise
        self.changed = True
        deadline = started + self.settings.timeout
        while True:
            pods = await self._pods()
            if not pods:
                break
            if time.monotonic() > deadline:
                names = ", ".join(sorted(p.metadata.name for p in pods if p.metadata))
                raise ServiceUnavailable(
                    f"{self.settings.label} was scaled to 0 but {len(pods)} pod(s) still exist "
                    f"after {self.settings.timeout:.0f} s (k8s_timeout): {names}"
                )
            await asyncio.sleep(POLL_INTERVAL)
        self.timings["scale_down_s"] = round(time.monotonic() - started, 3)

    def scale_up(self) -> None:
        """Scale back to the original replica count and wait until they are all Ready."""
        run_sync(lambda: self._session(self._scale_up))

    async def _scale_up(self) -> None:
        replicas = self.original_replicas
        if replicas is None:
            raise InvalidInput("inspect() the StatefulSet before scaling it")
        started = time.monotonic()
        await self._scale(replicas)
        self.changed = False  # back at the original count; what is left is waiting
        deadline = started + self.settings.timeout
        while True:
            sts = await self._read()
            status = sts.status
            generation = sts.metadata.generation if sts.metadata else None
            observed = status.observed_generation if status else None
            ready = (status.ready_replicas or 0) if status else 0
            current = sts.spec.replicas if sts.spec else None
            if current != replicas:
                raise Conflict(
                    f"{self.settings.label} was scaled to {current} by someone else while "
                    f"strongroom waited for {replicas} Ready replica(s)"
                )
            if ready >= replicas and (generation is None or (observed or 0) >= generation):
                break
            if time.monotonic() > deadline:
                raise ServiceUnavailable(
                    f"{self.settings.label} was scaled back to {replicas} replica(s) but only "
                    f"{ready} became Ready within {self.settings.timeout:.0f} s (k8s_timeout)"
                )
            await asyncio.sleep(POLL_INTERVAL)
        self.timings["scale_up_s"] = round(time.monotonic() - started, 3)

    def report(self) -> dict[str, Any]:
        return {
            "statefulset": self.settings.statefulset,
            "namespace": self.settings.namespace,
            "original_replicas": self.original_replicas,
            **self.timings,
        }
