"""Incremental logical ClickHouse backups by partition: which earlier backup a new one
builds on, and which of its stored partition exports can be referenced instead of
exported again.

Every logical backup records, for each partition of each table it exported (key ``""``
for an unpartitioned table), the partition's fingerprint (rows and the server-side
order-independent hash) and its *part state*: the checksums of its active parts
(``hash_of_all_files``, 26.x; names are left out, as a mutation renames every part of a
table, changed or not) or their names, modification times and sizes (18.16,
whose ``system.parts`` has no checksums). The next backup of the target compares:

- part state equal and *strong* (checksums on both sides): the partition is unchanged
  without reading it;
- otherwise the partition is fingerprinted on the server (a scan, no transfer) and is
  unchanged when rows and hash equal the base's;
- an unchanged partition's artifact is referenced: the new manifest lists the base's
  artifact (its key, under the backup that first stored it, sizes and digests), so
  restore and verify read it like any other; only changed partitions are exported.

A table is compared only when its stored columns and engine equal the base's (an
``ALTER`` changes what an export holds), and a base is used only when it is a trusted
logical backup of the same target with partition states, encrypted to the same
recipients, and its chain is shorter than ``full_every``. The manifest names its base
(``details.base_backup_id``) and every backup whose artifacts it lists
(``details.depends_on``), so retention keeps them (``strongroom.policy.owned``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from strongroom.catalog import Artifact, Catalog, Manifest, owner_of
from strongroom.config import EncryptionConfig
from strongroom.engines.clickhouse.inventory import ENGINE
from strongroom.errors import NotFound
from strongroom.repository.base import Repository

DEFAULT_FULL_EVERY = 7


@dataclass(frozen=True)
class PartitionRecord:
    """What a backup knows about one exported partition."""

    rows: int
    hash: str
    state: list[list[Any]]
    strong: bool
    artifact: Artifact


@dataclass
class TableBase:
    """One table as the base backup recorded it."""

    engine: str
    columns: list[Any]
    partitions: dict[str, PartitionRecord] = field(default_factory=dict)


@dataclass
class Base:
    """The backup an incremental builds on."""

    backup_id: str
    chain_length: int
    tables: dict[tuple[str, str], TableBase]


@dataclass(frozen=True)
class Choice:
    """The outcome of choosing a base: ``base`` None means a full backup, for ``reason``."""

    base: Base | None
    reason: str


def part_state(parts: list[dict[str, Any]]) -> dict[str, tuple[list[list[Any]], bool]]:
    """Per partition id: (sorted part identities, strong?) from ``inspection.active_parts``."""
    states: dict[str, list[list[Any]]] = {}
    strong: dict[str, bool] = {}
    for p in parts:
        pid = p["partition_id"]
        checksum = p.get("checksum") or ""
        # a part's checksum alone: a mutation of another partition renames every part
        # (new mutation version, hard-linked files) without changing its files
        ident = [checksum] if checksum else [p["name"], p.get("modified", ""), p["rows"]]
        states.setdefault(pid, []).append(ident)
        strong[pid] = strong.get(pid, True) and bool(checksum)
    return {pid: (sorted(idents), strong[pid]) for pid, idents in states.items()}


def _recipients(manifest: Manifest) -> set[str] | None:
    found = {tuple(sorted(a.recipients)) for a in manifest.artifacts}
    return set(found.pop()) if len(found) == 1 else None


def _tables(manifest: Manifest) -> dict[tuple[str, str], TableBase]:
    tables: dict[tuple[str, str], TableBase] = {}
    by_name = {a.name: a for a in manifest.artifacts}
    for db in manifest.details.get("databases", []):
        for entry in db.get("tables", []):
            if not entry.get("data"):
                continue
            table = TableBase(str(entry.get("data_engine")), list(entry.get("columns") or []))
            for rec in entry.get("partition_states") or []:
                artifact = by_name.get(rec.get("artifact"))
                if artifact is None:
                    continue
                table.partitions[str(rec["id"])] = PartitionRecord(
                    rows=int(rec["rows"]),
                    hash=str(rec["hash"]),
                    state=list(rec.get("state") or []),
                    strong=bool(rec.get("strong")),
                    artifact=artifact,
                )
            tables[(db["name"], entry["name"])] = table
    return tables


def choose_base(
    repo: Repository,
    target: str,
    enc: EncryptionConfig,
    *,
    full: bool,
    incremental: bool,
    full_every: int,
) -> Choice:
    """The base for the next backup of ``target``, or why it is a full one."""
    if full:
        return Choice(None, "full requested")
    if not incremental or full_every <= 1:
        return Choice(None, "incremental backups are off for this target")
    try:
        latest = Catalog(repo).resolve("latest", ENGINE, target, kind="logical")
    except NotFound:
        return Choice(None, "no earlier backup of this target")
    inc = latest.details.get("incremental") or {}
    if "partition_states" not in inc.get("records", ""):
        return Choice(None, f"the latest backup {latest.backup_id} records no partition states")
    chain = int(inc.get("chain_length", 0))
    if chain + 1 >= full_every:
        return Choice(None, f"a full backup every {full_every} (chain of {chain + 1})")
    if _recipients(latest) != set(enc.recipients):
        return Choice(None, f"encryption recipients differ from backup {latest.backup_id}")
    return Choice(Base(latest.backup_id, chain, _tables(latest)), "")


def usable_table(base: Base | None, obj: dict[str, Any]) -> TableBase | None:
    """The base's record of this table, when its exports can be reused for it."""
    if base is None:
        return None
    table = base.tables.get((obj["database"], obj["name"]))
    if table is None or table.engine != obj["data_engine"] or table.columns != obj["columns"]:
        return None
    return table


def reused_artifact(record: PartitionRecord, name: str) -> Artifact:
    """The base's artifact listed under this backup's name for it (same key and digests)."""
    doc = record.artifact.model_dump()
    doc["name"] = name
    doc["meta"] = {**doc["meta"], "stored_by": owner_of(record.artifact)}
    return Artifact.model_validate(doc)


def details(choice: Choice, artifacts: list[Artifact], backup_id: str) -> dict[str, Any]:
    """The manifest's ``incremental`` section and the dependency fields retention reads."""
    owners = sorted({owner_of(a) for a in artifacts} - {backup_id, ""})
    reused = [a for a in artifacts if owner_of(a) not in (backup_id, "")]
    new = [a for a in artifacts if owner_of(a) in (backup_id, "")]
    section: dict[str, Any] = {
        "records": "partition_states",
        "mode": "incremental" if choice.base else "full",
        "chain_length": choice.base.chain_length + 1 if choice.base else 0,
        "reused_artifacts": len(reused),
        "reused_raw_bytes": sum(a.raw_size for a in reused),
        "stored_artifacts": len(new),
        "new_stored_bytes": sum(a.stored_size for a in new),
    }
    if choice.base is None:
        section["full_reason"] = choice.reason
        return {"incremental": section}
    depends = sorted({choice.base.backup_id, *owners})
    return {
        "incremental": section,
        "base_backup_id": choice.base.backup_id,
        "depends_on": depends,
    }
