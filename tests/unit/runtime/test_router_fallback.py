"""Router: GPU calls, CPU fallback, circuit breaker, canary split, timeouts; and the same through handle_http.

Backends are plain fake classes that record their calls (no mock library, no network).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import tierserve.api
from tests.conftest import load_event
from tests.support.models import linear_onnx, write_model
from tierserve import errors
from tierserve.breaker import OPEN, CircuitBreaker, HealthCache
from tierserve.http import decode_body
from tierserve.manifest import Manifest, ModelEntry, ModelVersion, TensorSpec
from tierserve.router import RESPONSE_MARGIN_S, Router, pick_version
from tierserve.routing import size_aware
from tierserve.settings import Settings
from tierserve.store import ModelStore
from tierserve.types import InferRequest, InferResponse, Tensor


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class FakeBackend:
    """Answers y = zeros(rows, 3), or raises ``fail`` (an exception instance) on every call."""

    def __init__(self, tier: str, fail: BaseException | None = None, ready: bool = True) -> None:
        self.tier = tier
        self.fail = fail
        self.is_ready = ready
        self.calls: list[tuple[str, str | None, float | None]] = []  # (model/version, request id, timeout)
        self.ready_calls = 0

    def infer(self, model: ModelVersion, request: InferRequest, timeout_s: float | None = None) -> InferResponse:
        self.calls.append((f"{model.name}/{model.version}", request.id, timeout_s))
        if self.fail is not None:
            raise self.fail
        y = np.zeros((request.rows, 3), dtype=np.float32)
        return InferResponse(model.name, model.version, [Tensor("y", "FP32", y.shape, y)], id=request.id)

    def ready(self, model: ModelVersion | None = None) -> bool:
        self.ready_calls += 1
        return self.is_ready


def mv(name: str = "both", targets: tuple[str, ...] = ("gpu", "cpu"), version: str = "1") -> ModelVersion:
    return ModelVersion(
        name=name, version=version, inputs=(TensorSpec("x", "FP32", (-1, 4)),),
        outputs=(TensorSpec("y", "FP32", (-1, 3)),), variants={}, selected_variant="fp32", targets=targets,
        max_batch_size=64, routing={"gpu_min_rows": 8},
    )


def req(rows: int = 16, rid: str = "r-1") -> InferRequest:
    x = np.ones((rows, 4), dtype=np.float32)
    return InferRequest(inputs=[Tensor("x", "FP32", x.shape, x)], id=rid)


def router(cpu: FakeBackend, gpu: FakeBackend | None, clock: FakeClock | None = None, **kw) -> Router:
    clock = clock or FakeClock()
    return Router(cpu, gpu, size_aware, breaker=CircuitBreaker(clock=clock, **kw),
                  health=HealthCache(ttl_s=2.0, clock=clock))


# --- GPU success and fallback -------------------------------------------------------------------------


def test_gpu_success_is_served_by_gpu() -> None:
    # Given a healthy GPU and a batch over gpu_min_rows
    cpu, gpu = FakeBackend("cpu"), FakeBackend("gpu")
    r = router(cpu, gpu)
    # When the router serves it
    routed = r.infer(mv(), req(rows=16))
    # Then the GPU served it, once, and the CPU was not used
    assert (routed.served_by, routed.fallback) == ("gpu", None)
    assert len(gpu.calls) == 1 and cpu.calls == []
    assert routed.response.outputs[0].data.shape == (16, 3)


@pytest.mark.parametrize(
    "exc",
    [errors.BackendUnavailableError("connection refused"), errors.BackendTimeoutError("no answer in 2 s")],
    ids=["unavailable", "timeout"],
)
def test_gpu_failure_falls_back_to_cpu_once(exc: errors.TierserveError) -> None:
    # Given a GPU that fails every call
    cpu, gpu = FakeBackend("cpu"), FakeBackend("gpu", fail=exc)
    r = router(cpu, gpu)
    # When a GPU-sized request arrives
    routed = r.infer(mv(), req(rows=16, rid="abc"))
    # Then the CPU serves it, flagged as a GPU-unavailable fallback naming the cause
    assert routed.served_by == "cpu"
    assert routed.fallback == "gpu-unavailable"
    assert routed.decision.fallback == "gpu-unavailable"
    assert exc.message in routed.decision.reason
    # And the GPU saw the request exactly once (never retried there), the CPU once
    assert [c[1] for c in gpu.calls] == ["abc"]
    assert [c[1] for c in cpu.calls] == ["abc"]
    # And one breaker failure was recorded
    assert r.breaker._failures == 1


def test_after_n_failures_the_breaker_is_open_and_the_gpu_gets_no_calls() -> None:
    # Given a GPU that fails every call and a breaker opening after 5 failures
    cpu, gpu = FakeBackend("cpu"), FakeBackend("gpu", fail=errors.BackendUnavailableError("down"))
    r = router(cpu, gpu, failure_threshold=5)
    # When 5 GPU-sized requests fail over to the CPU
    for i in range(5):
        assert r.infer(mv(), req(rid=f"r{i}")).served_by == "cpu"
    # Then the breaker is open
    assert r.breaker.state == OPEN
    assert len(gpu.calls) == 5
    # When 20 more arrive
    routed = [r.infer(mv(), req(rid=f"s{i}")) for i in range(20)]
    # Then every one goes straight to the CPU as a fallback, and the GPU receives nothing
    assert {(x.served_by, x.fallback) for x in routed} == {("cpu", "gpu-unavailable")}
    assert len(gpu.calls) == 5
    assert len(cpu.calls) == 25


def test_gpu_only_model_with_gpu_down_is_503_with_retry_after() -> None:
    # Given a GPU-only model, a failing GPU and a breaker with a 30 s cooldown
    clock = FakeClock()
    cpu, gpu = FakeBackend("cpu"), FakeBackend("gpu", fail=errors.BackendUnavailableError("down"))
    r = router(cpu, gpu, clock, failure_threshold=2, cooldown_s=30.0)
    model = mv("gpuonly", ("gpu",))
    # When a request fails on the GPU (breaker still closed)
    with pytest.raises(errors.BackendUnavailableError) as first:
        r.infer(model, req(rows=1))
    # Then it is a BackendUnavailableError that names the fix and carries the cooldown as retry-after
    assert first.value.retry_after_s == 30.0
    assert "GPU tier only" in first.value.message and "--target both" in first.value.message
    # When the breaker has opened and 10 s have passed
    with pytest.raises(errors.BackendUnavailableError):
        r.infer(model, req(rows=1))
    assert r.breaker.state == OPEN
    clock.t += 10.0
    with pytest.raises(errors.BackendUnavailableError) as later:
        r.infer(model, req(rows=1))
    # Then retry-after is what is left of the cooldown, the GPU was not called, the CPU never
    assert later.value.retry_after_s == pytest.approx(20.0)
    assert "circuit open" in later.value.message
    assert len(gpu.calls) == 2
    assert cpu.calls == []


def test_no_gpu_tier_for_a_gpu_only_model_is_503() -> None:
    # Given a router without a GPU backend
    r = router(FakeBackend("cpu"), None)
    # When a GPU-only model is requested
    with pytest.raises(errors.BackendUnavailableError) as info:
        r.infer(mv("gpuonly", ("gpu",)), req(rows=1))
    # Then it is a 503 saying there is no GPU tier
    assert "no GPU tier" in info.value.message
    assert info.value.retry_after_s == 30.0


def test_invalid_request_from_gpu_is_reraised_not_fallen_back() -> None:
    # Given a GPU that rejects the request as malformed
    cpu, gpu = FakeBackend("cpu"), FakeBackend("gpu", fail=errors.InvalidRequestError("bad shape"))
    r = router(cpu, gpu)
    # When the router serves it
    with pytest.raises(errors.InvalidRequestError, match="bad shape"):
        r.infer(mv(), req(rows=16))
    # Then the CPU is not tried, and the GPU counts as healthy (it answered)
    assert cpu.calls == []
    assert len(gpu.calls) == 1
    assert r.breaker._failures == 0


def test_unhealthy_gpu_sends_gpu_sized_batches_to_cpu_without_calling_it() -> None:
    # Given a GPU whose ready() says no
    cpu, gpu = FakeBackend("cpu"), FakeBackend("gpu", ready=False)
    r = router(cpu, gpu)
    # When two GPU-sized requests arrive within the health TTL
    a = r.infer(mv(), req(rows=16))
    probes = gpu.ready_calls
    b = r.infer(mv(), req(rows=16))
    # Then both are CPU fallbacks; readiness was probed for the first only (cached) and infer never called
    assert (a.served_by, a.fallback, b.fallback) == ("cpu", "gpu-unavailable", "gpu-unavailable")
    assert probes >= 1
    assert gpu.ready_calls == probes
    assert gpu.calls == []


def test_unexpected_gpu_exception_does_not_wedge_a_half_open_breaker() -> None:
    # Given an open breaker that has half-opened, and a GPU that raises a non-tierserve error on the trial
    clock = FakeClock()
    cpu, gpu = FakeBackend("cpu"), FakeBackend("gpu", fail=errors.BackendUnavailableError("down"))
    r = router(cpu, gpu, clock, failure_threshold=1, cooldown_s=5.0)
    r.infer(mv(), req())
    assert r.breaker.state == OPEN
    clock.t += 5.0
    gpu.fail = RuntimeError("bug in a backend")
    with pytest.raises(RuntimeError):
        r.infer(mv(), req())
    # When the cooldown passes again and the GPU is healthy
    clock.t += 5.0
    gpu.fail = None
    routed = r.infer(mv(), req())
    # Then the GPU gets its trial again (the failed trial was released, not left in flight forever)
    assert routed.served_by == "gpu"


# --- timeouts -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("remaining_ms", "expected"),
    [(None, 10.0), (3000.0, 3.0 - RESPONSE_MARGIN_S), (60_000.0, 10.0), (100.0, 0.05)],
    ids=["no-context", "3s-left", "capped", "floor"],
)
def test_timeout_passed_to_backends_derives_from_remaining_ms(remaining_ms: float | None, expected: float) -> None:
    # Given a router with a 10 s GPU timeout, a healthy GPU and a CPU
    cpu, gpu = FakeBackend("cpu"), FakeBackend("gpu")
    r = router(cpu, gpu)
    r.gpu_timeout_s = 10.0
    # When a GPU batch and a CPU batch are served with `remaining_ms` left
    r.infer(mv(), req(rows=16), remaining_ms=remaining_ms)
    r.infer(mv(), req(rows=1), remaining_ms=remaining_ms if remaining_ms is None or remaining_ms > 1000 else None)
    # Then the GPU got min(gpu_timeout, remaining - margin), never below 50 ms
    assert gpu.calls[0][2] == pytest.approx(expected)
    # And the CPU got the same derivation
    assert cpu.calls[0][2] == pytest.approx(expected if remaining_ms is None or remaining_ms > 1000 else 10.0)


def test_fallback_uses_the_same_timeout() -> None:
    # Given a failing GPU
    cpu, gpu = FakeBackend("cpu"), FakeBackend("gpu", fail=errors.BackendTimeoutError("slow"))
    r = router(cpu, gpu)
    # When a request with 2 s left falls back
    r.infer(mv(), req(rows=16), remaining_ms=2000.0)
    # Then the CPU call got the same derived timeout as the GPU call
    assert gpu.calls[0][2] == cpu.calls[0][2] == pytest.approx(2.0 - RESPONSE_MARGIN_S)


# --- canary split -----------------------------------------------------------------------------------------


def canary_manifest(percent: float) -> Manifest:
    versions = {"1": mv("m", ("cpu",), "1"), "2": mv("m", ("cpu",), "2")}
    return Manifest(models={"m": ModelEntry("m", "1", versions, {"version": "2", "percent": percent})})


@pytest.mark.parametrize(("percent", "share"), [(0, 0.0), (100, 1.0)])
def test_canary_0_and_100_percent(percent: float, share: float) -> None:
    # Given a canary at 0 % or 100 %
    manifest = canary_manifest(percent)
    # When 2000 request ids are routed
    got = [pick_version(manifest, "m", None, f"req-{i}").version for i in range(2000)]
    # Then none, or all, get the canary
    assert got.count("2") / len(got) == share


def test_canary_30_percent_within_a_tolerance_band() -> None:
    # Given a 30 % canary
    manifest = canary_manifest(30)
    # When 2000 deterministic request ids are routed
    got = [pick_version(manifest, "m", None, f"req-{i}").version for i in range(2000)]
    # Then about 30 % land on the canary (binomial sd ~ 1 %; band +-4 %)
    share = got.count("2") / len(got)
    assert 0.26 <= share <= 0.34


def test_canary_is_stable_per_request_id() -> None:
    # Given a 50 % canary
    manifest = canary_manifest(50)
    ids = [f"id-{i}" for i in range(200)]
    # When the same ids are routed three times
    runs = [[pick_version(manifest, "m", None, i).version for i in ids] for _ in range(3)]
    # Then each id always maps to the same version, and both versions occur
    assert runs[0] == runs[1] == runs[2]
    assert set(runs[0]) == {"1", "2"}


def test_explicit_version_bypasses_the_canary() -> None:
    # Given a 100 % canary
    manifest = canary_manifest(100)
    # When a request names version 1
    # Then it gets version 1
    assert pick_version(manifest, "m", "1", "any").version == "1"


# --- through handle_http ------------------------------------------------------------------------------------


@pytest.fixture
def http_app(runtime_env: pytest.MonkeyPatch, tmp_path: Path):
    """An App over a tmp model store (models 'both' and 'gpuonly'), with a Router of fakes injected."""
    data, _, _ = linear_onnx(4, 3)
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    specs = ((TensorSpec("x", "FP32", (-1, 4)),), (TensorSpec("y", "FP32", (-1, 3)),))
    write_model(store_dir, "both", "1", data, *specs, targets=("gpu", "cpu"), max_batch_size=64,
                routing={"gpu_min_rows": 8})
    write_model(store_dir, "gpuonly", "1", data, *specs, targets=("gpu",), max_batch_size=64)
    settings = Settings(model_store_uri=str(store_dir), model_cache_dir=str(tmp_path / "cache"))
    store = ModelStore(settings.model_store_uri, settings.model_cache_dir)
    cpu, gpu = FakeBackend("cpu"), FakeBackend("gpu", fail=errors.BackendUnavailableError("connection refused"))
    app = tierserve.api.App(settings, store, router(cpu, gpu, cooldown_s=30.0))
    runtime_env.setattr(tierserve.api, "_app", app)
    return app, cpu, gpu


def http_event(model: str, rows: int) -> dict:
    event = load_event("http_infer.json")
    path = f"/v2/models/{model}/infer"
    event["rawPath"] = path
    event["requestContext"]["http"]["path"] = path
    event["pathParameters"] = {"name": model}
    event["body"] = json.dumps({"id": "http-1", "inputs": [
        {"name": "x", "shape": [rows, 4], "datatype": "FP32", "data": [0.5] * (rows * 4)}]})
    return event


def test_http_gpu_failure_is_served_by_cpu_with_fallback_headers(http_app) -> None:
    # Given the router's HTTP handler with a failing GPU fake
    _, cpu, gpu = http_app
    # When a 16-row request (over gpu_min_rows 8) arrives as an HTTP API event
    resp = tierserve.api.handle_http(http_event("both", 16))
    # Then it is a 200 served by the CPU, flagged as a fallback
    assert resp["statusCode"] == 200, decode_body(resp)
    assert resp["headers"]["x-served-by"] == "cpu"
    assert resp["headers"]["x-fallback"] == "gpu-unavailable"
    body = json.loads(decode_body(resp))
    assert body["outputs"][0]["shape"] == [16, 3]
    assert (len(gpu.calls), len(cpu.calls)) == (1, 1)


def test_http_small_request_has_no_fallback_header(http_app) -> None:
    # Given the same app
    _, cpu, gpu = http_app
    # When a 1-row request arrives
    resp = tierserve.api.handle_http(http_event("both", 1))
    # Then the CPU serves it as a plain CPU decision
    assert resp["statusCode"] == 200
    assert resp["headers"]["x-served-by"] == "cpu"
    assert "x-fallback" not in resp["headers"]
    assert gpu.calls == []
    assert len(cpu.calls) == 1


def test_http_gpu_only_model_with_gpu_down_is_503_with_retry_after(http_app) -> None:
    # Given a GPU-only model and a failing GPU (breaker cooldown 30 s)
    _, cpu, _ = http_app
    # When it is requested over HTTP
    resp = tierserve.api.handle_http(http_event("gpuonly", 1))
    # Then the answer is a 503 with Retry-After and a protocol error body
    assert resp["statusCode"] == 503
    assert resp["headers"]["retry-after"] == "30"
    body = json.loads(decode_body(resp))
    assert body["code"] == "backend_unavailable"
    assert "GPU tier only" in body["error"]
    assert cpu.calls == []
