"""``strongroom bootstrap``: bring a Prefect API to the state strongroom needs, idempotently.

Steps (each safe to repeat; a second run changes nothing that is already right):

1. ``blocks``: register strongroom's block types; create or update the blocks named in
   the config (targets, repository, encryption key; any registered block type).
2. ``pools``: create the work pools (the ``kubernetes`` pool with
   deployments/k8s-base-job-template.json, a ``process`` pool); update a pool whose
   base job template differs.
3. ``deployments``: render prefect.yaml for the chosen pool (work pool name, job
   variables, working directory; entries whose flow code does not exist yet are skipped
   and reported) and run ``prefect --no-prompt deploy --all`` on the rendered file.
4. ``automations``: create the notification blocks of the configured channels (Slack,
   generic webhook, email) and create or update (by name) the automations declared in
   deployments/automations.yaml.

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
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from strongroom.errors import InvalidInput, StrongroomError

ROOT = Path(__file__).resolve().parents[2]  # the project: strongroom/deploy/<this>
CONFIG_ENV = "STRONGROOM_BOOTSTRAP_CONFIG"
STEPS = ("blocks", "pools", "deployments", "automations")
K8S_WORKDIR = "/opt/strongroom"
CHANNEL_BLOCKS = {
    "slack": "strongroom-slack",
    "webhook": "strongroom-webhook",
    "email": "strongroom-email",
}


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


class EmailChannel(_Model):
    sendgrid_api_key: SecretStr
    sender_email: str
    to: list[str]


class Notifications(_Model):
    slack: SlackChannel | None = None
    webhook: WebhookChannel | None = None
    email: EmailChannel | None = None


def _default_pools() -> list[WorkPoolSpec]:
    return [
        WorkPoolSpec(name="strongroom-k8s", type="kubernetes"),
        WorkPoolSpec(name="strongroom-local", type="process"),
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
        job_variables = dict(pool.get("job_variables") or {}) if pool_type == "kubernetes" else {}
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


# ---- the steps -----------------------------------------------------------------------------


def strongroom_block_classes() -> list[Any]:
    """Every Block class defined in the ``blocks`` package (importing each module), so
    block types added later (ClickHouse, Redis, policies...) are registered too."""
    import importlib
    import pkgutil

    from prefect.blocks.core import Block

    import blocks

    found: dict[str, Any] = {}
    for module in pkgutil.iter_modules(blocks.__path__):
        mod = importlib.import_module(f"blocks.{module.name}")
        for value in vars(mod).values():
            if (
                isinstance(value, type)
                and issubclass(value, Block)
                and value.__module__ == mod.__name__
                and "_block_type_slug" in value.__dict__
            ):
                found[value.get_block_type_slug()] = value
    return [found[slug] for slug in sorted(found)]


def _block_class(slug: str) -> Any:
    from prefect.blocks.core import Block

    strongroom_block_classes()  # import them: the registry knows a class once imported
    try:
        return Block.get_block_class_from_key(slug)
    except KeyError:
        raise InvalidInput(f"unknown block type {slug!r} in the bootstrap config") from None


def apply_blocks(config: BootstrapConfig) -> dict[str, Any]:
    from blocks import register_all

    registered = set(register_all())
    for cls in strongroom_block_classes():
        if cls.get_block_type_slug() not in registered:
            cls.register_type_and_schema()
            registered.add(cls.get_block_type_slug())
    saved = []
    for slug, named in config.blocks.items():
        cls = _block_class(slug)
        for name, values in named.items():
            try:
                block = cls.model_validate(values or {})
            except ValueError as exc:
                raise InvalidInput(f"block {slug}/{name}: {exc}") from None
            block.save(name, overwrite=True)
            saved.append(f"{slug}/{name}")
    return {"block_types": sorted(registered), "blocks": saved}


def _pool_template(spec: WorkPoolSpec) -> dict[str, Any]:
    if spec.base_job_template:
        data: dict[str, Any] = json.loads((ROOT / spec.base_job_template).read_text())
        return data
    if spec.type == "kubernetes":
        from strongroom.deploy.k8s import load_base_job_template

        return load_base_job_template()
    from prefect.workers.process import ProcessWorker

    return dict(ProcessWorker.get_default_base_job_template())


async def _apply_pools(config: BootstrapConfig) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    result: dict[str, str] = {}
    async with get_client() as client:
        for spec in config.work_pools:
            template = _pool_template(spec)
            try:
                pool = await client.read_work_pool(spec.name)
            except ObjectNotFound:
                await client.create_work_pool(
                    WorkPoolCreate(
                        name=spec.name,
                        type=spec.type,
                        base_job_template=template,
                        concurrency_limit=spec.concurrency_limit,
                        description=f"strongroom ({spec.type})",
                    )
                )
                result[spec.name] = "created"
                continue
            if pool.type != spec.type:
                raise InvalidInput(
                    f"work pool {spec.name!r} exists with type {pool.type!r}, "
                    f"config says {spec.type!r}"
                )
            if (
                pool.base_job_template != template
                or pool.concurrency_limit != spec.concurrency_limit
            ):
                await client.update_work_pool(
                    spec.name,
                    WorkPoolUpdate(
                        base_job_template=template, concurrency_limit=spec.concurrency_limit
                    ),
                )
                result[spec.name] = "updated"
            else:
                result[spec.name] = "unchanged"
    return result


def apply_pools(config: BootstrapConfig) -> dict[str, str]:
    from prefect.utilities.asyncutils import run_coro_as_sync

    result: dict[str, str] = run_coro_as_sync(_apply_pools(config))
    return result


def _prefect_cli() -> list[str]:
    script = Path(sys.executable).parent / "prefect"
    return [str(script)] if script.exists() else [sys.executable, "-m", "prefect"]


def apply_deployments(config: BootstrapConfig) -> dict[str, Any]:
    spec = config.deployments
    pool = next((p for p in config.work_pools if p.name == spec.work_pool), None)
    if pool is None:
        raise InvalidInput(
            f"deployments.work_pool {spec.work_pool!r} is not one of the config's work_pools"
        )
    prefect_file = (ROOT / spec.prefect_file).resolve()
    document, names, skipped = render_prefect_yaml(spec, pool.type, prefect_file)
    if not names:
        return {"deployed": [], "skipped": skipped}
    with tempfile.TemporaryDirectory(prefix="strongroom-deploy-") as tmp:
        rendered = Path(tmp) / "prefect.yaml"
        rendered.write_text(yaml.safe_dump(document, sort_keys=False))
        from prefect.settings import get_current_settings

        # the same API (and key) as this process, also when set in-process or by a profile
        current = get_current_settings().to_environment_variables(exclude_unset=True)
        env = {**os.environ, **current, "PREFECT_CLI_PROMPT": "false", "COLUMNS": "200"}
        result = subprocess.run(
            [*_prefect_cli(), "--no-prompt", "deploy", "--all", "--prefect-file", str(rendered)],
            cwd=prefect_file.parent,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-25:])
        raise StrongroomError(f"prefect deploy failed (exit {result.returncode}):\n{tail}")
    return {"deployed": names, "skipped": skipped}


def _channel_blocks(config: BootstrapConfig) -> dict[str, Any]:
    """Notification blocks for the configured channels (not saved)."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock, SendgridEmail

    n = config.notifications
    out: dict[str, Any] = {}
    if n.slack is not None:
        out["slack"] = CustomWebhookNotificationBlock.model_validate(
            {
                "name": "strongroom-slack",
                "url": "{{slack_webhook_url}}",
                # a Slack incoming-webhook payload (mrkdwn text)
                "json_data": {"text": "*{{subject}}*\n{{body}}"},
                "secrets": {"slack_webhook_url": n.slack.webhook_url.get_secret_value()},
            }
        )
    if n.webhook is not None:
        out["webhook"] = CustomWebhookNotificationBlock.model_validate(
            {
                "name": "strongroom-webhook",
                "url": "{{webhook_url}}",
                "json_data": {"source": "strongroom", "subject": "{{subject}}", "body": "{{body}}"},
                "headers": dict(n.webhook.headers) or None,
                "secrets": {"webhook_url": n.webhook.url.get_secret_value()},
            }
        )
    if n.email is not None:
        out["email"] = SendgridEmail(
            api_key=n.email.sendgrid_api_key,
            sender_email=n.email.sender_email,
            to_emails=list(n.email.to),
        )
    return out


