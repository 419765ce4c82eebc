"""`tierserve bench --suite generate`: a generation server's standard figures, each against a raw
onnxruntime-genai ``Generator`` loop on the same model folder and threads, in one run (issue 19).

Why: the people who run generation judge a server by time to first token (TTFT), inter-token latency (ITL),
output tokens/s under concurrency and goodput (requests/s that meet latency targets). Those figures mean
something only beside what the engine alone does on the same machine at the same moment, so every figure here
is the gateway against the raw loop, interleaved, with both sample sets and the ratio.

The model: a random-weight Llama (``tests.support.causal_lm.build_causal_lm``, 8 layers, hidden size 384, a
512-token byte-level BPE; about 11M parameters, fp32, so run it from a checkout) compiled with the real
``tierserve compile`` (``--quantize none --preset fast``: one fp32 variant, the compiler's shortest profile,
placed on the CPU tier). ``--quick`` measures the same figures on a shallower model of the same width
(:data:`QUICK`: 4 layers, hidden 384, about 6M parameters), so that a run from a cold cache (build, compile and
measure) stays well under 3 minutes on 2 loaded cores. Each shape is built once and kept in
``build/bench-generate/<shape + versions>/`` (the key holds the layers and hidden size, so the quick and full
models never share a folder); later runs reuse it. Hidden size 384, not 256: at 256 the intermediate size (512)
equals the vocabulary (512) and onnxruntime-genai 0.18's builder exports a model whose greedy tokens differ from
transformers' (the compile's gate refuses it).

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
* batch generation tokens/s against raw batched generation (goal >= 0.85x) and against generating one prompt at
  a time, on the same compiled model, by batch generation's own bench function (``BATCH_BENCH``); without it the
  suite fails (a figure the issue asks for is never silently left out).
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tierserve_tools.bench.harness import Context, Figure, Series, Skip, percentile, suite_main

SUITE = "generate"
MODEL = "bench-llama"


@dataclass(frozen=True)
class Shape:
    """The bench model's shape: what its cache folder is keyed by (with the seed, context and versions)."""

    layers: int
    hidden: int


#: the full run's model and ``--quick``'s (same width: the builder's export matches transformers' at hidden 384)
FULL, QUICK = Shape(8, 384), Shape(4, 384)
LAYERS, HIDDEN = FULL.layers, FULL.hidden
SEED = 0
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
#: the fleet's cap on the model's concurrent generations during the bench: the sweep's highest concurrency
GENERATION_CAP = max(LEVELS)
#: batch generation's bench function, ``module:function(ctx, folder) -> (served tokens/s, raw tokens/s, notes)``;
#: the notes carry ``one_at_a_time_tokens_per_s`` (the third path) and ``conditions``
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


def shape_of(ctx: Context) -> Shape:
    """The model a run measures: :data:`QUICK` with ``--quick``, else :data:`FULL`."""
    return QUICK if ctx.quick else FULL


def cache_folder(shape: Shape = FULL) -> Path:
    """Where the bench model of ``shape`` is built and compiled (``TIERSERVE_BENCH_CACHE`` overrides
    ``build/bench-generate``); the name holds everything the compiled store depends on."""
    from importlib import metadata

    cache = Path(os.environ.get("TIERSERVE_BENCH_CACHE", ROOT / "build" / "bench-generate"))
    return cache / (f"llama-{shape.layers}x{shape.hidden}-seed{SEED}-ctx{CONTEXT}-"
                    f"genai{metadata.version('onnxruntime-genai')}")


def parameters(shape: Shape = FULL) -> int | None:
    """The bench model's parameter count (its fp32 safetensors' bytes / 4), once it is built."""
    weights = cache_folder(shape) / "hf" / "model.safetensors"
    return weights.stat().st_size // 4 if weights.is_file() else None


