"""Prefect notification block type for email alerts over SMTP.

Prefect 3 ships SendGrid's API as its only email block; operators mostly have an SMTP
relay. This block sends through Apprise (a Prefect dependency) to the server named by
its fields. Prefect's server runs notification actions itself, so it must be able to
import this class: the ``prefect.collections`` entry point in pyproject.toml makes any
Prefect server installed beside strongroom load it (docs/deploy-kubernetes.md).
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import quote, urlencode

from prefect.blocks.notifications import AbstractAppriseNotificationBlock
from pydantic import Field, SecretStr

SMTP_EMAIL_BLOCK = "strongroom-smtp-email"


class SmtpEmail(AbstractAppriseNotificationBlock):
    """Alert email through an SMTP server (STARTTLS, implicit TLS or plain)."""

    _block_type_name = "strongroom SMTP email"
    _block_type_slug = SMTP_EMAIL_BLOCK
    _description = "Sends strongroom alerts by email through your SMTP server."

    host: str = Field(description="SMTP server host name")
    port: int = Field(default=587, ge=1, le=65535)
    security: Literal["starttls", "ssl", "none"] = Field(
        default="starttls",
        description="starttls (port 587), ssl (implicit TLS, port 465) or none (a local relay)",
    )
    username: str | None = None
    password: SecretStr | None = None
    sender_email: str = Field(description="the From address")
    to: list[str] = Field(min_length=1, description="recipients")

    def block_initialization(self) -> None:
        self._start_apprise_client(SecretStr(mailto_url(self)))


def mailto_url(block: SmtpEmail) -> str:
    """The Apprise ``mailto``/``mailtos`` URL for ``block`` (holds the password)."""
    auth = ""
    if block.username is not None and block.password is not None:
        user = quote(block.username, safe="")
        auth = f"{user}:{quote(block.password.get_secret_value(), safe='')}@"
    query: dict[str, str] = {"from": block.sender_email, "to": ",".join(block.to)}
    scheme = "mailto"
    if block.security != "none":
        scheme, query["mode"] = "mailtos", block.security
    host = f"[{block.host}]" if ":" in block.host else block.host
    return f"{scheme}://{auth}{host}:{block.port}?{urlencode(query)}"
