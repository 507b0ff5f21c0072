"""The API's listening socket, shared by ``serve`` (which listens on it) and the demo (which asks whether
``serve`` could)."""

from __future__ import annotations

import socket


def bound_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (port 0: a free one) as ``serve`` binds it: with SO_REUSEADDR, so a port
    left in TIME_WAIT by a stopped API is taken again. Raises :class:`OSError` when the address is in use."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock
