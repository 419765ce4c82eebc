"""The edge runtime (`tierserve edge`, a real process) in front of `tierserve serve` as the cloud.

The cloud is the whole local stack with IAM auth on (the gateway verifies SigV4), the model store in
moto_server's S3 and the real tritonserver as the GPU tier. The device syncs from that S3 bucket
(SigV4 to moto) and signs what it forwards with the local credentials, as a Greengrass device would
with its role. In order: digits served on the device; a GPU-placed model forwarded (x-served-by: gpu),
over HTTP and gRPC; a bad signature refused by the gateway; a promotion in the store reaching the
device within one sync interval; a tampered artifact refused; then the cloud stopped: the device's
models keep serving and forwarded requests get 503 with Retry-After.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.support.models import linear_onnx, write_model
from tierserve.client import ApiError, Client, SigV4
from tierserve.manifest import TensorSpec

pytestmark = pytest.mark.integration
pytest.importorskip("pytriton", reason="the nvidia-pytriton wheel provides the local tritonserver")

DIGITS_IN = (TensorSpec("input", "FP32", (-1, 64)),)
DIGITS_OUT = (TensorSpec("label", "INT64", (-1,)), TensorSpec("probabilities", "FP32", (-1, 10)))
X, Y = (TensorSpec("x", "FP32", (-1, 4)),), (TensorSpec("y", "FP32", (-1, 3)),)
EDGE_MAX_ROWS = 32
SYNC_S = 1.0
LOCAL_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_SESSION_TOKEN": "testing", "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}


def write_digits(root: Path, version: str) -> object:
    """Version ``version`` of the digits classifier (each version its own weights: C = 1 / version)."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1 / int(version), max_iter=500)).fit(x, y)
    data = to_onnx(model, initial_types=[("input", FloatTensorType([None, 64]))],
                   options={LogisticRegression: {"zipmap": False}}).SerializeToString()
    write_model(root, "digits", version, data, DIGITS_IN, DIGITS_OUT, targets=("edge", "cpu"),
                routing={"edge_max_rows": EDGE_MAX_ROWS})
    return model


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    """`tierserve serve`: IAM auth, S3 (moto) store, Triton serving 'lin-gpu' (GPU only)."""
    from tierserve_compiler.triton import write_triton_repo
    from tierserve_tools.serve import LocalStack

    root = tmp_path_factory.mktemp("models")
    sk = write_digits(root, "1")
    data, w, b = linear_onnx(seed=7)
    write_model(root, "lin-gpu", "1", data, X, Y, targets=("gpu",), max_batch_size=16)
    write_triton_repo(root, "lin-gpu", "1", root / "lin-gpu" / "1" / "model.onnx", list(X), list(Y), 16,
                      tensorrt_fp16=False, warmup=False)
    with LocalStack(root, port=0, batch=False, auth="iam", workdir=tmp_path_factory.mktemp("serve")) as stack:
        stack.root, stack.sklearn, stack.weights = root, sk, (w, b)
        yield stack


