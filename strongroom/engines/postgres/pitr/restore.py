"""Point-in-time recovery into an empty data directory.

1. ``plan_pitr`` picks the base backup and timeline and refuses a target outside
   the recoverable window.
2. A file-level backup's files are written by ``files.restore.write_files`` (its chain
   checked whole before anything is written, every path checked, every file's digests
   checked as it streams); otherwise the base backup's tar streams from the
   repository (every check applied, last bytes held back until they pass)
   into the hostile-input extractor (``pg_pitr_extract``), inside a private
   ``mkdtemp`` folder; ``pg_verifybackup`` then checks the files against
   PostgreSQL's own backup manifest. Files are moved into the data directory only
   when everything passed.
3. ``recovery.signal`` and the recovery settings go into ``postgresql.auto.conf``
   (read last, so they win): ``restore_command`` = ``strongroom-wal fetch``
   with a configuration file (and identity file, mode 0600) written next to the
   data directory, the recovery target, timeline and action, and
   ``archive_mode``/``archive_command`` overridden so the restored cluster never
   archives into the source's archive unless asked to (``archive_after``).
4. Optionally the server starts (socket and log in fresh ``mkdtemp`` folders),
   recovery is followed to its target, and a verification query runs, strongroom
   admitted by a temporary ``pg_hba.conf`` rule (``pg_pitr_hba``) removed afterwards.

Any failure before the server starts leaves the data directory empty again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from strongroom.artifacts import read_artifact
from strongroom.catalog import Catalog
from strongroom.config import EncryptionConfig, RepositoryConfig
from strongroom.engines.postgres import root_fs as fs
from strongroom.engines.postgres.backup import ENGINE, pg_tool
from strongroom.engines.postgres.pitr.basebackup import ARTIFACT
from strongroom.engines.postgres.pitr.extract import PipeExtractor, summary
from strongroom.engines.postgres.pitr.files import delta as files_delta
from strongroom.engines.postgres.pitr.files.chain import KIND as FILES_KIND
from strongroom.engines.postgres.pitr.files.restore import delta_files, load_checked, write_files
from strongroom.engines.postgres.pitr.hba import admit, withdraw
from strongroom.engines.postgres.pitr.plan import PitrRequest, Plan, plan_pitr
from strongroom.engines.postgres.pitr.server import RestoredServer, as_user, resolve_os_user
from strongroom.engines.postgres.wal.config import write_identity_file, write_wal_config
from strongroom.errors import (
    IntegrityError,
    InvalidInput,
    StrongroomError,
    TargetNotEmpty,
    ToolFailed,
)
from strongroom.pipeline import Progress
from strongroom.redact import register, scrub
from strongroom.repository.base import Repository

_PROBED: dict[str | None, str] = {}


def wal_command_candidates(os_user: str | None = None) -> list[str]:
    """Ways to run strongroom-wal, best first."""
    import pwd
    import sysconfig

    beside = Path(sys.executable).with_name("strongroom-wal")
    found = [shlex.quote(str(beside))] if beside.exists() else []
    on_path = shutil.which("strongroom-wal")
    if on_path and shlex.quote(on_path) not in found:
        found.append(shlex.quote(on_path))
    found.append(f"{shlex.quote(sys.executable)} -m strongroom.cli.wal")
    # the interpreter of a virtualenv under a private home (e.g. /root) is out of reach
    # of the postgres account: the system's same-version Python with our paths works
    system = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    if Path(system).exists():
        project = Path(__file__).resolve().parents[4]  # strongroom/engines/postgres/pitr/
        roots = [str(project), sysconfig.get_paths()["purelib"]]
        path = ":".join(dict.fromkeys(roots))
        # bytecode goes to the account's own cache: it cannot write next to our sources,
        # and recompiling every module on each call would cost more than the call
        try:
            home = pwd.getpwnam(os_user).pw_dir if os_user else str(Path.home())
        except KeyError:
            home = "/nonexistent"
        cache = f"{home}/.cache/strongroom/pycache"
        # -S: no site module (faster, and immune to .pth hooks of the system install);
        # -c rather than -m: runpy's imports cost as much again as ours
        # (shell assignments, not env(1): one exec less per call)
        found.append(
            f"PYTHONPATH={shlex.quote(path)} PYTHONDONTWRITEBYTECODE= "
            f"PYTHONPYCACHEPREFIX={shlex.quote(cache)} {system} -S -c "
            '"import sys; from strongroom.cli.wal import main; sys.exit(main())"'
        )
    return found


def default_wal_command(os_user: str | None = None) -> str:
    """The first strongroom-wal invocation that works for ``os_user`` (the account
    PostgreSQL runs as, which calls archive_command / restore_command)."""
    if os_user in _PROBED:
        return _PROBED[os_user]
    candidates = wal_command_candidates(os_user)
    for command in candidates:
        argv = [*as_user(os_user), "sh", "-c", f"cd / && {command} --help >/dev/null 2>&1"]
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            if subprocess.run(argv, timeout=60, check=False).returncode == 0:
                _PROBED[os_user] = command
                return command
    return candidates[0]


def restore_command(command: str, config: str, *, prefetch: bool = True) -> str:
    """``restore_command`` for a restored cluster. With prefetch, a file the fetcher has
    already verified into the cache is moved into place by the shell itself (one
    rename, no interpreter start per 16 MiB of replay); anything else, including a
    failed move, runs ``strongroom-wal fetch``, which decides found / not found / fatal.
    Only verified files are ever renamed into the cache, so the shortcut hands over
    nothing the full command would not."""
    full = f"{command} fetch --config {shlex.quote(config)} %f %p"
    if not prefetch:
        return full
    spool = "pg_wal/strongroom/fetch"  # the default spool; restore_command runs in PGDATA
    return f"mv -f {spool}/cache/%f %p 2>/dev/null && {{ echo %f >{spool}/took; exit 0; }}; {full}"


def _conf_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _check_empty(data_dir: Path) -> None:
    if data_dir.exists():
        if not data_dir.is_dir():
            raise InvalidInput(f"{data_dir} exists and is not a directory")
        entries = sorted(p.name for p in data_dir.iterdir())
        if entries:
            raise TargetNotEmpty(
                f"data directory {data_dir} is not empty ({', '.join(entries[:5])}"
                f"{', ...' if len(entries) > 5 else ''}); PITR restores only into an empty one "
                "(from a files backup, delta refreshes a stale copy of the same cluster)"
            )


def _wipe(data_dir: Path) -> None:
    if not data_dir.exists():
        return
    for entry in data_dir.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()


def extract_base(
    repo: Repository,
    enc: EncryptionConfig,
    backup_id: str,
    target: str,
    root_fd: int,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Stream the base backup's tar into the folder ``root_fd`` through the hostile-input
    extractor (``pg_pitr_extract``): a refused member stops the stream with an
    IntegrityError naming it."""
    manifest = Catalog(repo).resolve(backup_id, ENGINE, target)
    artifact = manifest.artifact(ARTIFACT)
    sink = PipeExtractor(root_fd, None)
    started = time.monotonic()
    try:
        stats = read_artifact(repo, artifact, sink, encryption=enc, progress=progress)
        counts = sink.finish()
    finally:
        sink.close()
    return {
        "raw_size": stats.raw_size,
        "seconds": round(time.monotonic() - started, 3),
        **summary(counts),
    }


