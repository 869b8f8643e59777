"""Where the CLI's read commands find the repository, without importing Prefect.

In order (README.md, "Fast reads"):

1. ``--repository-url`` / ``STRONGROOM_REPOSITORY_URL``: ``file:///path`` or
   ``s3://bucket/prefix`` (credentials, region and endpoint from the standard AWS
   environment or profile, never from argv), trusting the Ed25519 public keys in the PEM
   file ``--trust`` / ``STRONGROOM_TRUSTED_SIGNERS``. No Prefect at all.
2. The BackupRepository block, read with one plain HTTP GET from ``PREFECT_API_URL``
   (``PREFECT_API_KEY`` or ``PREFECT_API_AUTH_STRING`` if set): always the block as it
   is now; without ``PREFECT_API_URL`` in the environment, from the active Prefect
   profile's; with neither, the command refuses (``strongroom.cli.preflight``) rather than
   start a temporary Prefect server. A missing block names the nearest existing ones.
3. Only when that API is unreachable: the repository descriptor cached by the last read
   of the block, ``$XDG_CONFIG_HOME/strongroom/repositories/<id>.json`` (mode 0600, one
   per API URL and block name), with a warning naming its age. It holds the block's
   non-secret fields only (path, bucket, prefix, endpoint, region, encryption settings,
   trusted public keys); a repository whose block holds S3 credentials is never cached
   (its secret would have to be). Used up to ``STRONGROOM_REPOSITORY_CACHE_S`` seconds
   (7 days) after it was written; 0 turns the cache off.

Read commands never sign, so the signing key is dropped from what they open.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from strongroom.cli import preflight
from strongroom.config import RepositoryConfig
from strongroom.errors import InvalidInput, NotFound, ServiceUnavailable
from strongroom.repository import Repository, open_repository

URL_ENV = "STRONGROOM_REPOSITORY_URL"
TRUST_ENV = "STRONGROOM_TRUSTED_SIGNERS"
CACHE_ENV = "STRONGROOM_REPOSITORY_CACHE_S"
DEFAULT_CACHE_S = 7 * 86400.0
REPOSITORY_SLUG = "strongroom-repository"
# never written to a descriptor
_SECRET_FIELDS = {"signing_key", "secret_access_key", "access_key_id"}


def open_read_repository(
    repository: str, url: str | None = None, trust: str | None = None
) -> Repository:
    """The repository for a read command (see the module docstring for the order)."""
    url = url or os.environ.get(URL_ENV) or None
    if url:
        return open_repository(config_from_url(url, trust or os.environ.get(TRUST_ENV)))
    try:
        config = load_block_config(repository).model_copy(update={"signing_key": None})
    except ServiceUnavailable:
        cached = read_descriptor(repository)
        if cached is None:
            raise
        config, age_s = cached
        _warn(
            f"warning: Prefect API unreachable; using the repository {repository!r} as "
            f"cached {age_s / 60:.0f} min ago ({descriptor_path(repository)})"
        )
        return open_repository(config)
    write_descriptor(repository, config)
    return open_repository(config)


def _warn(message: str) -> None:
    import sys

    print(message, file=sys.stderr)


def _trusted_keys(path: str | None) -> list[str]:
    if not path:
        return []
    from strongroom.signing import PublicKey

    text = Path(path).expanduser().read_text()
    marker = "-----END PUBLIC KEY-----"
    pems = [part + marker for part in text.split(marker) if "-----BEGIN" in part]
    return [PublicKey.parse(p.strip()).pem() for p in pems]


def config_from_url(url: str, trust: str | None = None) -> RepositoryConfig:
    """A RepositoryConfig from ``file:///path`` or ``s3://bucket/prefix`` (+ trust file)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.password or parsed.username:
        raise InvalidInput("no credentials in --repository-url: use the AWS environment")
    trusted = _trusted_keys(trust)
    if parsed.scheme == "file":
        path = urllib.parse.unquote(parsed.path)
        if parsed.netloc not in ("", "localhost") or not path:
            raise InvalidInput("a file repository URL is file:///absolute/path")
        return RepositoryConfig(kind="local", path=path, trusted_signers=trusted)
    if parsed.scheme == "s3":
        env = os.environ
        if not parsed.netloc:
            raise InvalidInput("an S3 repository URL is s3://bucket/prefix")
        return RepositoryConfig(
            kind="s3",
            bucket=parsed.netloc,
            prefix=parsed.path.strip("/"),
            endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            trusted_signers=trusted,
        )
    raise InvalidInput(f"unsupported repository URL scheme {parsed.scheme!r} (file:// or s3://)")


