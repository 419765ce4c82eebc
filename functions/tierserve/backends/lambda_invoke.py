"""The router's CPU backend in AWS: a synchronous Lambda Invoke of CpuInferenceFunction.

Locally the same boto3 code path points at ``tierserve serve``'s Lambda-invoke endpoint
through ``AWS_ENDPOINT_URL_LAMBDA``. The payload (``tierserve.invoke_payload``) carries the
client's body as API Gateway handed it to the router, and the CPU function's HTTP response
comes back as the reply, to be returned to the client untouched: the router neither decodes
nor re-encodes a tensor on this path. An error reply keeps the CPU tier's status and code.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from tierserve import errors, limits
from tierserve.backends.base import ClientsByTimeout, Readiness, ready_by, shared_pool
from tierserve.backends.split import binary_outputs, run_parts
from tierserve.invoke_payload import payload, readiness_payload
from tierserve.manifest import ModelVersion
from tierserve.protocol.calls import InferenceCall, Reply
from tierserve.protocol.messages import InferRequest, InferResponse
from tierserve.tiers import Tier

#: HTTP status in the CPU function's reply -> the error the router re-raises.
_ERROR_BY_STATUS: dict[int, type[errors.TierserveError]] = {
    400: errors.InvalidRequestError,
    404: errors.ModelNotFoundError,
    413: errors.PayloadTooLargeError,
    503: errors.BackendUnavailableError,
    504: errors.BackendTimeoutError,
}


#: Invoke errors that mean nothing ran because the function (or account) has no concurrency left.
THROTTLED_CODES = ("TooManyRequestsException", "EC2ThrottledException", "ResourceNotReadyException")

#: Read timeouts (s) the router picks from for an Invoke, by the request's remaining budget.
TIMEOUT_BUCKETS_S = (1.0, 2.0, 5.0, 10.0, 20.0)
#: How long the CPU function's readiness answer is remembered (a failure: READY_RETRY_S).
READY_TTL_S = 30.0
READY_RETRY_S = 5.0


class LambdaInvokeBackend:
    tier = Tier.CPU

    def __init__(self, function_name: str, timeout_s: float = 30.0, client: Any = None,
                 functions: dict[int, str] | None = None) -> None:
        self.function_name = function_name
        #: memory class (MB) -> CPU function (``CPU_FUNCTIONS``); empty: every model runs in ``function_name``
        self.functions = dict(functions or {})
        self.timeout_s = timeout_s
        self._client = client  # injected (tests): used for every timeout
        self._clients = ClientsByTimeout("lambda", client)
        self.readiness = Readiness(ok_ttl_s=READY_TTL_S, retry_s=READY_RETRY_S)

    def _bucket(self, timeout_s: float | None) -> float:
        """The smallest read timeout in TIMEOUT_BUCKETS_S covering ``timeout_s`` (at most ``self.timeout_s``)."""
        if timeout_s is None or timeout_s >= self.timeout_s:
            return self.timeout_s
        return next((b for b in TIMEOUT_BUCKETS_S if b >= timeout_s), self.timeout_s)

    def client(self, timeout_s: float | None = None) -> Any:
        """A boto3 Lambda client whose read timeout fits the request's remaining budget.

        boto3 clients are thread-safe and keep their connection pools; there is one per bucket."""
        return self._clients.get(self._bucket(timeout_s))

    def function_for(self, model: ModelVersion) -> str:
        """The CPU function of ``model``'s memory class (``tierserve.memory_classes``)."""
        if not self.functions:
            return self.function_name
        from tierserve.memory_classes import function_for

        return function_for(model, self.functions)

    def infer(self, model: ModelVersion, call: InferenceCall, timeout_s: float | None = None) -> Reply:
        """Invoke the CPU function with the client's body as it came; when that payload would exceed
        Lambda's request quota, with sub-batches that each fit (request and binary response), invoked
        concurrently and merged in order."""
        from tierserve.protocol.header import json_dumps

        data = json_dumps(payload(model, call))
        function_name = self.function_for(model)  # the model's memory class
        if len(data) <= limits.LAMBDA_REQUEST_BYTES:
            return self._invoke(data, timeout_s, function_name)
        return self._infer_split(model, call, timeout_s, function_name)

    def _infer_split(self, model: ModelVersion, call: InferenceCall, timeout_s: float | None,
                     function_name: str) -> Reply:
        from tierserve.protocol.header import json_dumps

        request = call.request()
        bounds = plan_parts(model, request)
        budget = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + budget

        def invoke(part: InferRequest) -> InferResponse:
            data = json_dumps(payload(model, InferenceCall.from_request(part)))
            return self._invoke(data, max(0.05, deadline - time.monotonic()), function_name).decoded()

        # binary outputs: the smallest replies; the router encodes the merged answer as the client asked
        return Reply(run_parts(request, bounds, invoke, pool=_split_pool(), deadline=deadline, grace_s=0.5,
                               outputs=binary_outputs(request, model),
                               timeout_message=f"{function_name} did not answer the {len(bounds)} parts of a "
                                               f"{request.rows}-row request within {budget:g} s"))

    def _invoke(self, data: bytes, timeout_s: float | None, function_name: str) -> Reply:
        from tierserve.protocol.header import json_loads

        try:
            out = self.client(timeout_s).invoke(
                FunctionName=function_name, InvocationType="RequestResponse", Payload=data
            )
            reply = json_loads(out["Payload"].read() or b"{}")
        except Exception as exc:
            if type(exc).__name__ in ("ReadTimeoutError", "ReadTimeout"):
                # The function may still be running it: never retried, reported as a timeout (504).
                raise errors.BackendTimeoutError(
                    f"{function_name} did not answer within {self._bucket(timeout_s):g} s"
                ) from exc
            code = str(((getattr(exc, "response", None) or {}).get("Error") or {}).get("Code") or "")
            if code in THROTTLED_CODES:
                # Lambda refused before running anything: the function's (or the account's) concurrency is
                # spent. The dispatcher may send the request to the GPU tier instead.
                raise errors.TierThrottledError(f"{function_name} is throttled ({code}: {exc})",
                                                retry_after_s=1) from exc
            raise errors.BackendUnavailableError(
                f"cannot invoke {function_name}: {type(exc).__name__}: {exc}"
            ) from exc
        if out.get("FunctionError"):
            detail = reply.get("errorMessage", reply) if isinstance(reply, dict) else reply
            raise errors.InferenceError(f"{function_name} failed: {detail}; see its logs")
        if not isinstance(reply, dict):
            raise errors.InferenceError(
                f"{function_name} answered {type(reply).__name__}, not an HTTP API response object; "
                "check that CPU_FUNCTION_NAME names CpuInferenceFunction")
        status = int(reply.get("statusCode", 500))
        if status == 200:
            return Reply(http=reply)
        raise _tier_error(function_name, status, reply)

    def check_ready(self, model: ModelVersion) -> None:
        """Ask the CPU function whether ``model`` loads and runs there (``invoke_payload.readiness_payload``);
        raise its error, with its own code, when it does not. The answer is remembered for
        ``READY_TTL_S`` (``READY_RETRY_S`` for a failure), so probes cost one Invoke now and then."""
        from tierserve.protocol.header import json_dumps, json_loads

        def probe() -> errors.TierserveError | None:
            try:
                function_name = self.function_for(model)  # the model's memory class
                out = self.client(self.timeout_s).invoke(FunctionName=function_name,
                                                         InvocationType="RequestResponse",
                                                         Payload=json_dumps(readiness_payload(model)))
                reply = json_loads(out["Payload"].read() or b"{}")
                if out.get("FunctionError") or not isinstance(reply, dict):
                    return errors.InferenceError(f"{function_name} failed its readiness check; see its logs")
                if int(reply.get("statusCode", 500)) != 200:
                    return _tier_error(function_name, int(reply.get("statusCode", 500)), reply)
            except Exception as exc:
                return exc if isinstance(exc, errors.TierserveError) else errors.BackendUnavailableError(
                    f"cannot invoke the CPU function for {model.name}/{model.version}: {type(exc).__name__}: {exc}")
            return None

        self.readiness.check(f"{model.name}/{model.version}", probe)

    def ready(self, model: ModelVersion | None = None) -> bool:
        return ready_by(self.check_ready, model)


