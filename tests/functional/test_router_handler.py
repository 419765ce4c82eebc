"""RouterFunction and CpuInferenceFunction driven by the JSON in events/."""

from __future__ import annotations

import base64
import copy
import json

import numpy as np
import pytest

from tests.conftest import load_event
from tierserve.handlers import cpu_inference, router


@pytest.fixture
def env(runtime_env, digits_store):
    runtime_env.setenv("MODEL_STORE_URI", str(digits_store))
    runtime_env.setenv("CPU_BACKEND", "inprocess")
    return runtime_env


def _body(resp: dict) -> dict:
    return json.loads(base64.b64decode(resp["body"]) if resp["isBase64Encoded"] else resp["body"])


def test_infer_event_returns_a_protocol_response_served_by_cpu(env, lambda_context):
    # Given the sample HTTP API event for the demo model
    event = load_event("http_infer.json")
    # When the router handles it
    resp = router.lambda_handler(event, lambda_context)
    # Then it is a 200 protocol response, echoing the id, served by the CPU tier
    assert resp["statusCode"] == 200, resp["body"]
    assert resp["headers"]["x-served-by"] == "cpu"
    body = _body(resp)
    assert body["model_name"] == "digits" and body["model_version"] == "1" and body["id"] == "demo-1"
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["label"]["datatype"] == "INT64" and outputs["label"]["shape"] == [2]
    probs = np.asarray(outputs["probabilities"]["data"], dtype=np.float32).reshape(2, 10)
    # And the labels are the argmax of the probabilities, and the probabilities sum to 1
    assert outputs["label"]["data"] == probs.argmax(axis=1).tolist()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_model_metadata_and_health_events(env, lambda_context):
    meta = router.lambda_handler(load_event("http_model_metadata.json"), lambda_context)
    assert meta["statusCode"] == 200
    assert _body(meta)["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    ready = router.lambda_handler(load_event("http_health_ready.json"), lambda_context)
    assert ready["statusCode"] == 200 and ready["headers"]["x-served-by"] == "cpu"


def _with(event: dict, *, path: str | None = None, body: str | None = None, method: str | None = None) -> dict:
    ev = copy.deepcopy(event)
    if path:
        ev["rawPath"] = ev["requestContext"]["http"]["path"] = path
    if body is not None:
        ev["body"] = body
    if method:
        ev["requestContext"]["http"]["method"] = method
    return ev


@pytest.mark.parametrize("mutate,status,needle", [
    (dict(path="/v2/models/nope/infer"), 404, "unknown model 'nope'"),
    (dict(path="/v2/models/digits/versions/9/infer"), 404, "no version '9'"),
    (dict(body="{not json"), 400, "JSON"),
    (dict(body=json.dumps({"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32",
                                       "data": [0.0] * 64}]})), 400, "pixels"),
    (dict(body=json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "INT64",
                                       "data": [0] * 64}]})), 400, "expected datatype FP32, got INT64"),
    (dict(body=json.dumps({"inputs": [{"name": "input", "shape": [1, 63], "datatype": "FP32",
                                       "data": [0.0] * 63}]})), 400, "64"),
    (dict(body=json.dumps({"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32",
                                       "data": [0.0] * 64}]})), 400, "input"),
    (dict(path="/v2/models/digits/predict"), 404, "no route"),
    (dict(method="GET"), 405, "not allowed"),
    (dict(path="/v2/models/..%2F..%2Fetc/infer"), 400, "invalid model name"),
])
def test_bad_requests_get_clear_errors_and_never_a_stack_trace(env, lambda_context, mutate, status, needle):
    resp = router.lambda_handler(_with(load_event("http_infer.json"), **mutate), lambda_context)
    assert resp["statusCode"] == status, resp["body"]
    assert needle in _body(resp)["error"]
    assert "Traceback" not in resp["body"]
    assert resp["headers"]["x-served-by"] == "cpu"


def test_oversized_body_gets_413_before_inference(env, lambda_context, monkeypatch):
    # Given a small payload limit, and a backend that records whether it ran
    event = load_event("http_infer.json")
    limit = len(event["body"]) // 2
    env.setenv("MAX_PAYLOAD_BYTES", str(limit))
    ran = []
    from tierserve.backends import onnx as onnx_backend

    monkeypatch.setattr(onnx_backend.OnnxBackend, "infer", lambda *a, **k: ran.append(1))
    # When a request twice that size arrives
    resp = router.lambda_handler(event, lambda_context)
    # Then it is refused with 413 and no inference ran
    assert resp["statusCode"] == 413 and f"limit is {limit} bytes" in _body(resp)["error"]
    assert ran == []


