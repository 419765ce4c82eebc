"""Plain fakes shared by the runtime's unit tests: a clock, a tier backend, a boto3 Lambda client,
and tiny model, request and tensor helpers (the ONNX models themselves are in tests/support/models.py).

Why fakes and not a mocks library: each one behaves like the real thing in the ways the runtime
relies on (a backend answers outputs shaped like the model's, a clock only moves when told to),
and records what it was asked, so a test reads as Given/When/Then over real objects.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tierserve.manifest import ModelVersion, TensorSpec, Variant
from tierserve.protocol.calls import Body, InferenceCall, Reply
from tierserve.protocol.messages import InferResponse, Tensor

# --- time --------------------------------------------------------------------------------------------


class FakeClock:
    """A monotonic clock that moves only when a test (or a FakeBackend) advances it."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class FakeLambdaContext:
    """The one method of a LambdaContext that deadlines read."""

    def __init__(self, remaining_ms: int) -> None:
        self.remaining_ms = remaining_ms

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


# --- a tier ------------------------------------------------------------------------------------------


@dataclass
class BackendCall:
    model: ModelVersion
    call: InferenceCall
    timeout_s: float


class FakeBackend:
    """A tier that records every call and answers ones shaped like the model's outputs.

    * ``model_ready`` / ``server_ready``: what ``ready(model)`` / ``ready(None)`` answer.
    * ``fail``: raised on every call; ``failures``: raised one per call, in order, before ``fail``
      applies (``None`` in the list is a success).
    * ``clock`` and ``takes_s``: each call takes that long on the FakeClock (before it fails or answers).
    * ``reply``: a Reply to answer with instead of the default outputs.

    It reads only the call's header (rows), so it never materialises a request itself.
    """

    def __init__(self, tier: str, *, fail: BaseException | None = None,
                 failures: list[BaseException | None] | None = None, model_ready: bool = True,
                 server_ready: bool = True, clock: FakeClock | None = None,
                 takes_s: float = 0.0, reply: Reply | None = None) -> None:
        self.tier = tier
        self.fail = fail
        self.failures = list(failures or [])
        self.model_ready = model_ready
        self.server_ready = server_ready
        self.clock = clock
        self.takes_s = takes_s
        self.reply = reply
        self.calls: list[BackendCall] = []
        self.ready_calls: list[str | None] = []

    @property
    def ids(self) -> list[str | None]:
        return [c.call.id for c in self.calls]

    @property
    def timeouts(self) -> list[float]:
        return [c.timeout_s for c in self.calls]

    def infer(self, model: ModelVersion, call: InferenceCall, timeout_s: float) -> Reply:
        self.calls.append(BackendCall(model, call, timeout_s))
        if self.clock is not None:
            self.clock.advance(self.takes_s)
        exc = self.failures.pop(0) if self.failures else self.fail
        if exc is not None:
            raise exc
        if self.reply is not None:
            return self.reply
        return Reply(ones_like_outputs(model, call.rows, call.id))

    def ready(self, model: ModelVersion | None = None) -> bool:
        self.ready_calls.append(model.name if model is not None else None)
        return self.model_ready if model is not None else self.server_ready


def ones_like_outputs(model: ModelVersion, rows: int, request_id: str | None = None) -> InferResponse:
    """Every output of ``model`` for ``rows`` rows, filled with ones."""
    from tierserve.protocol.datatypes import numpy_dtypes

    outputs = []
    for spec in model.outputs:
        shape = (rows, *(d if d > 0 else 1 for d in spec.shape[1:]))
        data = np.ones(shape, dtype=numpy_dtypes()[spec.datatype])
        outputs.append(Tensor(spec.name, spec.datatype, shape, data))
    return InferResponse(model.name, model.version, outputs, request_id)


# --- the CPU function behind boto3 -------------------------------------------------------------------


class FakeLambdaClient:
    """A boto3 Lambda client: records each invoke()'s arguments and answers ``reply``.

    ``reply`` is a dict (the function's return value) or a callable from the decoded payload to one
    (``tierserve.direct.handle_direct`` makes it the real CPU function); ``function_error`` marks
    the answer as an unhandled error; ``exc`` is raised instead of answering."""

    def __init__(self, reply: dict | Callable[[dict], Any] | None = None, function_error: str | None = None,
                 exc: BaseException | None = None) -> None:
        self.reply = reply
        self.function_error = function_error
        self.exc = exc
        self.invocations: list[dict[str, Any]] = []

    @property
    def payloads(self) -> list[dict[str, Any]]:
        return [json.loads(i["Payload"]) for i in self.invocations]

    def invoke(self, **kwargs: Any) -> dict[str, Any]:
        self.invocations.append(kwargs)
        if self.exc is not None:
            raise self.exc
        answer = self.reply(json.loads(kwargs["Payload"])) if callable(self.reply) else self.reply
        out: dict[str, Any] = {"StatusCode": 200, "Payload": io.BytesIO(json.dumps(answer).encode())}
        if self.function_error:
            out["FunctionError"] = self.function_error
        return out


# --- tiny models and requests ------------------------------------------------------------------------

X_SPEC = TensorSpec("x", "FP32", (-1, 4))
Y_SPEC = TensorSpec("y", "FP32", (-1, 3))