@pytest.fixture(scope="module")
def edge(cloud, tmp_path_factory) -> Iterator[dict]:
    """`tierserve edge` as its own process, syncing from the cloud's S3 bucket every second."""
    work = tmp_path_factory.mktemp("edge")
    env = {**os.environ, **LOCAL_CREDENTIALS, "AWS_ENDPOINT_URL_S3": cloud.moto.url,
           "BREAKER_FAILURE_THRESHOLD": "2", "BREAKER_COOLDOWN_S": "20"}
    log = open(work / "edge.log", "w")  # noqa: SIM115 - the process writes it until the fixture ends
    proc = subprocess.Popen(
        [sys.executable, "-m", "tierserve.edge.cli", "--store", cloud.model_store_uri, "--cache-dir",
         str(work / "cache"), "--port", "0", "--grpc-port", "0", "--sync-interval", str(SYNC_S),
         "--cloud-url", cloud.url, "--cloud-auth", "iam", "--cloud-region", "us-east-1"],
        env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = proc.stdout.readline()
        m = re.search(r"ready on (http://\S+); grpc (\S+) ", line)
        assert m, f"no ready line: {line!r}; see {work / 'edge.log'}"
        info = {"url": m.group(1), "grpc": m.group(2), "proc": proc, "log": work / "edge.log"}
        wait_for(lambda: status(info)["sync"]["syncs"] >= 1)
        yield info
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def status(edge: dict) -> dict:
    return Client(edge["url"]).request("GET", "/v2/health/edge").json()


def wait_for(predicate, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def digits_rows(n: int) -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().data[:n].astype(np.float32)


def infer_http(url: str, model: str, x: np.ndarray, name: str = "input", outputs: tuple[str, ...] = ()):
    import tritonclient.http as httpclient

    inp = httpclient.InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    return Client(url).infer(model, [inp], [httpclient.InferRequestedOutput(o, binary_data=True) for o in outputs])


def test_digits_is_served_on_the_device(cloud, edge) -> None:
    x = digits_rows(8)
    result = infer_http(edge["url"], "digits", x, outputs=("label",))
    assert result.served_by == "edge"
    np.testing.assert_array_equal(result.as_numpy("label"), cloud.sklearn.predict(x))
    held = status(edge)["models"]
    assert [(m["name"], m["version"], m["role"]) for m in held] == [("digits", "1", "default")]


def test_a_gpu_placed_model_and_a_batch_too_large_for_the_device_are_forwarded(cloud, edge) -> None:
    w, b = cloud.weights
    x = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    result = infer_http(edge["url"], "lin-gpu", x, name="x")
    assert result.served_by == "gpu"
    np.testing.assert_allclose(result.as_numpy("y"), x @ w + b, rtol=1e-4, atol=1e-5)
    big = digits_rows(EDGE_MAX_ROWS + 1)
    result = infer_http(edge["url"], "digits", big, outputs=("label",))
    assert result.served_by == "cpu"
    np.testing.assert_array_equal(result.as_numpy("label"), cloud.sklearn.predict(big))
    assert status(edge)["counts"]["lin-gpu"]["forwarded"] >= 1


def test_tritonclient_grpc_works_against_the_device(cloud, edge) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(edge["grpc"])
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits")
    assert client.get_model_metadata("digits").inputs[0].name == "input"
    x = digits_rows(5)
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("digits", [inp], outputs=[grpcclient.InferRequestedOutput("label")])
    np.testing.assert_array_equal(result.as_numpy("label"), cloud.sklearn.predict(x))
    w, b = cloud.weights
    xs = np.ones((2, 4), np.float32)
    inp = grpcclient.InferInput("x", [2, 4], "FP32")
    inp.set_data_from_numpy(xs)
    np.testing.assert_allclose(client.infer("lin-gpu", [inp]).as_numpy("y"), xs @ w + b, rtol=1e-4, atol=1e-5)
    client.close()


def test_the_gateway_refuses_a_bad_signature(cloud, monkeypatch) -> None:
    for k, v in LOCAL_CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    assert Client(cloud.url, auth=SigV4()).request("GET", "/v2/health/ready").status == 200
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    resp = Client(cloud.url, auth=SigV4()).request("GET", "/v2/health/ready")
    assert resp.status == 403 and "signature we calculated does not match" in resp.json()["message"]
    assert Client(cloud.url).request("GET", "/v2/health/ready").status == 403


def _publish(cloud, version: str, tamper: bool = False) -> None:
    """Publish and promote version ``version`` of digits in the cloud's S3 store, as `tierserve models
    publish --promote` does: artifact first, then the manifest change through the lifecycle registry
    (a conditional write). ``tamper``: the uploaded bytes differ from what the manifest records."""
    from tierserve.lifecycle.objects import open_objects
    from tierserve.lifecycle.registry import Registry
    from tierserve_tools.serve import BUCKET, MODEL_PREFIX

    write_digits(cloud.root, version)
    mv = cloud_manifest(cloud.root).resolve("digits", version)
    data = (cloud.root / mv.edge_artifact.path).read_bytes()
    s3 = cloud.client("s3")
    s3.put_object(Bucket=BUCKET, Key=f"{MODEL_PREFIX}/{mv.edge_artifact.path}",
                  Body=b"tampered" + data[8:] if tamper else data)
    Registry(open_objects(cloud.model_store_uri, s3), actor="test").publish(mv, promote=True, why="edge test")


def cloud_manifest(root: Path):
    from tierserve.manifest import Manifest

    return Manifest.loads((root / "manifest.json").read_text())


def _served_version(edge: dict) -> str:
    resp = Client(edge["url"]).request("POST", "/v2/models/digits/infer", json.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]}).encode())
    assert resp.status == 200 and resp.served_by == "edge"
    return str(resp.json()["model_version"])


