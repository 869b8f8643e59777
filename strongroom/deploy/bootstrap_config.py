"""The ``strongroom bootstrap`` config: its model, loading it, and the prefect.yaml it renders.

Why a module of its own: reading and validating the config (with ``${VAR}``
expansion) and rendering prefect.yaml for a work pool are pure work on files and
data; they import no Prefect, so ``strongroom up``, the CLI and the tests can use
them cheaply. ``bootstrap.py`` applies the result to a Prefect API.

The config (YAML, JSON or TOML) comes from ``--config FILE``, or from the environment
variable STRONGROOM_BOOTSTRAP_CONFIG (a path, or the document itself). ``${VAR}`` and
``${VAR:-default}`` in any string are replaced from the environment, so secrets can stay
out of the file. See deployments/bootstrap.example.yaml.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from strongroom.errors import InvalidInput

ROOT = Path(__file__).resolve().parents[2]  # the project: strongroom/deploy/<this>
CONFIG_ENV = "STRONGROOM_BOOTSTRAP_CONFIG"
K8S_WORKDIR = "/opt/strongroom"
# file-level PostgreSQL backups read the data directory: their deployments stay on the
# process pool of the worker next to PostgreSQL when the rest goes to Kubernetes
PG_FILES_POOL = "strongroom-pg-files"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WorkPoolSpec(_Model):
    name: str
    type: Literal["process", "kubernetes"]
    base_job_template: str | None = Field(
        default=None,
        description="JSON file (relative to the project); default for kubernetes: "
        "deployments/k8s-base-job-template.json; process: Prefect's default",
    )
    concurrency_limit: int | None = None


class DeploymentsSpec(_Model):
    work_pool: str = Field(default="strongroom-k8s", description="pool every deployment uses")
    prefect_file: str = "prefect.yaml"
    working_directory: str | None = Field(
        default=None,
        description="where runs find the code: default /opt/strongroom (the image) on "
        "kubernetes, this project folder on a process pool",
    )
    job_variables: dict[str, Any] = Field(
        default_factory=dict, description="merged into every deployment's job variables"
    )
    paused: bool = Field(default=False, description="apply schedules inactive")
    exclude: list[str] = Field(
        default_factory=list,
        description="flow/deployment name patterns (fnmatch) not to deploy, "
        "e.g. backup-fleet/clickhouse-* where there is no ClickHouse",
    )


class SlackChannel(_Model):
    webhook_url: SecretStr


class WebhookChannel(_Model):
    url: SecretStr
    headers: dict[str, str] = Field(default_factory=dict)


class SmtpServer(_Model):
    """A mail server to deliver alerts through (your own relay, SES SMTP, Office 365 ...)."""

    host: str
    port: int = Field(default=587, ge=1, le=65535)
    security: Literal["starttls", "ssl", "none"] = Field(
        default="starttls",
        description="starttls (port 587), ssl (implicit TLS, port 465) or none (a local relay)",
    )
    username: str | None = None
    password: SecretStr | None = None

    @model_validator(mode="after")
    def _credentials_together(self) -> SmtpServer:
        if (self.username is None) != (self.password is None):
            raise ValueError("smtp: username and password go together")
        return self


class EmailChannel(_Model):
    """Email alerts, over SMTP (``smtp``) or SendGrid's API (``sendgrid_api_key``)."""

    sender_email: str
    to: list[str] = Field(min_length=1)
    smtp: SmtpServer | None = None
    sendgrid_api_key: SecretStr | None = None

    @model_validator(mode="after")
    def _one_transport(self) -> EmailChannel:
        if (self.smtp is None) == (self.sendgrid_api_key is None):
            raise ValueError("email: give exactly one of smtp or sendgrid_api_key")
        return self


class Notifications(_Model):
    slack: SlackChannel | None = None
    webhook: WebhookChannel | None = None
    email: EmailChannel | None = None


def _default_pools() -> list[WorkPoolSpec]:
    return [
        WorkPoolSpec(name="strongroom-k8s", type="kubernetes"),
        WorkPoolSpec(name="strongroom-local", type="process"),
        WorkPoolSpec(name=PG_FILES_POOL, type="process"),
    ]


class BootstrapConfig(_Model):
    work_pools: list[WorkPoolSpec] = Field(default_factory=_default_pools)
    deployments: DeploymentsSpec = Field(default_factory=DeploymentsSpec)
    blocks: dict[str, dict[str, dict[str, Any]]] = Field(
        default_factory=dict, description="block type slug -> block name -> field values"
    )
    notifications: Notifications = Field(default_factory=Notifications)
    automations_file: str = "deployments/automations.yaml"


