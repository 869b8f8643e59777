"""prefect.yaml, the Kubernetes work pool's Job (rendered offline, validated strictly),
RBAC manifests, bootstrap (idempotent, against a real Prefect API) and the per-target lock.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from strongroom.deploy.bootstrap import (
    BootstrapConfig,
    declared_deployments,
    entrypoint_path,
    load_config,
    render_prefect_yaml,
)
from strongroom.deploy.bootstrap_config import PG_FILES_POOL
from strongroom.deploy.k8s import (
    load_base_job_template,
    load_k8s_manifests,
    render_job,
    validate_manifest,
)
from strongroom.errors import Conflict, InvalidInput

ROOT = Path(__file__).resolve().parents[1]
K8S_VERSIONS = ["1.29.0", "1.33.0"]
DEPLOYMENTS = declared_deployments(ROOT / "prefect.yaml")
ENGINES = {"postgresql", "clickhouse", "redis"}
KINDS = {
    "backup",
    "base-backup",
    "wal-check",
    "restore",
    "pitr",
    "verify",
    "fleet",
    "retention",
    "compliance",
    "drill",
    "health",
    "deep-verify",
    "files-backup",
    "copy",
}


OPERATIONS = {
    "flows.retention:apply_retention",
    "flows.audit:compliance_audit",
    "flows.drill:restore_drill",
    "flows.health:backup_health",
    "flows.deep_verify:deep_verify_flow",
    "flows.copy:copy_backups",
}


@pytest.fixture(scope="module")
def later_deployments() -> list[dict[str, Any]]:
    """The operations deployments (retention, audit, drills, health, deep verify)."""
    return [d for d in DEPLOYMENTS if d["entrypoint"] in OPERATIONS]


def _pg_files(dep: dict[str, Any]) -> bool:
    """A file-level backup deployment: runs on the process worker next to PostgreSQL."""
    return bool(dep["work_pool"]["name"] == PG_FILES_POOL)


KUBERNETES = [d for d in DEPLOYMENTS if not _pg_files(d)]


def _label(dep: dict[str, Any]) -> str:
    flow = dep["flow_name"] or dep["entrypoint"].split(":")[1].replace("_", "-")
    return f"{flow}/{dep['name']}"


def _flow(dep: dict[str, Any]) -> str:
    return _label(dep).split("/")[0]


# ---- prefect.yaml ---------------------------------------------------------------------------


def test_prefect_yaml_declares_every_flow_with_tags_and_no_build() -> None:
    raw = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert raw["build"] is None and raw["push"] is None
    entrypoints = {d["entrypoint"] for d in DEPLOYMENTS}
    for entry in (
        "flows.postgres:backup_postgresql",
        "flows.postgres:restore_postgresql",
        "flows.verify:verify_backup_flow",
        "flows.fleet:backup_fleet",
        "flows.clickhouse:backup_clickhouse_flow",
        "flows.clickhouse:restore_clickhouse_flow",
        "flows.redis:backup_redis_flow",
        "flows.redis:restore_redis_flow",
        "flows.pitr:base_backup_postgresql",
        "flows.pitr:pitr_restore_postgresql",
        "flows.pitr:wal_check_postgresql",
        "flows.pitr:files_backup_postgresql",
    ):
        assert entry in entrypoints, entry
    for dep in DEPLOYMENTS:  # module paths: a script path would let flows/redis.py
        assert ".py:" not in dep["entrypoint"]  # shadow the redis package
    labels = [_label(d) for d in DEPLOYMENTS]
    assert len(labels) == len(set(labels)), "duplicate flow/deployment names"
    for dep in DEPLOYMENTS:
        tags = set(dep["tags"])
        assert "strongroom" in tags, dep["name"]
        assert tags & KINDS, f"{_label(dep)} has no kind tag"
        pool = dep["work_pool"]
        if _pg_files(dep):  # reads the data directory: never a Job pod
            assert dep["entrypoint"] == "flows.pitr:files_backup_postgresql", _label(dep)
            assert pool["job_variables"] == {}
            continue
        assert dep["entrypoint"] != "flows.pitr:files_backup_postgresql", _label(dep)
        assert pool["name"] == "strongroom-k8s"
        assert pool["job_variables"]["image"], "the image is a job variable"
        engine_free = (
            _label(dep) in ("backup-fleet/on-demand", "verify-backup/on-demand")
            or dep["entrypoint"] in OPERATIONS  # retention, audit, health... span all engines
        )
        assert engine_free or tags & ENGINES, f"{_label(dep)} has no engine tag"


def test_schedules_are_utc_and_restores_have_none() -> None:
    crons = {
        _label(d): (d["schedules"][0]["cron"], d["schedules"][0]["timezone"])
        for d in DEPLOYMENTS
        if d.get("schedules")
    }
    assert crons["backup-fleet/postgresql-daily"] == ("0 2 * * *", "UTC")
    assert crons["backup-fleet/clickhouse-daily"] == ("30 2 * * *", "UTC")
    assert crons["backup-fleet/redis-daily"] == ("0 3 * * *", "UTC")
    assert "backup-fleet/postgresql-base-weekly" in crons
    assert "backup-fleet/postgresql-wal-check-hourly" in crons
    # file-level backups: a weekly full, an incremental on every other day, same time
    full, incr = (
        crons["files-backup-postgresql/full-weekly"],
        crons["files-backup-postgresql/incr-daily"],
    )
    assert full == ("0 1 * * 0", "UTC") and incr == ("0 1 * * 1-6", "UTC")
    for dep in DEPLOYMENTS:
        tags = set(dep["tags"])
        if tags & {"restore", "verify"} or dep["name"] == "on-demand":
            assert not dep.get("schedules"), f"{_label(dep)} must not be scheduled"
            assert dep.get("description"), f"{_label(dep)}: document the parameters"


def test_files_backup_schedules_cover_the_week_with_valid_parameters() -> None:
    """Every day has exactly one files backup (full on Sunday), the parameters are ones
    the flow accepts, and the schedules ship inactive (they need a target block with a
    data_directory and a worker next to PostgreSQL)."""
    from flows.pitr import files_backup_postgresql

    scheduled = [d for d in DEPLOYMENTS if _pg_files(d) and d.get("schedules")]
    days: dict[int, str] = {}
    for dep in scheduled:
        params = dep["parameters"]
        files_backup_postgresql.validate_parameters(params)  # a typo'd name fails here
        (schedule,) = dep["schedules"]
        assert schedule["active"] is False, _label(dep)
        minute, hour, dom, month, dow = schedule["cron"].split()
        assert (minute, hour, dom, month) == ("0", "1", "*", "*"), _label(dep)
        first, _, last = dow.partition("-")
        for day in range(int(first), int(last or first) + 1):
            assert day not in days, f"two files backups on day {day}"
            days[day] = params["backup_type"]
    assert days == {0: "full", **dict.fromkeys(range(1, 7), "incr")}
    on_demand = next(d for d in DEPLOYMENTS if _label(d) == "files-backup-postgresql/on-demand")
    assert not on_demand.get("schedules") and on_demand["description"]


def test_render_for_kubernetes_keeps_files_backups_on_their_pool() -> None:
    cfg = BootstrapConfig.model_validate({"deployments": {"work_pool": "strongroom-k8s"}})
    assert PG_FILES_POOL in {p.name for p in cfg.work_pools}  # bootstrap creates the pool
    doc, _names, _ = render_prefect_yaml(cfg.deployments, "kubernetes", ROOT / "prefect.yaml")
    pools = {f"{d['entrypoint']}/{d['name']}": d["work_pool"]["name"] for d in doc["deployments"]}
    assert pools["flows.pitr:files_backup_postgresql/incr-daily"] == PG_FILES_POOL
    assert pools["flows.pitr:base_backup_postgresql/on-demand"] == "strongroom-k8s"
    files = [d for d in doc["deployments"] if d["work_pool"]["name"] == PG_FILES_POOL]
    assert len(files) == 3 and all(d["work_pool"]["job_variables"] == {} for d in files)


def test_render_for_a_process_pool_skips_missing_code_and_rewrites_pool() -> None:
    cfg = BootstrapConfig.model_validate(
        {
            "deployments": {
                "work_pool": "local",
                "exclude": ["backup-fleet/redis-*"],
                "paused": True,
            },
        }
    )
    doc, names, skipped = render_prefect_yaml(cfg.deployments, "process", ROOT / "prefect.yaml")
    assert "backup-postgresql/on-demand" in names
    assert "backup-fleet/redis-daily" not in names
    assert any("excluded" in s for s in skipped)
    for dep in doc["deployments"]:
        assert dep["work_pool"]["name"] == "local"
        assert dep["work_pool"]["job_variables"] == {}  # no image on a process pool
        for schedule in dep.get("schedules") or []:
            assert schedule["active"] is False
    step = doc["pull"][0]["prefect.deployments.steps.set_working_directory"]
    assert step["directory"] == str(ROOT)
    for dep in DEPLOYMENTS:
        if not entrypoint_path(dep["entrypoint"]).exists():
            assert _label(dep) not in names
            assert any(dep["entrypoint"] in s for s in skipped)


# ---- Kubernetes -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered_jobs() -> dict[str, dict[str, Any]]:
    return {
        _label(dep): render_job(
            dep["work_pool"]["job_variables"],
            flow_name=_flow(dep),
            deployment_name=dep["name"],
            tags=dep["tags"],
            parameters={**(dep.get("parameters") or {}), "target": "prod-db"},
        )
        for dep in KUBERNETES
    }


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_deployments_job_validates_strictly(
    rendered_jobs: dict[str, dict[str, Any]], version: str
) -> None:
    assert len(rendered_jobs) == len(KUBERNETES)
    for label, job in rendered_jobs.items():
        try:
            validate_manifest(job, version)
        except Exception as exc:  # name the deployment in the failure
            pytest.fail(f"{label}: Job invalid for Kubernetes {version}: {exc}")


def test_job_is_hardened(rendered_jobs: dict[str, dict[str, Any]]) -> None:
    for label, job in rendered_jobs.items():
        spec = job["spec"]
        assert spec["parallelism"] == 1 and spec["completions"] == 1, label
        assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0
        pod = spec["template"]["spec"]
        assert "parallelism" not in pod and "completions" not in pod
        assert pod["serviceAccountName"] == "strongroom-runner"
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        container = pod["containers"][0]
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts["/scratch"] == "scratch"
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes["scratch"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["TMPDIR"] == "/scratch" and env["PREFECT_API_URL"]
        assert container["image"] == "registry.example.com/strongroom:0.1.0"
        assert container["resources"]["requests"]["memory"]
        assert job["metadata"]["namespace"] == "strongroom"
        assert job["metadata"]["labels"]["prefect.io/flow-name"] == label.split("/")[0]
    large = rendered_jobs["backup-postgresql/on-demand"]["spec"]["template"]["spec"]
    assert large["containers"][0]["resources"]["limits"]["memory"] == "4Gi"
    assert large["volumes"][0]["emptyDir"]["sizeLimit"] == "100Gi"


def test_operations_flows_are_deployed(later_deployments: list[dict[str, Any]]) -> None:
    """Retention, audit, drills, health and deep verify are declared, point at real flow
    functions, are tagged, and their Jobs validate."""
    assert {d["entrypoint"] for d in later_deployments} == OPERATIONS
    health = next(d for d in later_deployments if "health" in d["entrypoint"])
    assert health["schedules"][0]["cron"] == "*/15 * * * *"
    for dep in later_deployments:
        assert "strongroom" in dep["tags"] and set(dep["tags"]) & KINDS
        assert entrypoint_path(dep["entrypoint"]).exists()
        assert dep["flow_name"], f"{dep['entrypoint']}: no such flow function"
        job = render_job(
            dep["work_pool"]["job_variables"],
            flow_name=_flow(dep),
            deployment_name=dep["name"],
            tags=dep["tags"],
        )
        validate_manifest(job, K8S_VERSIONS[-1])


def test_fleet_fans_out_to_declared_deployments(later_deployments: list[dict[str, Any]]) -> None:
    from flows.fleet import DEPLOYMENTS as FLEET_TARGETS

    declared = {_label(d) for d in [*DEPLOYMENTS, *later_deployments] if d["flow_name"]}
    for (engine, kind), name in FLEET_TARGETS.items():
        code = (ROOT / "flows").glob("*.py")
        if any(name.split("/")[0] in p.read_text() for p in code):
            assert name in declared, f"fleet {engine}/{kind} -> {name} is not in prefect.yaml"


def test_upstream_template_is_invalid_and_ours_passes_the_workers_checks() -> None:
    """The default prefect-kubernetes template puts completions/parallelism in the pod
    spec: strict validation rejects it. Ours moves them to the Job spec, and the worker's
    own manifest check (which wants them present) still accepts it."""
    from prefect_kubernetes.worker import KubernetesWorker

    upstream = copy.deepcopy(KubernetesWorker.get_default_base_job_template())
    job = render_job(
        {"image": "example/strongroom:1"},
        flow_name="backup-postgresql",
        deployment_name="on-demand",
        template=upstream,
    )
    with pytest.raises(Exception, match=r"completions|parallelism"):
        validate_manifest(job, K8S_VERSIONS[-1])
    ours = load_base_job_template()
    pod = ours["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    assert "completions" not in pod and "parallelism" not in pod
    job = render_job({}, flow_name="x", deployment_name="y", template=ours)
    validate_manifest(job, K8S_VERSIONS[-1])


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rbac_and_worker_manifests_validate_strictly(version: str) -> None:
    docs = load_k8s_manifests()
    kinds = {(name, doc["kind"], doc["metadata"]["name"]) for name, doc in docs}
    assert ("rbac-worker.yaml", "Role", "strongroom-worker") in kinds
    assert ("rbac-redis-restart.yaml", "Role", "strongroom-redis-restart") in kinds
    assert ("rbac-redis-restart.yaml", "ServiceAccount", "strongroom-runner") in kinds
    for name, doc in docs:
        try:
            validate_manifest(doc, version)
        except Exception as exc:
            pytest.fail(f"{name} {doc['kind']}/{doc['metadata']['name']}: {exc}")
    rules = {doc["metadata"]["name"]: doc["rules"] for _, doc in docs if doc["kind"] == "Role"}
    worker = {r for rule in rules["strongroom-worker"] for r in rule["resources"]}
    assert {"jobs", "pods", "pods/log", "events"} <= worker
    redis = rules["strongroom-redis-restart"]
    assert any("statefulsets/scale" in r["resources"] and "patch" in r["verbs"] for r in redis)
    assert not any("secrets" in r["resources"] for rs in rules.values() for r in rs)


def test_api_key_travels_by_secret_and_only_redis_restores_mount_a_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker takes PREFECT_API_KEY from a Secret and names that Secret to
    prefect-kubernetes, so Jobs reference it instead of carrying the key; flow-run pods
    mount no service-account token except the Redis restore (StatefulSet restart)."""
    from prefect_kubernetes.settings import KubernetesWorkerSettings

    docs = dict(((n, d["kind"]), d) for n, d in load_k8s_manifests())
    worker = docs[("worker.yaml", "Deployment")]["spec"]["template"]["spec"]
    assert worker["automountServiceAccountToken"] is True
    env = {e["name"]: e for e in worker["containers"][0]["env"]}
    ref = env["PREFECT_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert "value" not in env["PREFECT_API_KEY"]
    for name in ("API_KEY_SECRET_NAME", "API_KEY_SECRET_KEY"):
        key = f"PREFECT_INTEGRATIONS_KUBERNETES_WORKER_{name}"
        monkeypatch.setenv(key, env[key]["value"])
    settings = KubernetesWorkerSettings()
    assert (settings.api_key_secret_name, settings.api_key_secret_key) == (ref["name"], ref["key"])
    runner = docs[("rbac-redis-restart.yaml", "ServiceAccount")]
    assert runner["automountServiceAccountToken"] is False

    mounts = {}
    for d in DEPLOYMENTS:
        job = render_job(
            d["work_pool"].get("job_variables", {}),
            flow_name=d["flow_name"] or "x",
            deployment_name=d["name"],
        )
        pod = job["spec"]["template"]["spec"]
        mounts[_label(d)] = pod["automountServiceAccountToken"]
    assert {label for label, on in mounts.items() if on} == {"restore-redis/on-demand"}
    assert all(isinstance(on, bool) for on in mounts.values())


# ---- config ---------------------------------------------------------------------------------


def test_config_expands_environment_and_names_missing_variables(tmp_path: Path) -> None:
    path = tmp_path / "bootstrap.yaml"
    path.write_text(
        "blocks:\n"
        "  strongroom-postgres-target:\n"
        "    prod: {host: '${PGHOST_X}', port: 5433, password: '${PGPASS_X}'}\n"
        "notifications:\n"
        "  slack: {webhook_url: '${SLACK_X:-http://127.0.0.1:9/hook}'}\n"
    )
    cfg = load_config(path, env={"PGHOST_X": "db.internal", "PGPASS_X": "s3cret"})
    assert cfg.blocks["strongroom-postgres-target"]["prod"]["host"] == "db.internal"
    assert cfg.notifications.slack is not None
    assert cfg.notifications.slack.webhook_url.get_secret_value() == "http://127.0.0.1:9/hook"
    with pytest.raises(InvalidInput, match="PGHOST_X, PGPASS_X"):
        load_config(path, env={})
    inline = load_config(env={"STRONGROOM_BOOTSTRAP_CONFIG": "deployments: {work_pool: p}\n"})
    assert inline.deployments.work_pool == "p"
    with pytest.raises(InvalidInput, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.toml"
    bad.write_text('[deployments]\nwork_poool = "x"\n')
    with pytest.raises(InvalidInput, match="work_poool"):
        load_config(bad)
    example = load_config(
        ROOT / "deployments" / "bootstrap.example.yaml",
        env={
            "PROD_DB_PASSWORD": "x",
            "SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/x",
            "STRONGROOM_AGE_RECIPIENT": "age1xyz",
            "AWS_ACCESS_KEY_ID": "a",
            "AWS_SECRET_ACCESS_KEY": "b",
        },
    )
    assert example.deployments.work_pool == "strongroom-k8s"


# ---- against a real Prefect API -------------------------------------------------------------


def _api(fn: Any) -> Any:
    from prefect.client.orchestration import get_client

    async def run() -> Any:
        async with get_client() as client:
            return await fn(client)

    return asyncio.run(run())


@pytest.mark.slow
def test_bootstrap_twice_is_idempotent(prefect_api: str, tmp_path: Path, monkeypatch: Any) -> None:
    from typer.testing import CliRunner

    from blocks import PostgresTarget
    from strongroom.cli.ops import register
    from strongroom.deploy.bootstrap import bootstrap

    monkeypatch.setenv("BOOT_PG_PASSWORD", "pw-for-bootstrap-test")
    config = tmp_path / "bootstrap.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "work_pools": [
                    {"name": "boot-k8s", "type": "kubernetes"},
                    {"name": "boot-local", "type": "process"},
                ],
                "deployments": {"work_pool": "boot-local"},
                "blocks": {
                    "strongroom-postgres-target": {
                        "boot-pg": {"host": "10.1.2.3", "password": "${BOOT_PG_PASSWORD}"}
                    },
                    "strongroom-repository": {"boot-repo": {"local_path": str(tmp_path)}},
                },
                "notifications": {
                    "slack": {"webhook_url": "http://127.0.0.1:9/slack"},
                    "webhook": {"url": "http://127.0.0.1:9/hook", "headers": {"X-A": "b"}},
                },
            }
        )
    )
    first = bootstrap(load_config(config))
    assert first["deployments"]["deployed"]
    assert set(first["automations"]["automations"].values()) <= {"created", "unchanged"}

    async def snapshot(client: Any) -> dict[str, Any]:
        deployments = await client.read_deployments()
        ours = [d for d in deployments if d.work_pool_name == "boot-local"]
        automations = await client.read_automations()
        return {
            "deployments": sorted((str(d.flow_id), d.name) for d in ours),
            "schedules": sorted((d.name, str(d.flow_id), len(d.schedules)) for d in ours),
            "automations": sorted(a.name for a in automations),
            "pools": sorted(p.name for p in await client.read_work_pools()),
            "k8s_template": (await client.read_work_pool("boot-k8s")).base_job_template,
        }

    before = _api(snapshot)

    # the second run goes through the CLI (strongroom bootstrap --json)
    import typer

    app = typer.Typer()
    register(app)

    @app.command("noop")
    def _noop() -> None:  # a second command, so typer keeps "bootstrap" as a subcommand
        pass

    result = CliRunner().invoke(app, ["bootstrap", "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    second = yaml.safe_load(result.stdout)
    assert set(second["pools"].values()) == {"unchanged"}
    assert set(second["automations"]["automations"].values()) == {"unchanged"}
    assert second["deployments"]["deployed"] == first["deployments"]["deployed"]
    after = _api(snapshot)
    assert after == before
    assert after["k8s_template"] == load_base_job_template()
    for name in ("strongroom-run-failed", "strongroom-backup-stale"):
        assert after["automations"].count(name) == 1
    scheduled = [s for s in after["schedules"] if s[2]]
    assert scheduled and all(count == 1 for _, _, count in scheduled)
    target: Any = PostgresTarget.load("boot-pg")
    assert target.password is not None
    assert target.password.get_secret_value() == "pw-for-bootstrap-test"
    assert "pw-for-bootstrap-test" not in result.output
    bad = CliRunner().invoke(app, ["bootstrap", "--only", "nonsense"])
    assert bad.exit_code == 2 and "unknown bootstrap step" in bad.output


def test_target_lock_excludes_a_second_run_then_lets_it_in(prefect_api: str) -> None:
    from flows.locks import target_limit_name, target_lock

    holding = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with target_lock("postgresql", "lock-test"):
            holding.set()
            release.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert holding.wait(30)
        started = time.monotonic()
        with (
            pytest.raises(Conflict, match=r"lock-test.*in progress") as info,
            target_lock("postgresql", "lock-test", wait_s=1),
        ):
            pass
        assert time.monotonic() - started >= 1
        assert target_limit_name("postgresql", "lock-test") in str(info.value)
        # another target is not blocked
        with target_lock("postgresql", "other-target", wait_s=5):
            pass
    finally:
        release.set()
        thread.join(30)
    # once released, a waiting run gets in
    with target_lock("postgresql", "lock-test", wait_s=10):
        pass


def test_target_lock_serialises_two_flow_runs_of_one_target(prefect_api: str) -> None:
    """Inside flow runs (where the backup flows take it), the second run waits."""
    from prefect import flow

    from flows.locks import target_lock

    @flow(name="lock-probe")
    def probe(target: str) -> tuple[float, float]:
        with target_lock("postgresql", target, wait_s=60):
            start = time.monotonic()
            time.sleep(1.5)
            return start, time.monotonic()

    spans: list[tuple[float, float]] = []
    threads = [threading.Thread(target=lambda: spans.append(probe("flow-lock"))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(spans) == 2
    first, second = sorted(spans)
    assert first[1] <= second[0], spans
