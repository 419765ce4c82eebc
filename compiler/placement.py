"""Where a model is served: ``cpu`` (Lambda), ``gpu`` (Triton) or both (GPU, CPU fallback).

The CPU-tier rules check a model against the function it will run in, as ``template.yaml`` deploys it
(:class:`~tierserve_compiler.config.LambdaLimits`: the memory classes, ``/tmp``, the 30 s timeout), not
against Lambda's quota maxima. They apply in this order; each one's outcome is recorded in report.json
and report.md:

1. ``lambda_package``: the runtime (:attr:`LambdaLimits.runtime_deps_mb`) must fit the 250 MB unzipped
   zip package. The model is not in it: the function fetches it from S3 into ``/tmp`` (so there is no
   container-image deployment to recommend; the project builds none).
2. ``lambda_tmp``: the model, with room to verify it (``tmp_headroom``), must fit the class functions'
   ``/tmp`` (``CpuEphemeralStorageMb``, which ``tierserve deploy-config`` raises up to 10,240 MB).
3. ``lambda_memory``: measured peak RSS (and at least 1.5 x model size + session overhead) must fit the
   largest memory class (10,240 MB).
4. ``lambda_payload``: one row, JSON encoded (~3 x its binary size), must fit the 6 MB sync payload.
5. ``lambda_timeout``: p95 at the largest profiled batch must finish within the class functions' 30 s.
6. ``slo``: with ``--slo-ms``, the smallest memory class whose estimated p95 at batch 1 meets the SLO.
   Latency at ``v`` vCPUs (1,769 MB = 1 vCPU) scales the 1-thread p95 by Amdahl's law with the serial
   fraction measured from 1 and 2 threads (0.5 when only 1 was measured). Without an SLO: 1,769 MB.
7. ``cost``: Lambda $/1M requests = (memory GB x billed duration x GB-s price + request price) x 1e6;
   GPU $/month = hourly price x 730, and its capacity = CPU rows/s at batch 32 x the configured GPU
   speed-up x utilisation. At the expected monthly volume (``prices.json``) the cheaper tier wins.

Decision (without ``--target``): any failed Lambda limit or SLO -> ``gpu``; GPU cheaper -> ``gpu`` with CPU
fallback; else ``cpu``. ``--target cpu|gpu|both`` forces the targets and the report says so. Devices
(``--target edge``, ``--edge-profile``) have their own rules, in ``tierserve_compiler.edge``.

Routing thresholds (used when both tiers serve): ``gpu_min_rows`` is the smallest batch whose CPU
latency, extrapolated per row from the largest profiled batch at the chosen vCPUs, exceeds the
latency budget (the SLO, else 100 ms); ``gpu_min_bytes`` = that many rows x bytes per row.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tierserve_compiler.config import CompileConfig, LambdaLimits
from tierserve_compiler.profile import scaled_latency

DEFAULT_LATENCY_BUDGET_MS = 100.0
JSON_INFLATION = 3.0
HOURS_PER_MONTH = 730


@dataclass
class Reason:
    rule: str
    ok: bool
    detail: str


@dataclass
class Placement:
    targets: list[str]
    cpu: dict[str, int]
    routing: dict[str, int]
    reasons: list[Reason] = field(default_factory=list)
    forced: bool = False
    deployment: str = "zip"
    costs: dict[str, float] = field(default_factory=dict)
    edge: dict[str, Any] = field(default_factory=dict)  # the edge rules' findings (tierserve_compiler.edge)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def place(
    *,
    size_bytes: int,
    profile: dict[str, Any],
    row_bytes: int,
    cfg: CompileConfig,
    prices: dict[str, Any],
    limits: LambdaLimits | None = None,
) -> Placement:
    """Apply the rules above to the CPU variant's size and profile."""
    lim = limits or cfg.limits
    reasons: list[Reason] = []
    size_mb = size_bytes / 2**20
    batches = sorted(int(b) for b in next(iter(profile["threads"].values()))["batches"])
    bmax = batches[-1]

    # 1-5: the CPU tier's functions
    deployment = "zip"
    reasons.append(
        Reason(
            "lambda_package",
            lim.runtime_deps_mb <= lim.package_unzipped_mb,
            f"runtime {lim.runtime_deps_mb:.0f} MB vs the {lim.package_unzipped_mb:.0f} MB unzipped zip package; "
            f"the model ({size_mb:.1f} MB) is fetched from S3 into /tmp, not packaged",
        )
    )
    tmp_need = size_mb * lim.tmp_headroom
    reasons.append(
        Reason(
            "lambda_tmp",
            tmp_need <= lim.tmp_mb,
            f"model {size_mb:.1f} MB (~{tmp_need:,.0f} MB of /tmp while it is verified) vs at most "
            f"{lim.tmp_mb:,.0f} MB, the CPU functions' /tmp (CpuEphemeralStorageMb; tierserve deploy-config sizes it)",
        )
    )
    needed = max(float(profile.get("peak_rss_mb", 0.0)), 1.5 * size_mb + lim.memory_overhead_mb)
    reasons.append(
        Reason(
            "lambda_memory",
            needed <= lim.max_memory_mb,
            f"needs ~{needed:.0f} MB (peak RSS {profile.get('peak_rss_mb', 0):.0f} MB measured) vs the "
            f"largest CPU memory class, {lim.max_memory_mb:,} MB",
        )
    )
    payload_mb = row_bytes * JSON_INFLATION / 2**20
    reasons.append(
        Reason(
            "lambda_payload",
            payload_mb <= lim.sync_payload_mb,
            f"one row is ~{payload_mb:.3f} MB as JSON vs the {lim.sync_payload_mb:.0f} MB synchronous payload limit",
        )
    )
    t_max = scaled_latency(profile, bmax, 1) / 1000
    bound = min(lim.timeout_s, lim.sync_request_s)  # an inference answers one synchronous request
    reasons.append(
        Reason(
            "lambda_timeout",
            t_max <= bound,
            f"p95 at batch {bmax} is {t_max:.3f} s on 1 vCPU vs {bound:.0f} s for a synchronous request "
            "(API Gateway's HTTP API; the CPU functions' own timeout is longer, for streamed generation)",
        )
    )
    hard_ok = all(r.ok for r in reasons)

    # 6: memory size / SLO
    steps = [m for m in lim.memory_classes_mb if needed <= m <= lim.max_memory_mb] or [lim.max_memory_mb]

    def vcpus(mem: int) -> float:
        return min(lim.max_vcpus, mem / lim.mb_per_vcpu)

    slo_ok = True
    if cfg.slo_ms is not None:
        fits = [m for m in steps if scaled_latency(profile, 1, vcpus(m)) <= cfg.slo_ms]
        memory = fits[0] if fits else steps[-1]
        est = scaled_latency(profile, 1, vcpus(memory))
        slo_ok = bool(fits)
        reasons.append(
            Reason(
                "slo",
                slo_ok,
                f"estimated p95 at batch 1 is {est:.2f} ms at {memory:,} MB "
                f"({vcpus(memory):.2f} vCPU) vs SLO {cfg.slo_ms:g} ms",
            )
        )
    else:
        memory = next((m for m in steps if m >= lim.mb_per_vcpu), steps[-1])
        reasons.append(
            Reason(
                "slo",
                True,
                f"no --slo-ms given: {memory:,} MB ({vcpus(memory):.2f} vCPU), estimated "
                f"p95 at batch 1 {scaled_latency(profile, 1, vcpus(memory)):.2f} ms",
            )
        )
    threads = max(1, min(lim.max_vcpus, math.floor(vcpus(memory))))

    # 7: cost
    dur_ms = math.ceil(scaled_latency(profile, 1, vcpus(memory), "p50_ms"))
    lam_per_m = (memory / 1024 * dur_ms / 1000 * prices["lambda_gb_s_usd"] + prices["lambda_request_usd"]) * 1e6
    volume = float(prices.get("expected_requests_per_month", 1e6))
    rows_s = 1000 * bmax / scaled_latency(profile, bmax, 1, "p50_ms") * float(prices["gpu_speedup_vs_cpu_thread"])
    capacity = rows_s * float(prices["gpu_utilisation"]) * 3600 * HOURS_PER_MONTH
    gpu_month = prices["gpu_hourly_usd"] * HOURS_PER_MONTH * max(1, math.ceil(volume / max(capacity, 1e-9)))
    lam_month = lam_per_m * volume / 1e6
    gpu_cheaper = gpu_month < lam_month
    reasons.append(
        Reason(
            "cost",
            not gpu_cheaper,
            f"at {volume:,.0f} requests/month: Lambda ${lam_per_m:.2f}/1M requests "
            f"(${lam_month:,.2f}/month, {memory:,} MB x {dur_ms} ms) vs GPU "
            f"{prices.get('gpu_instance', '')} "
            f"${gpu_month:,.2f}/month",
        )
    )
    costs = {
        "lambda_usd_per_million": lam_per_m,
        "lambda_usd_per_month": lam_month,
        "gpu_usd_per_month": gpu_month,
        "expected_requests_per_month": volume,
    }

    # routing thresholds
    budget = cfg.slo_ms or DEFAULT_LATENCY_BUDGET_MS
    per_row = scaled_latency(profile, bmax, vcpus(memory), "p50_ms") / bmax
    gpu_min_rows = max(1, math.ceil(budget / max(per_row, 1e-6)))
    routing = {"gpu_min_rows": int(gpu_min_rows), "gpu_min_bytes": int(gpu_min_rows * row_bytes)}

    forced = cfg.target != "auto"
    if forced:
        targets = {"cpu": ["cpu"], "gpu": ["gpu"], "both": ["gpu", "cpu"]}[cfg.target]
        failed = [r.rule for r in reasons if not r.ok and r.rule != "cost"]
        note = f" (rules that failed and were overridden: {', '.join(failed)})" if failed and "cpu" in targets else ""
        reasons.append(Reason("forced", True, f"targets forced to {targets} by --target {cfg.target}{note}"))
    elif not hard_ok:
        limits_hit = "; ".join(r.detail for r in reasons if not r.ok and r.rule.startswith("lambda"))
        targets = ["gpu"]
        reasons.append(Reason("decision", True, f"gpu: does not fit the CPU tier's functions ({limits_hit})"))
    elif not slo_ok:
        targets = ["gpu"]
        reasons.append(Reason("decision", True, "gpu: the CPU tier cannot meet the SLO in any memory class"))
    elif gpu_cheaper:
        targets = ["gpu", "cpu"]
        reasons.append(Reason("decision", True, "gpu with cpu fallback: the GPU is cheaper at the expected volume"))
    else:
        targets = ["cpu"]
        reasons.append(Reason("decision", True, "cpu: fits the CPU tier's functions, meets the SLO and is cheaper"))
    return Placement(
        targets, {"memory_mb": int(memory), "threads": int(threads)}, routing, reasons, forced, deployment, costs
    )


