"""`tierserve bench --suite generate`: a generation server's standard figures, each against a raw
onnxruntime-genai ``Generator`` loop on the same model folder and threads, in one run (issue 19).

Why: the people who run generation judge a server by time to first token (TTFT), inter-token latency (ITL),
output tokens/s under concurrency and goodput (requests/s that meet latency targets). Those figures mean
something only beside what the engine alone does on the same machine at the same moment, so every figure here
is the gateway against the raw loop, interleaved, with both sample sets and the ratio.

The model: a random-weight Llama (``tests.support.causal_lm.build_causal_lm``, 8 layers, hidden size 384, a
512-token byte-level BPE; about 11M parameters, fp32, so run it from a checkout) compiled with the real
``tierserve compile`` (``--quantize none --preset fast``, placed on the CPU tier). It is built once and kept in
``build/bench-generate/<shape + versions>/`` (a compile takes minutes on 2 loaded cores); later runs reuse it.
Hidden size 384, not 256: at 256 the intermediate size (512) equals the vocabulary (512) and onnxruntime-genai
0.18's builder exports a model whose greedy tokens differ from transformers' (the compile's gate refuses it).

The measured path is the gateway as AWS runs it: ``tierserve serve``'s streaming REST API
(``POST /v1/completions``, ``stream: true``, prompt as token ids, greedy) -> RouterFunction in its own
execution environments under the streaming runtime loop -> ``InvokeWithResponseStream`` -> CpuInferenceFunction
(1 intra-op thread: Lambda's 1,769 MB = 1 vCPU) -> the engine. The baseline: the plain ``og.Generator`` loop
(``append_tokens``, ``generate_next_token``, ``get_next_tokens``) on the very ``og.Model`` the engine loads
(``tierserve.generation.engine.load(folder, 1)``) in this process; at concurrency c, c threads each with its
own ``Generator`` (onnxruntime-genai releases the GIL). Both stop at the same EOS or ``max_tokens``.

Figures:
* TTFT at prompts of 16, 128 and 512 tokens (first streamed text against the first ``get_next_tokens``);
* ITL p50 and p99 (gaps between streamed text chunks against gaps between tokens), 128-token prompts;
* output tokens/s at concurrency 1, 4 and 16 (completion tokens / wall time of the level);
* goodput at the SLO (TTFT <= ``SLO_TTFT_MS`` and the request's mean ITL <= ``SLO_ITL_MS``): requests/s that
  meet both, at each concurrency;
* batch generation tokens/s against raw batched generation: when batch generation (issue 19, B2) provides a
  bench function (``BATCH_BENCH``); else recorded as skipped with the reason in the suite's notes.
"""

from __future__ import annotations

import http.client
import importlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tierserve_tools.bench.harness import Context, Figure, Series, Skip, percentile, suite_main

SUITE = "generate"
MODEL = "bench-llama"
LAYERS, HIDDEN, SEED = 8, 384, 0
CONTEXT = 1024
THREADS = 1
PROMPTS = (16, 128, 512)
LEVELS = (1, 4, 16)
#: the concurrency sweep's prompt and answer (guidellm's ``prompt_tokens=128,output_tokens=64``)
SWEEP_PROMPT, SWEEP_NEW = 128, 64
#: the stated SLO for goodput: a request meets it when both hold
SLO_TTFT_MS = 1000.0
SLO_ITL_MS = 100.0
#: CpuInferenceFunction's execution environments (a reserved concurrency of 4: 2 cores cannot run 16 at once)
CPU_ENVIRONMENTS = 4
#: batch generation's bench function, ``module:function(ctx, folder) -> (served tokens/s, raw tokens/s, notes)``
BATCH_BENCH = "tierserve_tools.bench.batch_generate:measure"
ROOT = Path(__file__).resolve().parents[3]
VALIDATION = ("The with statement is used to wrap the execution of a block with methods defined by a context "
              "manager.\n\nThe for statement is used to iterate over the elements of a sequence.\n")


