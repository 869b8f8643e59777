"""Email alerts over SMTP: the bootstrap config's email channel, delivered to a real
(local, authenticated) SMTP server through the notification block Prefect's server
runs. The end-to-end path (a failed deployment run -> automation -> mail) is in
tests/test_operator_e2e.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from blocks.notifications import SmtpEmail, mailto_url
from strongroom.deploy.bootstrap_config import BootstrapConfig, EmailChannel
from tests.fixtures.smtp_server import SmtpReceiver

HOSTILE_PASSWORD = "p@ss w:rd/&?#%"


@pytest.fixture(scope="module")
def smtp(tmp_path_factory: Any) -> Iterator[SmtpReceiver]:
    with SmtpReceiver(tmp_path_factory.mktemp("smtp"), "alerts@example.com", HOSTILE_PASSWORD) as s:
        yield s


def _channel(smtp: SmtpReceiver, **overrides: Any) -> SmtpEmail:
    return SmtpEmail.model_validate(
        {
            "host": smtp.host,
            "port": smtp.port,
            "security": "none",
            "username": smtp.username,
            "password": smtp.password,
            "sender_email": "strongroom@example.com",
            "to": ["oncall@example.com", "dba@example.com"],
            **overrides,
        }
    )


def _send(block: SmtpEmail, subject: str, body: str) -> None:
    with block.raise_on_failure():
        block.notify(body, subject)


def test_mail_reaches_every_recipient_with_a_hostile_password(smtp: SmtpReceiver) -> None:
    _send(_channel(smtp), "strongroom: backup-postgresql Failed", "token-4711 target shop")
    mails = smtp.wait_for("token-4711", timeout=20)
    assert sorted(m["To"] for m in mails) == ["dba@example.com", "oncall@example.com"]
    assert all(m["Subject"] == "strongroom: backup-postgresql Failed" for m in mails)
    assert all("strongroom@example.com" in m["From"] for m in mails)


def test_a_wrong_password_is_refused_and_delivers_nothing(smtp: SmtpReceiver) -> None:
    with pytest.raises(Exception) as failure:
        _send(_channel(smtp, password="not-it"), "subject", "token-0815")
    assert "not-it" not in str(failure.value)
    assert not smtp.wait_for("token-0815", timeout=1)


def test_the_url_scheme_follows_the_security_mode(smtp: SmtpReceiver) -> None:
    assert mailto_url(_channel(smtp)).startswith("mailto://")
    assert "mode=starttls" in mailto_url(_channel(smtp, security="starttls"))
    ssl = mailto_url(_channel(smtp, security="ssl", port=465))
    assert ssl.startswith("mailtos://") and "mode=ssl" in ssl and ":465?" in ssl
    anonymous = mailto_url(_channel(smtp, username=None, password=None))
    assert "@127.0.0.1" not in anonymous


def test_config_errors_are_clear_and_keep_the_password_out(tmp_path: Path) -> None:
    base = {"sender_email": "s@example.com", "to": ["o@example.com"]}
    with pytest.raises(ValidationError, match="exactly one of smtp or sendgrid_api_key"):
        EmailChannel.model_validate(base)
    with pytest.raises(ValidationError, match="username and password go together"):
        EmailChannel.model_validate({**base, "smtp": {"host": "mail", "username": "u"}})
    with pytest.raises(ValidationError) as unknown:
        EmailChannel.model_validate({**base, "smtp": {"host": "mail", "pasword": "x"}})
    assert "pasword" in str(unknown.value)
    config = BootstrapConfig.model_validate(
        {
            "notifications": {
                "email": {**base, "smtp": {"host": "m", "username": "u", "password": "hunter22"}}
            }
        }
    )
    assert "hunter22" not in repr(config) and "hunter22" not in config.model_dump_json()