# --- causal LMs (issue 17) ---------------------------------------------------------------------------------
#
# A causal LM is placed by its weights plus its KV cache at the full context, and by its speed in tokens:
#
# 1. ``lambda_tmp``: its files (with room to verify them) in the function's /tmp; up to 512 MB SnapStart can
#    restore the function, above that the function needs CpuEphemeralStorageMb and starts without SnapStart;
# 2. ``lambda_memory``: the measured peak RSS (at least the files plus the session overhead) plus the KV cache
#    at the full context (layers x 2 x KV heads x head size x 4 bytes x context, checked against the profile's
#    measurement) in the largest memory class (10,240 MB); one generation per execution environment;
# 3. ``slo``: the smallest memory class that holds it and whose estimated decode tokens/s (batch 1) and time to
#    first token (a 128-token prompt), Amdahl-scaled from the 1-thread and all-thread measurements to the class's
#    vCPUs, meet ``--slo-tokens-per-s`` and ``--slo-ttft-ms``; without SLOs, the smallest class that holds it;
# 4. ``cost``: Lambda $ per 1M generated tokens at that class (GB-s for 1M tokens at its tokens/s, plus one
#    request per default completion) against the GPU tier's, from ``gpu_generation.json`` (cited estimates).
#
# Decision: fits and meets the SLOs -> ``cpu``; does not fit 10,240 MB or cannot meet the SLOs -> ``gpu`` (served
# by vLLM, issue 18); ``--target`` forces it. The edge: the smallest variant within its budget, whose files, KV
# cache at the full context and runtime fit the device profile's memory, with its tokens/s and TTFT estimated
# from the measured profile at the device's cores and speed.

