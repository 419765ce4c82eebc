"""LambdaInvokeBackend against a fake boto3 Lambda client; replies come from the REAL handle_direct."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.models import linear_onnx, write_model
from tierserve import errors
from tierserve.api import handle_direct
from tierserve.backends.lambda_invoke import LambdaInvokeBackend, direct_payload
from tierserve.manifest import ModelVersion, TensorSpec
from tierserve.types import InferRequest, Tensor

FUNCTION = "tierserve-CpuInferenceFunction"


class FakeLambdaClient:
    """Captures each Invoke's arguments; answers with ``reply(payload)`` (a dict) or raises ``exc``."""

    def __init__(self, reply=None, function_error: str | None = None, exc: Exception | None = None) -> None:
        self.reply = reply
        self.function_error = function_error
        self.exc = exc
        self.invocations: list[dict[str, Any]] = []

    def invoke(self, **kwargs: Any) -> dict[str, Any]:
        self.invocations.append(kwargs)
        if self.exc is not None:
            raise self.exc
        payload = json.loads(kwargs["Payload"])
        out: dict[str, Any] = {"StatusCode": 200, "Payload": io.BytesIO(json.dumps(self.reply(payload)).encode())}
        if self.function_error:
            out["FunctionError"] = self.function_error
        return out


@pytest.fixture
def linear_store(runtime_env: pytest.MonkeyPatch, tmp_path: Path):
    """A model store holding 'lin' v1 (y = x @ W + b, FP32 [-1, 4] -> [-1, 3]); MODEL_STORE_URI points at it."""
    data, w, b = linear_onnx(4, 3, seed=7)
    root = tmp_path / "store"
    root.mkdir()
    mv = write_model(root, "lin", "1", data, (TensorSpec("x", "FP32", (-1, 4)),),
                     (TensorSpec("y", "FP32", (-1, 3)),))
    runtime_env.setenv("MODEL_STORE_URI", str(root))
    return mv, w, b


def request(rows: int = 3, name: str = "x", seed: int = 0) -> InferRequest:
    x = np.random.default_rng(seed).standard_normal((rows, 4)).astype(np.float32)
    return InferRequest(inputs=[Tensor(name, "FP32", x.shape, x)], id="inv-1")


def other_model() -> ModelVersion:
    return ModelVersion(name="nope", version="1", inputs=(TensorSpec("x", "FP32", (-1, 4)),),
                        outputs=(TensorSpec("y", "FP32", (-1, 3)),), variants={}, selected_variant="fp32")


def test_invoke_arguments_and_payload_shape(linear_store) -> None:
    # Given a backend with a fake client that answers through the real CPU handler
    mv, _, _ = linear_store
    client = FakeLambdaClient(reply=handle_direct)
    backend = LambdaInvokeBackend(FUNCTION, client=client)
    req = request()
    # When it runs a request
    backend.infer(mv, req)
    # Then it made one synchronous Invoke of the named function
    assert len(client.invocations) == 1
    call = client.invocations[0]
    assert call["FunctionName"] == FUNCTION
    assert call["InvocationType"] == "RequestResponse"
    # And the payload is the cpu_direct_infer event: names, base64 binary body and its JSON header length
    payload = json.loads(call["Payload"])
    assert set(payload) == {"model_name", "model_version", "body_base64", "inference_header_content_length"}
    assert (payload["model_name"], payload["model_version"]) == ("lin", "1")
    assert payload == direct_payload(mv, req)
    body = base64.b64decode(payload["body_base64"])
    header = json.loads(body[: payload["inference_header_content_length"]])
    assert header["inputs"][0]["name"] == "x"
    assert header["inputs"][0]["parameters"]["binary_data_size"] == 3 * 4 * 4
    assert len(body) == payload["inference_header_content_length"] + 3 * 4 * 4


def test_decodes_a_200_reply_from_the_real_handler(linear_store) -> None:
    # Given the real handle_direct serving 'lin' with onnxruntime
    mv, w, b = linear_store
    backend = LambdaInvokeBackend(FUNCTION, client=FakeLambdaClient(reply=handle_direct))
    req = request(rows=5, seed=3)
    # When the backend runs a 5-row request through it
    resp = backend.infer(mv, req)
    # Then the decoded response carries the model's outputs, equal to x @ W + b
    assert (resp.model_name, resp.model_version) == ("lin", "1")
    [y] = resp.outputs
    assert (y.name, y.datatype, tuple(y.shape)) == ("y", "FP32", (5, 3))
    np.testing.assert_allclose(np.asarray(y.data).reshape(5, 3), req.inputs[0].data @ w + b, rtol=1e-5, atol=1e-5)


