"""A warm starter for process work pools: flow runs forked from a ready interpreter.

``python -m strongroom.deploy.warm SOCKET`` imports Prefect's engine and strongroom's
flow modules once, then listens on the Unix socket ``SOCKET`` (mode 0600). Each
connection is one flow run asked for by strongroom.deploy.engine_start (the pool's
flow-run command): the starter receives the caller's stdin/stdout/stderr, environment
and working directory, forks, and the child runs ``prefect.engine`` with them (its
settings re-read from that environment), so a run skips the seconds of imports a fresh
process pays. The caller gets the child's PID (to forward signals) and, at the end, its
wait status. A caller that goes away has its run sent SIGTERM.

The starter stays single-threaded (fork is only safe so), never opens a Prefect client
itself, and stops on SIGTERM (its runs get SIGTERM too). What a run changes in its
process (modules imported later, settings) dies with it; the starter's imports are
those of the code it was started from: restart it after deploying new code.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import random
import runpy
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn

# Imported before the first fork: Prefect's engine and every flow module a
# deployment names (those whose engine is not installed are skipped).
PRELOAD = (
    "prefect.engine",
    "prefect.flow_engine",
    "prefect.task_engine",
    "prefect.deployments.steps",
    "prefect.concurrency.sync",
    "prefect.concurrency.asyncio",
    "prefect._internal.states",
    "flows.postgres",
    "flows.fleet",
    "flows.clickhouse",
    "flows.redis",
    "flows.pitr",
    "flows.retention",
    "flows.verify",
    "flows.deep_verify",
    "flows.drill",
    "flows.health",
    "flows.audit",
)


def _log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), "warm starter:", message, file=sys.stderr, flush=True)


def preload(modules: tuple[str, ...] = PRELOAD) -> list[str]:
    """Import ``modules`` and the Prefect collections (prefect-aws, -kubernetes, -slack:
    Prefect imports them all at a run's first block load)."""
    loaded = []
    for name in modules:
        try:
            importlib.import_module(name)
            loaded.append(name)
        except Exception as exc:  # an engine that is not installed here
            _log(f"not preloaded {name}: {type(exc).__name__}: {exc}")
    from prefect.plugins import load_prefect_collections

    loaded.extend(sorted(load_prefect_collections()))
    return loaded


def _run_child(fds: list[int], request: dict[str, Any], inherited: list[Any]) -> NoReturn:
    """In the forked child: become the caller's flow-run process; never returns."""
    code = 1
    try:
        for item in inherited:  # the listener, other callers' sockets, the selector
            item.close()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            if fd > 2:
                os.close(fd)
        random.seed()  # not the starter's random state (every run would share it)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()
        sys.modules.pop("prefect.engine", None)  # run a fresh __main__, as runpy expects
        sys.argv = ["prefect.engine", *request["argv"]]
        try:
            runpy.run_module("prefect.engine", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
        atexit._run_exitfuncs()  # Prefect drains its log and event workers here
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _read_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("caller went away")
        data += chunk
    return data


class WarmStarter:
    """The accept / fork / reap loop (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.runs: dict[int, socket.socket] = {}
        self.stopping = False
        self.selector = selectors.DefaultSelector()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        fds: list[int] = []
        try:
            conn.settimeout(10)
            header, fds, _flags, _addr = socket.recv_fds(conn, 4, 3)
            if len(fds) != 3 or len(header) != 4:
                raise ConnectionError("a request without its three descriptors")
            request = json.loads(_read_exact(conn, int.from_bytes(header, "big")))
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _run_child(fds, request, [self.listener, self.selector, *self.runs.values(), conn])
            conn.sendall(pid.to_bytes(8, "big"))
            flow_run = request["env"].get("PREFECT__FLOW_RUN_ID") or "-"
            _log(f"run {pid} started for flow run {flow_run}")
        except (OSError, ValueError, ConnectionError) as exc:
            _log(f"refused a request: {type(exc).__name__}: {exc}")
            with contextlib.suppress(OSError):
                conn.sendall((0).to_bytes(8, "big"))  # the caller starts the engine itself
            conn.close()
            return
        finally:
            for fd in fds:
                os.close(fd)
        conn.setblocking(False)
        self.runs[pid] = conn
        self.selector.register(conn, selectors.EVENT_READ, pid)

    def _caller_gone(self, pid: int, conn: socket.socket) -> None:
        try:
            if conn.recv(1):
                return  # callers send nothing more; ignore
        except BlockingIOError:
            return
        except OSError:
            pass
        self.selector.unregister(conn)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)

    def _reap(self) -> None:
        while self.runs:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.runs.pop(pid, None)
            if conn is None:
                continue
            _log(f"run {pid} ended (exit {os.waitstatus_to_exitcode(status)})")
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(conn)
            with contextlib.suppress(OSError):
                conn.setblocking(True)
                conn.sendall(status.to_bytes(4, "big", signed=True))
            conn.close()

    def serve(self) -> int:
        self.path.unlink(missing_ok=True)
        old_mask = os.umask(0o177)
        try:
            self.listener.bind(str(self.path))
        finally:
            os.umask(old_mask)
        self.listener.listen(64)
        self.selector.register(self.listener, selectors.EVENT_READ, None)
        _log(f"ready on {self.path} ({threading.active_count()} thread)")
        try:
            while not self.stopping:
                for key, _ in self.selector.select(timeout=0.05):
                    if key.data is None:
                        self._accept()
                    else:
                        self._caller_gone(key.data, key.fileobj)  # type: ignore[arg-type]
                self._reap()
        finally:
            for pid in list(self.runs):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            self.listener.close()
            self.path.unlink(missing_ok=True)
        return 0


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m strongroom.deploy.warm SOCKET", file=sys.stderr)
        return 2
    starter = WarmStarter(Path(argv[0]))

    def stop(*_: object) -> None:
        starter.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    loaded = preload()
    _log(f"preloaded {len(loaded)} modules")
    return starter.serve()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