@dataclass
class Run:
    """One generation as a client saw it: times in ms from the request's start."""

    ttft_ms: float
    gaps_ms: list[float] = field(default_factory=list)  # between successive tokens (raw) or text chunks (served)
    tokens: int = 0
    total_ms: float = 0.0

    @property
    def itl_ms(self) -> float:
        """The request's mean inter-token latency (time per output token after the first)."""
        return (self.total_ms - self.ttft_ms) / max(1, self.tokens - 1)

    def meets(self, ttft_ms: float = SLO_TTFT_MS, itl_ms: float = SLO_ITL_MS) -> bool:
        return self.ttft_ms <= ttft_ms and self.itl_ms <= itl_ms


@dataclass
class Level:
    """Every request of one concurrency level and the level's wall time."""

    runs: list[Run]
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return sum(r.tokens for r in self.runs) / self.seconds if self.seconds > 0 else 0.0

    @property
    def goodput(self) -> float:
        return sum(r.meets() for r in self.runs) / self.seconds if self.seconds > 0 else 0.0


# --- the model ---------------------------------------------------------------------------------------------


def cache_folder() -> Path:
    """Where the bench model is built and compiled (``TIERSERVE_BENCH_CACHE`` overrides ``build/bench-generate``)."""
    from importlib import metadata

    cache = Path(os.environ.get("TIERSERVE_BENCH_CACHE", ROOT / "build" / "bench-generate"))
    return cache / f"llama-{LAYERS}x{HIDDEN}-seed{SEED}-ctx{CONTEXT}-genai{metadata.version('onnxruntime-genai')}"


def parameters() -> int | None:
    """The bench model's parameter count (its fp32 safetensors' bytes / 4), once it is built."""
    weights = cache_folder() / "hf" / "model.safetensors"
    return weights.stat().st_size // 4 if weights.is_file() else None


def model_store(ctx: Context) -> Path:
    """The compiled store of the bench model (built and compiled once, then reused)."""
    work = cache_folder()
    store = work / "store"
    if (store / "manifest.json").is_file():
        return store
    if not (ROOT / "tests" / "support" / "causal_lm.py").is_file():
        raise Skip(f"the bench model is built with tests/support/causal_lm.py, which is not in {ROOT}: run it "
                   "from a checkout")
    sys.path.insert(0, str(ROOT))
    build_causal_lm = importlib.import_module("tests.support.causal_lm").build_causal_lm  # the checkout's

    shutil.rmtree(work, ignore_errors=True)
    ctx.progress(f"building the bench model ({LAYERS} layers, hidden {HIDDEN}) and compiling it (once; minutes)")
    hf = build_causal_lm(work / "hf", "llama", seed=SEED, layers=LAYERS, hidden=HIDDEN, max_positions=CONTEXT)
    (work / "validation.txt").write_text(VALIDATION, encoding="utf-8")
    tmp = work / "store.partial"
    proc = subprocess.run([sys.executable, "-m", "tierserve_tools.cli", "compile", str(hf), "--name", MODEL,
                           "--quantize", "none", "--preset", "fast", "--target", "cpu", "--validation",
                           str(work / "validation.txt"), "--out", str(tmp), "--quiet"],
                          capture_output=True, text=True, check=False, cwd=work,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"tierserve compile of the bench model failed: {proc.stderr[-2000:]}")
    tmp.rename(store)
    return store


def prompt_ids(length: int, salt: int = 0) -> list[int]:
    """A deterministic prompt of ``length`` token ids inside the vocabulary, away from the special tokens."""
    return [3 + (7 * i + 13 * salt) % 500 for i in range(length)]


# --- the two paths -----------------------------------------------------------------------------------------


def raw_run(model: Any, prompt: list[int], new: int) -> Run:
    """The plain onnxruntime-genai loop, greedy, timed as a client would see tokens."""
    import onnxruntime_genai as og

    t0 = time.perf_counter()
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + new)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    stamps = []
    while not gen.is_done():
        gen.generate_next_token()
        int(gen.get_next_tokens()[0])
        stamps.append(time.perf_counter())
    return _run(t0, stamps, len(stamps))


