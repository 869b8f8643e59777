"""What every ``strongroom`` command module shares: consoles, common options, JSON output,
error-to-exit-code mapping and the progress bar. Kept apart from ``strongroom.cli.app`` so
command modules can import it without importing (and re-registering) the CLI itself.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console

from strongroom.errors import StrongroomError
from strongroom.redact import scrub

out = Console()
err = Console(stderr=True)

JsonOpt = typer.Option(False, "--json", help="Print one JSON document for scripts.")
RepoOpt = typer.Option("default", "--repository", "-r", help="BackupRepository block name.")
KeyOpt = typer.Option("default", "--key", "-k", help="EncryptionKey block name.")
RepoUrlOpt = typer.Option(
    None,
    "--repository-url",
    envvar="STRONGROOM_REPOSITORY_URL",
    help="Read file:///path or s3://bucket/prefix directly (no Prefect; AWS credentials "
    "from the environment or profile).",
)
TrustOpt = typer.Option(
    None,
    "--trust",
    envvar="STRONGROOM_TRUSTED_SIGNERS",
    help="PEM file of the Ed25519 public keys to trust (with --repository-url).",
)


def _emit(as_json: bool, data: Any, human: Callable[[], None]) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    else:
        human()


@contextmanager
def _handled(as_json: bool) -> Iterator[None]:
    """Map errors to exit codes and secret-free messages."""
    try:
        yield
    except StrongroomError as exc:
        message = scrub(str(exc))
        if as_json:
            sys.stdout.write(
                json.dumps({"ok": False, "error": message, "kind": type(exc).__name__}) + "\n"
            )
        err.print(f"[red]error:[/red] {message}", markup=True, highlight=False)
        raise typer.Exit(exc.exit_code) from None
    except (typer.Exit, KeyboardInterrupt):
        raise
    except Exception as exc:
        message = scrub(f"{type(exc).__name__}: {exc}")
        if as_json:
            sys.stdout.write(json.dumps({"ok": False, "error": message}) + "\n")
        err.print(f"[red]error:[/red] {message}", highlight=False)
        raise typer.Exit(1) from None


@contextmanager
def _progress(enabled: bool) -> Iterator[None]:
    """A rich progress bar per artifact while bytes stream (only on a terminal)."""
    from strongroom import progress

    if not enabled or not err.is_terminal:
        yield
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TransferSpeedColumn,
    )

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err,
        transient=True,
    )

    def reporter(name: str, total: int | None) -> Callable[[int], None]:
        task_id = bar.add_task(name, total=total)
        return lambda n: bar.advance(task_id, n)

    progress.install(reporter)
    try:
        with bar:
            yield
    finally:
        progress.install(None)


def preflight(blocks: Iterable[tuple[str, str]]) -> None:
    """Before a flow run: a Prefect API is configured and each ``(slug, name)`` block
    exists (``strongroom.cli.preflight``; exit 6 or 3 with a clear message otherwise)."""
    from strongroom.cli.preflight import require_blocks

    require_blocks(blocks)


def run_flow(
    as_json: bool,
    call: Callable[[], dict[str, Any]],
    show: Callable[[dict[str, Any]], None],
    needs: Iterable[tuple[str, str]] = (),
) -> None:
    """Run a flow (``call``) with the progress bar, print its result (``show``, or JSON
    with ``--json``) and map its errors to exit codes. First the ``needs`` blocks are
    checked (``preflight``): a missing one creates no flow run."""
    with _handled(as_json):
        preflight(needs)
        with _progress(not as_json), _foreground_run():
            result = call()
        _emit(as_json, result, lambda: show(result))


@contextmanager
def _foreground_run() -> Iterator[None]:
    """A flow run in the CLI's own process, watched by its operator: no heartbeat thread
    (heartbeats detect crashed unattended runs; the sync engine joins that thread at the
    end of the run, waiting out its 1 s sleep) unless PREFECT_FLOWS_HEARTBEAT_FREQUENCY
    is set."""
    import os

    if os.environ.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY"):
        yield
        return
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def print_summary(summary: Any, console: Console = out) -> None:
    """An engine's run summary (``strongroom.engines.interface.Summary``): the title, its
    lines without markdown, and its rows as a table (the flow run's artifacts hold the
    same)."""
    from rich.table import Table

    console.print(f"[bold]{summary.title}[/bold]", highlight=False)
    for line in summary.lines:
        console.print(line.replace("`", "").replace("**", ""), markup=False, highlight=False)
    if summary.rows:
        columns = list(dict.fromkeys(k for row in summary.rows for k in row))
        table = Table(*columns)
        for row in summary.rows:
            table.add_row(*(_cell(row.get(c, "")) for c in columns))
        console.print(table)


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return str(value)


def show_backup(engine: str, repository: str) -> Callable[[dict[str, Any]], None]:
    """Printer of a backup flow's manifest, by the engine's summary."""
    from strongroom.engines.registry import get_engine

    return lambda manifest: print_summary(get_engine(engine).backup_summary(manifest, repository))


def show_restore(engine: str) -> Callable[[dict[str, Any]], None]:
    """Printer of a restore flow's report or plan, by the engine's summary."""
    from strongroom.engines.registry import get_engine

    return lambda report: print_summary(get_engine(engine).restore_summary(report))


def _open_repo(repository: str) -> Any:
    """The repository of block ``repository``, able to sign (commands that write)."""
    from flows.common import load_repository
    from strongroom.cli.preflight import REPOSITORY_SLUG

    preflight([(REPOSITORY_SLUG, repository)])
    return load_repository(repository)[0]


def _read_repo(repository: str, url: str | None = None, trust: str | None = None) -> Any:
    """The repository for a read command, without Prefect when it can
    (``strongroom.cli.repo_source``)."""
    from strongroom.cli.repo_source import open_read_repository

    return open_read_repository(repository, url, trust)


def size(n: int) -> str:
    from strongroom.sizes import human_size

    return human_size(n)
