"""A port that is already taken, said with the flag that moves it (issue 16, defect 10).

Why: ``[Errno 98] Address already in use`` names neither the port nor the option to change, and a command that
binds several ports (``tierserve serve``: the API, the Invoke API; ``tierserve-edge``: HTTP and gRPC) leaves the
user guessing which. Every command that binds a port says it the same way, from here. No AWS function imports it.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterator, Sequence

from tierserve.errors import ConfigurationError


class PortInUseError(ConfigurationError):
    """A port a command was asked to listen on is taken by another process."""

    code = "port_in_use"


def in_use(host: str, port: int, flag: str, what: str, note: str = "") -> PortInUseError:
    """The error for ``port`` (bound by ``flag``, serving ``what``) being taken on ``host``."""
    extra = f" ({note})" if note else ""
    return PortInUseError(f"port {port} on {host} is already in use, so {what} cannot listen there{extra}: "
                          f"choose another with {flag} PORT (0: any free port), or stop what holds it")


def is_busy(host: str, port: int) -> bool:
    """Whether a listening socket cannot bind ``host:port`` now (as the servers bind: SO_REUSEADDR)."""
    if port <= 0:
        return False
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def check_free(host: str, ports: Sequence[tuple[int, str, str]]) -> None:
    """Raise :class:`PortInUseError` for the first of ``(port, flag, what)`` that is taken (0 and -1 skipped)."""
    for port, flag, what in ports:
        if is_busy(host, port):
            raise in_use(host, port, flag, what)


@contextlib.contextmanager
def naming(host: str, port: int, flag: str, what: str, note: str = "") -> Iterator[None]:
    """Turn an ``EADDRINUSE`` raised while binding ``port`` into a :class:`PortInUseError` that names it."""
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        raise in_use(host, port, flag, what, note) from exc
