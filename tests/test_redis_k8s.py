"""Redis file restores coordinated through a Kubernetes StatefulSet.

The API server is the double in tests/fixtures/k8s_api.py (HTTPS with its own CA,
bearer token, real JSON shapes); the StatefulSet's pod is a REAL redis-server that
the double's controller stops when the StatefulSet is scaled to 0 and starts again
(same port, same data folder) when it is scaled back, so the restored RDB is really
loaded by Redis at start.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redispy
import yaml
from pydantic import SecretStr

from strongroom.catalog import Manifest
from strongroom.engines.redis.backup import backup_redis
from strongroom.engines.redis.conn import RedisConnection
from strongroom.engines.redis.k8s import K8sSettings, StatefulSetRestart
from strongroom.engines.redis.key_copy import value_digest
from strongroom.engines.redis.restore import RedisRestoreRequest, restore_redis
from strongroom.errors import (
    AccessDenied,
    InvalidInput,
    NotFound,
    ServiceUnavailable,
    StrongroomError,
    ToolFailed,
)
from strongroom.repository.local import LocalRepository
from strongroom.sandbox.redis import RedisServer
from tests.fixtures.k8s_api import K8sApiDouble, make_tls
from tests.fixtures.strongroom_fixtures import make_local_repo, signed_config

Print = dict[int, dict[bytes, tuple[str, str, bool]]]
RBAC = Path(__file__).resolve().parents[1] / "deployments/k8s/rbac-redis-restart.yaml"


def client(server: RedisServer, db: int = 0, port: int | None = None) -> redispy.Redis:
    return redispy.Redis(
        host=server.host, port=port or server.port, db=db, password=server.password
    )


def fingerprint(server: RedisServer, port: int | None = None) -> Print:
    out: Print = {}
    for db in (0, 2):
        c = client(server, db, port)
        out[db] = {}
        for key in sorted(set(c.scan_iter(count=1000))):
            d = value_digest(c, key)
            out[db][key] = (d["type"], d["sha256"], d["ttl"] >= 0)
    return out


@pytest.fixture(scope="module")
def backup(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory, age_key: Any
) -> tuple[LocalRepository, Manifest, Print]:
    c = client(redis_server)
    c.flushall()
    pipe = c.pipeline(transaction=False)
    for i in range(400):
        pipe.set(f"user:{i}", f"profile-{i}")
    pipe.hset("hash:1", mapping={f"f{i}": i for i in range(50)})
    pipe.rpush("list:1", *range(30))
    pipe.zadd("zset:1", {f"m{i}": i / 2 for i in range(40)})
    pipe.set("ttl:1", "soon", ex=3600)
    pipe.execute()
    client(redis_server, 2).sadd("db2:set", *range(25))
    root = tmp_path_factory.mktemp("k8s-repo")
    repo = make_local_repo(root)
    source = RedisConnection(
        name="cache",
        host=redis_server.host,
        port=redis_server.port,
        password=SecretStr(redis_server.password),
    )
    manifest = backup_redis(source, repo, signed_config(kind="local", path=str(root)), age_key)
    return repo, manifest, fingerprint(redis_server)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[K8sApiDouble]:
    """A fresh Redis StatefulSet (one real pod) holding other data than the backup. It saves
    on shutdown, like a persistent Redis: a file swapped before its pod is gone would be
    overwritten with the old data."""
    server = RedisServer(extra_config="save 3600 1").start()
    (tmp_path / "api").mkdir()
    api = K8sApiDouble(server, tmp_path / "api").start()
    c = client(server)
    c.set("old", "data")
    c.set("user:1", "old-profile")
    c.save()  # the previous data file that must survive a failed restore
    try:
        yield api
    finally:
        api.stop()
        server.stop()


def k8s_conn(api: K8sApiDouble, tmp_path: Path, **extra: Any) -> RedisConnection:
    server = api.redis
    fields: dict[str, Any] = {
        "data_path": str(server.dir / "dump.rdb"),
        "k8s_statefulset": api.name,
        "k8s_namespace": api.namespace,
        "k8s_kubeconfig": str(api.write_kubeconfig(tmp_path / "kubeconfig")),
        "k8s_context": "strongroom-test",
        "k8s_timeout": 30.0,
    }
    fields.update(extra)
    return RedisConnection(
        name="cache",
        host=server.host,
        port=server.port,
        password=SecretStr(server.password),
        **fields,
    )


def shipped_role_rules() -> list[dict[str, Any]]:
    docs = yaml.safe_load_all(RBAC.read_text())
    (role,) = [d for d in docs if d["kind"] == "Role"]
    rules: list[dict[str, Any]] = role["rules"]
    return rules


def request(**extra: Any) -> RedisRestoreRequest:
    return RedisRestoreRequest(mode="file", flush_existing=True, **extra)


def assert_no_token(api: K8sApiDouble, caplog: pytest.LogCaptureFixture, *texts: str) -> None:
    assert api.requests, "the double saw no request"
    for text in (caplog.text, *texts):
        assert api.token not in text


def old_data_intact(api: K8sApiDouble) -> None:
    c = client(api.redis)
    assert c.get("old") == b"data" and c.get("user:1") == b"old-profile"
    assert c.dbsize() == 2


def replica_caught_up(api: K8sApiDouble, ordinal: int, expected: Print) -> bool:
    """Poll pod ``ordinal`` (a Redis replica of pod 0) until it holds ``expected``."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if fingerprint(api.redis, api.replica_ports[ordinal]) == expected:
                return True
        except redispy.RedisError:
            pass  # still syncing / loading
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("replicas", [1, 2])
def test_file_restore_through_statefulset(
    backup: tuple[LocalRepository, Manifest, Print],
    cluster: K8sApiDouble,
    age_key: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    replicas: int,
) -> None:
    caplog.set_level(logging.DEBUG)
    repo, manifest, expected = backup
    api = cluster
    with api.lock:  # the StatefulSet runs `replicas` pods (pod 1: a replica of pod 0)
        api.replicas = replicas
        api.generation += 1
    api.wait_settled()
    # authorized exactly as the Role we ship allows, nothing more
    api.rbac_rules = shipped_role_rules()
    conn = k8s_conn(api, tmp_path)
    pid_before = api.redis.proc.pid if api.redis.proc else None
    plan = restore_redis(conn, repo, age_key, request(dry_run=True))
    assert plan["coordination"] == "kubernetes"
    assert plan["kubernetes"]["original_replicas"] == replicas
    # the exporter pod in the namespace is not selected
    assert plan["kubernetes"]["pods"] == [f"redis-{i}" for i in range(replicas)]
    assert plan["kubernetes"]["auth"] == "kubeconfig"
    assert api.scale_history == []  # the dry-run PATCH (RBAC proof) persisted nothing
    assert any("dryRun=All" in path for method, path, _ in api.requests if method == "PATCH")

    report = restore_redis(conn, repo, age_key, request())

    assert report["keys_ok"] and report["matches_manifest"] and report["sample"]["ok"]
    assert report["coordination"] == "kubernetes"
    k8s = report["kubernetes"]
    assert (k8s["statefulset"], k8s["namespace"]) == ("redis", "cache")
    assert k8s["original_replicas"] == replicas
    assert k8s["scale_down_s"] >= 0 and k8s["scale_up_s"] >= 0 and report["load_wait_s"] >= 0
    assert api.scale_history == [0, replicas]  # back to the count it had, not 1
    assert api.replicas == replicas and api.ready_count() == replicas
    assert api.redis.proc is not None and api.redis.proc.pid != pid_before
    assert fingerprint(api.redis) == expected
    assert client(api.redis).exists("old") == 0
    loaded = client(api.redis).info("persistence")["rdb_last_load_keys_loaded"]
    assert loaded == sum(len(keys) for keys in expected.values())  # loaded from the file
    previous = Path(report["previous_data_file"])
    assert previous.name == f"dump.rdb.pre-restore-{manifest.backup_id}" and previous.exists()
    assert not list(api.redis.dir.glob(".strongroom-restore-*"))
    if replicas > 1:
        assert replica_caught_up(api, 1, expected)  # resynced from the restored pod 0
    assert_no_token(api, caplog, json.dumps(report, default=str))


