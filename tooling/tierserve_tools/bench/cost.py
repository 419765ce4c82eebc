"""Cost simulation: CPU only (Lambda), GPU only (a Triton fleet) and the size-aware hybrid, by discrete events.

    tierserve bench --suite cost        (or: python -m tierserve_tools.bench.cost [--models build/models] [--quick])

Inputs, all measured or priced elsewhere, none invented here:
* service times from the compiler's ``report.json`` of the model on both tiers (MiniLM by default): the
  CPU variant's p50 and p95 at batch 1, 8 and 32 on one thread (Lambda at 1,769 MB = 1 vCPU), linear
  in rows between those points; the GPU's per-batch time = the fp32 p50 at that batch / the GPU speed-up
  of ``compiler/prices.json`` (the compiler's own assumption: 20x one CPU thread) + 2 ms for the hop;
* the Lambda cold start: the cold-start suite's CpuInferenceFunction figure when it ran, else 1.5 s;
* prices: ``compiler/prices.json`` (Lambda arm64 GB-s and request price, g5.xlarge hourly);
* routing: the manifest's ``gpu_min_rows`` (requests with at least that many rows go to the GPU).

Workload: requests of 1 row (80%), 4 rows (12%) and 64 rows (8%). Two traces of the same mean rate:
**steady** (Poisson), and **bursty** (Poisson whose rate is 0.5x the mean for 8 minutes, then 3x the mean
for 2 minutes, repeating: bursts every 10 minutes, 60% of the requests inside them).

The simulated tiers: **Lambda** runs every request in an execution environment of its own (unbounded
concurrency); an environment idle for 10 minutes is reclaimed, a new one pays the cold start (billed, as
INIT is since 2025). **Triton fleet**: GPU instances, each running one batch at a time, FIFO, dynamic
batching of whatever is queued (up to 64 rows); an autoscaler looks every 60 s at the last minute's
utilisation and sizes the fleet for 50% (the compiler's ``gpu_utilisation``), new instances serving after
180 s of boot (billed), at least one instance; it starts sized for the trace's mean load. The hybrid runs
both, each with its share of the requests.

Comparison: for each trace and rate, the hybrid's monthly cost against the cheapest single tier whose p95
is within 10% of the hybrid's (the same p95); where no single tier reaches it, against the cheapest single
tier (and the table says so). Goal: the hybrid >= 30% cheaper (ratio <= 0.7).
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import random
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tierserve_tools.bench.harness import Context, Figure, Series, Skip, percentile, suite_main

SUITE = "cost"
MIX = ((1, 0.80), (4, 0.12), (64, 0.08))
HOURS_PER_MONTH = 730
PRICES = Path(__file__).resolve().parents[3] / "compiler" / "prices.json"


@dataclass
class Profile:
    cpu_p50: dict[int, float]
    cpu_p95: dict[int, float]
    gpu_fp32_p50: dict[int, float]
    speedup: float
    memory_mb: int
    gpu_min_rows: int
    cold_ms: float
    prices: dict[str, Any]

    def _interp(self, table: dict[int, float], rows: int) -> float:
        pts = sorted(table.items())
        if rows <= pts[0][0]:
            return pts[0][1] * rows / pts[0][0] if rows < pts[0][0] else pts[0][1]
        for (b0, t0), (b1, t1) in itertools.pairwise(pts):
            if rows <= b1:
                return t0 + (t1 - t0) * (rows - b0) / (b1 - b0)
        (b0, t0), (b1, t1) = pts[-2], pts[-1]
        return t1 + (t1 - t0) / (b1 - b0) * (rows - b1)

    def cpu_ms(self, rows: int, rng: random.Random) -> float:
        p50, p95 = self._interp(self.cpu_p50, rows), self._interp(self.cpu_p95, rows)
        sigma = max(0.0, math.log(max(p95, p50) / p50) / 1.645)
        return p50 * math.exp(rng.gauss(0.0, sigma))

    def gpu_ms(self, rows: int) -> float:
        return self._interp(self.gpu_fp32_p50, rows) / self.speedup + 2.0


def load_profile(models: Path, cold_ms: float | None) -> tuple[str, Profile]:
    manifest = json.loads((models / "manifest.json").read_text())
    for name, entry in sorted(manifest["models"].items()):
        body = entry["versions"][entry.get("default_version") or max(entry["versions"], key=int)]
        if set(body.get("targets", [])) != {"gpu", "cpu"}:
            continue
        report = models / name / str(body.get("version", entry.get("default_version", "1"))) / "report.json"
        if not report.is_file():
            report = next(iter(sorted((models / name).glob("*/report.json"))), report)
        if not report.is_file():
            continue
        rep = json.loads(report.read_text())
        cpu_key = body.get("cpu_variant") or body["selected_variant"]

        def table(variant: str, stat: str, rep: dict[str, Any] = rep) -> dict[int, float]:
            threads = rep["variants"][variant]["profile"]["threads"]
            per = threads.get("1") or next(iter(threads.values()))
            return {int(b): float(v[stat]) for b, v in per["batches"].items()}

        prices = json.loads(PRICES.read_text())
        memory = int(body.get("cpu", {}).get("memory_mb", 1769))
        return name, Profile(table(cpu_key, "p50_ms"), table(cpu_key, "p95_ms"), table("fp32", "p50_ms"),
                             float(prices["gpu_speedup_vs_cpu_thread"]), memory,
                             int(body.get("routing", {}).get("gpu_min_rows", 64)), cold_ms or 1500.0, prices)
    raise Skip(f"no model on both tiers with a report.json in {models}: run `make demo` (compiles MiniLM)")


def trace(kind: str, rate: float, seconds: float, seed: int) -> list[tuple[float, int]]:
    """(arrival time s, rows) for a steady or bursty trace of mean ``rate`` requests/s."""
    rng = random.Random(seed)
    sizes = [int(rows) for rows, _ in MIX]
    weights = [float(share) for _, share in MIX]
    out: list[tuple[float, int]] = []
    t = 0.0
    while True:
        r = rate if kind == "steady" else (3.0 * rate if (t % 600) >= 480 else 0.5 * rate)
        t += rng.expovariate(r)
        if t >= seconds:
            return out
        out.append((t, rng.choices(sizes, weights)[0]))


def lambda_tier(reqs: list[tuple[float, int]], p: Profile, seed: int) -> tuple[list[float], float]:
    """Latencies (ms) and cost (USD) of these requests on Lambda."""
    rng = random.Random(seed)
    busy: list[float] = []  # heap of the times busy environments become free
    idle: deque[float] = deque()  # free environments, by the time they became free (oldest left)
    lat: list[float] = []
    billed_ms = 0.0
    keep = 600.0
    for t, rows in reqs:
        while busy and busy[0] <= t:
            idle.append(heapq.heappop(busy))
        while idle and t - idle[0] > keep:  # reclaimed after 10 idle minutes
            idle.popleft()
        cold = 0.0
        if idle:
            idle.pop()  # the most recently used environment serves
        else:
            cold = p.cold_ms
        service = p.cpu_ms(rows, rng)
        lat.append(cold + service)
        billed_ms += math.ceil(cold + service)
        heapq.heappush(busy, t + (cold + service) / 1000)
    gb_s = billed_ms / 1000 * p.memory_mb / 1024
    return lat, gb_s * p.prices["lambda_gb_s_usd"] + len(reqs) * p.prices["lambda_request_usd"]


def gpu_tier(reqs: list[tuple[float, int]], p: Profile, seconds: float, max_rows: int = 64) -> tuple[list[float],
                                                                                                       float, float]:
    """Latencies (ms), cost (USD) and mean instances of a Triton fleet with autoscaling serving ``reqs``."""
    boot, tick, target, cap = 180.0, 60.0, float(p.prices.get("gpu_utilisation", 0.5)), 50
    # (time, kind, order, data); kinds: 0 batch done, 1 instance ready, 2 arrival, 3 autoscaler tick
    events: list[tuple[float, int, int, Any]] = []
    seq = 0

    def push(t: float, kind: int, data: Any = None) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, kind, seq, data))  # at equal times: completions before arrivals

    for t, rows in reqs:
        push(t, 2, rows)
    for k in range(1, int(seconds // tick) + 1):
        push(k * tick, 3)
    # the fleet has been running: it starts sized for the trace's mean load (no batching assumed)
    mean_busy = sum(p.gpu_ms(r) for _, r in reqs) / 1000 / max(seconds, 1e-9)
    n0 = max(1, min(cap, math.ceil(mean_busy / target)))
    instances: dict[int, dict[str, float]] = {i: {"ready": 0.0, "busy": 0.0, "start": 0.0} for i in range(n0)}
    idle = set(instances)
    queue: deque[tuple[float, int]] = deque()
    lat: list[float] = []
    busy_in_window = 0.0
    instance_seconds = 0.0
    next_id = n0
    area = 0.0
    last_t = 0.0

    def dispatch(now: float) -> None:
        nonlocal busy_in_window
        while queue and idle:
            iid = idle.pop()
            batch, rows = [], 0
            while queue and rows + queue[0][1] <= max_rows:
                a, r = queue.popleft()
                batch.append(a)
                rows += r
            if not batch:  # a request bigger than a batch: alone
                a, r = queue.popleft()
                batch, rows = [a], r
            dur = p.gpu_ms(rows) / 1000
            busy_in_window += dur
            for a in batch:
                lat.append((now + dur - a) * 1000)
            push(now + dur, 0, iid)

    while events:
        t, kind, _, data = heapq.heappop(events)
        area += len(instances) * (t - last_t)
        last_t = t
        if kind == 2:
            queue.append((t, data))
            dispatch(t)
        elif kind == 0:
            if data in instances:
                idle.add(data)
            else:  # retired while busy: it stops now
                pass
            dispatch(t)
        elif kind == 1:
            if data in instances:
                idle.add(data)
                dispatch(t)
        elif kind == 3:
            serving = [i for i, v in instances.items() if v["ready"] <= t]
            util = busy_in_window / max(1e-9, len(serving) * tick)
            busy_in_window = 0.0
            want = max(1, min(cap, math.ceil(len(serving) * util / target))) if serving else 1
            have = len(instances)
            if want > have:
                for _ in range(want - have):
                    instances[next_id] = {"ready": t + boot, "busy": 0.0, "start": t}
                    push(t + boot, 1, next_id)
                    next_id += 1
            elif want < len(serving):
                for iid in sorted(idle, reverse=True)[: len(serving) - want]:
                    if len(instances) > 1:
                        idle.discard(iid)
                        del instances[iid]
    instance_seconds = area + len(instances) * max(0.0, seconds - last_t)
    cost = instance_seconds / 3600 * p.prices["gpu_hourly_usd"]
    return lat, cost, instance_seconds / seconds


def simulate(p: Profile, kind: str, rate: float, seconds: float, seed: int = 1) -> dict[str, Any]:
    reqs = trace(kind, rate, seconds, seed)
    month = HOURS_PER_MONTH * 3600 / seconds
    cpu_lat, cpu_cost = lambda_tier(reqs, p, seed)
    gpu_lat, gpu_cost, gpu_n = gpu_tier(reqs, p, seconds)
    small = [r for r in reqs if r[1] < p.gpu_min_rows]
    big = [r for r in reqs if r[1] >= p.gpu_min_rows]
    h_cpu_lat, h_cpu_cost = lambda_tier(small, p, seed)
    h_gpu_lat, h_gpu_cost, h_n = gpu_tier(big, p, seconds)
    out = {}
    for name, lat, cost, extra in (("cpu", cpu_lat, cpu_cost, {}), ("gpu", gpu_lat, gpu_cost, {"instances": gpu_n}),
                                   ("hybrid", h_cpu_lat + h_gpu_lat, h_cpu_cost + h_gpu_cost, {"instances": h_n})):
        out[name] = {"usd_per_month": cost * month, "p50_ms": percentile(lat, 50), "p95_ms": percentile(lat, 95),
                     "p99_ms": percentile(lat, 99), "requests": len(lat), **extra}
    return out


# --- the generation workload (issue 19) --------------------------------------------------------------------
#: (class, prompt tokens, output tokens, share of requests): short chats and long documents
GEN_MIX = (("short chat", 128, 64, 0.8), ("long document", 4096, 256, 0.2))
#: the SLO each configuration is held to (and token-aware routing decides by)
GEN_SLO = {"ttft_ms": 1000.0, "tokens_per_s": 10.0}
#: Lambda's memory for a generation: 1,769 MB = 1 vCPU, the thread count the figures were measured at
GEN_LAMBDA_MB = 1769
GEN_CONFIGS = ("lambda", "gpu", "hybrid")


@dataclass
class GenerationInputs:
    cpu: Any  # tierserve.manifest.TierFigures, measured (1 thread)
    gpu: Any  # TierFigures estimated from compiler/gpu_generation.json (cited)
    table: dict[str, Any]  # compiler/gpu_generation.json
    prices: dict[str, Any]
    model: Any  # tierserve.manifest.ModelVersion on both tiers with both figures and GEN_SLO, for token_aware
    source: str


def generation_inputs(figures: dict[str, Any], model: Any, parameters: int) -> GenerationInputs:
    """The tiers' figures: the CPU tier's measured decode tokens/s and TTFT by prompt length (``figures``), the
    GPU's from the compiler's cited vLLM table for a model of ``parameters``; each priced per 1M tokens as the
    compiler's placement prices them."""
    import dataclasses

    from tierserve.manifest import TierFigures
    from tierserve_compiler.placement import gpu_figures

    prices = json.loads(PRICES.read_text())
    gpu, table = gpu_figures(parameters)
    tok_s = float(figures["decode_tokens_per_s"])
    lam_per_m = GEN_LAMBDA_MB / 1024 * (1e6 / tok_s) * prices["lambda_gb_s_usd"]
    gpu_per_m = prices["gpu_hourly_usd"] / (gpu.tokens_per_s * float(table["concurrency_gain"])
                                            * float(prices["gpu_utilisation"]) * 3600) * 1e6
    cpu = TierFigures({int(k): float(v) for k, v in figures["ttft_ms"].items()}, tok_s, lam_per_m,
                      str(figures.get("source", "measured")))
    gpu = dataclasses.replace(gpu, cost_per_1m_tokens=gpu_per_m)
    spec = dataclasses.replace(model.generation, tiers={"cpu": cpu, "gpu": gpu}, slo_ttft_ms=GEN_SLO["ttft_ms"],
                               slo_tokens_per_s=GEN_SLO["tokens_per_s"], slo_total_ms=None)
    both = dataclasses.replace(model, targets=("gpu", "cpu"), generation=spec)
    return GenerationInputs(cpu, gpu, table, prices, both, str(figures.get("source", "measured")))


