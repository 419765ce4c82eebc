"""What the serving path costs a generation: ``DataPlane.generate`` (in process, warm) against a raw
onnxruntime-genai ``Generator`` loop on the same model folder and threads, in one run (issue 17's closing
note: decode tokens/s >= 0.95x raw, time to first token <= raw + 5 ms).

Why a script and not a test: it measures, on whatever machine runs it. The model is a random-weight Llama built
here (``tests.support.causal_lm``, so run it from a checkout) and exported with onnxruntime-genai's builder;
greedy, ``--prompt`` tokens of prompt, at most ``--new`` tokens (both paths stop at the same EOS, greedy: the
same tokens, checked), runs alternated raw / served so drift hits both, medians reported.

    python -m tierserve_tools.bench.generate_overhead --layers 8 --hidden 256 --threads 1 --runs 15

``--through serve`` measures the same against ``tierserve serve`` instead (goal: TTFT <= raw + 15 ms): a streamed
``POST /v1/completions`` (the prompt as token ids, greedy, ``include_usage``) through the streaming REST API ->
RouterFunction -> ``InvokeWithResponseStream`` -> CpuInferenceFunction (``ORT_THREADS`` = ``--threads``), timed
by the client (TTFT: the first text chunk; decode tokens/s: completion tokens - 1 over the time from the first to
the last text chunk), against the raw loop on an ``og.Model`` of the same files and threads in this process
(the served path's processes are idle while the raw loop runs, and the other way round). The load average is
recorded with the figures: on a shared machine a ratio means something only beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _raw(model: Any, prompt: list[int], new: int) -> tuple[float, float, int]:
    """(TTFT ms, decode tokens/s) of the plain onnxruntime-genai loop."""
    import onnxruntime_genai as og

    t0 = time.perf_counter()
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + new)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    gen.generate_next_token()
    int(gen.get_next_tokens()[0])
    first = time.perf_counter()
    n = 1
    while not gen.is_done():
        gen.generate_next_token()
        int(gen.get_next_tokens()[0])
        n += 1
    end = time.perf_counter()
    return (first - t0) * 1000, (n - 1) / (end - first), n


def _served(dataplane: Any, name: str, prompt: list[int], new: int) -> tuple[float, float, int]:
    """(TTFT ms, decode tokens/s) through DataPlane.generate, as a client sees the events."""
    from tierserve.generation.requests import KIND_COMPLETION, GenerationRequest, SamplingParams

    req = GenerationRequest(model=name, version=None, kind=KIND_COMPLETION, prompt_ids=tuple(prompt),
                            params=SamplingParams(max_tokens=new, temperature=0.0))
    t0 = time.perf_counter()
    gen = dataplane.generate(req)
    it = iter(gen)
    next(it)
    first = time.perf_counter()
    n = 1
    for _ in it:
        n += 1
    end = time.perf_counter()
    return (first - t0) * 1000, (n - 1) / (end - first), n


def _served_http(host: str, port: int, name: str, prompt: list[int], new: int) -> tuple[float, float, int]:
    """(TTFT ms, decode tokens/s, completion tokens) of a streamed completion through ``tierserve serve``."""
    import http.client

    body = json.dumps({"model": name, "prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=300)
    conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise SystemExit(f"tierserve serve answered {resp.status}: {resp.read()[:2000]!r}")
    first = last = 0.0
    tokens = 0
    while line := resp.readline():
        if not line.startswith(b"data: {"):
            continue
        now = time.perf_counter()
        chunk = json.loads(line[6:])
        if chunk.get("choices"):
            first = first or now
            last = now
        if chunk.get("usage"):
            tokens = int(chunk["usage"]["completion_tokens"])
    conn.close()
    return (first - t0) * 1000, (tokens - 1) / (last - first) if last > first else 0.0, tokens


def _load() -> list[float]:
    import os

    return [round(x, 2) for x in os.getloadavg()]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128, help="prompt length in tokens")
    ap.add_argument("--new", type=int, default=128, help="tokens generated per run")
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--through", choices=("inprocess", "serve"), default="inprocess",
                    help="inprocess: DataPlane.generate in this process, warm; serve: tierserve serve's streaming "
                         "REST API -> RouterFunction -> CpuInferenceFunction")
    args = ap.parse_args(argv)

    import os

    os.environ["TIERSERVE_METRICS"] = "false"
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the checkout: tests.support
    from tests.support.causal_lm import build_causal_lm
    from tests.support.genai_models import TinyLM, write_genai_store
    from tierserve.app import build_runtime
    from tierserve.generation import engine
    from tierserve.protocol.dataplane import DataPlane
    from tierserve.settings import Settings

    with tempfile.TemporaryDirectory(prefix="genbench-") as tmp:
        root = Path(tmp)
        hf = build_causal_lm(root / "hf", "llama", layers=args.layers, hidden=args.hidden,
                             max_positions=args.prompt + args.new + 8)
        out = root / "genai"
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                        "-p", "fp32", "-e", "cpu"], check=True, capture_output=True, cwd=root)
        lm = TinyLM("llama", hf, out)
        store = root / "store"
        write_genai_store(store, "bench", lm, context_length=args.prompt + args.new + 8,
                          default_max_tokens=args.new, max_tokens_cap=args.new)
        if args.through == "serve":
            return _through_serve(args, root, store, out)
        rt = build_runtime(Settings(model_store_uri=str(store), model_cache_dir=str(root / "cache"),
                                    ort_threads=args.threads))
        dp = DataPlane(rt)
        prompt = [(7 * i) % 500 + 3 for i in range(args.prompt)]
        # The raw loop runs the very og.Model the served path runs (same folder, same threads overlay)
        folder = rt.store.fetch(rt.store.manifest().resolve("bench").cpu_artifact).parent
        raw_model = engine.load(folder, args.threads).model
        for _ in range(2):  # warm both
            _raw(raw_model, prompt, args.new)
            _served(dp, "bench", prompt, args.new)
        raw, served = [], []
        for _ in range(args.runs):
            raw.append(_raw(raw_model, prompt, args.new))
            served.append(_served(dp, "bench", prompt, args.new))
            assert raw[-1][2] == served[-1][2], f"raw made {raw[-1][2]} tokens, served {served[-1][2]}"
        med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
               for k, v in (("raw", raw), ("served", served))}
        result = {
            "conditions": {"layers": args.layers, "hidden": args.hidden, "threads": args.threads,
                           "prompt_tokens": args.prompt, "new_tokens": raw[-1][2], "runs": args.runs,
                           "greedy": True, "variant": "fp32"},
            "raw": {"ttft_ms": round(med["raw"][0], 2), "tokens_per_s": round(med["raw"][1], 1)},
            "served": {"ttft_ms": round(med["served"][0], 2), "tokens_per_s": round(med["served"][1], 1)},
            "tokens_per_s_ratio": round(med["served"][1] / med["raw"][1], 3),
            "ttft_delta_ms": round(med["served"][0] - med["raw"][0], 2),
            "goals": {"tokens_per_s_ratio": ">= 0.95", "ttft_delta_ms": "<= 5"},
            "load_average": _load(),
        }
        engine.clear()
    print(json.dumps(result, indent=2))
    return result


def _through_serve(args: argparse.Namespace, root: Path, store: Path, folder: Path) -> dict[str, Any]:
    from tierserve.generation import engine
    from tierserve_tools.serve import LocalStack

    prompt = [(7 * i) % 500 + 3 for i in range(args.prompt)]
    raw_model = engine.load(folder, args.threads).model
    load_before = _load()
    with LocalStack(store, port=0, triton=False, batch=False, s3=False, workdir=root / "serve",
                    env={"ORT_THREADS": str(args.threads)}) as stack:
        for _ in range(2):  # warm both: the router's and the CPU function's environments, the model loaded
            _raw(raw_model, prompt, args.new)
            _served_http(stack.host, stack.port, "bench", prompt, args.new)
        raw, served = [], []
        for _ in range(args.runs):
            raw.append(_raw(raw_model, prompt, args.new))
            served.append(_served_http(stack.host, stack.port, "bench", prompt, args.new))
            assert raw[-1][2] == served[-1][2], f"raw made {raw[-1][2]} tokens, served {served[-1][2]}"
    engine.clear()
    med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
           for k, v in (("raw", raw), ("served", served))}
    result = {
        "conditions": {"through": "tierserve serve (REST API -> RouterFunction -> CpuInferenceFunction)",
                       "layers": args.layers, "hidden": args.hidden, "threads": args.threads,
                       "prompt_tokens": args.prompt, "new_tokens": raw[-1][2], "runs": args.runs, "greedy": True,
                       "variant": "fp32"},
        "raw": {"ttft_ms": round(med["raw"][0], 2), "tokens_per_s": round(med["raw"][1], 1)},
        "served": {"ttft_ms": round(med["served"][0], 2), "tokens_per_s": round(med["served"][1], 1)},
        "tokens_per_s_ratio": round(med["served"][1] / med["raw"][1], 3),
        "ttft_delta_ms": round(med["served"][0] - med["raw"][0], 2),
        "ttft_ms_each": {"raw": [round(x[0], 1) for x in raw], "served": [round(x[0], 1) for x in served]},
        "goals": {"ttft_delta_ms": "<= 15"},
        "load_average": {"before": load_before, "after": _load()},
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