def compile_command(hf: Path, validation: Path, out: Path) -> list[str]:
    """``tierserve compile`` of the bench model: the fp32 variant only (``--quantize none``: no int4/int8 to build,
    gate and profile), the compiler's shortest profile (``--preset fast``), on the CPU tier."""
    return [sys.executable, "-m", "tierserve_tools.cli", "compile", str(hf), "--name", MODEL, "--quantize", "none",
            "--preset", "fast", "--target", "cpu", "--validation", str(validation), "--out", str(out), "--quiet"]


def model_store(ctx: Context) -> Path:
    """The compiled store of the bench model (built and compiled once per shape, then reused)."""
    shape = shape_of(ctx)
    work = cache_folder(shape)
    store = work / "store"
    if (store / "manifest.json").is_file():
        return store
    if not (ROOT / "tests" / "support" / "causal_lm.py").is_file():
        raise Skip(f"the bench model is built with tests/support/causal_lm.py, which is not in {ROOT}: run it "
                   "from a checkout")
    sys.path.insert(0, str(ROOT))
    build_causal_lm = importlib.import_module("tests.support.causal_lm").build_causal_lm  # the checkout's

    shutil.rmtree(work, ignore_errors=True)
    ctx.progress(f"building the bench model ({shape.layers} layers, hidden {shape.hidden}) and compiling it "
                 f"(once, into {work})")
    hf = build_causal_lm(work / "hf", "llama", seed=SEED, layers=shape.layers, hidden=shape.hidden,
                         max_positions=CONTEXT)
    (work / "validation.txt").write_text(VALIDATION, encoding="utf-8")
    tmp = work / "store.partial"
    proc = subprocess.run(compile_command(hf, work / "validation.txt", tmp),
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
    """The plain onnxruntime-genai loop, greedy, timed as a client would see tokens; exactly ``new`` tokens
    (``min_length``: an end-of-text token does not stop it early, as ``ignore_eos`` does not on the gateway)."""
    import onnxruntime_genai as og

    t0 = time.perf_counter()
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, min_length=len(prompt) + new, max_length=len(prompt) + new)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    stamps = []
    while not gen.is_done():
        gen.generate_next_token()
        int(gen.get_next_tokens()[0])
        stamps.append(time.perf_counter())
    return _run(t0, stamps, len(stamps))


def gateway_run(host: str, port: int, prompt: list[int], new: int, timeout: float = 300.0) -> Run:
    """``POST /v1/completions`` with ``stream: true`` on the gateway: the SSE chunks' arrival times. Exactly ``new``
    tokens (vLLM's ``ignore_eos``, as the field tools send it): the random-weight bench model ends some prompts
    early, and every request of a level should cost the same."""
    body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": new, "temperature": 0, "ignore_eos": True,
                       "stream": True, "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"the gateway answered {resp.status}: {resp.read()[:500]!r}")
        stamps: list[float] = []
        tokens = 0
        for chunk in sse_chunks(resp):
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


def sse_chunks(resp: Any, error: type[Exception] = RuntimeError) -> Iterator[dict[str, Any]]:
    """The JSON chunks of an OpenAI server-sent-event stream (``data: {...}`` lines) up to ``data: [DONE]``, each as
    it arrives; a chunk that carries an ``error`` raises ``error``."""
    while line := resp.readline():
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            return
        chunk = json.loads(data)
        if "error" in chunk:
            raise error(f"the stream ended with an error: {chunk['error']}")
        yield chunk


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
                       env=stack_env()).start()
    previous = ctx.notes.get("close")

    def close() -> None:
        stack.stop()
        if previous is not None:
            previous()

    ctx.notes["close"] = close
    return stack


def stack_env() -> dict[str, str]:
    """What every function of the bench's ``tierserve serve`` gets besides its own environment."""
    return {"POWERTOOLS_LOG_LEVEL": "ERROR", "ORT_THREADS": str(THREADS), "POWERTOOLS_METRICS_DISABLED": "true",
            "GENERATION_MAX_CONCURRENCY": str(GENERATION_CAP)}