def test_in_cluster_service_account_and_credentials(
    cluster: K8sApiDouble, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    api = cluster
    env, token, ca = api.in_cluster()
    settings = K8sSettings(statefulset="redis", namespace="cache")
    facts = StatefulSetRestart(
        settings, environ=env, token_file=str(token), ca_file=str(ca)
    ).inspect()
    assert facts["auth"] == "in-cluster" and facts["api_server"] == api.url
    assert facts["original_replicas"] == 1 and facts["pods"] == ["redis-0"]
    texts = []
    with pytest.raises(InvalidInput, match="not in a cluster") as info:
        StatefulSetRestart(settings, environ={}, token_file=str(token), ca_file=str(ca)).inspect()
    texts.append(str(info.value))
    # the kubeconfig's current-context uses a token the server rejects: context matters
    kubeconfig = str(api.write_kubeconfig(tmp_path / "kc"))
    wrong = K8sSettings(statefulset="redis", namespace="cache", kubeconfig=kubeconfig)
    with pytest.raises(AccessDenied, match="401 Unauthorized") as denied:
        StatefulSetRestart(wrong).inspect()
    texts.append(str(denied.value))
    # a CA that did not sign the server's certificate: TLS is verified
    other_ca = tmp_path / "other"
    other_ca.mkdir()
    bad_ca, _, _ = make_tls(other_ca)
    with pytest.raises(ServiceUnavailable, match="certificate") as tls:
        StatefulSetRestart(
            settings, environ=env, token_file=str(token), ca_file=str(bad_ca)
        ).inspect()
    texts.append(str(tls.value))
    assert api.scale_history == []
    assert_no_token(api, caplog, *texts)


def test_missing_statefulset_changes_nothing(
    backup: tuple[LocalRepository, Manifest, Print],
    cluster: K8sApiDouble,
    age_key: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    repo, _, _ = backup
    api = cluster
    pid = api.redis.proc.pid if api.redis.proc else None
    with pytest.raises(NotFound, match=r"StatefulSet cache/nope does not exist") as info:
        restore_redis(k8s_conn(api, tmp_path, k8s_statefulset="nope"), repo, age_key, request())
    assert api.scale_history == [] and api.redis.proc is not None and api.redis.proc.pid == pid
    old_data_intact(api)
    assert not list(api.redis.dir.glob(".strongroom-restore-*"))
    assert_no_token(api, caplog, str(info.value))


def test_forbidden_scale_names_rbac_and_changes_nothing(
    backup: tuple[LocalRepository, Manifest, Print],
    cluster: K8sApiDouble,
    age_key: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    repo, _, _ = backup
    api = cluster
    api.forbidden.add(("patch", "statefulsets/scale"))
    pid = api.redis.proc.pid if api.redis.proc else None
    with pytest.raises(AccessDenied) as info:
        restore_redis(k8s_conn(api, tmp_path), repo, age_key, request())
    text = str(info.value)
    assert "RBAC refused verb 'patch' on statefulsets/scale" in text
    assert "rbac-redis-restart.yaml" in text and "cannot patch resource" in text
    assert api.scale_history == [] and api.redis.proc is not None and api.redis.proc.pid == pid
    old_data_intact(api)  # still serving, untouched
    assert_no_token(api, caplog, text)


def test_pods_not_back_in_time_rolls_back_to_previous_data(
    backup: tuple[LocalRepository, Manifest, Print],
    cluster: K8sApiDouble,
    age_key: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    repo, _, _ = backup
    api = cluster
    api.pending_starts = 1  # the first pod after the scale-down never starts
    with pytest.raises(ServiceUnavailable) as info:
        restore_redis(k8s_conn(api, tmp_path, k8s_timeout=3.0), repo, age_key, request())
    text = str(info.value)
    assert "scaled back to 1 replica(s) but only 0 became Ready within 3 s" in text
    assert "StatefulSet cache/redis scaled to 0 again" in text
    assert "previous data file put back" in text
    assert "server started again with its previous data" in text
    assert api.scale_history == [0, 1, 0, 1] and api.replicas == 1 and api.ready_count() == 1
    old_data_intact(api)
    assert (api.redis.dir / "dump.rdb.failed-restore").exists()
    assert_no_token(api, caplog, text)


def test_swap_failure_after_scale_down_scales_back_up(
    backup: tuple[LocalRepository, Manifest, Print],
    cluster: K8sApiDouble,
    age_key: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    repo, manifest, _ = backup
    api = cluster
    # where the previous file would be kept is taken by a folder: the rename fails once
    # the server is down
    blocker = api.redis.dir / f"dump.rdb.pre-restore-{manifest.backup_id}"
    blocker.mkdir()
    (blocker / "x").write_text("x")
    with pytest.raises(ToolFailed) as info:
        restore_redis(k8s_conn(api, tmp_path), repo, age_key, request())
    text = str(info.value)
    assert "failed after the server was stopped" in text
    assert "scaled back to 1 replica(s), all Ready" in text
    assert api.scale_history == [0, 1] and api.ready_count() == 1
    old_data_intact(api)
    assert not list(api.redis.dir.glob(".strongroom-restore-*"))
    assert isinstance(info.value, StrongroomError)
    assert_no_token(api, caplog, text)


def test_other_refusals_change_nothing(
    backup: tuple[LocalRepository, Manifest, Print],
    cluster: K8sApiDouble,
    age_key: Any,
    tmp_path: Path,
) -> None:
    repo, _, _ = backup
    api = cluster
    missing = str(tmp_path / "no-such-kubeconfig")
    with pytest.raises(InvalidInput, match="is not a file on this runner"):
        restore_redis(k8s_conn(api, tmp_path, k8s_kubeconfig=missing), repo, age_key, request())
    with pytest.raises(InvalidInput, match="k8s_context needs k8s_kubeconfig"):
        restore_redis(k8s_conn(api, tmp_path, k8s_kubeconfig=None), repo, age_key, request())
    with pytest.raises(InvalidInput, match="context 'nowhere' cannot be used"):
        restore_redis(k8s_conn(api, tmp_path, k8s_context="nowhere"), repo, age_key, request())
    assert api.scale_history == [] and not [r for r in api.requests if r[0] == "PATCH"]
    old_data_intact(api)
    with api.lock:  # someone scaled Redis away: there is nothing to restart
        api.replicas = 0
        api.generation += 1
    api.wait_settled()
    with pytest.raises(InvalidInput, match="is scaled to 0"):
        restore_redis(k8s_conn(api, tmp_path), repo, age_key, request())
    assert api.replicas == 0 and api.scale_history == []
