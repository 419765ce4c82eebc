"""LambdaInvokeBackend: the Invoke payload it sends and how each kind of reply maps to an error.

moto's mock_aws cannot run Lambda functions, so the boto3 client is a plain fake object here;
tests/integration/test_serve.py drives the same code through the real local Invoke endpoint.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest

from tierserve import errors
from tierserve.api import handle_direct, reset_app
from tierserve.backends.lambda_invoke import LambdaInvokeBackend, direct_payload
from tierserve.codec import decode_request, encode_response
from tierserve.http import response
from tierserve.manifest import ModelVersion, TensorSpec, Variant
from tierserve.types import InferRequest, InferResponse, RequestedOutput, Tensor

MODEL = ModelVersion("m", "3", (TensorSpec("x", "FP32", (-1, 4)),), (TensorSpec("y", "FP32", (-1, 3)),),
                     {"fp32": Variant("m/3/model.onnx", "0" * 64, 1)}, "fp32", ("gpu", "cpu"))


def _request(rows: int = 2) -> InferRequest:
    x = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
    return InferRequest([Tensor("x", "FP32", x.shape, x)], id="rid-1", outputs=[RequestedOutput("y")])


class FakeLambda:
    """Records invoke() calls; answers with ``reply`` (a dict -> JSON payload) or raises ``exc``."""

    def __init__(self, reply: dict | None = None, function_error: str | None = None,
                 exc: Exception | None = None) -> None:
        self.reply, self.function_error, self.exc = reply, function_error, exc
        self.calls: list[dict] = []

    def invoke(self, **kwargs):
        self.calls.append(kwargs)
        if self.exc is not None:
            raise self.exc
        out = {"StatusCode": 200, "Payload": io.BytesIO(json.dumps(self.reply).encode())}
        if self.function_error:
            out["FunctionError"] = self.function_error
        return out


def _ok_reply(request: InferRequest) -> dict:
    y = np.ones((request.rows, 3), np.float32)
    body, headers = encode_response(InferResponse("m", "3", [Tensor("y", "FP32", y.shape, y)], request.id), request)
    return response(200, body, {**headers, "x-served-by": "cpu"})


def test_payload_is_the_cpu_direct_event_with_the_binary_extension() -> None:
    # Given a JSON request
    req = _request()
    # When the router builds the Invoke payload
    payload = direct_payload(MODEL, req)
    # Then it names the resolved version and carries the body in the binary extension, base64 in JSON
    assert payload["model_name"] == "m" and payload["model_version"] == "3"
    body = base64.b64decode(payload["body_base64"])
    again = decode_request(body, payload["inference_header_content_length"])
    np.testing.assert_array_equal(again.inputs[0].data, req.inputs[0].data)
    assert again.id == "rid-1" and again.inputs[0].parameters == {}
    assert json.loads(body[: payload["inference_header_content_length"]])["inputs"][0]["parameters"][
        "binary_data_size"] == 32


def test_request_response_invoke_with_the_function_name_and_decoded_reply() -> None:
    req = _request(3)
    fake = FakeLambda(_ok_reply(req))
    resp = LambdaInvokeBackend("cpu-fn", client=fake).infer(MODEL, req)
    (call,) = fake.calls
    assert call["FunctionName"] == "cpu-fn" and call["InvocationType"] == "RequestResponse"
    assert json.loads(call["Payload"])["model_version"] == "3"
    assert resp.outputs[0].name == "y" and resp.outputs[0].data.shape == (3, 3)


def test_binary_reply_is_decoded_with_its_header_length() -> None:
    req = _request(2)
    req.parameters["binary_data_output"] = True
    reply = _ok_reply(req)
    assert reply["isBase64Encoded"] is True
    resp = LambdaInvokeBackend("f", client=FakeLambda(reply)).infer(MODEL, req)
    np.testing.assert_array_equal(resp.outputs[0].data, np.ones((2, 3), np.float32))


@pytest.mark.parametrize(("status", "error"), [
    (400, errors.InvalidRequestError), (404, errors.ModelNotFoundError), (413, errors.PayloadTooLargeError),
    (503, errors.BackendUnavailableError), (504, errors.BackendTimeoutError), (500, errors.InferenceError),
])
def test_error_statuses_map_to_protocol_errors_with_the_cpu_functions_message(status, error) -> None:
    reply = response(status, {"error": f"because {status}", "code": "x"})
    with pytest.raises(error, match=f"because {status}"):
        LambdaInvokeBackend("f", client=FakeLambda(reply)).infer(MODEL, _request())


def test_unhandled_function_error_is_an_inference_error() -> None:
    fake = FakeLambda({"errorMessage": "boom", "errorType": "RuntimeError"}, function_error="Unhandled")
    with pytest.raises(errors.InferenceError, match="cpu-fn failed: boom"):
        LambdaInvokeBackend("cpu-fn", client=fake).infer(MODEL, _request())


def test_transport_errors_are_backend_unavailable() -> None:
    fake = FakeLambda(exc=ConnectionError("refused"))
    with pytest.raises(errors.BackendUnavailableError, match="cannot invoke f: ConnectionError"):
        LambdaInvokeBackend("f", client=fake).infer(MODEL, _request())


def test_non_json_error_body_keeps_a_readable_message() -> None:
    reply = {"statusCode": 502, "headers": {}, "body": "<html>bad gateway</html>", "isBase64Encoded": False}
    with pytest.raises(errors.InferenceError, match="bad gateway"):
        LambdaInvokeBackend("f", client=FakeLambda(reply)).infer(MODEL, _request())


def test_default_client_never_retries_an_invoke(monkeypatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    client = LambdaInvokeBackend("f", timeout_s=7).client()
    assert client.meta.config.retries["total_max_attempts"] == 1
    assert client.meta.config.read_timeout == 7


def test_round_trip_through_the_cpu_functions_own_handler(runtime_env, tmp_path) -> None:
    """The payload the router sends is exactly what CpuInferenceFunction's handle_direct accepts."""
    from tests.support.models import linear_onnx, write_model

    data, w, b = linear_onnx(seed=5)
    mv = write_model(tmp_path, "lin", "1", data, (TensorSpec("x", "FP32", (-1, 4)),),
                     (TensorSpec("y", "FP32", (-1, 3)),))
    runtime_env.setenv("MODEL_STORE_URI", str(tmp_path))
    reset_app()

    class Loopback:
        def invoke(self, **kw):
            reply = handle_direct(json.loads(kw["Payload"]))
            return {"StatusCode": 200, "Payload": io.BytesIO(json.dumps(reply).encode())}

    req = _request(5)
    resp = LambdaInvokeBackend("CpuInferenceFunction", client=Loopback()).infer(mv, req)
    np.testing.assert_allclose(resp.outputs[0].data, req.inputs[0].data @ w + b, rtol=1e-5)


def test_read_timeout_follows_the_budget_in_buckets(monkeypatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    backend = LambdaInvokeBackend("f", timeout_s=30)
    assert backend.client(0.3).meta.config.read_timeout == 1.0
    assert backend.client(4.0).meta.config.read_timeout == 5.0
    assert backend.client(None).meta.config.read_timeout == 30
    assert backend.client(45).meta.config.read_timeout == 30
    assert backend.client(4.5) is backend.client(3.0)  # one client per bucket, reused


def test_read_timeout_is_a_504_not_a_503() -> None:
    from botocore.exceptions import ReadTimeoutError

    fake = FakeLambda(exc=ReadTimeoutError(endpoint_url="http://x"))
    with pytest.raises(errors.BackendTimeoutError, match="did not answer within 2 s"):
        LambdaInvokeBackend("f", client=fake).infer(MODEL, _request(), timeout_s=1.5)