def test_400_from_the_real_handler_is_invalid_request(linear_store) -> None:
    # Given a request whose input name the model does not have
    mv, _, _ = linear_store
    backend = LambdaInvokeBackend(FUNCTION, client=FakeLambdaClient(reply=handle_direct))
    # When the backend runs it
    with pytest.raises(errors.InvalidRequestError) as info:
        backend.infer(mv, request(name="z"))
    # Then the CPU function's message comes through
    assert "z" in info.value.message


def test_404_from_the_real_handler_is_model_not_found(linear_store) -> None:
    # Given a model the CPU function's store does not have
    backend = LambdaInvokeBackend(FUNCTION, client=FakeLambdaClient(reply=handle_direct))
    # When the backend asks for it
    with pytest.raises(errors.ModelNotFoundError) as info:
        backend.infer(other_model(), request())
    # Then it is a ModelNotFoundError naming the model
    assert "nope" in info.value.message


@pytest.mark.parametrize(
    ("status", "error"),
    [(400, errors.InvalidRequestError), (404, errors.ModelNotFoundError), (413, errors.PayloadTooLargeError),
     (503, errors.BackendUnavailableError), (504, errors.BackendTimeoutError), (500, errors.InferenceError)],
)
def test_status_in_reply_maps_to_error(status: int, error: type[errors.TierserveError]) -> None:
    # Given a CPU function that answers `status` with a protocol error body
    def reply(_payload: dict) -> dict:
        return {"statusCode": status, "headers": {"content-type": "application/json"},
                "body": json.dumps({"error": f"answered {status}"}), "isBase64Encoded": False}

    backend = LambdaInvokeBackend(FUNCTION, client=FakeLambdaClient(reply=reply))
    # When the backend runs a request
    with pytest.raises(error) as info:
        backend.infer(other_model(), request())
    # Then the mapped error carries the function's message (exactly that class, not a parent)
    assert type(info.value) is error
    assert info.value.message == f"answered {status}"


def test_reply_without_a_json_error_body_still_maps() -> None:
    # Given a 503 reply whose body is not JSON
    def reply(_payload: dict) -> dict:
        return {"statusCode": 503, "body": "Service Unavailable"}

    backend = LambdaInvokeBackend(FUNCTION, client=FakeLambdaClient(reply=reply))
    # When the backend runs a request
    with pytest.raises(errors.BackendUnavailableError) as info:
        backend.infer(other_model(), request())
    # Then the raw text is the message
    assert info.value.message == "Service Unavailable"


def test_function_error_is_inference_error() -> None:
    # Given an Invoke whose function raised (FunctionError: Unhandled)
    def reply(_payload: dict) -> dict:
        return {"errorMessage": "Runtime exited with error: signal: killed", "errorType": "Runtime.ExitError"}

    backend = LambdaInvokeBackend(FUNCTION, client=FakeLambdaClient(reply=reply, function_error="Unhandled"))
    # When the backend runs a request
    with pytest.raises(errors.InferenceError) as info:
        backend.infer(other_model(), request())
    # Then it is an InferenceError naming the function and its message, pointing at its logs
    assert FUNCTION in info.value.message
    assert "signal: killed" in info.value.message
    assert "logs" in info.value.message


def test_client_exception_is_backend_unavailable() -> None:
    # Given a client whose Invoke raises (throttled, unreachable endpoint, ...)
    client = FakeLambdaClient(exc=ConnectionError("Could not connect to the endpoint URL"))
    backend = LambdaInvokeBackend(FUNCTION, client=client)
    # When the backend runs a request
    with pytest.raises(errors.BackendUnavailableError) as info:
        backend.infer(other_model(), request())
    # Then it is a BackendUnavailableError (503) naming the function and the cause, tried once
    assert type(info.value) is errors.BackendUnavailableError
    assert FUNCTION in info.value.message and "ConnectionError" in info.value.message
    assert len(client.invocations) == 1
