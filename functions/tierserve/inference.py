"""One inference, from a protocol body to an HTTP API response: shared by the router and the CPU function.

The router (``tierserve.api``) and the CPU function (``tierserve.direct``) run the same steps; only
where the model name and the body come from differs:

1. the model must exist (404) before its body is read;
2. the body's header is parsed (names, datatypes, shapes, sizes; no tensor is materialised) and
   checked against the manifest (400);
3. the version is picked (named, default, or the canary's share, stable per request id);
4. the tier dispatcher runs it within the request's deadline;
5. the reply goes back as the client asked: an encoded reply from the CPU function untouched, or
   decoded outputs encoded once (JSON or binary, per output).
"""

from __future__ import annotations

import time
from typing import Any

from tierserve import errors, limits, telemetry
from tierserve.app import Runtime
from tierserve.manifest import ModelVersion, check_model_name, check_version
from tierserve.observability import logger
from tierserve.protocol import header as wire
from tierserve.protocol.calls import Body, InferenceCall
from tierserve.protocol.http_api import response, status_for
from tierserve.tiering import Deadline, Dispatched, pick_version


def resolve_name(runtime: Runtime, name: str, version: str | None) -> tuple[str, str | None]:
    """Check the model name and version and that the model exists (404), before any body is read."""
    name = check_model_name(name)
    if version is not None:
        check_version(version)
    arrived = time.monotonic()
    try:
        runtime.store.manifest().resolve(name, version)
    except errors.ModelNotFoundError:  # maybe published since this copy of the manifest was read: look again
        runtime.store.refresh(since=arrived).resolve(name, version)
    return name, version


def infer(runtime: Runtime, name: str, version: str | None, body: Body, hint: str | None,
          context: Any) -> dict[str, Any]:
    """Serve one inference; returns the HTTP API response (errors raise; the caller renders them).

    Each request the model was found for is counted in ``runtime.stats`` (Triton's statistics)."""
    name, version = resolve_name(runtime, name, version)
    t0 = time.perf_counter_ns()
    counted = (name, version or runtime.store.manifest().models[name].default_version)
    try:
        call = InferenceCall.from_body(body)
        model = pick_version(runtime.store.manifest(), name, version, call.id)
        counted = (model.name, model.version)
        wire.check_request(call.inputs, call.outputs, model)
        check_response_fits(model, call)
        t1 = time.perf_counter_ns()
        done = runtime.dispatcher.dispatch(model, call, hint, Deadline.from_context(context))
        t2 = time.perf_counter_ns()
        record(model, done, call.rows, runtime.dispatcher.state())
        out = render(done, call)
    except Exception as exc:
        runtime.stats.failure(*counted, time.perf_counter_ns() - t0)
        telemetry.request(*counted, tier=None, latency_ms=(time.perf_counter_ns() - t0) / 1e6, status=status_for(exc))
        raise
    runtime.stats.success(model.name, model.version, call.rows, t1 - t0, t2 - t1, time.perf_counter_ns() - t2)
    return out


def render(done: Dispatched, call: InferenceCall) -> dict[str, Any]:
    """The HTTP API response for a dispatched call, with ``x-served-by`` (and ``x-fallback``)."""
    extra = {"x-served-by": done.served_by}
    if done.fallback:
        extra["x-fallback"] = done.fallback
    if done.reply.http is not None:  # encoded by the CPU function for this very request: pass it through
        out = dict(done.reply.http)
        out["headers"] = {**(out.get("headers") or {}), **extra}
        return out
    from tierserve.protocol.tensors import encode_response

    assert done.reply.response is not None
    body, headers = encode_response(done.reply.response, call.header or call.request())
    binary = "inference-header-content-length" in headers
    if not limits.response_fits(len(body), binary):  # the prediction was low: still a 413, never a failed reply
        raise errors.PayloadTooLargeError(
            f"the response is {limits.mb(len(body))}{' (before base64)' if binary else ''}, more than a Lambda "
            f"response can carry ({limits.mb(limits.LAMBDA_RESPONSE_BYTES)}); {_what_to_do()}")
    return response(200, body, {**headers, **extra})


def response_size(model: ModelVersion, call: InferenceCall, binary: bool | None = None) -> limits.ResponseSize:
    """The response's predicted size from the manifest's output shapes, the batch and the input sizes
    (by dimension name), with the outputs encoded as the call asks (or all ``binary``)."""
    asked = {o.name: o.binary_data for o in call.outputs} if call.outputs else {o.name: None for o in model.outputs}
    default = call.parameters.get("binary_data_output") is True
    binary_of = {name: (b if b is not None else default) if binary is None else binary for name, b in asked.items()}
    known: dict[str, int] = {}
    given = {t.name: t for t in call.inputs}
    for spec in model.inputs:
        for axis, dim in enumerate(spec.dim_names):
            if dim and spec.name in given and axis < len(given[spec.name].shape):
                known.setdefault(dim, int(given[spec.name].shape[axis]))
    batched = all(o.shape and o.shape[0] == -1 for o in model.outputs)
    return limits.predict_response(model.outputs, call.rows, binary_of, known, batched)


def check_response_fits(model: ModelVersion, call: InferenceCall) -> None:
    """413 before any inference when the response cannot fit a Lambda reply, saying what would fit."""
    size = response_size(model, call)
    if size.fits():
        return
    as_binary = response_size(model, call, binary=True)
    options = []
    if not size.binary or as_binary.body_bytes < size.body_bytes:
        fits = "fits" if as_binary.fits() else f"at most {as_binary.max_rows()} rows fit"
        options.append(f"binary outputs (parameters.binary_data_output: true; about "
                       f"{limits.mb(as_binary.body_bytes)}: {fits})")
    if len(size.outputs) > 1:
        options.append(f"only the outputs you need (\"outputs\": [...] of {', '.join(o.name for o in size.outputs)})")
    options.append(f"at most {size.max_rows()} rows per request as asked")
    raise errors.PayloadTooLargeError(
        f"the response to {call.rows} rows of model {model.name!r} would be about {limits.mb(size.body_bytes)} "
        f"({'binary' if size.binary else 'JSON'}), more than a Lambda response can carry "
        f"({limits.mb(limits.LAMBDA_RESPONSE_BYTES)}); ask for {'; or '.join(options)}; {_what_to_do()}")


def _what_to_do() -> str:
    return "or use batch inference (drop a JSONL file into the model bucket's batch/in/) for large jobs"


def record(model: ModelVersion, done: Dispatched, rows: int, state: dict[str, str]) -> None:
    """Per-request metrics with model and version dimensions (EMF, ``tierserve.telemetry``) and one log line."""
    telemetry.request(model.name, model.version, tier=done.served_by, latency_ms=done.latency_ms, rows=rows,
                      fallback=bool(done.fallback))
    logger.info("routed", extra={"model": model.name, "version": model.version, "target": done.served_by,
                                 "reason": done.decision.reason, "rows": rows, "fallback": done.fallback,
                                 "latency_ms": round(done.latency_ms, 3)})


def header_length(value: str | None) -> int | None:
    """The Inference-Header-Content-Length header as an int (400 when it is not one)."""
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise errors.InvalidRequestError(f"Inference-Header-Content-Length must be an integer, got {value!r}") from None
