"""The WAL hot path's configuration file (TOML), read on every archive/restore command.

PostgreSQL runs ``archive_command`` / ``restore_command`` with no Prefect around,
so ``strongroom-wal`` reads a small TOML file instead of blocks::

    target = "prod-db"                 # names the archive: <prefix>/wal/<target>/...
    # spool_dir = "/var/lib/postgresql/15/main/pg_wal/strongroom"   (default)
    # system_identifier = 7311...      # segments from another cluster are refused

    [push]
    mode = "async"                     # async: a background pusher uploads ahead
    parallel = 4                       # segments in flight
    compression_level = 1              # zstd level for WAL (speed first: archive lag)

    [fetch]
    prefetch = 8                       # segments fetched ahead of replay
    identity_file = "/etc/strongroom/wal.key"   # age identity, mode 0600

    [repository]                       # fields of strongroom.config.RepositoryConfig
    kind = "s3"
    bucket = "backups"
    ...

    [encryption]
    recipients = ["age1..."]

Found at ``--config PATH``, else ``$STRONGROOM_CONFIG``, else
``/etc/strongroom/wal.toml``. A file holding a secret (``secret_access_key``)
and the identity file must not be readable by group or others.

Standard library only (``tomllib``): pydantic is imported only when the
repository is opened.
"""

from __future__ import annotations

import marshal
import os
import stat
import zlib

# Start-up cost matters (this runs once per WAL file): no tomllib, pathlib, hashlib,
# dataclasses or typing here. The TOML is parsed once and cached (``marshal``, private
# to the PostgreSQL OS user) next to the spool, keyed by the file's stat identity.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

    from strongroom.config import EncryptionConfig, RepositoryConfig

DEFAULT_PATH = "/etc/strongroom/wal.toml"
ENV_VAR = "STRONGROOM_CONFIG"
_TARGET_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_CACHE_VERSION = 1


class WalConfigError(Exception):
    """The configuration file is missing, unreadable or invalid (exit code 2)."""


class WalConfig:
    """The parsed configuration (see the module docstring for the file format)."""

    FIELDS = (
        "path",
        "target",
        "repository",
        "recipients",
        "identity_file",
        "spool_dir",
        "system_identifier",
        "segment_size",
        "push_mode",
        "push_parallel",
        "push_level",
        "push_linger_s",
        "fetch_prefetch",
        "fetch_parallel",
        "fetch_linger_s",
        "repo_id",
    )

    def __init__(self, **fields: Any) -> None:
        self.path: str = fields["path"]
        self.target: str = fields["target"]
        self.repository: dict[str, Any] = fields["repository"]
        self.recipients: list[str] = fields.get("recipients", [])
        self.identity_file: str | None = fields.get("identity_file")
        self.spool_dir: str | None = fields.get("spool_dir")
        self.system_identifier: int | None = fields.get("system_identifier")
        self.segment_size: int = fields.get("segment_size", 16 * 1024 * 1024)
        self.push_mode: str = fields.get("push_mode", "async")
        self.push_parallel: int = fields.get("push_parallel", 4)
        self.push_level: int = fields.get("push_level", 1)
        self.push_linger_s: float = fields.get("push_linger_s", 2.0)
        self.fetch_prefetch: int = fields.get("fetch_prefetch", 8)
        self.fetch_parallel: int = fields.get("fetch_parallel", 2)
        self.fetch_linger_s: float = fields.get("fetch_linger_s", 10.0)
        self.repo_id: str = fields.get("repo_id") or _repo_id(self.target, self.repository)

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.FIELDS}

    def repo_identity(self) -> str:
        """Fingerprint of where WAL goes (repository + target), for spool markers: a
        marker left by a push into another repository never counts."""
        return self.repo_id

    def spool_base(self, pg_wal: str) -> str:
        return self.spool_dir or os.path.join(pg_wal, "strongroom")

    def repository_config(self) -> RepositoryConfig:
        from strongroom.config import RepositoryConfig

        try:
            return RepositoryConfig(**self.repository)
        except ValueError as exc:
            raise WalConfigError(f"{self.path}: invalid [repository]: {exc}") from None

    def encryption_config(self, *, need_identity: bool) -> EncryptionConfig:
        from pydantic import SecretStr

        from strongroom.config import EncryptionConfig

        identities: list[SecretStr] = []
        if need_identity:
            identities = [SecretStr(text) for text in read_identity_file(self.identity_file)]
        return EncryptionConfig(recipients=list(self.recipients), identities=identities)


