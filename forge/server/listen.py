"""The server's listening socket, opened before the model loads (and before torch is imported), so that
a port in use fails in a fraction of a second instead of after the load."""

from __future__ import annotations

import errno
import socket

from forge.server.limits import ServerConfigError


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port, as uvicorn would open it; uvicorn then serves on it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart despite TIME_WAIT
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        hint = "; another process listens there: stop it or pick another --port" if e.errno == errno.EADDRINUSE else ""
        raise ServerConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None
    sock.listen(2048)  # uvicorn's default backlog
    return sock