def verify_extracted(data_dir: Path) -> dict[str, Any]:
    """``pg_verifybackup`` against the backup_manifest PostgreSQL put in the tar."""
    try:
        tool = pg_tool("pg_verifybackup")
    except ToolFailed:
        return {"pg_verifybackup": "not installed"}
    result = subprocess.run(
        [tool, "--no-parse-wal", "--quiet", str(data_dir)],
        capture_output=True,
        text=True,
        check=False,
        timeout=3600,
    )
    if result.returncode != 0:
        raise IntegrityError(
            f"pg_verifybackup rejected the restored files: {scrub(result.stderr.strip())[-800:]}"
        )
    return {"pg_verifybackup": "ok"}


def write_recovery(
    req: PitrRequest,
    plan: Plan,
    data_dir: Path,
    repo_config: RepositoryConfig,
    enc: EncryptionConfig,
    os_user: str | None,
    root_fd: int,
) -> dict[str, str]:
    """WAL config + identity file next to the data dir; recovery.signal and auto.conf
    inside the (still private) extraction folder ``root_fd``."""
    base = (
        Path(req.config_path)
        if req.config_path
        else data_dir.parent / (f"{data_dir.name}.strongroom-wal.toml")
    )
    key_file = base.with_suffix(".key")
    identities = [i.get_secret_value() for i in enc.identities]
    write_identity_file(key_file, identities, owner=os_user)
    common = {
        "repository": repo_config,
        "recipients": list(enc.recipients),
        "system_identifier": int(plan.backup["system_identifier"]),
        "owner": os_user,
    }
    write_wal_config(
        base,
        target=req.target,
        identity_file=str(key_file),
        fetch={"prefetch": req.prefetch},
        **common,  # type: ignore[arg-type]
    )
    command = req.wal_command or default_wal_command(os_user)
    settings = {
        "restore_command": restore_command(command, str(base), prefetch=req.prefetch > 0),
        **plan.recovery_settings,
    }
    push_config = None
    if req.archive_after:
        push_config = base.with_name(f"{base.stem}.push.toml")
        write_wal_config(push_config, target=req.archive_after, **common)  # type: ignore[arg-type]
        settings["archive_mode"] = "on"
        settings["archive_command"] = f"{command} push --config {shlex.quote(str(push_config))} %p"
    else:
        settings["archive_mode"] = "off"
        settings["archive_command"] = ""
    stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    lines = [f"# strongroom PITR restore of backup {plan.backup['backup_id']} at {stamp}"]
    lines += [f"{key} = {_conf_quote(value)}" for key, value in settings.items()]
    auto = os.open(
        "postgresql.auto.conf",
        os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
        dir_fd=root_fd,
    )
    with os.fdopen(auto, "a") as conf:
        conf.write("\n" + "\n".join(lines) + "\n")
    os.close(fs.new_file(root_fd, "recovery.signal"))
    with contextlib.suppress(FileNotFoundError):
        os.unlink("backup_manifest", dir_fd=root_fd)
    written = {"wal_config": str(base), "identity_file": str(key_file)}
    if push_config is not None:
        written["push_config"] = str(push_config)
    return {**written, **{f"setting.{k}": v for k, v in settings.items()}}


