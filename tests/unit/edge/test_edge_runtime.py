"""EdgeRuntime: start-up from what the device held, the sync loop, and status."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests.support.edge import EDGE
from tests.support.fakes import json_body, rows_of, write_linear
from tierserve.client import Client
from tierserve.edge.runtime import EdgeRuntime
from tierserve.edge.settings import EdgeSettings
from tierserve.settings import Settings


def settings(store_dir: Path, tmp_path: Path, **kw) -> EdgeSettings:
    return EdgeSettings(store_uri=str(store_dir), cache_dir=str(tmp_path / "cache"), port=0, grpc_port=-1, **kw)


def wait_for(predicate, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_a_promotion_reaches_the_device_within_one_sync_interval(store_dir: Path, tmp_path: Path) -> None:
    with EdgeRuntime(settings(store_dir, tmp_path, sync_interval_s=0.5), Settings()) as edge:
        wait_for(lambda: edge.store.status.syncs >= 1)
        api = Client(edge.url)
        assert api.request("POST", "/v2/models/lin/infer", json_body(rows_of(1))).json()["model_version"] == "1"
        # Given v2 promoted in the store
        write_linear(store_dir, "lin", "2", seed=9, targets=EDGE)
        promoted = edge.store.status.syncs
        # When one sync that started after the promotion has completed (at most one interval later)
        wait_for(lambda: edge.store.status.syncs >= promoted + 2)
        # Then the device serves v2
        assert api.request("POST", "/v2/models/lin/infer", json_body(rows_of(1))).json()["model_version"] == "2"


def test_a_device_restarted_offline_serves_what_it_held(store_dir: Path, tmp_path: Path) -> None:
    with EdgeRuntime(settings(store_dir, tmp_path), Settings()) as edge:
        wait_for(lambda: edge.store.status.syncs >= 1)
    shutil.rmtree(store_dir)  # the store is gone (offline)
    with EdgeRuntime(settings(store_dir, tmp_path), Settings()) as edge:
        resp = Client(edge.url).request("POST", "/v2/models/lin/infer", json_body(rows_of(1)))
        assert resp.status == 200 and resp.served_by == "edge"
        wait_for(lambda: edge.store.status.failures >= 1)
        status = edge.status()
        assert status["sync"]["state"] == "offline" and "no manifest" in status["sync"]["last_error"]
        assert status["sync"]["source"] == "saved state" and [m["name"] for m in status["models"]] == ["lin"]
        assert "held: lin v1" in edge.ready_line() and edge.startup_s > 0


def test_the_edge_runtime_imports_neither_torch_onnx_the_compiler_nor_the_local_emulation() -> None:
    import json
    import subprocess
    import sys

    code = ("import sys, json, tierserve.edge.cli, tierserve.edge.runtime, tierserve.edge.grpc_server; "
            "print(json.dumps(sorted(sys.modules)))")
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                           check=True).stdout))
    forbidden = {"torch", "onnx", "tierserve_compiler", "tierserve_tools", "sklearn", "skl2onnx"}
    assert not forbidden & loaded, sorted(forbidden & loaded)


def _held_then_restarted_offline(store_dir: Path, tmp_path: Path, **kw) -> EdgeRuntime:
    """A device that synced once, then started again with its store gone (servers up, no sync loop)."""
    s = settings(store_dir, tmp_path, **kw)
    first = EdgeRuntime(s, Settings()).start(sync=False)
    try:
        assert first.sync().last_error is None
    finally:
        first.stop()
    shutil.rmtree(store_dir)
    return EdgeRuntime(s, Settings()).start(sync=False)


@pytest.mark.parametrize("cloud_url", ["", "http://127.0.0.1:9"], ids=["standalone", "with-cloud"])
def test_restarted_offline_a_model_the_device_does_not_know_is_404(store_dir: Path, tmp_path: Path,
                                                                    cloud_url: str) -> None:
    # Given a device restarted while its store is unreachable (it serves its saved view)
    edge = _held_then_restarted_offline(store_dir, tmp_path, cloud_url=cloud_url, cloud_auth="none")
    try:
        api = Client(edge.url)
        # When a client names a model (or a version) that the saved view does not know
        for method, path in (("POST", "/v2/models/nosuch/infer"), ("GET", "/v2/models/nosuch"),
                             ("GET", "/v2/models/nosuch/ready"), ("POST", "/v2/models/lin/versions/9/infer")):
            resp = api.request(method, path, json_body(rows_of(1)) if method == "POST" else None)
            # Then it is the protocol's 404 (KServe's error shape), as when the store is reachable
            assert (resp.status, resp.json()["code"]) == (404, "model_not_found"), (path, resp.body[:200])
            assert "error" in resp.json()
        # And what the device holds is still served here
        assert api.request("POST", "/v2/models/lin/infer", json_body(rows_of(1))).served_by == "edge"
    finally:
        edge.stop()


def _series(edge: EdgeRuntime) -> list[str]:
    return [line for line in edge.prometheus().splitlines() if line and not line.startswith("#")]


def test_unknown_model_names_do_not_grow_the_prometheus_page(store_dir: Path, tmp_path: Path) -> None:
    import random
    import string

    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    edge = EdgeRuntime(EdgeSettings(store_uri=str(store_dir), cache_dir=str(tmp_path / "cache"), port=0,
                                    grpc_port=0), Settings()).start(sync=False)
    try:
        edge.sync()
        api = Client(edge.url)
        stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(edge.grpc_url))

        def ask(name: str) -> None:
            api.request("POST", f"/v2/models/{name}/infer", json_body(rows_of(1)))
            api.request("GET", f"/v2/models/{name}/ready")
            with pytest.raises(grpc.RpcError):
                stub.ModelMetadata(service_pb2.ModelMetadataRequest(name=name))

        # Given a device that answered its own model and one unknown name (on HTTP and gRPC)
        assert api.request("POST", "/v2/models/lin/infer", json_body(rows_of(1))).status == 200
        ask("nosuch")
        before = _series(edge)
        # When 40 requests name random models
        rng = random.Random(6)
        for _ in range(40):
            ask("".join(rng.choices(string.ascii_lowercase + string.digits, k=12)))
        # Then the page has the same series (the unknown names share one label); known models keep theirs
        after = _series(edge)
        assert len(after) == len(before), sorted(set(after) - set(before))[:5]
        assert any('model="lin"' in line for line in after)
        assert not any("nosuch" in line for line in after)
    finally:
        edge.stop()
