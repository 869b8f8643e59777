"""Ed25519 signatures of the records strongroom trusts later (manifests first).

Why: the age seal (``strongroom.seal``) is not keyed, so anyone who can write to the
bucket and knows the public age recipient could publish a backup that passed every
check. A backup runner now holds a private Ed25519 signing key (its own Prefect block,
``strongroom-signing-key``); readers trust only the public keys pinned in the
repository's configuration (``RepositoryConfig.trusted_signers``), several at once so
keys can be rotated.

The API, for every record kind (manifests, drills, verification records, pins,
restore points, audit events, WAL metadata):

- ``Signer`` (private key, held as ``SecretStr``, registered with ``strongroom.redact``)
  and ``PublicKey`` (``key_id`` = ``ed25519:`` + the first 16 hex digits of SHA-256 of
  the raw 32-byte key). ``generate_key_pair()`` makes a new pair.
- ``Trust(keys, signer)``: the trusted public keys and, on a backup runner, the signer.
  Every ``Repository`` has ``repo.trust`` (built by ``open_repository`` from the config;
  ``LocalRepository(root, trust=...)`` / ``S3Repository(config, trust=...)``; default:
  nothing trusted, no signer).
- A record stored at key ``K`` gets the raw 64-byte signature of its exact stored bytes
  at ``K + ".sig"`` (``sig_key``), written BEFORE ``K``: a reader that sees ``K`` sees a
  signed record. The record names its key id inside (``SIGNED_BY_FIELD``).
  ``put_signed(repo, key, body)`` / ``put_signed_json(repo, key, doc)`` write the pair;
  ``get_verified(repo, key)`` / ``get_verified_json`` read both, with a size cap
  (``MAX_RECORD_SIZE``, refused before the record is read whole), and return the bytes
  and a ``Verdict``. ``verdict.trusted`` is what lenient readers (retention, health,
  compliance, metrics, wal-check) test, reporting ``verdict.finding()`` when it is
  False; strict readers (restore, verify, drills) call ``verdict.require()``, an
  ``IntegrityError`` naming the record and why it is not trusted.
- ``delete_signed(repo, key)`` removes a record and its signature (record first).

Offline, an auditor needs the record, its ``.sig`` and the public key PEM
(SubjectPublicKeyInfo): ``strongroom verify-signature FILE --sig FILE.sig
--public-key signing.pub.pem``, or with stock OpenSSL 3:
``openssl pkeyutl -verify -pubin -inkey signing.pub.pem -rawin -in FILE -sigfile FILE.sig``.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from strongroom.errors import Conflict, IntegrityError, InvalidInput, NotFound
from strongroom.redact import register

if TYPE_CHECKING:  # pydantic stays out of the WAL hot path (strongroom-wal)
    from pydantic import SecretStr

    from strongroom.repository.base import Repository, StorageSettings

SIG_SUFFIX = ".sig"
SIGNATURE_SIZE = 64
SIGNED_BY_FIELD = "signed_by"
MAX_RECORD_SIZE = 16 * 1024 * 1024
KEY_ID_PREFIX = "ed25519:"
SIGNING_BLOCK = "strongroom-signing-key"
_PEM_PUBLIC = ("-----BEGIN PUBLIC KEY-----", "-----END PUBLIC KEY-----")
_PEM_PRIVATE = ("-----BEGIN PRIVATE KEY-----", "-----END PRIVATE KEY-----")


def key_id_of(raw_public: bytes) -> str:
    return KEY_ID_PREFIX + hashlib.sha256(raw_public).hexdigest()[:16]


def _wrap_pem(body: str, markers: tuple[str, str]) -> bytes:
    return f"{markers[0]}\n{body}\n{markers[1]}\n".encode()


@dataclass(frozen=True)
class PublicKey:
    """A trusted Ed25519 public key."""

    key: Ed25519PublicKey = field(repr=False, compare=False)
    raw: bytes = field(repr=False)
    key_id: str = ""

    @classmethod
    def from_key(cls, key: Ed25519PublicKey) -> PublicKey:
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return cls(key=key, raw=raw, key_id=key_id_of(raw))

    @classmethod
    def parse(cls, text: str | bytes) -> PublicKey:
        """PEM SubjectPublicKeyInfo, its one-line base64 body (``MCowBQYDK2VwAyEA...``),
        or OpenSSH ``ssh-ed25519 AAAA...``."""
        value = (text.decode("ascii", "replace") if isinstance(text, bytes) else text).strip()
        try:
            if value.startswith("ssh-ed25519 "):
                loaded: Any = serialization.load_ssh_public_key(value.encode())
            elif value.startswith("-----BEGIN"):
                loaded = serialization.load_pem_public_key(value.encode())
            else:
                loaded = serialization.load_pem_public_key(_wrap_pem(value, _PEM_PUBLIC))
        except (ValueError, UnsupportedAlgorithm, binascii.Error):
            raise InvalidInput(
                f"not an Ed25519 public key (PEM, one-line base64 or ssh-ed25519): {value[:40]!r}"
            ) from None
        if not isinstance(loaded, Ed25519PublicKey):
            raise InvalidInput(f"not an Ed25519 public key: {value[:40]!r}")
        return cls.from_key(loaded)

    def pem(self) -> str:
        """PEM SubjectPublicKeyInfo (what ``openssl pkeyutl -pubin -inkey`` reads)."""
        return self.key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")

    def one_line(self) -> str:
        """The PEM body on one line (for a config list entry)."""
        return "".join(self.pem().strip().splitlines()[1:-1])

    def verifies(self, data: bytes, signature: bytes) -> bool:
        try:
            self.key.verify(signature, data)
        except InvalidSignature:
            return False
        return True


class Signer:
    """A private Ed25519 signing key (never printed: ``repr`` shows the key id only)."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public = PublicKey.from_key(key.public_key())
        pem = self.private_pem().get_secret_value()
        register(pem, pem.strip(), *pem.strip().splitlines()[1:-1])

    @classmethod
    def generate(cls) -> Signer:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def parse(cls, text: SecretStr | str) -> Signer:
        """PEM PKCS#8 (``-----BEGIN PRIVATE KEY-----``) or its one-line base64 body."""
        value = (text if isinstance(text, str) else text.get_secret_value()).strip()
        register(value)
        data = value.encode() if value.startswith("-----BEGIN") else _wrap_pem(value, _PEM_PRIVATE)
        try:
            loaded = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm, binascii.Error):
            raise InvalidInput(
                "the signing key is not an unencrypted Ed25519 private key (PEM PKCS#8)"
            ) from None
        if not isinstance(loaded, Ed25519PrivateKey):
            raise InvalidInput("the signing key is not an Ed25519 private key")
        return cls(loaded)

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def private_pem(self) -> SecretStr:
        from pydantic import SecretStr

        return SecretStr(
            self._key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ).decode("ascii")
        )

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def __repr__(self) -> str:
        return f"Signer({self.key_id})"


