"""The server's listening socket, bound before the model loads: a taken port is said in one line at once,
not after seconds of loading as a uvicorn traceback, and nothing can take the port while the model loads."""

from __future__ import annotations

import errno
import socket

from lmpack.errors import AddressInUseError

_BACKLOG = 2048  # uvicorn's default


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), ready to hand to uvicorn; AddressInUseError when it cannot be."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise AddressInUseError(
            f"cannot listen on {host}:{port}: {exc.strerror}",
            hint="give --host an address of this machine (127.0.0.1, 0.0.0.0, ::)",
        ) from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart right after a stop
    try:
        sock.bind(address)
        sock.listen(_BACKLOG)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise AddressInUseError(
                f"port {port} on {host} is already in use; the model was not loaded",
                hint=f"choose another --port, or stop what listens there (ss -ltnp 'sport = :{port}')",
            ) from None
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EACCES):
            raise AddressInUseError(
                f"cannot listen on {host}:{port}: {exc.strerror}",
                hint="use an address of this machine, and a port above 1023 unless running as root",
            ) from None
        raise
    sock.set_inheritable(True)
    return sock
