"""The router over `tierserve serve`'s whole local stack and the real Triton: the one integration
file for the router's tier behaviour (the CPU tier is the CpuInferenceFunction worker, reached by
boto3 Invoke; the GPU tier is the real local tritonserver).

Routing by batch size, the x-target hint, the circuit opening after Triton is killed with CPU
fallback, a fast 503 for a GPU-only model, recovery after Triton restarts, and the binary tensor
extension through an unchanged tritonclient.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.support.models import linear_onnx, write_model
from tierserve.manifest import TensorSpec

pytestmark = pytest.mark.integration
pytest.importorskip("pytriton", reason="the nvidia-pytriton wheel provides the local tritonserver")

X = (TensorSpec("x", "FP32", (-1, 4)),)
Y = (TensorSpec("y", "FP32", (-1, 3)),)
COOLDOWN_S = 3.0
#: The Triton supervisor's restart backoff: the first delay, and the most it doubles to.
BACKOFF_S = (0.5, 4.0)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Two models on the real stack: 'lin' on GPU with CPU fallback, 'lin-gpu' on the GPU only."""
    from tierserve_compiler.triton import write_triton_repo
    from tierserve_tools.serve import LocalStack

    root = tmp_path_factory.mktemp("models")
    data, w, b = linear_onnx(seed=7)
    for name, targets in (("lin", ("gpu", "cpu")), ("lin-gpu", ("gpu",))):
        write_model(root, name, "1", data, X, Y, targets=targets, max_batch_size=16,
                    routing={"gpu_min_rows": 8, "gpu_min_bytes": 1 << 30})
        write_triton_repo(root, name, "1", root / name / "1" / "model.onnx", list(X), list(Y), 16,
                          tensorrt_fp16=False, warmup=False)
    overrides = {"RouterFunction": {"BREAKER_FAILURE_THRESHOLD": "2", "BREAKER_COOLDOWN_S": str(COOLDOWN_S),
                                    "BREAKER_SUCCESS_THRESHOLD": "1", "HEALTH_TTL_S": "0.2",
                                    "TRITON_TIMEOUT_S": "2"}}
    with LocalStack(root, port=0, batch=False, workdir=tmp_path_factory.mktemp("serve"),
                    env_overrides=overrides, triton_restart_backoff_s=BACKOFF_S) as s:
        s.weights = (w, b)
        yield s


