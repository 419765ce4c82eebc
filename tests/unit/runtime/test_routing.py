"""Routing policies as a registry: properties every registered policy keeps, and pluggability.

Policy-by-policy rules are in test_routing_policy.py; here every policy in POLICIES is checked over
a seeded grid of contexts, and a new policy is plugged in through ROUTING_POLICY.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tierserve import routing
from tierserve.errors import ConfigurationError, InvalidRequestError
from tierserve.manifest import ModelVersion, TensorSpec, Variant
from tierserve.routing import POLICIES, Decision, RouteContext, get_policy

TARGET_SETS = [("cpu",), ("gpu",), ("gpu", "cpu")]


def _mv(targets: tuple[str, ...], routing_block: dict | None = None) -> ModelVersion:
    return ModelVersion("m", "1", (TensorSpec("x", "FP32", (-1, 4)),), (TensorSpec("y", "FP32", (-1, 3)),),
                        {"fp32": Variant("m/1/model.onnx", "0" * 64, 1)}, "fp32", targets,
                        routing=routing_block or {})


def _grid(seed: int = 0, n: int = 400) -> list[RouteContext]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        targets = TARGET_SETS[rng.integers(len(TARGET_SETS))]
        block = {"gpu_min_rows": int(rng.integers(1, 128)), "gpu_min_bytes": int(rng.integers(1, 1 << 22))}
        if rng.random() < 0.5:
            block["cpu_p95_ms"] = float(rng.uniform(1, 500))
        out.append(RouteContext(
            model=_mv(targets, block), rows=int(rng.integers(1, 512)), payload_bytes=int(rng.integers(0, 1 << 23)),
            hint=[None, "", "cpu", "gpu", "CPU"][rng.integers(5)], gpu_usable=bool(rng.random() < 0.5),
            remaining_ms=[None, float(rng.uniform(0, 30_000))][rng.integers(2)],
        ))
    return out


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_picks_a_deployed_tier_or_refuses_the_hint(name: str) -> None:
    policy = get_policy(name)
    for ctx in _grid():
        try:
            d = policy(ctx)
        except InvalidRequestError:
            # Given a hint for a tier the model is not on, Then the only way out is a 400
            assert ctx.hint and ctx.hint.lower() not in ctx.model.targets
            continue
        assert isinstance(d, Decision) and d.reason
        assert d.target in ctx.model.targets, (name, ctx, d)
        # A fallback is only ever to the CPU, only for a model that has it, only when the GPU is unusable
        if d.fallback is not None:
            assert (d.target, d.fallback, ctx.gpu_usable) == ("cpu", "gpu-unavailable", False)
            assert ctx.model.serves_cpu


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_is_a_pure_function_of_its_context(name: str) -> None:
    policy = get_policy(name)
    for ctx in _grid(seed=1, n=100):
        try:
            first = policy(ctx)
        except InvalidRequestError:
            continue
        assert all(policy(ctx) == first for _ in range(3))


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_an_unusable_gpu_never_gets_a_request_for_a_model_with_a_cpu_variant(name: str) -> None:
    policy = get_policy(name)
    for rows, hint in itertools.product((1, 63, 64, 10_000), (None, "gpu")):
        d = policy(RouteContext(_mv(("gpu", "cpu")), rows, 0, hint, None, gpu_usable=False))
        assert d.target == "cpu"
        # flagged as a fallback exactly when the policy wanted the GPU
        assert (d.fallback == "gpu-unavailable") == ("GPU tier unavailable" in d.reason)


def test_a_new_policy_plugs_in_through_the_registry_and_routing_policy(monkeypatch, tmp_path) -> None:
    from tests.support.models import linear_onnx, write_model
    from tierserve.api import build_app
    from tierserve.settings import parse_settings

    # Given a policy registered under a new name
    def always_cpu_when_possible(ctx: RouteContext) -> Decision:
        return Decision("cpu" if ctx.model.serves_cpu else "gpu", "house rule")

    monkeypatch.setitem(routing.POLICIES, "house", always_cpu_when_possible)
    data, _, _ = linear_onnx()
    write_model(tmp_path, "lin", "1", data, (TensorSpec("x", "FP32", (-1, 4)),), (TensorSpec("y", "FP32", (-1, 3)),))
    # When the app is built with ROUTING_POLICY=house
    app = build_app(parse_settings({"MODEL_STORE_URI": str(tmp_path), "ROUTING_POLICY": "house"}))
    # Then the router uses it
    assert app.router.policy is always_cpu_when_possible
    # And an unknown name is a configuration error naming the registered ones
    with pytest.raises(ConfigurationError, match="house"):
        get_policy("nope")
