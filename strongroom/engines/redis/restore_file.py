"""Redis ``file`` restores: the RDB swapped in under a coordinated stop and start.

The server is stopped (its stop command, or its StatefulSet scaled to 0), the old data
file kept, the new one renamed into place and the server started again; a failure once
the server is down puts the old file back and starts it. This is the one restore path
that stops a server, so its preflight, commands and rollback live apart.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from strongroom.artifacts import read_artifact
from strongroom.catalog import Manifest
from strongroom.config import EncryptionConfig
from strongroom.engines.redis.aof import (
    AofLayout,
    aof_layout,
    drop_staged,
    previous_aof,
    stage_aof,
    swap_aof,
    unswap_aof,
)
from strongroom.engines.redis.conn import RedisConnection, config_value, is_refusal
from strongroom.engines.redis.key_copy import wait_down, wait_ready
from strongroom.engines.redis.restore_plan import RedisRestoreRequest
from strongroom.engines.redis.restore_stage import scratch_state, verify_target
from strongroom.engines.redis.scratch import ScratchRedis
from strongroom.errors import InvalidInput, StrongroomError, ToolFailed
from strongroom.pipeline import Progress
from strongroom.private_files import create_private, minimal_env, private_folder
from strongroom.redact import scrub
from strongroom.repository.base import Repository

if TYPE_CHECKING:  # kubernetes_asyncio costs ~1.2 s to import: only file restores on k8s
    from strongroom.engines.redis.k8s import StatefulSetRestart

COMMAND_TIMEOUT = 600.0


def file_coordination(conn: RedisConnection) -> StatefulSetRestart | None:
    """How the server is restarted: local commands (None) or its StatefulSet, inspected
    through the Kubernetes API (which proves the permissions) before anything changes."""
    commands = bool(conn.stop_command and conn.start_command)
    if not commands and not conn.k8s_statefulset:
        raise InvalidInput(
            f"file restores need stop_command and start_command on target {conn.name!r} "
            "(how to stop and start the server), or k8s_statefulset (the StatefulSet to scale "
            "down and up through the Kubernetes API). Nothing was changed"
        )
    if not conn.data_path:
        raise InvalidInput(
            f"file restores need data_path on target {conn.name!r}: the RDB file the server "
            "loads at start, as this runner sees it. Nothing was changed"
        )
    folder = Path(conn.data_path).parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise InvalidInput(
            f"data_path folder {folder} is not a writable folder on this runner. "
            "Nothing was changed"
        )
    if commands:
        return None
    from strongroom.engines.redis.k8s import K8sSettings, StatefulSetRestart

    restart = StatefulSetRestart(K8sSettings.from_connection(conn))
    restart.inspect()
    return restart


def kube_facts(restart: StatefulSetRestart) -> dict[str, Any]:
    """What the plan shows about the StatefulSet (read by ``inspect``)."""
    return {**restart.facts, **restart.report()}


def file_preflight(conn: RedisConnection, client: redis.Redis) -> dict[str, Any]:
    """The server must load this file at start: same dir/dbfilename when visible; with
    ``appendonly yes`` (Redis 7+) the AOF folder is rewritten around it (``aof``)."""
    facts: dict[str, Any] = {"data_path": conn.data_path, "aof": None}
    try:
        appendonly = config_value(client, "appendonly")
        folder = config_value(client, "dir")
        dbfile = config_value(client, "dbfilename")
    except redis.ResponseError as exc:
        if not is_refusal(exc):
            raise ToolFailed(f"CONFIG GET failed: {scrub(str(exc))}") from None
        facts["config_checked"] = False
        return facts
    facts["config_checked"] = True
    if folder and dbfile and conn.data_path:
        served = Path(folder) / dbfile
        mine = Path(conn.data_path)
        if Path(folder).exists():
            same = served.resolve() == mine.resolve()
        else:  # the runner mounts the volume elsewhere: only the file name can be compared
            same = served.name == mine.name
        if not same:
            raise InvalidInput(
                f"data_path {mine} is not the file the server loads ({served}). Nothing was changed"
            )
    if appendonly == "yes":
        version = str(client.info("server").get("redis_version", "0"))
        layout = aof_layout(client, Path(conn.data_path or ""), version)
        if not layout.folder.parent.is_dir():
            raise InvalidInput(f"the AOF folder {layout.folder} is not visible on this runner")
        facts["aof"] = layout.facts()
    return facts


def _run_command(conn: RedisConnection, command: str, what: str) -> None:
    env = minimal_env(
        {
            "STRONGROOM_REDIS_HOST": conn.host,
            "STRONGROOM_REDIS_PORT": str(conn.port),
            "STRONGROOM_REDIS_DATA_PATH": conn.data_path or "",
        }
    )
    if conn.password is not None:
        env["REDISCLI_AUTH"] = conn.password.get_secret_value()
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise InvalidInput(f"{what} command cannot be parsed: {exc}") from None
    try:
        done = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )
    except FileNotFoundError:
        raise ToolFailed(f"{what} command not found: {argv[0]!r}") from None
    except subprocess.TimeoutExpired:
        raise ToolFailed(f"{what} command did not finish in {COMMAND_TIMEOUT:.0f} s") from None
    if done.returncode != 0:
        tail = scrub((done.stderr or done.stdout).strip())[-500:]
        raise ToolFailed(f"{what} command exited with {done.returncode}: {tail}")


def run_file_restore(
    conn: RedisConnection,
    repo: Repository,
    manifest: Manifest,
    enc: EncryptionConfig,
    req: RedisRestoreRequest,
    plan: dict[str, Any],
    dbs: list[int],
    restart: StatefulSetRestart | None,
    progress: Progress | None,
) -> dict[str, Any]:
    data_path = Path(conn.data_path or "")
    folder = data_path.parent
    artifact = manifest.artifacts[0]
    private = private_folder(folder)
    temp = private / f"{manifest.backup_id}.rdb"
    previous = data_path.with_name(f"{data_path.name}.pre-restore-{manifest.backup_id}")
    expected = {db: int(plan["manifest_keys"][str(db)]) for db in dbs}
    stopped = False
    swapped = False
    had_previous = data_path.exists()
    aof = plan.get("aof")
    layout = AofLayout(Path(aof["aof_dir"]), aof["appendfilename"]) if aof else None
    aof_staged: Path | None = None
    aof_moved = False
    try:
        # 1. the new file next to the old one (same filesystem: the rename is atomic)
        with create_private(temp) as handle:
            read_artifact(repo, artifact, handle, encryption=enc, progress=progress)
            handle.flush()
            os.fsync(handle.fileno())
        # 2. proven loadable by a scratch server before the target is touched
        with ScratchRedis(databases=max(dbs, default=0) + 1, parent=req.scratch_dir) as scratch:
            scratch.rdb_path.symlink_to(temp)
            scratch.start(timeout=120.0 + artifact.raw_size / (20 * 1024 * 1024))
            loaded, samples = scratch_state(scratch, dbs, None, req.sample_size)
        if layout is not None:  # 2b. the AOF folder the server will load instead
            aof_staged = stage_aof(layout, temp, manifest.backup_id)
        # 3. stop, swap, start
        if restart is not None:
            try:
                restart.scale_down()  # returns once no pod of the StatefulSet is left
            finally:
                stopped = restart.changed
        else:
            _run_command(conn, conn.stop_command or "", "stop")
            wait_down(conn, 120.0)
            stopped = True
        if had_previous:
            os.replace(data_path, previous)
        os.replace(temp, data_path)
        swapped = True
        if layout is not None and aof_staged is not None:
            aof_moved = swap_aof(layout, aof_staged, manifest.backup_id)
            aof_staged = None
        private.rmdir()
        _fsync_dir(folder)
        _start(conn, restart)
        waited = wait_ready(conn, conn.load_timeout)
        stopped = False
    except BaseException as exc:
        with contextlib.suppress(OSError):
            temp.unlink()
        with contextlib.suppress(OSError):
            private.rmdir()
        if layout is not None and aof_staged is not None:
            drop_staged(layout, manifest.backup_id)
        if not stopped:
            raise
        undo_aof = None
        if layout is not None:
            aof_layout_ = layout

            def undo_aof() -> str:
                return unswap_aof(aof_layout_, manifest.backup_id, aof_moved)

        steps = _roll_back(conn, restart, data_path, previous, swapped, had_previous, undo_aof)
        if isinstance(exc, StrongroomError):
            exc.args = (f"{exc.args[0] if exc.args else exc}; {steps}",)
            raise
        if isinstance(exc, OSError):
            raise ToolFailed(
                f"file restore failed after the server was stopped: {scrub(str(exc))}; {steps}"
            ) from exc
        raise
    if had_previous and not req.keep_previous:
        previous.unlink()
    aof_previous: str | None = None
    if layout is not None and aof_moved:
        old = previous_aof(layout, manifest.backup_id)
        if req.keep_previous:
            aof_previous = str(old)
        else:
            shutil.rmtree(old, ignore_errors=True)
    checks = verify_target(conn, dbs, None, expected, loaded, samples)
    coordination: dict[str, Any] = {}
    if restart is not None:
        coordination["kubernetes"] = kube_facts(restart)
    return {
        **plan,
        **coordination,
        "previous_data_file": str(previous) if had_previous and req.keep_previous else None,
        "previous_aof_dir": aof_previous,
        "load_wait_s": round(waited, 3),
        **checks,
    }


def _start(conn: RedisConnection, restart: StatefulSetRestart | None) -> None:
    """Start command, or the StatefulSet back at its replica count with all pods Ready."""
    if restart is not None:
        restart.scale_up()
    else:
        _run_command(conn, conn.start_command or "", "start")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _roll_back(
    conn: RedisConnection,
    restart: StatefulSetRestart | None,
    data_path: Path,
    previous: Path,
    swapped: bool,
    had_previous: bool,
    undo_aof: Callable[[], str] | None = None,
) -> str:
    """The server was stopped and did not come back with the restored file: put the old one
    back and start it again. Returns what was done (and what state things are left in)."""
    steps: list[str] = []
    try:
        if swapped:
            if restart is not None:
                # pods may be up (or crash-looping) on the restored file: none may run while
                # the files move back
                restart.scale_down()
                steps.append(f"{restart.settings.label} scaled to 0 again")
            failed = data_path.with_name(f"{data_path.name}.failed-restore")
            os.replace(data_path, failed)
            steps.append(f"restored file moved to {failed}")
            if had_previous:
                os.replace(previous, data_path)
                steps.append("previous data file put back")
            if undo_aof is not None:
                steps.append(undo_aof())
        _start(conn, restart)
        if restart is not None:
            steps.append(
                f"{restart.settings.label} scaled back to {restart.original_replicas} "
                "replica(s), all Ready"
            )
        wait_ready(conn, conn.load_timeout)
        steps.append("server started again with its previous data")
    except (StrongroomError, OSError) as exc:
        steps.append(f"rollback incomplete: {scrub(str(exc))}")
        if restart is not None and restart.changed:
            steps.append(_last_resort_scale_up(restart))
    return "; ".join(steps)


def _last_resort_scale_up(restart: StatefulSetRestart) -> str:
    """The rollback failed while the StatefulSet was at 0: at least ask for the replicas back."""
    label, n = restart.settings.label, restart.original_replicas
    try:
        restart.scale_up()
    except StrongroomError as exc:
        if restart.changed:
            return f"{label} is left at 0 replicas ({exc}): scale it to {n} by hand"
        return f"{label} scaled back to {n} replica(s) but not Ready yet ({exc})"
    return f"{label} scaled back to {n} replica(s), all Ready (check which data file it loaded)"
