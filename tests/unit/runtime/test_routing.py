"""Routing policies: pure functions from a RouteContext to a Decision, and the registry that names them.

Each rule of each policy is checked on its own, then every registered policy over a seeded grid of
contexts; none of them may probe the GPU (falling back is the tier dispatcher's job, in test_tiering.py).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from tests.support.fakes import model_version
from tierserve import routing
from tierserve.errors import ConfigurationError, InvalidRequestError
from tierserve.manifest import GenerationSpec, ModelVersion, TierFigures
from tierserve.routing import (
    DEFAULT_GPU_MIN_BYTES,
    DEFAULT_GPU_MIN_ROWS,
    POLICIES,
    Decision,
    EdgeFacts,
    RouteContext,
    cpu_first,
    get_policy,
    gpu_first,
    size_aware,
)

BOTH = ("gpu", "cpu")
TARGET_SETS = [("cpu",), ("gpu",), BOTH]


def never_probed() -> bool:
    raise AssertionError("the policy probed the GPU's health")


def ctx(targets: tuple[str, ...] = BOTH, routing: dict | None = None, **kw) -> RouteContext:
    kw.setdefault("rows", 1)
    kw.setdefault("tensor_bytes", 100)
    kw.setdefault("gpu_usable", never_probed)
    return RouteContext(model=model_version("m", targets, routing=routing), **kw)


# --- hints -------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("hint", ["cpu", "gpu", "GPU", "Cpu"])
def test_hint_wins_over_every_other_rule(policy: str, hint: str) -> None:
    # Given a model on both tiers and a batch that every rule would send the other way
    rows = 1 if hint.lower() == "gpu" else 10_000
    c = ctx(rows=rows, tensor_bytes=rows * 16, hint=hint)
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


# --- size-aware thresholds ----------------------------------------------------------------------


@pytest.mark.parametrize(("rows", "target"), [(1, "cpu"), (63, "cpu"), (64, "gpu"), (65, "gpu"), (4096, "gpu")])
def test_rows_at_or_over_default_gpu_min_rows_go_to_gpu(rows: int, target: str) -> None:
    # Given a two-tier model without routing thresholds in its manifest
    # When size-aware decides for a small payload of `rows` rows
    d = size_aware(ctx(rows=rows, tensor_bytes=10))
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
def test_tensor_bytes_threshold(nbytes: int, target: str) -> None:
    # Given a one-row request carrying around 1 MiB of tensor data (e.g. an image)
    # When size-aware decides
    d = size_aware(ctx(rows=1, tensor_bytes=nbytes))
    # Then tensor bytes >= gpu_min_bytes goes to the GPU
    assert d.target == target


def test_manifest_gpu_min_bytes_overrides_the_default() -> None:
    # Given a model with gpu_min_bytes 1000
    # When size-aware decides for 1000 and 999 tensor bytes
    over = size_aware(ctx(routing={"gpu_min_bytes": 1000}, tensor_bytes=1000))
    under = size_aware(ctx(routing={"gpu_min_bytes": 1000}, tensor_bytes=999))
    # Then the threshold is inclusive
    assert (over.target, under.target) == ("gpu", "cpu")
    assert "1000 tensor bytes >= gpu_min_bytes 1000" in over.reason


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


# --- cpu-first / gpu-first ------------------------------------------------------------------------


def test_cpu_first_prefers_cpu_even_for_big_batches() -> None:
    # Given a big batch on a two-tier model
    # When cpu-first decides
    d = cpu_first(ctx(rows=10_000, tensor_bytes=DEFAULT_GPU_MIN_BYTES * 4))
    # Then it stays on CPU
    assert (d.target, d.reason, d.fallback) == ("cpu", "cpu-first policy", None)


def test_gpu_first_prefers_gpu_even_for_one_row() -> None:
    # Given a one-row request on a two-tier model
    # When gpu-first decides
    d = gpu_first(ctx(rows=1))
    # Then it goes to the GPU (whether the GPU is usable is the dispatcher's question)
    assert (d.target, d.reason, d.fallback) == ("gpu", "gpu-first policy", None)


# --- every registered policy ------------------------------------------------------------------------


def grid(seed: int = 0, n: int = 400) -> list[RouteContext]:
    """A seeded grid of contexts: every target set, thresholds, sizes, hints and times left."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        block = {"gpu_min_rows": int(rng.integers(1, 128)), "gpu_min_bytes": int(rng.integers(1, 1 << 22))}
        if rng.random() < 0.5:
            block["cpu_p95_ms"] = float(rng.uniform(1, 500))
        out.append(ctx(
            TARGET_SETS[rng.integers(len(TARGET_SETS))], block, rows=int(rng.integers(1, 512)),
            tensor_bytes=int(rng.integers(0, 1 << 23)), hint=[None, "", "cpu", "gpu", "CPU"][rng.integers(5)],
            remaining_ms=[None, float(rng.uniform(0, 30_000))][rng.integers(2)],
        ))
    return out


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_picks_a_deployed_tier_or_refuses_the_hint(name: str) -> None:
    policy = get_policy(name)
    for c in grid():
        try:
            d = policy(c)
        except InvalidRequestError:
            # Given a hint for a tier the model is not on, Then the only way out is a 400
            assert c.hint and c.hint.lower() not in c.model.targets
            continue
        # Then the decision names a tier the model is deployed on, with a reason, and never a fallback
        assert isinstance(d, Decision) and d.reason
        assert d.target in c.model.targets, (name, c, d)
        assert d.fallback is None


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_is_a_pure_function_of_its_context(name: str) -> None:
    policy = get_policy(name)
    for c in grid(seed=1, n=100):
        try:
            first = policy(c)
        except InvalidRequestError:
            continue
        assert all(policy(c) == first for _ in range(3))


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_no_built_in_policy_pays_for_a_gpu_health_probe(name: str) -> None:
    # Given contexts whose gpu_usable() fails the test if called, including GPU-sized batches and GPU hints
    policy = get_policy(name)
    for targets, rows, hint in itertools.product(TARGET_SETS, (1, 63, 64, 10_000), (None, "gpu")):
        try:
            # When the policy decides, Then it does so without asking
            policy(ctx(targets, rows=rows, hint=hint))
        except InvalidRequestError:
            assert "gpu" not in targets


