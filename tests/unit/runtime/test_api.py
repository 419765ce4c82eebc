"""RouterFunction's HTTP API (handle_http) over a real model store, with fake tiers injected at the composition root.

The runtime is built by ``build_runtime`` exactly as in AWS, except that the CPU and GPU tiers are
FakeBackends (``set_runtime(build_runtime(settings, cpu=..., gpu=..., store=...))``); the events are
API Gateway HTTP API events as ``sam local generate-event`` prints them.
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.support.fakes import FakeBackend, json_body, rows_of, write_linear
from tests.support.make_events import http_event
from tierserve import errors
from tierserve.api import handle_http
from tierserve.app import build_runtime, set_runtime
from tierserve.manifest import ModelVersion, TensorSpec, Variant
from tierserve.observability import metrics
from tierserve.protocol.calls import Reply
from tierserve.protocol.dataplane import model_metadata
from tierserve.protocol.http_api import decode_body
from tierserve.protocol.messages import InferRequest, RequestedOutput
from tierserve.protocol.tensors import decode_response, encode_request, tensor_from_numpy
from tierserve.settings import Settings
from tierserve.store import ModelStore


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


def test_readiness_means_the_model_loads_and_runs_and_the_cpu_tiers_code_survives_the_hop(
        runtime_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tests.support.fakes import FakeLambdaClient
    from tierserve.backends.lambda_invoke import LambdaInvokeBackend
    from tierserve.direct import handle_direct

    # Given the router reaching the REAL CPU function by Invoke, and a store whose artifact was replaced
    # after it was compiled (its sha256 no longer matches the manifest)
    store_dir = tmp_path / "store"
    mv, _, _ = write_linear(store_dir, "lin")
    (store_dir / mv.cpu_artifact.path).write_bytes(b"tampered")
    cpu_settings = Settings(model_store_uri=str(store_dir), model_cache_dir=str(tmp_path / "cpu-cache"))
    cpu_function = build_runtime(cpu_settings)
    client = FakeLambdaClient(reply=lambda payload: handle_direct(payload, None, cpu_function))
    router_settings = Settings(model_store_uri=str(store_dir), model_cache_dir=str(tmp_path / "router-cache"),
                               cpu_backend="lambda", cpu_function_name="cpu")
    set_runtime(build_runtime(router_settings, cpu=LambdaInvokeBackend("cpu", client=client)))
    # When readiness is asked twice, and an inference is sent
    ready, again = handle_http(get_event("/v2/models/lin/ready")), handle_http(get_event("/v2/models/lin/ready"))
    infer = handle_http(infer_event("lin", json_body(rows_of(2))))
    # Then the model is not ready (503, Retry-After), for the CPU tier's own reason and with its code
    assert (ready["statusCode"], body_of(ready)["code"], ready["headers"]["retry-after"]) == (503, "integrity_error",
                                                                                              "5")
    assert "is not ready" in body_of(ready)["error"] and "sha256" in body_of(ready)["error"]
    # And the answer was cached: one readiness Invoke for both probes
    assert [p.get("ready") for p in client.payloads] == [True, None]
    # And the inference fails with the same code, not relabelled as inference_error
    assert (infer["statusCode"], body_of(infer)["code"]) == (500, "integrity_error")
    assert again["statusCode"] == 503


def test_a_model_that_loads_and_runs_is_ready_through_the_cpu_function(runtime_env: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    from tests.support.fakes import FakeLambdaClient
    from tierserve.backends.lambda_invoke import LambdaInvokeBackend
    from tierserve.direct import handle_direct

    store_dir = tmp_path / "store"
    write_linear(store_dir, "lin")
    cpu_function = build_runtime(Settings(model_store_uri=str(store_dir), model_cache_dir=str(tmp_path / "c")))
    client = FakeLambdaClient(reply=lambda payload: handle_direct(payload, None, cpu_function))
    set_runtime(build_runtime(Settings(model_store_uri=str(store_dir), model_cache_dir=str(tmp_path / "r")),
                              cpu=LambdaInvokeBackend("cpu", client=client)))
    resp = handle_http(get_event("/v2/models/lin/ready"))
    assert (resp["statusCode"], body_of(resp)) == (200, {"name": "lin", "version": "1", "ready": True})


@pytest.mark.parametrize(("path", "expected"), [
    ("/v2/health/live", {"live": True}),
    ("/v2", {"name": "tierserve", "version": "0.1.0",
             "extensions": ["model_repository", "model_configuration", "binary_tensor_data"]}),
], ids=["live", "server-metadata"])
def test_liveness_and_server_metadata_need_no_model(rig: Rig, path: str, expected: dict) -> None:
    # When the endpoint is asked
    resp = handle_http(get_event(path))
    # Then it answers without touching either tier
    assert (resp["statusCode"], body_of(resp)) == (200, expected)
    assert (rig.cpu.ready_calls, rig.gpu.ready_calls) == ([], [])


def test_vllms_health_check_is_an_empty_200_when_ready_and_the_readiness_error_when_not(
        rig: Rig, runtime_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # When GET /health is asked (vLLM's OpenAI server serves it; guidellm asks it before a run, issue 19)
    resp = handle_http(get_event("/health"))
    # Then it is an empty 200, as vLLM answers, without touching either tier
    assert (resp["statusCode"], decode_body(resp)) == (200, b"")
    assert (rig.cpu.ready_calls, rig.gpu.ready_calls) == ([], [])
    # And where the data plane is not ready (no readable manifest) it answers what /v2/health/ready answers
    empty = Settings(model_store_uri=str(tmp_path / "nothing"), model_cache_dir=str(tmp_path / "c2"))
    set_runtime(build_runtime(empty, cpu=rig.cpu, gpu=rig.gpu))
    health, ready = handle_http(get_event("/health")), handle_http(get_event("/v2/health/ready"))
    assert health["statusCode"] == ready["statusCode"] != 200
    assert body_of(health)["error"] == body_of(ready)["error"]


#: A request that only a server with the extension answers, for each extension Triton's docs name
#: (docs/protocol/extension_*.md): model_repository's index, model_configuration's config, statistics, and
#: binary_tensor_data's binary outputs.
EXTENSION_PROBES = {
    "model_repository": ("POST", "/v2/repository/index", None),
    "model_configuration": ("GET", "/v2/models/both/config", None),
    "statistics": ("GET", "/v2/models/stats", None),
    "binary_tensor_data": ("POST", "/v2/models/both/infer", {"binary_data_output": True}),
}


def test_server_metadata_lists_exactly_the_extensions_served(rig: Rig) -> None:
    # Given the extensions the server metadata lists, by Triton's names
    listed = body_of(handle_http(get_event("/v2")))["extensions"]
    # Then each is one a probe exists for, and each probe is answered (a server without it would 404); statistics
    # are answered but not listed: they are one execution environment's counters, not the server's aggregate
    # (tests/unit/protocol/test_dataplane.py)
    assert sorted(listed) == sorted(set(EXTENSION_PROBES) - {"statistics"})
    for name, (method, path, parameters) in EXTENSION_PROBES.items():
        if method == "GET":
            resp = handle_http(get_event(path))
        elif parameters is None:
            resp = handle_http(http_event(method, path, f"{method} {path}", ""))
        else:
            resp = handle_http(infer_event("both", json_body(rows_of(1), parameters=parameters)))
        assert resp["statusCode"] == 200, (name, decode_body(resp))
        if name == "binary_tensor_data":
            assert resp["headers"]["content-type"] == "application/octet-stream"
    # And the extensions tierserve does not serve are not listed (shared memory and classification are refused)
    assert not {"system_shared_memory", "cuda_shared_memory", "classification", "sequence"} & set(listed)


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


# --- Triton's model config, statistics and repository index --------------------------------------------


def test_model_config_is_tritons_json_built_from_the_manifest(rig: Rig) -> None:
    # When the config of a batched model on both tiers is asked, with and without a version
    resp = handle_http(get_event("/v2/models/both/config"))
    versioned = handle_http(get_event("/v2/models/both/versions/1/config"))
    # Then it is Triton's configuration JSON: dims without the batch axis, Triton's datatype names
    assert resp["statusCode"] == 200 and body_of(versioned) == body_of(resp)
    cfg = body_of(resp)
    assert (cfg["name"], cfg["platform"], cfg["max_batch_size"]) == ("both", "onnxruntime_onnx", 64)
    assert cfg["input"][0] | {"name": "x", "data_type": "TYPE_FP32", "dims": [4]} == cfg["input"][0]
    assert [(o["name"], o["data_type"], o["dims"]) for o in cfg["output"]] == [("y", "TYPE_FP32", [3])]
    assert cfg["instance_group"][0]["kind"] == "KIND_GPU"
    assert cfg["parameters"]["tierserve_targets"] == {"string_value": "gpu,cpu"}
    # And an unknown model or version is a 404, not an empty config
    assert handle_http(get_event("/v2/models/nope/config"))["statusCode"] == 404
    assert handle_http(get_event("/v2/models/both/versions/9/config"))["statusCode"] == 404


def test_an_unbatched_models_config_keeps_every_dim(tmp_path: Path, runtime_env: pytest.MonkeyPatch) -> None:
    # Given a CPU model without batching (max_batch_size 0)
    write_linear(tmp_path / "s", "plain")
    set_runtime(build_runtime(Settings(model_store_uri=str(tmp_path / "s"), model_cache_dir=str(tmp_path / "c")),
                              cpu=FakeBackend("cpu")))
    # When its config is asked
    cfg = body_of(handle_http(get_event("/v2/models/plain/config")))
    # Then dims are the whole shape, on CPU instances
    assert (cfg["max_batch_size"], cfg["input"][0]["dims"], cfg["instance_group"][0]["kind"]) == (0, [-1, 4],
                                                                                                   "KIND_CPU")


def test_a_batch_only_output_has_dims_1_and_an_empty_reshape_as_triton_wants() -> None:
    from tierserve.manifest import ModelVersion, TensorSpec
    from tierserve.protocol.model_config import model_config

    # Given a batched classifier whose label output is [batch] only
    mv = ModelVersion("clf", "1", (TensorSpec("x", "FP32", (-1, 4)),),
                      (TensorSpec("label", "INT64", (-1,)), TensorSpec("p", "FP32", (-1, 3))), {}, "fp32",
                      max_batch_size=8)
    # When its Triton config is built
    label, p = model_config(mv)["output"]
    # Then the label has one dim reshaped away (the config.pbtxt the compiler writes says the same), p none
    assert (label["dims"], label["reshape"]) == ([1], {"shape": []})
    assert p["dims"] == [3] and "reshape" not in p


def _stats_of(path: str) -> list[dict]:
    resp = handle_http(get_event(path))
    assert resp["statusCode"] == 200, decode_body(resp)
    return body_of(resp)["model_stats"]


def test_stats_count_this_runtimes_requests_in_tritons_format(rig: Rig) -> None:
    # Given two answered requests (1 and 4 rows) and one refused (wrong input name) for model 'both'
    for body in (json_body(rows_of(1)), json_body(rows_of(4)), json_body(rows_of(1), name="nope")):
        handle_http(infer_event("both", body))
    # When its statistics are asked
    (stats,) = _stats_of("/v2/models/both/stats")
    # Then they are Triton's: successes, failures, inferences (rows) and executions (requests), per batch size
    inf = stats["inference_stats"]
    assert (stats["name"], stats["version"]) == ("both", "1")
    assert (inf["success"]["count"], inf["fail"]["count"]) == (2, 1)
    assert (stats["inference_count"], stats["execution_count"]) == (5, 2)
    assert [b["batch_size"] for b in stats["batch_stats"]] == [1, 4]
    assert all(inf[p]["count"] == 2 and inf[p]["ns"] > 0 for p in ("compute_input", "compute_infer",
                                                                   "compute_output"))
    assert inf["success"]["ns"] >= inf["compute_infer"]["ns"] and stats["last_inference"] > 0
    # And the versioned route answers the same version alone
    assert [s["version"] for s in _stats_of("/v2/models/both/versions/1/stats")] == ["1"]


def test_all_stats_list_every_model_and_are_never_read_as_a_model_named_stats(rig: Rig) -> None:
    # When the server-wide statistics are asked
    stats = _stats_of("/v2/models/stats")
    # Then every model version is listed, with zero counters for ones never called
    assert [(s["name"], s["version"], s["execution_count"]) for s in stats] == [("both", "1", 0),
                                                                               ("gpuonly", "1", 0)]
    # And another method on that route is a 405, not "unknown model 'stats'"
    event = get_event("/v2/models/stats")
    event["requestContext"]["http"]["method"] = "POST"
    resp = handle_http(event)
    assert (resp["statusCode"], body_of(resp)["code"]) == (405, "method_not_allowed")


def test_counters_belong_to_the_runtime_not_the_module(rig: Rig, tmp_path: Path) -> None:
    # Given a request counted by the installed runtime
    handle_http(infer_event("both", json_body(rows_of(1))))
    # When a fresh runtime is built from the same settings (a new execution environment)
    settings = Settings(model_store_uri=str(tmp_path / "store"), model_cache_dir=str(tmp_path / "cache"))
    fresh = build_runtime(settings, cpu=FakeBackend("cpu"))
    # Then it starts from zero, while the first keeps its count
    resp = handle_http(get_event("/v2/models/both/stats"), runtime=fresh)
    assert body_of(resp)["model_stats"][0]["execution_count"] == 0
    assert _stats_of("/v2/models/both/stats")[0]["execution_count"] == 1


def _index(body: str = "", runtime=None) -> dict:
    event = http_event("POST", "/v2/repository/index", "POST /v2/repository/index", "")
    event["body"] = body
    return handle_http(event, runtime=runtime)


def test_repository_index_lists_every_version_with_its_state(rig: Rig, tmp_path: Path) -> None:
    # When the index is asked of a runtime with a GPU tier
    resp = _index()
    # Then every model version is READY
    assert (resp["statusCode"], body_of(resp)) == (200, [{"name": "both", "version": "1", "state": "READY"},
                                                         {"name": "gpuonly", "version": "1", "state": "READY"}])
    # Given a runtime without a GPU tier and a broken manifest entry
    store_dir = tmp_path / "store"
    manifest = json.loads((store_dir / "manifest.json").read_text())
    manifest["models"]["broken"] = {"versions": {"1": {"inputs": "nonsense"}}}
    (store_dir / "manifest.json").write_text(json.dumps(manifest))
    cpu_only = build_runtime(Settings(model_store_uri=str(store_dir), model_cache_dir=str(tmp_path / "c2")),
                             cpu=FakeBackend("cpu"))
    # When the index is asked, and then only the ready ones
    index = {e["name"]: e for e in body_of(_index(runtime=cpu_only))}
    ready = body_of(_index('{"ready": true}', runtime=cpu_only))
    # Then the GPU-only model and the broken entry are UNAVAILABLE, saying why; ready=true leaves them out
    assert index["both"]["state"] == "READY"
    assert index["gpuonly"]["state"] == "UNAVAILABLE" and "no GPU tier" in index["gpuonly"]["reason"]
    assert index["broken"]["state"] == "UNAVAILABLE" and "invalid manifest entry" in index["broken"]["reason"]
    assert [e["name"] for e in ready] == ["both"]
    # And a body that is not the protocol's is a 400
    assert _index('{"ready": "yes"}')["statusCode"] == 400 and _index("[1")["statusCode"] == 400


# --- the order of checks, content codings ---------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    {"body": "{not json", "headers": {}},
    {"body": "{}", "headers": {"inference-header-content-length": "many"}},
    {"body": "abc", "headers": {}, "isBase64Encoded": True},
    {"body": "abc", "headers": {"content-encoding": "br"}},
], ids=["not-json", "bad-header-length", "bad-base64", "unknown-coding"])
def test_an_unknown_model_is_a_404_before_its_body_is_looked_at(rig: Rig, bad: dict) -> None:
    # Given a request for a model that does not exist, whose body is wrong in some way
    event = infer_event("nope", bad["body"].encode(), bad["headers"])
    event["isBase64Encoded"] = bad.get("isBase64Encoded", False)
    # When it is served
    resp = handle_http(event)
    # Then it is a 404 naming the model
    assert (resp["statusCode"], body_of(resp)["code"]) == (404, "model_not_found")


@pytest.mark.parametrize("coding", ["gzip", "deflate", "deflate-raw", "gzip, identity"])
def test_a_compressed_request_body_is_decoded(rig: Rig, coding: str) -> None:
    import gzip
    import zlib

    # Given a JSON request compressed as the client says
    raw = json_body(rows_of(3), "z-1")
    data = {"gzip": gzip.compress, "deflate": zlib.compress, "gzip, identity": gzip.compress,
            "deflate-raw": lambda b: zlib.compress(b)[2:-4]}[coding](raw)
    header = "deflate" if coding == "deflate-raw" else coding
    # When it arrives base64-encoded (a compressed body is binary to API Gateway)
    resp = handle_http(infer_event("both", data, {"content-encoding": header}, binary=True))
    # Then it is served as if it came plain, and the CPU tier gets the plain body
    assert resp["statusCode"] == 200, decode_body(resp)
    assert body_of(resp)["id"] == "z-1" and body_of(resp)["outputs"][0]["shape"] == [3, 3]
    assert bytes(rig.cpu.calls[0].call.body().data) == raw


def test_a_decompression_bomb_is_a_413_without_inflating_it(rig: Rig) -> None:
    import gzip

    # Given a 16 KB gzip body that inflates to 16 MB (the limit is 4 MiB)
    bomb = gzip.compress(b"0" * (16 << 20), 9)
    assert len(bomb) < 64 << 10
    # When it is served
    resp = handle_http(infer_event("both", bomb, {"content-encoding": "gzip"}, binary=True))
    # Then it is a 413 that says what happened, and no tier was called
    assert (resp["statusCode"], body_of(resp)["code"]) == (413, "payload_too_large")
    assert "inflates to more than" in body_of(resp)["error"]
    assert rig.cpu.calls == [] and rig.gpu.calls == []


@pytest.mark.parametrize(("coding", "data", "status"), [
    ("br", b"whatever", 415),
    ("gzip", b"not gzip at all", 400),
    ("gzip", "truncated", 400),
], ids=["unknown-coding", "corrupt", "truncated"])
def test_a_body_that_does_not_decode_is_the_clients_error(rig: Rig, coding: str, data, status: int) -> None:
    import gzip

    if data == "truncated":
        data = gzip.compress(json_body(rows_of(2)))[:-12]
    resp = handle_http(infer_event("both", data, {"content-encoding": coding}, binary=True))
    assert resp["statusCode"] == status and body_of(resp)["error"]


@pytest.mark.parametrize(("accept", "coding"), [
    ("gzip", "gzip"), ("deflate", "deflate"), ("gzip;q=0.2, deflate;q=0.8", "deflate"), ("*", "gzip"),
    ("gzip;q=0, identity", None), ("br", None), (None, None),
])
def test_accept_encoding_is_honoured(rig: Rig, accept: str | None, coding: str | None) -> None:
    import zlib

    # When a request says which codings it accepts
    headers = {"accept-encoding": accept} if accept else {}
    resp = handle_http(infer_event("both", json_body(rows_of(2), "acc"), headers))
    # Then the answer is in the best one it accepts (or plain), and decodes to the same outputs
    assert resp["statusCode"] == 200 and resp["headers"].get("content-encoding") == coding
    raw = decode_body(resp)
    if coding is not None:
        raw = zlib.decompress(raw, 16 + zlib.MAX_WBITS if coding == "gzip" else zlib.MAX_WBITS)
    assert json.loads(raw)["id"] == "acc"


@pytest.mark.parametrize("path", ["/v2", "/v2/health/ready", "/v2/models/both", "/v2/models/both/config",
                                  "/v2/models/stats", "/v2/models/both/stats", "/v2/repository/index"])
def test_only_inference_answers_are_compressed_as_triton_does(rig: Rig, path: str) -> None:
    # Given a client that accepts gzip (aiohttp, under tritonclient.http.aio, always says so)
    method = "POST" if path.endswith("/index") else "GET"
    resp = handle_http(http_event(method, path, f"{method} {path}", "", {}, {"accept-encoding": "gzip, deflate"}))
    # Then everything but an inference answers plain JSON, as Triton compresses only inference responses
    # (its HTTP server picks a response coding in CreateInferRequest and the generate handler, nowhere else)
    assert resp["statusCode"] == 200 and "content-encoding" not in resp["headers"], resp["headers"]
    assert isinstance(body_of(resp), (dict, list))


@contextlib.contextmanager
def served_over_http(where: str, store: Path, tmp_path: Path) -> Iterator[str]:
    """host:port of a real HTTP server in-process: the edge runtime's (api.handle_request) or the local
    API gateway's (api.handle_http behind API Gateway's emulation), over ``store``."""
    from tests.support.edge import synced_edge

    if where == "edge":
        with synced_edge(1 << 20, store_uri=str(store), cache_dir=str(tmp_path / "edge-cache"), port=0,
                         grpc_port=-1) as edge:
            yield edge.url.removeprefix("http://")
        return
    from tierserve_tools.apigw import ApiGatewayServer

    rt = build_runtime(Settings(model_store_uri=str(store), model_cache_dir=str(tmp_path / "gw-cache")))
    gw = ApiGatewayServer(lambda event, ctx: handle_http(event, ctx, runtime=rt), lambda: None).start()
    try:
        yield gw.url.removeprefix("http://")
    finally:
        gw.stop()


@pytest.mark.parametrize("where", ["edge", "gateway"])
def test_tritonclient_aio_reads_every_document_and_infers_against_a_real_http_server(
        runtime_env: pytest.MonkeyPatch, tmp_path: Path, where: str) -> None:
    import asyncio

    import tritonclient.http as httpclient
    import tritonclient.http.aio as aioclient

    from tests.support.edge import write_edge_store

    # Given a real HTTP server (in-process) serving the API over a real store: the edge's, or the gateway's
    store = write_edge_store(tmp_path / "store")

    async def session(url: str) -> tuple[dict, dict, list, dict, np.ndarray]:
        # tritonclient.http.aio turns aiohttp's decompression off, while aiohttp sends Accept-Encoding: gzip
        async with aioclient.InferenceServerClient(url) as client:
            metadata = await client.get_server_metadata()
            config = await client.get_model_config("lin")
            index = await client.get_model_repository_index()
            stats = await client.get_inference_statistics("lin")
            x = httpclient.InferInput("x", [2, 4], "FP32")
            x.set_data_from_numpy(rows_of(2))
            result = await client.infer("lin", [x])
            return metadata, config, index, stats, result.as_numpy("y")

    with served_over_http(where, store, tmp_path) as url:
        metadata, config, index, stats, y = asyncio.run(session(url))
    # Then each document is read, and the inference (compressed, which the client decodes itself) too
    assert metadata["name"] == "tierserve" and config["name"] == "lin"
    assert {"name": "lin", "version": "1"}.items() <= next(m for m in index if m["name"] == "lin").items()
    assert stats["model_stats"][0]["name"] == "lin"
    assert y.shape == (2, 3)


def test_errors_are_never_compressed(rig: Rig) -> None:
    resp = handle_http(infer_event("both", b"{bad", {"accept-encoding": "gzip"}))
    assert resp["statusCode"] == 400 and "content-encoding" not in resp["headers"]
    assert body_of(resp)["code"] == "invalid_request"


def test_template_routes_and_endpoints_are_in_step() -> None:
    from tierserve.api import ENDPOINTS
    from tierserve_tools.sam import load_template

    # Given RouterFunction's HttpApi events in template.yaml (API Gateway's routes)
    root = Path(__file__).resolve().parents[3]
    events = load_template(root / "template.yaml")["Resources"]["RouterFunction"]["Properties"]["Events"]
    routes = {(e["Properties"]["Method"], e["Properties"]["Path"]) for e in events.values() if e["Type"] == "HttpApi"}
    # the streaming REST API's routes (issue 17: the OpenAI routes and the generate extension), also RouterFunction's
    streaming = load_template(root / "template.yaml")["Resources"]["StreamingApi"]["Properties"]["DefinitionBody"]
    routes |= {(method.upper(), path.replace("{model}", "{name}")) for path, item in streaming["paths"].items()
               for method in item}

    def served(method: str, path: str) -> bool:
        return any(m == method and p.fullmatch(path) for m, p, _ in ENDPOINTS)

    # Then every route reaches an endpoint (with its path parameters filled in)...
    for method, path in routes:
        assert served(method, path.replace("{name}", "m").replace("{version}", "1")), (method, path)
    # ...and every endpoint has a route, or API Gateway would answer 404 before the router sees it
    for method, pattern, op in ENDPOINTS:
        assert any(m == method and pattern.fullmatch(p.replace("{name}", "m").replace("{version}", "1"))
                   for m, p in routes), f"no HttpApi event in template.yaml for {method} {pattern.pattern} ({op})"


# --- a response must fit a Lambda reply (issue 8, defect 3) ---------------------------------------------------


@pytest.fixture
def wide_out(runtime_env: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Rig]:
    """'emb' (x FP32 [-1, 4] -> e FP32 [-1, 100000]) on both tiers, GPU up; and 'blob' (x -> BYTES [-1])."""
    from tests.support.models import write_model

    store_dir = tmp_path / "store"
    write_model(store_dir, "emb", "1", b"never loaded", (TensorSpec("x", "FP32", (-1, 4)),),
                (TensorSpec("e", "FP32", (-1, 100000)),), targets=("gpu", "cpu"), max_batch_size=64,
                routing={"gpu_min_rows": 1})
    write_model(store_dir, "blob", "1", b"never loaded", (TensorSpec("x", "FP32", (-1, 4)),),
                (TensorSpec("s", "BYTES", (-1,)),), targets=("cpu",))
    settings = Settings(model_store_uri=str(store_dir), model_cache_dir=str(tmp_path / "cache"))
    rig = Rig(FakeBackend("cpu"), FakeBackend("gpu"))
    set_runtime(build_runtime(settings, cpu=rig.cpu, gpu=rig.gpu, store=ModelStore(str(store_dir), tmp_path / "c")))
    yield rig
    metrics.clear_metrics()


@pytest.mark.parametrize("target", ["gpu", "cpu"])
def test_a_response_that_cannot_fit_a_lambda_reply_is_a_413_before_any_inference(wide_out: Rig, target: str) -> None:
    # Given 16 rows asking for 100,000 floats each as JSON (about 32 MB), on either tier
    resp = handle_http(infer_event("emb", json_body(rows_of(16)), {"x-target": target}))
    # Then it is a 413 that says how big, what the limit is and what would fit, and no tier ran it
    assert resp["statusCode"] == 413
    message = body_of(resp)["error"]
    assert "would be about 30.5 MB (JSON), more than a Lambda response can carry (6.0 MB)" in message
    assert "binary outputs (parameters.binary_data_output: true; about 6.1 MB: at most 11 rows fit)" in message
    assert "at most 3 rows per request as asked" in message and "batch inference" in message
    assert (wide_out.cpu.calls, wide_out.gpu.calls) == ([], [])


def test_binary_outputs_that_fit_are_served_on_either_tier(wide_out: Rig) -> None:
    # Given 8 rows asking for binary outputs (3.2 MB: 4.3 MB once base64), on the GPU and then on the CPU
    for target in ("gpu", "cpu"):
        resp = handle_http(infer_event("emb", json_body(rows_of(8), parameters={"binary_data_output": True}),
                                       {"x-target": target}))
        # Then each is served, as binary data that fits a Lambda reply
        assert (resp["statusCode"], resp["headers"]["x-served-by"], resp["isBase64Encoded"]) == (200, target, True)
        assert len(resp["body"]) <= 6 * 1024 * 1024
        metrics.clear_metrics()


def test_a_response_larger_than_predicted_is_still_a_413_never_a_failed_reply(wide_out: Rig) -> None:
    # Given a CPU tier whose BYTES output is far longer than the prediction's short strings: 10 rows of 1 MB
    big = np.empty(10, dtype=object)
    big[:] = [b"x" * (1 << 20)] * 10
    from tierserve.protocol.messages import InferResponse

    wide_out.cpu.reply = Reply(InferResponse("blob", "1", [tensor_from_numpy("s", big)]))
    # When it is asked for
    resp = handle_http(infer_event("blob", json_body(rows_of(10))))
    # Then the answer is a 413 that says how large the response came out, not a reply Lambda would drop
    assert resp["statusCode"] == 413
    assert "the response is 10.0 MB, more than a Lambda response can carry" in body_of(resp)["error"]


@pytest.mark.parametrize(("rows", "tier"), [(24, "cpu"), (40, "gpu")])
def test_the_same_request_goes_to_the_same_tier_in_json_and_binary(runtime_env: pytest.MonkeyPatch, tmp_path: Path,
                                                                   rows: int, tier: str) -> None:
    # Given a model on both tiers that goes to the GPU from 512 bytes of tensor data (16 rows x 4 FP32 x 4 bytes
    # is 256; 24 rows is 384, 40 rows 640), never by rows
    write_linear(tmp_path / "s", "sized", targets=("gpu", "cpu"), max_batch_size=64,
                 routing={"gpu_min_rows": 10_000, "gpu_min_bytes": 512})
    cpu, gpu = FakeBackend("cpu"), FakeBackend("gpu")
    set_runtime(build_runtime(Settings(model_store_uri=str(tmp_path / "s"), model_cache_dir=str(tmp_path / "c")),
                              cpu=cpu, gpu=gpu))
    x = rows_of(rows)
    json_text = json_body(x)
    binary, header_length = encode_request(InferRequest([tensor_from_numpy("x", x)]), binary=True)
    # (the JSON body is several times the binary one, and both are over 512 bytes)
    assert len(json_text) > 2 * len(binary) > 512
    # When it is sent as JSON and as binary tensors
    served = [handle_http(infer_event("sized", json_text))["headers"]["x-served-by"],
              handle_http(infer_event("sized", binary, {"inference-header-content-length": str(header_length)},
                                      binary=True))["headers"]["x-served-by"]]
    # Then both go to the tier that the tensor bytes, not the body's length, pick
    assert served == [tier, tier]


# --- hostile input is the client's error, never a 500 (issue 16, defect 11) -----------------------------------

X4 = {"name": "x", "datatype": "FP32", "shape": [4, 4], "data": [1.0] * 16}
#: Bodies that JSON can spell but no tier can take or echo back (json.dumps writes "\udfff" as an escape).
HOSTILE = {
    "fp32-integer-past-float64": json.dumps({"inputs": [{**X4, "data": [10**400] + [1] * 15}]}),
    "id-lone-surrogate": json.dumps({"id": "\udfff", "inputs": [X4]}),
    "parameter-lone-surrogate": json.dumps({"parameters": {"note": "\udfff"}, "inputs": [X4]}),
    "parameter-integer-past-64-bits": json.dumps({"parameters": {"n": 10**400}, "inputs": [X4]}),
}


@pytest.mark.parametrize("body", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_numbers_and_strings_are_a_400_through_the_router_and_the_real_cpu_function(
        runtime_env: pytest.MonkeyPatch, tmp_path: Path, body: str) -> None:
    from tests.support.fakes import FakeLambdaClient
    from tierserve.backends.lambda_invoke import LambdaInvokeBackend
    from tierserve.direct import handle_direct

    # Given the router reaching the REAL CPU function by Invoke, for a model that takes 2 rows per call
    # (a 4-row request is split, and each part re-encoded with the request's id and parameters)
    store_dir = tmp_path / "store"
    write_linear(store_dir, "lin", max_batch_size=2)
    cpu_function = build_runtime(Settings(model_store_uri=str(store_dir), model_cache_dir=str(tmp_path / "c")))
    client = FakeLambdaClient(reply=lambda payload: handle_direct(payload, None, cpu_function))
    set_runtime(build_runtime(Settings(model_store_uri=str(store_dir), model_cache_dir=str(tmp_path / "r"),
                                       cpu_backend="lambda", cpu_function_name="cpu"),
                              cpu=LambdaInvokeBackend("cpu", client=client)))
    # When a request holds a number or a string that no tier can take or echo back
    resp = handle_http(infer_event("lin", body.encode()))
    # Then it is the client's error, saying what was wrong
    assert (resp["statusCode"], body_of(resp)["code"]) == (400, "invalid_request"), body_of(resp)


def test_a_request_id_that_is_not_unicode_is_refused_before_any_inference(rig: Rig) -> None:
    # When a request's id holds a lone surrogate (JSON can spell it; no JSON writer can write it back)
    resp = handle_http(infer_event("both", HOSTILE["id-lone-surrogate"].encode()))
    # Then it is a 400 that says so, and no tier ran the inference
    assert (resp["statusCode"], body_of(resp)["code"]) == (400, "invalid_request")
    assert "'id' is not valid Unicode" in body_of(resp)["error"]
    assert (rig.cpu.calls, rig.gpu.calls) == ([], [])
