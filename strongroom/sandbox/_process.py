"""Shared helpers: spawn a server we own, wait for it, stop it by its PID, keep its log."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

# Set to 1 to keep the temporary directories (data and logs) after the session.
KEEP_DIRS_ENV = "STRONGROOM_KEEP_TEST_DIRS"
PORT_IN_USE = "Address already in use"
PORT_ATTEMPTS = 3


class ServerStartError(RuntimeError):
    """A server did not become ready. The message names its log files and quotes their tail."""

    def __init__(self, name: str, reason: str, logs: Sequence[Path]) -> None:
        self.name = name
        self.reason = reason
        self.logs = list(logs)
        self.port_conflict = any(PORT_IN_USE in read_text(p) for p in self.logs)
        parts = [f"{name} did not start: {reason}"]
        for log in self.logs:
            parts.append(f"--- log {log} (kept for inspection), last lines ---")
            parts.append(log_tail(log))
        super().__init__("\n".join(parts))


def read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def log_tail(path: Path, lines: int = 30) -> str:
    text = read_text(path)
    return "\n".join(text.splitlines()[-lines:]) if text else "(empty or missing)"


_DIR_PREFIX = "strongroom-"
_OWNER_FILE = ".owner"
_swept = False


def _process_identity(pid: int) -> str | None:
    """``pid`` plus its start time: stays unique even when PIDs are reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return f"{pid} {stat.rsplit(')', 1)[1].split()[19]}"


def _sweep_abandoned_dirs(min_age: float = 600.0) -> None:
    """Remove directories left by sessions that were killed before their teardown ran
    (their owner process is gone). Directories kept for failure logs have no owner file."""
    base = Path(tempfile.gettempdir())
    for path in base.glob(f"{_DIR_PREFIX}*"):
        owner_file = path / _OWNER_FILE
        try:
            owner = owner_file.read_text().strip()
            if time.time() - owner_file.stat().st_mtime < min_age:
                continue
            pid = int(owner.split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if pid > 0 and _process_identity(pid) != owner:
            shutil.rmtree(path, ignore_errors=True)


def make_temp_dir(service: str) -> Path:
    """A fresh directory under the system temp dir (never reused, so no leftover state)."""
    global _swept
    if not _swept:
        _swept = True
        _sweep_abandoned_dirs()
    path = Path(tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{service}-"))
    identity = _process_identity(os.getpid())
    if identity:
        (path / _OWNER_FILE).write_text(identity + "\n")
    return path


def remove_dir(path: Path) -> None:
    if os.environ.get(KEEP_DIRS_ENV, "") not in ("", "0"):
        return
    shutil.rmtree(path, ignore_errors=True)


def spawn(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    log_path: Path,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    death_signal: signal.Signals = signal.SIGTERM,
    user: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own session with stdout/stderr appended to ``log_path``.

    ``setpriv`` (util-linux) execs the command in place, so the returned PID is the server
    itself. It sets a parent-death signal: if pytest is killed (SIGKILL, pytest-timeout's
    thread method...) the server is signalled instead of being left running. With ``user``
    it also drops to that OS user (needs root).
    """
    argv = [os.fspath(c) for c in cmd]
    setpriv = shutil.which("setpriv")
    popen_user: dict[str, object] = {}
    if setpriv:
        prefix = [setpriv, f"--pdeathsig={death_signal.name.removeprefix('SIG')}"]
        if user is not None:
            prefix += [f"--reuid={user}", f"--regid={user}", "--clear-groups"]
        argv = [*prefix, "--", *argv]
    elif user is not None:
        popen_user = {"user": user, "group": user, "extra_groups": []}
    with open(log_path, "ab") as log:
        return subprocess.Popen(  # type: ignore[call-overload]
            argv,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **popen_user,
        )


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            # sl local_address rem_address st ... inode (st 0A = LISTEN)
            fields = line.split()
            if (
                len(fields) > 9
                and fields[3] == "0A"
                and int(fields[1].rsplit(":", 1)[1], 16) == port
            ):
                inodes.add(fields[9])
    return inodes


def listens_on(pid: int, ports: Sequence[int]) -> bool:
    """True when process ``pid`` itself holds a listening socket on every one of ``ports``.

    Guards against a port taken by someone else between free_port() and the bind: then a
    foreign server could answer our readiness probe while ours fails to start.
    """
    if not Path("/proc/self/fd").is_dir():
        return True  # no procfs: cannot tell, rely on the service probe
    owned: set[str] = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                owned.add(target[len("socket:[") : -1])
    except OSError:
        return False
    return all(_listening_inodes(port) & owned for port in ports)


def wait_until(
    name: str,
    ready: Callable[[], bool],
    proc: subprocess.Popen[bytes],
    logs: Sequence[Path],
    timeout: float,
    interval: float = 0.05,
) -> None:
    """Poll ``ready()`` until true; raise ServerStartError if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        code = proc.poll()
        if code is not None:
            raise ServerStartError(name, f"process {proc.pid} exited with code {code}", logs)
        try:
            if ready():
                return
        except Exception:  # any failure just means "not ready yet"
            pass
        if time.monotonic() > deadline:
            raise ServerStartError(name, f"not ready after {timeout:.0f} s", logs)
        time.sleep(interval)


def start_retrying_ports(
    name: str,
    launch: Callable[[], tuple[subprocess.Popen[bytes], Sequence[Path]]],
    ready: Callable[[], bool],
    stop: Callable[[], None],
    timeout: float,
) -> None:
    """Start a server whose ports are picked free just before ``launch`` (which picks
    them, writes the config and spawns, returning the process and its logs): a port
    taken in between by someone else makes the start fail; then ``stop`` it and launch
    again on fresh ports, up to PORT_ATTEMPTS times. Any other failure is raised."""
    for attempt in range(PORT_ATTEMPTS):
        proc, logs = launch()
        try:
            wait_until(name, ready, proc, logs, timeout=timeout)
            return
        except ServerStartError as exc:
            stop()
            if not exc.port_conflict or attempt == PORT_ATTEMPTS - 1:
                raise


def stop_process(
    proc: subprocess.Popen[bytes] | None,
    steps: Sequence[tuple[signal.Signals, float]] = ((signal.SIGTERM, 20.0),),
) -> None:
    """Stop a process we started, by its PID only, escalating to SIGKILL.

    ``proc`` is our own unreaped child, so its PID cannot have been reused by another process.
    """
    if proc is None:
        return
    for sig, timeout in [*steps, (signal.SIGKILL, 10.0)]:
        if proc.poll() is not None:
            return
        try:
            proc.send_signal(sig)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            pass
        return
