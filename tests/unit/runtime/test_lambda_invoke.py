"""LambdaInvokeBackend: the Invoke it sends, and how each kind of reply comes back.

moto cannot run Lambda functions, so the boto3 client is a FakeLambdaClient; where the reply matters
it comes from the REAL CPU function (``tierserve.direct.handle_direct``) serving a tiny ONNX model.
tests/integration/test_serve.py drives the same code through the real local Invoke endpoint.
"""

from __future__ import annotations

import base64
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.fakes import FakeLambdaClient, json_body, model_version, rows_of, write_linear
from tierserve import errors
from tierserve.backends.lambda_invoke import LambdaInvokeBackend
from tierserve.direct import handle_direct
from tierserve.manifest import ModelVersion
from tierserve.protocol.calls import Body, InferenceCall
from tierserve.protocol.http_api import error_response, response
from tierserve.protocol.messages import InferRequest
from tierserve.protocol.tensors import decode_request, encode_request, tensor_from_numpy

FUNCTION = "tierserve-CpuInferenceFunction"
#: A model the CPU function's store does not hold (its replies here are scripted, not served).
ELSEWHERE = model_version("nope", ("cpu",))


@pytest.fixture
def lin(runtime_env: pytest.MonkeyPatch, tmp_path: Path) -> tuple[ModelVersion, np.ndarray, np.ndarray]:
    """'lin' v1 (y = x @ W + b) in the store the CPU function serves from: (version, W, b)."""
    mv, w, b = write_linear(tmp_path / "store")
    runtime_env.setenv("MODEL_STORE_URI", str(tmp_path / "store"))
    return mv, w, b


def through_cpu_function() -> tuple[LambdaInvokeBackend, FakeLambdaClient]:
    client = FakeLambdaClient(reply=handle_direct)
    return LambdaInvokeBackend(FUNCTION, client=client), client


def scripted(reply: Any, function_error: str | None = None) -> LambdaInvokeBackend:
    return LambdaInvokeBackend(FUNCTION, client=FakeLambdaClient(reply=reply, function_error=function_error))


def call_of(x: np.ndarray, **extra: object) -> InferenceCall:
    """A call as the router's API builds it from a JSON event: the event's text is kept."""
    return InferenceCall.from_body(Body.from_event_text(json_body(x, "inv-1", **extra).decode(), False, None))


# --- what is sent ---------------------------------------------------------------------------------------


def test_one_synchronous_invoke_of_the_named_function_with_the_pinned_version(lin) -> None:
    # Given a backend whose client answers through the real CPU function
    mv, _, _ = lin
    backend, client = through_cpu_function()
    # When it runs a request
    backend.infer(mv, call_of(rows_of(3)), timeout_s=5.0)
    # Then it made one RequestResponse Invoke of the named function, for the version the router picked
    [invocation] = client.invocations
    assert (invocation["FunctionName"], invocation["InvocationType"]) == (FUNCTION, "RequestResponse")
    assert {k: client.payloads[0][k] for k in ("model_name", "model_version")} == {"model_name": "lin",
                                                                                    "model_version": "1"}


@pytest.mark.parametrize("binary", [False, True], ids=["json-text", "binary-bytes"])
def test_the_clients_body_is_forwarded_untouched(lin, binary: bool) -> None:
    # Given a client's body as the router received it: JSON text, or binary bytes with a header length
    mv, _, _ = lin
    x = rows_of(2, seed=4)
    if binary:
        data, header_length = encode_request(InferRequest([tensor_from_numpy("x", x)], id="inv-1"), binary=True)
        call = InferenceCall.from_body(Body(data, header_length))
    else:
        text = json_body(x, "inv-1").decode()
        call = InferenceCall.from_body(Body.from_event_text(text, False, None))
    backend, client = through_cpu_function()
    # When the backend runs it
    backend.infer(mv, call)
    # Then the payload carries the same JSON text, or base64 of the same bytes, and the header it needs
    [payload] = client.payloads
    if binary:
        assert base64.b64decode(payload["body"]) == data and payload["isBase64Encoded"] is True
        assert payload["headers"] == {"content-type": "application/octet-stream",
                                      "inference-header-content-length": str(header_length)}
    else:
        assert payload["body"] == text and payload["isBase64Encoded"] is False
        assert payload["headers"] == {"content-type": "application/json"}
    # And the router never decoded a tensor of it
    assert call.materialized is False


