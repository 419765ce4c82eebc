"""Profiles one onnxruntime-genai folder in a fresh process (run by ``tierserve_compiler.profile``).

Usage: python _genai_profile_worker.py SPEC.json  ->  prints one JSON object on stdout.

Why a worker of its own: a causal LM is measured in tokens, not requests. Per thread count it measures the
time to first token (``append_tokens`` of the prompt + the first ``generate_next_token``) at each prompt
length, and decode speed (one ``generate_next_token`` per step) at each batch size; once, the KV cache that
onnxruntime-genai really allocates at a short context (the ``present.*`` buffers' bytes) and the process's
peak RSS. It imports only numpy and onnxruntime_genai, so the numbers are what a serving process pays.
"""

import json
import os
import resource
import statistics
import sys
import time


def rss_mb(field: str = "VmHWM:") -> float:
    """This process's RSS high-water mark (or current RSS with ``VmRSS:``)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt(length: int, vocab: int, batch: int = 1):  # type: ignore[no-untyped-def]
    import numpy as np

    ids = [3 + (i * 7) % max(1, vocab - 3) for i in range(length)]
    return np.array([ids] * batch, dtype=np.int32)


def main() -> None:
    with open(sys.argv[1]) as fh:
        spec = json.load(fh)
    import onnxruntime_genai as og

    folder, vocab, context = spec["folder"], int(spec["vocab_size"]), int(spec["context_length"])
    base = rss_mb()
    result: dict = {"kind": "text-generation", "baseline_rss_mb": base, "threads": {}}
    for i, threads in enumerate(spec["threads"]):
        cfg = og.Config(folder)
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        t0 = time.perf_counter()
        model = og.Model(cfg)
        load_s = time.perf_counter() - t0
        ttft = {}
        for length in spec["prompt_lengths"]:
            n = min(int(length), context - 2)
            times = []
            for _ in range(spec["warmup"] + spec["iterations"]):
                params = og.GeneratorParams(model)
                params.set_search_options(max_length=n + 2, do_sample=False)
                gen = og.Generator(model, params)
                t = time.perf_counter()
                gen.append_tokens(prompt(n, vocab))
                gen.generate_next_token()
                gen.get_next_tokens()
                times.append((time.perf_counter() - t) * 1000)
                del gen
            ttft[str(n)] = statistics.median(times[spec["warmup"]:])
        batches = {}
        steps, plen = int(spec["decode_tokens"]), 16
        for b in spec["batch_sizes"]:
            per_step: list[float] = []
            total_s, total_tokens = 0.0, 0
            for _ in range(spec["iterations"]):
                length = min(context, plen + steps + 1)
                params = og.GeneratorParams(model)
                params.set_search_options(max_length=length, min_length=length, do_sample=False, batch_size=b)
                gen = og.Generator(model, params)
                gen.append_tokens(prompt(plen, vocab, b))
                gen.generate_next_token()  # the first token belongs to TTFT
                t_all = time.perf_counter()
                while not gen.is_done():
                    t = time.perf_counter()
                    gen.generate_next_token()
                    gen.get_next_tokens()
                    per_step.append((time.perf_counter() - t) * 1000)
                    total_tokens += b
                total_s += time.perf_counter() - t_all
                del gen
            per_step.sort()
            p50 = statistics.median(per_step)
            batches[str(b)] = {
                "p50_ms": p50,
                "p95_ms": per_step[min(len(per_step) - 1, int(0.95 * len(per_step)))],
                "mean_ms": statistics.fmean(per_step),
                # from the median step, as selection compares them (robust to a busy machine's outliers)
                "tokens_per_s": b * 1000.0 / p50 if p50 > 0 else 0.0,
                "tokens_per_s_wall": total_tokens / total_s if total_s > 0 else 0.0,
            }
        result["threads"][str(threads)] = {"load_s": load_s, "batches": batches, "ttft_ms": ttft}
        if i == 0:
            result["load_s"] = load_s
            result["peak_rss_mb"] = rss_mb()
            short = min(context, int(spec["kv_context"]))
            before = rss_mb("VmRSS:")
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=short, do_sample=False)
            gen = og.Generator(model, params)
            gen.append_tokens(prompt(min(16, short - 1), vocab))
            measured = 0
            for layer in range(int(spec["layers"])):
                for kind in ("key", "value"):
                    measured += int(gen.get_output(f"present.{layer}.{kind}").nbytes)
            result["kv"] = {"context": short, "measured_bytes": measured, "measured_bytes_per_token": measured / short,
                            "rss_delta_mb": rss_mb("VmRSS:") - before}
            del gen
        del model
    result["cpu_count"] = os.cpu_count()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
