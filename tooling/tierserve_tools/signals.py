"""Foreground commands (`tierserve serve`, `tierserve triton`) stop cleanly on SIGINT and SIGTERM."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An Event set by SIGINT or SIGTERM while the block runs; the previous handlers come back after."""
    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        stop.set()

    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)
