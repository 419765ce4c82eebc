"""inference.py: one inference from a body to a response, as the router's HTTP API serves it; here, what an
error says about the tier that produced it (``x-served-by``).

The runtime is built by ``build_runtime`` as in AWS, with FakeBackends for the tiers and a real store.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.fakes import FakeBackend, json_body, rows_of, write_linear
from tests.support.make_events import http_event
from tierserve import errors
from tierserve.api import handle_http
from tierserve.app import build_runtime, set_runtime
from tierserve.direct import handle_direct
from tierserve.invoke_payload import payload
from tierserve.protocol.http_api import decode_body
from tierserve.settings import Settings
from tierserve.store import ModelStore


def _runtime(tmp_path: Path, cpu: FakeBackend, gpu: FakeBackend) -> None:
    """Model 'both' (GPU from 8 rows, CPU fallback) in a tmp store, served by ``cpu`` and ``gpu``."""
    store_dir = tmp_path / "store"
    write_linear(store_dir, "both", targets=("gpu", "cpu"), routing={"gpu_min_rows": 8}, max_batch_size=64)
    settings = Settings(model_store_uri=str(store_dir), model_cache_dir=str(tmp_path / "cache"))
    set_runtime(build_runtime(settings, cpu=cpu, gpu=gpu, store=ModelStore(settings.model_store_uri,
                                                                           settings.model_cache_dir)))


def _infer(rows: int, target: str | None = None) -> dict:
    headers = {"content-type": "application/json", **({"x-target": target} if target else {})}
    event = http_event("POST", "/v2/models/both/infer", "POST /v2/models/{name}/infer", "", {"name": "both"},
                       headers)
    event["body"] = json_body(rows_of(rows)).decode()
    event["isBase64Encoded"] = False
    return handle_http(event)


def test_a_400_that_the_gpu_tier_produced_says_it_was_served_by_the_gpu(runtime_env: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    # Given a GPU tier that refuses the input (Triton's 400: an input its model cannot take)
    cpu = FakeBackend("cpu")
    gpu = FakeBackend("gpu", fail=errors.InvalidRequestError("Triton rejected model 'both': unexpected shape"))
    _runtime(tmp_path, cpu, gpu)
    # When a GPU-sized request reaches the router
    resp = _infer(32)
    # Then the client gets the GPU's 400, labelled as the GPU's answer (defect 15: it said cpu)
    assert resp["statusCode"] == 400
    assert json.loads(decode_body(resp))["error"].startswith("Triton rejected")
    assert resp["headers"]["x-served-by"] == "gpu"
    assert (len(gpu.calls), len(cpu.calls)) == (1, 0)


def test_a_400_that_the_cpu_tier_produced_says_cpu_also_when_the_gpu_was_tried_first(
        runtime_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Given a GPU tier that is down and a CPU tier that refuses the input
    cpu = FakeBackend("cpu", fail=errors.InvalidRequestError("model 'both' rejected the inputs"))
    gpu = FakeBackend("gpu", fail=errors.BackendUnavailableError("connection refused"))
    _runtime(tmp_path, cpu, gpu)
    # When a small request and a GPU-sized one (which falls back to the CPU) arrive
    small, fallback = _infer(2), _infer(32)
    # Then both are the CPU's 400
    assert [(r["statusCode"], r["headers"]["x-served-by"]) for r in (small, fallback)] == [(400, "cpu"), (400, "cpu")]


def test_when_the_cpu_tier_is_throttled_the_gpu_tiers_400_says_gpu(runtime_env: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    # Given a throttled CPU tier (nothing ran) and a GPU tier that refuses the input
    cpu = FakeBackend("cpu", fail=errors.TierThrottledError("CpuInferenceFunction is throttled", retry_after_s=1))
    gpu = FakeBackend("gpu", fail=errors.InvalidRequestError("Triton rejected it"))
    _runtime(tmp_path, cpu, gpu)
    # When a small request (the CPU's) is moved to the GPU, Then the 400 is the GPU's
    resp = _infer(2)
    assert (resp["statusCode"], resp["headers"]["x-served-by"]) == (400, "gpu")


def test_the_cpu_function_labels_its_own_errors_cpu(runtime_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Given the CPU function, whose tier refuses the input
    cpu = FakeBackend("cpu", fail=errors.InvalidRequestError("model 'both' rejected the inputs"))
    _runtime(tmp_path, cpu, FakeBackend("gpu"))
    from tests.support.fakes import json_call, model_version

    event = payload(model_version("both"), json_call(2))
    # When the router's Invoke payload reaches it, Then its 400 says cpu
    resp = handle_direct(event)
    assert (resp["statusCode"], resp["headers"]["x-served-by"]) == (400, "cpu")
