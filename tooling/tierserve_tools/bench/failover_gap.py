"""Generation across the tiers, measured through ``tierserve serve`` (issue 18's closing note): tokens/s and time to
first token through the router to the local Triton against ``generate_stream`` called on Triton directly, and the
failover's gap (the longest pause between two streamed chunks across a failover in the middle of a stream).

Why a script and not a test: it measures, on whatever machine runs it. One run each, as the note asks, client-side
(``time.perf_counter`` at each SSE event's arrival): the same model version (the stand-in for the vLLM backend
running the CPU tier's onnxruntime-genai variant, TritonSync's entry with its default threads), the same greedy
request (``--prompt`` text, ``--max-tokens``; ``min_tokens`` is not asked, so a model that reaches its EOS early
gives fewer tokens: both counts are printed). The model is the tiny random-weight Llama of
``tests.support.causal_lm`` compiled with ``tierserve compile --target both`` (run it from a checkout), unless
``--store`` names a compiled store with a GPU-placed generative model.

    python -m tierserve_tools.bench.failover_gap --max-tokens 900
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPT = "The with statement is used to wrap the execution"


def _compile(work: Path) -> tuple[Path, str]:
    from tests.support.causal_lm import build_causal_lm

    hf = build_causal_lm(work / "hf", "llama")
    store = work / "store"
    proc = subprocess.run([sys.executable, "-m", "tierserve_tools.cli", "compile", str(hf), "--name", "tiny-llama",
                           "--target", "both", "--out", str(store), "--quiet"], capture_output=True, text=True,
                          check=False, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"tierserve compile failed: {proc.stderr[-2000:]}")
    return store, "tiny-llama"


def _sse(conn: http.client.HTTPConnection, path: str, body: dict[str, Any], headers: dict[str, str],
         on_event: Any = None) -> tuple[float, list[tuple[float, dict[str, Any]]]]:
    """POST and read the SSE events: (the time the request was sent, [(arrival, document)])."""
    t0 = time.perf_counter()
    conn.request("POST", path, json.dumps(body), {"content-type": "application/json", **headers})
    resp = conn.getresponse()
    if resp.status != 200:
        raise SystemExit(f"{path}: {resp.status} {resp.read()[:500]!r}")
    out: list[tuple[float, dict[str, Any]]] = []
    while line := resp.readline():
        if line.startswith(b"data: ") and line[6:].strip() != b"[DONE]":
            out.append((time.perf_counter(), json.loads(line[6:])))
            if on_event is not None:
                on_event(len(out))
    conn.close()
    return t0, out


def _figures(t0: float, events: list[tuple[float, dict[str, Any]]], tokens: int) -> dict[str, Any]:
    """TTFT (ms, to the first event) and decode tokens/s (tokens after the first over the time after it)."""
    first, last = events[0][0], events[-1][0]
    return {"ttft_ms": round((first - t0) * 1000, 2), "tokens": tokens,
            "tokens_per_s": round((tokens - 1) / (last - first), 1) if tokens > 1 and last > first else None}


def direct(triton_http: str, model: str, version: str, max_tokens: int) -> dict[str, Any]:
    """``generate_stream`` on Triton directly, with the body the router sends (``generate_stream.request_body``)."""
    from tierserve.backends import generate_stream as gs
    from tierserve.generation.requests import KIND_COMPLETION, GenerationRequest, SamplingParams

    request = GenerationRequest(model, version, KIND_COMPLETION, SamplingParams(max_tokens=max_tokens, temperature=0.0),
                                prompt=PROMPT)
    host, _, port = triton_http.rpartition(":")
    t0, events = _sse(http.client.HTTPConnection(host, int(port), timeout=600),
                      f"/v2/models/{model}/versions/{version}/generate_stream", gs.request_body(request, PROMPT), {})
    return _figures(t0, events, sum(len(gs.token_ids(e)) for _, e in events))


def routed(stack: Any, model: str, max_tokens: int, kill_after: int | None = None, target: str = "gpu"
           ) -> dict[str, Any]:
    """The same greedy completion through the stack's API (streamed, ``x-target: gpu``, usage asked); with
    ``kill_after`` Triton is killed when that many chunks have arrived, and the longest gap between two chunks
    is reported with where it fell."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    killed: list[float] = []

    def on_event(n: int) -> None:
        if kill_after is not None and n == kill_after and not killed:
            killed.append(time.perf_counter())
            stack.triton.kill()

    t0, events = _sse(http.client.HTTPConnection(stack.host, stack.port, timeout=600), "/v1/completions", body,
                      {"x-target": target}, on_event)
    usage = events[-1][1].get("usage") or {}
    chunks = [(t, e) for t, e in events if e.get("choices")]
    out = _figures(t0, chunks, int(usage.get("completion_tokens") or 0))
    final = chunks[-1][1]
    out["x_served_by"], out["x_failover"] = final.get("x_served_by"), final.get("x_failover")
    if kill_after is not None:
        gaps = [(chunks[i + 1][0] - chunks[i][0], i) for i in range(len(chunks) - 1)]
        gap, at = max(gaps)
        median = sorted(g for g, _ in gaps)[len(gaps) // 2]
        out.update(failover_gap_ms=round(gap * 1000, 2), gap_after_chunk=at + 1,
                   median_gap_ms=round(median * 1000, 3),
                   kill_to_next_chunk_ms=round((min(t for t, _ in chunks if t > killed[0]) - killed[0]) * 1000, 2)
                   if killed and any(t > killed[0] for t, _ in chunks) else None)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", type=Path, help="a compiled store (default: compile the tiny Llama here)")
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--max-tokens", type=int, default=900)
    ap.add_argument("--kill-after", type=int, default=1, help="chunks received before Triton is killed")
    args = ap.parse_args(argv)
    from tierserve.manifest import Manifest
    from tierserve_tools.serve import LocalStack

    with tempfile.TemporaryDirectory(prefix="failover-gap-") as tmp:
        work = Path(tmp)
        store, name = (args.store, args.model) if args.store else _compile(work)
        version = Manifest.loads((Path(store) / "manifest.json").read_bytes()).resolve(name).version
        with LocalStack(store, port=0, batch=False, s3=False, workdir=work / "serve",
                        triton_restart_backoff_s=(600.0, 600.0)) as stack:
            routed(stack, name, 8)  # warm: both tiers' models loaded, the router's and CPU function's environments up
            routed(stack, name, 8, target="cpu")
            direct(stack.triton.http_url, name, version, 8)
            result = {
                "conditions": {"max_tokens": args.max_tokens, "prompt": PROMPT, "greedy": True, "model": name,
                               "gpu": "local tritonserver 2.51, the stand-in for vLLM (onnxruntime-genai on CPU)",
                               "cpu": "CpuInferenceFunction under the streaming runtime loop (local Invoke), warm"},
                "triton_direct_generate_stream": direct(stack.triton.http_url, name, version, args.max_tokens),
                "router_to_triton": routed(stack, name, args.max_tokens),
                "failover_mid_stream": routed(stack, name, args.max_tokens, kill_after=args.kill_after),
            }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
