"""Router: carrying out decisions, GPU failure -> CPU fallback, fast 503 + Retry-After, canary split.

Fake backends are plain classes; the breaker and the health cache run on an injectable clock.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from tierserve import errors
from tierserve.breaker import CircuitBreaker, HealthCache
from tierserve.http import error_response
from tierserve.manifest import Manifest, ModelVersion, TensorSpec, Variant
from tierserve.router import Router, pick_version
from tierserve.routing import get_policy
from tierserve.types import InferRequest, InferResponse, Tensor


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeBackend:
    """Answers with y = sum(x) per row, or raises ``fail`` (an exception instance) when set."""

    def __init__(self, tier: str, ready: bool = True, server_ready: bool = True) -> None:
        self.tier = tier
        self.calls = 0
        self.ready_calls: list[str | None] = []
        self.fail: Exception | None = None
        self.is_ready = ready
        self.server_ready = server_ready
        self.timeouts: list[float | None] = []

    def infer(self, model: ModelVersion, request: InferRequest, timeout_s: float | None = None) -> InferResponse:
        self.calls += 1
        self.timeouts.append(timeout_s)
        if self.fail is not None:
            raise self.fail
        x = request.inputs[0].data
        y = x.sum(axis=1, keepdims=True).astype(np.float32)
        return InferResponse(model.name, model.version, [Tensor("y", "FP32", y.shape, y)], request.id)

    def ready(self, model: ModelVersion | None = None) -> bool:
        self.ready_calls.append(model.name if model else None)
        return self.is_ready if model is not None else self.server_ready


def _mv(name: str = "m", targets: tuple[str, ...] = ("gpu", "cpu"), version: str = "1") -> ModelVersion:
    v = Variant(f"{name}/{version}/model.onnx", "0" * 64, 1)
    return ModelVersion(name, version, (TensorSpec("x", "FP32", (-1, 4)),), (TensorSpec("y", "FP32", (-1, 1)),),
                        {"fp32": v}, "fp32", targets, routing={"gpu_min_rows": 8})


def _req(rows: int, rid: str | None = None) -> InferRequest:
    x = np.random.default_rng(rows).standard_normal((rows, 4)).astype(np.float32)
    return InferRequest([Tensor("x", "FP32", x.shape, x)], id=rid)


@pytest.fixture
def rig():
    clock = Clock()
    cpu, gpu = FakeBackend("cpu"), FakeBackend("gpu")
    breaker = CircuitBreaker(failure_threshold=2, cooldown_s=10.0, success_threshold=1, clock=clock)
    router = Router(cpu, gpu, get_policy("size-aware"), breaker, HealthCache(ttl_s=1.0, clock=clock),
                    gpu_timeout_s=5.0)
    return router, cpu, gpu, clock


def test_small_batch_cpu_large_batch_gpu(rig) -> None:
    router, cpu, gpu, _ = rig
    # Given a model on both tiers with gpu_min_rows 8
    # When 2 rows and 32 rows arrive
    small, large = router.infer(_mv(), _req(2)), router.infer(_mv(), _req(32))
    # Then they go to CPU and GPU, with no fallback
    assert (small.served_by, small.fallback, large.served_by, large.fallback) == ("cpu", None, "gpu", None)
    assert (cpu.calls, gpu.calls) == (1, 1)
    assert large.latency_ms >= 0 and "32 rows" in large.decision.reason


def test_hint_header_wins_and_parameters_target_is_a_hint(rig) -> None:
    router, _cpu, _gpu, _ = rig
    assert router.infer(_mv(), _req(32), hint="cpu").served_by == "cpu"
    req = _req(2)
    req.parameters["target"] = "gpu"
    assert router.infer(_mv(), req).served_by == "gpu"
    with pytest.raises(errors.InvalidRequestError, match="not deployed on cpu"):
        router.infer(_mv(targets=("gpu",)), _req(2), hint="cpu")


def test_gpu_failure_falls_back_to_cpu_once_and_never_retries_the_gpu(rig) -> None:
    router, cpu, gpu, _ = rig
    gpu.fail = errors.BackendUnavailableError("connection refused")
    # When a GPU-bound request fails on the GPU
    routed = router.infer(_mv(), _req(32))
    # Then the CPU serves it, flagged, and the GPU saw exactly one attempt
    assert (routed.served_by, routed.fallback) == ("cpu", "gpu-unavailable")
    assert (gpu.calls, cpu.calls) == (1, 1)
    assert "connection refused" in routed.decision.reason


def test_circuit_opens_after_threshold_then_no_gpu_attempts(rig) -> None:
    router, _cpu, gpu, _ = rig
    gpu.fail = errors.BackendTimeoutError("timed out")
    for _ in range(2):
        router.infer(_mv(), _req(32))
    assert router.breaker.state == "open"
    attempts = gpu.calls
    # While open: fallback without touching the GPU (no infer, no probe)
    probes = len(gpu.ready_calls)
    for _ in range(5):
        r = router.infer(_mv(), _req(32))
        assert (r.served_by, r.fallback) == ("cpu", "gpu-unavailable")
    assert gpu.calls == attempts and len(gpu.ready_calls) == probes


def test_gpu_only_model_gets_fast_503_with_retry_after_while_open(rig) -> None:
    router, _, gpu, clock = rig
    gpu.fail = errors.BackendUnavailableError("down")
    with pytest.raises(errors.BackendUnavailableError):
        router.infer(_mv(targets=("gpu",)), _req(2))
    with pytest.raises(errors.BackendUnavailableError):
        router.infer(_mv(targets=("gpu",)), _req(2))
    assert router.breaker.state == "open"
    clock.t += 3.0
    t0 = time.perf_counter()
    with pytest.raises(errors.BackendUnavailableError, match="GPU tier only") as info:
        router.infer(_mv(targets=("gpu",)), _req(2))
    assert time.perf_counter() - t0 < 0.01
    assert info.value.retry_after_s == pytest.approx(7.0)
    resp = error_response(info.value)
    assert resp["statusCode"] == 503 and resp["headers"]["retry-after"] == "7"


def test_recovers_after_cooldown_with_a_single_trial(rig) -> None:
    router, _, gpu, clock = rig
    gpu.fail = errors.BackendUnavailableError("down")
    router.infer(_mv(), _req(32))
    router.infer(_mv(), _req(32))
    assert router.breaker.state == "open"
    gpu.fail = None
    clock.t += 10.0
    assert router.breaker.state == "half_open"
    routed = router.infer(_mv(), _req(32))
    assert (routed.served_by, routed.fallback) == ("gpu", None)
    assert router.breaker.state == "closed"


def test_failed_probe_of_a_dead_server_counts_toward_the_breaker(rig) -> None:
    router, _, gpu, clock = rig
    gpu.is_ready = gpu.server_ready = False
    for _ in range(2):
        clock.t += 1.5  # past the health TTL: a fresh probe each time
        routed = router.infer(_mv(), _req(32))
        assert (routed.served_by, routed.fallback) == ("cpu", "gpu-unavailable")
    assert gpu.calls == 0 and router.breaker.state == "open"


def test_model_not_ready_on_a_live_server_does_not_open_the_breaker(rig) -> None:
    router, _, gpu, clock = rig
    gpu.is_ready, gpu.server_ready = False, True
    for _ in range(4):
        clock.t += 1.5
        assert router.infer(_mv(), _req(32)).fallback == "gpu-unavailable"
    assert router.breaker.state == "closed"


def test_invalid_request_on_gpu_is_a_400_not_a_breaker_failure(rig) -> None:
    router, cpu, gpu, _ = rig
    gpu.fail = errors.InvalidRequestError("bad shape")
    for _ in range(3):
        with pytest.raises(errors.InvalidRequestError):
            router.infer(_mv(), _req(32))
    assert router.breaker.state == "closed" and cpu.calls == 0


def test_timeouts_come_from_the_remaining_budget(rig) -> None:
    router, _, gpu, _ = rig
    # TRITON_TIMEOUT_S (5 here), or less when the budget (minus the response margin) is shorter
    router.infer(_mv(), _req(32), remaining_ms=2000)
    router.infer(_mv(), _req(32), remaining_ms=None)
    router.infer(_mv(), _req(32), remaining_ms=10)
    assert gpu.timeouts == [pytest.approx(1.75, abs=0.01), 5.0, 0.05]


def test_no_gpu_tier_serves_cpu_or_503(rig) -> None:
    _, cpu, _, clock = rig
    router = Router(cpu, None, get_policy("size-aware"), CircuitBreaker(clock=clock), HealthCache(clock=clock))
    assert router.infer(_mv(), _req(32)).fallback == "gpu-unavailable"
    with pytest.raises(errors.BackendUnavailableError, match="no GPU tier"):
        router.infer(_mv(targets=("gpu",)), _req(2))


# --- versions and canary -------------------------------------------------------------------------


def _manifest(percent: float | None) -> Manifest:
    m = Manifest.empty().with_version(_mv(version="1")).with_version(_mv(version="2"), make_default=False)
    if percent is None:
        return m
    d = m.to_json()
    d["models"]["m"]["canary"] = {"version": "2", "percent": percent}
    return Manifest.from_json(d)


def test_no_version_means_default_and_explicit_version_wins() -> None:
    m = _manifest(None)
    assert pick_version(m, "m", None, "r1").version == "1"
    assert pick_version(_manifest(100), "m", "1", "r1").version == "1"
    with pytest.raises(errors.ModelNotFoundError):
        pick_version(m, "m", "3", None)


@pytest.mark.parametrize("percent", [0, 10, 50, 100])
def test_canary_split_matches_the_percent_and_is_stable_per_request_id(percent: float) -> None:
    m = _manifest(percent)
    ids = [f"req-{i}" for i in range(4000)]
    picks = [pick_version(m, "m", None, rid).version for rid in ids]
    share = picks.count("2") / len(picks)
    assert share == pytest.approx(percent / 100, abs=0.025)
    assert [pick_version(m, "m", None, rid).version for rid in ids[:200]] == picks[:200]