def _repo_id(target: str, repository: dict[str, Any]) -> str:
    public = sorted((k, repr(v)) for k, v in repository.items() if k != "secret_access_key")
    text = repr((target, public)).encode()
    return f"{zlib.crc32(text):08x}{zlib.adler32(text):08x}{len(text):x}"


def _private(st: os.stat_result) -> bool:
    return not stat.S_IMODE(st.st_mode) & 0o077


def read_identity_file(path: str | None) -> list[str]:
    """age identities (``AGE-SECRET-KEY-1...`` lines) from a file only its owner can read."""
    if not path:
        raise WalConfigError("wal-fetch needs [fetch] identity_file in the configuration")
    try:
        if not _private(os.stat(path)):
            raise WalConfigError(
                f"identity file {path} is readable by group or others: chmod 600 it"
            )
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise WalConfigError(f"cannot read identity file {path}: {exc.strerror}") from None
    keys = [line.strip() for line in lines if line.strip().startswith("AGE-SECRET-KEY-")]
    if not keys:
        raise WalConfigError(f"identity file {path} holds no AGE-SECRET-KEY-1... line")
    return keys


def config_path(explicit: str | None) -> str:
    return explicit or os.environ.get(ENV_VAR) or DEFAULT_PATH


def _cache_file(cache_dir: str, path: str) -> str:
    return os.path.join(cache_dir, f"config-{zlib.crc32(os.path.abspath(path).encode()):08x}.cache")


def load_wal_config(explicit: str | None = None, cache_dir: str | None = None) -> WalConfig:
    """Read the configuration; with ``cache_dir`` (the spool) a parsed copy is reused
    as long as the file's size, mtime and inode are unchanged."""
    path = config_path(explicit)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise WalConfigError(
            f"cannot read strongroom WAL configuration {path}: {exc.strerror} "
            f"(give --config PATH or set {ENV_VAR})"
        ) from None
    key = (_CACHE_VERSION, os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino)
    cache = _cache_file(cache_dir, path) if cache_dir else None
    if cache is not None:
        try:
            with open(cache, "rb") as f:
                own = os.fstat(f.fileno())
                # only a cache this user wrote, private to it (it holds the config)
                if own.st_uid != os.geteuid() or not _private(own):
                    raise ValueError("foreign cache")
                cached = marshal.load(f)  # noqa: S302 (our own 0600 file, checked above)
            if cached[0] == key:
                return WalConfig(**cached[1])
        except (OSError, EOFError, ValueError, TypeError, IndexError, KeyError):
            pass
    cfg = _parse_file(path, st)
    if cache is not None:
        try:
            os.makedirs(cache_dir or "", mode=0o700, exist_ok=True)
            tmp = f"{cache}.{os.getpid()}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                marshal.dump((key, cfg.as_dict()), f)
            os.replace(tmp, cache)
        except OSError:
            pass  # a cache we cannot write only costs time
    return cfg


def _parse_file(path: str, st: os.stat_result) -> WalConfig:
    import tomllib

    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise WalConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise WalConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_wal_config(data, path, private=_private(st))


def _int(section: dict[str, Any], key: str, default: int, low: int, high: int, path: str) -> int:
    value = section.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise WalConfigError(f"{path}: {key} must be an integer from {low} to {high}")
    return value


def _seconds(section: dict[str, Any], key: str, default: float, path: str) -> float:
    value = section.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= 3600:
        raise WalConfigError(f"{path}: {key} must be a number of seconds from 0 to 3600")
    return float(value)