def _warm(ctx: Context, host: str, port: int) -> None:
    """Every router and CPU function environment started (each first invocation is a cold start) and the model
    loaded in each: as many concurrent short generations as environments, twice."""
    ctx.progress(f"warming {max(LEVELS)} router and {CPU_ENVIRONMENTS} CPU function environments")
    for _ in range(2):
        concurrent(lambda i: gateway_run(host, port, prompt_ids(16, i), 4), max(LEVELS), 1)


def run(ctx: Context) -> None:
    os.environ["TIERSERVE_METRICS"] = "false"
    shape = shape_of(ctx)
    store = model_store(ctx)
    from tierserve.generation import engine
    from tierserve.store import ModelStore

    cache_dir = ctx.workdir / "genai-cache"
    ms = ModelStore(str(store), cache_dir=str(cache_dir))
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
    conditions = (f"{MODEL}: random-weight Llama, {shape.layers} layers, hidden {shape.hidden}, vocabulary 512, fp32, "
                  f"compiled by tierserve compile; greedy; {THREADS} intra-op thread; gateway = tierserve serve's "
                  f"streaming REST API /v1/completions stream=true -> RouterFunction -> InvokeWithResponseStream -> "
                  f"CpuInferenceFunction ({CPU_ENVIRONMENTS} environments; fleet cap on concurrent generations "
                  f"{GENERATION_CAP}); baseline = og.Generator loop on the same og.Model in the bench process; "
                  "alternated")
    notes: dict[str, Any] = {"model": MODEL, "layers": shape.layers, "hidden": shape.hidden, "threads": THREADS,
                             "parameters": parameters(shape), "slo": {"ttft_ms": SLO_TTFT_MS, "itl_ms": SLO_ITL_MS},
                             "cpu_environments": CPU_ENVIRONMENTS, "generation_cap": GENERATION_CAP,
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
        "decode_tokens_per_s": percentile(decode, 50), "store": str(store), "cache_dir": str(cache_dir),
        "parameters": parameters(shape),
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


BATCH_FIGURES = ("batch generation tokens/s vs raw batched generation",
                 "batch generation tokens/s vs one prompt at a time")


def batch_bench() -> Callable[[Context, Path], tuple[float, float, dict[str, Any]]]:
    """Batch generation's bench function (``BATCH_BENCH``); an error when it is missing: the suite must not end
    ``ok`` without a figure the issue asks for."""
    module, _, name = BATCH_BENCH.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise RuntimeError(f"batch generation's bench function {BATCH_BENCH} cannot be loaded ({exc}): the figures "
                           f"{' and '.join(BATCH_FIGURES)} cannot be measured") from exc
    return fn  # type: ignore[no-any-return]


def _batch(ctx: Context, folder: Path, notes: dict[str, Any]) -> None:
    """Batch generation tokens/s against raw batched generation (goal >= 0.85x) and against one prompt at a time,
    through batch generation's own bench function."""
    ctx.progress("batch generation: a part of OpenAI batch lines vs raw batched og.Generator vs one at a time")
    served, raw, extra = batch_bench()(ctx, folder)
    one = float(extra["one_at_a_time_tokens_per_s"])
    conditions = str(extra.get("conditions", ""))
    kept = {k: v for k, v in extra.items() if k != "conditions"}
    notes["batch"] = {"tokens_per_s": {"batch_part": served, "raw_batched": raw, "one_at_a_time": one}, **kept}
    runs = int(extra.get("runs") or 0) or None  # each rate is the median of this many timed parts
    ctx.add(Figure(SUITE, BATCH_FIGURES[0], Series("batch generation", unit="tokens/s", rate=served, count=runs),
                   Series("raw batched og.Generator", unit="tokens/s", rate=raw, count=runs), better="higher",
                   goal=0.85, conditions=conditions, extra={"kind": "batch", "baseline": "raw_batched", **kept}))
    ctx.add(Figure(SUITE, BATCH_FIGURES[1], Series("batch generation", unit="tokens/s", rate=served, count=runs),
                   Series("one prompt at a time (LoadedModel.generate)", unit="tokens/s", rate=one, count=runs),
                   better="higher", conditions=conditions,
                   extra={"kind": "batch", "baseline": "one_at_a_time", **kept}))


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