def pitr_restore(
    repo: Repository,
    repo_config: RepositoryConfig,
    enc: EncryptionConfig,
    req: PitrRequest,
    *,
    progress: Progress | None = None,
    password: str | None = None,
) -> dict[str, Any]:
    """Run a point-in-time recovery; returns a report (the plan only with ``dry_run``)."""
    register(*repo_config.secrets(), *enc.secrets(), password)
    started = time.monotonic()
    plan = plan_pitr(repo, req)
    data_dir = Path(req.data_dir).absolute()
    is_files = plan.backup.get("kind") == FILES_KIND
    if req.delta and not is_files:
        raise InvalidInput(
            f"backup {plan.backup['backup_id']} is a {plan.backup.get('kind')} backup: "
            "delta restore needs a files backup (strongroom backup postgresql-files)"
        )
    delta_mode = req.delta and data_dir.is_dir() and any(data_dir.iterdir())
    if is_files:  # a chain not whole is refused here, up front
        manifest = load_checked(repo, req.target, plan.backup["backup_id"])
        if delta_mode:
            files_delta.check_target(data_dir, manifest)
    if not delta_mode:
        _check_empty(data_dir)
    os_user = resolve_os_user(data_dir, req.os_user)
    report: dict[str, Any] = {
        "target": req.target,
        "data_dir": str(data_dir),
        "recovery_target": req.recovery_target,
        "plan": plan.model_dump(mode="json"),
        "dry_run": req.dry_run,
    }
    if req.dry_run:
        return report
    if not enc.identities:
        raise InvalidInput("PITR restore needs the decryption identity (EncryptionKey.identity)")
    created = not data_dir.exists()
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    owner = fs.owner_of(os_user)
    data_fd = fs.open_dir(data_dir)
    try:
        os.fchmod(data_fd, 0o700)
        if delta_mode:
            _delta_files(
                req, plan, data_dir, data_fd, repo, repo_config, enc, os_user, progress, report
            )
        else:
            _restore_files(
                req,
                plan,
                data_dir,
                data_fd,
                created,
                repo,
                repo_config,
                enc,
                os_user,
                progress,
                report,
            )
        report["os_user"] = os_user
        if req.start:
            if req.prefetch:
                _start_fetcher(req, data_dir, os_user, report["files"]["wal_config"])
            report["recovery"] = _start_and_wait(req, data_dir, data_fd, os_user, owner, password)
            if req.action == "promote":
                # recovery is over: the decryption key has no business on this host any more
                Path(report["files"]["identity_file"]).unlink(missing_ok=True)
                report["files"]["identity_file_removed"] = "yes"
    finally:
        os.close(data_fd)
    report["seconds"] = round(time.monotonic() - started, 3)
    return report


