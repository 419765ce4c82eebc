"""The gateway against direct Triton, measured with NVIDIA's perf_analyzer, at concurrency 1, 8 and 16,
with dynamic batching on (``minilm``) and off (``minilm_nodb``).

Both paths get the same 1-row MiniLM request (16 token ids of zeros, perf_analyzer's ``--input-data
zero``) over HTTP: ``perf_analyzer -u GATEWAY -H x-target:gpu`` (API Gateway emulation ->
RouterFunction -> Triton; the header keeps a 1-row request on the GPU tier) and ``perf_analyzer -u
TRITON`` directly. Levels alternate gateway, direct. The goal (issue 10): the gateway at >= 0.8x direct
throughput at concurrency 8.
"""

from __future__ import annotations

from tierserve_tools.bench import serve_stack
from tierserve_tools.bench.harness import Context, Figure, Series, Skip

SUITE = "gateway"
LEVELS = (1, 8, 16)


def run(ctx: Context) -> None:
    from tierserve_tools import perf_analyzer

    found = perf_analyzer.find()
    if found.command is None:
        raise Skip(found.reason)
    stack = serve_stack.stack(ctx)
    gateway, direct = stack.url.removeprefix("http://"), stack.triton.http_url
    count = ctx.n(300, 20)
    extra = ["--measurement-mode", "count_windows", "--measurement-request-count", str(count)]
    shapes = {"input_ids": [serve_stack.TOKENS], "attention_mask": [serve_stack.TOKENS]}
    for model, batching in serve_stack.MODELS.items():
        for c in LEVELS:
            ctx.progress(f"{model} (dynamic batching {'on' if batching else 'off'}), concurrency {c}")
            rows = {}
            for side, url, headers in (("gateway", gateway, ["-H", "x-target:gpu"]), ("direct", direct, [])):
                (row,), _ = perf_analyzer.run(found.command, url, model, [c], ctx.workdir / f"pa-{model}-{side}.csv",
                                              shapes=shapes, stability_pct=1000, max_trials=3,
                                              extra=extra + headers)
                rows[side] = row
            g, d = rows["gateway"], rows["direct"]
            ctx.add(Figure(
                SUITE, f"{model}, dynamic batching {'on' if batching else 'off'}, concurrency {c}: gateway vs direct "
                       "Triton throughput",
                Series("tierserve serve (gateway)", unit="infer/s", rate=g.throughput, count=g.count, p50_ms=g.p50_ms,
                       p95_ms=g.p95_ms, p99_ms=g.p99_ms),
                Series("direct Triton", unit="infer/s", rate=d.throughput, count=d.count, p50_ms=d.p50_ms,
                       p95_ms=d.p95_ms, p99_ms=d.p99_ms),
                better="higher", goal=0.8 if (c == 8 and batching) else None,
                conditions=f"perf_analyzer 2.60 over HTTP, 1-row MiniLM ({serve_stack.TOKENS} tokens, zeros), "
                           f"count windows of {count} requests (3 at least), local tritonserver (Python-backend "
                           "onnxruntime shim on CPU), router: "
                           f"{'in-process' if stack.router_inprocess else 'worker processes'}",
                extra={"concurrency": c, "dynamic_batching": batching}))
