"""Routing policies: a registry of named, pure functions from a request's context to a target.

A policy sees only facts (the model's targets and thresholds from the compiler's profile, the
request's rows and tensor bytes, read from the header whatever the encoding, the client's hint and
the time left) and returns the tier it prefers as a ``Decision``. The tier dispatcher
(``tierserve.tiering``) carries it out, and it alone turns a GPU decision into the CPU fallback
when the GPU tier is unusable. A policy that wants the GPU's health asks ``ctx.gpu_usable()``,
which probes lazily; none of the built-in ones does. Add a policy by adding a function to
``POLICIES``; pick it with ``ROUTING_POLICY``.

``size-aware`` (the default), in order:
1. a client hint (``x-target`` header or ``parameters.target``) wins, if the model is
   deployed on that tier; a hint for a tier the model is not on is a 400;
2. a model deployed on one tier goes there;
3. a model on both tiers goes to the GPU when the batch has at least ``gpu_min_rows`` rows
   or ``gpu_min_bytes`` bytes of tensor data (thresholds the compiler derived from its
   profile), else CPU;
4. when the time left is below the CPU's measured p95 for a batch this size (``cpu_p95_ms``
   in the manifest's routing block, if present) the GPU is preferred.

``token-aware`` (issue 18) routes a generation from its tokens (:func:`token_aware`; any other request as
``size-aware`` does): it estimates each tier's time to complete from the manifest's figures and takes the
cheapest tier that meets the model's SLOs. The dispatcher routes a generation with :func:`decide_generation`.

At an edge device (``tierserve edge``) the same registry decides, with one step in front of each
policy (``at_edge``): a request is served on the device when the device holds the model's version,
the batch fits the device (``edge_max_rows``) and the device is not saturated; otherwise the cloud
policy names the cloud tier it expects, and the request is forwarded to the cloud gateway, which
decides again with its own facts. Cloud policies look only at the cloud targets (``edge`` is not
theirs to choose).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from tierserve.errors import ConfigurationError, InvalidRequestError
from tierserve.manifest import ModelVersion
from tierserve.tiers import CLOUD_TIERS, Tier

DEFAULT_GPU_MIN_ROWS = 64
DEFAULT_GPU_MIN_BYTES = 1 << 20


def _unknown_health() -> bool:
    return True


@dataclass(frozen=True)
class RouteContext:
    model: ModelVersion
    rows: int
    tensor_bytes: int  # tensor data, from the header: the same for JSON and binary encodings
    hint: str | None = None
    remaining_ms: float | None = None
    #: Probes the GPU tier's health (cached, single flight) only when a policy calls it.
    gpu_usable: Callable[[], bool] = field(default=_unknown_health, compare=False)
    #: Set only at an edge device: what the device holds and can take now.
    edge: EdgeFacts | None = None
    #: Set only for a generation (issue 18): the prompt's length in tokens (exact, or the calibrated estimate:
    #: ``tierserve.generation.tokens``) and the completion's ``max_tokens`` (resolved: never None for a generation).
    prompt_tokens: int | None = None
    max_tokens: int | None = None


@dataclass(frozen=True)
class EdgeFacts:
    held: bool  # the version's edge variant is on the device, verified
    max_rows: int  # the largest batch the device takes (its profile)
    saturated: Callable[[], bool] = field(default=lambda: False, compare=False)


@dataclass(frozen=True)
class Decision:
    target: str  # a Tier: CPU or GPU (EDGE only at an edge device)
    reason: str
    fallback: str | None = None  # set when the preferred tier could not be used


Policy = Callable[[RouteContext], Decision]


def _check_hint(ctx: RouteContext) -> Tier | None:
    if ctx.hint is None or ctx.hint == "":
        return None
    hint = ctx.hint.lower()
    if hint == Tier.EDGE:
        raise InvalidRequestError("target hint 'edge' is only served by an edge device (tierserve edge); "
                                  "in the cloud use 'cpu' or 'gpu'")
    if hint not in CLOUD_TIERS:
        raise InvalidRequestError(f"target hint {ctx.hint!r} is not valid: use 'cpu' or 'gpu' (or 'edge' at a device)")
    tier = Tier(hint)
    if tier not in ctx.model.targets:
        raise InvalidRequestError(
            f"model {ctx.model.name!r} v{ctx.model.version} is not deployed on {tier}; "
            f"its targets are {', '.join(ctx.model.targets)}. Drop the hint or recompile with --target"
        )
    return tier


def _forced(ctx: RouteContext) -> Decision | None:
    """The tier that leaves a policy nothing to decide: the client's hint, else the only cloud tier the model is
    deployed on; None when the policy decides."""
    hint = _check_hint(ctx)
    if hint is not None:
        return Decision(hint, f"client hint {hint}")
    if ctx.model.cloud_targets == (Tier.CPU,):
        return Decision(Tier.CPU, "model is deployed on cpu only")
    if ctx.model.cloud_targets == (Tier.GPU,):
        return Decision(Tier.GPU, "model is deployed on gpu only")
    return None


def size_aware(ctx: RouteContext) -> Decision:
    forced = _forced(ctx)
    if forced is not None:
        return forced
    routing = ctx.model.routing
    min_rows = int(routing.get("gpu_min_rows", DEFAULT_GPU_MIN_ROWS))
    min_bytes = int(routing.get("gpu_min_bytes", DEFAULT_GPU_MIN_BYTES))
    if ctx.rows >= min_rows:
        return Decision(Tier.GPU, f"{ctx.rows} rows >= gpu_min_rows {min_rows}")
    if ctx.tensor_bytes >= min_bytes:
        return Decision(Tier.GPU, f"{ctx.tensor_bytes} tensor bytes >= gpu_min_bytes {min_bytes}")
    cpu_p95 = routing.get("cpu_p95_ms")
    if ctx.remaining_ms is not None and cpu_p95 is not None and ctx.remaining_ms < float(cpu_p95):
        return Decision(Tier.GPU, f"{ctx.remaining_ms:.0f} ms left < cpu p95 {float(cpu_p95):.0f} ms")
    return Decision(Tier.CPU, f"{ctx.rows} rows < gpu_min_rows {min_rows}")


def _first(tier: Tier) -> Policy:
    """A policy that serves on ``tier`` whenever the model is deployed there, else on the other tier."""
    other = Tier.GPU if tier == Tier.CPU else Tier.CPU

    def policy(ctx: RouteContext) -> Decision:
        hint = _check_hint(ctx)
        if hint is not None:
            return Decision(hint, f"client hint {hint}")
        if tier in ctx.model.targets:
            return Decision(tier, f"{tier}-first policy")
        return Decision(other, f"model is deployed on {other} only")

    policy.__name__ = f"{tier}_first"
    policy.__doc__ = f"Serve on {tier.upper()} whenever the model is deployed there; {other.upper()} otherwise."
    return policy


#: CPU whenever the model has a CPU variant; GPU only for GPU-only models or hints.
cpu_first = _first(Tier.CPU)
#: GPU whenever the model is there (the dispatcher falls back to CPU when the GPU is unusable).
gpu_first = _first(Tier.GPU)


# --- token-aware (issue 18) ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TierEstimate:
    """What one tier would make of a generation, from the manifest's figures for it (``TierFigures``).

    ``total_ms`` is the time to first token at the prompt's length plus ``max_tokens`` at the tier's decode
    speed. ``cost_usd`` prices the time the tier is busy with the request: its cost per generated token times
    the tokens it could have decoded meanwhile (``max_tokens`` plus ``tokens_per_s`` x the prefill time), so a
    long prompt costs its prefill on the tier that bills by the millisecond (Lambda); None when the manifest
    gives the tier no cost. ``misses`` names each objective the tier would miss (empty: it meets them all)."""

    tier: str
    ttft_ms: float
    total_ms: float
    cost_usd: float | None
    misses: tuple[str, ...]

    def describe(self) -> str:
        cost = "cost unknown" if self.cost_usd is None else f"${self.cost_usd:.6f}"
        return f"{self.tier} ~{self.ttft_ms:,.0f} ms to first token, ~{self.total_ms:,.0f} ms in all, {cost}"


def estimate_tier(ctx: RouteContext, tier: str) -> TierEstimate | None:
    """``tier``'s estimate for the generation in ``ctx`` (None when the manifest has no figures for it)."""
    spec = ctx.model.generation
    figures = spec.tiers.get(tier) if spec is not None else None
    if spec is None or figures is None or figures.tokens_per_s <= 0:
        return None
    prompt, answer = max(0, ctx.prompt_tokens or 0), max(0, ctx.max_tokens or 0)
    ttft = figures.ttft_at(prompt)
    total = ttft + answer / figures.tokens_per_s * 1000
    cost = None
    if figures.cost_per_1m_tokens is not None:
        cost = figures.cost_per_1m_tokens * (answer + figures.tokens_per_s * ttft / 1000) / 1e6
    misses = []
    if spec.slo_ttft_ms is not None and ttft > spec.slo_ttft_ms:
        misses.append(f"time to first token {ttft:,.0f} ms > slo_ttft_ms {spec.slo_ttft_ms:g}")
    if spec.slo_tokens_per_s is not None and figures.tokens_per_s < spec.slo_tokens_per_s:
        misses.append(f"{figures.tokens_per_s:,.1f} tokens/s < slo_tokens_per_s {spec.slo_tokens_per_s:g}")
    if spec.slo_total_ms is not None and total > spec.slo_total_ms:
        misses.append(f"{total:,.0f} ms to complete > slo_total_ms {spec.slo_total_ms:g}")
    if ctx.remaining_ms is not None and total > ctx.remaining_ms:
        misses.append(f"{total:,.0f} ms to complete > {ctx.remaining_ms:,.0f} ms left")
    return TierEstimate(tier, ttft, total, cost, tuple(misses))


