"""Ports that something already listens on, for the tests of busy-port errors (issue 16, defect 10)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def listening(port: int = 0) -> Iterator[int]:
    """A port something already listens on (``port`` 0: any free one)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        yield holder.getsockname()[1]


def free_pair() -> int:
    """A port P with P and P + 1 both free now."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        try:
            with listening(p), listening(p + 1):
                return p
        except OSError:
            continue
    raise AssertionError("no two adjacent free ports")
