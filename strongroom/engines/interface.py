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


class FunctionEngine:
    """An Engine made of an engine package's functions: its ``backup_*`` and
    ``restore_*`` and its two summaries. ``one_stream``: the restore reports progress
    on one stream (a callback, not a factory of them)."""

    def __init__(
        self,
        name: str,
        label: str,
        request_type: type[BaseModel],
        *,
        backup: Callable[..., Manifest],
        restore: Callable[..., dict[str, Any]],
        backup_summary: Callable[[Mapping[str, Any], str], Summary],
        restore_summary: Callable[[Mapping[str, Any]], Summary],
        one_stream: bool = False,
    ) -> None:
        self.name = name
        self.label = label
        self.request_type = request_type
        self._backup = backup
        self._restore = restore
        self._backup_summary = backup_summary
        self._restore_summary = restore_summary
        self._one_stream = one_stream

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
        return self._backup(
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
        if not isinstance(request, self.request_type):
            raise TypeError(f"a {self.label} restore takes a {self.request_type.__name__}")
        stream: Any = progress
        if self._one_stream and progress is not None:
            stream = progress(f"restore {getattr(request, 'backup_id', 'latest')}", None)
        return self._restore(conn, repo, enc, request, progress=stream)

    def backup_summary(self, manifest: Mapping[str, Any], repository: str) -> Summary:
        return self._backup_summary(manifest, repository)

    def restore_summary(self, report: Mapping[str, Any]) -> Summary:
        return self._restore_summary(report)
