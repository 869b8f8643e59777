"""``strongroom keygen-signing``, ``verify-signature`` and ``sign``: the operator's side of
signed manifests (``strongroom.signing``).

``verify-signature`` is the auditor's offline check: a manifest file (or a key in a
repository), its detached ``.sig`` and one public key PEM; no secret is needed.
``sign`` is the one way to make manifests written before signing trusted again: it
signs only unsigned manifests the operator names (or ``--all-unsigned``), only with
``--yes``, checks each sealed one against its seal first, never rewrites a manifest
(only its ``.sig`` is written) and appends an audit event per manifest. ``sign
--records KIND`` does the same for pins, drills, verification records, restore points,
audit events and compliance reports (``strongroom.sign_records``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from strongroom.cli.common import JsonOpt, KeyOpt, RepoOpt, _emit, _handled, err, out
from strongroom.errors import Conflict, IntegrityError, InvalidInput

if TYPE_CHECKING:
    from strongroom.signing import Signer


def _read_capped(path: Path, limit: int, what: str) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise InvalidInput(f"cannot read the {what} {path}: {exc.strerror}") from None
    if len(data) > limit:
        raise IntegrityError(f"the {what} {path} is over {limit} bytes; not a strongroom record")
    return data


def keygen_signing_cmd(
    private_key_file: Path = typer.Option(
        ..., "--private-key-file", help="Where to write the private key (mode 0600, new file)."
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Generate an Ed25519 signing key: the private PEM goes to a new 0600 file (put it in
    a strongroom-signing-key block), the public PEM to stdout (the repository block's
    trusted_signers, and what auditors verify with)."""
    with _handled(as_json):
        from strongroom.signing import Signer

        signer = Signer.generate()
        try:
            fd = os.open(
                private_key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600
            )
        except FileExistsError:
            raise Conflict(f"{private_key_file} exists; it is never overwritten") from None
        except OSError as exc:
            raise InvalidInput(f"cannot create {private_key_file}: {exc.strerror}") from None
        with os.fdopen(fd, "w") as f:
            f.write(signer.private_pem().get_secret_value())
        data = {"key_id": signer.key_id, "public_key": signer.public.pem()}
        _emit(as_json, data, lambda: out.print(data["public_key"], end="", highlight=False))
        if not as_json:
            err.print(f"key id {signer.key_id}; private key in {private_key_file}")


