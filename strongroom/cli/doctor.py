"""``strongroom doctor [TARGET]``: is this runner ready to back up and restore?

One line per check (ok / warn / fail, the reason, what to do): the Prefect API, the block
types, the repository and key blocks, each target's (or TARGET's) connection, server
version and tools, WAL archiving of PITR targets, the repository's reachability, write
permission, versioning and object lock, and the clock against S3. Exit 0 when nothing
fails (warnings included), else the exit code of the first failing check's error class
(7 credentials refused, 6 unreachable, 3 not found, 8 a tool, 2 a configuration).
Blocks are read over plain HTTP: no Prefect import, no temporary server.
"""

from __future__ import annotations

from typing import Any

import typer

from strongroom.cli.common import JsonOpt, KeyOpt, RepoOpt

_MARK = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}


def _targets(api_url: str, target: str | None) -> list[tuple[str, str]]:
    from strongroom.cli import preflight
    from strongroom.errors import NotFound

    found: list[tuple[str, str]] = []
    every: list[str] = []
    for engine, slug in preflight.TARGET_SLUGS.items():
        names = preflight.block_names(slug, api_url)
        every += names
        found += [(engine, n) for n in names if target is None or n == target]
    if target is not None and not found:
        shown = ", ".join(preflight.nearest(target, every)[:5]) or "none"
        raise NotFound(f"no target block {target!r} (nearest first: {shown})")
    return found


def _block(slug: str, name: str, api_url: str) -> dict[str, Any]:
    """Block document data (secrets included); a missing one names the nearest (exit 3)."""
    from strongroom.cli import preflight
    from strongroom.cli.repo_source import fetch_block_data
    from strongroom.errors import NotFound

    try:
        return fetch_block_data(slug, name, api_url, timeout=10)
    except NotFound:
        names = preflight.block_names(slug, api_url, timeout=10)
        raise preflight.BlockNotFound(preflight.not_found_message(slug, name, names)) from None


def run_doctor(target: str | None, repository: str, key: str) -> list[Any]:
    """Every check, in order; nothing here raises for a failing check."""
    from strongroom.cli import doctor_checks as dc
    from strongroom.cli import preflight
    from strongroom.cli.repo_source import REPOSITORY_SLUG
    from strongroom.errors import ServiceUnavailable

    checks: list[dc.Check] = []
    api_url = preflight.configured_api_url()
    if not api_url:
        exc = ServiceUnavailable("no Prefect API configured (PREFECT_API_URL)")
        return [dc.fail("prefect-api", exc, "`make up` or `prefect server start`, then set it")]
    checks += dc.run_check(
        "prefect-api",
        "start it (`make up`) or fix PREFECT_API_URL",
        lambda: dc.prefect_api(api_url),
    )
    if checks[-1].status == dc.FAIL:
        return checks
    checks += dc.run_check(
        "block-types", "strongroom blocks register", lambda: dc.block_types(api_url)
    )
    from blocks.repository_config import repository_config

    def repo() -> list[dc.Check]:
        data = _block(REPOSITORY_SLUG, repository, api_url)
        try:
            config = repository_config(data)
        except ValueError as exc:
            raise dc.InvalidInput(f"repository block {repository!r}: {exc}") from None
        return dc.repository_checks(config)

    checks += dc.run_check("repository", f"create or fix the repository block {repository!r}", repo)
    checks += dc.run_check(
        "key-recipients",
        f"`strongroom keygen`, then a key block {key!r}",
        lambda: dc.key_checks(_block(preflight.KEY_SLUG, key, api_url), key),
    )
    checks += dc.library_tools()
    try:
        targets = _targets(api_url, target)
    except dc.StrongroomError as exc:
        checks.append(dc.fail("targets", exc, "check the name; `strongroom doctor` checks all"))
        return checks
    if not targets:
        checks.append(
            dc.warn("targets", "no target blocks yet", "create one (`strongroom bootstrap`)")
        )
    else:
        names = ", ".join(n for _, n in targets)
        checks.append(dc.ok("targets", f"{len(targets)} target(s): {names}"))
    for engine, name in targets:
        slug = preflight.TARGET_SLUGS[engine]
        checks += dc.run_check(
            f"{name}: connect",
            f"fix block {slug}/{name}",
            lambda e=engine, n=name, s=slug: dc.TARGET_CHECKS[e](  # type: ignore[misc]
                n, _block(s, n, api_url)
            ),
        )
    return checks


def exit_code(checks: list[Any]) -> int:
    return next((c.exit_code or 1 for c in checks if c.status == "fail"), 0)


def register(app: typer.Typer) -> None:
    @app.command("doctor")
    def doctor(
        target: str | None = typer.Argument(None, help="Check only this target block."),
        repository: str = RepoOpt,
        key: str = KeyOpt,
        as_json: bool = JsonOpt,
    ) -> None:
        """Check this runner: Prefect, blocks, targets, tools, repository, keys, clock."""
        import json

        checks = run_doctor(target, repository, key)
        code = exit_code(checks)
        if as_json:
            doc = {"ok": code == 0, "exit_code": code, "checks": [c.as_dict() for c in checks]}
            typer.echo(json.dumps(doc, indent=2))
        else:
            for c in checks:
                fix = f" -> {c.fix}" if c.fix and c.status != "ok" else ""
                typer.echo(f"{_MARK[c.status]} {c.name}: {c.reason}{fix}")
            fails = sum(c.status == "fail" for c in checks)
            warns = sum(c.status == "warn" for c in checks)
            typer.echo(f"{len(checks)} checks: {fails} failed, {warns} warnings")
        raise typer.Exit(code)
