"""Keeps secrets out of logs, exceptions and tool output.

Every secret the process learns (passwords, secret keys, age identities) is
registered here; ``scrub`` replaces them in any text, and ``SecretFilter``
does it for every log record that passes through the handlers it is attached to.
"""

from __future__ import annotations

import logging
import threading

_lock = threading.Lock()
_secrets: set[str] = set()
MASK = "**********"


def register(*values: str | None) -> None:
    """Remember secret values (short ones are ignored: they would mask ordinary words)."""
    with _lock:
        for value in values:
            if value and len(value) >= 4:
                _secrets.add(value)


def registered() -> frozenset[str]:
    """Every secret registered so far (for leak scans in tests)."""
    with _lock:
        return frozenset(_secrets)


def scrub(text: str) -> str:
    with _lock:
        known = sorted(_secrets, key=len, reverse=True)
    for value in known:
        if value in text:
            text = text.replace(value, MASK)
    return text


class SecretFilter(logging.Filter):
    """Rewrites log records so no registered secret is emitted."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = scrub(message)
        if cleaned != message:
            record.msg = cleaned
            record.args = None
        return True


def install_log_filter(logger: logging.Logger | None = None) -> None:
    """Attach SecretFilter to a logger's handlers and the root logger's handlers."""
    targets = [logger or logging.getLogger()]
    for target in targets:
        if not any(isinstance(f, SecretFilter) for f in target.filters):
            target.addFilter(SecretFilter())
        for handler in target.handlers:
            if not any(isinstance(f, SecretFilter) for f in handler.filters):
                handler.addFilter(SecretFilter())
