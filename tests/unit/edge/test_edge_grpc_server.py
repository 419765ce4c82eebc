"""Triton's gRPC service on the device: tritonclient.grpc unchanged, the HTTP API's answers and errors.

The cloud here is RouterFunction's real handler (in-process CPU tier) behind the local API Gateway
emulator, so a forwarded gRPC request really crosses HTTP and comes back.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.support.edge import EDGE, synced_edge
from tests.support.fakes import rows_of, write_linear
from tierserve.api import handle_http
from tierserve.app import build_runtime
from tierserve.edge.runtime import EdgeRuntime
from tierserve.settings import Settings
from tierserve_tools.apigw import ApiGatewayServer

LIMIT = 256 * 1024


@pytest.fixture
def edge(store_dir: Path, tmp_path: Path) -> Iterator[EdgeRuntime]:
    cloud_rt = build_runtime(Settings(model_store_uri=str(store_dir), model_cache_dir=str(tmp_path / "cloud")))
    cloud = ApiGatewayServer(lambda event, ctx: handle_http(event, ctx, runtime=cloud_rt), lambda: None).start()
    try:
        with synced_edge(LIMIT, store_uri=str(store_dir), cache_dir=str(tmp_path / "cache"), port=0, grpc_port=0,
                         cloud_url=cloud.url, cloud_auth="none") as rt:
            yield rt
    finally:
        cloud.stop()


@pytest.fixture
def client(edge: EdgeRuntime):
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(edge.grpc_url)
    yield c
    c.close()


def weights(store_dir: Path, name: str, seed: int, targets=EDGE) -> tuple[np.ndarray, np.ndarray]:
    _, w, b = write_linear(store_dir, name, "1", seed=seed, targets=targets)  # the same bytes as the fixture's
    return w, b


def test_health_metadata_config_statistics_and_index(client) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("lin") and client.is_model_ready("cpu-only")  # held here; ready in the cloud
    assert client.get_server_metadata().name == "tierserve"
    meta = client.get_model_metadata("lin")
    assert (meta.name, list(meta.versions), meta.inputs[0].name, list(meta.inputs[0].shape)) == ("lin", ["1"], "x",
                                                                                                    [-1, 4])
    assert client.get_model_config("lin").config.platform == "onnxruntime_onnx"
    index = {(m.name, m.state) for m in client.get_model_repository_index().models}
    assert {("lin", "READY"), ("gpu-only", "READY")} <= index  # the cloud serves the GPU-only model
    assert client.get_inference_statistics("lin").model_stats[0].name == "lin"


def test_tritonclient_grpc_infers_here_and_through_the_cloud(client, store_dir: Path) -> None:
    import tritonclient.grpc as grpcclient

    x = rows_of(3)
    for name, seed in (("lin", 1), ("cpu-only", 2)):
        w, b = weights(store_dir, name, seed, EDGE if name == "lin" else ("cpu",))
        inp = grpcclient.InferInput("x", [3, 4], "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer(name, [inp], outputs=[grpcclient.InferRequestedOutput("y")], request_id="r7")
        np.testing.assert_allclose(result.as_numpy("y"), x @ w + b, rtol=1e-5, atol=1e-5)
        assert result.get_response().id == "r7" and result.get_response().model_version == "1"


def stub(edge: EdgeRuntime):
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    return service_pb2, service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(edge.grpc_url))


def request(pb, model: str, x: np.ndarray, raw: bool = True):
    req = pb.ModelInferRequest(model_name=model)
    t = req.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    if raw:
        req.raw_input_contents.append(x.astype("<f4").tobytes())
    else:
        t.contents.fp32_contents.extend(x.ravel().tolist())
    return req


def test_x_served_by_travels_as_metadata_and_typed_contents_are_accepted(edge: EdgeRuntime, store_dir: Path) -> None:
    pb, s = stub(edge)
    x = rows_of(2)
    w, b = weights(store_dir, "lin", 1)
    out, call = s.ModelInfer.with_call(request(pb, "lin", x, raw=False))
    assert dict(call.initial_metadata())["x-served-by"] == "edge"
    y = np.frombuffer(out.raw_output_contents[0], "<f4").reshape(2, 3)
    np.testing.assert_allclose(y, x @ w + b, rtol=1e-5, atol=1e-5)
    _, call = s.ModelInfer.with_call(request(pb, "cpu-only", x))
    assert dict(call.initial_metadata())["x-served-by"] == "cpu"


@pytest.mark.parametrize(("model", "shape", "code", "message"), [
    ("nosuch", (1, 4), grpc.StatusCode.NOT_FOUND, "unknown model 'nosuch'"),
    ("lin", (1, 5), grpc.StatusCode.INVALID_ARGUMENT, "input 'x'"),
    ("lin", (300, 256), grpc.StatusCode.RESOURCE_EXHAUSTED, "the limit is"),
])
def test_errors_are_the_http_apis_as_grpc_statuses(edge: EdgeRuntime, model, shape, code, message) -> None:
    pb, s = stub(edge)
    with pytest.raises(grpc.RpcError) as err:
        s.ModelInfer(request(pb, model, np.zeros(shape, np.float32)))
    assert err.value.code() == code and message in err.value.details()


def test_an_unreachable_cloud_is_unavailable_with_retry_after(edge: EdgeRuntime) -> None:
    edge.dispatcher.cloud = None  # as a standalone device
    pb, s = stub(edge)
    with pytest.raises(grpc.RpcError) as err:
        s.ModelInfer(request(pb, "gpu-only", rows_of(1)))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "--cloud-url" in err.value.details()
    assert int(dict(err.value.trailing_metadata())["retry-after"]) >= 1
