"""Quantization variants, from the compiler's own figures: each model's ``report.json``.

The compiler measures every variant when it compiles (``tierserve_compiler.profile``: a fresh
subprocess per variant, onnxruntime on CPU) and gates its accuracy against the source model; this
suite reads those figures (it measures nothing itself, so that the numbers are the compiler's, one
source of truth) and reports, per variant against fp32: p50 latency at batch 1 and 32 on 1 thread,
size, and the accuracy metric. The static int8 work belongs to the compiler; its report says why a
variant was kept or dropped.
"""

from __future__ import annotations

import json
from typing import Any

from tierserve_tools.bench.harness import Context, Figure, Series, Skip

SUITE = "quant"


def _latency(variant: dict[str, Any], batch: str) -> dict[str, float] | None:
    threads = (variant.get("profile") or {}).get("threads") or {}
    per = threads.get("1") or next(iter(threads.values()), None)
    return None if per is None else (per.get("batches") or {}).get(batch)


def run(ctx: Context) -> None:
    reports = sorted(ctx.models.glob("*/*/report.json"))
    if not reports:
        raise Skip(f"no report.json under {ctx.models}: run `make demo` (tierserve compile writes them)")
    for path in reports:
        rep = json.loads(path.read_text())
        variants = rep.get("variants") or {}
        ref = variants.get("fp32")
        if not ref:
            continue
        name = f"{rep.get('name')} v{rep.get('version')}"
        for key, v in variants.items():
            metrics = v.get("metrics") or {}
            for batch in ("1", "32"):
                lat, base = _latency(v, batch), _latency(ref, batch)
                if not lat or not base:
                    continue
                ctx.add(Figure(
                    SUITE, f"{name} {key} batch {batch}: p50 vs fp32",
                    Series(f"{key} p50", [lat["p50_ms"]], p95_ms=lat.get("p95_ms")),
                    Series("fp32 p50", [base["p50_ms"]], p95_ms=base.get("p95_ms")),
                    conditions=f"from {path.relative_to(ctx.models)} (the compiler's profiler, 1 ORT thread, "
                               "one value per figure: its p50)",
                    extra={"size_mb": round(v.get("size_bytes", 0) / 1e6, 2), "size_ratio_vs_fp32":
                           (v.get("size_bytes") or 0) / max(1, ref.get("size_bytes") or 1), "label": f"{key} b{batch}",
                           "metrics": metrics, "decision": v.get("decision"), "reason": v.get("reason"),
                           "within_budget": v.get("within_budget"), "p95_ms": lat.get("p95_ms")}))