def _token_rule(ctx: RouteContext) -> Decision:
    """A generation on a model in both cloud tiers: Lambda when it meets the SLOs, else the cheapest tier that
    does, else the fastest.

    Why Lambda first and not simply the cheapest per token: a GPU endpoint's per-token price (the manifest's
    ``cost_per_1m_tokens``) assumes the endpoint is kept busy, and it is paid by the hour whether or not it
    is; Lambda is paid per request. A short chat that Lambda serves within the SLO costs its own milliseconds
    there, while on the GPU it takes capacity that long prompts and long answers need (sizing the endpoint up).
    With the compiler's figures a busy GPU is cheaper per token than Lambda for every request, so "cheapest"
    alone would send every chat to the GPU; the cost decides among the tiers that meet the SLO when Lambda
    does not."""
    order = (Tier.CPU, Tier.GPU)  # ties go to the CPU tier (Lambda): it scales with the requests
    facts = f"{ctx.prompt_tokens} prompt tokens, max_tokens {ctx.max_tokens}"
    estimates = {t: estimate_tier(ctx, t) for t in order}
    known = [e for e in estimates.values() if e is not None]
    meeting = [e for e in known if not e.misses]
    if meeting:
        cpu = next((e for e in meeting if e.tier == Tier.CPU), None)
        if cpu is not None and len(meeting) > 1:
            best = cpu
            why = "the CPU tier (Lambda) meets the SLO, so the GPU's capacity stays for what only it can serve"
        else:
            best = min(meeting, key=lambda e: (e.cost_usd is None, e.cost_usd or 0.0, order.index(Tier(e.tier))))
            why = "the cheapest tier that meets the SLO" if len(meeting) > 1 else "the only tier that meets the SLO"
        others = "; ".join(f"{e.describe()}" + (f" (misses {', '.join(e.misses)})" if e.misses else "")
                           for e in known if e is not best)
        return Decision(best.tier, f"{facts}: {why}, {best.describe()}" + (f"; {others}" if others else ""))
    unknown = [t for t in order if estimates[t] is None]
    if known and unknown:
        return Decision(unknown[-1], f"{facts}: no tier with figures meets the SLO ("
                        + "; ".join(f"{e.tier} misses {', '.join(e.misses)}" for e in known)
                        + f"); {unknown[-1]} has no figures in the manifest")
    if not known:
        return size_aware(replace(ctx, prompt_tokens=None, max_tokens=None))
    fastest = min(known, key=lambda e: (e.total_ms, order.index(Tier(e.tier))))
    return Decision(fastest.tier, f"{facts}: no tier meets the SLO ("
                    + "; ".join(f"{e.tier} misses {', '.join(e.misses)}" for e in known)
                    + f"); the fastest, {fastest.describe()}")


