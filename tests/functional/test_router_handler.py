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