def test_cpu_function_serves_the_direct_payload(env, lambda_context):
    # Given the router's Invoke payload for the CPU tier
    event = load_event("cpu_direct_infer.json")
    # When the CPU function handles it
    resp = cpu_inference.lambda_handler(event, lambda_context)
    # Then it answers exactly what the router would have answered in-process
    via_router = _body(router.lambda_handler(load_event("http_infer.json"), lambda_context))
    assert resp["statusCode"] == 200
    assert _body(resp)["outputs"] == via_router["outputs"]


def test_cpu_function_rejects_a_payload_of_the_wrong_shape(env, lambda_context):
    resp = cpu_inference.lambda_handler({"hello": "world"}, lambda_context)
    assert resp["statusCode"] == 400 and "cpu_direct_infer.json" in _body(resp)["error"]


# --- which API sent the event, and its time limit (issue 17) -------------------------------------------------


def test_an_http_api_request_gets_29_s_and_a_rest_request_15_minutes_whatever_the_functions_timeout(
        env, monkeypatch) -> None:
    from tierserve_tools.emulation import LocalContext

    seen: dict[str, int] = {}

    def http(event, context):
        seen["http"] = context.get_remaining_time_in_millis()
        return {"statusCode": 200, "body": ""}

    def rest(event, context):
        seen["rest"] = context.get_remaining_time_in_millis()
        seen["name"] = context.function_name  # the rest of the context is the runtime's
        return {"statusCode": 200, "body": ""}

    monkeypatch.setattr(router, "handle_http", http)
    monkeypatch.setattr(router.api, "handle_rest", rest, raising=False)
    # Given RouterFunction's 900 s timeout
    context = LocalContext("RouterFunction", 1024, 900)
    router.lambda_handler(load_event("http_infer.json"), context)
    router.lambda_handler(_rest_event(), context)
    # Then an HTTP API event (2.0) sees at most 29 s left, a REST event (1.0) the REST API's 15 minutes
    assert 28_500 < seen["http"] <= 29_000
    assert 895_000 < seen["rest"] <= 900_000 and seen["name"] == "RouterFunction"
    # And a shorter function timeout still wins
    router.lambda_handler(_rest_event(), LocalContext("RouterFunction", 1024, 10))
    assert seen["rest"] <= 10_000


def _rest_event() -> dict:
    return {"resource": "/v1/chat/completions", "path": "/v1/chat/completions", "httpMethod": "POST",
            "headers": {"content-type": "application/json"}, "multiValueHeaders": {}, "queryStringParameters": None,
            "requestContext": {"requestId": "r-1", "stage": "api", "httpMethod": "POST"},
            "body": "{}", "isBase64Encoded": False}


def test_a_streamed_answer_is_buffered_where_the_runtime_cannot_stream_it(env, monkeypatch, lambda_context) -> None:
    from tierserve.streaming.response import StreamingResponse

    closed = []

    def rest(event, context):
        return StreamingResponse(200, {"content-type": "text/event-stream"}, iter([b"data: 1\n\n", b"data: 2\n\n"]),
                                 lambda: closed.append(True))

    monkeypatch.setattr(router.api, "handle_rest", rest, raising=False)
    monkeypatch.delenv("TIERSERVE_STREAMING_RUNTIME", raising=False)
    resp = router.lambda_handler(_rest_event(), lambda_context)
    assert resp == {"statusCode": 200, "headers": {"content-type": "text/event-stream"},
                    "body": "data: 1\n\ndata: 2\n\n", "isBase64Encoded": False} and closed == [True]
    # under the streaming runtime loop it is returned as it is, for the loop to stream
    monkeypatch.setenv("TIERSERVE_STREAMING_RUNTIME", "1")
    assert isinstance(router.lambda_handler(_rest_event(), lambda_context), StreamingResponse)


def test_a_rest_event_without_a_rest_entry_point_is_a_404_in_openais_shape(env, monkeypatch, lambda_context) -> None:
    monkeypatch.delattr(router.api, "handle_rest", raising=False)
    resp = router.lambda_handler(_rest_event(), lambda_context)
    assert resp["statusCode"] == 404 and json.loads(resp["body"])["error"]["code"] == "route_not_found"
