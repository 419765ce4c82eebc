"""The field's own generation bench tool, guidellm, run unchanged against ``tierserve serve``'s OpenAI endpoint
inside ``tierserve bench --suite generate`` (issue 19), its report saved beside ours and its figures set beside
our suite's for the same load.

Why: a server's generation figures are believed when a tool its users already trust measures them too. guidellm
(PyPI, ``make bench-venv`` puts 0.8.1 in ``.venv-bench``: it needs numpy >= 2 and ``datasets``, which the project's
venv does not hold) runs as a subprocess from its own venv, with its own CLI and nothing patched: it checks
``GET /health``, sends synthetic prompts of ``prompt_tokens`` (counted by the model's own tokenizer, read offline
from the model's folder) with ``max_tokens``, vLLM's ``ignore_eos`` and ``stream_options.continuous_usage_stats``,
streamed, to ``/v1/completions``, and writes its JSON report. The suite then measures its own gateway path
(:func:`tierserve_tools.bench.generate.gateway_run`) at the same concurrency and request count right after each
guidellm level, so both see the same machine at nearly the same moment, and each pair of figures (output tokens/s,
TTFT p50) is recorded with its ratio and whether the two agree within :data:`TOLERANCE`.

What guidellm's report says, as read here (:func:`parse_report`): one benchmark per concurrency level
(``config.strategy.streams``); output tokens/s = the successful requests' output tokens / the benchmark's
duration (guidellm's ``output_tokens_per_second.successful.mean``, the same number); TTFT = its
``time_to_first_token_ms.successful`` median (and mean).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

GUIDELLM_VERSION = "0.8.1"
#: the two tools' figures agree when each ratio is within 1 +- TOLERANCE (issue 19: "agree within 15%")
TOLERANCE = 0.15
LEVELS = (1, 4)
#: guidellm's own report of each level, saved unchanged beside ours (``REPORT.format(c=...)``)
REPORT = "guidellm-generate-c{c}.json"


@dataclass(frozen=True)
class FieldLevel:
    """One concurrency level of a guidellm report."""

    streams: int
    successful: int
    errored: int
    duration_s: float
    output_tokens: int
    output_tokens_per_s: float
    ttft_p50_ms: float
    ttft_mean_ms: float
    prompt_tokens_p50: float
    output_tokens_p50: float


def _stat(metrics: dict[str, Any], name: str) -> dict[str, Any]:
    try:
        stat = metrics[name]["successful"]
    except (KeyError, TypeError) as exc:
        raise RuntimeError(f"the guidellm report has no metrics.{name}.successful: not a guidellm "
                           f"{GUIDELLM_VERSION} JSON report (--output kind=json)?") from exc
    if not isinstance(stat, dict):
        raise RuntimeError(f"the guidellm report's metrics.{name}.successful is not an object")
    return stat


def parse_report(doc: Any) -> dict[int, FieldLevel]:
    """guidellm's JSON report (``--output kind=json``) -> its concurrent levels by stream count."""
    if not isinstance(doc, dict) or not isinstance(doc.get("benchmarks"), list):
        raise RuntimeError("not a guidellm JSON report: no 'benchmarks' list (run guidellm with --output kind=json)")
    levels: dict[int, FieldLevel] = {}
    for i, bench in enumerate(doc["benchmarks"]):
        strategy = ((bench.get("config") or {}).get("strategy") or {}) if isinstance(bench, dict) else {}
        if strategy.get("type_") != "concurrent":
            raise RuntimeError(f"guidellm benchmark {i} is a {strategy.get('type_')!r} profile; this comparison "
                               "reads concurrent ones (--profile kind=concurrent)")
        metrics = bench.get("metrics") or {}
        totals = metrics.get("request_totals") or {}
        duration = float(bench.get("duration") or 0.0)
        tokens = int(_stat(metrics, "output_token_count").get("total_sum") or 0)
        ttft = _stat(metrics, "time_to_first_token_ms")
        streams = int(strategy["streams"])
        levels[streams] = FieldLevel(
            streams=streams, successful=int(totals.get("successful", 0)), errored=int(totals.get("errored", 0)),
            duration_s=duration, output_tokens=tokens,
            output_tokens_per_s=tokens / duration if duration > 0 else 0.0,
            ttft_p50_ms=float(ttft.get("median") or 0.0), ttft_mean_ms=float(ttft.get("mean") or 0.0),
            prompt_tokens_p50=float(_stat(metrics, "prompt_token_count").get("median") or 0.0),
            output_tokens_p50=float(_stat(metrics, "output_token_count").get("median") or 0.0))
    return levels


def agreement(ours: float, field: float, tolerance: float = TOLERANCE) -> tuple[float | None, bool]:
    """(field / ours, whether they agree within ``tolerance``)."""
    if ours <= 0:
        return None, False
    ratio = field / ours
    return ratio, abs(ratio - 1.0) <= tolerance


def command(guidellm: Path | str, target: str, model: str, tokenizer: Path, streams: int, requests: int,
            prompt_tokens: int, output_tokens: int, out: Path) -> list[str]:
    """guidellm's own CLI (0.8.1): a concurrent profile at ``streams``, ``requests`` requests, synthetic prompts."""
    return [str(guidellm), "run",
            "--backend", f"kind=openai_http,target={target},model={model},request_format=/v1/completions",
            "--profile", f"kind=concurrent,streams={streams}",
            "--constraint", f"kind=max_requests,count={requests}",
            "--data", f"kind=synthetic_text,prompt_tokens={prompt_tokens},output_tokens={output_tokens}",
            "--tokenizer", f"kind=hf_auto,model={tokenizer}",
            "--output", f"kind=json,path={out}", "--disable-console-interactive"]