def _restore_files(
    req: PitrRequest,
    plan: Plan,
    data_dir: Path,
    data_fd: int,
    created: bool,
    repo: Repository,
    repo_config: RepositoryConfig,
    enc: EncryptionConfig,
    os_user: str | None,
    progress: Progress | None,
    report: dict[str, Any],
) -> None:
    """Extract, check and prepare the data directory's files in a private folder made
    with ``mkdtemp`` inside the (empty) data directory, then move them up: a refused or
    failed restore leaves the data directory as empty as it was."""
    staging = tempfile.mkdtemp(prefix=".strongroom-extract-", dir=data_dir)
    stage_name = os.path.basename(staging)
    stage_fd = fs.open_dir(stage_name, data_fd)
    moved = False
    try:
        if plan.backup.get("kind") == FILES_KIND:
            manifest = load_checked(repo, req.target, plan.backup["backup_id"])
            report["extract"] = write_files(
                repo, enc, manifest, stage_fd, None, progress, jobs=req.jobs
            )
            report["verify_files"] = {"sha256": "every file checked as it was written"}
        else:
            report["extract"] = extract_base(
                repo, enc, plan.backup["backup_id"], req.target, stage_fd, progress
            )
            report["verify_files"] = verify_extracted(Path(staging))
        report["files"] = write_recovery(req, plan, data_dir, repo_config, enc, os_user, stage_fd)
        if req.start and req.prefetch:
            _prepare_fetcher(plan, stage_fd)
        fs.chown_tree(stage_fd, fs.owner_of(os_user))
        owner = fs.owner_of(os_user)
        if owner is not None:
            os.fchown(data_fd, *owner)
        moved = True
        for entry in os.listdir(stage_fd):
            os.rename(entry, entry, src_dir_fd=stage_fd, dst_dir_fd=data_fd)
        os.rmdir(stage_name, dir_fd=data_fd)
    except BaseException:
        os.close(stage_fd)
        stage_fd = -1
        shutil.rmtree(staging, ignore_errors=True)
        if moved:
            _wipe(data_dir)
        if created:
            with contextlib.suppress(OSError):
                data_dir.rmdir()
        raise
    finally:
        if stage_fd >= 0:
            os.close(stage_fd)


def _delta_files(
    req: PitrRequest,
    plan: Plan,
    data_dir: Path,
    data_fd: int,
    repo: Repository,
    repo_config: RepositoryConfig,
    enc: EncryptionConfig,
    os_user: str | None,
    progress: Progress | None,
    report: dict[str, Any],
) -> None:
    """Bring the stale copy in ``data_dir`` to the backup (``files.delta``), then write
    the recovery settings into it. A failure leaves it without ``global/pg_control``
    (PostgreSQL refuses to start it); the same restore run again finishes it."""
    manifest = load_checked(repo, req.target, plan.backup["backup_id"])
    report["extract"] = delta_files(repo, enc, manifest, data_dir, os_user, progress, req.jobs)
    report["verify_files"] = {"sha256": "every fetched file and block checked as written"}
    report["files"] = write_recovery(req, plan, data_dir, repo_config, enc, os_user, data_fd)
    if req.start and req.prefetch:
        _prepare_fetcher(plan, data_fd)
    fs.chown_tree(data_fd, fs.owner_of(os_user))
    files_delta.finish(data_dir)


def _prepare_fetcher(plan: Plan, root_fd: int) -> None:
    """The fetcher's spool, aimed at the backup's first WAL segment, made while the
    folder is still strongroom's own (nothing there can be a planted link)."""
    from strongroom.engines.postgres.wal.names import parse_lsn, segment_of_lsn

    first = segment_of_lsn(
        int(plan.backup["timeline"]),
        parse_lsn(plan.backup["start_lsn"]),
        int(plan.backup["wal_segment_size"]),
    )
    fd = root_fd
    opened: list[int] = []
    try:
        for name in ("pg_wal", "strongroom", "fetch"):
            fd = fs.ensure_dir(fd, name)
            opened.append(fd)
        fs.write_new(fd, "want", first.encode())
    finally:
        for each in opened:
            os.close(each)


