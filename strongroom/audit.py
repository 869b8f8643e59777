"""The tamper-evident audit trail: ``audit/<seq>.json`` in the repository.

Every operation (backup, restore, verify, prune, drill, policy change,
bootstrap, compliance audit) appends one event: who did it (Prefect flow run
and deployment, or the CLI user), what, on which target and backup, the
checksums involved, the result, and the SHA-256 of the previous event.

* An event's hash is the SHA-256 of its stored bytes (canonical JSON), so an
  edited event breaks the link the next event holds; a removed one leaves a gap
  in the sequence; a reordered one sits under the wrong sequence number.
* Appending writes ``audit/<seq>.json`` with no-overwrite semantics (``link(2)``
  locally, ``If-None-Match: *`` on S3). Of two concurrent writers exactly one
  wins a sequence number; the other re-reads the head and takes the next one,
  so the chain can never fork silently.
* The newest event has no successor to vouch for it: ``verify_chain`` accepts
  anchors (``seq -> sha256`` recorded elsewhere, e.g. in the last compliance
  report or a Prefect artifact) to detect an edited or truncated tail. On a
  versioned S3 bucket it also reports any audit object that was overwritten or
  deleted (extra versions, delete markers).

* Each event is also signed (``strongroom.signing``): ``audit/<seq>.json.sig`` holds
  the Ed25519 signature of its stored bytes and the event names the key
  (``signed_by``). The chain proves order and completeness, the signature who wrote
  the event: a bucket writer who rewrites the whole chain cannot sign it.
  ``verify_chain`` reports unsigned and untrusted events (``unsigned`` /
  ``untrusted``); ``read_events`` skips them (they are not evidence). The signature is
  written just after the event (only the writer that won the sequence number signs
  it); a runner with no trusted signing key still appends, unsigned, so an operation
  is never left out of the trail, and the check reports the gap in trust.

Nothing here imports Prefect unless a flow run is already in progress.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field

from strongroom.audit_actor import current_actor
from strongroom.errors import Conflict, IntegrityError, InvalidInput, NotFound, StrongroomError
from strongroom.redact import scrub
from strongroom.repository.base import Repository
from strongroom.signing import MAX_RECORD_SIZE, SIG_SUFFIX, Signer, sig_key, verify_stored

log = logging.getLogger(__name__)

AUDIT_PREFIX = "audit/"
SEQ_WIDTH = 12
GENESIS_SHA256 = "0" * 64
EVENT_FORMAT = 1
_KEY_RE = re.compile(rf"^audit/(\d{{{SEQ_WIDTH}}})\.json$")
_MAX_APPEND_ATTEMPTS = 64
_ENGINES = ("postgresql", "clickhouse", "redis")


class AuditEvent(BaseModel):
    """One entry of the chain. ``prev_sha256`` is the hash of event ``seq - 1``."""

    format_version: int = EVENT_FORMAT
    seq: int
    occurred_at: dt.datetime
    actor: dict[str, Any] = Field(default_factory=dict)
    action: str
    engine: str | None = None
    target: str | None = None
    backup_id: str | None = None
    result: str
    checksums: dict[str, str] = Field(default_factory=dict)
    details: dict[str, Any] = Field(default_factory=dict)
    prev_sha256: str
    signed_by: str | None = None

    def canonical_bytes(self) -> bytes:
        data = self.model_dump(mode="json")
        if data["signed_by"] is None:  # events from before signing have no such field
            del data["signed_by"]
        return canonical_json(data)


def canonical_json(data: Any) -> bytes:
    """The one serialisation events are stored (and hashed) in."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def event_key(seq: int) -> str:
    return f"{AUDIT_PREFIX}{seq:0{SEQ_WIDTH}d}.json"


def _seq_of(key: str) -> int | None:
    match = _KEY_RE.fullmatch(key)
    return int(match.group(1)) if match else None


# --------------------------------------------------------------------- append


@dataclass(frozen=True)
class ChainHead:
    seq: int
    sha256: str

    @property
    def next_seq(self) -> int:
        return self.seq + 1


EMPTY_HEAD = ChainHead(0, GENESIS_SHA256)