# --- the registry --------------------------------------------------------------------------------


def test_registry_names() -> None:
    # Given the registry
    # When each name is looked up
    # Then it returns the function registered under it
    assert set(POLICIES) == {"size-aware", "cpu-first", "gpu-first", "token-aware"}
    for name, fn in POLICIES.items():
        assert get_policy(name) is fn


def test_unknown_policy_is_a_configuration_error_listing_the_names() -> None:
    # Given a misspelt ROUTING_POLICY
    # When it is looked up
    with pytest.raises(ConfigurationError) as info:
        get_policy("sizeaware")
    # Then the message names the bad value and every known policy
    assert "ROUTING_POLICY='sizeaware'" in info.value.message
    assert "cpu-first, gpu-first, size-aware, token-aware" in info.value.message


def test_a_new_policy_plugs_in_through_the_registry_and_routing_policy(monkeypatch, tmp_path) -> None:
    from tierserve.app import build_runtime
    from tierserve.settings import parse_settings

    # Given a policy registered under a new name
    def always_cpu_when_possible(c: RouteContext) -> Decision:
        return Decision("cpu" if c.model.serves_cpu else "gpu", "house rule")

    monkeypatch.setitem(routing.POLICIES, "house", always_cpu_when_possible)
    # When the runtime is built with ROUTING_POLICY=house
    runtime = build_runtime(parse_settings({"MODEL_STORE_URI": str(tmp_path), "ROUTING_POLICY": "house"}))
    # Then the tier dispatcher uses it
    assert runtime.dispatcher.policy is always_cpu_when_possible


# --- the edge: cloud policies ignore it, at_edge puts the device first ------------------------------------


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_cloud_policies_choose_among_the_cloud_targets_only(name: str) -> None:
    # Given a model placed on the edge with the cloud CPU tier beside it, and a GPU-sized batch
    c = ctx(("edge", "cpu"), rows=10_000, tensor_bytes=1 << 30)
    # When a cloud policy decides, Then it picks the CPU: the edge is not a cloud tier
    assert get_policy(name)(c).target == "cpu"


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_an_edge_hint_in_the_cloud_is_400(name: str) -> None:
    with pytest.raises(InvalidRequestError, match="only served by an edge device"):
        get_policy(name)(ctx(("edge", "cpu"), hint="edge"))


def at_device(targets=("edge", "cpu"), held=True, max_rows=8, saturated=False, **kw) -> RouteContext:
    facts = EdgeFacts(held=held, max_rows=max_rows, saturated=lambda: saturated)
    return ctx(targets, edge=facts, **kw)


