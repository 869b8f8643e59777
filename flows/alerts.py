"""Alert events: a failed or crashed operation run emits ``strongroom.<action>.failed``.

Prefect's own ``prefect.flow-run.Failed`` event carries no strongroom target and is
matched by the failed-run automation only for tagged deployment runs. A flow hook here
emits one strongroom event per failed run, on the target's resource
(``strongroom.target.<engine>.<target>``, the id the fleet and health events use), so
an automation can alert on e.g. "backup of shop failed: ServiceUnavailable" whatever
started the run. The payload holds the error class, its exit code and the message with
every registered secret scrubbed; never parameters or block contents. Wire it next to
the audit hook::

    @flow(name="backup-postgresql", on_failure=[alert_hook, audit_hook],
          on_crashed=[alert_hook, audit_hook], ...)
"""

from __future__ import annotations

import logging
from typing import Any

from strongroom.audit import action_for_flow
from strongroom.redact import scrub

log = logging.getLogger(__name__)

EVENT_PREFIX = "strongroom."
MESSAGE_LIMIT = 500


def related_resources(repository: str, engine: str | None, *tags: str) -> list[dict[str, str]]:
    """The related resources every strongroom event carries: the strongroom tag, extra
    tags, the repository, and the engine's tag."""
    related = [
        {"prefect.resource.id": f"prefect.tag.{tag}", "prefect.resource.role": "tag"}
        for tag in ("strongroom", *tags)
    ]
    related.append(
        {
            "prefect.resource.id": f"strongroom.repository.{repository}",
            "prefect.resource.role": "repository",
        }
    )
    if engine:
        related.append(
            {"prefect.resource.id": f"prefect.tag.{engine}", "prefect.resource.role": "tag"}
        )
    return related


def _error_of(state: Any) -> BaseException | None:
    try:  # _sync: a plain value also in an async flow's hook (backup-fleet)
        value = state.result(raise_on_failure=False, _sync=True)
    except BaseException as exc:  # some crashed states raise on read
        return exc
    return value if isinstance(value, BaseException) else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def failure_event(flow_name: str, flow_run: Any, state: Any) -> dict[str, Any]:
    """The ``emit_event`` keyword arguments describing one failed or crashed run."""
    params = dict(getattr(flow_run, "parameters", None) or {})
    action, engine = action_for_flow(flow_name, params)
    target = _text(params.get("target"))
    repository = _text(params.get("repository")) or "default"
    error = _error_of(state)
    message = str(error) if error is not None else (getattr(state, "message", None) or "")
    state_name = str(getattr(state, "name", None) or "Failed")
    if engine and target:
        resource = {
            "prefect.resource.id": f"strongroom.target.{engine}.{target}",
            "prefect.resource.name": f"{engine}/{target}",
            "strongroom.engine": engine,
            "strongroom.target": target,
        }
    else:
        resource = {
            "prefect.resource.id": f"strongroom.flow.{flow_name}",
            "prefect.resource.name": flow_name,
        }
    related = related_resources(repository, engine)
    run_id = getattr(flow_run, "id", None)
    if run_id is not None:
        related.append(
            {
                "prefect.resource.id": f"prefect.flow-run.{run_id}",
                "prefect.resource.role": "flow-run",
                "prefect.resource.name": str(getattr(flow_run, "name", "") or ""),
            }
        )
    return {
        "event": f"{EVENT_PREFIX}{action}.failed",
        "resource": resource,
        "related": related,
        "payload": {
            "flow": flow_name,
            "state": state_name,
            "engine": engine,
            "target": target,
            "repository": repository,
            "error_class": type(error).__name__ if error is not None else state_name,
            "exit_code": getattr(error, "exit_code", None),
            "message": scrub(message)[:MESSAGE_LIMIT],
            "flow_run_id": str(run_id) if run_id is not None else None,
        },
    }


def alert_hook(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect flow hook (on_failure / on_crashed): emit the failure event. Never raises:
    an alert that cannot be sent is logged; the run's outcome stands."""
    if getattr(state, "is_completed", lambda: False)():
        return
    try:
        from prefect.events import emit_event

        emit_event(**failure_event(str(getattr(flow, "name", "") or ""), flow_run, state))
    except Exception as exc:
        log.error("alert event could not be emitted: %s", scrub(f"{type(exc).__name__}: {exc}"))