def model_version(name: str = "m", targets: tuple[str, ...] = ("gpu", "cpu"), version: str = "1",
                  routing: dict | None = None, max_batch_size: int = 64) -> ModelVersion:
    """A manifest entry for x FP32 [-1, 4] -> y FP32 [-1, 3] (its artifact is never loaded)."""
    variant = Variant(f"{name}/{version}/model.onnx", "0" * 64, 1)
    return ModelVersion(name, version, (X_SPEC,), (Y_SPEC,), {"fp32": variant}, "fp32", targets,
                        max_batch_size=max_batch_size, routing=dict(routing or {}))


def write_linear(root: Path, name: str = "lin", version: str = "1", seed: int = 7,
                 targets: tuple[str, ...] = ("cpu",), routing: dict | None = None,
                 max_batch_size: int = 0) -> tuple[ModelVersion, np.ndarray, np.ndarray]:
    """y = x @ W + b (x FP32 [-1, 4], y FP32 [-1, 3]) written to the store at ``root``: (version, W, b)."""
    from tests.support.models import linear_onnx, write_model

    data, w, b = linear_onnx(4, 3, seed=seed)
    root.mkdir(parents=True, exist_ok=True)
    mv = write_model(root, name, version, data, (X_SPEC,), (Y_SPEC,), targets=targets,
                     max_batch_size=max_batch_size, routing=routing)
    return mv, w, b


def rows_of(rows: int, seed: int = 0, cols: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)


def json_body(x: np.ndarray, request_id: str | None = None, name: str = "x", **extra: Any) -> bytes:
    """A JSON-only inference request body for one FP32 input."""
    obj: dict[str, Any] = {"inputs": [{"name": name, "datatype": "FP32", "shape": list(x.shape),
                                       "data": x.ravel().tolist()}], **extra}
    if request_id is not None:
        obj["id"] = request_id
    return json.dumps(obj).encode()


def json_call(rows: int, request_id: str | None = None, target: str | None = None, seed: int = 0) -> InferenceCall:
    """An InferenceCall parsed from a JSON body of ``rows`` x 4 FP32 values (nothing materialised)."""
    extra = {"parameters": {"target": target}} if target is not None else {}
    return InferenceCall.from_body(Body(json_body(rows_of(rows, seed), request_id, **extra)))


# --- tensors as tritonclient sends them --------------------------------------------------------------


def sample(datatype: str, shape: tuple[int, ...], seed: int = 0, utf8: bool = True) -> np.ndarray:
    """A seeded random array of the datatype (BYTES: object array of bytes)."""
    from tierserve.protocol.datatypes import numpy_dtypes

    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    if datatype == "BOOL":
        return rng.integers(0, 2, size=shape).astype(bool)
    if datatype == "BYTES":
        if utf8:
            items = [f"w{i}-{rng.integers(0, 10**6)}-é✓".encode() for i in range(n)]
        else:
            items = [rng.integers(0, 256, size=int(rng.integers(0, 9)), dtype=np.uint8).tobytes() for _ in range(n)]
        arr = np.empty(n, dtype=object)
        arr[:] = items
        return arr.reshape(shape)
    dtype = numpy_dtypes()[datatype]
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return (rng.standard_normal(size=shape) * 100).astype(dtype)


def client_request(arrays: dict[str, np.ndarray], binary: bool, outputs: list | None = None,
                   request_id: str = "") -> tuple[bytes, int | None]:
    """Body and header length exactly as tritonclient.http builds them."""
    import tritonclient.http as httpclient

    from tierserve.protocol.tensors import dtype_to_datatype

    inputs = []
    for name, arr in arrays.items():
        inp = httpclient.InferInput(name, list(arr.shape), dtype_to_datatype(arr.dtype))
        inp.set_data_from_numpy(arr, binary_data=binary)
        inputs.append(inp)
    return httpclient.InferenceServerClient.generate_request_body(inputs, outputs=outputs, request_id=request_id)


NUMERIC = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"]
ALL_DATATYPES = [*NUMERIC, "BYTES"]


def raw_request(inputs: list[dict], **extra: Any) -> bytes:
    """A JSON request body with these ``inputs`` entries as given (valid or not)."""
    return json.dumps({"inputs": inputs, **extra}).encode()


def fp32_input(**overrides: Any) -> dict:
    """A valid JSON input entry ``x`` (FP32, shape [2]); ``overrides`` break it one field at a time."""
    return {"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0], **overrides}


class FakeCloud:
    """The edge's CloudBackend stand-in: records each forward, answers 200 from ``served_by``, or raises ``fail``."""

    tier = "cloud"

    def __init__(self, served_by: str = "cpu", fail: BaseException | None = None, ready: bool = True) -> None:
        self.served_by = served_by
        self.fail = fail
        self.ready_value = ready
        self.calls: list[tuple[ModelVersion, InferenceCall, str | None]] = []
        self.ready_calls = 0

    def forward(self, model: ModelVersion, call: InferenceCall, hint: str | None, timeout_s: float
                ) -> tuple[Reply, str]:
        from tierserve.protocol.http_api import response
        from tierserve.protocol.tensors import encode_response

        self.calls.append((model, call, hint))
        if self.fail is not None:
            raise self.fail
        body, headers = encode_response(ones_like_outputs(model, call.rows, call.id), call.header or call.request())
        return Reply(http=response(200, body, {**headers, "x-served-by": self.served_by})), self.served_by

    def ready(self, model: ModelVersion | None = None) -> bool:
        self.ready_calls += 1
        return self.ready_value
