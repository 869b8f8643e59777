"""Shared flow plumbing: loading blocks, retry rules, artifacts, secret-safe logging."""

from __future__ import annotations

import logging
from typing import Any

from prefect import Task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from blocks import REPOSITORY_BLOCK_SLUG, EncryptionKey
from blocks.repository_config import repository_config
from strongroom.config import EncryptionConfig, RepositoryConfig
from strongroom.errors import ServiceUnavailable
from strongroom.redact import install_log_filter, register
from strongroom.repository import Repository, open_repository
from strongroom.sizes import human_size

__all__ = [
    "TRANSIENT_TASK",
    "human_size",
    "load_key",
    "load_repository",
    "publish",
    "retry_transient",
    "secure_logging",
]

TRANSIENT_RETRIES = 2
RETRY_DELAY_S = 2.0


def secure_logging() -> None:
    """Make Prefect's handlers scrub registered secrets from every record."""
    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", ""):
        install_log_filter(logging.getLogger(name))


def load_block_data(slug: str, name: str) -> dict[str, Any]:
    """The data of block document ``slug/name`` with its secrets (nested blocks inline),
    read in one API call without importing the block's class (BackupRepository's pulls in
    prefect-aws); emits the ``prefect.block.<slug>.loaded`` event ``Block.load`` emits."""
    from prefect.client.orchestration import get_client
    from prefect.events import emit_event
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            doc = client.read_block_document_by_name(
                name=name, block_type_slug=slug, include_secrets=True
            )
        except ObjectNotFound:
            raise ValueError(
                f"Unable to find block document named {name} for block type {slug}"
            ) from None
    emit_event(
        event=f"prefect.block.{slug}.loaded",
        resource={
            "prefect.resource.id": f"prefect.block-document.{doc.id}",
            "prefect.resource.name": name,
        },
        related=[
            {
                "prefect.resource.id": f"prefect.block-type.{slug}",
                "prefect.resource.role": "block-type",
            }
        ],
    )
    return dict(doc.data or {})


def load_repository(name: str) -> tuple[Repository, RepositoryConfig]:
    config = repository_config(load_block_data(REPOSITORY_BLOCK_SLUG, name))
    register(*config.secrets())
    return open_repository(config), config


def load_key(name: str) -> EncryptionConfig:
    config = EncryptionKey.load(name, _sync=True).to_config()  # type: ignore[call-arg,union-attr]
    register(*config.secrets())
    return config


def retry_transient(task: Task[Any, Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry only when a server or the storage was unreachable, never on bad input."""
    try:
        state.result()
    except ServiceUnavailable:
        return True
    except Exception:
        return False
    return False


# ``@task(**TRANSIENT_TASK)``: retried only on transient failures (``retry_transient``),
# never cached (the arguments hold connections, repositories and keys).
TRANSIENT_TASK: dict[str, Any] = {
    "retries": TRANSIENT_RETRIES,
    "retry_delay_seconds": RETRY_DELAY_S,
    "retry_condition_fn": retry_transient,
    "cache_policy": NO_CACHE,
}


def _slug(text: str) -> str:
    out = "".join(ch if ch.isalnum() else "-" for ch in text.lower())
    return "-".join(filter(None, out.split("-")))[:60]


def publish(title: str, key: str, lines: list[str], rows: list[dict[str, Any]]) -> None:
    """A markdown summary and a table artifact for the current run."""
    body = f"# {title}\n\n" + "\n".join(lines)
    create_markdown_artifact(markdown=body, key=_slug(f"{key}-summary"), description=title)
    if rows:
        create_table_artifact(table=rows, key=_slug(f"{key}-table"), description=title)
