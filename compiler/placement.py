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
    reasons.append(
        Reason(
            "lambda_timeout",
            t_max <= lim.timeout_s,
            f"p95 at batch {bmax} is {t_max:.3f} s on 1 vCPU vs the CPU functions' {lim.timeout_s:.0f} s timeout",
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