def _tier_error(function_name: str, status: int, reply: dict) -> errors.TierserveError:
    """The CPU tier's error, as it answered it: the class its status maps to, and its own code."""
    raw = reply.get("body", "") if isinstance(reply, dict) else ""
    body = base64.b64decode(raw) if reply.get("isBase64Encoded") else str(raw).encode()
    try:
        obj = json.loads(body)
    except ValueError:
        obj = {}
    if not isinstance(obj, dict):
        obj = {}
    message = str(obj.get("error") or body[:200].decode("utf-8", "replace") or f"CPU tier answered {status}")
    exc = _ERROR_BY_STATUS.get(status, errors.InferenceError)(message)
    if isinstance(obj.get("code"), str):
        exc.code = obj["code"]  # the tier's own code survives the hop (e.g. integrity_error)
    retry = (reply.get("headers") or {}).get("retry-after") if isinstance(reply, dict) else None
    if isinstance(exc, errors.BackendUnavailableError) and retry:
        exc.retry_after_s = float(retry)
    return exc


# --- sub-batches that fit Lambda's quotas --------------------------------------------------------------

#: Concurrent Invokes for the parts of one split request.
SPLIT_CONCURRENCY = 8
#: Room in each part for its JSON header and the payload's fields.
PART_HEADER_BYTES = 64 * 1024


