"""Read commands over the catalog (``list``, ``show``, ``verify``) and key/block set-up.

``strongroom.cli.app`` calls ``register(app, blocks_app)``. ``list`` and ``show`` read the
repository directly (fast, no Prefect run); ``verify`` runs the verify flow.
"""

from __future__ import annotations

from typing import Any

import typer

from strongroom.cli.common import (
    JsonOpt,
    KeyOpt,
    RepoOpt,
    RepoUrlOpt,
    TrustOpt,
    _emit,
    _handled,
    _progress,
    _read_repo,
    out,
    preflight,
    size,
)
from strongroom.cli.preflight import flow_blocks


def register(app: typer.Typer, blocks_app: typer.Typer) -> None:
    app.command("list")(list_cmd)
    app.command("show")(show_cmd)
    app.command("verify")(verify_cmd)
    app.command("keygen")(keygen_cmd)
    blocks_app.command("register")(blocks_register_cmd)


def list_cmd(
    engine: str | None = typer.Option(None, help="postgresql, clickhouse or redis."),
    target: str | None = typer.Option(None),
    repository: str = RepoOpt,
    drills: bool = typer.Option(False, "--drills", help="List restore drill records instead."),
    repository_url: str | None = RepoUrlOpt,
    trust: str | None = TrustOpt,
    as_json: bool = JsonOpt,
) -> None:
    """List backups (or, with --drills, restore drill records), oldest first."""
    with _handled(as_json):
        from strongroom.catalog import Catalog

        if drills:
            from strongroom.cli.policy import print_drills
            from strongroom.drills import list_drills

            drill_rows = list_drills(_read_repo(repository, repository_url, trust), engine, target)
            _emit(as_json, drill_rows, lambda: print_drills(drill_rows))
            return

        from strongroom.copying import copies_by_backup, list_copies

        repo = _read_repo(repository, repository_url, trust)
        manifests = Catalog(repo).list(engine, target)
        copies = copies_by_backup(list_copies(repo, engine, target)[0])
        rows = [
            {
                **m.summary(),
                # repositories holding a copy (signed copy records, strongroom copy)
                "copies": [
                    {"repository": c.destination, "copied_at": c.copied_at.isoformat()}
                    for c in copies.get(m.backup_id, [])
                    if (c.engine, c.target) == (m.engine, m.target)
                ],
            }
            for m in manifests
        ]

        def human() -> None:
            from rich.table import Column, Table

            table = Table(
                Column("backup id", no_wrap=True, min_width=23),
                "engine",
                "target",
                Column("type", no_wrap=True),
                "finished",
                "dump",
                "stored",
                "secs",
                Column("based on", overflow="fold"),
                Column("copies", overflow="fold"),
            )
            for r in rows:
                table.add_row(
                    r["backup_id"],
                    r["engine"],
                    r["target"],
                    r["backup_type"] if r["kind"] != "files" else f"files {r['backup_type']}",
                    r["finished_at"][:19],
                    size(r["raw_size"]),
                    size(r["stored_size"]),
                    str(r["duration_s"]),
                    r["base_backup_id"] or "",
                    ", ".join(c["repository"] for c in r["copies"]),
                )
            out.print(table)

        _emit(as_json, rows, human)