def _audit_keys(repo: Repository, stray: list[str] | None = None) -> list[tuple[int, str]]:
    """(seq, key) of every event, in order; other keys under audit/ (but the signatures
    of events) go to ``stray``."""
    found = []
    sigs: list[str] = []
    for info in repo.list(AUDIT_PREFIX):
        seq = _seq_of(info.key)
        if seq is not None:
            found.append((seq, info.key))
        elif info.key.endswith(SIG_SUFFIX) and _seq_of(info.key[: -len(SIG_SUFFIX)]):
            sigs.append(info.key)
        elif stray is not None:
            stray.append(info.key)
    if stray is not None:
        events = {key for _, key in found}
        stray.extend(k for k in sigs if k[: -len(SIG_SUFFIX)] not in events)
    found.sort()
    return found


def event_signer(repo: Repository) -> Signer | None:
    """The key events are signed with: the repository's signer if its readers trust it,
    else None (the event is still appended, unsigned, and ``verify_chain`` reports it)."""
    try:
        return repo.trust.require_signer("a signed audit event")
    except InvalidInput as exc:
        log.warning("audit event appended unsigned: %s", exc)
        return None


def read_head(repo: Repository) -> ChainHead:
    """The newest event's sequence number and hash (``EMPTY_HEAD`` for a new chain)."""
    keys = _audit_keys(repo)
    if not keys:
        return EMPTY_HEAD
    seq, key = keys[-1]
    return ChainHead(seq, sha256_hex(repo.get_bytes(key)))


def append_event(
    repo: Repository,
    *,
    action: str,
    result: str,
    engine: str | None = None,
    target: str | None = None,
    backup_id: str | None = None,
    checksums: Mapping[str, str] | None = None,
    details: Mapping[str, Any] | None = None,
    actor: Mapping[str, Any] | None = None,
    occurred_at: dt.datetime | None = None,
) -> AuditEvent:
    """Append one event to the chain; retries on a lost race for the sequence number."""
    who = dict(actor) if actor is not None else current_actor()
    clean_details = _scrubbed(dict(details or {}))
    signer = event_signer(repo)
    for attempt in range(1, _MAX_APPEND_ATTEMPTS + 1):
        head = read_head(repo)
        event = AuditEvent(
            seq=head.next_seq,
            occurred_at=(occurred_at or dt.datetime.now(dt.UTC)).astimezone(dt.UTC),
            actor=who,
            action=action,
            engine=engine,
            target=target,
            backup_id=backup_id,
            result=result,
            checksums=dict(checksums or {}),
            details=clean_details,
            prev_sha256=head.sha256,
            signed_by=signer.key_id if signer is not None else None,
        )
        body = event.canonical_bytes()
        key = event_key(event.seq)
        try:
            repo.put_bytes(key, body, overwrite=False)
        except Conflict:
            # Another writer took this sequence number: re-read the head, go again.
            time.sleep(random.uniform(0, min(0.05 * attempt, 0.5)))  # noqa: S311
            continue
        if signer is not None:  # only the winner of ``seq`` signs it (no race on .sig)
            repo.put_bytes(sig_key(key), signer.sign(body), overwrite=True)
        return event
    raise Conflict(
        f"could not append to the audit trail of {repo.describe()} after "
        f"{_MAX_APPEND_ATTEMPTS} attempts (too many concurrent writers)"
    )