def gateway_run(host: str, port: int, prompt: list[int], new: int, timeout: float = 300.0) -> Run:
    """``POST /v1/completions`` with ``stream: true`` on the gateway: the SSE chunks' arrival times."""
    body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"the gateway answered {resp.status}: {resp.read()[:500]!r}")
        stamps: list[float] = []
        tokens = 0
        while line := resp.readline():
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"the stream ended with an error: {chunk['error']}")
            if any(c.get("text") for c in chunk.get("choices") or ()):
                stamps.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
        end = time.perf_counter()
    finally:
        conn.close()
    run = _run(t0, stamps, tokens)
    run.total_ms = (end - t0) * 1000
    return run


def _run(t0: float, stamps: list[float], tokens: int) -> Run:
    if not stamps:
        raise RuntimeError("no token came back")
    ms = [(s - t0) * 1000 for s in stamps]
    return Run(ms[0], [b - a for a, b in itertools.pairwise(ms)], tokens, ms[-1])


def concurrent(fn: Callable[[int], Run], concurrency: int, per_client: int) -> Level:
    """``concurrency`` client threads, each running ``fn(request number)`` ``per_client`` times."""
    runs: list[Run] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        for i in range(per_client):
            try:
                r = fn(k * per_client + i)
            except BaseException as exc:  # the level fails with the first error, after every thread stops
                with lock:
                    errors.append(exc)
                return
            with lock:
                runs.append(r)

    threads = [threading.Thread(target=client, args=(k,), name=f"bench-client-{k}") for k in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return Level(runs, seconds)


# --- the suite ---------------------------------------------------------------------------------------------


def _start_gateway(ctx: Context, store: Path) -> Any:
    from tierserve_tools.serve import LocalStack

    ctx.progress(f"starting tierserve serve (streaming REST API, {max(LEVELS)} router and {CPU_ENVIRONMENTS} "
                 "CPU function environments)")
    stack = LocalStack(store, port=0, triton=False, batch=False, s3=False, workdir=ctx.workdir / "serve-generate",
                       router_workers=max(LEVELS), cpu_workers=CPU_ENVIRONMENTS,
                       env={"POWERTOOLS_LOG_LEVEL": "ERROR", "ORT_THREADS": str(THREADS),
                            "POWERTOOLS_METRICS_DISABLED": "true"}).start()
    previous = ctx.notes.get("close")

    def close() -> None:
        stack.stop()
        if previous is not None:
            previous()

    ctx.notes["close"] = close
    return stack


def _warm(ctx: Context, host: str, port: int) -> None:
    """Every router and CPU function environment started (each first invocation is a cold start) and the model
    loaded in each: as many concurrent short generations as environments, twice."""
    ctx.progress(f"warming {max(LEVELS)} router and {CPU_ENVIRONMENTS} CPU function environments")
    for _ in range(2):
        concurrent(lambda i: gateway_run(host, port, prompt_ids(16, i), 4), max(LEVELS), 1)


def run(ctx: Context) -> None:
    os.environ["TIERSERVE_METRICS"] = "false"
    store = model_store(ctx)
    from tierserve.generation import engine
    from tierserve.store import ModelStore

    ms = ModelStore(str(store), cache_dir=str(ctx.workdir / "genai-cache"))
    version = ms.manifest().resolve(MODEL)
    folder = ms.fetch(version.cpu_artifact).parent
    model = engine.load(folder, THREADS).model
    spec = version.generation
    new = ctx.n(SWEEP_NEW, 32)
    stack = _start_gateway(ctx, store)
    host, port = stack.host, stack.port
    _warm(ctx, host, port)
    for length in PROMPTS:  # warm the raw loop at each length too
        raw_run(model, prompt_ids(length), 2)
    conditions = (f"{MODEL}: random-weight Llama, {LAYERS} layers, hidden {HIDDEN}, vocabulary 512, fp32, compiled "
                  f"by tierserve compile; greedy; {THREADS} intra-op thread; gateway = tierserve serve's streaming "
                  f"REST API /v1/completions stream=true -> RouterFunction -> InvokeWithResponseStream -> "
                  f"CpuInferenceFunction ({CPU_ENVIRONMENTS} environments); baseline = og.Generator loop on the "
                  "same og.Model in the bench process; alternated")
    notes: dict[str, Any] = {"model": MODEL, "layers": LAYERS, "hidden": HIDDEN, "threads": THREADS,
                             "slo": {"ttft_ms": SLO_TTFT_MS, "itl_ms": SLO_ITL_MS},
                             "cpu_environments": CPU_ENVIRONMENTS,
                             "compiler_cpu_figures": spec.tiers["cpu"].to_json()
                             if spec is not None and "cpu" in spec.tiers else None}

    # TTFT at each prompt length, and ITL from the 128-token runs: alternated raw / gateway at concurrency 1
    n = ctx.n(10, 3)
    itl: dict[str, list[float]] = {"raw": [], "gateway": []}
    ttft_new = 16
    for length in PROMPTS:
        ctx.progress(f"time to first token, {length}-token prompt, {n} runs each")
        raw_t, gw_t = [], []
        for i in range(n):
            prompt = prompt_ids(length, i)
            r = raw_run(model, prompt, ttft_new if length != SWEEP_PROMPT else new)
            g = gateway_run(host, port, prompt, ttft_new if length != SWEEP_PROMPT else new)
            raw_t.append(r.ttft_ms)
            gw_t.append(g.ttft_ms)
            if length == SWEEP_PROMPT:
                itl["raw"] += r.gaps_ms
                itl["gateway"] += g.gaps_ms
        ctx.add(Figure(SUITE, f"time to first token, {length}-token prompt: gateway vs raw",
                       Series("gateway (streamed)", gw_t), Series("raw og.Generator", raw_t), better="lower",
                       conditions=conditions, extra={"prompt_tokens": length, "kind": "ttft"}))
    for q in (50, 99):
        ctx.add(Figure(SUITE, f"inter-token latency p{q}, {SWEEP_PROMPT}-token prompt: gateway vs raw",
                       Series(f"gateway chunk gaps p{q}", [percentile(itl["gateway"], q)], unit="ms",
                              p50_ms=percentile(itl["gateway"], 50), p95_ms=percentile(itl["gateway"], 95),
                              p99_ms=percentile(itl["gateway"], 99)),
                       Series(f"raw token gaps p{q}", [percentile(itl["raw"], q)], unit="ms",
                              p50_ms=percentile(itl["raw"], 50), p95_ms=percentile(itl["raw"], 95),
                              p99_ms=percentile(itl["raw"], 99)),
                       better="lower", conditions=conditions + f"; {len(itl['gateway'])} gateway gaps, "
                       f"{len(itl['raw'])} raw gaps", extra={"kind": "itl", "quantile": q,
                                                               "gaps": {k: len(v) for k, v in itl.items()}}))

    # the concurrency sweep: output tokens/s and goodput, raw first then the gateway, at each level
    per_client = ctx.n(4, 1)
    levels: dict[int, dict[str, Any]] = {}
    for c in LEVELS:
        k = max(per_client, 2 if c == 1 else per_client)
        ctx.progress(f"concurrency {c}: {c * k} requests of {SWEEP_PROMPT} + {new} tokens, raw then gateway")
        raw_level = concurrent(lambda i: raw_run(model, prompt_ids(SWEEP_PROMPT, i), new), c, k)
        gw_level = concurrent(lambda i: gateway_run(host, port, prompt_ids(SWEEP_PROMPT, i), new), c, k)
        levels[c] = {"raw": raw_level, "gateway": gw_level}
        sweep = conditions + f"; {c} clients x {k} requests, {SWEEP_PROMPT}-token prompts, max_tokens {new}"
        ctx.add(Figure(SUITE, f"output tokens/s at concurrency {c}: gateway vs raw",
                       _rate("gateway", gw_level, "tokens/s", gw_level.tokens_per_s),
                       _rate("raw og.Generator", raw_level, "tokens/s", raw_level.tokens_per_s),
                       better="higher", conditions=sweep, extra={"concurrency": c, "kind": "tokens_per_s"}))
        ctx.add(Figure(SUITE, f"goodput at concurrency {c} (TTFT <= {SLO_TTFT_MS:g} ms, ITL <= {SLO_ITL_MS:g} "
                              "ms): gateway vs raw",
                       _rate("gateway", gw_level, "req/s", gw_level.goodput),
                       _rate("raw og.Generator", raw_level, "req/s", raw_level.goodput),
                       better="higher", conditions=sweep + f"; SLO: TTFT <= {SLO_TTFT_MS:g} ms and the request's "
                       f"mean ITL <= {SLO_ITL_MS:g} ms",
                       extra={"concurrency": c, "kind": "goodput",
                              "met": {"gateway": sum(r.meets() for r in gw_level.runs),
                                      "raw": sum(r.meets() for r in raw_level.runs), "of": len(gw_level.runs)}}))
    notes["sweep"] = {str(c): {side: {"tokens_per_s": round(lv.tokens_per_s, 1), "goodput": round(lv.goodput, 3),
                                      "requests": len(lv.runs), "seconds": round(lv.seconds, 2),
                                      "ttft_p50_ms": round(percentile([r.ttft_ms for r in lv.runs], 50), 1),
                                      "itl_p50_ms": round(percentile([r.itl_ms for r in lv.runs], 50), 2)}
                               for side, lv in v.items()} for c, v in levels.items()}
    # the figures the cost suite prices (measured CPU decode speed and TTFT by prompt length, 1 thread)
    decode = [1000 / r.itl_ms for r in levels[1]["gateway"].runs if r.itl_ms > 0]
    ctx.notes["generate"] = {
        "decode_tokens_per_s": percentile(decode, 50), "store": str(store), "parameters": parameters(),
        "ttft_ms": {f.extra["prompt_tokens"]: f.measured.value for f in ctx.figures
                    if f.suite == SUITE and f.extra.get("kind") == "ttft"},
        "source": f"measured by tierserve bench --suite generate ({MODEL}, {THREADS} thread)",
        "gateway": f"{host}:{port}", "model": MODEL, "tokenizer": str(folder)}
    _batch(ctx, folder, notes)
    ctx.notes.setdefault("suite_notes", {})[SUITE] = notes
    field_tool = ctx.notes.get("field_tool")
    if callable(field_tool):  # `make bench` runs guidellm against this gateway while it is up
        field_tool(ctx, host, port, folder)


def _rate(name: str, level: Level, unit: str, value: float) -> Series:
    ttft = [r.ttft_ms for r in level.runs]
    return Series(name, unit=unit, rate=value, count=len(level.runs), p50_ms=percentile(ttft, 50),
                  p95_ms=percentile(ttft, 95), p99_ms=percentile(ttft, 99))


def _batch(ctx: Context, folder: Path, notes: dict[str, Any]) -> None:
    """Batch generation tokens/s against raw batched generation, through batch generation's own bench function."""
    module, _, name = BATCH_BENCH.partition(":")
    try:
        measure = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        notes["skipped_figures"] = {"batch generation tokens/s vs raw batched generation":
                                    f"batch generation (issue 19's batch part) has no bench function yet "
                                    f"({BATCH_BENCH} is not in this tree); rerun once it is committed"}
        ctx.progress("batch generation figure skipped: " + notes["skipped_figures"][
            "batch generation tokens/s vs raw batched generation"])
        return
    served, raw, extra = measure(ctx, folder)
    ctx.add(Figure(SUITE, "batch generation tokens/s vs raw batched generation",
                   Series("batch generation", unit="tokens/s", rate=served), Series("raw batched og", unit="tokens/s",
                                                                                  rate=raw),
                   better="higher", goal=0.85, conditions=str(extra.get("conditions", "")),
                   extra={"kind": "batch", **{k: v for k, v in extra.items() if k != "conditions"}}))


def main() -> int:
    def run_and_stop(ctx: Context) -> None:
        try:
            run(ctx)
        finally:
            close = ctx.notes.pop("close", None)
            if close is not None:
                close()

    return suite_main(SUITE, run_and_stop, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