def token_aware(ctx: RouteContext) -> Decision:
    """Route a generation by its tokens; any other request as ``size-aware`` does.

    For a generation (``ctx.prompt_tokens`` set), in order:
    1. a client hint (``x-target`` / ``parameters.target``) wins, checked as in ``size-aware``;
    2. a model deployed on one cloud tier goes there;
    3. each tier with figures in the manifest (``GenerationSpec.tiers``) gets an estimate
       (:func:`estimate_tier`): time to first token at this prompt length, time to complete with
       ``max_tokens``, and the cost of that time; it meets the SLO when it misses none of ``slo_ttft_ms``,
       ``slo_tokens_per_s``, ``slo_total_ms`` and the request's time left;
    4. the CPU tier (Lambda) when it meets the SLO; else the cheapest tier that meets it; none: a tier without
       figures if there is one, else the fastest (see :func:`_token_rule` for why Lambda first). No figures at
       all: ``size-aware``.
    The figures come from the manifest only (the compiler's measured profile, GPU figures from its cited
    table); the policy never reads ``compiler/prices.json``."""
    if ctx.prompt_tokens is None:
        return size_aware(ctx)
    forced = _forced(ctx)
    if forced is not None:
        return forced
    return _token_rule(ctx)


def decide_generation(ctx: RouteContext, policy: Policy | None = None) -> Decision:
    """The tier for a generation (``ctx.prompt_tokens`` and ``ctx.max_tokens`` set): ``policy`` decides, except
    that ``size-aware`` (the default), whose rows and bytes say nothing about a generation, hands it to
    :func:`token_aware`. ``cpu-first``, ``gpu-first``, ``token-aware`` and a custom policy decide themselves."""
    if ctx.prompt_tokens is None or ctx.max_tokens is None:
        raise ValueError("decide_generation needs the generation's facts: prompt_tokens and max_tokens")
    chosen = policy if policy is not None and policy is not size_aware else token_aware
    return chosen(ctx)


