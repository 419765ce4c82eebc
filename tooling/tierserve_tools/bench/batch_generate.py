"""Batch generation's throughput: a part of OpenAI batch lines through ``tierserve.batch.generate`` (parse, prepare,
generate together, render) against a raw batched onnxruntime-genai ``Generator`` loop over the same prompts, and
against generating one prompt at a time (``LoadedModel.generate``, the synchronous path's engine), on the same
og.Model and threads (issue 19's closing note: batch >= 0.85x raw batched).

Why a script and not a test: it measures, on whatever machine runs it. The model is a random-weight Llama built
here (``tests.support.causal_lm``, so run it from a checkout) and exported with onnxruntime-genai's builder; greedy;
``--batch`` prompts of ``--prompt``/2 to ``--prompt`` token ids, ``--new`` tokens each at most (every path stops a
row at the model's EOS: the same tokens, checked); runs alternated so drift hits every path, medians reported.
Tokens/s counts generated tokens over the whole wall time of the part (prefill included).

    python -m tierserve_tools.bench.batch_generate --layers 8 --hidden 256 --threads 2 --batch 16 --runs 5
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _raw_batched(model: Any, prompts: list[list[int]], new: int, eos: set[int], pad: int) -> tuple[float, int]:
    """(seconds, tokens) of one onnxruntime-genai generator over the right-padded batch, rows cut at EOS."""
    import numpy as np
    import onnxruntime_genai as og

    t0 = time.perf_counter()
    width = max(map(len, prompts))
    ids = np.full((len(prompts), width), pad, dtype=np.int32)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = p
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=width + new, batch_size=len(prompts))
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    counts = [0] * len(prompts)
    live = set(range(len(prompts)))
    for _ in range(new):
        gen.generate_next_token()
        tokens = gen.get_next_tokens()
        for i in list(live):
            counts[i] += 1
            if int(tokens[i]) in eos:
                live.discard(i)
        if not live:
            break
    return time.perf_counter() - t0, sum(counts)


def _one_at_a_time(loaded: Any, prompts: list[list[int]], new: int, eos: tuple[int, ...]) -> tuple[float, int]:
    from tierserve.generation.requests import SamplingParams

    t0 = time.perf_counter()
    n = 0
    for p in prompts:
        for event in loaded.generate(p, SamplingParams(temperature=0.0), eos, new):
            n += len(event.token_ids)
    return time.perf_counter() - t0, n


def _batch_part(part: Any, raws: list[bytes]) -> tuple[float, int]:
    t0 = time.perf_counter()
    _, bad, counts = part.run(raws, 1)
    assert not bad and counts["failed"] == 0, bad
    return time.perf_counter() - t0, counts["completion_tokens"]


class _Head:
    """The one S3 call a part makes (``created``: the input's LastModified)."""

    def head_object(self, **_: Any) -> dict[str, Any]:
        return {"LastModified": dt.datetime(2026, 1, 1, tzinfo=dt.UTC)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16, help="prompts in the part")
    ap.add_argument("--prompt", type=int, default=64, help="the longest prompt, in tokens")
    ap.add_argument("--new", type=int, default=64, help="tokens generated per prompt at most")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args(argv)

    import os

    os.environ["TIERSERVE_METRICS"] = "false"
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the checkout: tests.support
    from tests.support.causal_lm import build_causal_lm
    from tests.support.genai_models import TinyLM, write_genai_store
    from tierserve.app import build_runtime
    from tierserve.batch.generate import GenerationPart
    from tierserve.batch.locations import S3Location
    from tierserve.generation import engine
    from tierserve.settings import Settings

    context = args.prompt + args.new + 8
    with tempfile.TemporaryDirectory(prefix="batchgen-") as tmp:
        root = Path(tmp)
        hf = build_causal_lm(root / "hf", "llama", layers=args.layers, hidden=args.hidden, max_positions=context)
        out = root / "genai"
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                        "-p", "fp32", "-e", "cpu"], check=True, capture_output=True, cwd=root)
        lm = TinyLM("llama", hf, out)
        store = root / "store"
        write_genai_store(store, "bench", lm, context_length=context, default_max_tokens=args.new,
                          max_tokens_cap=args.new)
        rt = build_runtime(Settings(model_store_uri=str(store), model_cache_dir=str(root / "cache"),
                                    ort_threads=args.threads))
        mv = rt.store.manifest().resolve("bench")
        folder = rt.store.fetch(mv.cpu_artifact).parent
        loaded = engine.load(folder, args.threads)
        eos = tuple(mv.generation.eos_token_ids) if mv.generation else ()
        pad = engine.pad_token_id(folder) or 0
        prompts = [[(7 * i + 13 * k) % 500 + 3 for i in range(args.prompt // 2 + (k * args.prompt) // (2 * args.batch))]
                   for k in range(args.batch)]
        prompts = [[t for t in p if t != pad] for p in prompts]
        raws = [json.dumps({"custom_id": f"r{k}", "method": "POST", "url": "/v1/completions",
                            "body": {"model": "bench", "prompt": p, "max_tokens": args.new, "temperature": 0}}).encode()
                for k, p in enumerate(prompts)]
        part = GenerationPart(rt, mv, S3Location("bench-bucket", "batch/in/bench/job.jsonl"), "batch/out/bench/job",
                              {}, _Head())
        for _ in range(2):  # warm every path
            _raw_batched(loaded.model, prompts, args.new, set(eos), pad)
            _batch_part(part, raws)
            _one_at_a_time(loaded, prompts, args.new, eos)
        runs: dict[str, list[tuple[float, int]]] = {"raw_batched": [], "batch_part": [], "one_at_a_time": []}
        for _ in range(args.runs):
            runs["raw_batched"].append(_raw_batched(loaded.model, prompts, args.new, set(eos), pad))
            runs["batch_part"].append(_batch_part(part, raws))
            runs["one_at_a_time"].append(_one_at_a_time(loaded, prompts, args.new, eos))
        tokens = {k: {n for _, n in v} for k, v in runs.items()}
        assert len(set().union(*tokens.values())) == 1, f"the paths generated different token counts: {tokens}"
        assert part.batches == [(args.batch, True)], part.batches
        tps = {k: statistics.median(n / s for s, n in v) for k, v in runs.items()}
        result = {
            "conditions": {"layers": args.layers, "hidden": args.hidden, "threads": args.threads,
                           "batch": args.batch, "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))],
                           "max_new_tokens": args.new, "tokens_per_part": runs["raw_batched"][0][1],
                           "runs": args.runs, "greedy": True, "variant": "fp32"},
            "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
            "batch_vs_raw_batched": round(tps["batch_part"] / tps["raw_batched"], 3),
            "batch_vs_one_at_a_time": round(tps["batch_part"] / tps["one_at_a_time"], 3),
            "goals": {"batch_vs_raw_batched": ">= 0.85"},
        }
        engine.clear()
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
