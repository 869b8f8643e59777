"""``strongroom target add`` / ``repository add`` / ``key create`` against the session's real
Prefect API: the blocks they save take a real backup; an existing name is refused without
``--update``; a secret given by environment variable is never printed."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from tests.fixtures.postgres import PgDatabase
from tests.fixtures.s3 import MotoServer


def _invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    from strongroom.cli.app import app

    return CliRunner().invoke(app, list(args), env=env)


def _all_output(result: Result) -> str:
    return result.stdout + result.stderr


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_blocks_from_the_cli_take_a_backup_and_keep_the_password_out_of_output(
    prefect_api: str, pg_db: PgDatabase, tmp_path: Path
) -> None:
    server = pg_db.server
    pg_db.psql("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 50);")
    target, repo, key = _name("cli-pg"), _name("cli-repo"), _name("cli-key")
    env = {"CLI_TEST_PGPASS": server.password}
    added = _invoke(
        "target", "add", "postgresql", target,
        "--host", server.host, "--port", str(server.port), "--user", server.superuser,
        "--password-env", "CLI_TEST_PGPASS", "--database", pg_db.name, "--json",
        env=env,
    )  # fmt: skip
    assert added.exit_code == 0, _all_output(added)
    assert server.password not in _all_output(added)
    data = json.loads(added.stdout)
    assert data["action"] == "created"
    assert data["password"] == "set (hidden)"
    assert data["databases"] == [pg_db.name]
    assert data["next"] == f"strongroom backup postgresql {target}"

    from blocks import PostgresTarget

    saved = PostgresTarget.load(target)
    assert saved.password is not None and saved.password.get_secret_value() == server.password

    made_repo = _invoke("repository", "add", repo, "--local-path", str(tmp_path / "r"), "--json")
    assert made_repo.exit_code == 0, _all_output(made_repo)
    assert json.loads(made_repo.stdout)["signing_key"] == f"{repo}-signing"
    made_key = _invoke("key", "create", key)
    assert made_key.exit_code == 0, _all_output(made_key)
    assert "AGE-SECRET-KEY" not in _all_output(made_key)
    assert f"created encryption key block '{key}'" in made_key.stdout

    backup = _invoke("backup", "postgresql", target, "-r", repo, "-k", key, "--json")
    assert backup.exit_code == 0, _all_output(backup)
    manifest = json.loads(backup.stdout)
    assert manifest["target"] == target
    assert [a for a in manifest["artifacts"] if pg_db.name in a["name"]]
    assert server.password not in _all_output(backup)


def test_existing_name_is_refused_without_update_and_update_changes_only_what_is_given(
    prefect_api: str,
) -> None:
    name = _name("cli-redis")
    first = _invoke("target", "add", "redis", name, "--host", "127.0.0.1", "--port", "6400")
    assert first.exit_code == 0, _all_output(first)
    assert f"next: strongroom backup redis {name}" in first.stdout
    again = _invoke("target", "add", "redis", name, "--port", "6401")
    assert again.exit_code == 9, _all_output(again)
    assert "--update" in " ".join(again.stderr.split())

    env = {"CLI_TEST_REDISPASS": "s3cr3t-" + uuid.uuid4().hex}
    updated = _invoke(
        "target", "add", "redis", name, "--port", "6401", "--password-env", "CLI_TEST_REDISPASS",
        "--update", "--json", env=env,
    )  # fmt: skip
    assert updated.exit_code == 0, _all_output(updated)
    assert env["CLI_TEST_REDISPASS"] not in _all_output(updated)
    assert json.loads(updated.stdout)["action"] == "updated"

    from blocks import RedisTarget

    block = RedisTarget.load(name)
    assert (block.host, block.port) == ("127.0.0.1", 6401)
    assert block.password is not None
    assert block.password.get_secret_value() == env["CLI_TEST_REDISPASS"]

    missing = _invoke("target", "add", "redis", _name("cli-none"), "--update")
    assert missing.exit_code == 3, _all_output(missing)


def test_bad_input_is_exit_2(prefect_api: str) -> None:
    unset = _invoke("target", "add", "postgresql", _name("cli-pg"), "--password-env", "NO_SUCH_VAR")
    assert unset.exit_code == 2, _all_output(unset)
    assert "NO_SUCH_VAR" in unset.stderr
    bad_name = _invoke("target", "add", "clickhouse", "Bad Name")
    assert bad_name.exit_code == 2, _all_output(bad_name)
    neither = _invoke("repository", "add", _name("cli-repo"))
    assert neither.exit_code == 2, _all_output(neither)
    bad_value = _invoke("target", "add", "postgresql", _name("cli-pg"), "--dump-format", "tar")
    assert bad_value.exit_code == 2, _all_output(bad_value)


def test_s3_repository_secrets_from_env_and_never_printed(prefect_api: str) -> None:
    name = _name("cli-s3")
    env = {"CLI_AK": "AKIAEXAMPLE", "CLI_SK": "sk-" + uuid.uuid4().hex}
    made = _invoke(
        "repository", "add", name, "--bucket", "bk", "--prefix", "p/",
        "--endpoint-url", "http://127.0.0.1:9", "--region", "eu-west-1",
        "--access-key-id-env", "CLI_AK", "--secret-access-key-env", "CLI_SK", "--json",
        env=env,
    )  # fmt: skip
    assert made.exit_code == 0, _all_output(made)
    assert env["CLI_SK"] not in _all_output(made)
    from blocks import BackupRepository

    config = BackupRepository.load(name).to_config()
    assert (config.bucket, config.prefix, config.region) == ("bk", "p", "eu-west-1")
    assert config.endpoint_url == "http://127.0.0.1:9"
    assert config.trusted_signers


def test_commands_need_a_prefect_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    result = _invoke("key", "create", "nowhere")
    assert result.exit_code == 6, _all_output(result)
    assert "make up" in " ".join(result.stderr.split())


def test_password_prompt_is_hidden_and_saved(prefect_api: str) -> None:
    name = _name("cli-ch")
    secret = "pr0mpt-" + uuid.uuid4().hex
    result = _invoke_input(
        secret + "\n", "target", "add", "clickhouse", name, "--password-prompt", "--json"
    )
    assert result.exit_code == 0, _all_output(result)
    assert secret not in _all_output(result)
    assert json.loads(result.stdout)["password"] == "set (hidden)"  # the prompt is on stderr
    from blocks import ClickHouseTarget

    block = ClickHouseTarget.load(name)
    assert block.password is not None and block.password.get_secret_value() == secret


def test_missing_block_hint_names_the_command_that_creates_it(prefect_api: str) -> None:
    name = _name("cli-missing")
    result = _invoke("backup", "postgresql", name)
    assert result.exit_code == 3, _all_output(result)
    assert f"strongroom target add postgresql {name}" in " ".join(result.stderr.split())


def _invoke_input(text: str, *args: str) -> Result:
    from strongroom.cli.app import app

    return CliRunner().invoke(app, list(args), input=text)


def test_public_only_key_puts_the_identity_in_a_new_private_file(
    prefect_api: str, tmp_path: Path
) -> None:
    name, path = _name("cli-pub"), tmp_path / "identity.txt"
    result = _invoke("key", "create", name, "--public-only", "--identity-file", str(path))
    assert result.exit_code == 0, _all_output(result)
    identity = path.read_text().strip()
    assert identity.startswith("AGE-SECRET-KEY-1") and identity not in _all_output(result)
    assert path.stat().st_mode & 0o777 == 0o600
    from blocks import EncryptionKey

    block = EncryptionKey.load(name)
    assert block.identity is None and len(block.recipients) == 1
    again = _invoke("key", "create", name)
    assert again.exit_code == 9, _all_output(again)
    other = _name("cli-pub")
    taken = _invoke("key", "create", other, "--public-only", "--identity-file", str(path))
    assert taken.exit_code == 9, _all_output(taken)
    assert path.read_text().strip() == identity


def test_signing_key_rotation_and_repository_update(prefect_api: str, tmp_path: Path) -> None:
    repo = _name("cli-rot")
    made = _invoke("repository", "add", repo, "--local-path", str(tmp_path / "a"), "--json")
    assert made.exit_code == 0, _all_output(made)
    first_key = json.loads(made.stdout)["key_id"]
    rotated = _invoke("key", "create-signing", f"{repo}-next", "-r", repo, "--json")
    assert rotated.exit_code == 0, _all_output(rotated)
    assert "PRIVATE KEY" not in _all_output(rotated)
    second_key = json.loads(rotated.stdout)["key_id"]
    moved = _invoke(
        "repository", "add", repo, "--local-path", str(tmp_path / "b"), "--compression-level",
        "5", "--update",
    )  # fmt: skip
    assert moved.exit_code == 0, _all_output(moved)

    from blocks import BackupRepository

    config = BackupRepository.load(repo).to_config()
    from strongroom.signing import Trust

    trust = Trust.from_config(config.trusted_signers, config.signing_key)
    assert trust.key_ids == [first_key, second_key]
    assert trust.signer is not None and trust.signer.key_id == second_key
    assert (config.path, config.compression_level) == (str(tmp_path / "b"), 5)
    missing = _invoke("key", "create-signing", _name("cli-k"), "-r", _name("cli-norepo"))
    assert missing.exit_code == 3, _all_output(missing)


def test_s3_repository_from_the_cli_takes_a_backup(
    prefect_api: str, pg_db: PgDatabase, s3_server: MotoServer, s3_bucket: str
) -> None:
    server = pg_db.server
    pg_db.psql("CREATE TABLE s (id int); INSERT INTO s VALUES (1);")
    target, repo, key = _name("cli-pg"), _name("cli-s3repo"), _name("cli-key")
    # moto checks no signatures: a random secret can be looked for in the output
    env = {
        "CLI_PG": server.password,
        "CLI_AK": s3_server.access_key,
        "CLI_SK": "sk-" + uuid.uuid4().hex,
    }
    steps = [
        ["target", "add", "postgresql", target, "--host", server.host, "--port",
         str(server.port), "--user", server.superuser, "--password-env", "CLI_PG",
         "--database", pg_db.name],
        ["repository", "add", repo, "--bucket", s3_bucket, "--prefix", "cli",
         "--endpoint-url", s3_server.endpoint_url, "--access-key-id-env", "CLI_AK",
         "--secret-access-key-env", "CLI_SK"],
        ["key", "create", key],
        ["backup", "postgresql", target, "-r", repo, "-k", key, "--json"],
    ]  # fmt: skip
    for args in steps:
        result = _invoke(*args, env=env)
        assert result.exit_code == 0, _all_output(result)
        assert env["CLI_SK"] not in _all_output(result)
    backup_id = json.loads(result.stdout)["backup_id"]
    listed = _invoke("list", "-r", repo, "--json")
    assert listed.exit_code == 0, _all_output(listed)
    assert backup_id in listed.stdout