#: The largest batch an edge device serves itself when neither the manifest nor the device says.
DEFAULT_EDGE_MAX_ROWS = 64


def at_edge(cloud: Policy) -> Policy:
    """``cloud`` as an edge device applies it: serve on the device what it holds and can take, forward the rest.

    A hint ``edge`` asks for the device (400 when it does not hold the model); ``cpu`` or ``gpu``
    asks for the cloud (checked by the cloud policy, as the gateway would). A forwarded decision
    names the cloud tier the cloud policy expects and why the device did not serve it."""

    def policy(ctx: RouteContext) -> Decision:
        edge = ctx.edge
        if edge is None:
            return cloud(ctx)
        hint = (ctx.hint or "").lower()
        if hint == Tier.EDGE:
            if not edge.held:
                raise InvalidRequestError(
                    f"model {ctx.model.name!r} v{ctx.model.version} is not held by this edge device; drop the "
                    "'edge' hint to have it forwarded to the cloud")
            return Decision(Tier.EDGE, "client hint edge")
        if hint:
            return cloud(ctx)
        if not edge.held:
            why = "not placed on the edge" if not ctx.model.serves_edge else "not held by this device"
        elif ctx.rows > edge.max_rows:
            why = f"{ctx.rows} rows > edge_max_rows {edge.max_rows}"
        elif edge.saturated():
            why = "the device is saturated"
        else:
            return Decision(Tier.EDGE, "held by this device")
        d = cloud(ctx)
        return Decision(d.target, f"{why}; forwarded (cloud: {d.reason})")

    policy.__name__ = f"at_edge_{getattr(cloud, '__name__', 'policy')}"
    policy.__doc__ = f"At an edge device: the device first, then {getattr(cloud, '__name__', 'the cloud policy')}."
    return policy


POLICIES: dict[str, Policy] = {
    "size-aware": size_aware,
    "cpu-first": cpu_first,
    "gpu-first": gpu_first,
    "token-aware": token_aware,
}


def get_policy(name: str) -> Policy:
    try:
        return POLICIES[name]
    except KeyError:
        raise ConfigurationError(
            f"ROUTING_POLICY={name!r} is not a known policy; choose one of {', '.join(sorted(POLICIES))}"
        ) from None
