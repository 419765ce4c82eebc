"""Routing policies: pure functions from a RouteContext to a Decision (no backends, no I/O)."""

from __future__ import annotations

import pytest

from tierserve.errors import ConfigurationError, InvalidRequestError
from tierserve.manifest import ModelVersion, TensorSpec
from tierserve.routing import (
    DEFAULT_GPU_MIN_BYTES,
    DEFAULT_GPU_MIN_ROWS,
    POLICIES,
    Decision,
    RouteContext,
    cpu_first,
    get_policy,
    gpu_first,
    size_aware,
)

BOTH = ("gpu", "cpu")


def model(targets: tuple[str, ...] = BOTH, routing: dict | None = None) -> ModelVersion:
    return ModelVersion(
        name="m", version="1", inputs=(TensorSpec("x", "FP32", (-1, 4)),), outputs=(TensorSpec("y", "FP32", (-1, 3)),),
        variants={}, selected_variant="fp32", targets=targets, max_batch_size=64, routing=routing or {},
    )


def ctx(targets: tuple[str, ...] = BOTH, routing: dict | None = None, **kw) -> RouteContext:
    kw.setdefault("rows", 1)
    kw.setdefault("payload_bytes", 100)
    return RouteContext(model=model(targets, routing), **kw)


# --- hints -------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("hint", ["cpu", "gpu", "GPU", "Cpu"])
def test_hint_wins_over_every_other_rule(policy: str, hint: str) -> None:
    # Given a model on both tiers and a batch that every rule would send the other way
    rows = 1 if hint.lower() == "gpu" else 10_000
    c = ctx(rows=rows, payload_bytes=rows * 16, hint=hint)
    # When the policy decides
    d = POLICIES[policy](c)
    # Then the hinted tier is chosen, without a fallback
    assert d == Decision(hint.lower(), f"client hint {hint.lower()}")


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_empty_hint_is_no_hint(policy: str) -> None:
    # Given an empty x-target header on a CPU-only model
    # When the policy decides
    d = POLICIES[policy](ctx(("cpu",), hint=""))
    # Then it routes as if there were no hint
    assert d.target == "cpu"
    assert "hint" not in d.reason


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_bad_hint_is_400_naming_the_valid_values(policy: str) -> None:
    # Given a hint that names no tier
    # When the policy decides
    with pytest.raises(InvalidRequestError) as info:
        POLICIES[policy](ctx(hint="tpu"))
    # Then the message quotes the bad value and says what is valid
    assert "'tpu'" in info.value.message
    assert "use 'cpu' or 'gpu'" in info.value.message


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize(("targets", "hint"), [(("cpu",), "gpu"), (("gpu",), "cpu")])
def test_hint_for_a_tier_the_model_is_not_on_is_400(policy: str, targets: tuple[str, ...], hint: str) -> None:
    # Given a single-tier model and a hint for the other tier
    # When the policy decides
    with pytest.raises(InvalidRequestError) as info:
        POLICIES[policy](ctx(targets, hint=hint))
    # Then the 400 names the model, the tier and its real targets, and how to fix it
    msg = info.value.message
    assert "model 'm' v1 is not deployed on " + hint in msg
    assert f"its targets are {targets[0]}" in msg
    assert "--target" in msg


def test_gpu_hint_while_gpu_unusable_falls_back_to_cpu() -> None:
    # Given a GPU hint on a two-tier model while the GPU tier is unusable
    # When size-aware decides
    d = size_aware(ctx(hint="gpu", gpu_usable=False))
    # Then it serves on CPU and says why
    assert (d.target, d.fallback) == ("cpu", "gpu-unavailable")
    assert d.reason.startswith("client hint gpu")


# --- single-target models ------------------------------------------------------------------------


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("rows", [1, DEFAULT_GPU_MIN_ROWS, 10_000])
def test_single_target_models_go_to_their_tier(policy: str, rows: int) -> None:
    # Given a CPU-only and a GPU-only model, with any batch size
    # When the policy decides
    cpu = POLICIES[policy](ctx(("cpu",), rows=rows))
    gpu = POLICIES[policy](ctx(("gpu",), rows=rows))
    # Then each goes to the only tier it is on
    assert (cpu.target, cpu.fallback) == ("cpu", None)
    assert (gpu.target, gpu.fallback) == ("gpu", None)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_gpu_only_model_stays_gpu_when_gpu_unusable(policy: str) -> None:
    # Given a GPU-only model while the GPU tier is unusable
    # When the policy decides
    d = POLICIES[policy](ctx(("gpu",), rows=100, gpu_usable=False))
    # Then it still targets the GPU (there is no CPU variant); the router answers 503
    assert (d.target, d.fallback) == ("gpu", None)


# --- size-aware thresholds ----------------------------------------------------------------------


@pytest.mark.parametrize(("rows", "target"), [(1, "cpu"), (63, "cpu"), (64, "gpu"), (65, "gpu"), (4096, "gpu")])
def test_rows_at_or_over_default_gpu_min_rows_go_to_gpu(rows: int, target: str) -> None:
    # Given a two-tier model without routing thresholds in its manifest
    # When size-aware decides for a small payload of `rows` rows
    d = size_aware(ctx(rows=rows, payload_bytes=10))
    # Then rows >= 64 (the default) goes to the GPU
    assert d.target == target
    assert d.fallback is None