def _scrubbed(value: Any) -> Any:
    """Details may carry error messages: run them through the secret scrubber."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, Mapping):
        return {str(k): _scrubbed(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrubbed(v) for v in value]
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if value is None or isinstance(value, bool | int | float):
        return value
    return scrub(str(value))


def _manifest_checksums(
    repo: Repository, engine: str | None, target: str | None, backup_id: str | None
) -> dict[str, str]:
    if not (engine and target and backup_id):
        return {}
    try:
        from strongroom.catalog import Catalog

        manifest = Catalog(repo).load(engine, target, backup_id)
    except (StrongroomError, ValueError):
        return {}
    return {a.name: a.stored_sha256 for a in manifest.artifacts}


def record_event(
    repo: Repository,
    *,
    action: str,
    engine: str | None,
    target: str | None,
    backup_id: str | None,
    result: str,
    details: Mapping[str, Any] | None = None,
    checksums: Mapping[str, str] | None = None,
) -> AuditEvent:
    """What flows call: append an event; when ``checksums`` is not given and the backup
    has a manifest, the stored SHA-256 of each of its artifacts is recorded."""
    sums = (
        dict(checksums)
        if checksums is not None
        else _manifest_checksums(repo, engine, target, backup_id)
    )
    return append_event(
        repo,
        action=action,
        result=result,
        engine=engine,
        target=target,
        backup_id=backup_id,
        checksums=sums,
        details=details,
    )


def read_events(
    repo: Repository, *, since_seq: int = 0, findings: list[dict[str, Any]] | None = None
) -> list[AuditEvent]:
    """Events signed by a trusted key, in sequence order. Malformed and untrusted ones
    are skipped (``verify_chain`` reports them); when ``findings`` is given, untrusted
    ones are appended to it (``key``, ``error``)."""
    events = []
    for seq, key in _audit_keys(repo):
        if seq <= since_seq:
            continue
        try:
            raw = repo.get_bytes(key, max_size=MAX_RECORD_SIZE)
            event = AuditEvent.model_validate_json(raw)
        except (ValueError, NotFound, IntegrityError):
            continue
        verdict = verify_stored(repo, key, raw, event.signed_by)
        if not verdict.trusted:
            if findings is not None:
                findings.append(verdict.finding())
            continue
        events.append(event)
    return events


# --------------------------------------------------------------------- verify


@dataclass
class ChainProblem:
    seq: int | None
    kind: str
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "kind": self.kind, "detail": self.detail}


@dataclass
class ChainReport:
    """The result of walking the chain. ``ok`` is False on any problem."""

    repository: str
    events: int = 0
    head_seq: int = 0
    head_sha256: str = GENESIS_SHA256
    problems: list[ChainProblem] = field(default_factory=list)
    anchors_checked: int = 0
    versions_checked: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "repository": self.repository,
            "events": self.events,
            "head_seq": self.head_seq,
            "head_sha256": self.head_sha256,
            "anchors_checked": self.anchors_checked,
            "versions_checked": self.versions_checked,
            "problems": [p.as_dict() for p in self.problems],
        }


def verify_chain(
    repo: Repository,
    *,
    anchors: Mapping[int, str] | Iterable[tuple[int, str]] | None = None,
    check_versions: bool = True,
) -> ChainReport:
    """Walk ``audit/`` from event 1: every sequence number present, each event stored
    under its own number, each ``prev_sha256`` equal to the hash of the event before,
    each signed by a trusted key (``unsigned`` / ``untrusted`` problems otherwise).

    ``anchors`` (seq -> sha256 recorded outside the chain) catch an edited or removed
    tail, which the chain alone cannot. ``check_versions`` also lists object versions
    on a versioned S3 bucket: an overwritten or deleted audit object is reported even
    if whoever did it rewrote the whole chain after it.
    """
    report = ChainReport(repository=repo.describe())
    problems = report.problems
    stray: list[str] = []
    keys = _audit_keys(repo, stray)
    for key in stray:
        problems.append(ChainProblem(None, "unexpected-object", f"{key} is not an audit event"))
    hashes: dict[int, str] = {}
    prev_seq = 0
    prev_hash = GENESIS_SHA256
    for seq, key in keys:
        if seq != prev_seq + 1:
            missing = (
                f"event {prev_seq + 1}"
                if seq == prev_seq + 2
                else f"events {prev_seq + 1}..{seq - 1}"
            )
            problems.append(
                ChainProblem(prev_seq + 1, "missing", f"{missing} removed (gap before {seq})")
            )
        raw = repo.get_bytes(key)
        digest = sha256_hex(raw)
        hashes[seq] = digest
        report.events += 1
        try:
            event = AuditEvent.model_validate_json(raw)
        except ValueError as exc:
            problems.append(ChainProblem(seq, "malformed", f"{key} is not a valid event: {exc}"))
            prev_seq, prev_hash = seq, digest
            continue
        if event.seq != seq:
            problems.append(
                ChainProblem(
                    seq,
                    "reordered",
                    f"{key} holds event {event.seq}: events were moved or reordered",
                )
            )
        elif event.prev_sha256 != prev_hash and seq == prev_seq + 1:
            kind = "edited" if prev_seq else "edited-genesis"
            what = (
                f"event {prev_seq} was edited or replaced (its SHA-256 {prev_hash[:16]}... "
                f"is not the {event.prev_sha256[:16]}... recorded in event {seq})"
                if prev_seq
                else f"event {seq} does not start the chain (prev_sha256 is not the genesis)"
            )
            problems.append(ChainProblem(prev_seq or seq, kind, what))
        if raw != event.canonical_bytes():
            problems.append(
                ChainProblem(seq, "edited", f"{key} is not in canonical form: it was rewritten")
            )
        verdict = verify_stored(repo, key, raw, event.signed_by)
        if not verdict.trusted:
            kind = "unsigned" if verdict.status == "unsigned" else "untrusted"
            problems.append(ChainProblem(seq, kind, verdict.message("audit event")))
        prev_seq, prev_hash = seq, digest
    report.head_seq = prev_seq
    report.head_sha256 = prev_hash
    anchor_items = list(anchors.items() if isinstance(anchors, Mapping) else anchors or [])
    for seq, expected in anchor_items:
        report.anchors_checked += 1
        if seq > report.head_seq:
            problems.append(
                ChainProblem(
                    seq,
                    "truncated",
                    f"event {seq} was recorded (anchor {expected[:16]}...) but the chain "
                    f"now ends at {report.head_seq}",
                )
            )
        elif seq in hashes and hashes[seq] != expected:
            problems.append(
                ChainProblem(
                    seq,
                    "anchor-mismatch",
                    f"event {seq} hashes to {hashes[seq][:16]}..., the anchor recorded "
                    f"{expected[:16]}...: it was edited",
                )
            )
    if check_versions:
        report.versions_checked = _check_versions(repo, problems)
    problems.sort(key=lambda p: (p.seq is None, p.seq or 0))
    return report


def _check_versions(repo: Repository, problems: list[ChainProblem]) -> bool:
    """On a versioned S3 bucket: any audit key with more than one version or a delete
    marker was overwritten or deleted. Returns whether versions could be checked."""
    from strongroom.repository.s3 import S3Repository

    if not isinstance(repo, S3Repository):
        return False
    try:
        if repo.bucket_versioning() != "Enabled":
            return False
        counts: dict[str, int] = {}
        deleted: set[str] = set()
        for version in repo.list_versions(AUDIT_PREFIX):
            if version.delete_marker:
                deleted.add(version.key)
            else:
                counts[version.key] = counts.get(version.key, 0) + 1
    except Exception as exc:  # permissions may not allow it: say so, do not fail
        log.warning("could not list audit object versions in %s: %s", repo.describe(), exc)
        return False
    for key, n in sorted(counts.items()):
        if n > 1:
            problems.append(
                ChainProblem(
                    _seq_of(key),
                    "overwritten",
                    f"{key} has {n} versions: it was overwritten after it was written",
                )
            )
    for key in sorted(deleted):
        problems.append(
            ChainProblem(_seq_of(key), "deleted", f"{key} has a delete marker: it was deleted")
        )
    return True


# ------------------------------------------------------------- Prefect hooks

# Flows that write their own audit event (or none: a health probe is not an operation).
SELF_RECORDING_FLOWS = frozenset({"compliance-audit", "backup-health"})

# flow name -> (action, engine); names of the form <action>-<engine> need no entry.
_FLOW_ACTIONS: dict[str, tuple[str, str | None]] = {
    "verify-backup": ("verify", None),
    "apply-retention": ("prune", None),
    "restore-drill": ("drill", None),
    "deep-verify": ("deep-verify", None),
    "compliance-audit": ("compliance-audit", None),
    "backup-fleet": ("backup-fleet", None),
}


def action_for_flow(flow_name: str, parameters: Mapping[str, Any]) -> tuple[str, str | None]:
    """``backup-postgresql`` -> ("backup", "postgresql"); others from the table above."""
    if flow_name in _FLOW_ACTIONS:
        action, engine = _FLOW_ACTIONS[flow_name]
        return action, engine or _str_or_none(parameters.get("engine"))
    for engine in _ENGINES:
        if flow_name.endswith(f"-{engine}"):
            return flow_name[: -len(engine) - 1], engine
    return flow_name, _str_or_none(parameters.get("engine"))


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _state_result(state: Any) -> Any:
    try:  # _sync: a plain value also in an async flow's hook (backup-fleet)
        return state.result(raise_on_failure=False, _sync=True)
    except Exception:
        return None


def build_hook(open_repo: Callable[[str], Repository]) -> Callable[[Any, Any, Any], None]:
    """A Prefect flow hook (``hook(flow, flow_run, state)``) that appends one event for the
    run to the repository ``open_repo(name)`` returns, ``name`` being the run's
    ``repository`` parameter (default ``default``). ``flows.audit.audit_hook`` is this
    with the repository loaded from its Prefect block. The hook never raises: an audit
    write that fails is logged as an error on the run; the run's outcome stands."""

    def audit_hook(flow: Any, flow_run: Any, state: Any) -> None:
        if getattr(flow, "name", None) in SELF_RECORDING_FLOWS:
            return
        try:
            params = dict(getattr(flow_run, "parameters", None) or {})
            fields = event_fields_for_run(getattr(flow, "name", "") or "", flow_run, state)
            repo = open_repo(str(params.get("repository") or "default"))
            record_event(repo, **fields)
        except Exception as exc:
            message = scrub(f"{type(exc).__name__}: {exc}")
            try:
                from prefect.logging import get_run_logger

                get_run_logger().error("audit event could not be written: %s", message)
            except Exception:
                log.error("audit event could not be written: %s", message)

    return audit_hook


