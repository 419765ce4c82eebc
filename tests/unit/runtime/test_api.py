"""RouterFunction's HTTP API (handle_http) over a real model store, with fake tiers injected at the composition root.

The runtime is built by ``build_runtime`` exactly as in AWS, except that the CPU and GPU tiers are
FakeBackends (``set_runtime(build_runtime(settings, cpu=..., gpu=..., store=...))``); the events are
API Gateway HTTP API events as ``sam local generate-event`` prints them.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.support.fakes import FakeBackend, json_body, rows_of, write_linear
from tests.support.make_events import http_event
from tierserve import errors
from tierserve.api import handle_http, model_metadata
from tierserve.app import build_runtime, set_runtime
from tierserve.calls import Reply
from tierserve.codec import decode_response, encode_request, tensor_from_numpy
from tierserve.http import decode_body
from tierserve.manifest import ModelVersion, TensorSpec, Variant
from tierserve.observability import metrics
from tierserve.settings import Settings
from tierserve.store import ModelStore
from tierserve.types import InferRequest, RequestedOutput


@dataclass
class Rig:
    cpu: FakeBackend
    gpu: FakeBackend


@pytest.fixture
def rig(runtime_env: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Rig]:
    """Models 'both' (GPU from 8 rows, CPU fallback) and 'gpuonly' in a tmp store; the GPU fake refuses
    connections until a test sets ``rig.gpu.fail = None``; the breaker has Settings' defaults (cooldown 30 s).
    Metrics are flushed per invocation in AWS; here they are cleared after each test instead."""
    store_dir = tmp_path / "store"
    write_linear(store_dir, "both", targets=("gpu", "cpu"), routing={"gpu_min_rows": 8}, max_batch_size=64)
    write_linear(store_dir, "gpuonly", targets=("gpu",), max_batch_size=64)
    settings = Settings(model_store_uri=str(store_dir), model_cache_dir=str(tmp_path / "cache"))
    rig = Rig(FakeBackend("cpu"), FakeBackend("gpu", fail=errors.BackendUnavailableError("connection refused")))
    store = ModelStore(settings.model_store_uri, settings.model_cache_dir)
    set_runtime(build_runtime(settings, cpu=rig.cpu, gpu=rig.gpu, store=store))
    yield rig
    metrics.clear_metrics()


def infer_event(model: str, body: bytes, headers: dict[str, str] | None = None, binary: bool = False) -> dict:
    path = f"/v2/models/{model}/infer"
    content_type = "application/octet-stream" if binary else "application/json"
    event = http_event("POST", path, "POST /v2/models/{name}/infer", "", {"name": model},
                       {"content-type": content_type, **(headers or {})})
    event["body"] = base64.b64encode(body).decode() if binary else body.decode()
    event["isBase64Encoded"] = binary
    return event


def get_event(path: str) -> dict:
    return http_event("GET", path, f"GET {path}")


def body_of(resp: dict) -> dict:
    return json.loads(decode_body(resp))


# --- inference through the tiers ---------------------------------------------------------------------


def test_gpu_failure_is_served_by_cpu_with_fallback_headers(rig: Rig) -> None:
    # Given a GPU that refuses connections
    # When a 16-row request (over gpu_min_rows 8) arrives as an HTTP API event
    resp = handle_http(infer_event("both", json_body(rows_of(16), "http-1")))
    # Then it is a 200 served by the CPU, flagged as a fallback, with the model's outputs
    assert resp["statusCode"] == 200, decode_body(resp)
    assert (resp["headers"]["x-served-by"], resp["headers"]["x-fallback"]) == ("cpu", "gpu-unavailable")
    body = body_of(resp)
    assert (body["id"], body["outputs"][0]["shape"]) == ("http-1", [16, 3])
    assert (len(rig.gpu.calls), len(rig.cpu.calls)) == (1, 1)


def test_a_small_request_is_a_plain_cpu_answer_without_a_fallback_header(rig: Rig) -> None:
    # When a 1-row request arrives
    resp = handle_http(infer_event("both", json_body(rows_of(1))))
    # Then the CPU serves it as a plain CPU decision and the GPU is not touched
    assert resp["statusCode"] == 200
    assert resp["headers"]["x-served-by"] == "cpu" and "x-fallback" not in resp["headers"]
    assert (rig.gpu.calls, rig.gpu.ready_calls, len(rig.cpu.calls)) == ([], [], 1)


def test_gpu_only_model_with_the_gpu_down_is_a_503_with_retry_after(rig: Rig) -> None:
    # Given a GPU-only model and a GPU that refuses connections (breaker cooldown 30 s)
    # When it is requested over HTTP
    resp = handle_http(infer_event("gpuonly", json_body(rows_of(1))))
    # Then the answer is a 503 with Retry-After and a protocol error body; the CPU is never tried
    assert (resp["statusCode"], resp["headers"]["retry-after"]) == (503, "30")
    body = body_of(resp)
    assert body["code"] == "backend_unavailable" and "GPU tier only" in body["error"]
    assert rig.cpu.calls == []


def test_the_x_target_header_reaches_the_dispatcher_as_the_clients_hint(rig: Rig) -> None:
    # Given a healthy GPU
    rig.gpu.fail = None
    # When a 1-row request (a CPU batch) carries x-target: gpu
    resp = handle_http(infer_event("both", json_body(rows_of(1)), {"x-target": "gpu"}))
    # Then the GPU serves it
    assert (resp["statusCode"], resp["headers"]["x-served-by"]) == (200, "gpu")
    assert (len(rig.gpu.calls), rig.cpu.calls) == (1, [])


def test_a_binary_request_asking_for_binary_outputs_gets_a_binary_answer(rig: Rig) -> None:
    # Given a request with a binary input that asks for its output as binary data
    x = rows_of(2)
    request = InferRequest([tensor_from_numpy("x", x)], id="bin-1", outputs=[RequestedOutput("y", binary_data=True)])
    body, header_length = encode_request(request, binary=True)
    # When it arrives base64-encoded, as API Gateway hands binary bodies over
    resp = handle_http(infer_event("both", body, {"inference-header-content-length": str(header_length)}, binary=True))
    # Then the answer is base64 with its own header length, and decodes to the outputs
    assert resp["statusCode"] == 200 and resp["isBase64Encoded"] is True
    decoded = decode_response(decode_body(resp), int(resp["headers"]["inference-header-content-length"]))
    assert decoded.id == "bin-1"
    np.testing.assert_array_equal(decoded.outputs[0].data, np.ones((2, 3), np.float32))


def test_an_encoded_cpu_reply_goes_back_to_the_client_untouched(rig: Rig) -> None:
    # Given a CPU tier that answers with an HTTP response it encoded itself (as the CPU function does)
    encoded = {"statusCode": 200, "isBase64Encoded": True, "body": base64.b64encode(b'{"x":1}\x00\x01').decode(),
               "headers": {"content-type": "application/octet-stream", "inference-header-content-length": "7"}}
    rig.cpu.reply = Reply(http=encoded)
    # When a request is served by it
    resp = handle_http(infer_event("both", json_body(rows_of(1))))
    # Then status, body and headers are the CPU tier's, with x-served-by added
    assert {k: resp[k] for k in ("statusCode", "isBase64Encoded", "body")} == {
        k: encoded[k] for k in ("statusCode", "isBase64Encoded", "body")}
    assert resp["headers"] == {**encoded["headers"], "x-served-by": "cpu"}


# --- the other endpoints -------------------------------------------------------------------------------


def test_model_ready_asks_the_dispatcher(rig: Rig) -> None:
    # Given a model whose CPU copy loads, and a GPU-only model that is not ready on the GPU
    rig.gpu.model_ready = False
    # When readiness is asked for each
    both, gpu_only = handle_http(get_event("/v2/models/both/ready")), handle_http(get_event("/v2/models/gpuonly/ready"))
    # Then the first is ready, served by the CPU; the second is a 503 with Retry-After, from the GPU tier
    assert (both["statusCode"], body_of(both)) == (200, {"name": "both", "version": "1", "ready": True})
    assert (gpu_only["statusCode"], gpu_only["headers"]["x-served-by"]) == (503, "gpu")
    assert gpu_only["headers"]["retry-after"] == "5"


@pytest.mark.parametrize(("path", "expected"), [
    ("/v2/health/live", {"live": True}),
    ("/v2", {"name": "tierserve", "version": "0.1.0", "extensions": ["binary_tensor_data"]}),
], ids=["live", "server-metadata"])
def test_liveness_and_server_metadata_need_no_model(rig: Rig, path: str, expected: dict) -> None:
    # When the endpoint is asked
    resp = handle_http(get_event(path))
    # Then it answers without touching either tier
    assert (resp["statusCode"], body_of(resp)) == (200, expected)
    assert (rig.cpu.ready_calls, rig.gpu.ready_calls) == ([], [])


def test_model_metadata_is_kserve_v2() -> None:
    # Given a model with two inputs and one output
    mv = ModelVersion("m", "1", (TensorSpec("input", "FP32", (-1, 4)), TensorSpec("mask", "INT64", (-1,))),
                      (TensorSpec("out", "FP32", (-1, 2)),), {"fp32": Variant("m/1/model.onnx", "0" * 64, 1)}, "fp32")
    # When its metadata is built
    # Then it is KServe v2 model metadata
    assert model_metadata(mv, ["1", "2"]) == {
        "name": "m",
        "versions": ["1", "2"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]},
                   {"name": "mask", "datatype": "INT64", "shape": [-1]}],
        "outputs": [{"name": "out", "datatype": "FP32", "shape": [-1, 2]}],
    }