@pytest.mark.parametrize(("rows", "target"), [(7, "cpu"), (8, "gpu")])
def test_manifest_gpu_min_rows_overrides_the_default(rows: int, target: str) -> None:
    # Given a model whose profile says the GPU pays off from 8 rows
    # When size-aware decides
    d = size_aware(ctx(routing={"gpu_min_rows": 8}, rows=rows))
    # Then the manifest threshold is used and named in the reason
    assert d.target == target
    assert "gpu_min_rows 8" in d.reason


@pytest.mark.parametrize(("nbytes", "target"), [(DEFAULT_GPU_MIN_BYTES - 1, "cpu"), (DEFAULT_GPU_MIN_BYTES, "gpu")])
def test_payload_bytes_threshold(nbytes: int, target: str) -> None:
    # Given a one-row request whose body is around 1 MiB (e.g. an image)
    # When size-aware decides
    d = size_aware(ctx(rows=1, payload_bytes=nbytes))
    # Then bytes >= gpu_min_bytes goes to the GPU
    assert d.target == target


def test_manifest_gpu_min_bytes_overrides_the_default() -> None:
    # Given a model with gpu_min_bytes 1000
    # When size-aware decides for 1000 and 999 bytes
    over = size_aware(ctx(routing={"gpu_min_bytes": 1000}, payload_bytes=1000))
    under = size_aware(ctx(routing={"gpu_min_bytes": 1000}, payload_bytes=999))
    # Then the threshold is inclusive
    assert (over.target, under.target) == ("gpu", "cpu")
    assert "1000 bytes >= gpu_min_bytes 1000" in over.reason


@pytest.mark.parametrize(("remaining_ms", "target"), [(49.0, "gpu"), (50.0, "cpu"), (5000.0, "cpu"), (None, "cpu")])
def test_latency_budget_rule_uses_cpu_p95(remaining_ms: float | None, target: str) -> None:
    # Given a small batch on a model whose CPU p95 is 50 ms
    # When size-aware decides with `remaining_ms` left in the invocation
    d = size_aware(ctx(routing={"cpu_p95_ms": 50}, rows=1, remaining_ms=remaining_ms))
    # Then less time than the CPU's p95 sends it to the GPU
    assert d.target == target
    if target == "gpu":
        assert "49 ms left < cpu p95 50 ms" in d.reason


def test_latency_budget_rule_needs_cpu_p95_in_the_manifest() -> None:
    # Given a model without cpu_p95_ms and almost no time left
    # When size-aware decides
    d = size_aware(ctx(rows=1, remaining_ms=1.0))
    # Then the rule does not apply
    assert d.target == "cpu"


@pytest.mark.parametrize(
    "c",
    [
        ctx(rows=64, gpu_usable=False),
        ctx(payload_bytes=DEFAULT_GPU_MIN_BYTES, gpu_usable=False),
        ctx(routing={"cpu_p95_ms": 50}, remaining_ms=10.0, gpu_usable=False),
    ],
    ids=["rows", "bytes", "latency"],
)
def test_gpu_decision_while_gpu_unusable_becomes_cpu_with_fallback(c: RouteContext) -> None:
    # Given a request every GPU rule would send to the GPU, while the GPU tier is unusable
    # When size-aware decides
    d = size_aware(c)
    # Then it is served on CPU with fallback "gpu-unavailable"
    assert d.target == "cpu"
    assert d.fallback == "gpu-unavailable"
    assert d.reason.endswith("GPU tier unavailable")


def test_cpu_decision_is_unaffected_by_gpu_health() -> None:
    # Given a small batch while the GPU is unusable
    # When size-aware decides
    d = size_aware(ctx(rows=1, gpu_usable=False))
    # Then it is a plain CPU decision, not a fallback
    assert (d.target, d.fallback) == ("cpu", None)


# --- cpu-first / gpu-first ------------------------------------------------------------------------


def test_cpu_first_prefers_cpu_even_for_big_batches() -> None:
    # Given a big batch on a two-tier model
    # When cpu-first decides
    d = cpu_first(ctx(rows=10_000, payload_bytes=DEFAULT_GPU_MIN_BYTES * 4))
    # Then it stays on CPU
    assert (d.target, d.reason, d.fallback) == ("cpu", "cpu-first policy", None)


def test_gpu_first_prefers_gpu_and_falls_back_when_unusable() -> None:
    # Given a one-row request on a two-tier model
    # When gpu-first decides with the GPU usable, then unusable
    up = gpu_first(ctx(rows=1))
    down = gpu_first(ctx(rows=1, gpu_usable=False))
    # Then it goes to the GPU, and to the CPU with a fallback when the GPU cannot be used
    assert (up.target, up.fallback) == ("gpu", None)
    assert (down.target, down.fallback) == ("cpu", "gpu-unavailable")


# --- the registry --------------------------------------------------------------------------------


def test_registry_names() -> None:
    # Given the registry
    # When each name is looked up
    # Then it returns the function registered under it
    assert set(POLICIES) == {"size-aware", "cpu-first", "gpu-first"}
    for name, fn in POLICIES.items():
        assert get_policy(name) is fn


def test_unknown_policy_is_a_configuration_error_listing_the_names() -> None:
    # Given a misspelt ROUTING_POLICY
    # When it is looked up
    with pytest.raises(ConfigurationError) as info:
        get_policy("sizeaware")
    # Then the message names the bad value and every known policy
    assert "ROUTING_POLICY='sizeaware'" in info.value.message
    assert "cpu-first, gpu-first, size-aware" in info.value.message