def _infer(stack, model: str, rows: int, headers: dict | None = None, seed: int = 0):
    x = np.random.default_rng(seed).standard_normal((rows, 4)).astype(np.float32)
    body = json.dumps({"inputs": [{"name": "x", "shape": [rows, 4], "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    req = urllib.request.Request(f"{stack.url}/v2/models/{model}/infer", data=body, method="POST",
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read()), x
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read()), x


def _check_values(stack, body, x):
    w, b = stack.weights
    y = np.asarray(body["outputs"][0]["data"], dtype=np.float32).reshape(len(x), 3)
    np.testing.assert_allclose(y, x @ w + b, rtol=1e-4, atol=1e-5)


def _wait_served_by(stack, tier: str, deadline_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < deadline_s:
        status, headers, _, _ = _infer(stack, "lin", 32)
        if status == 200 and headers.get("x-served-by") == tier and "x-fallback" not in headers:
            return time.monotonic() - start
        time.sleep(0.2)
    raise AssertionError(f"not served by {tier} within {deadline_s} s")


def test_small_batches_go_to_cpu_and_large_batches_to_the_gpu(stack):
    # Given a model on both tiers with gpu_min_rows 8
    # When 1, 7, 8 and 40 rows arrive (40 > max_batch_size 16: the GPU backend splits it)
    served = {}
    for rows in (1, 7, 8, 40):
        status, headers, body, x = _infer(stack, "lin", rows, seed=rows)
        assert status == 200, body
        _check_values(stack, body, x)
        served[rows] = (headers["x-served-by"], headers.get("x-fallback"))
    # Then the threshold splits them between the CPU function and Triton, with no fallbacks
    assert served == {1: ("cpu", None), 7: ("cpu", None), 8: ("gpu", None), 40: ("gpu", None)}


def test_the_x_target_hint_overrides_the_size_rule(stack):
    status, headers, body, x = _infer(stack, "lin", 2, {"x-target": "gpu"})
    assert status == 200 and headers["x-served-by"] == "gpu"
    _check_values(stack, body, x)
    status, headers, _, _ = _infer(stack, "lin", 32, {"x-target": "cpu"})
    assert status == 200 and headers["x-served-by"] == "cpu"
    status, _, body, _ = _infer(stack, "lin-gpu", 2, {"x-target": "cpu"})
    assert status == 400 and "not deployed on cpu" in body["error"]
    status, _, body, _ = _infer(stack, "lin", 1, {"x-target": "tpu"})
    assert status == 400 and "'cpu' or 'gpu'" in body["error"]


def test_binary_tensor_extension_through_an_unchanged_tritonclient(stack):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(stack.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("lin")
    meta = client.get_model_metadata("lin")
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    x = np.random.default_rng(3).standard_normal((32, 4)).astype(np.float32)
    w, b = stack.weights
    for binary in (False, True):
        inp = httpclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = httpclient.InferRequestedOutput("y", binary_data=binary)
        result = client.infer("lin", [inp], outputs=[out], request_id=f"bin-{binary}")
        np.testing.assert_allclose(result.as_numpy("y"), x @ w + b, rtol=1e-4, atol=1e-5)
        assert result.get_response()["id"] == f"bin-{binary}"
        has_size = "binary_data_size" in result.get_response()["outputs"][0].get("parameters", {})
        assert has_size == binary
    client.close()


def test_killed_triton_opens_the_circuit_falls_back_and_recovers_after_restart(stack):
    from tierserve.app import get_runtime  # the router runs in this process

    # Given Triton serving large batches
    _wait_served_by(stack, "gpu", 10)
    assert get_runtime().dispatcher.state()["gpu"] == "closed"
    # When Triton is killed (SIGKILL: a crash)
    stack.triton.kill()
    # Then every request is still answered, from the CPU copy, flagged as a fallback...
    for i in range(4):
        status, headers, body, x = _infer(stack, "lin", 32, seed=10 + i)
        assert status == 200 and headers["x-served-by"] == "cpu"
        assert headers["x-fallback"] == "gpu-unavailable"
        _check_values(stack, body, x)
        time.sleep(0.25)  # past the health TTL: each probe sees the dead server
    # ...and the circuit is open
    assert get_runtime().dispatcher.state()["gpu"] == "open"
    # And a GPU-only model gets a 503 with Retry-After, not a hang or a 500: without waiting for the GPU
    # timeout (2 s) even once (the worst of 20, generously bounded for a shared CI machine)
    slowest = 0.0
    for _ in range(20):
        t0 = time.monotonic()
        status, headers, body, _ = _infer(stack, "lin-gpu", 2)
        slowest = max(slowest, time.monotonic() - t0)
        assert status == 503 and 1 <= int(headers["retry-after"]) <= COOLDOWN_S + 1
    assert "GPU tier only" in body["error"]
    assert slowest < 1.0, f"a 503 took {slowest:.2f} s"
    # When Triton comes back
    stack.triton.restart()
    status, headers, _, _ = _infer(stack, "lin", 32)
    # Then every request is still answered: by the CPU until the cool-down ends (no wasted GPU attempts)...
    assert status == 200 and (headers["x-served-by"] == "gpu" or headers["x-fallback"] == "gpu-unavailable")
    # ...and the GPU serves again within the cool-down plus the health TTL
    waited = _wait_served_by(stack, "gpu", COOLDOWN_S + 10)
    assert waited <= COOLDOWN_S + 10
    assert get_runtime().dispatcher.state()["gpu"] == "closed"
    status, headers, body, x = _infer(stack, "lin-gpu", 2)
    assert status == 200 and headers["x-served-by"] == "gpu"
    _check_values(stack, body, x)


def _stubs(pgid: int) -> set[int]:
    """The live (not zombie) triton_python_backend_stub processes of process group ``pgid``, from /proc."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
        if b"triton_python_backend_stub" in cmdline and fields[0] != "Z" and int(fields[2]) == pgid:
            found.add(int(entry.name))
    return found


def _ready(stack) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"{stack.url}/v2/health/ready", timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_a_tritonserver_killed_from_outside_leaves_no_stub_and_is_restarted(stack):
    # Given Triton serving large batches, with its Python-backend stubs (one per model instance)
    _wait_served_by(stack, "gpu", COOLDOWN_S + 10)
    pid = stack.triton.pid
    stubs = _stubs(pid)
    assert stubs, "no triton_python_backend_stub in tritonserver's process group"
    assert _ready(stack)[0] == 200
    # When tritonserver is killed from outside `tierserve serve` (kill -9: a crash, the OOM killer)
    os.kill(pid, signal.SIGKILL)
    # Then the API's readiness says that the GPU tier is down while it is...
    deadline = time.monotonic() + 5
    while (status := _ready(stack))[0] == 200:
        assert time.monotonic() < deadline, "/v2/health/ready still 200 with tritonserver dead"
        time.sleep(0.05)
    assert status[0] == 503 and "tritonserver" in status[1]["error"], status
    # ...no stub outlives it (they were 420 MB each with MiniLM)...
    deadline = time.monotonic() + 5
    while _stubs(pid) & stubs:
        assert time.monotonic() < deadline, f"orphaned stubs {sorted(_stubs(pid) & stubs)} outlive tritonserver"
        time.sleep(0.1)
    # ...and the supervisor starts it again within the backoff (plus its start-up), on the same ports
    deadline = time.monotonic() + BACKOFF_S[0] + 60
    while not (stack.triton.is_running() and stack.triton.pid != pid and _ready(stack)[0] == 200):
        assert time.monotonic() < deadline, "tritonserver was not restarted"
        time.sleep(0.2)
    # And GPU requests are served by the GPU again once the circuit's cool-down has passed
    _wait_served_by(stack, "gpu", COOLDOWN_S + 15)
    status, headers, body, x = _infer(stack, "lin-gpu", 2)
    assert status == 200 and headers["x-served-by"] == "gpu"
    _check_values(stack, body, x)


def test_lambda_invoke_endpoint_serves_the_cpu_function_as_boto3_calls_it(stack):
    import boto3

    client = boto3.client("lambda", endpoint_url=stack.invoke_url, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]}
    payload = {"model_name": "lin", "headers": {"content-type": "application/json"}, "body": json.dumps(body)}
    out = client.invoke(FunctionName="CpuInferenceFunction", Payload=json.dumps(payload).encode())
    reply = json.loads(out["Payload"].read())
    assert out["StatusCode"] == 200 and "FunctionError" not in out
    assert reply["statusCode"] == 200 and reply["headers"]["x-served-by"] == "cpu"
    w, b = stack.weights
    y = np.asarray(json.loads(reply["body"])["outputs"][0]["data"], dtype=np.float32)
    np.testing.assert_allclose(y, np.array([1.0, 2.0, 3.0, 4.0], np.float32) @ w + b, rtol=1e-5)
    # And the Invoke API is on its own port: the API's port answers its path as an unknown route
    req = urllib.request.Request(f"{stack.url}/2015-03-31/functions/CpuInferenceFunction/invocations",
                                 data=json.dumps(payload).encode(), method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=30)
    assert info.value.code == 404 and json.loads(info.value.read())["code"] == "route_not_found"
