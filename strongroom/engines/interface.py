"""The verbs every engine has, so flows, the CLI, the demo and drills treat engines alike.

An engine package (``strongroom/engines/<name>/``) holds its dump and restore code and
one ``engine.py`` whose ``ENGINE`` object satisfies ``Engine``: back up a target into a
repository, restore from a typed request, and say what a run's summary shows (the lines
and table rows that become a Prefect artifact and the CLI's output). ``registry.py``
finds an engine by name. What really differs per engine (its connection model, its
request fields, its drill adapter) stays in its package; the shapes around it are
written once by the callers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel

from strongroom.catalog import Manifest
from strongroom.config import EncryptionConfig, RepositoryConfig
from strongroom.pipeline import Progress
from strongroom.repository.base import Repository

ProgressFactory = Callable[[str, int | None], Progress]


@dataclass(frozen=True)
class Summary:
    """What one run shows: a title, markdown bullet lines, and table rows."""

    title: str
    lines: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    ok: bool = True  # False when the run's own checks (rows, keys, fingerprints) failed


class Engine(Protocol):
    """One database engine: see the module docstring."""

    name: str  # the engine key in manifests and the repository layout: "postgresql"
    label: str  # for people: "PostgreSQL"
    request_type: type[BaseModel]  # the typed restore request

    def backup(
        self,
        conn: Any,
        repo: Repository,
        repo_config: RepositoryConfig,
        enc: EncryptionConfig,
        *,
        labels: dict[str, str],
        progress: ProgressFactory | None,
        options: Mapping[str, Any],
    ) -> Manifest:
        """Back up every configured database of ``conn``; ``options`` are the engine's
        own backup options (Redis: ``method``); the manifest is signed and visible."""
        ...

    def restore(
        self,
        conn: Any,
        repo: Repository,
        enc: EncryptionConfig,
        request: Any,
        *,
        progress: ProgressFactory | None,
    ) -> dict[str, Any]:
        """Restore per ``request`` (an instance of ``request_type``): the plan of a dry
        run, or the report with the engine's checks."""
        ...

    def backup_summary(self, manifest: Mapping[str, Any], repository: str) -> Summary:
        """The summary of a finished backup (``manifest`` as JSON)."""
        ...

    def restore_summary(self, report: Mapping[str, Any]) -> Summary:
        """The summary of a restore or its plan; ``ok`` says whether its checks passed."""
        ...


def one_progress(factory: ProgressFactory | None, name: str) -> Progress | None:
    """A single progress callback for engines whose restore reports one stream."""
    return factory(name, None) if factory is not None else None