def event_fields_for_run(flow_name: str, flow_run: Any, state: Any) -> dict[str, Any]:
    """``record_event`` keyword arguments describing a finished flow run."""
    params = dict(getattr(flow_run, "parameters", None) or {})
    action, engine = action_for_flow(flow_name, params)
    value = _state_result(state) if state.is_completed() else None
    result_data = value if isinstance(value, dict) else {}
    engine = engine or _str_or_none(result_data.get("engine"))
    target = _str_or_none(params.get("target")) or _str_or_none(result_data.get("target"))
    backup_id = _str_or_none(result_data.get("backup_id"))
    if backup_id is None and params.get("backup_id") not in (None, "latest"):
        backup_id = _str_or_none(params.get("backup_id"))
    details: dict[str, Any] = {
        "flow": flow_name,
        "flow_run_id": str(getattr(flow_run, "id", "")),
        "flow_run_name": getattr(flow_run, "name", None),
        "state": getattr(state, "name", None),
        "parameters": {k: v for k, v in params.items() if _plain(v)},
    }
    if not state.is_completed():
        details["error"] = getattr(state, "message", None) or "run did not complete"
    for key in ("ok", "dry_run", "rows_ok", "mode", "target_database", "duration_s"):
        if key in result_data and _plain(result_data[key]):
            details[key] = result_data[key]
    checksums: dict[str, str] | None = None
    artifacts = result_data.get("artifacts")
    if isinstance(artifacts, list):
        checksums = {
            str(a.get("name") or a.get("artifact")): str(a["stored_sha256"])
            for a in artifacts
            if isinstance(a, dict) and a.get("stored_sha256")
        } or None
    return {
        "action": action,
        "engine": engine,
        "target": target,
        "backup_id": backup_id,
        "result": _result_word(state),
        "details": details,
        "checksums": checksums,
    }


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool | list | dict)


def _result_word(state: Any) -> str:
    if state.is_completed():
        return "success"
    if getattr(state, "is_crashed", lambda: False)():
        return "crashed"
    if getattr(state, "is_cancelled", lambda: False)():
        return "cancelled"
    return "failure"