@pytest.mark.parametrize(("facts", "rows", "target", "why"), [
    ({}, 8, "edge", "held by this device"),
    ({}, 9, "cpu", "9 rows > edge_max_rows 8; forwarded"),
    ({"held": False}, 1, "cpu", "not held by this device; forwarded"),
    ({"saturated": True}, 1, "cpu", "the device is saturated; forwarded"),
    ({"targets": ("gpu",), "held": False}, 1, "gpu", "not placed on the edge; forwarded"),
])
def test_at_edge_serves_on_the_device_what_it_holds_and_can_take(facts, rows, target, why) -> None:
    d = routing.at_edge(size_aware)(at_device(rows=rows, **facts))
    assert d.target == target and d.reason.startswith(why) and d.fallback is None


def test_at_edge_hints() -> None:
    policy = routing.at_edge(size_aware)
    # 'edge' asks for the device: served when held, 400 when not
    assert policy(at_device(hint="edge", rows=1000)).target == "edge"
    with pytest.raises(InvalidRequestError, match="not held by this edge device"):
        policy(at_device(hint="edge", held=False))
    # 'cpu' or 'gpu' asks for the cloud, checked by the cloud policy as the gateway would
    assert policy(at_device(hint="cpu")).target == "cpu"
    with pytest.raises(InvalidRequestError, match="not deployed on gpu"):
        policy(at_device(hint="gpu"))


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_at_edge_is_the_cloud_policy_where_there_is_no_device(name: str) -> None:
    for c in grid(seed=2, n=100):
        try:
            expected = get_policy(name)(c)
        except InvalidRequestError:
            continue
        assert routing.at_edge(get_policy(name))(c) == expected


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_at_edge_serves_here_only_what_fits_else_names_a_cloud_tier(name: str) -> None:
    rng = np.random.default_rng(3)
    policy = routing.at_edge(get_policy(name))
    for _ in range(300):
        targets = [("edge", "cpu"), ("edge", "gpu", "cpu"), ("cpu",), ("gpu",)][rng.integers(4)]
        held, saturated = bool(rng.random() < 0.7) and "edge" in targets, bool(rng.random() < 0.2)
        c = at_device(targets, held=held, max_rows=int(rng.integers(1, 64)), saturated=saturated,
                      rows=int(rng.integers(1, 128)), hint=[None, "", "edge", "cpu"][rng.integers(4)])
        try:
            d = policy(c)
        except InvalidRequestError:
            continue
        if d.target == "edge":
            assert held and (c.hint == "edge" or (c.rows <= c.edge.max_rows and not saturated))
        else:
            assert d.target in c.model.cloud_targets


# --- token-aware (issue 18): a generation routed by its prompt and answer lengths ---------------------------

#: A small int4 model's CPU figures (Lambda, 2 vCPU: the SmolLM-135M shape measured here, ENVIRONMENT.md) and a
#: GPU's (network and queueing included in its time to first token), priced so that Lambda is cheaper per token.
CPU_FIGURES = TierFigures({16: 60.0, 128: 225.0, 512: 900.0}, 135.0, 0.34, "measured")
GPU_FIGURES = TierFigures({16: 20.0, 128: 30.0, 512: 60.0}, 1700.0, 0.50, "cited")
SLOS = {"slo_ttft_ms": 1000.0, "slo_total_ms": 10_000.0}


def generative(targets: tuple[str, ...] = BOTH, tiers: dict | None = None, **spec) -> ModelVersion:
    g = GenerationSpec(context_length=8192, eos_token_ids=(2,), max_tokens_cap=4096,
                       tiers=tiers if tiers is not None else {"cpu": CPU_FIGURES, "gpu": GPU_FIGURES},
                       **({**SLOS, **spec}))
    return dataclasses.replace(model_version("m", targets), task="text-generation", generation=g)


def gen_ctx(prompt: int, answer: int, model: ModelVersion | None = None, **kw) -> RouteContext:
    kw.setdefault("gpu_usable", never_probed)
    return RouteContext(model=model or generative(), rows=1, tensor_bytes=0, prompt_tokens=prompt,
                        max_tokens=answer, **kw)


