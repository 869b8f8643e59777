"""Checks a CLI command makes before it creates a flow run, without importing Prefect.

1. A Prefect API is configured: ``PREFECT_API_URL`` in the environment or in the active
   Prefect profile. Without one the command refuses (``PrefectNotConfigured``, exit 6)
   instead of silently starting Prefect's temporary (ephemeral) server, unless
   ``STRONGROOM_EPHEMERAL_PREFECT=1`` asks for that server (then a one-line notice).
2. Every block the command names exists, read over plain HTTP (one GET per block): a
   missing or mistyped name raises ``BlockNotFound`` (exit 3) with the name asked for,
   the existing names of that block type (nearest first) and how to create one. So a
   typo creates no failed flow run and pages nobody.
"""

from __future__ import annotations

import base64
import difflib
import json
import os
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from strongroom.errors import InvalidInput, NotFound, ServiceUnavailable

EPHEMERAL_ENV = "STRONGROOM_EPHEMERAL_PREFECT"

# block type slug -> what it is, in messages
_KINDS: dict[str, str] = {
    "strongroom-postgres-target": "PostgreSQL target",
    "strongroom-clickhouse-target": "ClickHouse target",
    "strongroom-redis-target": "Redis target",
    "strongroom-repository": "repository",
    "strongroom-encryption-key": "encryption key",
    "strongroom-retention-policy": "retention policy",
}


# block type slug -> the command that creates one (strongroom.cli.blocks_cmd)
_CREATE_COMMANDS: dict[str, str] = {
    "strongroom-postgres-target": "strongroom target add postgresql {name} --host H "
    "--user U --password-env VAR",
    "strongroom-clickhouse-target": "strongroom target add clickhouse {name} --host H "
    "--user U --password-env VAR",
    "strongroom-redis-target": "strongroom target add redis {name} --host H --password-env VAR",
    "strongroom-repository": "strongroom repository add {name} --local-path DIR (or --bucket B)",
    "strongroom-encryption-key": "strongroom key create {name}",
}


class PrefectNotConfigured(ServiceUnavailable):
    """No Prefect API is configured (nor the temporary server asked for)."""


class BlockNotFound(NotFound):
    """A block the command names does not exist on the Prefect API."""


def profile_api_url() -> str | None:
    """``PREFECT_API_URL`` of the active Prefect profile (``PREFECT_PROFILE`` or the
    profiles file's ``active``), read from ``profiles.toml`` without importing Prefect."""
    path_env = os.environ.get("PREFECT_PROFILES_PATH")
    home = os.environ.get("PREFECT_HOME") or str(Path.home() / ".prefect")
    path = Path(path_env or Path(home) / "profiles.toml").expanduser()
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or data.get("active") or "ephemeral"
    profile = (data.get("profiles") or {}).get(active) or {}
    url = profile.get("PREFECT_API_URL") if isinstance(profile, dict) else None
    return str(url).rstrip("/") if url else None


def configured_api_url() -> str | None:
    """The Prefect API URL from the environment, else from the active profile."""
    url = os.environ.get("PREFECT_API_URL", "").strip()
    return url.rstrip("/") if url else profile_api_url()


def require_api(reason: str = "this command runs a Prefect flow") -> str | None:
    """The configured API URL; None only when the temporary server was asked for (with a
    notice on stderr). Raises ``PrefectNotConfigured`` otherwise."""
    url = configured_api_url()
    if url:
        return url
    if os.environ.get(EPHEMERAL_ENV, "") in ("1", "true", "yes"):
        import sys

        print(
            f"note: no PREFECT_API_URL; {EPHEMERAL_ENV}=1, so Prefect starts a temporary "
            "server for this command (its runs are gone afterwards)",
            file=sys.stderr,
        )
        return None
    raise PrefectNotConfigured(
        f"no Prefect API configured: {reason}. Start one with "
        "`make up` (the local stack) or `prefect server start`, then set "
        "PREFECT_API_URL=http://127.0.0.1:4200/api (or `prefect config set "
        f"PREFECT_API_URL=...`). {EPHEMERAL_ENV}=1 runs it on a temporary server instead."
    )


def api_headers() -> dict[str, str]:
    """The Prefect API request headers (``PREFECT_API_KEY`` or ``PREFECT_API_AUTH_STRING``)."""
    headers = {"Accept": "application/json"}
    if key := os.environ.get("PREFECT_API_KEY"):
        headers["Authorization"] = f"Bearer {key}"
    elif auth := os.environ.get("PREFECT_API_AUTH_STRING"):
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    return headers


