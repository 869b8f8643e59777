"""The verbs every engine has, so flows, the CLI, the demo and drills treat engines alike.

An engine package (``strongroom/engines/<name>/``) holds its dump and restore code and
one ``engine.py`` whose ``ENGINE`` is an ``Engine``: back up a target into a
repository, restore from a typed request, and say what a run's summary shows (the lines
and table rows that become a Prefect artifact and the CLI's output). ``registry.py``
finds an engine by name. What really differs per engine (its connection model, its
request fields, its drill adapter) stays in its package; the shapes around it are
written once by the callers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

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


@dataclass(frozen=True)
class Engine:
    """One database engine, made of its package's functions (see the module docstring).

    ``backup`` / ``restore`` are the package's ``backup_*`` and ``restore_*`` (called
    through the methods of the same name below); ``one_stream``: the restore reports
    progress on one stream (a callback, not a factory of them)."""

    name: str  # the engine key in manifests and the repository layout: "postgresql"
    label: str  # for people: "PostgreSQL"
    request_type: type[BaseModel]  # the typed restore request
    backup_fn: Callable[..., Manifest]
    restore_fn: Callable[..., dict[str, Any]]
    # the title, lines and rows of a finished backup (manifest as JSON, repository)
    backup_summary: Callable[[Mapping[str, Any], str], Summary]
    # the same for a restore or its plan; ``ok`` says whether its checks passed
    restore_summary: Callable[[Mapping[str, Any]], Summary]
    one_stream: bool = False

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
        return self.backup_fn(
            conn, repo, repo_config, enc, labels=labels, progress=progress, **options
        )

    def restore(
        self,
        conn: Any,
        repo: Repository,
        enc: EncryptionConfig,
        request: Any,
        *,
        progress: ProgressFactory | None,
    ) -> dict[str, Any]:
        """Restore per ``request`` (an instance of ``request_type``, refused otherwise):
        the plan of a dry run, or the report with the engine's checks."""
        if not isinstance(request, self.request_type):
            raise TypeError(f"a {self.label} restore takes a {self.request_type.__name__}")
        stream: Any = progress
        if self.one_stream and progress is not None:
            stream = progress(f"restore {getattr(request, 'backup_id', 'latest')}", None)
        return self.restore_fn(conn, repo, enc, request, progress=stream)