@pytest.mark.parametrize(("prompt", "answer", "target", "why"), [
    (20, 64, "cpu", "the CPU tier (Lambda) meets the SLO"),         # a short chat: Lambda
    (300, 256, "cpu", "the CPU tier (Lambda) meets the SLO"),
    (2000, 64, "gpu", "the only tier that meets the SLO"),          # a long prompt: CPU's first token too late
    (100, 2048, "gpu", "the only tier that meets the SLO"),         # a long answer: CPU would take ~15 s
])
def test_token_aware_sends_short_chats_to_cpu_and_long_prompts_and_answers_to_gpu(prompt, answer, target, why):
    d = routing.token_aware(gen_ctx(prompt, answer))
    assert d.target == target, d.reason
    assert why in d.reason and f"{prompt} prompt tokens, max_tokens {answer}" in d.reason
    assert d.fallback is None


def test_token_aware_takes_the_fastest_when_no_tier_meets_the_slo() -> None:
    d = routing.token_aware(gen_ctx(6000, 4000, generative(slo_total_ms=2000.0)))
    assert d.target == "gpu" and "no tier meets the SLO" in d.reason and "the fastest, gpu" in d.reason
    assert "gpu misses 2,842 ms to complete > slo_total_ms 2000" in d.reason


def test_token_aware_names_what_the_cpu_would_miss() -> None:
    d = routing.token_aware(gen_ctx(2000, 64))
    assert "time to first token 3,516 ms > slo_ttft_ms 1000" in d.reason
    d = routing.token_aware(gen_ctx(100, 2048))
    assert "ms to complete > slo_total_ms 10000" in d.reason


def test_token_aware_keeps_lambda_first_even_when_a_busy_gpu_is_cheaper_per_token() -> None:
    # Given a GPU cheaper per token than Lambda (the compiler's figure for a well-utilised GPU), both meeting the SLOs
    model = generative(tiers={"cpu": CPU_FIGURES, "gpu": dataclasses.replace(GPU_FIGURES, cost_per_1m_tokens=0.05)})
    # Then a short chat still goes to Lambda: the GPU's capacity is kept for what only it can serve
    d = routing.token_aware(gen_ctx(20, 64, model))
    assert d.target == "cpu" and "GPU's capacity stays for what only it can serve" in d.reason
    # And when only the GPU meets the SLO it is chosen, whatever its price
    assert routing.token_aware(gen_ctx(2000, 64, model)).target == "gpu"


def test_token_aware_prefill_on_the_cpu_is_part_of_its_cost() -> None:
    # Given no SLO at all, a long prompt costs its CPU prefill time (Lambda bills by the millisecond)
    model = generative(slo_ttft_ms=None, slo_total_ms=None)
    cpu = routing.estimate_tier(gen_ctx(2000, 16, model), "cpu")
    gpu = routing.estimate_tier(gen_ctx(2000, 16, model), "gpu")
    assert cpu is not None and gpu is not None and not cpu.misses and not gpu.misses
    assert cpu.cost_usd == pytest.approx(0.34 * (16 + 135.0 * cpu.ttft_ms / 1000) / 1e6)
    assert gpu.cost_usd < cpu.cost_usd
    # And without an SLO Lambda meets it, so even that long prompt stays there (an SLO is what sends it away)
    assert routing.token_aware(gen_ctx(2000, 16, model)).target == "cpu"
    assert routing.token_aware(gen_ctx(2000, 16)).target == "gpu"


def test_token_aware_tokens_per_s_slo_and_the_time_left() -> None:
    # A CPU below the tokens/s objective never serves a generation the GPU can
    assert routing.token_aware(gen_ctx(20, 16, generative(slo_tokens_per_s=200.0))).target == "gpu"
    # A deadline the CPU cannot make (29 s of an HTTP API, here 400 ms) sends it to the GPU
    d = routing.token_aware(gen_ctx(20, 64, remaining_ms=400.0))
    assert d.target == "gpu" and "ms to complete > 400 ms left" in d.reason


def test_token_aware_hints_and_single_tier_models_win() -> None:
    assert routing.token_aware(gen_ctx(6000, 4000, hint="cpu")) == Decision("cpu", "client hint cpu")
    assert routing.token_aware(gen_ctx(20, 16, hint="GPU")) == Decision("gpu", "client hint gpu")
    with pytest.raises(InvalidRequestError, match="not deployed on gpu"):
        routing.token_aware(gen_ctx(20, 16, generative(("cpu",)), hint="gpu"))
    assert routing.token_aware(gen_ctx(6000, 4000, generative(("cpu",)))).target == "cpu"
    assert routing.token_aware(gen_ctx(20, 16, generative(("gpu",)))).target == "gpu"