def load_automation_declarations(path: Path) -> list[dict[str, Any]]:
    data = yaml.safe_load(path.read_text()) or {}
    items = data.get("automations")
    if not isinstance(items, list):
        raise InvalidInput(f"{path} has no automations list")
    return items


def build_automations(
    declarations: list[dict[str, Any]], channel_ids: dict[str, Any]
) -> tuple[list[Any], list[str]]:
    """Prefect AutomationCore objects; automations with no configured channel are skipped."""
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import AutomationCore

    built, skipped = [], []
    for decl in declarations:
        channels = [c for c in decl.get("channels", []) if c in channel_ids]
        if not channels:
            skipped.append(f"{decl['name']}: no configured channel")
            continue
        actions = [
            SendNotification(
                block_document_id=channel_ids[c], subject=decl["subject"], body=decl["body"]
            )
            for c in channels
        ]
        built.append(
            AutomationCore.model_validate(
                {
                    "name": decl["name"],
                    "description": decl.get("description", ""),
                    "enabled": decl.get("enabled", True),
                    "tags": ["strongroom"],
                    "trigger": decl["trigger"],
                    "actions": actions,
                }
            )
        )
    return built, skipped


async def _apply_automations(automations: list[Any]) -> dict[str, str]:
    from prefect.client.orchestration import get_client

    result: dict[str, str] = {}
    async with get_client() as client:
        for automation in automations:
            existing = await client.read_automations_by_name(automation.name)
            if not existing:
                await client.create_automation(automation)
                result[automation.name] = "created"
                continue
            keep, *duplicates = existing
            for extra in duplicates:
                await client.delete_automation(extra.id)
            if _comparable(keep) == _comparable(automation):
                result[automation.name] = "unchanged"
            else:
                await client.update_automation(keep.id, automation)
                result[automation.name] = "updated"
    return result