def _split_pool() -> Any:
    return shared_pool("invoke-split", SPLIT_CONCURRENCY)


def plan_parts(model: ModelVersion, request: Any) -> list[tuple[int, int]]:
    """Row ranges ``[start, stop)`` that each fit one Invoke: the part's inputs as binary data (base64 in
    the payload) and its outputs as binary data (base64 in the reply) within Lambda's 6 MB each way.
    :class:`PayloadTooLargeError` when the model has no batch axis or one row alone does not fit."""
    import numpy as np

    rows = request.rows
    batched = all(t.shape for t in request.inputs) and all(o.shape and o.shape[0] == -1 for o in model.outputs)
    if not batched:
        raise errors.PayloadTooLargeError(
            f"the request to model {model.name!r} does not fit one CPU function invocation "
            f"({limits.mb(limits.LAMBDA_REQUEST_BYTES)}) and the model has no batch axis to split it along; "
            "send a smaller request, or use batch inference for large jobs")
    per_row = np.zeros(rows, dtype=np.int64)
    for t in request.inputs:
        if t.datatype == "BYTES":
            lengths = np.fromiter((4 + len(x) for x in t.data.ravel()), dtype=np.int64, count=t.data.size)
            per_row += lengths.reshape(rows, -1).sum(axis=1) if rows else 0
        else:
            per_row += t.data[0:1].nbytes if rows else 0
    known: dict[str, int] = {}
    for spec in model.inputs:
        tensor = next(t for t in request.inputs if t.name == spec.name)
        for axis, dim in enumerate(spec.dim_names):
            if dim:
                known.setdefault(dim, int(tensor.shape[axis]))
    wanted = {o.name: True for o in request.outputs} or {o.name: True for o in model.outputs}
    out_row = limits.predict_response(model.outputs, 1, wanted, known, True).binary_bytes
    in_room = limits.raw_len_for_base64(limits.LAMBDA_REQUEST_BYTES - limits.ENVELOPE_BYTES) - PART_HEADER_BYTES
    out_room = limits.MAX_BINARY_RESPONSE_BYTES - PART_HEADER_BYTES
    bounds: list[tuple[int, int]] = []
    if rows and not any(t.datatype == "BYTES" for t in request.inputs) and per_row[0] <= in_room \
            and out_row <= out_room:  # fixed-size rows: equal parts, no loop over a million rows
        step = max(1, min(in_room // max(1, int(per_row[0])), out_room // max(1, out_row)))
        return [(a, min(a + step, rows)) for a in range(0, rows, step)]
    start, in_used, out_used = 0, 0, 0
    for i in range(rows):
        need_in, need_out = int(per_row[i]), out_row
        if need_in > in_room or need_out > out_room:
            raise errors.PayloadTooLargeError(
                f"row {i} of the request to model {model.name!r} alone does not fit one CPU function invocation "
                f"({limits.mb(limits.LAMBDA_REQUEST_BYTES)} each way); send smaller rows, or use batch inference")
        if i > start and (in_used + need_in > in_room or out_used + need_out > out_room):
            bounds.append((start, i))
            start, in_used, out_used = i, 0, 0
        in_used += need_in
        out_used += need_out
    if rows:
        bounds.append((start, rows))
    return bounds