def verify_signature_cmd(
    record: str = typer.Argument(..., help="A manifest file, or a key in --repository."),
    public_key: Path = typer.Option(..., "--public-key", help="Ed25519 public key PEM file."),
    sig: Path | None = typer.Option(None, "--sig", help="Signature file (default RECORD.sig)."),
    repository: str | None = typer.Option(
        None, "--repository", "-r", help="Read RECORD and RECORD.sig from this repository block."
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Check a record's Ed25519 signature with one public key (offline: no secret)."""
    with _handled(as_json):
        from strongroom.signing import MAX_RECORD_SIZE, SIG_SUFFIX, PublicKey, verify_file

        public = PublicKey.parse(_read_capped(public_key, 64 * 1024, "public key"))
        if repository is not None:
            from strongroom.cli.common import _open_repo

            repo = _open_repo(repository)
            data = repo.get_bytes(record, max_size=MAX_RECORD_SIZE)
            signature = repo.get_bytes(record + SIG_SUFFIX, max_size=64 * 1024)
        else:
            path = Path(record)
            data = _read_capped(path, MAX_RECORD_SIZE, "record")
            sig_path = sig or Path(record + SIG_SUFFIX)
            signature = _read_capped(sig_path, 64 * 1024, "signature")
        key_id = verify_file(data, signature, public.pem())
        result = {"ok": True, "record": record, "key_id": key_id}
        _emit(as_json, result, lambda: out.print(f"{record}: signed by {key_id}"))


def sign_cmd(
    backup_ids: list[str] = typer.Argument(
        None, help="Backup ids of unsigned manifests (with --records: record keys)."
    ),
    all_unsigned: bool = typer.Option(False, "--all-unsigned", help="Every unsigned one."),
    records: str | None = typer.Option(
        None,
        "--records",
        help="Sign other records instead of manifests: pins, drills, verifications, "
        "restore-points, audit or reports.",
    ),
    yes: bool = typer.Option(False, "--yes", help="Really sign (without it: list only)."),
    repository: str = RepoOpt,
    key: str = KeyOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Sign existing unsigned manifests (written before signing) that you confirm.

    Only manifests with no signature at all are signed; a manifest with a bad or foreign
    signature is refused. Sealed manifests are checked against their seal first (needs
    the encryption key's identity). Each signature is recorded in the audit trail.
    ``--records KIND`` does the same for the other records strongroom trusts."""
    with _handled(as_json):
        from flows.common import load_key, load_repository

        if not backup_ids and not all_unsigned:
            raise InvalidInput("name backup ids (or record keys) to sign, or pass --all-unsigned")
        repo, _ = load_repository(repository)
        signer = repo.trust.require_signer("a signature")
        if records is not None:
            from strongroom.sign_records import sign_unsigned_records

            rows = sign_unsigned_records(repo, signer, records, set(backup_ids or []), yes=yes)
            _emit(as_json, {"ok": True, "signed": yes, "records": rows}, lambda: _show(rows, yes))
            return
        identities = [i.get_secret_value() for i in load_key(key).identities]
        rows = _sign_unsigned(repo, signer, set(backup_ids or []), identities, yes=yes)

        _emit(as_json, {"ok": True, "signed": yes, "manifests": rows}, lambda: _show(rows, yes))


def _show(rows: list[dict[str, Any]], yes: bool) -> None:
    for row in rows:
        out.print(f"{row['key']}: {row['action']} {row.get('detail', '')}")
    if not yes:
        out.print("nothing signed: pass --yes to sign what is listed")


def _sign_unsigned(
    repo: Any, signer: Signer, wanted: set[str], identities: list[str], *, yes: bool
) -> list[dict[str, Any]]:
    from strongroom.catalog import Catalog, manifest_key
    from strongroom.seal import SEAL_FIELD, check_name, check_seal, origin_of, parse_document
    from strongroom.sign_records import write_signatures
    from strongroom.signing import MAX_RECORD_SIZE

    catalog = Catalog(repo)
    rows: list[dict[str, Any]] = []
    todo: list[tuple[str, bytes, dict[str, Any]]] = []
    entries = catalog.entries()
    found = {b for _, _, b in entries}
    missing = sorted(wanted - found)
    if missing:
        raise InvalidInput(f"no manifest with id(s) {', '.join(missing)}")
    for engine, target, backup_id in entries:
        if wanted and backup_id not in wanted:
            continue
        mkey = manifest_key(engine, target, backup_id)
        manifest = catalog.load(engine, target, backup_id, strict=False)
        origin = origin_of(manifest)
        verdict = origin.verdict if origin is not None else None
        if verdict is not None and verdict.trusted:
            rows.append({"key": mkey, "action": "already-signed", "detail": verdict.key_id})
            continue
        if verdict is None or verdict.status != "unsigned":
            detail = verdict.message("manifest") if verdict else "no verdict"
            raise IntegrityError(f"refusing to sign {mkey}: {detail}")
        raw = repo.get_bytes(mkey, max_size=MAX_RECORD_SIZE)
        doc = parse_document(raw, mkey)
        check_name(mkey, manifest_key(manifest.engine, manifest.target, manifest.backup_id))
        seal = doc.pop(SEAL_FIELD, None)
        if isinstance(seal, str):
            if not identities:
                raise InvalidInput(f"{mkey} is sealed: the encryption key's identity is needed")
            check_seal(doc, seal, identities, mkey)
        fields = {"engine": engine, "target": target, "backup_id": backup_id}
        todo.append((mkey, raw, {**fields, "details": {"sealed": isinstance(seal, str)}}))
    # every check passed for every manifest named: only now is anything written
    return rows + write_signatures(repo, signer, todo, yes=yes)


def register(app: typer.Typer) -> None:
    """Add ``keygen-signing``, ``verify-signature`` and ``sign`` to the ``strongroom`` app."""
    app.command("keygen-signing")(keygen_signing_cmd)
    app.command("verify-signature")(verify_signature_cmd)
    app.command("sign")(sign_cmd)