def test_a_promotion_reaches_the_device_within_one_sync_interval(cloud, edge) -> None:
    _publish(cloud, "2")
    published = status(edge)["sync"]["syncs"]
    # Within one interval a sync starts after the promotion; once it has completed, v2 is served here
    wait_for(lambda: status(edge)["sync"]["syncs"] >= published + 2, timeout_s=10 * SYNC_S + 20)
    assert _served_version(edge) == "2"


def test_a_tampered_artifact_is_refused_and_the_device_keeps_its_version(cloud, edge) -> None:
    _publish(cloud, "3", tamper=True)
    wait_for(lambda: "digits/3" in status(edge)["sync"]["refused"], timeout_s=10 * SYNC_S + 20)
    reason = status(edge)["sync"]["refused"]["digits/3"]
    assert "sha256" in reason and "refusing" in reason
    assert _served_version(edge) == "2"


def test_perf_analyzer_streams_to_the_device_over_grpc(tmp_path) -> None:
    """perf_analyzer -i grpc --streaming (Triton's ModelStreamInfer) against an edge runtime in this process."""
    from tests.support.edge import synced_edge, write_edge_store
    from tierserve_tools import perf_analyzer

    # Given NVIDIA's perf_analyzer (skipped, with the reason, where its binary cannot run)
    found = perf_analyzer.find()
    if found.command is None:
        pytest.skip(found.reason)
    store = write_edge_store(tmp_path / "store")
    with synced_edge(1 << 20, store_uri=str(store), cache_dir=str(tmp_path / "cache"), port=0, grpc_port=0) as rt:
        # When it loads the device's gRPC stream at concurrency 2 (a hang is a failure, after 60 s)
        args = [*found.command, "-i", "grpc", "--streaming", "-u", rt.grpc_url, "-m", "lin", "--shape", "x:1,4",
                "--input-data", "zero", "--concurrency-range", "2:2", "--measurement-mode", "count_windows",
                "--measurement-request-count", "50", "--stability-percentage", "1000", "--max-trials", "3",
                "-f", str(tmp_path / "pa.csv")]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
        out = proc.stdout + proc.stderr
        # Then it measures throughput and latency from streamed answers, with no errors
        assert proc.returncode == 0, out[-3000:]
        (row,) = perf_analyzer.parse_csv(tmp_path / "pa.csv", perf_analyzer.request_counts(proc.stdout))
        assert row.concurrency == 2 and row.throughput > 0 and row.p50_ms > 0 and row.count >= 50, out[-3000:]
        assert rt.counters.requests[("lin", "edge", "grpc", 200)] >= row.count


def test_the_cloud_stopped_edge_models_keep_serving_and_forwards_get_503(cloud, edge) -> None:
    cloud.stop()
    x = digits_rows(3)
    for _ in range(3):
        result = infer_http(edge["url"], "digits", x, outputs=("label",))
        assert result.served_by == "edge"
        np.testing.assert_array_equal(result.as_numpy("label"), cloud.sklearn.predict(x))
    for _ in range(3):
        with pytest.raises(ApiError) as err:
            infer_http(edge["url"], "lin-gpu", np.ones((1, 4), np.float32), name="x")
        assert err.value.status == 503 and err.value.retry_after_s and err.value.retry_after_s >= 1
    wait_for(lambda: status(edge)["sync"]["state"] == "offline", timeout_s=10 * SYNC_S + 20)
    health = status(edge)
    assert health["cloud"]["circuit"] == "open" and health["counts"]["lin-gpu"]["forward_failures"] >= 2
