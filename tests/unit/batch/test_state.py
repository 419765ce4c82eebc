"""tierserve.batch.state: checkpoints are conditional puts on in-process moto."""

from __future__ import annotations

import pytest

from tests.unit.batch.conftest import TABLE
from tierserve.batch.state import JobConflictError, JobState, JobStore


def test_checkpoints_refuse_a_runner_that_fell_behind(aws):
    # Given a job state at part 2
    store = JobStore(TABLE)
    state = JobState(job_key="k", next_part=0)
    store.save(state, None)
    state.next_part = 2
    store.save(state, 0)
    # When a stale runner (which started from part 0) checkpoints, or the job is created twice
    # Then both are refused as conflicts, and the stored state is intact
    with pytest.raises(JobConflictError):
        store.save(JobState(job_key="k", next_part=1), 0)
    with pytest.raises(JobConflictError):
        store.save(JobState(job_key="k"), None)
    assert store.load("k").next_part == 2
