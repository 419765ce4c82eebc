"""backends/split.py: one request cut into row ranges that run concurrently, merged in order, within one deadline."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.support.fakes import model_version, rows_of
from tierserve import errors
from tierserve.backends.split import binary_outputs, max_batch_bounds, run_parts
from tierserve.protocol.messages import InferRequest, InferResponse, RequestedOutput
from tierserve.protocol.tensors import tensor_from_numpy

MODEL = model_version("m", max_batch_size=4)


def _request(rows: int, outputs: list[RequestedOutput] | None = None) -> InferRequest:
    return InferRequest(inputs=[tensor_from_numpy("x", rows_of(rows))], id="req-1", outputs=list(outputs or []))


def _double(part: InferRequest) -> InferResponse:
    """A model that answers y = 2x for the part it is given (its rows, in its order)."""
    x = part.inputs[0].data
    return InferResponse("m", "1", [tensor_from_numpy("y", x * 2)], id=part.id)


@pytest.fixture
def pool():
    with ThreadPoolExecutor(max_workers=4) as executor:
        yield executor


@pytest.mark.parametrize(("rows", "limit", "batched", "bounds"), [
    (10, 4, True, [(0, 4), (4, 8), (8, 10)]),
    (8, 4, True, [(0, 4), (4, 8)]),
    (4, 4, True, [(0, 4)]),            # fits: the whole request
    (10, 0, True, [(0, 10)]),          # the model does not batch: Triton takes it as it is
    (10, 4, False, [(0, 10)]),         # no batch axis to cut along
    (0, 4, True, [(0, 0)]),
], ids=["uneven", "even", "fits", "no-batching", "no-batch-axis", "empty"])
def test_bounds_by_max_batch_size(rows: int, limit: int, batched: bool, bounds: list[tuple[int, int]]) -> None:
    assert max_batch_bounds(rows, limit, batched) == bounds


def test_parts_run_concurrently_and_merge_in_request_order(pool: ThreadPoolExecutor) -> None:
    # Given a 10-row request cut in 3 parts, whose first part answers last
    request = _request(10)
    started: list[int] = []
    all_started = threading.Event()

    def slow_first(part: InferRequest) -> InferResponse:
        started.append(part.rows)
        if len(started) == 3:
            all_started.set()
        if part.rows == 4 and float(part.inputs[0].data[0, 0]) == float(request.inputs[0].data[0, 0]):
            assert all_started.wait(5), "the parts did not run concurrently"
        return _double(part)

    # When they run
    merged = run_parts(request, max_batch_bounds(10, 4), slow_first, pool=pool, deadline=time.monotonic() + 5,
                       timeout_message="late")
    # Then every row comes back, in the request's order, under the request's id
    np.testing.assert_array_equal(merged.outputs[0].data, request.inputs[0].data * 2)
    assert merged.outputs[0].shape == (10, 4) and merged.id == "req-1"
    assert sorted(started) == [2, 4, 4]


def test_a_whole_request_is_sent_as_it_is(pool: ThreadPoolExecutor) -> None:
    # Given a request that fits in one part
    request = _request(3, [RequestedOutput("y")])
    seen: list[InferRequest] = []

    def call(part: InferRequest) -> InferResponse:
        seen.append(part)
        return _double(part)

    # When it runs, Then the request itself is sent (no slice, no concatenation)
    run_parts(request, [(0, 3)], call, pool=pool, deadline=time.monotonic() + 5, timeout_message="late")
    assert seen == [request] and seen[0] is request


def test_parts_ask_for_binary_outputs_and_the_request_keeps_what_the_client_asked(pool: ThreadPoolExecutor) -> None:
    # Given a request asking for output y as JSON, run in one part and then in three, with binary outputs
    for bounds in ([(0, 10)], max_batch_bounds(10, 4)):
        request = _request(10, [RequestedOutput("y", binary_data=False)])
        asked: list[list[RequestedOutput]] = []

        def call(part: InferRequest, asked: list = asked) -> InferResponse:
            asked.append(part.outputs)
            return _double(part)

        run_parts(request, bounds, call, pool=pool, deadline=time.monotonic() + 5, timeout_message="late",
                  outputs=binary_outputs(request, MODEL))
        # Then every part asked for binary outputs, and the client's request still says JSON
        assert asked and all(o == [RequestedOutput("y", binary_data=True)] for o in asked)
        assert request.outputs == [RequestedOutput("y", binary_data=False)]


def test_binary_outputs_name_every_output_when_the_request_names_none() -> None:
    assert binary_outputs(_request(2), MODEL) == [RequestedOutput("y", binary_data=True)]
    named = _request(2, [RequestedOutput("y", parameters={"classification": 2})])
    assert binary_outputs(named, MODEL) == [RequestedOutput("y", True, {"classification": 2})]


def test_the_first_failure_is_raised(pool: ThreadPoolExecutor) -> None:
    # Given parts of which the second fails
    def call(part: InferRequest) -> InferResponse:
        if float(part.inputs[0].data[0, 0]) == float(request.inputs[0].data[4, 0]):
            raise errors.InvalidRequestError("part 2 refused")
        return _double(part)

    request = _request(10)
    # When they run, Then the request fails with that part's error
    with pytest.raises(errors.InvalidRequestError, match="part 2 refused"):
        run_parts(request, max_batch_bounds(10, 4), call, pool=pool, deadline=time.monotonic() + 5,
                  timeout_message="late")


def test_waiting_past_the_deadline_is_a_timeout_and_parts_not_started_never_run() -> None:
    # Given one worker, and a first part that hangs past the request's 0.2 s deadline
    release = threading.Event()
    ran: list[int] = []

    def call(part: InferRequest) -> InferResponse:
        ran.append(part.rows)
        release.wait(5)
        return _double(part)

    with ThreadPoolExecutor(max_workers=1) as one:
        t0 = time.monotonic()
        # When the request runs, Then it is a BackendTimeoutError soon after its deadline (plus the grace)
        with pytest.raises(errors.BackendTimeoutError, match="did not answer 3 parts"):
            run_parts(_request(10), max_batch_bounds(10, 4), call, pool=one, deadline=t0 + 0.2, grace_s=0.05,
                      timeout_message="did not answer 3 parts")
        waited = time.monotonic() - t0
        release.set()
    assert 0.2 <= waited < 1.0
    # And the parts still queued were cancelled: only the first one ever ran
    assert ran == [4]
