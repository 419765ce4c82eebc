"""The real local tritonserver (nvidia-pytriton wheel) serving a converted production repository."""

from __future__ import annotations

import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tierserve.backends.triton import TritonBackend
from tierserve.errors import BackendUnavailableError, InvalidRequestError
from tierserve.protocol.calls import InferenceCall
from tierserve.protocol.messages import InferRequest, RequestedOutput, Tensor

pytestmark = pytest.mark.integration


def _request(x: np.ndarray, rid: str | None = None, outputs: list[str] | None = None) -> InferenceCall:
    return InferenceCall.from_request(InferRequest(inputs=[Tensor("x", "FP32", tuple(x.shape), x)], id=rid,
                                                   outputs=[RequestedOutput(n) for n in outputs or []]))


def _x(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 4)).astype(np.float32)


# --- the converted repository -------------------------------------------------------------------


def test_local_repository_is_python_backend_with_same_contract(triton_local_repo, triton_tiny_model):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    text = (triton_local_repo / "tiny_linear" / "config.pbtxt").read_text()
    assert text.startswith("# LOCAL DEVELOPMENT COPY")
    cfg = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert cfg.backend == "python" and not cfg.platform
    assert cfg.max_batch_size == 16
    assert [(i.name, list(i.dims), i.data_type) for i in cfg.input] == [("x", [4], model_config_pb2.TYPE_FP32)]
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("y", [3])]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 2000
    assert [g.kind for g in cfg.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    assert not cfg.HasField("optimization") and not cfg.model_warmup
    assert cfg.parameters["tierserve_site_packages"].string_value
    vdir = triton_local_repo / "tiny_linear" / "1"
    assert (vdir / "model.py").is_file()
    assert (vdir / "model.onnx").read_bytes() == triton_tiny_model.onnx_path.read_bytes()


# --- tritonclient directly ----------------------------------------------------------------------


def test_health_and_metadata_over_http(triton_server):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(triton_server.http_url)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("tiny_linear", "1")
        meta = client.get_model_metadata("tiny_linear")
        assert meta["name"] == "tiny_linear" and meta["versions"] == ["1"]
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
        assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}]
    finally:
        client.close()


# --- TritonBackend --------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_an_output_with_no_dims_past_the_batch_is_served_as_the_compiler_configured_it(triton_server, protocol):
    from tests.integration.conftest import row_sum_model_version

    # Given a model whose output is [batch] only, with the config.pbtxt the compiler writes (dims [1] + reshape [])
    url = triton_server.http_url if protocol == "http" else triton_server.grpc_url
    backend = TritonBackend(url, protocol=protocol, timeout_s=10)
    try:
        # When 5 rows are run on Triton
        x = _x(5, seed=3)
        [s] = backend.infer(row_sum_model_version(), _request(x)).decoded().outputs
        # Then the output keeps the model's shape [5], not [5, 1]
        assert (s.name, s.shape) == ("s", (5,))
        np.testing.assert_allclose(s.data, x.sum(axis=1), rtol=1e-5)
    finally:
        backend.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_backend_infer_matches_onnxruntime(triton_server, triton_tiny_model, protocol):
    url = triton_server.http_url if protocol == "http" else triton_server.grpc_url
    backend = TritonBackend(url, protocol=protocol, timeout_s=10)
    model = triton_tiny_model.model_version()
    try:
        assert backend.ready() and backend.ready(model)
        # 40 rows exceed the model's max_batch_size of 16: the backend splits them into 16+16+8
        assert triton_tiny_model.model_version().max_batch_size == 16
        for rows in (1, 5, 16, 40):
            x = _x(rows, seed=rows)
            resp = backend.infer(model, _request(x, rid=f"req-{rows}"), timeout_s=5).decoded()
            assert resp.model_name == "tiny_linear" and resp.model_version == "1"
            assert resp.id == f"req-{rows}"
            [y] = resp.outputs
            assert (y.name, y.datatype, y.shape) == ("y", "FP32", (rows, 3))
            assert y.data.dtype == np.float32
            np.testing.assert_allclose(y.data, triton_tiny_model.reference(x), rtol=1e-5, atol=1e-6)
        # an explicit output subset works too
        req = _request(_x(2), outputs=["y"])
        assert [t.name for t in backend.infer(model, req).decoded().outputs] == ["y"]
    finally:
        backend.close()


