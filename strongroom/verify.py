"""Verify a backup: check the stored manifest against its seal, read every artifact
back, check checksums, decrypt, decompress, and check the content's structure with
the engine's own tool.

Structure checkers are registered per artifact content type, so engines add
their own (``pg_restore --list`` for dumps, RDB header/CRC for Redis, ...).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any, Protocol

from strongroom.artifacts import read_artifact
from strongroom.catalog import Artifact, Manifest, manifest_key
from strongroom.config import EncryptionConfig
from strongroom.errors import IntegrityError, NotFound, StrongroomError
from strongroom.pipeline import Progress
from strongroom.repository.base import Repository
from strongroom.seal import (
    SEAL_FIELD,
    SEALED_FORMAT,
    check_name,
    check_seal,
    origin_of,
    parse_document,
)
from strongroom.signing import MAX_RECORD_SIZE, verify_stored


class ContentCheck(Protocol):
    """Receives the plaintext in chunks, then ``finish`` returns findings or raises."""

    def write(self, data: bytes | bytearray | memoryview) -> int: ...

    def finish(self) -> dict[str, Any]: ...


CheckFactory = Callable[[Manifest, Artifact], ContentCheck]
_CHECKS: dict[str, CheckFactory] = {}


# Artifact.encryption of objects a database server wrote itself (no age, no zstd by
# strongroom): ClickHouse's native BACKUP (engines/clickhouse/native_backup.py)
SERVER_WRITTEN = "none"


def register_check(content: str, factory: CheckFactory) -> None:
    _CHECKS[content] = factory


# per manifest kind: checks of the backup as a whole (e.g. an incremental's chain), run
# before its artifacts are read; they raise StrongroomError or return findings
ChainCheck = Callable[[Repository, Manifest], dict[str, Any]]
_CHAIN_CHECKS: dict[str, ChainCheck] = {}


def register_chain_check(kind: str, check: ChainCheck) -> None:
    _CHAIN_CHECKS[kind] = check


class Utf8Check:
    """Plain SQL text must decode as UTF-8."""

    def __init__(self, manifest: Manifest, artifact: Artifact) -> None:
        import codecs

        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._ok = True

    def write(self, data: bytes | bytearray | memoryview) -> int:
        try:
            self._decoder.decode(bytes(data))
        except UnicodeDecodeError:
            self._ok = False
        return len(data)

    def finish(self) -> dict[str, Any]:
        if not self._ok:
            raise IntegrityError("SQL text is not valid UTF-8")
        return {"utf8": True}


register_check("sql", Utf8Check)

# engine modules that register their own checks when imported
ENGINE_CHECK_MODULES = (
    "strongroom.engines.clickhouse.verify",
    "strongroom.engines.postgres.verify",
    "strongroom.engines.postgres.pitr.basebackup",
    "strongroom.engines.postgres.pitr.files.check",
    "strongroom.engines.redis.backup",
)


def load_engine_checks() -> None:
    """Import every engine's check module (lazily: they import this module)."""
    import importlib

    for module in ENGINE_CHECK_MODULES:
        importlib.import_module(module)


def check_manifest(repo: Repository, manifest: Manifest, enc: EncryptionConfig) -> dict[str, Any]:
    """The stored manifest against its seal, and ``manifest`` against the stored one.
    Returns ``{"key", "sealed", "signed_by", "ok"}`` plus ``error`` or ``warning``."""
    claimed = manifest_key(manifest.engine, manifest.target, manifest.backup_id)
    origin = origin_of(manifest)
    # loaded from the catalog: check the object it was read from (a manifest copied under
    # another id is caught there); a copy given new ids since is checked under its own
    key = origin.key if origin is not None and origin.claimed_key == claimed else claimed
    result: dict[str, Any] = {"key": key, "sealed": False, "ok": False}
    try:
        check_name(key, claimed)
        raw = repo.get_bytes(key, max_size=MAX_RECORD_SIZE)
        doc = parse_document(raw, key)
        signed_by = doc.get("signed_by")
        verdict = verify_stored(repo, key, raw, signed_by if isinstance(signed_by, str) else None)
        result["signed_by"] = verdict.key_id if verdict.trusted else None
        seal = doc.pop(SEAL_FIELD, None)
        if seal is not None:
            result["sealed"] = True
            if not isinstance(seal, str):
                raise IntegrityError(f"manifest {key}: its seal is not a string (edited?)")
            check_seal(doc, seal, [i.get_secret_value() for i in enc.identities], key)
        elif int(doc.get("format_version") or 0) >= SEALED_FORMAT:
            raise IntegrityError(
                f"manifest {key} has lost its seal (format {doc.get('format_version')} "
                "manifests are always sealed); it is not trusted"
            )
        verdict.require("manifest")
        # through the model on both sides: formatting (e.g. of times) is not a difference
        if Manifest.model_validate(doc).document() != manifest.document():
            raise IntegrityError(f"the manifest being verified differs from the stored {key}")
    except NotFound:
        result["error"] = f"manifest {key} is not in the repository"
        return result
    except StrongroomError as exc:
        result["error"] = str(exc)
        return result
    except ValueError as exc:  # the stored document does not fit the manifest model
        result["error"] = f"manifest {key} is malformed: {str(exc)[:300]}"
        return result
    result["ok"] = True
    if not result["sealed"]:
        result["warning"] = (
            f"unsealed manifest {key}: written before manifests were sealed (or without "
            "recipients), so edits to it cannot be detected"
        )
    return result