def run_guidellm(ctx: Any, host: str, port: int, folder: Path) -> None:
    """The suite's hook (``ctx.notes["field_tool"]``): guidellm at each of :data:`LEVELS` against the gateway
    that is up, each level followed by ours at the same load; figures and notes, and guidellm's own report of each
    level copied unchanged into ``ctx.notes["out"]`` (bench/results) beside ours."""
    from tierserve_tools.bench import generate as g
    from tierserve_tools.bench.harness import Figure, Series, percentile

    exe = Path(str(ctx.notes["guidellm"]))
    if not exe.is_file():
        raise RuntimeError(f"guidellm is not at {exe}: make bench-venv installs guidellm {GUIDELLM_VERSION} there")
    out_dir = Path(str(ctx.notes.get("out") or ctx.workdir))
    out_dir.mkdir(parents=True, exist_ok=True)
    target = f"http://{host}:{port}"
    new = ctx.n(g.SWEEP_NEW, 32)
    per_level = ctx.n(16, 8)  # fewer and one slow request sways a level (4 a level: 0.55x in a quick run)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    commands: list[str] = []
    rows: dict[str, Any] = {}
    for c in LEVELS:
        out = ctx.workdir / REPORT.format(c=c)
        argv = command(exe, target, g.MODEL, folder, c, per_level, g.SWEEP_PROMPT, new, out)
        commands.append(" ".join(argv))
        ctx.progress(f"guidellm {GUIDELLM_VERSION} at concurrency {c}: {per_level} requests of {g.SWEEP_PROMPT} + "
                     f"{new} tokens")
        t0 = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ctx.workdir, timeout=600,
                              check=False)
        (out_dir / f"guidellm-c{c}.log").write_text(proc.stdout[-20000:] + proc.stderr[-20000:])
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"guidellm exited {proc.returncode} at concurrency {c}: {proc.stderr[-1500:]}")
        saved = out_dir / REPORT.format(c=c)
        saved.write_bytes(out.read_bytes())
        field = parse_report(json.loads(out.read_text()))[c]
        if field.errored:
            raise RuntimeError(f"guidellm saw {field.errored} errored requests at concurrency {c}; see "
                               f"{out_dir / f'guidellm-c{c}.log'}")
        seconds = time.monotonic() - t0
        # ours, the same load right after: c clients, the same number of requests, 128-token prompts, max_tokens
        k = max(1, per_level // c)
        level = g.concurrent(lambda i: g.gateway_run(host, port, g.prompt_ids(g.SWEEP_PROMPT, 1000 + i), new), c, k)
        ours_tps, ours_ttft = level.tokens_per_s, percentile([r.ttft_ms for r in level.runs], 50)
        tps_ratio, tps_ok = agreement(ours_tps, field.output_tokens_per_s)
        ttft_ratio, ttft_ok = agreement(ours_ttft, field.ttft_p50_ms)
        conditions = (f"guidellm {GUIDELLM_VERSION} unchanged from .venv-bench (its own CLI, /v1/completions, "
                      f"streamed, synthetic prompts of {g.SWEEP_PROMPT} tokens by the model's "
                      f"tokenizer, max_tokens {new} with ignore_eos, sampled at its default temperature) then "
                      f"tierserve bench's gateway_run (token-id prompts of {g.SWEEP_PROMPT}, greedy, max_tokens "
                      f"{new}) at concurrency {c}, {per_level} requests each, against the same tierserve serve "
                      f"({target}); agreement: ratio within 1 +- {TOLERANCE:g}")
        extra = {"kind": "field_tool", "tool": f"guidellm {GUIDELLM_VERSION}", "concurrency": c,
                 "tolerance": TOLERANCE}
        ctx.add(Figure(g.SUITE, f"guidellm vs tierserve bench: output tokens/s at concurrency {c}",
                       Series(f"guidellm {GUIDELLM_VERSION}", unit="tokens/s", rate=field.output_tokens_per_s,
                              count=field.successful, p50_ms=field.ttft_p50_ms),
                       Series("tierserve bench gateway", unit="tokens/s", rate=ours_tps, count=len(level.runs),
                              p50_ms=ours_ttft),
                       better="higher", conditions=conditions, extra={**extra, "agree": tps_ok}))
        ctx.add(Figure(g.SUITE, f"guidellm vs tierserve bench: TTFT p50 at concurrency {c}",
                       Series(f"guidellm {GUIDELLM_VERSION}", unit="ms", rate=field.ttft_p50_ms,
                              count=field.successful),
                       Series("tierserve bench gateway", [r.ttft_ms for r in level.runs]),
                       better="lower", conditions=conditions, extra={**extra, "agree": ttft_ok}))
        rows[str(c)] = {"guidellm": asdict(field), "ours": {"tokens_per_s": round(ours_tps, 1),
                                                             "ttft_p50_ms": round(ours_ttft, 1),
                                                             "requests": len(level.runs)},
                        "tokens_per_s_ratio": tps_ratio, "tokens_per_s_agree": tps_ok,
                        "ttft_ratio": ttft_ratio, "ttft_agree": ttft_ok, "guidellm_seconds": round(seconds, 1),
                        "report": str(saved)}
    ctx.notes.setdefault("suite_notes", {}).setdefault(g.SUITE, {})["field_tool"] = {
        "tool": f"guidellm {GUIDELLM_VERSION}", "commands": commands,
        "levels": rows, "tolerance": TOLERANCE}