def generate_key_pair() -> tuple[SecretStr, str]:
    """(private PEM, public PEM) of a new signing key."""
    signer = Signer.generate()
    return signer.private_pem(), signer.public.pem()


VerdictStatus = Literal["trusted", "unsigned", "untrusted-key", "bad-signature", "unreadable"]


@dataclass(frozen=True)
class Verdict:
    """What the signature check of one stored record found."""

    key: str
    status: VerdictStatus
    key_id: str | None = None
    detail: str = ""

    @property
    def trusted(self) -> bool:
        return self.status == "trusted"

    def message(self, what: str = "record") -> str:
        return (
            f"{what} {self.key} is not signed by a trusted key ({self.detail}); it is not trusted"
        )

    def require(self, what: str = "record") -> None:
        """Strict readers: ``IntegrityError`` unless the record is trusted."""
        if not self.trusted:
            raise IntegrityError(self.message(what))

    def finding(self) -> dict[str, Any]:
        """What lenient readers report for an untrusted record."""
        return {
            "key": self.key,
            "status": self.status,
            "key_id": self.key_id,
            "error": self.message() if not self.trusted else "",
        }


@dataclass(frozen=True)
class Trust:
    """The public keys a reader trusts, and (on a backup runner) the signing key."""

    keys: tuple[PublicKey, ...] = ()
    signer: Signer | None = None

    @classmethod
    def from_config(
        cls, trusted: list[str] | tuple[str, ...], signing_key: SecretStr | str | None = None
    ) -> Trust:
        keys: list[PublicKey] = []
        for text in trusted:
            key = PublicKey.parse(text)
            if key.key_id not in {k.key_id for k in keys}:
                keys.append(key)
        signer = Signer.parse(signing_key) if signing_key else None
        return cls(tuple(keys), signer)

    @property
    def key_ids(self) -> list[str]:
        return [k.key_id for k in self.keys]

    def public_key(self, key_id: str) -> PublicKey | None:
        return next((k for k in self.keys if k.key_id == key_id), None)

    def require_signer(self, what: str = "a backup") -> Signer:
        """The signer, after checking readers of this repository will trust it."""
        if self.signer is None:
            raise InvalidInput(
                f"{what} cannot be written: no signing key. Create one with "
                "`strongroom keygen-signing`, store the private key in a "
                f"{SIGNING_BLOCK} block named by the repository block's signing_key, and add "
                "the public key to its trusted_signers"
            )
        if self.public_key(self.signer.key_id) is None:
            raise InvalidInput(
                f"{what} cannot be written: the signing key {self.signer.key_id} is not among "
                "the repository's trusted_signers (add its public key there, or nothing "
                "could read what it signs)"
            )
        return self.signer

    def check(self, key: str, data: bytes, signature: bytes | None, claimed: str | None) -> Verdict:
        """The verdict on ``data`` stored at ``key`` with ``signature`` (None: no .sig).
        ``claimed`` is the key id the record names; a record naming none (signed later
        by ``strongroom sign``) is checked against every trusted key."""
        if signature is None:
            return Verdict(key, "unsigned", claimed, f"no signature at {sig_key(key)}")
        if len(signature) != SIGNATURE_SIZE:
            size = f"{sig_key(key)} holds {len(signature)} bytes, not {SIGNATURE_SIZE}"
            return Verdict(key, "bad-signature", claimed, size)
        if claimed is not None:
            public = self.public_key(claimed)
            if public is None:
                trusted = ", ".join(self.key_ids) or "none configured"
                return Verdict(
                    key, "untrusted-key", claimed, f"signed by {claimed}; trusted: {trusted}"
                )
            candidates: tuple[PublicKey, ...] = (public,)
        else:
            candidates = self.keys
        for public in candidates:
            if public.verifies(data, signature):
                return Verdict(key, "trusted", public.key_id, f"signed by {public.key_id}")
        if claimed is not None:
            detail = f"the signature does not match its content for key {claimed} (edited?)"
        else:
            detail = "the signature matches no trusted key" + (
                "" if self.keys else " (none configured)"
            )
        return Verdict(key, "bad-signature", claimed, detail)