def route_classes(g: GenerationInputs) -> dict[str, str]:
    """Each workload class's tier under token-aware routing (``routing.decide_generation``)."""
    from tierserve.routing import RouteContext, decide_generation

    return {name: str(decide_generation(RouteContext(g.model, 1, 0, prompt_tokens=p, max_tokens=o)).target)
            for name, p, o, _ in GEN_MIX}


def generation_cost(g: GenerationInputs, rate: float, routes: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Steady state at ``rate`` requests/s of GEN_MIX: per configuration, USD per 1M output tokens, USD per
    month, GPU instances and the share of requests that meet GEN_SLO.

    Lambda bills each request's duration (TTFT at its prompt + output / decode tokens/s) at GEN_LAMBDA_MB plus
    the request fee; the GPU fleet bills whole instances around the clock, sized for the busy time of what it
    serves (prefill + output / (tokens/s x the table's concurrency gain)) at the compiler's utilisation target,
    at least one instance while it serves anything."""
    month_s = HOURS_PER_MONTH * 3600
    util = float(g.prices["gpu_utilisation"])
    gain = float(g.table["concurrency_gain"])
    out: dict[str, dict[str, Any]] = {}
    plans = {"lambda": {n: "cpu" for n, *_ in GEN_MIX}, "gpu": {n: "gpu" for n, *_ in GEN_MIX}, "hybrid": routes}
    for config, plan in plans.items():
        lam_usd = gpu_busy = tokens = met = 0.0
        for name, prompt, output, share in GEN_MIX:
            n = rate * share * month_s
            tokens += n * output
            tier = plan[name]
            figs = g.cpu if tier == "cpu" else g.gpu
            ttft = figs.ttft_at(prompt)
            if tier == "cpu":
                seconds = ttft / 1000 + output / g.cpu.tokens_per_s
                lam_usd += n * (seconds * GEN_LAMBDA_MB / 1024 * g.prices["lambda_gb_s_usd"]
                                + g.prices["lambda_request_usd"])
            else:
                gpu_busy += n * (ttft / 1000 + output / (g.gpu.tokens_per_s * gain))
            if ttft <= GEN_SLO["ttft_ms"] and figs.tokens_per_s >= GEN_SLO["tokens_per_s"]:
                met += share
        instances = 0 if gpu_busy == 0 else max(1, math.ceil(gpu_busy / month_s / util))
        gpu_usd = instances * HOURS_PER_MONTH * g.prices["gpu_hourly_usd"]
        total = lam_usd + gpu_usd
        out[config] = {"usd_per_1m_output_tokens": total / tokens * 1e6, "usd_per_month": total,
                       "lambda_usd": lam_usd, "gpu_usd": gpu_usd, "gpu_instances": instances, "slo_met_share": met}
    return out


def run_generation(ctx: Context) -> str | None:
    """The generation workload: a figure per rate (the hybrid against the cheapest configuration that meets the
    SLO for every request), the plot ``cost_generation.png`` and the notes. Returns why it could not run, or None."""
    from tierserve_tools.bench import generate

    figures = ctx.notes.get("generate")
    store = Path(figures["store"]) if figures else generate.cache_folder() / "store"
    if not (store / "manifest.json").is_file():
        return "no bench model: run the generate suite first (tierserve bench --suite generate --suite cost)"
    from tierserve.manifest import Manifest

    model = Manifest.from_json(json.loads((store / "manifest.json").read_text())).resolve(generate.MODEL)
    if model.generation is None:
        return f"{generate.MODEL} in {store} is not a text-generation model: rerun the generate suite"
    if figures is None:  # the compiler's measured CPU figures of the same model (1 thread) when generate did not run
        cpu = model.generation.tiers["cpu"]
        figures = {"decode_tokens_per_s": cpu.tokens_per_s, "ttft_ms": cpu.ttft_ms,
                   "source": f"the compiler's profile of {generate.MODEL} ({cpu.source})"}
    g = generation_inputs(figures, model, int(figures.get("parameters") or generate.parameters() or 0))
    routes = route_classes(g)
    rates = (0.01, 0.1, 1, 10, 100) if ctx.quick else (0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100, 300)
    results = {rate: generation_cost(g, rate, routes) for rate in rates}
    for rate, r in results.items():
        meeting = [c for c in GEN_CONFIGS if c != "hybrid" and r[c]["slo_met_share"] >= r["hybrid"]["slo_met_share"]]
        best = min(meeting or ["lambda", "gpu"], key=lambda c: r[c]["usd_per_1m_output_tokens"])
        h, b = r["hybrid"], r[best]
        note = "" if meeting else "; no single tier meets the SLO as often as the hybrid: compared with the cheapest"
        ctx.add(Figure(
            SUITE, f"generation, {rate:g} req/s: hybrid (token-aware) vs {best} only, USD per 1M output tokens",
            Series("hybrid USD/1M output tokens", unit="USD/1M tokens", rate=h["usd_per_1m_output_tokens"]),
            Series(f"{best} only USD/1M output tokens", unit="USD/1M tokens", rate=b["usd_per_1m_output_tokens"]),
            better="lower",
            conditions=f"{', '.join(f'{s:.0%} {n} ({p} prompt + {o} output tokens)' for n, p, o, s in GEN_MIX)}; "
                       f"SLO TTFT <= {GEN_SLO['ttft_ms']:g} ms, >= {GEN_SLO['tokens_per_s']:g} tokens/s; CPU: "
                       f"{g.source}; GPU: {g.table['instance']} from compiler/gpu_generation.json (cited vLLM "
                       f"figure); steady state{note}",
            extra={"workload": "generation", "rate": rate, "routes": routes, "all": r}))
    plot = _plot_generation(results, ctx.workdir, routes)
    notes = ctx.notes.setdefault("suite_notes", {}).setdefault(SUITE, {})
    notes["generation"] = {
        "workload": [{"class": n, "prompt_tokens": p, "output_tokens": o, "share": s} for n, p, o, s in GEN_MIX],
        "slo": GEN_SLO, "routes": routes, "plot": "cost_generation.png" if plot else None,
        "cpu": g.cpu.to_json(), "gpu": g.gpu.to_json(), "lambda_memory_mb": GEN_LAMBDA_MB,
        "results": {str(rate): v for rate, v in results.items()}}
    if plot:
        ctx.notes["plot_files"] = [*ctx.notes.get("plot_files", []), plot]
    return None


def _plot_generation(results: dict[float, Any], workdir: Path, routes: dict[str, str]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rates = sorted(results)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for config, style in (("lambda", "o-"), ("gpu", "s-"), ("hybrid", "^--")):
        ax.plot(rates, [results[r][config]["usd_per_1m_output_tokens"] for r in rates], style,
                label=f"{config}" + (f" ({', '.join(f'{k} -> {v}' for k, v in routes.items())})"
                                     if config == "hybrid" else " only"))
        ax2.plot(rates, [100 * results[r][config]["slo_met_share"] for r in rates], style, label=config)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("mean requests/s (steady)")
    ax.set_ylabel("USD per 1M output tokens")
    ax.set_title("generation workload: cost per 1M output tokens")
    ax.legend(fontsize=7)
    ax2.set_xscale("log")
    ax2.set_ylim(0, 105)
    ax2.set_xlabel("mean requests/s (steady)")
    ax2.set_ylabel("% of requests meeting the SLO")
    ax2.set_title("generation workload: SLO met")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    out = workdir / "cost_generation.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def run(ctx: Context) -> None:
    skipped = run_generation(ctx)
    if skipped:
        ctx.notes.setdefault("suite_notes", {}).setdefault(SUITE, {})["generation"] = {"skipped": skipped}
        ctx.progress(f"generation workload skipped: {skipped}")
    try:
        run_requests(ctx)
    except Skip as exc:
        if skipped:
            raise Skip(f"{exc}; and the generation workload: {skipped}") from exc
        ctx.notes["suite_notes"][SUITE]["requests"] = {"skipped": str(exc)}
        ctx.progress(f"request workload skipped: {exc}")


def run_requests(ctx: Context) -> None:
    """The inference workload (MiniLM-sized requests): CPU only, GPU only and the size-aware hybrid."""
    name, prof = load_profile(ctx.models, ctx.notes.get("cold_start_ms"))
    rates = (0.5, 5, 50, 200) if ctx.quick else (0.2, 1, 5, 20, 50, 100, 200, 500)
    seconds = 600.0 if ctx.quick else 3600.0
    results: dict[str, dict[float, Any]] = {}
    for kind in ("steady", "bursty"):
        results[kind] = {}
        for rate in rates:
            ctx.progress(f"{kind} trace, {rate} req/s, {seconds / 60:.0f} simulated minutes")
            r = simulate(prof, kind, rate, seconds)
            results[kind][rate] = r
            h = r["hybrid"]
            same = [t for t in ("cpu", "gpu") if r[t]["p95_ms"] <= 1.1 * h["p95_ms"]]
            pool = same or ["cpu", "gpu"]
            best = min(pool, key=lambda t: r[t]["usd_per_month"])
            b = r[best]
            note = "" if same else "; no single tier reaches the hybrid's p95: compared with the cheapest"
            ctx.add(Figure(
                SUITE, f"{kind} {rate} req/s: hybrid vs best single tier ({best}) monthly cost",
                Series("hybrid USD/month", unit="USD/month", rate=h["usd_per_month"], count=h["requests"],
                       p50_ms=h["p50_ms"], p95_ms=h["p95_ms"], p99_ms=h["p99_ms"]),
                Series(f"{best} only USD/month", unit="USD/month", rate=b["usd_per_month"], count=b["requests"],
                       p50_ms=b["p50_ms"], p95_ms=b["p95_ms"], p99_ms=b["p99_ms"]),
                better="lower", goal=0.7, goal_op="<=",
                conditions=f"{name}: discrete-event simulation, {seconds / 60:.0f} simulated minutes scaled to a "
                           f"month; p95 in the p95 column (ms){note}",
                extra={"trace": kind, "rate": rate, "all": r}))
    plot = _plot(results, ctx.workdir, name)
    ctx.notes.setdefault("suite_notes", {}).setdefault(SUITE, {}).update({
        "model": name, "plot": "cost.png" if plot else None, "workload": dict(MIX),
        "profile": {"cpu_p50_ms": prof.cpu_p50, "cpu_p95_ms": prof.cpu_p95, "gpu_ms": {b: round(prof.gpu_ms(b), 2)
                    for b in (1, 4, 8, 32, 64)}, "cold_start_ms": prof.cold_ms, "gpu_min_rows": prof.gpu_min_rows},
        "results": {k: {str(rate): v for rate, v in d.items()} for k, d in results.items()}})
    ctx.notes["plot_files"] = [*ctx.notes.get("plot_files", []), plot] if plot else ctx.notes.get("plot_files", [])


def _plot(results: dict[str, dict[float, Any]], workdir: Path, name: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for col, kind in enumerate(("steady", "bursty")):
        rates = sorted(results[kind])
        for tier, style in (("cpu", "o-"), ("gpu", "s-"), ("hybrid", "^-")):
            axes[0][col].plot(rates, [results[kind][r][tier]["usd_per_month"] for r in rates], style, label=tier)
            axes[1][col].plot(rates, [results[kind][r][tier]["p95_ms"] for r in rates], style, label=tier)
        axes[0][col].set_title(f"{name}, {kind} trace: monthly cost")
        axes[1][col].set_title(f"{name}, {kind} trace: p95 latency")
        for row in (0, 1):
            axes[row][col].set_xscale("log")
            axes[row][col].set_yscale("log")
            axes[row][col].set_xlabel("mean requests/s")
            axes[row][col].legend(fontsize=8)
        axes[0][col].set_ylabel("USD / month")
        axes[1][col].set_ylabel("p95 ms")
    fig.tight_layout()
    out = workdir / "cost.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> int:
    return suite_main(SUITE, run, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
