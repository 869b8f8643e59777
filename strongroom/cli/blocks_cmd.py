"""``strongroom target add``, ``strongroom repository add`` and ``strongroom key create``:
the blocks a backup needs, made from a shell (no YAML, no UI).

Secrets come from an environment variable (``--password-env VAR``) or a hidden prompt
(``--password-prompt``), never from argv, and are never printed. A block that exists is
changed only with ``--update`` (then only the options given change). Each command
prints what it saved and the command that uses it; ``--json`` prints one document.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer

from strongroom.cli.common import JsonOpt, _emit, _handled, out
from strongroom.errors import Conflict, InvalidInput, NotFound

target_app = typer.Typer(help="Target blocks (the databases to back up).", no_args_is_help=True)
target_add_app = typer.Typer(help="Add (or --update) a target block.", no_args_is_help=True)
repository_app = typer.Typer(help="Repository blocks (where backups go).", no_args_is_help=True)
key_app = typer.Typer(help="Encryption and signing key blocks.", no_args_is_help=True)
target_app.add_typer(target_add_app, name="add")

UpdateOpt = typer.Option(False, "--update", help="Change the existing block of this name.")
PasswordEnvOpt = typer.Option(
    None, "--password-env", metavar="VAR", help="Read the password from environment variable VAR."
)
PasswordPromptOpt = typer.Option(
    False, "--password-prompt", help="Ask for the password (hidden input)."
)
DrillsOpt = typer.Option(None, "--drills/--no-drills", help="Take part in scheduled drills.")
PlainOpt = typer.Option(
    None, "--allow-plaintext/--no-allow-plaintext", help="Allow no TLS to a non-loopback host."
)


def register(app: typer.Typer) -> None:
    """Add ``target``, ``repository`` and ``key`` to the ``strongroom`` app."""
    app.add_typer(target_app, name="target")
    app.add_typer(repository_app, name="repository")
    app.add_typer(key_app, name="key")


def _api() -> str:
    from strongroom.cli.preflight import PrefectNotConfigured, require_api

    url = require_api("blocks are stored on the Prefect API")
    if url is None:
        raise PrefectNotConfigured(
            "a block saved on a temporary Prefect server is gone when the command ends: "
            "start one with `make up` or `prefect server start` and set PREFECT_API_URL"
        )
    return url


def _secret(env_var: str | None, prompt: bool, what: str) -> str | None:
    """A secret from environment variable ``env_var`` or a hidden prompt; None: not given."""
    if env_var is not None and prompt:
        raise InvalidInput(f"give the {what} by --{what}-env or --{what}-prompt, not both")
    if env_var is not None:
        value = os.environ.get(env_var)
        if not value:
            raise InvalidInput(f"environment variable {env_var} (the {what}) is not set or empty")
        return value
    if prompt:
        value = typer.prompt(what.replace("-", " ").capitalize(), hide_input=True, err=True)
        if not value:
            raise InvalidInput(f"empty {what}")
        return str(value)
    return None


def _exists(slug: str, name: str, api_url: str) -> bool:
    from strongroom.cli.preflight import block_names

    return name in block_names(slug, api_url)


def _check_name(name: str) -> None:
    import re

    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
        raise InvalidInput(
            f"block name {name!r}: lowercase letters, digits and dashes, starting with a "
            "letter or digit (Prefect's rule)"
        )


def _save(cls: Any, name: str, given: dict[str, Any], update: bool) -> tuple[Any, str]:
    """Create block ``name`` of ``cls`` from ``given``, or with ``update`` change the
    existing one's ``given`` fields. Returns the block and "created" / "updated"."""
    _check_name(name)
    api_url = _api()
    slug = cls.get_block_type_slug()
    exists = _exists(slug, name, api_url)
    if exists and not update:
        raise Conflict(f"a {slug} block named {name!r} exists; pass --update to change it")
    if update and not exists:
        raise NotFound(f"no {slug} block named {name!r} to update (leave out --update)")
    values: dict[str, Any] = {}
    if exists:
        values = dict(cls.load(name))
    values.update(given)
    try:
        block = cls.model_validate(values)
    except ValueError as exc:
        from strongroom.redact import scrub

        raise InvalidInput(f"{slug}/{name}: {scrub(str(exc))}") from None
    cls.register_type_and_schema()
    block.save(name, overwrite=True)
    return block, ("updated" if exists else "created")