# ---- the descriptor cache -------------------------------------------------------------------


def _api_url() -> str:
    return os.environ.get("PREFECT_API_URL", "").rstrip("/")


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "strongroom" / "repositories"


def descriptor_path(repository: str) -> Path:
    """The descriptor of block ``repository`` on this API (or profile)."""
    scope = _api_url() or "profile:" + os.environ.get("PREFECT_PROFILE", "")
    digest = hashlib.sha256(f"{scope}\n{repository}".encode()).hexdigest()[:24]
    return _cache_dir() / f"{digest}.json"


def _cache_seconds() -> float:
    try:
        return float(os.environ.get(CACHE_ENV, DEFAULT_CACHE_S))
    except ValueError:
        return DEFAULT_CACHE_S


def read_descriptor(repository: str) -> tuple[RepositoryConfig, float] | None:
    """The cached config of block ``repository`` and its age in seconds, if not older
    than the cache allows; else None."""
    ttl = _cache_seconds()
    path = descriptor_path(repository)
    if ttl <= 0:
        return None
    try:
        age = time.time() - path.stat().st_mtime
        if age > ttl:
            return None
        data = json.loads(path.read_text())
        return RepositoryConfig.model_validate(data["config"]), age
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_descriptor(repository: str, config: RepositoryConfig) -> Path | None:
    """Cache the non-secret fields of ``config`` (mode 0600); nothing when it holds an S3
    secret or the cache is off. Never fails the command."""
    if _cache_seconds() <= 0 or config.secret_access_key is not None:
        return None
    fields = config.model_dump(mode="json", exclude=_SECRET_FIELDS)
    path = descriptor_path(repository)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"repository": repository, "api_url": _api_url(), "config": fields}, f)
        os.replace(tmp, path)
    except OSError:
        return None
    return path


# ---- the block, over plain HTTP ---------------------------------------------------------------


def fetch_block_data(slug: str, name: str, api_url: str, timeout: float = 30) -> dict[str, Any]:
    """The data (secrets included, nested blocks inline) of block document ``slug/name``."""
    if urllib.parse.urlsplit(api_url).scheme not in ("http", "https"):
        raise InvalidInput("PREFECT_API_URL must be an http(s) URL")
    quoted = urllib.parse.quote(name, safe="")
    url = f"{api_url}/block_types/slug/{slug}/block_documents/name/{quoted}?include_secrets=true"
    request = urllib.request.Request(url, headers=preflight.api_headers())  # noqa: S310 (http(s) only)
    what = f"block {slug}/{name}"
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            doc = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise NotFound(f"no {what} on the Prefect API") from None
        raise ServiceUnavailable(f"Prefect API answered {exc.code} reading {what}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise ServiceUnavailable(f"Prefect API unreachable reading {what}: {exc}") from None
    return dict(doc.get("data") or {})


def load_block_config(repository: str) -> RepositoryConfig:
    """The RepositoryConfig of BackupRepository block ``repository``, its secrets registered
    for redaction."""
    from blocks.repository_config import repository_config
    from strongroom.redact import register

    api_url = _api_url() or preflight.profile_api_url()
    if api_url:
        try:
            data = fetch_block_data(REPOSITORY_SLUG, repository, api_url)
        except NotFound:
            names = preflight.block_names(REPOSITORY_SLUG, api_url)
            raise preflight.BlockNotFound(
                preflight.not_found_message(REPOSITORY_SLUG, repository, names)
            ) from None
        config = repository_config(data)
    else:  # refused unless the temporary server was asked for
        preflight.require_api("this command reads the repository block (or give --repository-url)")
        from flows.common import load_repository

        config = load_repository(repository)[1]
    register(*config.secrets())
    return config