def sig_key(key: str) -> str:
    """Where the detached signature of the record at ``key`` lives."""
    return key + SIG_SUFFIX


def read_capped(repo: Repository, key: str, max_size: int = MAX_RECORD_SIZE) -> bytes:
    """A small object, refused (``IntegrityError``) before it is read whole when it is
    over ``max_size``."""
    return repo.get_bytes(key, max_size=max_size)


def _signature(repo: Repository, key: str) -> bytes | None:
    try:
        return repo.get_bytes(sig_key(key), max_size=SIGNATURE_SIZE)
    except NotFound:
        return None
    except IntegrityError:  # over 64 bytes: not a signature
        return b"\0" * (SIGNATURE_SIZE + 1)


def claimed_key_id(data: bytes) -> str | None:
    """The ``signed_by`` a JSON record names (None if not JSON or none named)."""
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    value = doc.get(SIGNED_BY_FIELD) if isinstance(doc, dict) else None
    return value if isinstance(value, str) else None


def verify_stored(repo: Repository, key: str, data: bytes, claimed: str | None) -> Verdict:
    """The verdict on ``data`` (already read from ``key``) against ``repo.trust``."""
    return repo.trust.check(key, data, _signature(repo, key), claimed)


def put_signed(
    repo: Repository,
    key: str,
    body: bytes,
    *,
    overwrite: bool = False,
    settings: StorageSettings | None = None,
) -> str:
    """Store ``body`` at ``key``, its signature first at ``key.sig``; returns the key id.
    ``body`` must already name that key id (``signed_by``) if it is a JSON record; with
    ``overwrite=False`` an existing record is a ``Conflict`` (its .sig is then replaced
    only if no record was there)."""
    signer = repo.trust.require_signer(f"the record {key}")
    if not overwrite and repo.exists(key):
        raise Conflict(f"{key} already exists; it is never overwritten")
    repo.put_bytes(sig_key(key), signer.sign(body), overwrite=True, settings=settings)
    repo.put_bytes(key, body, overwrite=overwrite, settings=settings)
    return signer.key_id