def _given(**fields: Any) -> dict[str, Any]:
    """The options given (None: not given; an empty list: not given)."""
    return {k: v for k, v in fields.items() if v is not None and v != []}


def _report(
    as_json: bool, kind: str, name: str, action: str, shown: dict[str, Any], next_cmd: str
) -> None:
    data = {"ok": True, "block": kind, "name": name, "action": action, **shown, "next": next_cmd}

    def human() -> None:
        fields = ", ".join(f"{k}={v}" for k, v in shown.items() if v not in (None, [], ""))
        out.print(f"{action} {kind} block {name!r}: {fields}", markup=False, highlight=False)
        out.print(f"next: {next_cmd}", markup=False, highlight=False)

    _emit(as_json, data, human)


def _target_shown(block: Any, fields: tuple[str, ...]) -> dict[str, Any]:
    shown = {f: getattr(block, f) for f in fields}
    shown["password"] = "set (hidden)" if block.password is not None else "none"
    return shown


def _register_redaction(secret: str | None) -> None:
    if secret:
        from strongroom.redact import register

        register(secret)


@target_add_app.command("postgresql")
def add_postgresql_cmd(
    name: str = typer.Argument(..., help="Block name (what `strongroom backup` names)."),
    host: str | None = typer.Option(None, help="Server host (default 127.0.0.1)."),
    port: int | None = typer.Option(None, help="Server port (default 5432)."),
    user: str | None = typer.Option(None, help="Role to connect as (default postgres)."),
    password_env: str | None = PasswordEnvOpt,
    password_prompt: bool = PasswordPromptOpt,
    database: list[str] = typer.Option(
        [], "--database", "-d", help="Database to back up (repeatable; none: all)."
    ),
    sslmode: str | None = typer.Option(None, help="libpq sslmode (verify-full recommended)."),
    allow_plaintext: bool | None = PlainOpt,
    maintenance_db: str | None = typer.Option(None, help="Database to connect to first."),
    dump_format: str | None = typer.Option(None, help="custom (streamed) or directory."),
    jobs: int | None = typer.Option(None, help="Parallel pg_dump jobs (directory format)."),
    pitr: bool | None = typer.Option(None, "--pitr/--no-pitr", help="WAL archived (PITR)."),
    data_directory: str | None = typer.Option(None, help="Data directory (file backups)."),
    drills: bool | None = DrillsOpt,
    rpo_hours: float | None = typer.Option(None, help="Recovery point objective, hours."),
    rto_minutes: float | None = typer.Option(None, help="Recovery time objective, minutes."),
    update: bool = UpdateOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Save a PostgreSQL target block (strongroom-postgres-target)."""
    with _handled(as_json):
        password = _secret(password_env, password_prompt, "password")
        _register_redaction(password)
        from blocks import PostgresTarget

        given = _given(
            host=host,
            port=port,
            user=user,
            password=password,
            databases=list(database),
            sslmode=sslmode,
            allow_plaintext=allow_plaintext,
            maintenance_db=maintenance_db,
            dump_format=dump_format,
            jobs=jobs,
            pitr=pitr,
            data_directory=data_directory,
            drills=drills,
            rpo_hours=rpo_hours,
            rto_minutes=rto_minutes,
        )
        block, action = _save(PostgresTarget, name, given, update)
        shown = _target_shown(block, ("host", "port", "user", "databases", "pitr"))
        _report(
            as_json,
            "postgresql target",
            name,
            action,
            shown,
            f"strongroom backup postgresql {name}",
        )


@target_add_app.command("clickhouse")
def add_clickhouse_cmd(
    name: str = typer.Argument(..., help="Block name (what `strongroom backup` names)."),
    host: str | None = typer.Option(None, help="Server host (default 127.0.0.1)."),
    port: int | None = typer.Option(None, help="Native protocol port (default 9000)."),
    http_port: int | None = typer.Option(None, help="HTTP interface port (default 8123)."),
    user: str | None = typer.Option(None, help="User (default default)."),
    password_env: str | None = PasswordEnvOpt,
    password_prompt: bool = PasswordPromptOpt,
    secure: bool | None = typer.Option(None, "--secure/--no-secure", help="HTTPS."),
    allow_plaintext: bool | None = PlainOpt,
    database: list[str] = typer.Option(
        [], "--database", "-d", help="Database or glob to back up (repeatable; none: all)."
    ),
    exclude_database: list[str] = typer.Option([], help="Database or glob to skip (repeatable)."),
    incremental: bool | None = typer.Option(
        None, "--incremental/--no-incremental", help="Only changed partitions."
    ),
    full_every: int | None = typer.Option(None, help="A full backup at least every N."),
    method: str | None = typer.Option(None, help="logical or native (BACKUP ... TO S3)."),
    export_via: str | None = typer.Option(None, help="auto, clickhouse-client or http."),
    drills: bool | None = DrillsOpt,
    rpo_hours: float | None = typer.Option(None, help="Recovery point objective, hours."),
    rto_minutes: float | None = typer.Option(None, help="Recovery time objective, minutes."),
    update: bool = UpdateOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Save a ClickHouse target block (strongroom-clickhouse-target)."""
    with _handled(as_json):
        password = _secret(password_env, password_prompt, "password")
        _register_redaction(password)
        from blocks import ClickHouseTarget

        given = _given(
            host=host,
            port=port,
            http_port=http_port,
            user=user,
            password=password,
            secure=secure,
            allow_plaintext=allow_plaintext,
            databases=list(database),
            exclude_databases=list(exclude_database),
            incremental=incremental,
            full_every=full_every,
            method=method,
            export_via=export_via,
            drills=drills,
            rpo_hours=rpo_hours,
            rto_minutes=rto_minutes,
        )
        block, action = _save(ClickHouseTarget, name, given, update)
        shown = _target_shown(block, ("host", "port", "http_port", "user", "databases"))
        _report(
            as_json,
            "clickhouse target",
            name,
            action,
            shown,
            f"strongroom backup clickhouse {name}",
        )


@target_add_app.command("redis")
def add_redis_cmd(
    name: str = typer.Argument(..., help="Block name (what `strongroom backup` names)."),
    host: str | None = typer.Option(None, help="Server host (default 127.0.0.1)."),
    port: int | None = typer.Option(None, help="Server port (default 6379)."),
    username: str | None = typer.Option(None, "--username", "--user", help="ACL user."),
    password_env: str | None = PasswordEnvOpt,
    password_prompt: bool = PasswordPromptOpt,
    tls: bool | None = typer.Option(None, "--tls/--no-tls", help="Connect with TLS."),
    tls_ca_file: str | None = typer.Option(None, help="CA bundle for TLS."),
    allow_plaintext: bool | None = PlainOpt,
    db: list[int] = typer.Option([], "--db", help="Database number (repeatable; none: all)."),
    backup_method: str | None = typer.Option(None, help="auto, sync, bgsave or logical."),
    data_path: str | None = typer.Option(None, help="The server's RDB file (file restores)."),
    drills: bool | None = DrillsOpt,
    rpo_hours: float | None = typer.Option(None, help="Recovery point objective, hours."),
    rto_minutes: float | None = typer.Option(None, help="Recovery time objective, minutes."),
    update: bool = UpdateOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Save a Redis target block (strongroom-redis-target)."""
    with _handled(as_json):
        password = _secret(password_env, password_prompt, "password")
        _register_redaction(password)
        from blocks import RedisTarget

        given = _given(
            host=host,
            port=port,
            username=username,
            password=password,
            tls=tls,
            tls_ca_file=tls_ca_file,
            allow_plaintext=allow_plaintext,
            dbs=list(db),
            backup_method=backup_method,
            data_path=data_path,
            drills=drills,
            rpo_hours=rpo_hours,
            rto_minutes=rto_minutes,
        )
        block, action = _save(RedisTarget, name, given, update)
        shown = _target_shown(block, ("host", "port", "username", "dbs"))
        _report(as_json, "redis target", name, action, shown, f"strongroom backup redis {name}")


def _s3_bucket(
    existing: Any,
    bucket: str | None,
    endpoint_url: str | None,
    region: str | None,
    access_key_id: str | None,
    secret_access_key: str | None,
) -> Any:
    """The prefect-aws S3Bucket (with AwsCredentials) of a repository block, or None when
    no S3 option is given (an existing one is then kept)."""
    if all(v is None for v in (bucket, endpoint_url, region, access_key_id, secret_access_key)):
        return None
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    old = existing.s3_bucket if existing is not None else None
    old_creds = old.credentials if old is not None else None
    name = bucket or (old.bucket_name if old is not None else None)
    if not name:
        raise InvalidInput("an S3 repository needs --bucket")
    params = old_creds.aws_client_parameters if old_creds is not None else AwsClientParameters()
    if endpoint_url is not None:
        params = AwsClientParameters(**{**dict(params), "endpoint_url": endpoint_url})
    creds: dict[str, Any] = dict(old_creds) if old_creds is not None else {}
    creds["aws_client_parameters"] = params
    if region is not None:
        creds["region_name"] = region
    if access_key_id is not None:
        creds["aws_access_key_id"] = access_key_id
    if secret_access_key is not None:
        creds["aws_secret_access_key"] = secret_access_key
    return S3Bucket(bucket_name=name, credentials=AwsCredentials(**creds))


@repository_app.command("add")
def add_repository_cmd(
    name: str = typer.Argument("default", help="Block name (commands' --repository)."),
    local_path: Path | None = typer.Option(None, help="A folder (a local repository)."),
    bucket: str | None = typer.Option(None, help="S3 bucket (an S3 repository)."),
    prefix: str | None = typer.Option(None, help="Key prefix inside the bucket."),
    endpoint_url: str | None = typer.Option(None, help="S3 endpoint (S3-compatible stores)."),
    region: str | None = typer.Option(None, help="S3 region (default us-east-1)."),
    access_key_id_env: str | None = typer.Option(
        None, metavar="VAR", help="Read the S3 access key id from environment variable VAR."
    ),
    secret_access_key_env: str | None = typer.Option(
        None, metavar="VAR", help="Read the S3 secret key from environment variable VAR."
    ),
    secret_access_key_prompt: bool = typer.Option(
        False, help="Ask for the S3 secret access key (hidden input)."
    ),
    sse: str | None = typer.Option(None, help="none, AES256 or aws:kms."),
    kms_key_id: str | None = typer.Option(None, help="KMS key (with --sse aws:kms)."),
    lock_mode: str | None = typer.Option(None, help="Object lock: GOVERNANCE or COMPLIANCE."),
    retention_days: int | None = typer.Option(None, help="Object-lock retention in days."),
    compression_level: int | None = typer.Option(None, help="zstd level 1-22 (default 3)."),
    max_parts: int | None = typer.Option(None, help="The store's part limit per upload."),
    signing: bool = typer.Option(
        True,
        "--signing/--no-signing",
        help="A new repository: generate its Ed25519 signing key (block NAME-signing), sign "
        "with it and trust it (backups need one; --no-signing for a read-only block).",
    ),
    update: bool = UpdateOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Save a repository block (strongroom-repository): --local-path, or --bucket on S3
    (credentials from environment variables, or the runner's AWS environment if none)."""
    with _handled(as_json):
        access_key_id = _secret(access_key_id_env, False, "access-key-id")
        secret_key = _secret(secret_access_key_env, secret_access_key_prompt, "secret-access-key")
        _register_redaction(secret_key)
        if local_path is not None and bucket is not None:
            raise InvalidInput("a repository is --local-path or --bucket, not both")
        if not update and local_path is None and bucket is None:
            raise InvalidInput("give --local-path P (a folder) or --bucket B (S3)")
        from blocks import BackupRepository

        existing = None
        if update:
            _check_name(name)
            if _exists(BackupRepository.get_block_type_slug(), name, _api()):
                existing = BackupRepository.load(name)
        s3 = _s3_bucket(existing, bucket, endpoint_url, region, access_key_id, secret_key)
        given_where: dict[str, Any] = {}
        if local_path is not None:
            given_where = {"local_path": str(local_path.expanduser().resolve()), "s3_bucket": None}
        elif s3 is not None:
            given_where = {"s3_bucket": s3, "local_path": None}
        given = {
            **given_where,
            **_given(
                prefix=prefix,
                sse=sse,
                kms_key_id=kms_key_id,
                lock_mode=lock_mode,
                retention_days=retention_days,
                compression_level=compression_level,
                max_parts=max_parts,
            ),
        }
        signed: dict[str, Any] = {}
        if signing and not update:
            _check_name(name)
            if _exists(BackupRepository.get_block_type_slug(), name, _api()):
                raise Conflict(
                    f"a strongroom-repository block named {name!r} exists; pass --update to "
                    "change it"
                )
            key_block, public, key_id = _new_signing_block(f"{name}-signing")
            given.update(signing_key=key_block, trusted_signers=[public])
            signed = {"signing_key": f"{name}-signing", "key_id": key_id}
        block, action = _save(BackupRepository, name, given, update)
        where = (
            {"local_path": block.local_path}
            if block.local_path
            else {"bucket": block.s3_bucket.bucket_name, "prefix": block.prefix}
        )
        flag = "" if name == "default" else f" -r {name}"
        _report(
            as_json,
            "repository",
            name,
            action,
            {**where, **signed, "trusted_signers": len(block.trusted_signers)},
            f"strongroom key create (then: strongroom backup postgresql TARGET{flag})",
        )


@key_app.command("create")
def key_create_cmd(
    name: str = typer.Argument("default", help="Encryption key block name (commands' --key)."),
    public_only: bool = typer.Option(
        False,
        "--public-only",
        help="Save only the recipient (backup runners that must not decrypt); the identity "
        "goes to --identity-file for a separate block where restores run.",
    ),
    identity_file: Path | None = typer.Option(
        None, help="With --public-only: a new file (mode 0600) for the identity."
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Generate an age X25519 key pair into an encryption key block (strongroom-encryption-key).

    An existing key is never replaced: backups made with it could not be read again."""
    with _handled(as_json):
        from pyrage import x25519

        from blocks import EncryptionKey

        identity = x25519.Identity.generate()
        recipient = str(identity.to_public())
        secret = str(identity)
        _register_redaction(secret)
        given: dict[str, Any] = {"recipients": [recipient]}
        if not public_only:
            given["identity"] = secret
        if public_only and identity_file is None:
            raise InvalidInput("--public-only needs --identity-file (where the identity goes)")
        if identity_file is not None and not public_only:
            raise InvalidInput("--identity-file goes with --public-only")
        if identity_file is not None:  # first: a key whose identity is lost is no key
            _write_new_private(identity_file, secret + "\n")
        try:
            _, action = _save(EncryptionKey, name, given, update=False)
        except BaseException:
            if identity_file is not None:
                identity_file.unlink()
            raise
        flag = "" if name == "default" else f" -k {name}"
        _report(
            as_json,
            "encryption key",
            name,
            action,
            {
                "recipient": recipient,
                "identity": f"in {identity_file}" if identity_file else "set (hidden)",
            },
            f"strongroom backup postgresql TARGET{flag}",
        )


def _write_new_private(path: Path, text: str) -> None:
    """Write ``text`` to a new file of mode 0600 (an existing file is never overwritten)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise Conflict(f"{path} exists; it is never overwritten") from None
    except OSError as exc:
        raise InvalidInput(f"cannot create {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _new_signing_block(name: str) -> tuple[Any, str, str]:
    """A new Ed25519 key saved as signing key block ``name``: the saved block (loaded, so
    a repository block references it), its public PEM and key id."""
    from blocks import SigningKey
    from strongroom.signing import Signer

    signer = Signer.generate()
    private = signer.private_pem().get_secret_value()
    _register_redaction(private)
    _save(SigningKey, name, {"private_key": private}, update=False)
    return SigningKey.load(name), signer.public.pem(), signer.key_id


@key_app.command("create-signing")
def key_create_signing_cmd(
    name: str = typer.Argument("default", help="Signing key block name."),
    repository: str = typer.Option(
        "default", "--repository", "-r", help="Repository block that signs with it and trusts it."
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Generate an Ed25519 signing key into a signing key block (strongroom-signing-key),
    and make repository block REPOSITORY sign with it and trust its public key."""
    with _handled(as_json):
        from blocks import BackupRepository

        _check_name(repository)
        if not _exists(BackupRepository.get_block_type_slug(), repository, _api()):
            raise NotFound(
                f"no repository block {repository!r}: create one with "
                f"`strongroom repository add {repository} --local-path P` (or --bucket B)"
            )
        key_block, public, key_id = _new_signing_block(name)
        repo: Any = BackupRepository.load(repository)
        trusted = [*repo.trusted_signers, *([] if public in repo.trusted_signers else [public])]
        _save(
            BackupRepository,
            repository,
            {"trusted_signers": trusted, "signing_key": key_block},
            update=True,
        )
        _report(
            as_json,
            "signing key",
            name,
            "created",
            {"key_id": key_id, "repository": repository, "public_key": public},
            f"strongroom backup postgresql TARGET -r {repository} (manifests are signed)",
        )
