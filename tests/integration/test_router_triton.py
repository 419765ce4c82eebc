"""Issue 4 acceptance, router side: RouterFunction's handler in this process against a REAL
local tritonserver (tierserve.local.triton.TritonServer), with the CPU tier in-process.

Models, built here: ``lin`` (GPU with a CPU fallback, gpu_min_rows 8) and ``lin-gpu`` (GPU only),
the same seeded y = x @ W + b ONNX graph, a manifest written through tierserve.manifest and a
production Triton repository (onnxruntime_onnx config.pbtxt) converted for the local server.
Breaker values are small and come from the settings' environment variables.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from tests.support.models import linear_onnx, write_model
from tierserve.local.apigw import http_api_event
from tierserve.manifest import TensorSpec

pytestmark = pytest.mark.integration

X = (TensorSpec("x", "FP32", (-1, 4)),)
Y = (TensorSpec("y", "FP32", (-1, 3)),)
COOLDOWN_S = 2.0
SEED = 11


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tierserve_compiler.triton import write_triton_repo

    root = tmp_path_factory.mktemp("router-triton-models")
    data, w, b = linear_onnx(seed=SEED)
    for name, targets in (("lin", ("gpu", "cpu")), ("lin-gpu", ("gpu",))):
        write_model(root, name, "1", data, X, Y, targets=targets, max_batch_size=16,
                    routing={"gpu_min_rows": 8, "gpu_min_bytes": 1 << 30})
        write_triton_repo(root, name, "1", root / name / "1" / "model.onnx", list(X), list(Y), 16,
                          tensorrt_fp16=False, warmup=False)
    return root, w, b


@pytest.fixture(scope="module")
def triton(models, tmp_path_factory):
    from tierserve.local.triton import TritonServer, build_local_repository, pytriton_available

    if not pytriton_available():
        pytest.skip("nvidia-pytriton wheel not installed: no local tritonserver")
    root, _, _ = models
    repo = build_local_repository(root / "triton", tmp_path_factory.mktemp("router-triton-repo"))
    server = TritonServer(repo, log_path=tmp_path_factory.mktemp("router-triton-log") / "server.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def router(models, triton, monkeypatch, tmp_path):
    """RouterFunction's environment in this process: in-process CPU tier, the real Triton."""
    from tierserve.api import get_app, reset_app
    from tierserve.settings import reset_settings

    root, w, b = models
    env = {"MODEL_STORE_URI": str(root), "MODEL_CACHE_DIR": str(tmp_path / "cache"), "CPU_BACKEND": "inprocess",
           "TRITON_URL": triton.http_url, "TRITON_TIMEOUT_S": "2", "HEALTH_TTL_S": "0.2",
           "BREAKER_FAILURE_THRESHOLD": "2", "BREAKER_COOLDOWN_S": str(COOLDOWN_S),
           "BREAKER_SUCCESS_THRESHOLD": "1", "POWERTOOLS_TRACE_DISABLED": "true", "POWERTOOLS_LOG_LEVEL": "WARNING"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    reset_settings()
    reset_app()
    if not triton.is_running():
        triton.start()
    yield get_app, (w, b)
    reset_settings()
    reset_app()


def call(model: str, rows: int, headers: dict | None = None, seed: int = 0):
    """POST /v2/models/{model}/infer through RouterFunction's handler with a real HTTP API v2 event."""
    from tierserve.handlers.router import lambda_handler
    from tierserve.local.emulation import LocalContext

    x = np.random.default_rng(seed).standard_normal((rows, 4)).astype(np.float32)
    body = json.dumps({"inputs": [{"name": "x", "shape": [rows, 4], "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    hdrs = [("Content-Type", "application/json"), *((headers or {}).items())]
    event = http_api_event("POST", f"/v2/models/{model}/infer", hdrs, body)
    resp = lambda_handler(event, LocalContext("RouterFunction", 1024, 30))
    return resp["statusCode"], resp["headers"], json.loads(resp["body"]), x


def check(weights, body, x) -> None:
    w, b = weights
    y = np.asarray(body["outputs"][0]["data"], np.float32).reshape(len(x), 3)
    np.testing.assert_allclose(y, x @ w + b, rtol=1e-4, atol=1e-5)


def test_routing_by_batch_size(router) -> None:
    _, weights = router
    # Given 'lin' on both tiers with gpu_min_rows 8
    # When a 1-row, a 7-row, an 8-row and a 40-row (> max_batch_size 16: split by the backend) request arrive
    served = {}
    for rows in (1, 7, 8, 40):
        status, headers, body, x = call("lin", rows, seed=rows)
        assert status == 200, body
        check(weights, body, x)
        served[rows] = (headers["x-served-by"], headers.get("x-fallback"))
    # Then the threshold splits them between the tiers, with no fallbacks
    assert served == {1: ("cpu", None), 7: ("cpu", None), 8: ("gpu", None), 40: ("gpu", None)}


def test_x_target_hint(router) -> None:
    _, weights = router
    status, headers, body, x = call("lin", 1, {"x-target": "gpu"})
    assert (status, headers["x-served-by"]) == (200, "gpu")
    check(weights, body, x)
    status, headers, _, _ = call("lin", 32, {"x-target": "cpu"})
    assert (status, headers["x-served-by"]) == (200, "cpu")
    status, _, body, _ = call("lin-gpu", 1, {"x-target": "cpu"})
    assert status == 400 and "not deployed on cpu" in body["error"]
    status, _, body, _ = call("lin", 1, {"x-target": "tpu"})
    assert status == 400 and "'cpu' or 'gpu'" in body["error"]


def test_killed_triton_opens_the_circuit_fast_503_then_recovers_after_restart(router, triton) -> None:
    get_app, weights = router
    # Given Triton serving large batches
    assert call("lin", 32)[1]["x-served-by"] == "gpu"
    assert get_app().router.breaker.state == "closed"
    # When Triton is killed (SIGKILL: a crash)
    triton.kill()
    # Then every request is still answered, from the CPU copy, flagged as a fallback...
    for i in range(4):
        status, headers, body, x = call("lin", 32, seed=100 + i)
        assert status == 200 and headers["x-served-by"] == "cpu" and headers["x-fallback"] == "gpu-unavailable"
        check(weights, body, x)
        time.sleep(0.25)  # past the health TTL: each probe sees the dead server
    # ...and the circuit is open
    assert get_app().router.breaker.state == "open"
    # And a GPU-only model gets 503 + Retry-After, fast: p99 under 100 ms over 50 requests
    latencies = []
    for _ in range(50):
        t0 = time.perf_counter()
        status, headers, body, _ = call("lin-gpu", 2)
        latencies.append((time.perf_counter() - t0) * 1000)
        assert status == 503 and 1 <= int(headers["retry-after"]) <= COOLDOWN_S + 1
    assert "GPU tier only" in body["error"]
    p99 = float(np.percentile(latencies, 99))
    assert p99 < 100, f"503 p99 {p99:.1f} ms"
    # When Triton restarts (same ports)
    triton.start()
    restarted = time.monotonic()
    # Then the GPU serves again within the cool-down (plus the health TTL and one probe)
    while True:
        status, headers, body, x = call("lin", 32, seed=7)
        if headers["x-served-by"] == "gpu":
            break
        assert headers["x-fallback"] == "gpu-unavailable"
        assert time.monotonic() - restarted < COOLDOWN_S + 1.0, "GPU tier not back within the cool-down"
        time.sleep(0.05)
    check(weights, body, x)
    assert get_app().router.breaker.state == "closed"
    status, headers, body, x = call("lin-gpu", 3)
    assert (status, headers["x-served-by"]) == (200, "gpu")
    check(weights, body, x)


def test_grpc_protocol_to_triton(router, triton, monkeypatch) -> None:
    from tierserve.api import reset_app
    from tierserve.settings import reset_settings

    _, weights = router
    monkeypatch.setenv("TRITON_URL", triton.grpc_url)
    monkeypatch.setenv("TRITON_PROTOCOL", "grpc")
    reset_settings()
    reset_app()
    status, headers, body, x = call("lin", 24, seed=3)
    assert (status, headers["x-served-by"]) == (200, "gpu")
    check(weights, body, x)