def put_signed_json(
    repo: Repository,
    key: str,
    doc: dict[str, Any],
    *,
    overwrite: bool = False,
    settings: StorageSettings | None = None,
) -> str:
    """``doc`` with ``signed_by`` set, as indented JSON, through ``put_signed``."""
    signer = repo.trust.require_signer(f"the record {key}")
    body = json.dumps({**doc, SIGNED_BY_FIELD: signer.key_id}, indent=2, sort_keys=True)
    return put_signed(repo, key, body.encode(), overwrite=overwrite, settings=settings)


def get_verified(
    repo: Repository, key: str, *, max_size: int = MAX_RECORD_SIZE, strict: bool = True
) -> tuple[bytes, Verdict]:
    """The record at ``key`` (``NotFound`` if absent; ``IntegrityError`` if over
    ``max_size``) and its verdict; ``strict`` raises unless it is trusted."""
    data = read_capped(repo, key, max_size)
    verdict = verify_stored(repo, key, data, claimed_key_id(data))
    if strict:
        verdict.require()
    return data, verdict


def get_verified_json(
    repo: Repository, key: str, *, max_size: int = MAX_RECORD_SIZE, strict: bool = True
) -> tuple[dict[str, Any], Verdict]:
    """``get_verified`` for a JSON object record (``IntegrityError`` if it is not one)."""
    data, verdict = get_verified(repo, key, max_size=max_size, strict=strict)
    try:
        doc = json.loads(data)
    except ValueError:
        raise IntegrityError(f"{key} is not JSON") from None
    if not isinstance(doc, dict):
        raise IntegrityError(f"{key} is not a JSON object")
    return doc, verdict


def delete_signed(repo: Repository, key: str) -> None:
    """Remove a record, then its signature (a record never stays without its .sig)."""
    repo.delete(key)
    repo.delete(sig_key(key))


def verify_file(data: bytes, signature: bytes, public_key: str | bytes) -> str:
    """Offline check of a record's bytes and signature with one public key; returns the
    key id or raises ``IntegrityError``."""
    public = PublicKey.parse(public_key)
    if len(signature) != SIGNATURE_SIZE or not public.verifies(data, signature):
        raise IntegrityError(f"the signature does not verify with {public.key_id}")
    return public.key_id


def key_file_signer(path: Path) -> Signer:
    """The signer whose private PEM is in ``path``; a new key is written there first
    (mode 0600, never overwritten) when the file does not exist."""
    if not path.exists():
        signer = Signer.generate()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(signer.private_pem().get_secret_value())
        return signer
    return Signer.parse(path.read_text())