def test_a_call_built_from_arrays_is_sent_once_as_binary_data(lin) -> None:
    # Given a call built from numpy arrays (batch scoring), not from a client's body
    mv, _, _ = lin
    x = rows_of(3, seed=2)
    call = InferenceCall.from_request(InferRequest([tensor_from_numpy("x", x)], id="arr-1"))
    backend, client = through_cpu_function()
    # When the backend runs it
    backend.infer(mv, call)
    # Then the payload is the binary extension, base64 in the JSON event, and decodes to the same arrays
    [payload] = client.payloads
    length = int(payload["headers"]["inference-header-content-length"])
    body = base64.b64decode(payload["body"])
    assert json.loads(body[:length])["inputs"][0]["parameters"]["binary_data_size"] == 3 * 4 * 4
    again = decode_request(body, length)
    np.testing.assert_array_equal(again.inputs[0].data, x)
    assert again.id == "arr-1"


# --- what comes back ------------------------------------------------------------------------------------


@pytest.mark.parametrize("binary_output", [False, True], ids=["json-output", "binary-output"])
def test_a_200_reply_is_passed_through_and_decodes_to_the_models_outputs(lin, binary_output: bool) -> None:
    # Given the real CPU function serving 'lin' with onnxruntime
    mv, w, b = lin
    backend, _ = through_cpu_function()
    x = rows_of(5, seed=3)
    # When a 5-row request that asks for JSON or binary outputs runs through it
    reply = backend.infer(mv, call_of(x, parameters={"binary_data_output": binary_output}))
    # Then the reply is the CPU function's HTTP response, as it was encoded there
    assert reply.response is None and reply.http is not None
    assert (reply.http["statusCode"], reply.http["isBase64Encoded"]) == (200, binary_output)
    # And it decodes to the model's outputs, y = x @ W + b
    np.testing.assert_allclose(reply.arrays()["y"], x @ w + b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("status", "error", "code"),
    [(400, errors.InvalidRequestError, "invalid_name"), (404, errors.ModelNotFoundError, "model_not_found"),
     (413, errors.PayloadTooLargeError, "payload_too_large"),
     (503, errors.BackendUnavailableError, "backend_unavailable"),
     (504, errors.BackendTimeoutError, "backend_timeout"), (500, errors.InferenceError, "integrity_error")],
)
def test_an_error_reply_keeps_the_tiers_status_message_and_code(status: int, error: type, code: str) -> None:
    # Given a CPU function that answers `status` with a protocol error body
    backend = scripted(response(status, {"error": f"answered {status}", "code": code}))
    # When the backend runs a request
    with pytest.raises(error) as info:
        backend.infer(ELSEWHERE, call_of(rows_of(1)))
    # Then the error is exactly the status's class, with the function's message and its own code
    assert type(info.value) is error
    assert (info.value.message, info.value.code) == (f"answered {status}", code)
    # And the router answers its client with the same status
    assert error_response(info.value)["statusCode"] == status


@pytest.mark.parametrize(
    ("case", "status", "code", "needle"),
    [("unknown-input", 400, "invalid_request", "'z'"), ("unknown-model", 404, "model_not_found", "'nope'"),
     ("tampered-artifact", 500, "integrity_error", "sha256")],
)
def test_the_real_cpu_functions_errors_survive_the_hop(lin, tmp_path: Path, case: str, status: int, code: str,
                                                       needle: str) -> None:
    # Given a request the CPU function refuses: an input the model lacks, a model it lacks, or an
    # artifact whose bytes no longer match the manifest's sha256
    mv, _, _ = lin
    model, call = mv, call_of(rows_of(1))
    if case == "unknown-input":
        call = InferenceCall.from_body(Body(json_body(rows_of(1), name="z")))
    elif case == "unknown-model":
        model = ELSEWHERE
    else:
        (tmp_path / "store" / mv.variants["fp32"].path).write_bytes(b"not the model the manifest names")
    backend, _ = through_cpu_function()
    # When the backend runs it
    with pytest.raises(errors.TierserveError) as info:
        backend.infer(model, call)
    # Then the router re-raises it with the CPU function's status, code and message
    resp = error_response(info.value)
    assert (resp["statusCode"], json.loads(resp["body"])["code"]) == (status, code)
    assert needle in info.value.message


def test_a_503_keeps_the_cpu_functions_retry_after() -> None:
    # Given a CPU function that answers 503 with Retry-After
    backend = scripted(error_response(errors.BackendUnavailableError("warming up", retry_after_s=7)))
    # When the backend runs a request
    with pytest.raises(errors.BackendUnavailableError) as info:
        backend.infer(ELSEWHERE, call_of(rows_of(1)))
    # Then the client is asked to retry after the same time
    assert info.value.retry_after_s == 7.0