def parse_wal_config(data: dict[str, Any], path: str, *, private: bool = True) -> WalConfig:
    target = data.get("target")
    if not isinstance(target, str) or not target or not set(target) <= _TARGET_CHARS:
        raise WalConfigError(f"{path}: 'target' must be a name (letters, digits, _ . -)")
    repository = data.get("repository")
    if not isinstance(repository, dict) or "kind" not in repository:
        raise WalConfigError(f"{path}: a [repository] table with 'kind' is required")
    if repository.get("secret_access_key") and not private:
        raise WalConfigError(
            f"{path} holds secret_access_key but is readable by group or others: chmod 600 it"
        )
    encryption = data.get("encryption", {})
    recipients = encryption.get("recipients", []) if isinstance(encryption, dict) else []
    if not isinstance(recipients, list) or not all(isinstance(r, str) for r in recipients):
        raise WalConfigError(f"{path}: [encryption] recipients must be a list of age1... keys")
    push = data.get("push", {})
    fetch = data.get("fetch", {})
    if not isinstance(push, dict) or not isinstance(fetch, dict):
        raise WalConfigError(f"{path}: [push] and [fetch] must be tables")
    mode = push.get("mode", "async")
    if mode not in ("async", "sync"):
        raise WalConfigError(f"{path}: [push] mode must be 'async' or 'sync'")
    sysid = data.get("system_identifier")
    if sysid is not None and (not isinstance(sysid, int) or isinstance(sysid, bool)):
        raise WalConfigError(f"{path}: system_identifier must be an integer")
    spool = data.get("spool_dir")
    identity = fetch.get("identity_file")
    return WalConfig(
        path=path,
        target=target,
        repository=dict(repository),
        recipients=list(recipients),
        identity_file=str(identity) if identity else None,
        spool_dir=str(spool) if spool else None,
        system_identifier=sysid,
        segment_size=_int(data, "segment_size", 16 * 1024 * 1024, 1 << 20, 1 << 30, path),
        push_mode=mode,
        push_parallel=_int(push, "parallel", 4, 1, 64, path),
        push_level=_int(push, "compression_level", 1, 1, 22, path),
        push_linger_s=_seconds(push, "linger_seconds", 2.0, path),
        fetch_prefetch=_int(fetch, "prefetch", 8, 0, 256, path),
        fetch_parallel=_int(fetch, "parallel", 2, 1, 64, path),
        fetch_linger_s=_seconds(fetch, "linger_seconds", 10.0, path),
    )


# ------------------------------------------------------------------ writing


def _toml_value(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def render_wal_config(data: dict[str, Any]) -> str:
    lines = ["# strongroom WAL archiving (strongroom-wal push / fetch); keep mode 0600"]
    tables = []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    for name, table in tables:
        lines.append("")
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None)
    return "\n".join(lines) + "\n"


def write_wal_config(
    path: str | os.PathLike[str],
    *,
    target: str,
    repository: RepositoryConfig,
    recipients: list[str],
    identity_file: str | None = None,
    spool_dir: str | None = None,
    system_identifier: int | None = None,
    push: dict[str, Any] | None = None,
    fetch: dict[str, Any] | None = None,
    owner: str | None = None,
) -> Path:
    """Write the configuration file atomically with mode 0600 (optionally chown it to
    ``owner``, e.g. ``postgres``, when running as root). Returns its path."""
    import json
    from pathlib import Path

    repo = repository.model_dump(mode="json", exclude_none=True)
    repo.pop("signing_key", None)  # the WAL hot path signs nothing: it never holds the key
    if repository.secret_access_key is not None:
        repo["secret_access_key"] = repository.secret_access_key.get_secret_value()
    data: dict[str, Any] = {
        "target": target,
        "spool_dir": spool_dir,
        "system_identifier": system_identifier,
        "push": dict(push or {}),
        "fetch": {**(fetch or {}), "identity_file": identity_file},
        "repository": repo,
        "encryption": {"recipients": list(recipients)},
    }
    parse_wal_config(json.loads(json.dumps(data)), str(path))  # same checks as the reader
    return _write_private(Path(path), render_wal_config(data), owner)


def write_identity_file(
    path: str | os.PathLike[str], identities: list[str], owner: str | None = None
) -> Path:
    """Write age identities to a 0600 file for wal-fetch (restore hosts only)."""
    from pathlib import Path

    return _write_private(Path(path), "\n".join(identities) + "\n", owner)


def _write_private(final: Path, text: str, owner: str | None) -> Path:
    """Mode 0600, optionally handed to ``owner`` (root only): a random temporary name
    (O_EXCL | O_NOFOLLOW), fchmod / fchown on its descriptor, then rename(2); a
    symlink or file planted by the folder's owner is never followed or written."""
    from strongroom.engines.postgres.root_fs import owner_of, write_new

    final.parent.mkdir(parents=True, exist_ok=True)
    dir_fd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        write_new(dir_fd, final.name, text.encode(), mode=0o600, owner=owner_of(owner))
    finally:
        os.close(dir_fd)
    return final