def test_http_uses_binary_tensor_data(triton_server, triton_tiny_model):
    """The request body carries raw bytes (Inference-Header-Content-Length), not JSON numbers."""
    import tritonclient.http as httpclient

    x = _x(3)
    inp = httpclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    out = httpclient.InferRequestedOutput("y", binary_data=True)
    body, json_size = httpclient.InferenceServerClient.generate_request_body([inp], outputs=[out])
    assert json_size is not None and body[json_size:] == x.tobytes()
    req = urllib.request.Request(
        f"http://{triton_server.http_url}/v2/models/tiny_linear/infer",
        data=body,
        headers={"Inference-Header-Content-Length": str(json_size)},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        header_len = int(resp.headers["Inference-Header-Content-Length"])
        raw = resp.read()
    y = np.frombuffer(raw[header_len:], dtype=np.float32).reshape(3, 3)
    np.testing.assert_allclose(y, triton_tiny_model.reference(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_backend_maps_triton_errors(triton_server, triton_tiny_model, protocol):
    from dataclasses import replace

    url = triton_server.http_url if protocol == "http" else triton_server.grpc_url
    backend = TritonBackend(url, protocol=protocol)
    model = triton_tiny_model.model_version()
    try:
        bad = np.ones((2, 5), np.float32)
        with pytest.raises(InvalidRequestError):
            backend.infer(model, _request(bad))
        with pytest.raises(BackendUnavailableError):
            backend.infer(replace(model, name="no_such_model"), _request(_x(1)))
        assert backend.ready(replace(model, name="no_such_model")) is False
    finally:
        backend.close()


def test_concurrent_infer_from_8_threads(triton_server, triton_tiny_model):
    backend = TritonBackend(triton_server.http_url, protocol="http", timeout_s=20)
    model = triton_tiny_model.model_version()
    errors: list[BaseException] = []

    def work(i: int) -> float:
        worst = 0.0
        for j in range(10):
            x = _x(1 + (i + j) % 4, seed=100 * i + j)
            t0 = time.perf_counter()
            y = backend.infer(model, _request(x)).decoded().outputs[0].data
            worst = max(worst, time.perf_counter() - t0)
            np.testing.assert_allclose(y, triton_tiny_model.reference(x), rtol=1e-5, atol=1e-6)
        return worst

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(work, i) for i in range(8)]
        for f in futures:
            try:
                f.result(timeout=60)
            except BaseException as exc:
                errors.append(exc)
    assert not errors, errors


def test_grpc_backend_shared_client_is_thread_safe(triton_server, triton_tiny_model):
    backend = TritonBackend(triton_server.grpc_url, protocol="grpc", timeout_s=20)
    model = triton_tiny_model.model_version()
    barrier = threading.Barrier(8)

    def work(i: int) -> None:
        barrier.wait()
        for j in range(5):
            x = _x(2, seed=1000 + 10 * i + j)
            y = backend.infer(model, _request(x)).decoded().outputs[0].data
            np.testing.assert_allclose(y, triton_tiny_model.reference(x), rtol=1e-5, atol=1e-6)

    try:
        with ThreadPoolExecutor(8) as pool:
            for f in [pool.submit(work, i) for i in range(8)]:
                f.result(timeout=60)
    finally:
        backend.close()


# --- crash and restart (own server, so the shared one is never disturbed) -----------------------


def test_kill_then_restart(triton_local_repo, triton_tiny_model, tmp_path):
    from tierserve_tools.triton import TritonServer

    model = triton_tiny_model.model_version()
    server = TritonServer(triton_local_repo, log_path=tmp_path / "server.log")
    try:
        server.start()
        http = TritonBackend(server.http_url, protocol="http", timeout_s=5)
        grpc = TritonBackend(server.grpc_url, protocol="grpc", timeout_s=5)
        x = _x(2)
        for b in (http, grpc):
            assert b.ready(model)
            b.infer(model, _request(x))

        pid = server.pid
        server.kill()
        assert not server.is_running()
        with pytest.raises(ProcessLookupError):
            import os

            os.kill(pid, 0)
        for b in (http, grpc):
            t0 = time.monotonic()
            with pytest.raises(BackendUnavailableError):
                b.infer(model, _request(x), timeout_s=3)
            assert time.monotonic() - t0 < 3.5
            assert b.ready() is False

        server.restart()
        assert server.is_running()
        for b in (http, grpc):
            assert b.ready(model)
            y = b.infer(model, _request(x)).decoded().outputs[0].data
            np.testing.assert_allclose(y, triton_tiny_model.reference(x), rtol=1e-5, atol=1e-6)
        http.close()
        grpc.close()
    finally:
        server.stop()
        server.stop()  # idempotent
    assert not server.is_running()


def _metric_sum(metrics_url: str, name: str) -> float:
    import re

    with urllib.request.urlopen(metrics_url, timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)", text, re.M))


def test_dynamic_batching_groups_concurrent_requests(triton_server, triton_tiny_model):
    """8 threads of 1-row requests: the shim runs several requests per execution (Triton's metrics)."""
    backend = TritonBackend(triton_server.http_url, protocol="http", timeout_s=20)
    model = triton_tiny_model.model_version()
    before = [_metric_sum(triton_server.metrics_url, k) for k in ("nv_inference_count", "nv_inference_exec_count")]

    def work(i: int) -> None:
        for j in range(25):
            x = _x(1, seed=5000 + 100 * i + j)
            y = backend.infer(model, _request(x)).decoded().outputs[0].data
            np.testing.assert_allclose(y, triton_tiny_model.reference(x), rtol=1e-5, atol=1e-6)

    with ThreadPoolExecutor(8) as pool:
        for f in [pool.submit(work, i) for i in range(8)]:
            f.result(timeout=60)
    after = [_metric_sum(triton_server.metrics_url, k) for k in ("nv_inference_count", "nv_inference_exec_count")]
    rows, executions = after[0] - before[0], after[1] - before[1]
    assert rows == 200
    assert executions < rows, f"no request was batched: {executions} executions for {rows} rows"