@pytest.mark.parametrize(
    ("reply", "error", "message"),
    [({"statusCode": 502, "headers": {}, "body": "<html>bad gateway</html>", "isBase64Encoded": False},
      errors.InferenceError, "<html>bad gateway</html>"),
     ({"statusCode": 503, "body": "Service Unavailable"}, errors.BackendUnavailableError, "Service Unavailable")],
    ids=["502-html", "503-text"],
)
def test_an_error_body_that_is_not_json_keeps_a_readable_message(reply: dict, error: type, message: str) -> None:
    # Given a reply whose error body is not the protocol's JSON
    # When the backend runs a request
    with pytest.raises(error) as info:
        scripted(reply).infer(ELSEWHERE, call_of(rows_of(1)))
    # Then the raw text is the message
    assert info.value.message == message


def test_a_reply_that_is_not_a_json_object_is_an_inference_error() -> None:
    # Given a function that returns a JSON string instead of an HTTP API response
    # When the backend runs a request
    # Then it is an InferenceError (a 500 that names the function), not a crash
    with pytest.raises(errors.InferenceError, match=FUNCTION):
        scripted("Task finished").infer(ELSEWHERE, call_of(rows_of(1)))


def test_an_unhandled_function_error_is_an_inference_error_pointing_at_its_logs() -> None:
    # Given an Invoke whose function raised (FunctionError: Unhandled)
    backend = scripted({"errorMessage": "Runtime exited with error: signal: killed", "errorType": "Runtime.ExitError"},
                       function_error="Unhandled")
    # When the backend runs a request
    with pytest.raises(errors.InferenceError) as info:
        backend.infer(ELSEWHERE, call_of(rows_of(1)))
    # Then the error names the function and its message, and points at its logs
    assert f"{FUNCTION} failed: Runtime exited with error: signal: killed" in info.value.message
    assert "logs" in info.value.message


# --- the boto3 client -----------------------------------------------------------------------------------


def test_a_transport_error_is_backend_unavailable_and_tried_once() -> None:
    # Given a client whose Invoke raises (throttled, unreachable endpoint, ...)
    client = FakeLambdaClient(exc=ConnectionError("Could not connect to the endpoint URL"))
    # When the backend runs a request
    with pytest.raises(errors.BackendUnavailableError) as info:
        LambdaInvokeBackend(FUNCTION, client=client).infer(ELSEWHERE, call_of(rows_of(1)))
    # Then it is a 503 naming the function and the cause, after exactly one attempt
    assert type(info.value) is errors.BackendUnavailableError
    assert f"cannot invoke {FUNCTION}: ConnectionError" in info.value.message
    assert len(client.invocations) == 1


def test_a_read_timeout_is_a_504_naming_the_bucket_waited() -> None:
    from botocore.exceptions import ReadTimeoutError

    # Given a client whose Invoke times out on read
    client = FakeLambdaClient(exc=ReadTimeoutError(endpoint_url="http://x"))
    # When the backend runs a request with 1.5 s left
    # Then it is a timeout (504, the function may still run it), not a 503
    with pytest.raises(errors.BackendTimeoutError, match="did not answer within 2 s"):
        LambdaInvokeBackend(FUNCTION, client=client).infer(ELSEWHERE, call_of(rows_of(1)), timeout_s=1.5)


