"""Part uploads and checkpoints on one background thread, in order, while the next chunk is computed.

Why: a part's S3 PUT and its DynamoDB checkpoint are network round trips (tens of milliseconds each) that
the runner used to wait through between chunks, idle. ``PartWriter`` runs them on one thread, in exactly
the order they were submitted: part N's objects, then part N's checkpoint, then part N+1's objects... so
what S3 and the JobTable hold at any moment is what the synchronous runner would have left at some point
of its run. The first failure (an S3 error, a lost checkpoint race, a crash simulated by a test hook)
stops the writer: nothing submitted after it runs, and the runner gets that exception the next time it
submits or closes. At most ``depth`` parts wait behind the one being written, so memory stays bounded by
a few encoded parts plus the chunk being computed.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

Task = Callable[[], None]


class PartWriter:
    """Runs groups of tasks (one group per part) on one thread, in submission order."""

    def __init__(self, depth: int = 1) -> None:
        self._queue: queue.Queue[list[Task] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._closed = False
        #: seconds spent running tasks (the runner's write time)
        self.busy_s = 0.0
        self._thread = threading.Thread(target=self._loop, name="tierserve-part-writer", daemon=True)
        self._thread.start()

    def submit(self, tasks: list[Task]) -> None:
        """Queue one part's tasks (blocks while ``depth`` parts are waiting); raise an earlier failure."""
        self.raise_failure()
        self._queue.put(tasks)

    def close(self) -> None:
        """Wait until every submitted task has run (or the first failure), then raise that failure."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()
        self.raise_failure()

    def raise_failure(self) -> None:
        if self._error is not None:
            raise self._error

    def _loop(self) -> None:
        while (tasks := self._queue.get()) is not None:
            if self._error is not None:
                continue  # after a failure nothing more runs: the queue is only drained
            t0 = time.perf_counter()
            try:
                for task in tasks:
                    task()
            except BaseException as exc:  # handed to the runner's thread, which raises it
                self._error = exc
            self.busy_s += time.perf_counter() - t0
