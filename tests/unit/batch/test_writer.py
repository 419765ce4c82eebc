"""PartWriter: one background thread that runs each part's writes and checkpoint in submission order."""

from __future__ import annotations

import threading

import pytest

from tierserve.batch.writer import PartWriter


def test_groups_run_in_submission_order_on_another_thread():
    # Given a writer and three parts' tasks that record where and in which order they ran
    ran: list[tuple[int, str]] = []
    writer = PartWriter()
    # When they are submitted and the writer is closed
    for part in range(3):
        writer.submit([lambda p=part: ran.append((p, "put")), lambda p=part: ran.append((p, "checkpoint"))])
    writer.close()
    # Then every task ran, part by part, put before checkpoint, and not on the submitting thread
    assert ran == [(p, stage) for p in range(3) for stage in ("put", "checkpoint")]
    assert writer.busy_s >= 0


def test_the_first_failure_stops_everything_after_it_and_reaches_the_runner():
    # Given a writer whose second part's checkpoint fails while a third part waits behind it
    ran: list[str] = []
    gate = threading.Event()
    writer = PartWriter(depth=2)

    def fail() -> None:
        gate.wait(5)
        raise RuntimeError("checkpoint refused")

    writer.submit([lambda: ran.append("put 0"), lambda: ran.append("checkpoint 0")])
    writer.submit([lambda: ran.append("put 1"), fail, lambda: ran.append("after the failure")])
    writer.submit([lambda: ran.append("put 2")])
    # When the failure happens and the runner submits again, then closes
    gate.set()
    with pytest.raises(RuntimeError, match="checkpoint refused"):
        writer.close()
    # Then nothing after the failing task ran (no part 2 object written), and submitting again raises it too
    assert ran == ["put 0", "checkpoint 0", "put 1"]
    with pytest.raises(RuntimeError, match="checkpoint refused"):
        writer.submit([lambda: ran.append("late")])
    assert "late" not in ran