def _get(url: str, timeout: float) -> object:
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise InvalidInput("PREFECT_API_URL must be an http(s) URL")
    request = urllib.request.Request(url, headers=api_headers())  # noqa: S310 (http(s) only)
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
        return json.loads(response.read())


def block_names(slug: str, api_url: str, timeout: float = 15) -> list[str]:
    """Names of the block documents of type ``slug`` (none when the type is not
    registered), secrets left out."""
    url = f"{api_url}/block_types/slug/{slug}/block_documents?include_secrets=false"
    try:
        docs = _get(url, timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return []
        raise ServiceUnavailable(f"Prefect API answered {exc.code} listing {slug}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise ServiceUnavailable(f"Prefect API unreachable at {api_url}: {exc}") from None
    names = [d.get("name") for d in docs if isinstance(d, dict)] if isinstance(docs, list) else []
    return sorted(str(n) for n in names if n and not str(n).startswith("anonymous-"))


def nearest(name: str, names: Iterable[str]) -> list[str]:
    """``names``, the closest to ``name`` first (difflib ratio; ties by name)."""

    def score(other: str) -> float:
        return difflib.SequenceMatcher(None, name.lower(), other.lower()).ratio()

    return sorted(names, key=lambda n: (-score(n), n))


def not_found_message(slug: str, name: str, names: list[str]) -> str:
    what = _KINDS.get(slug, slug)
    if names:
        shown = nearest(name, names)[:10]
        more = f" (and {len(names) - 10} more)" if len(names) > 10 else ""
        have = f"existing {what} blocks, nearest first: {', '.join(shown)}{more}"
    else:
        have = f"there is no {what} block yet"
    command = _CREATE_COMMANDS.get(slug)
    create = (
        f"create one with `{command.format(name=name)}`, or " if command else "create one with "
    )
    create += (
        f"`strongroom bootstrap --config FILE.yaml` holding "
        f"`blocks: {{{slug}: {{{name}: {{...fields}}}}}}` "
        "(deployments/bootstrap.example.yaml), or in the Prefect UI (Blocks)"
    )
    if not names:
        create += " (after `strongroom blocks register` if the block type is missing)"
    return f"no {what} block {name!r}; {have}; {create}"


def require_blocks(blocks: Iterable[tuple[str, str]], api_url: str | None = None) -> None:
    """Check, before any flow run, that each ``(slug, name)`` block exists. Needs an API
    (``require_api``); with the temporary server (None) there is nothing to ask yet."""
    url = api_url if api_url is not None else require_api()
    if url is None:
        return
    for slug, name in blocks:
        quoted = urllib.parse.quote(name, safe="")
        try:
            _get(f"{url}/block_types/slug/{slug}/block_documents/name/{quoted}", 15)
            continue
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise ServiceUnavailable(
                    f"Prefect API answered {exc.code} reading block {slug}/{name}"
                ) from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise ServiceUnavailable(f"Prefect API unreachable at {url}: {exc}") from None
        raise BlockNotFound(not_found_message(slug, name, block_names(slug, url)))


TARGET_SLUGS = {
    "postgresql": "strongroom-postgres-target",
    "clickhouse": "strongroom-clickhouse-target",
    "redis": "strongroom-redis-target",
}
REPOSITORY_SLUG = "strongroom-repository"
KEY_SLUG = "strongroom-encryption-key"
POLICY_SLUG = "strongroom-retention-policy"


def flow_blocks(
    engine: str | None = None,
    targets: Iterable[str | None] = (),
    repository: str | None = None,
    key: str | None = None,
    policy: str | None = None,
) -> list[tuple[str, str]]:
    """The ``(slug, name)`` blocks of a flow-running command: its targets of ``engine``
    (an unknown engine is the flow's to refuse), its repository, key and policy."""
    blocks: list[tuple[str, str]] = []
    slug = TARGET_SLUGS.get(engine or "")
    if slug:
        blocks += [(slug, t) for t in targets if t]
    if repository:
        blocks.append((REPOSITORY_SLUG, repository))
    if key:
        blocks.append((KEY_SLUG, key))
    if policy:
        blocks.append((POLICY_SLUG, policy))
    return blocks
