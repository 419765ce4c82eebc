"""Batch generation's throughput: a part of OpenAI batch lines through ``tierserve.batch.generate`` (parse, prepare,
generate together, render) against a raw batched onnxruntime-genai ``Generator`` loop over the same prompts, and
against generating one prompt at a time (``LoadedModel.generate``, the synchronous path's engine), on the same
og.Model and threads (issue 19's closing note: batch >= 0.85x raw batched).

Why a script and not a test: it measures, on whatever machine runs it. Two ways in:

* ``python -m tierserve_tools.bench.batch_generate``: a random-weight Llama built here
  (``tests.support.causal_lm``, so run it from a checkout) and exported with onnxruntime-genai's builder into a
  store written by hand;
* :func:`measure` (``tierserve bench --suite generate``'s ``BATCH_BENCH``): the suite's own compiled model, in its
  store, at BatchInferenceFunction's threads (3,538 MB = 2 vCPUs), smaller with ``--quick``.

Either way: greedy; ``batch`` prompts of ``prompt``/2 to ``prompt`` token ids, ``new`` tokens each at most (every
path stops a row at the model's EOS: the same tokens, checked); runs alternated so drift hits every path, medians
reported. Tokens/s counts generated tokens over the whole wall time of the part (prefill included).

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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tierserve.app import Runtime
    from tierserve.manifest import ModelVersion
    from tierserve_tools.bench.harness import Context

#: BatchInferenceFunction's intra-op threads (template.yaml: 3,538 MB = 2 vCPUs), for the suite's figure
BATCH_THREADS = 2
BATCH_MEMORY_MB = 3538
#: the suite's part: (prompts, longest prompt, new tokens, timed runs, warm-up rounds), full and --quick; the same
#: part both ways (a smaller one, 8 x 32 tokens, lasts ~0.1 s here: its ratio moved 0.76-0.94 between runs)
SUITE_SIZES = {False: (16, 64, 64, 5, 2), True: (16, 64, 64, 3, 1)}


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


def prompts_for(batch: int, longest: int, pad: int | None) -> list[list[int]]:
    """``batch`` deterministic prompts of ``longest``/2 to ``longest`` token ids (away from the special tokens),
    without the pad token (a prompt holding it runs alone)."""
    prompts = [[(7 * i + 13 * k) % 500 + 3 for i in range(longest // 2 + (k * longest) // (2 * batch))]
               for k in range(batch)]
    return [[t for t in p if t != pad] for p in prompts]


def compare(rt: Runtime, mv: ModelVersion, threads: int, batch: int, longest: int, new: int, runs: int,
            warm: int = 2) -> dict[str, Any]:
    """The three paths on ``mv`` (served by ``rt``), alternated ``runs`` times after ``warm`` rounds: medians of
    tokens/s and the ratios."""
    from tierserve.batch.generate import GenerationPart
    from tierserve.batch.locations import S3Location
    from tierserve.generation import engine

    folder = rt.store.fetch(mv.cpu_artifact).parent
    loaded = engine.load(folder, threads)
    eos = tuple(mv.generation.eos_token_ids) if mv.generation else ()
    pad = engine.pad_token_id(folder)
    prompts = prompts_for(batch, longest, pad)
    raws = [json.dumps({"custom_id": f"r{k}", "method": "POST", "url": "/v1/completions",
                        "body": {"model": mv.name, "prompt": p, "max_tokens": new, "temperature": 0}}).encode()
            for k, p in enumerate(prompts)]
    part = GenerationPart(rt, mv, S3Location("bench-bucket", f"batch/in/{mv.name}/job.jsonl"),
                          f"batch/out/{mv.name}/job", {}, _Head())
    for _ in range(warm):  # warm every path
        _raw_batched(loaded.model, prompts, new, set(eos), pad or 0)
        _batch_part(part, raws)
        _one_at_a_time(loaded, prompts, new, eos)
    runs_of: dict[str, list[tuple[float, int]]] = {"raw_batched": [], "batch_part": [], "one_at_a_time": []}
    for _ in range(runs):
        runs_of["raw_batched"].append(_raw_batched(loaded.model, prompts, new, set(eos), pad or 0))
        runs_of["batch_part"].append(_batch_part(part, raws))
        runs_of["one_at_a_time"].append(_one_at_a_time(loaded, prompts, new, eos))
    tokens = {k: {n for _, n in v} for k, v in runs_of.items()}
    if len(set().union(*tokens.values())) != 1:
        raise RuntimeError(f"the paths generated different token counts: {tokens}")
    if part.batches != [(batch, True)]:
        raise RuntimeError(f"the part was not generated as one greedy batch of {batch}: {part.batches}")
    tps = {k: statistics.median(n / s for s, n in v) for k, v in runs_of.items()}
    return {
        "conditions": {"threads": threads, "batch": batch, "prompt_tokens": [min(map(len, prompts)),
                                                                             max(map(len, prompts))],
                       "max_new_tokens": new, "tokens_per_part": runs_of["raw_batched"][0][1], "runs": runs,
                       "greedy": True, "variant": mv.selected_variant},
        "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
        "batch_vs_raw_batched": round(tps["batch_part"] / tps["raw_batched"], 3),
        "batch_vs_one_at_a_time": round(tps["batch_part"] / tps["one_at_a_time"], 3),
        "goals": {"batch_vs_raw_batched": ">= 0.85"},
    }


def measure(ctx: Context, folder: Path) -> tuple[float, float, dict[str, Any]]:
    """``tierserve bench --suite generate``'s batch figure (``generate.BATCH_BENCH``), on the suite's compiled model
    (``ctx.notes["generate"]``: its store, its cache folder and name; ``folder``: the variant the suite loaded,
    which the batch part must load too). Returns (batch generation tokens/s, raw batched tokens/s, notes with
    ``one_at_a_time_tokens_per_s`` and ``conditions``)."""
    from tierserve.app import build_runtime
    from tierserve.settings import Settings

    suite = ctx.notes["generate"]
    batch, longest, new, runs, warm = SUITE_SIZES[bool(ctx.quick)]
    rt = build_runtime(Settings(model_store_uri=str(suite["store"]), model_cache_dir=str(suite["cache_dir"]),
                                ort_threads=BATCH_THREADS, memory_mb=BATCH_MEMORY_MB))
    mv = rt.store.manifest().resolve(str(suite["model"]))
    if rt.store.fetch(mv.cpu_artifact).parent != folder:
        raise RuntimeError(f"the batch figure would measure {rt.store.fetch(mv.cpu_artifact).parent}, not the suite's "
                           f"model {folder}")
    result = compare(rt, mv, BATCH_THREADS, batch, longest, new, runs, warm)
    c = result["conditions"]
    tps = result["tokens_per_s"]
    conditions = (f"{mv.name} v{mv.version} ({c['variant']}), the generate suite's model; {c['batch']} OpenAI batch "
                  f"lines (/v1/completions, greedy) of {c['prompt_tokens'][0]}-{c['prompt_tokens'][1]} prompt tokens, "
                  f"max_tokens {c['max_new_tokens']} ({c['tokens_per_part']} tokens a part); {c['threads']} intra-op "
                  f"threads (BatchInferenceFunction's {BATCH_MEMORY_MB} MB); batch generation = GenerationPart.run "
                  "(parse, prepare, generate together, render) vs raw batched og.Generator (right-padded, rows cut "
                  "at EOS) vs one prompt at a time (LoadedModel.generate); same og.Model; alternated, median of "
                  f"{c['runs']} runs after {warm} warm-up round(s)")
    return tps["batch_part"], tps["raw_batched"], {
        "conditions": conditions, "one_at_a_time_tokens_per_s": tps["one_at_a_time"],
        "batch_vs_raw_batched": result["batch_vs_raw_batched"],
        "batch_vs_one_at_a_time": result["batch_vs_one_at_a_time"], **c}


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
        result = compare(rt, mv, args.threads, args.batch, args.prompt, args.new, args.runs)
        result["conditions"] = {"layers": args.layers, "hidden": args.hidden, **result["conditions"]}
        engine.clear()
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
