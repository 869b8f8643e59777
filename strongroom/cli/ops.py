"""Operator commands for the ``strongroom`` CLI: bootstrap, and the Kubernetes Job preview.

Wired into strongroom.cli.app with ``cli_ops.register(app)``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer


def register(app: typer.Typer) -> None:
    """Add ``bootstrap`` and ``render-job`` to the ``strongroom`` app."""
    from strongroom.cli.common import JsonOpt, _emit, _handled, out

    @app.command("bootstrap")
    def bootstrap_cmd(
        config: Path | None = typer.Option(
            None,
            "--config",
            "-c",
            help="YAML/JSON/TOML config (default: $STRONGROOM_BOOTSTRAP_CONFIG, else defaults).",
        ),
        only: list[str] = typer.Option(
            [], "--only", help="Run only these steps: blocks, pools, deployments, automations."
        ),
        as_json: bool = JsonOpt,
    ) -> None:
        """Idempotently set up a Prefect API for strongroom: block types and blocks, work
        pools, the deployments of prefect.yaml, notification blocks and automations."""
        with _handled(as_json):
            from strongroom.deploy.bootstrap import STEPS, bootstrap, load_config

            cfg = load_config(config)
            report = bootstrap(cfg, tuple(only) if only else STEPS)
            _emit(as_json, report, lambda: _print_report(out, report))

    @app.command("render-job")
    def render_job_cmd(
        deployment: str = typer.Argument(
            ..., help="flow/deployment, e.g. backup-postgresql/on-demand"
        ),
        param: list[str] = typer.Option([], "--param", "-p", help="key=value (JSON values)."),
        as_json: bool = JsonOpt,
    ) -> None:
        """Print the Kubernetes Job the worker would create for a run of DEPLOYMENT
        (rendered offline from prefect.yaml and the base job template)."""
        with _handled(as_json):
            from strongroom.deploy.bootstrap import declared_deployments
            from strongroom.deploy.k8s import render_job
            from strongroom.errors import InvalidInput, NotFound

            flow_name, _, name = deployment.partition("/")
            match = [
                d
                for d in declared_deployments()
                if d["flow_name"] == flow_name and d.get("name") == name
            ]
            if not match:
                raise NotFound(
                    f"no deployment {deployment!r} in prefect.yaml (or its code is missing)"
                )
            params: dict[str, Any] = {}
            for item in param:
                key, sep, value = item.partition("=")
                if not sep:
                    raise InvalidInput(f"--param {item!r}: expected key=value")
                try:
                    params[key] = json.loads(value)
                except ValueError:
                    params[key] = value
            dep = match[0]
            manifest = render_job(
                dict((dep.get("work_pool") or {}).get("job_variables") or {}),
                flow_name=flow_name,
                deployment_name=name,
                tags=list(dep.get("tags") or []),
                parameters={**(dep.get("parameters") or {}), **params},
            )
            if as_json:
                _emit(True, manifest, lambda: None)
            else:
                import yaml

                sys.stdout.write(yaml.safe_dump(manifest, sort_keys=False))


def _print_report(out: Any, report: dict[str, Any]) -> None:
    out.print(f"Prefect API: {report.get('api_url')}")
    blocks = report.get("blocks")
    if blocks is not None:
        out.print(f"block types: {', '.join(blocks['block_types'])}")
        out.print(f"blocks saved: {', '.join(blocks['blocks']) or 'none'}")
    for pool, action in (report.get("pools") or {}).items():
        out.print(f"work pool {pool}: {action}")
    deployments = report.get("deployments")
    if deployments is not None:
        out.print(f"deployments applied ({len(deployments['deployed'])}):")
        for name in deployments["deployed"]:
            out.print(f"  {name}")
        for reason in deployments["skipped"]:
            out.print(f"  [yellow]skipped[/yellow] {reason}")
    automations = report.get("automations")
    if automations is not None:
        out.print(f"notification channels: {', '.join(automations['channels']) or 'none'}")
        for name, action in automations["automations"].items():
            out.print(f"automation {name}: {action}")
        for reason in automations["skipped"]:
            out.print(f"  [yellow]skipped[/yellow] {reason}")
