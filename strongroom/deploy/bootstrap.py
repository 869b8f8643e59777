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

Why this module: it applies a validated config to the Prefect API (the steps above,
importing Prefect lazily). The config model, its loading and the prefect.yaml rendering
live in ``bootstrap_config.py`` (no Prefect import); their names are re-exported here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from strongroom.deploy.bootstrap_config import (
    CONFIG_ENV,
    K8S_WORKDIR,
    ROOT,
    BootstrapConfig,
    DeploymentsSpec,
    EmailChannel,
    Notifications,
    SlackChannel,
    SmtpServer,
    WebhookChannel,
    WorkPoolSpec,
    declared_deployments,
    entrypoint_path,
    expand_env,
    flow_name_of,
    load_config,
    load_prefect_yaml,
    render_prefect_yaml,
)
from strongroom.errors import InvalidInput, StrongroomError

__all__ = [
    "CHANNEL_BLOCKS",
    "CONFIG_ENV",
    "K8S_WORKDIR",
    "ROOT",
    "STEPS",
    "BootstrapConfig",
    "DeploymentsSpec",
    "EmailChannel",
    "Notifications",
    "SlackChannel",
    "SmtpServer",
    "WebhookChannel",
    "WorkPoolSpec",
    "apply_automations",
    "apply_blocks",
    "apply_deployments",
    "apply_pools",
    "bootstrap",
    "build_automations",
    "declared_deployments",
    "entrypoint_path",
    "expand_env",
    "flow_name_of",
    "load_automation_declarations",
    "load_config",
    "load_prefect_yaml",
    "render_prefect_yaml",
    "strongroom_block_classes",
]

STEPS = ("blocks", "pools", "deployments", "automations")
CHANNEL_BLOCKS = {
    "slack": "strongroom-slack",
    "webhook": "strongroom-webhook",
    "email": "strongroom-email",
}


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

    data = dict(ProcessWorker.get_default_base_job_template())
    # one process per run, started by strongroom.deploy.engine_start (forked from a warm
    # starter when one runs); Prefect's own default adds a supervisor process per run
    command = data["variables"]["properties"]["command"]
    command["default"] = f"{sys.executable} -m strongroom.deploy.engine_start"
    return data


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

    from blocks import SmtpEmail

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
    if n.email is not None and n.email.smtp is not None:
        out["email"] = SmtpEmail(
            **n.email.smtp.model_dump(), sender_email=n.email.sender_email, to=list(n.email.to)
        )
    elif n.email is not None and n.email.sendgrid_api_key is not None:
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