# ---- config loading ----------------------------------------------------------------------

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: Any, env: dict[str, str], missing: set[str]) -> Any:
    """Replace ${VAR} / ${VAR:-default} in every string of a nested structure."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            missing.add(name)
            return ""

        return _VAR.sub(sub, value)
    if isinstance(value, dict):
        return {k: expand_env(v, env, missing) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, env, missing) for v in value]
    return value


def _parse(text: str, suffix: str) -> Any:
    if suffix == ".toml":
        return tomllib.loads(text)
    if suffix == ".json":
        return json.loads(text)
    return yaml.safe_load(text)


_SUFFIXES = (".yaml", ".yml", ".json", ".toml")


def _read_raw(path: str | Path | None, env: dict[str, str]) -> Any:
    """The config document: from ``path``, else $STRONGROOM_BOOTSTRAP_CONFIG (a file name,
    or the YAML/JSON document itself), else nothing."""
    if path is None:
        source = env.get(CONFIG_ENV, "").strip()
        if not source:
            return {}
        if "\n" in source or Path(source).suffix not in _SUFFIXES:
            return _parse(source, ".yaml")
        path = source
    file = Path(path)
    if not file.is_file():
        raise InvalidInput(f"bootstrap config {str(file)!r} does not exist")
    return _parse(file.read_text(), file.suffix.lower())


def load_config(
    path: str | Path | None = None, env: dict[str, str] | None = None
) -> BootstrapConfig:
    """Read, expand and validate the bootstrap config (defaults when there is none)."""
    env = dict(os.environ if env is None else env)
    raw = _read_raw(path, env) or {}
    if not isinstance(raw, dict):
        raise InvalidInput("bootstrap config must be a mapping at the top level")
    missing: set[str] = set()
    expanded = expand_env(raw, env, missing)
    if missing:
        raise InvalidInput(
            "bootstrap config uses environment variables that are not set: "
            + ", ".join(sorted(missing))
        )
    try:
        return BootstrapConfig.model_validate(expanded)
    except ValueError as exc:
        raise InvalidInput(f"invalid bootstrap config: {exc}") from None


# ---- prefect.yaml ---------------------------------------------------------------------------


def entrypoint_path(entrypoint: str, root: Path = ROOT) -> Path:
    """The source file of ``package.module:function`` (or ``path/file.py:function``)."""
    where = entrypoint.partition(":")[0]
    if where.endswith(".py"):
        return root / where
    return root / (where.replace(".", "/") + ".py")


def flow_name_of(entrypoint: str, root: Path = ROOT) -> str | None:
    """The Prefect flow name behind an entrypoint (None if the code is not there).

    Reads the source with ``ast`` (nothing is imported): ``@flow(name=...)`` or the
    function name with underscores as dashes, as Prefect does.
    """
    func = entrypoint.partition(":")[2]
    path = entrypoint_path(entrypoint, root)
    if not path.is_file() or not func:
        return None
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == func:
            for deco in node.decorator_list:
                call = deco if isinstance(deco, ast.Call) else None
                target = call.func if call else deco
                if isinstance(target, ast.Name | ast.Attribute) and (
                    getattr(target, "id", None) == "flow" or getattr(target, "attr", None) == "flow"
                ):
                    for kw in call.keywords if call else []:
                        if kw.arg == "name" and isinstance(kw.value, ast.Constant):
                            return str(kw.value.value)
                    return func.replace("_", "-")
    return None


def load_prefect_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("deployments"), list):
        raise InvalidInput(f"{path} has no deployments list")
    return data


def declared_deployments(
    prefect_file: Path = ROOT / "prefect.yaml", root: Path | None = None
) -> list[dict[str, Any]]:
    """Every deployment of prefect.yaml with ``flow_name`` added (None: code missing);
    entrypoints are relative to ``root`` (default: the file's folder)."""
    root = root or prefect_file.resolve().parent
    out = []
    for dep in load_prefect_yaml(prefect_file)["deployments"]:
        out.append({**dep, "flow_name": flow_name_of(dep.get("entrypoint", ""), root)})
    return out


def render_prefect_yaml(
    spec: DeploymentsSpec, pool_type: str, prefect_file: Path
) -> tuple[dict[str, Any], list[str], list[str]]:
    """prefect.yaml for one pool; returns (document, deployed names, skipped reasons)."""
    data = load_prefect_yaml(prefect_file)
    root = prefect_file.resolve().parent
    workdir = spec.working_directory or (K8S_WORKDIR if pool_type == "kubernetes" else str(root))
    data.pop("definitions", None)  # anchors are already resolved by the YAML loader
    data["pull"] = [{"prefect.deployments.steps.set_working_directory": {"directory": workdir}}]
    kept, names, skipped = [], [], []
    for dep in declared_deployments(prefect_file):
        flow_name = dep.pop("flow_name")
        label = f"{flow_name}/{dep.get('name')}"
        if flow_name is None:
            skipped.append(f"{dep.get('entrypoint')} ({dep.get('name')}): flow code not found")
            continue
        if any(fnmatch.fnmatchcase(label, pattern) for pattern in spec.exclude):
            skipped.append(f"{label}: excluded by the config")
            continue
        pool = dict(dep.get("work_pool") or {})
        if pool_type == "kubernetes" and pool.get("name") == PG_FILES_POOL:
            dep["work_pool"] = {**pool, "job_variables": {}}  # no Job: the sidecar's worker
        else:
            kube = pool_type == "kubernetes"
            job_variables = dict(pool.get("job_variables") or {}) if kube else {}
            job_variables.update(spec.job_variables)
            dep["work_pool"] = {
                "name": spec.work_pool,
                "work_queue_name": pool.get("work_queue_name") or "default",
                "job_variables": job_variables,
            }
        if spec.paused:
            for schedule in dep.get("schedules") or []:
                schedule["active"] = False
        kept.append(dep)
        names.append(label)
    data["deployments"] = kept
    return data, names, skipped