def show_cmd(
    backup_id: str = typer.Argument("latest"),
    engine: str | None = typer.Option(None),
    target: str | None = typer.Option(None),
    repository: str = RepoOpt,
    repository_url: str | None = RepoUrlOpt,
    trust: str | None = TrustOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Show one backup's manifest and its chain: every backup it depends on, oldest first
    (with --json: the manifest plus ``chain``, that list, and ``chain_whole``)."""
    with _handled(as_json):
        from strongroom.catalog import Catalog
        from strongroom.chains import backup_chain

        catalog = Catalog(_read_repo(repository, repository_url, trust))
        manifest = catalog.resolve(backup_id, engine, target)
        chain = backup_chain(catalog, manifest)
        data = manifest.model_dump(mode="json")
        data["chain"] = chain["links"]
        data["chain_whole"] = chain["whole"]
        data["chain_missing"] = chain["missing"]
        data["chain_problems"] = chain["problems"]

        def human() -> None:
            print_manifest(data)
            print_chain(chain)

        _emit(as_json, data, human)


def verify_cmd(
    backup_id: str = typer.Argument("latest"),
    engine: str | None = typer.Option(None),
    target: str | None = typer.Option(None),
    repository: str = RepoOpt,
    key: str = KeyOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Re-read a backup: checksums, decryption, decompression, dump structure."""
    with _handled(as_json):
        preflight(flow_blocks(repository=repository, key=key))
        from flows.verify import verify_backup_flow

        with _progress(not as_json):
            report = verify_backup_flow(
                backup_id=backup_id,
                engine=engine,
                target=target,
                repository=repository,
                encryption_key=key,
            )

        def human() -> None:
            for item in report["artifacts"]:
                mark = "[green]ok[/green]" if item["ok"] else "[red]FAILED[/red]"
                out.print(f"{mark} {item['artifact']} {item.get('structure', '')}")
            out.print(f"backup {report['backup_id']}: verified in {report['duration_s']} s")
            for warning in report.get("warnings", []):
                out.print(f"[yellow]warning:[/yellow] {warning}")

        _emit(as_json, report, human)


def keygen_cmd(as_json: bool = JsonOpt) -> None:
    """Generate an age X25519 key pair (identity is secret: store it in an EncryptionKey block)."""
    from pyrage import x25519

    identity = x25519.Identity.generate()
    data = {"recipient": str(identity.to_public()), "identity": str(identity)}
    _emit(
        as_json,
        data,
        lambda: out.print(f"# public (recipient): {data['recipient']}\n{data['identity']}"),
    )


def blocks_register_cmd(as_json: bool = JsonOpt) -> None:
    """Register strongroom's block types with the Prefect API."""
    with _handled(as_json):
        from blocks import register_all

        slugs = register_all()
        _emit(as_json, slugs, lambda: out.print("registered: " + ", ".join(slugs)))


def print_manifest(m: dict[str, Any]) -> None:
    from rich.table import Table

    out.print(f"[bold]{m['backup_id']}[/bold] {m['engine']}/{m['target']} ({m['kind']})")
    out.print(f"  finished {m['finished_at']}  server {m.get('server', {}).get('version', '?')}")
    table = Table("artifact", "content", "dump", "stored", "sha256 (stored)")
    for a in m["artifacts"]:
        table.add_row(
            a["name"],
            a["content"],
            size(a["raw_size"]),
            size(a["stored_size"]),
            a["stored_sha256"][:16],
        )
    out.print(table)


def print_chain(chain: dict[str, Any]) -> None:
    """The chain table of ``strongroom.chains.backup_chain``, and whether it is whole."""
    from rich.table import Column, Table

    links = chain["links"]
    if len(links) == 1:
        out.print("  chain: self-contained (depends on no other backup)")
        return
    first = Column("chain (oldest first)", no_wrap=True, min_width=23)
    table = Table(first, "type", "finished", "stored (own)", "catalog")
    for link in links:
        status = link["status"]
        mark = "[green]trusted[/green]" if status == "ok" else f"[red]{status.upper()}[/red]"
        table.add_row(
            link["backup_id"],
            link["type"] or "?",
            (link["finished_at"] or "")[:19],
            size(link["stored_bytes"]) if link["stored_bytes"] is not None else "",
            mark,
        )
    out.print(table)
    if chain["whole"]:
        out.print(f"  chain whole: {len(links)} backups")
        return
    if chain["missing"]:
        out.print(f"[red]chain BROKEN[/red]: missing {', '.join(chain['missing'])}")
    else:
        out.print("[red]chain BROKEN[/red]")
    for problem in chain["problems"]:
        out.print(f"  - {problem}", markup=False, highlight=False)
