"""Prefect block type for client-side encryption keys (age X25519).

A backup runner needs only ``recipients`` (public); restore and verify need
``identity``. Keep two blocks if runners must not be able to decrypt.
"""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from strongroom.config import EncryptionConfig


class EncryptionKey(Block):
    """age recipients for backups and the identity (secret) for restores."""

    _block_type_name = "strongroom encryption key"
    _block_type_slug = "strongroom-encryption-key"
    _description = "age X25519 recipients (public) and identity (secret) for strongroom."

    recipients: list[str] = Field(default_factory=list, description="age1... public keys")
    identity: SecretStr | None = Field(default=None, description="AGE-SECRET-KEY-1...")

    def to_config(self) -> EncryptionConfig:
        return EncryptionConfig(
            recipients=list(self.recipients),
            identities=[self.identity] if self.identity else [],
        )
