"""The manifest seal: evidence that a manifest is the one its backup run published.

Artifacts carry checksums in the manifest, but nothing protected the manifest
itself: a row count, a table list or a checksum edited by hand went unnoticed.
At publish time the runner (which holds only the public age recipients) computes
SHA-256 digests of the canonical JSON of the manifest (everything but the seal)
and stores them age-encrypted to those recipients in the manifest's ``seal``
field. Verify and restore (which hold the identity) decrypt the seal and compare
it with the manifest as stored; any difference is an ``IntegrityError`` naming the
manifest and what changed.

What it does not do: age encryption is not a signature. Anyone holding a
recipient (public, and listed in every manifest) and write access to the
repository can compute a fresh seal for an edited manifest. The seal catches
edits by hand, by scripts and tools that do not re-seal, corruption, and a
manifest copied to another id or target; it is not proof of authorship.

Proof of authorship is the Ed25519 signature (``strongroom.signing``): since format
3 every manifest is signed, and the signature, not the seal, decides whether a
manifest is trusted (``Origin.verdict``). The seal is kept inside the signed bytes:
it costs one age encryption per backup, still guards the format-2 manifests written
before signing (``strongroom sign`` checks it before signing one), and when a
signature fails it names what changed (``Origin.check`` opens it first).
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import pyrage

from strongroom.errors import IntegrityError
from strongroom.pipeline import parse_identities, parse_recipients
from strongroom.signing import Verdict

SEAL_FIELD = "seal"
SEAL_VERSION = 1
# the first manifest format that is always sealed when it has recipients
SEALED_FORMAT = 2
# the first manifest format that is always signed (names its key id in ``signed_by``)
SIGNED_FORMAT = 3
_SHORT = 16  # hex digits of the per-field digests: diagnostics only, the full hash decides


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise IntegrityError(f"duplicate key {key[:40]!r}")
        doc[key] = value
    return doc


def parse_document(raw: bytes, name: str) -> dict[str, Any]:
    """Parse stored manifest JSON strictly (a duplicated key could hide an edit)."""
    try:
        doc = json.loads(raw, object_pairs_hook=_no_duplicates)
    except IntegrityError as exc:
        raise IntegrityError(f"manifest {name} is malformed: {exc}") from None
    except ValueError as exc:
        raise IntegrityError(f"manifest {name} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise IntegrityError(f"manifest {name} is not a JSON object")
    return doc


def canonical(value: Any) -> bytes:
    """Canonical JSON: sorted keys, no whitespace, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _digest(value: Any) -> str:
    return hashlib.sha256(canonical(value)).hexdigest()


def digests(doc: dict[str, Any]) -> dict[str, Any]:
    """What a seal holds for ``doc`` (the manifest without its seal): the SHA-256 of the
    whole, and short digests per field and per artifact to say what changed."""
    body = {k: v for k, v in doc.items() if k != SEAL_FIELD}
    artifacts = body.get("artifacts")
    per_artifact: dict[str, str] = {}
    if isinstance(artifacts, list):
        for item in artifacts:
            if isinstance(item, dict):
                per_artifact[str(item.get("name"))] = _digest(item)[:_SHORT]
    return {
        "v": SEAL_VERSION,
        "sha256": _digest(body),
        "fields": {k: _digest(v)[:_SHORT] for k, v in body.items()},
        "artifacts": per_artifact,
    }


def recipients_of(doc: dict[str, Any]) -> list[str]:
    """The age recipients the manifest's artifacts were encrypted to, in order."""
    found: list[str] = []
    for item in doc.get("artifacts") or []:
        for recipient in item.get("recipients") or []:
            if recipient not in found:
                found.append(recipient)
    return found


def make_seal(doc: dict[str, Any], recipients: list[str]) -> str:
    """The seal of ``doc``: its digests, age-encrypted to ``recipients``, base64."""
    plaintext = canonical(digests(doc))
    sealed = pyrage.encrypt(plaintext, parse_recipients(recipients))
    return base64.b64encode(sealed).decode("ascii")