GPU_GENERATION_FILE = Path(__file__).with_name("gpu_generation.json")
SLO_TTFT_PROMPT = 128


def gpu_figures(parameters: int, table: dict[str, Any] | None = None) -> Any:
    """The GPU tier's figures for a model of ``parameters``, estimated from the cited table."""
    import json

    from tierserve.manifest import TierFigures

    t = table or json.loads(GPU_GENERATION_FILE.read_text())
    weights = max(1, parameters) * float(t["weight_bytes_per_parameter"])
    tok_s = float(t["bandwidth_efficiency"]) * float(t["memory_bandwidth_gb_s"]) * 1e9 / weights
    flops = float(t["fp16_tensor_tflops"]) * 1e12 * float(t["prefill_mfu"])
    ttft = {n: 2 * max(1, parameters) * n / flops * 1000 for n in (16, 128, 512)}
    src = (f"estimated for {t['gpu']} ({t['instance']}) from compiler/gpu_generation.json: "
           + "; ".join(f"{k}: {v}" for k, v in t["sources"].items()))
    return TierFigures(ttft, tok_s, None, src), t


def place_generation(src: Any, profile: dict[str, Any], cfg: CompileConfig, prices: dict[str, Any],
                     limits: LambdaLimits | None = None) -> tuple[Placement, dict[str, Any]]:
    """The rules above for the CPU variant's profile; returns the placement and each cloud tier's figures."""
    from tierserve.manifest import TierFigures
    from tierserve_compiler.profile import generative_at

    lim = limits or cfg.limits
    reasons: list[Reason] = []
    size_mb = profile["size_bytes"] / 2**20
    kv = profile["kv"]
    kv_full_mb = kv["full_context_bytes"] / 2**20
    tmp_need = size_mb * lim.tmp_headroom
    snap = tmp_need <= lim.snapstart_tmp_mb
    reasons.append(Reason("lambda_tmp", tmp_need <= lim.tmp_mb,
                          f"files {size_mb:.1f} MB (~{tmp_need:,.1f} MB of /tmp while verified): "
                          + (f"within SnapStart's {lim.snapstart_tmp_mb:.0f} MB /tmp" if snap else
                             f"over SnapStart's {lim.snapstart_tmp_mb:.0f} MB /tmp: the function needs "
                             f"CpuEphemeralStorageMb (at most {lim.tmp_mb:,.0f} MB) and starts without SnapStart")))
    base_mb = max(float(profile.get("peak_rss_mb", 0.0)), size_mb + lim.memory_overhead_mb)
    need = base_mb + kv_full_mb
    fits = need <= lim.max_memory_mb
    reasons.append(Reason("lambda_memory", fits,
                          f"needs ~{need:,.0f} MB: runtime and weights {base_mb:,.0f} MB (peak RSS "
                          f"{profile.get('peak_rss_mb', 0):.0f} MB measured) + KV cache at the full context "
                          f"{src.context_length:,} tokens {kv_full_mb:,.1f} MB ({src.kv_bytes_per_token:,} bytes/token "
                          f"computed, {kv['measured_bytes_per_token']:,.0f} measured at {kv['context']} tokens) vs the "
                          f"largest class, {lim.max_memory_mb:,} MB"))

    def vcpus(mem: int) -> float:
        return min(lim.max_vcpus, mem / lim.mb_per_vcpu)

    def meets(mem: int) -> bool:
        est = generative_at(profile, vcpus(mem))
        return ((cfg.slo_tokens_per_s is None or est["tokens_per_s"] >= cfg.slo_tokens_per_s)
                and (cfg.slo_ttft_ms is None or est["ttft_ms"][_nearest(est["ttft_ms"])] <= cfg.slo_ttft_ms))

    steps = [m for m in lim.memory_classes_mb if need <= m] or [lim.max_memory_mb]
    ok_classes = [m for m in steps if meets(m)]
    memory = ok_classes[0] if ok_classes else steps[-1]
    slo_ok = bool(ok_classes)
    est = generative_at(profile, vcpus(memory))
    ttft128 = est["ttft_ms"][_nearest(est["ttft_ms"])]
    slos = [f"--slo-tokens-per-s {cfg.slo_tokens_per_s:g}" if cfg.slo_tokens_per_s else "",
            f"--slo-ttft-ms {cfg.slo_ttft_ms:g}" if cfg.slo_ttft_ms else ""]
    asked = " and ".join(s for s in slos if s) or "no SLO given"
    reasons.append(Reason("slo", slo_ok, f"at {memory:,} MB ({vcpus(memory):.2f} vCPU): ~{est['tokens_per_s']:,.1f} "
                          f"tokens/s at batch 1, TTFT ~{ttft128:,.1f} ms at a {_nearest(est['ttft_ms'])}-token prompt "
                          f"(Amdahl-scaled from 1 and {max(int(k) for k in profile['threads'])} measured threads) vs "
                          f"{asked}"))
    threads = max(1, min(lim.max_vcpus, math.floor(vcpus(memory))))
    default_tokens = min(256, src.context_length - 1)
    lam_per_m = (memory / 1024 * (1e6 / max(est["tokens_per_s"], 1e-9)) * prices["lambda_gb_s_usd"]
                 + prices["lambda_request_usd"] * 1e6 / default_tokens)
    gpu, table = gpu_figures(src.parameters or int(profile["size_bytes"] / 4))
    gpu_per_m = (prices["gpu_hourly_usd"] / (gpu.tokens_per_s * float(table["concurrency_gain"])
                 * float(prices["gpu_utilisation"]) * 3600) * 1e6)
    reasons.append(Reason("cost", True, f"Lambda ${lam_per_m:,.2f} per 1M tokens ({memory:,} MB at "
                          f"{est['tokens_per_s']:,.1f} tokens/s) vs GPU {table['instance']} ${gpu_per_m:,.2f} per 1M "
                          f"tokens (estimated {gpu.tokens_per_s:,.0f} tokens/s x {table['concurrency_gain']} "
                          f"concurrency x {prices['gpu_utilisation']} utilisation)"))
    spare = max(0.0, memory - base_mb)
    concurrency = max(1, min(4, int(spare // max(kv_full_mb, 1e-9)))) if fits else 1
    forced = cfg.target not in ("auto", "edge")
    if forced:
        targets = {"cpu": ["cpu"], "gpu": ["gpu"], "both": ["gpu", "cpu"]}[cfg.target]
        failed = [r.rule for r in reasons if not r.ok]
        note = f" (rules that failed and were overridden: {', '.join(failed)})" if failed and "cpu" in targets else ""
        reasons.append(Reason("forced", True, f"targets forced to {targets} by --target {cfg.target}{note}"))
    elif not fits or reasons[0].ok is False:
        targets = ["gpu"]
        reasons.append(Reason("decision", True, "gpu: does not fit the CPU tier's functions (10,240 MB with its KV "
                              "cache, or /tmp); the GPU tier serves it with vLLM (issue 18)"))
    elif not slo_ok:
        targets = ["gpu"]
        reasons.append(Reason("decision", True, f"gpu: no CPU memory class meets {asked}; the GPU tier serves it "
                              "with vLLM (issue 18)"))
    else:
        targets = ["cpu"]
        reasons.append(Reason("decision", True, f"cpu: fits the {memory:,} MB class with its KV cache and meets "
                              f"{asked}"))
    cpu_fig = TierFigures({int(k): round(v, 3) for k, v in est["ttft_ms"].items()}, round(est["tokens_per_s"], 3),
                          round(lam_per_m, 4), f"measured: 1 and {max(int(k) for k in profile['threads'])} threads on "
                          f"the build machine, estimated at {vcpus(memory):.2f} vCPU ({memory:,} MB) by Amdahl's law")
    gpu = TierFigures(gpu.ttft_ms, gpu.tokens_per_s, round(gpu_per_m, 4), gpu.source)
    placement = Placement(targets, {"memory_mb": int(memory), "threads": int(threads), "max_concurrency": concurrency},
                          {}, reasons, forced, "zip", {"lambda_usd_per_1m_tokens": lam_per_m,
                                                       "gpu_usd_per_1m_tokens": gpu_per_m})
    placement.edge = {}
    return placement, {"cpu": cpu_fig, "gpu": gpu}


def _nearest(ttft: dict[int, float]) -> int:
    return min(ttft, key=lambda n: abs(n - SLO_TTFT_PROMPT))


def place_generation_edge(placement: Placement, variants: list[Any], src: Any, cfg: CompileConfig,
                          prices: dict[str, Any]) -> tuple[str | None, Any]:
    """The edge rules for a causal LM (``--target edge`` or ``--edge-profile``): the smallest variant within its
    budget, its memory (files + KV cache at the full context + runtime) against the device's, its tokens/s and
    TTFT estimated at the device's cores and speed. Returns (the variant the edge serves or None, its figures)."""
    if cfg.target != "edge" and cfg.edge_profile is None:
        return None, None
    from tierserve.manifest import TASK_TEXT_GENERATION, TierFigures
    from tierserve_compiler.edge import load_profile
    from tierserve_compiler.profile import generative_at
    from tierserve_compiler.variants import REFERENCE, serves

    device = load_profile(cfg.edge_profile)
    cands = [v for v in variants if v.path is not None and v.profile is not None
             and serves(v.key, "cpu", TASK_TEXT_GENERATION) and (v.key == REFERENCE or v.within_budget)]
    best = min(cands, key=lambda v: (v.profile["size_bytes"], v.key))
    prof = best.profile
    size_mb = prof["size_bytes"] / 2**20
    need = max(float(prof.get("peak_rss_mb", 0.0)), size_mb + 8) + prof["kv"]["full_context_bytes"] / 2**20
    mem_ok = need <= device.memory_mb
    est = generative_at(prof, device.cores)
    tok_s = est["tokens_per_s"] * device.speed
    ttft = {k: v / device.speed for k, v in est["ttft_ms"].items()}
    slo_ok = ((cfg.slo_tokens_per_s is None or tok_s >= cfg.slo_tokens_per_s)
              and (cfg.slo_ttft_ms is None or ttft[_nearest(ttft)] <= cfg.slo_ttft_ms))
    reasons = [
        Reason("edge_variant", True, f"{best.key}: the smallest variant within its accuracy budget "
               f"({size_mb:.2f} MB; candidates {', '.join(v.key for v in cands)})"),
        Reason("edge_memory", mem_ok, f"needs ~{need:,.0f} MB with the KV cache at {src.context_length:,} tokens vs "
               f"{device.memory_mb:,} MB on {device.name}"),
        Reason("edge_speed", slo_ok, f"estimated {tok_s:,.1f} tokens/s and TTFT {ttft[_nearest(ttft)]:,.1f} ms at a "
               f"{_nearest(ttft)}-token prompt on {device.name} ({device.cores} cores at {device.speed:g}x this "
               "machine's)"),
    ]
    on_edge = cfg.target == "edge" or (mem_ok and slo_ok)
    forced = ", forced by --target edge" if cfg.target == "edge" else f": it fits {device.name}"
    reasons.append(Reason("edge_decision", True,
                          f"on the edge{forced}" if on_edge else f"not on the edge: it does not fit {device.name}"))
    placement.reasons.extend(reasons)
    placement.edge = {"profile": device.to_json(), "variant": best.key, "tokens_per_s_estimate": round(tok_s, 3),
                      "memory_mb_estimate": round(need, 1), "placed": on_edge}
    fig = TierFigures({int(k): round(v, 3) for k, v in ttft.items()}, round(tok_s, 3), None,
                      f"estimated from the measured profile at {device.cores} cores x {device.speed:g} ({device.name})")
    if not on_edge:
        return None, fig
    placement.targets = ["edge", *[t for t in placement.targets if t != "edge"]]
    return best.key, fig
