"""The CLI's checks before a flow run (``strongroom.cli.preflight``), against the real
Prefect API of the session: a mistyped block is exit 3 with the nearest names and no flow
run; no configured API is a clear refusal, not a silent temporary server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]


def _flow_run_count(api: str) -> int:
    request = urllib.request.Request(
        f"{api.rstrip('/')}/flow_runs/count",
        data=b"{}",
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return int(json.loads(response.read()))


@pytest.fixture(scope="module")
def named_blocks(prefect_api: str) -> str:
    from blocks import PostgresTarget, register_all

    register_all()
    for name in ("preflight-orders", "preflight-billing", "preflight-ledger"):
        PostgresTarget(host="127.0.0.1", port=1).save(name, overwrite=True)
    return prefect_api


def _invoke(*args: str) -> tuple[int, str]:
    from strongroom.cli.app import app

    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_mistyped_target_is_exit_3_with_the_nearest_names_and_no_flow_run(
    named_blocks: str,
) -> None:
    before = _flow_run_count(named_blocks)
    code, output = _invoke("backup", "postgresql", "preflight-ordres")
    assert code == 3, output
    text = " ".join(output.split())
    assert "'preflight-ordres'" in text
    assert "nearest first: preflight-orders," in text
    assert "strongroom bootstrap" in text
    code, output = _invoke("drill", "preflight-ledgr", "--engine", "postgresql")
    assert code == 3, output
    assert "nearest first: preflight-ledger" in " ".join(output.split())
    assert _flow_run_count(named_blocks) == before


def test_missing_repository_block_is_exit_3_for_runs_and_reads(named_blocks: str) -> None:
    before = _flow_run_count(named_blocks)
    code, output = _invoke("backup", "postgresql", "preflight-orders", "-r", "no-such-repo")
    assert code == 3, output
    assert "no repository block 'no-such-repo'" in " ".join(output.split())
    code, output = _invoke("list", "-r", "no-such-repo")
    assert code == 3, output
    assert "no repository block 'no-such-repo'" in " ".join(output.split())
    assert "ValueError" not in output
    assert _flow_run_count(named_blocks) == before


def _cli_without_api(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(home), COLUMNS="200", XDG_CONFIG_HOME=str(home / "cfg"))
    return subprocess.run(
        [sys.executable, "-m", "strongroom.cli.app", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )


def test_no_api_configured_refuses_clearly_and_starts_no_server(tmp_path: Path) -> None:
    home = tmp_path / "prefect-home"
    home.mkdir()
    # a profile without an API URL, as `prefect profile create` leaves it
    (home / "profiles.toml").write_text('active = "local"\n[profiles.local]\n')
    for args in (("backup", "postgresql", "mydb"), ("list",)):
        result = _cli_without_api(home, *args)
        assert result.returncode == 6, result.stderr
        text = " ".join(result.stderr.split())
        assert text.count("no Prefect API configured") == 1
        assert "make up" in text and "prefect server start" in text
        assert "PREFECT_API_URL" in text
    # the temporary server would have created its database under PREFECT_HOME
    assert not list(home.rglob("*.db")), list(home.rglob("*"))


def test_the_profile_api_url_is_used(tmp_path: Path, named_blocks: str) -> None:
    home = tmp_path / "prefect-home"
    home.mkdir()
    (home / "profiles.toml").write_text(
        f'active = "dev"\n[profiles.dev]\nPREFECT_API_URL = "{named_blocks}"\n'
    )
    result = _cli_without_api(home, "list", "-r", "no-such-repo")
    assert result.returncode == 3, result.stderr
    assert "no repository block 'no-such-repo'" in " ".join(result.stderr.split())


def test_nearest_orders_by_similarity() -> None:
    from strongroom.cli.preflight import nearest

    assert nearest("prod-db", ["staging", "prod-dbx", "prod"])[0] == "prod-dbx"