def verify_backup(
    repo: Repository,
    manifest: Manifest,
    enc: EncryptionConfig,
    *,
    progress: Callable[[str, int | None], Progress] | None = None,
) -> dict[str, Any]:
    """Check the manifest's seal and every artifact of ``manifest``; returns a report
    (``ok`` False on any failure; a failed manifest check is listed first among the
    ``artifacts`` as ``manifest``, an unsealed manifest is a ``warnings`` entry)."""
    load_engine_checks()
    results: list[dict[str, Any]] = []
    started = time.monotonic()
    sealed = check_manifest(repo, manifest, enc)
    if not sealed["ok"]:
        results.append(
            {"artifact": "manifest", "key": sealed["key"], "ok": False, "error": sealed["error"]}
        )
    chain_check = _CHAIN_CHECKS.get(manifest.kind)
    if chain_check is not None:
        item_chain: dict[str, Any] = {"artifact": "chain", "key": sealed["key"]}
        try:
            item_chain.update(chain_check(repo, manifest), ok=True)
        except StrongroomError as exc:
            item_chain.update(ok=False, error=str(exc))
        results.append(item_chain)
    for artifact in manifest.artifacts:
        item: dict[str, Any] = {"artifact": artifact.name, "key": artifact.key}
        t0 = time.monotonic()
        factory = _CHECKS.get(artifact.content)
        check = factory(manifest, artifact) if factory else None
        try:
            if artifact.encryption == SERVER_WRITTEN:
                check_plain(repo, artifact, check if check is not None else _Null())
            else:
                read_artifact(
                    repo,
                    artifact,
                    check if check is not None else _Null(),
                    encryption=enc,
                    holdback=0,
                    progress=progress(artifact.name, artifact.stored_size) if progress else None,
                    check_seal=False,
                )
            item["checksums"] = "ok"
            if check is not None:
                item["structure"] = check.finish()
            item["ok"] = True
        except (IntegrityError, NotFound) as exc:
            item["ok"] = False
            item["error"] = str(exc)
        except StrongroomError as exc:
            item["ok"] = False
            item["error"] = str(exc)
        finally:
            if check is not None and hasattr(check, "close"):
                check.close()
        item["seconds"] = round(time.monotonic() - t0, 3)
        results.append(item)
    warnings = [sealed["warning"]] if "warning" in sealed else []
    plain = sum(a.encryption == SERVER_WRITTEN for a in manifest.artifacts)
    if plain:
        warnings.append(
            f"{plain} artifact(s) were written by the database server (not encrypted by "
            "strongroom): their checksums were checked, their content is proven only by a "
            "restore (ClickHouse native: native_restore.verify_native_backup)"
        )
    return {
        "backup_id": manifest.backup_id,
        "engine": manifest.engine,
        "target": manifest.target,
        "ok": all(r["ok"] for r in results),
        "manifest": sealed,
        "warnings": warnings,
        "artifacts": results,
        "bytes_read": sum(a.stored_size for a in manifest.artifacts),
        "duration_s": round(time.monotonic() - started, 3),
    }


def check_plain(repo: Repository, artifact: Artifact, sink: ContentCheck | _Null) -> None:
    """An artifact stored as is (written by the database server, e.g. ClickHouse's
    BACKUP ... TO S3): its bytes against the recorded size and sha256."""
    digest, size = hashlib.sha256(), 0
    try:
        source = repo.open_read(artifact.key)
    except NotFound:
        raise NotFound(f"artifact {artifact.name} is missing (key {artifact.key})") from None
    with source:
        while chunk := source.read(1024 * 1024):
            digest.update(chunk)
            size += len(chunk)
            sink.write(chunk)
    if size != artifact.stored_size or digest.hexdigest() != artifact.stored_sha256:
        raise IntegrityError(
            f"artifact {artifact.name} ({artifact.key}): {size} bytes read, sha256 "
            f"{'matches' if digest.hexdigest() == artifact.stored_sha256 else 'differs'}; "
            f"the manifest records {artifact.stored_size} bytes"
        )


class _Null:
    def write(self, data: bytes | bytearray | memoryview) -> int:
        return len(data)
