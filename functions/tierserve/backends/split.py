"""Splitting one request into row ranges that run concurrently, and merging their answers in order.

Why one helper: Triton and a SageMaker endpoint refuse a batch over the model's ``max_batch_size``,
and a Lambda Invoke refuses a payload over 6 MB, so three backends cut a request along its batch axis,
send the parts at once (Triton's dynamic batcher packs them again), wait for all of them within the
request's one deadline, and concatenate the outputs. They did it with three loops that differed in
their waiting and cancelling; this module is the one place that does it (each backend says only how
to cut, where its calls run, and how one part is sent).

Guarantees of :func:`run_parts`: every part's result, in order, by ``deadline`` (plus ``grace_s``, so
that the call's own timeout is the one that fires first); the first failure is raised and the parts
not yet started are cancelled; waiting past the deadline is a :class:`BackendTimeoutError` however
the transport behaves.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import replace
from typing import Any

from tierserve.errors import BackendTimeoutError
from tierserve.manifest import ModelVersion
from tierserve.protocol.messages import InferRequest, InferResponse, RequestedOutput

Bounds = list[tuple[int, int]]


def max_batch_bounds(rows: int, max_batch_size: int, batched: bool = True) -> Bounds:
    """Row ranges ``[start, stop)`` of at most ``max_batch_size`` rows each; one range (the whole request)
    when the model does not batch (``max_batch_size <= 0``), the request fits, or it has no batch axis."""
    if max_batch_size <= 0 or rows <= max_batch_size or not batched:
        return [(0, rows)]
    return [(start, min(start + max_batch_size, rows)) for start in range(0, rows, max_batch_size)]


def binary_outputs(request: InferRequest, model: ModelVersion) -> list[RequestedOutput]:
    """The outputs a part asks for: those the request names (every output of ``model`` when it names
    none), all as binary data: parts are decoded and merged, never shown to a client as they are."""
    if request.outputs:
        return [replace(o, binary_data=True) for o in request.outputs]
    return [RequestedOutput(o.name, binary_data=True) for o in model.outputs]


def await_all(futures: list[Future[Any]], deadline: float, timeout_message: str, grace_s: float = 0.05) -> list[Any]:
    """Every future's result, in order, by ``deadline`` (``time.monotonic``) plus ``grace_s``: the first
    failure is raised, the others are cancelled, and waiting past the deadline raises
    ``BackendTimeoutError(timeout_message)``."""
    from concurrent.futures import TimeoutError as FutureTimeout

    try:
        return [f.result(timeout=max(0.0, deadline - time.monotonic()) + grace_s) for f in futures]
    except FutureTimeout:
        raise BackendTimeoutError(timeout_message) from None
    finally:
        for f in futures:
            f.cancel()


def run_parts(request: InferRequest, bounds: Bounds, call: Callable[[InferRequest], InferResponse], *,
              pool: Executor, deadline: float, timeout_message: str, grace_s: float = 0.05,
              outputs: list[RequestedOutput] | None = None) -> InferResponse:
    """``call`` on each row range of ``request`` in ``bounds``, concurrently on ``pool``, merged in order.

    A single range covering the whole request sends ``request`` itself (no slicing, no concatenation).
    ``outputs``, when given, replaces what each part asks for (see :func:`binary_outputs`). The merged
    response keeps the request's id."""
    from tierserve.protocol.tensors import concat_responses, slice_request

    whole = len(bounds) == 1 and bounds[0] == (0, request.rows)
    parts = [request] if whole else [slice_request(request, start, stop) for start, stop in bounds]
    if outputs is not None:  # a copy: the caller's request still says how the client wants the answer
        parts = [replace(part, outputs=list(outputs)) for part in parts]
    responses: list[InferResponse] = await_all([pool.submit(call, part) for part in parts], deadline,
                                               timeout_message, grace_s)
    if len(responses) == 1:
        return responses[0]
    merged = concat_responses(responses)
    merged.id = request.id
    return merged