def open_seal(seal: str, identities: list[str], name: str) -> dict[str, Any]:
    """Decrypt a seal; ``IntegrityError`` naming the manifest if it cannot be read."""
    keys = parse_identities(identities)
    try:
        sealed = base64.b64decode(seal.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise IntegrityError(f"manifest {name}: its seal is not base64 (edited?)") from None
    try:
        plaintext = pyrage.decrypt(sealed, keys)
    except pyrage.DecryptError:
        raise IntegrityError(
            f"manifest {name}: its seal does not decrypt with the given identity "
            "(wrong key? or the seal was replaced)"
        ) from None
    try:
        content = json.loads(plaintext)
    except ValueError:
        content = None
    if not isinstance(content, dict) or content.get("v") != SEAL_VERSION:
        raise IntegrityError(f"manifest {name}: its seal holds no manifest digest")
    return content


def _differences(expected: dict[str, Any], actual: dict[str, Any]) -> str:
    want, have = expected.get("fields") or {}, actual["fields"]
    parts = []
    changed = sorted(k for k in want.keys() & have.keys() if want[k] != have[k])
    added = sorted(have.keys() - want.keys())
    removed = sorted(want.keys() - have.keys())
    if "artifacts" in changed:
        was, now = expected.get("artifacts") or {}, actual["artifacts"]
        names = sorted(n for n in was.keys() | now.keys() if was.get(n) != now.get(n))
        changed.remove("artifacts")
        parts.append("artifacts (" + ", ".join(names[:10] or ["order"]) + ")")
    parts.extend(changed)
    if added:
        parts.append("added " + ", ".join(a[:40] for a in added[:10]))
    if removed:
        parts.append("removed " + ", ".join(removed[:10]))
    return "; ".join(parts) or "content"


def check_seal(doc: dict[str, Any], seal: str, identities: list[str], name: str) -> None:
    """Compare the stored manifest ``doc`` with its seal; ``IntegrityError`` on any difference."""
    expected = open_seal(seal, identities, name)
    actual = digests(doc)
    if expected.get("sha256") != actual["sha256"]:
        raise IntegrityError(
            f"manifest {name} does not match its seal: changed since it was published "
            f"({_differences(expected, actual)}); it is not trusted"
        )


def check_name(key: str, claimed_key: str) -> None:
    """A manifest must be stored under its own engine/target/id (a copy is not a backup)."""
    if key != claimed_key:
        raise IntegrityError(
            f"manifest {key} describes another backup ({claimed_key}): copied or moved, "
            "it is not trusted"
        )


@dataclass
class Origin:
    """The stored manifest an in-memory manifest was loaded from (for restore-time checks)."""

    key: str
    document: dict[str, Any]
    seal: str | None
    format_version: int
    claimed_key: str
    verdict: Verdict | None = None
    checked_for: set[str] = field(default_factory=set)

    def check(self, identities: list[str]) -> None:
        """Refuse a manifest stored under another backup's name, a manifest not signed
        by a trusted key (when the seal opens and differs, that difference is named),
        a manifest whose seal does not match, or a sealed format without a seal. An
        unsealed old manifest (format 1) passes the seal step: verify warns."""
        check_name(self.key, self.claimed_key)
        if self.verdict is not None and not self.verdict.trusted:
            refused = self.verdict.message("manifest")
            if self.seal is not None and identities:
                try:
                    check_seal(self.document, self.seal, identities, self.key)
                except IntegrityError as exc:
                    raise IntegrityError(f"{refused}: {exc}") from None
            raise IntegrityError(refused)
        if self.seal is None:
            if self.format_version >= SEALED_FORMAT:
                raise IntegrityError(
                    f"manifest {self.key} has lost its seal (format {self.format_version} "
                    "manifests are always sealed); it is not trusted"
                )
            return
        who = hashlib.sha256("\n".join(identities).encode()).hexdigest()
        if who in self.checked_for:
            return
        check_seal(self.document, self.seal, identities, self.key)
        self.checked_for.add(who)


_ORIGIN_ATTR = "stored_origin"


def attach(obj: object, origin: Origin) -> None:
    """Remember where ``obj`` (a Manifest or Artifact) was loaded from. Kept outside the
    model's fields: never serialised, ignored by equality."""
    object.__setattr__(obj, _ORIGIN_ATTR, origin)


def origin_of(obj: object) -> Origin | None:
    found = getattr(obj, "__dict__", {}).get(_ORIGIN_ATTR)
    return found if isinstance(found, Origin) else None