def test_token_aware_without_figures() -> None:
    # No figures at all: size-aware's answer (a generation is one row)
    assert routing.token_aware(gen_ctx(6000, 4000, generative(tiers={}))).target == "cpu"
    # Only the CPU's, and it misses: the GPU, whose figures are unknown
    d = routing.token_aware(gen_ctx(6000, 16, generative(tiers={"cpu": CPU_FIGURES})))
    assert d.target == "gpu" and "gpu has no figures in the manifest" in d.reason
    # A request that is not a generation: size-aware
    assert routing.token_aware(ctx(rows=100)) == size_aware(ctx(rows=100))


def test_decide_generation_uses_token_aware_under_the_default_policy() -> None:
    c = gen_ctx(2000, 64)
    assert routing.decide_generation(c) == routing.token_aware(c)
    assert routing.decide_generation(c, size_aware) == routing.token_aware(c)  # rows say nothing of tokens
    assert routing.decide_generation(c, cpu_first).target == "cpu"  # an explicit policy decides itself
    with pytest.raises(ValueError, match="prompt_tokens and max_tokens"):
        routing.decide_generation(ctx())


def gen_grid(seed: int, n: int = 400) -> list[RouteContext]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        def figures(fast: float) -> TierFigures:
            base = float(rng.uniform(5, 300)) / fast
            return TierFigures({16: base, 128: base * 3, 512: base * 10}, float(rng.uniform(5, 200)) * fast,
                               [None, float(rng.uniform(0.01, 3))][rng.integers(2)], "grid")
        tiers = {t: figures(f) for t, f in (("cpu", 1.0), ("gpu", 10.0)) if rng.random() < 0.9}
        slos = {k: [None, float(v)][rng.integers(2)] for k, v in (
            ("slo_ttft_ms", rng.uniform(50, 3000)), ("slo_total_ms", rng.uniform(500, 60_000)),
            ("slo_tokens_per_s", rng.uniform(5, 500)))}
        model = generative(TARGET_SETS[rng.integers(len(TARGET_SETS))], tiers, **slos)
        out.append(gen_ctx(int(rng.integers(1, 8000)), int(rng.integers(1, 4096)), model,
                           hint=[None, None, None, "cpu", "gpu"][rng.integers(5)],
                           remaining_ms=[None, float(rng.uniform(100, 900_000))][rng.integers(2)]))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_token_aware_properties(seed: int) -> None:
    for c in gen_grid(seed):
        try:
            d = routing.token_aware(c)
        except InvalidRequestError:
            assert c.hint and c.hint not in c.model.targets
            continue
        # Then a deployed tier, a reason, never a fallback, the same answer again
        assert d.target in c.model.cloud_targets and d.reason and d.fallback is None
        assert routing.token_aware(c) == d
        if c.hint or len(c.model.cloud_targets) == 1:
            continue
        est = {t: routing.estimate_tier(c, t) for t in ("cpu", "gpu")}
        known = {t: e for t, e in est.items() if e is not None}
        meeting = {t: e for t, e in known.items() if not e.misses}
        if meeting:
            # a tier meets the SLO: the chosen one does; Lambda when it does, else none that does is cheaper
            chosen = meeting[d.target]
            if "cpu" in meeting:
                assert d.target == "cpu"
                continue
            costs = [e.cost_usd for e in meeting.values() if e.cost_usd is not None]
            if chosen.cost_usd is not None:
                assert chosen.cost_usd <= min(costs)
            else:
                assert not costs
        elif len(known) == 2:
            # none meets it: the fastest
            assert known[d.target].total_ms <= min(e.total_ms for e in known.values())


def test_token_aware_decision_table(capsys) -> None:
    """The decisions on a mix of prompt and answer lengths (printed with -s; the report's table)."""
    prompts, answers = (16, 128, 512, 1024, 2000, 4096), (16, 128, 512, 1024, 2048)
    rows = [f"{'prompt':>7} | " + " | ".join(f"max {a:>5}" for a in answers)]
    for p in prompts:
        rows.append(f"{p:>7} | " + " | ".join(f"{routing.token_aware(gen_ctx(p, a)).target:>9}" for a in answers))
    print("\n".join(rows))
    table = {(p, a): routing.token_aware(gen_ctx(p, a)).target for p in prompts for a in answers}
    assert table[(16, 16)] == table[(128, 128)] == "cpu"
    assert table[(4096, 16)] == table[(16, 2048)] == "gpu"
    # more tokens never move a generation from the GPU back to the CPU with these figures
    for (p, a), t in table.items():
        if t == "gpu":
            assert all(table[(p2, a2)] == "gpu" for (p2, a2) in table if p2 >= p and a2 >= a)
