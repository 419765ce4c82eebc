"""Triton's gRPC service on the device: tritonclient.grpc unchanged, the HTTP API's answers and errors.

The cloud here is RouterFunction's real handler (in-process CPU tier) behind the local API Gateway
emulator, so a forwarded gRPC request really crosses HTTP and comes back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.support.edge import EDGE, synced_edge
from tests.support.fakes import rows_of, write_linear
from tierserve.api import handle_http
from tierserve.app import build_runtime
from tierserve.client import Client
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
    # READY where ModelReady says so: the cloud here has no GPU tier, so the GPU-only model is not ready
    assert index == {("lin", "READY"), ("cpu-only", "READY"), ("gpu-only", "UNAVAILABLE")}
    assert not client.is_model_ready("gpu-only")
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


# --- the repository index's readiness is the per-model ready endpoint's (HTTP and gRPC) ----------------------


@pytest.fixture
def standalone(store_dir: Path, tmp_path: Path) -> Iterator[EdgeRuntime]:
    with synced_edge(LIMIT, store_uri=str(store_dir), cache_dir=str(tmp_path / "cache"), port=0, grpc_port=0) as rt:
        yield rt


def _http_index(edge: EdgeRuntime, ready: bool) -> dict[tuple[str, str], str]:
    resp = Client(edge.url).request("POST", "/v2/repository/index", json.dumps({"ready": ready}).encode())
    assert resp.status == 200, resp.body
    return {(m["name"], m["version"]): m["state"] for m in resp.json()}


@pytest.mark.parametrize("setup", ["standalone", "circuit-open"])
def test_the_index_lists_as_ready_exactly_what_the_ready_endpoints_call_ready(request, setup: str) -> None:
    import tritonclient.grpc as grpcclient

    # Given a device without a cloud (or whose cloud circuit is open): it can run only the model it holds
    edge: EdgeRuntime = request.getfixturevalue("standalone" if setup == "standalone" else "edge")
    if setup == "circuit-open":
        for _ in range(edge.dispatcher.breaker.failure_threshold):
            edge.dispatcher.breaker.record_failure()
        assert edge.dispatcher.breaker.state == "open"
    api = Client(edge.url)
    grpc_client = grpcclient.InferenceServerClient(edge.grpc_url)
    try:
        full = _http_index(edge, False)
        assert set(full) == {("lin", "1"), ("cpu-only", "1"), ("gpu-only", "1")}
        http_ready = {k for k in full if api.request("GET", f"/v2/models/{k[0]}/versions/{k[1]}/ready").status == 200}
        grpc_ready = {k for k in full if grpc_client.is_model_ready(*k)}
        assert http_ready == grpc_ready == {("lin", "1")}
        # Then the index says READY for those and only those, on both transports, filtered or not
        assert {k for k, state in full.items() if state == "READY"} == http_ready
        assert set(_http_index(edge, True)) == http_ready
        assert all(state == "READY" for state in _http_index(edge, True).values())
        assert {(m.name, m.version) for m in grpc_client.get_model_repository_index().models
                if m.state == "READY"} == grpc_ready
        assert _grpc_ready_only(edge) == grpc_ready
        # And a version that is not ready says why
        reasons = {m["name"]: m.get("reason", "") for m in api.request("POST", "/v2/repository/index").json()}
        assert reasons["cpu-only"] and reasons["lin"] == ""
    finally:
        grpc_client.close()


def _grpc_ready_only(edge: EdgeRuntime) -> set[tuple[str, str]]:
    pb, s = stub(edge)
    out = s.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    assert all(m.state == "READY" for m in out.models)
    return {(m.name, m.version) for m in out.models}


# --- ModelStreamInfer: Triton's bidirectional stream ---------------------------------------------------------


def test_tritonclient_streams_requests_answered_in_order_errors_keep_the_stream_open(client, store_dir: Path
                                                                                     ) -> None:
    import queue

    import tritonclient.grpc as grpcclient

    w, b = weights(store_dir, "lin", 1)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        def send(model: str, x: np.ndarray, rid: str) -> None:
            inp = grpcclient.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            client.async_stream_infer(model, [inp], request_id=rid)

        # When a client streams good requests, an unknown model, a bad shape, and a forwarded model
        send("lin", rows_of(2, seed=1), "a")
        send("nosuch", rows_of(1), "b")
        send("lin", np.zeros((1, 5), np.float32), "c")
        send("cpu-only", rows_of(3, seed=2), "d")
        send("lin", rows_of(1, seed=3), "e")
        got = [answers.get(timeout=20) for _ in range(5)]
    finally:
        client.stop_stream()
    # Then each is answered in order; errors come as error messages and the stream goes on
    (ra, ea), (rb, eb), (rc, ec), (rd, ed), (re_, ee) = got
    assert ea is None and ra.get_response().id == "a"
    np.testing.assert_allclose(ra.as_numpy("y"), rows_of(2, seed=1) @ w + b, rtol=1e-5, atol=1e-5)
    assert rb is None and "unknown model 'nosuch'" in str(eb)
    assert rc is None and "input 'x'" in str(ec)
    wc, bc = weights(store_dir, "cpu-only", 2, ("cpu",))
    assert ed is None and rd.get_response().id == "d"
    np.testing.assert_allclose(rd.as_numpy("y"), rows_of(3, seed=2) @ wc + bc, rtol=1e-5, atol=1e-5)
    assert ee is None and re_.get_response().id == "e"


def test_a_raw_stream_gets_one_response_per_request_and_the_final_flag_when_asked(edge: EdgeRuntime) -> None:
    pb, s = stub(edge)
    asked = request(pb, "lin", rows_of(1))
    asked.id = "f"
    asked.parameters["triton_enable_empty_final_response"].bool_param = True
    bad = request(pb, "lin", np.zeros((1, 5), np.float32))
    bad.id = "g"
    plain = request(pb, "lin", rows_of(2))
    plain.id = "h"
    out = list(s.ModelStreamInfer(iter([asked, bad, plain]), timeout=20))
    assert [(r.infer_response.id, bool(r.error_message)) for r in out] == [("f", False), ("g", True), ("h", False)]
    assert out[0].infer_response.parameters["triton_final_response"].bool_param is True
    assert "triton_enable_empty_final_response" not in out[0].infer_response.parameters
    assert "triton_final_response" not in out[2].infer_response.parameters
    assert len(out[2].infer_response.raw_output_contents[0]) == 2 * 3 * 4


def test_streams_beyond_the_limit_are_refused_and_unary_calls_still_answer(store_dir: Path, tmp_path: Path) -> None:
    from tierserve.edge.grpc_server import EdgeGrpcServer

    with synced_edge(LIMIT, store_uri=str(store_dir), cache_dir=str(tmp_path / "cache"), port=0,
                     grpc_port=-1) as rt:
        server = EdgeGrpcServer(rt.runtime, rt.counters, port=0, threads=2, streams=1).start()
        try:
            from tritonclient.grpc import service_pb2, service_pb2_grpc

            s = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
            import queue

            held_open: queue.Queue = queue.Queue()
            first = s.ModelStreamInfer(iter(held_open.get, None), timeout=20)  # an idle stream holds its slot
            held_open.put(request(service_pb2, "lin", rows_of(1)))
            assert next(first).error_message == ""
            with pytest.raises(grpc.RpcError) as err:
                list(s.ModelStreamInfer(iter([request(service_pb2, "lin", rows_of(1))]), timeout=20))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "streams" in err.value.details()
            assert s.ServerLive(service_pb2.ServerLiveRequest(), timeout=5).live
            held_open.put(None)
            assert list(first) == []
        finally:
            server.stop()
