"""Prefect block type for a backup runner's Ed25519 signing key (strongroom.signing).

Only backup runners (and `strongroom sign`) need it; readers trust the public keys in
the repository block's ``trusted_signers``. The repository block of a runner names
this block in its ``signing_key`` field.
"""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from strongroom.signing import SIGNING_BLOCK


class SigningKey(Block):
    """The private Ed25519 key a backup runner signs manifests with."""

    _block_type_name = "strongroom signing key"
    _block_type_slug = SIGNING_BLOCK
    _description = "Ed25519 private key (PEM PKCS#8) that signs strongroom manifests."

    private_key: SecretStr = Field(
        description="-----BEGIN PRIVATE KEY----- ... (from `strongroom keygen-signing`)"
    )