def _start_fetcher(req: PitrRequest, data_dir: Path, os_user: str | None, config: str) -> None:
    """Start strongroom-wal's fetcher before the server: the first restore_command calls
    then find their files already verified in the cache instead of waiting for a
    process to start. It runs as the cluster's OS user and writes only below pg_wal."""
    spool = data_dir / "pg_wal" / "strongroom" / "fetch"
    command = req.wal_command or default_wal_command(os_user)
    line = (
        f"{command} fetch-worker --config {shlex.quote(config)} "
        f"--pg-wal {shlex.quote(str(data_dir / 'pg_wal'))} "
        f">>{shlex.quote(str(spool / 'fetcher.log'))} 2>&1 &"
    )
    # the shell backgrounds the fetcher and returns; the fetcher exits on its own once
    # replay stops asking for files
    subprocess.run(
        [*as_user(os_user), "sh", "-c", line],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        cwd="/",
        timeout=60,
        check=False,
    )


def _private_dir(prefix: str, parent: str | None, owner: fs.Owner) -> Path:
    """A fresh ``mkdtemp`` folder (0700) handed to ``owner`` by its descriptor: never an
    existing folder, so no parameter can make strongroom chown someone else's."""
    path = tempfile.mkdtemp(prefix=prefix, dir=parent)
    fd = fs.open_dir(path)
    try:
        os.fchmod(fd, 0o700)
        if owner is not None:
            os.fchown(fd, *owner)
    finally:
        os.close(fd)
    return Path(path)


def _start_and_wait(
    req: PitrRequest,
    data_dir: Path,
    data_fd: int,
    os_user: str | None,
    owner: fs.Owner,
    password: str | None,
) -> dict[str, Any]:
    assert req.port is not None
    socket_dir = _private_dir("strongroom-pitr-sock-", req.socket_dir, owner)
    log_dir = _private_dir(f"{data_dir.name}.pitr-log-", str(data_dir.parent), owner)
    log_fd = os.open(log_dir, fs.DIR_FLAGS)
    try:
        os.close(fs.new_file(log_fd, "server.log", owner=owner))
    finally:
        os.close(log_fd)
    server = RestoredServer(
        data_dir=data_dir,
        port=req.port,
        socket_dir=socket_dir,
        log_path=log_dir / "server.log",
        os_user=os_user,
        db_user=req.db_user,
        password=password,
    )
    # strongroom's own way in, whatever pg_hba.conf requires (see pg_pitr_hba)
    rule = admit(data_fd, req.db_user, owner)
    try:
        result = _run_recovery(req, server, socket_dir)
    finally:
        withdraw(data_fd, rule, owner)
        if server.running():
            server.reload()
    result["hba_rule_removed"] = True
    return result


def _run_recovery(req: PitrRequest, server: RestoredServer, socket_dir: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    server.start(timeout_s=120)
    try:
        state = server.wait_recovery(req.action, req.wait_timeout_s)
    except StrongroomError:
        server.stop("immediate")
        raise
    result: dict[str, Any] = {
        **state,
        "seconds": round(time.monotonic() - t0, 3),
        "port": req.port,
        "socket_dir": str(socket_dir),
        "log": str(server.log_path),
        "stopped_at": server.log_lines("recovery stopping")[-1:],
    }
    if req.action == "shutdown":
        return result
    result["replay_lsn"] = server.psql(
        "SELECT coalesce(pg_last_wal_replay_lsn(), pg_current_wal_lsn())::text"
        if req.action == "pause"
        else "SELECT pg_current_wal_lsn()::text"
    )
    result["timeline"] = (
        int(server.psql("SELECT timeline_id FROM pg_control_checkpoint()"))
        if req.action == "pause"
        else int(server.psql("SELECT pg_walfile_name(pg_current_wal_lsn())")[:8], 16)
    )
    if req.verify_query:
        output = server.psql(req.verify_query, database=req.verify_database)
        result["verify"] = {"query": req.verify_query, "output": output}
        if req.verify_expect is not None and output.strip() != req.verify_expect.strip():
            raise IntegrityError(
                f"verification query returned {output.strip()[:200]!r}, "
                f"expected {req.verify_expect.strip()[:200]!r}"
            )
        result["verify"]["ok"] = True
    return result