def _comparable(automation: Any) -> dict[str, Any]:
    """What makes two automations the same for bootstrap: their AutomationCore fields."""
    from prefect.events.schemas.automations import AutomationCore

    data: dict[str, Any] = json.loads(
        automation.model_dump_json(
            include=set(AutomationCore.model_fields), exclude={"trigger": {"id"}}
        )
    )
    return _sorted_sets(data)


def _sorted_sets(value: Any) -> Any:
    """Triggers hold ``expect``/``after`` as sets: their JSON order depends on insertion
    and hashing, so compare them sorted (else an unchanged automation reads as updated)."""
    if isinstance(value, dict):
        return {
            k: sorted(v) if k in ("expect", "after") and isinstance(v, list) else _sorted_sets(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_sorted_sets(v) for v in value]
    return value


def apply_automations(config: BootstrapConfig) -> dict[str, Any]:
    from prefect.utilities.asyncutils import run_coro_as_sync

    channel_ids = {}
    for channel, block in _channel_blocks(config).items():
        channel_ids[channel] = block.save(CHANNEL_BLOCKS[channel], overwrite=True)
    declarations = load_automation_declarations(ROOT / config.automations_file)
    automations, skipped = build_automations(declarations, channel_ids)
    applied = run_coro_as_sync(_apply_automations(automations))
    return {"channels": sorted(channel_ids), "automations": applied, "skipped": skipped}


def bootstrap(config: BootstrapConfig, steps: tuple[str, ...] = STEPS) -> dict[str, Any]:
    """Run the chosen steps in order; returns what each step did."""
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise InvalidInput(f"unknown bootstrap step(s): {', '.join(unknown)}; known: {STEPS}")
    from prefect.settings import PREFECT_API_URL

    report: dict[str, Any] = {"api_url": PREFECT_API_URL.value() or "(ephemeral)"}
    actions = {
        "blocks": apply_blocks,
        "pools": apply_pools,
        "deployments": apply_deployments,
        "automations": apply_automations,
    }
    for step in STEPS:
        if step in steps:
            report[step] = actions[step](config)
    return report