def test_the_default_client_never_retries_an_invoke(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given the backend's own boto3 client
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    client = LambdaInvokeBackend(FUNCTION, timeout_s=7).client()
    # Then one attempt in total, and the configured read timeout
    assert client.meta.config.retries["total_max_attempts"] == 1
    assert client.meta.config.read_timeout == 7


def test_the_read_timeout_follows_the_budget_in_buckets(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a backend with a 30 s timeout
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    backend = LambdaInvokeBackend(FUNCTION, timeout_s=30)
    # Then a budget picks the smallest bucket that covers it, capped at the backend's timeout
    assert backend.client(0.3).meta.config.read_timeout == 1.0
    assert backend.client(4.0).meta.config.read_timeout == 5.0
    assert backend.client(None).meta.config.read_timeout == 30
    assert backend.client(45).meta.config.read_timeout == 30
    # And one client per bucket is built and reused
    assert backend.client(4.5) is backend.client(3.0)


# --- Lambda's 6 MB, each way (issue 8, defect 2) ------------------------------------------------------------


@pytest.fixture
def wide(runtime_env: pytest.MonkeyPatch, tmp_path: Path):
    """'wide' v1: y = x @ W + b with x FP32 [-1, 1000] -> y FP32 [-1, 3], in the CPU function's store."""
    from tests.support.models import linear_onnx, write_model
    from tierserve.manifest import TensorSpec

    data, w, b = linear_onnx(1000, 3, seed=3)
    mv = write_model(tmp_path / "store", "wide", "1", data, (TensorSpec("x", "FP32", (-1, 1000)),),
                     (TensorSpec("y", "FP32", (-1, 3)),))
    runtime_env.setenv("MODEL_STORE_URI", str(tmp_path / "store"))
    return mv, w, b


def test_a_request_whose_invoke_would_exceed_6_mb_is_split_into_parts_that_fit_and_merged_in_order(wide) -> None:
    # Given 2,000 rows of 1,000 floats as a binary body (8 MB: 10.7 MB once base64 in an Invoke payload)
    mv, w, b = wide
    x = np.random.default_rng(5).standard_normal((2000, 1000)).astype(np.float32)
    data, header_length = encode_request(InferRequest([tensor_from_numpy("x", x)], id="big"), binary=True)
    backend, client = through_cpu_function()
    # When the backend runs it on the real CPU function
    reply = backend.infer(mv, InferenceCall.from_body(Body(data, header_length)), timeout_s=30.0)
    # Then it made several Invokes, each payload within Lambda's 6 MB request quota, each asking for binary outputs
    sizes = [len(i["Payload"]) for i in client.invocations]
    assert len(sizes) >= 2 and max(sizes) <= 6 * 1024 * 1024, sizes
    assert all(p["isBase64Encoded"] for p in client.payloads)
    # And the merged answer is every row, in order, as one response to the client's request id
    out = reply.decoded()
    assert out.id == "big"
    np.testing.assert_allclose(out.outputs[0].data, x @ w + b, rtol=1e-4, atol=1e-3)


def test_a_payload_within_6_mb_is_one_invoke_of_the_body_as_it_came(wide) -> None:
    mv, _, _ = wide
    x = np.ones((100, 1000), dtype=np.float32)
    backend, client = through_cpu_function()
    backend.infer(mv, call_of(x), timeout_s=10.0)
    assert len(client.invocations) == 1 and client.payloads[0]["isBase64Encoded"] is False


def test_a_model_without_a_batch_axis_cannot_be_split_and_says_so(tmp_path: Path) -> None:
    from tierserve.backends.lambda_invoke import plan_parts
    from tierserve.manifest import TensorSpec, Variant

    fixed = ModelVersion("fixed", "1", (TensorSpec("x", "FP32", (2000, 1000)),), (TensorSpec("y", "FP32", (3,)),),
                         {"fp32": Variant("fixed/1/model.onnx", "0" * 64, 1)}, "fp32")
    request = InferRequest([tensor_from_numpy("x", np.zeros((2000, 1000), np.float32))])
    with pytest.raises(errors.PayloadTooLargeError, match=r"no batch axis to split it along"):
        plan_parts(fixed, request)


def test_parts_of_variable_length_rows_each_fit(tmp_path: Path) -> None:
    from tierserve.backends.lambda_invoke import plan_parts
    from tierserve.limits import MAX_REQUEST_BODY_BYTES
    from tierserve.manifest import TensorSpec, Variant

    # Given BYTES rows of very different lengths
    text = ModelVersion("t", "1", (TensorSpec("s", "BYTES", (-1,)),), (TensorSpec("y", "FP32", (-1, 2)),),
                        {"fp32": Variant("t/1/model.onnx", "0" * 64, 1)}, "fp32")
    rng = np.random.default_rng(0)
    items = np.empty(3000, dtype=object)
    items[:] = [b"x" * int(n) for n in rng.integers(0, 8000, 3000)]
    request = InferRequest([tensor_from_numpy("s", items)])
    # When planned, Then the parts cover every row once, in order, each within the request room
    bounds = plan_parts(text, request)
    assert bounds[0][0] == 0 and bounds[-1][1] == 3000 and all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    assert len(bounds) > 1
    for start, stop in bounds:
        assert sum(4 + len(v) for v in items[start:stop]) <= MAX_REQUEST_BODY_BYTES


def test_a_throttled_invoke_is_a_tier_throttled_error():
    # Lambda's 429: the function's reserved (or the account's) concurrency is spent; nothing ran
    from botocore.exceptions import ClientError

    from tests.support.fakes import FakeLambdaClient, json_call, model_version
    from tierserve.backends.lambda_invoke import LambdaInvokeBackend
    from tierserve.errors import TierThrottledError

    exc = ClientError({"Error": {"Code": "TooManyRequestsException", "Message": "Rate Exceeded."},
                       "Reason": "ReservedFunctionConcurrentInvocationLimitExceeded"}, "Invoke")
    backend = LambdaInvokeBackend("cpu-fn", client=FakeLambdaClient(exc=exc))
    with pytest.raises(TierThrottledError, match="cpu-fn is throttled"):
        backend.infer(model_version("m", ("cpu",)), json_call(1), timeout_s=5)
