"""The local GPU tier follows the store: a published GPU version is loaded by the real tritonserver
(explicit model control), with its own config, while the other keeps serving; a retired one is unloaded
once its grace has passed; and Triton's own metrics are on tierserve serve's /metrics page."""

from __future__ import annotations

import json
import time
import urllib.request

import numpy as np
import pytest

from tests.support.lifecycle import compiled
from tierserve.lifecycle.objects import open_objects
from tierserve.lifecycle.registry import Registry
from tierserve_tools.publishing import publish_version
from tierserve_tools.serve import LocalStack

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def ready(stack, version: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{stack.triton.http_url}/v2/models/g/versions/{version}/ready",
                                    timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False


def wait_for(predicate, timeout_s: float = 60.0) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from tierserve_tools.triton import pytriton_available

    if not pytriton_available():
        pytest.skip("nvidia-pytriton wheel not installed: no local tritonserver")
    build, candidates = tmp_path_factory.mktemp("build"), tmp_path_factory.mktemp("candidates")
    compiled(build, "g", "1", seed=1, gpu=True)
    compiled(candidates, "g", "2", seed=2, gpu=True)
    with LocalStack(build, port=0, batch=False, workdir=tmp_path_factory.mktemp("serve"),
                    env={"MANIFEST_TTL_S": "1"}) as s:
        s.candidates = candidates
        s.registry = Registry(open_objects(s.model_store_uri, s.client("s3")), actor="test")
        yield s


def test_a_published_gpu_version_is_loaded_beside_the_served_one(stack):
    assert stack.triton is not None and ready(stack, "1") and not ready(stack, "2")
    # When v2 is published (listed, not the default)
    publish_version(stack.candidates / "g" / "2", stack.registry.objects, stack.registry)
    # Then the local Triton loads it, keeps v1, and both answer with their own weights
    assert wait_for(lambda: ready(stack, "2")), stack.ops.sync.changes
    assert ready(stack, "1")
    config = json.loads(urllib.request.urlopen(f"http://{stack.triton.http_url}/v2/models/g/config").read())
    assert config["version_policy"] == {"specific": {"versions": [1, 2]}}
    x = np.ones((1, 4), np.float32)
    outs = {}
    for v in ("1", "2"):
        body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": x.ravel().tolist()}],
                           "outputs": [{"name": "y"}]}).encode()
        req = urllib.request.Request(f"{stack.url}/v2/models/g/versions/{v}/infer", data=body, method="POST",
                                     headers={"content-type": "application/json", "x-target": "gpu"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.headers["x-served-by"] == "gpu"
            outs[v] = json.loads(resp.read())["outputs"][0]["data"]
    assert outs["1"] != outs["2"]


def test_triton_metrics_are_on_the_metrics_page(stack):
    text = urllib.request.urlopen(f"{stack.url}/metrics", timeout=30).read().decode()
    assert "# Triton's own metrics" in text and "nv_inference_request_success" in text


def test_a_retired_gpu_version_is_unloaded_after_its_grace(stack, monkeypatch):
    stack.registry.promote("g", "2")
    stack.registry.retire("g", "1")
    assert ready(stack, "1")  # still in its grace: a router with an older manifest may send it
    from tierserve.manifest import RETIRE_GRACE_S

    real = time.time
    monkeypatch.setattr("tierserve.manifest.time.time", lambda: real() + RETIRE_GRACE_S + 1)
    assert wait_for(lambda: not ready(stack, "1")), stack.ops.sync.changes
    assert ready(stack, "2")
