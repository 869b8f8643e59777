"""Who is acting, for audit events: the Prefect flow run (and deployment) if inside
one, else the CLI user or process. Split from ``strongroom.audit`` (which re-exports
``current_actor``) to keep that module small; it imports Prefect only if a flow run
is already in progress.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
import sys
from typing import Any

log = logging.getLogger(__name__)


def current_actor() -> dict[str, Any]:
    """Who is acting: the Prefect flow run (and deployment) if inside one, else the
    CLI user. ``STRONGROOM_AUDIT_ACTOR`` names a service account explicitly."""
    actor: dict[str, Any] = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    try:
        actor["user"] = getpass.getuser()
    except (KeyError, OSError):
        actor["user"] = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    explicit = os.environ.get("STRONGROOM_AUDIT_ACTOR")
    if explicit:
        actor["principal"] = explicit
    flow_run = _prefect_flow_run()
    if flow_run:
        actor.update(kind="prefect-flow-run", **flow_run)
    else:
        actor["kind"] = (
            "cli" if sys.argv and "strongroom" in os.path.basename(sys.argv[0]) else ("process")
        )
        actor.setdefault("command", " ".join(os.path.basename(a) for a in sys.argv[:2]))
    return actor


def _prefect_flow_run() -> dict[str, Any]:
    """Flow-run identity, only if Prefect is already loaded and a run is active."""
    if "prefect" not in sys.modules:
        return {}
    try:
        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
        if ctx is None or ctx.flow_run is None:
            return {}
        run = ctx.flow_run
        found: dict[str, Any] = {
            "flow_run_id": str(run.id),
            "flow_run_name": run.name,
            "flow_name": ctx.flow.name if ctx.flow is not None else None,
        }
        if run.deployment_id:
            found["deployment_id"] = str(run.deployment_id)
            try:
                from prefect.runtime import deployment

                found["deployment_name"] = deployment.name
            except Exception as exc:  # the API may be unreachable: the id is enough
                log.debug("deployment name unavailable: %s", exc)
        if run.tags:
            found["tags"] = sorted(run.tags)
        return found
    except Exception as exc:  # never let identity lookup break an operation
        log.debug("could not read the Prefect flow run context: %s", exc)
        return {}
