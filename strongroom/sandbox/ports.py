"""Free TCP ports on 127.0.0.1."""

from __future__ import annotations

import socket
import threading

_lock = threading.Lock()
_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that is free right now.

    The port is found by binding to port 0 and closing the socket again, so another process
    can still grab it before the server binds it: servers in these fixtures retry with a new
    port when their log says "Address already in use". Ports already returned by this process
    are never returned twice, so servers started in one session cannot collide with each other.
    """
    with _lock:
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((host, 0))
                port: int = sock.getsockname()[1]
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise RuntimeError(f"could not find a free TCP port on {host}")
