"""Latency and memory of each variant, each measured in its own fresh subprocess.

Per variant: cold session load time, p50/p95 latency at batch 1, 8 and 32 (configurable) for each
thread count in ``ProfileConfig.threads``, peak RSS and on-disk size. Figures come from here, never
from tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from tierserve_compiler.config import ProfileConfig
from tierserve_compiler.data import Dataset
from tierserve_compiler.errors import CompilerError

WORKER = Path(__file__).with_name("_profile_worker.py")


def profile_variant(model: Path, data: Dataset, cfg: ProfileConfig, workdir: Path) -> dict[str, Any]:
    """Profile ``model`` in a subprocess; returns the worker's figures plus ``size_bytes``."""
    feed = workdir / f"profile-{model.stem}.npz"
    np.savez(feed, **data.batch(max(cfg.batch_sizes)))
    spec = workdir / f"profile-{model.stem}.json"
    spec.write_text(
        json.dumps(
            {
                "model": str(model),
                "data": str(feed),
                "batch_sizes": list(cfg.batch_sizes),
                "iterations": cfg.iterations,
                "warmup": cfg.warmup,
                "threads": list(cfg.threads),
            }
        )
    )
    try:
        proc = subprocess.run(
            [sys.executable, str(WORKER), str(spec)], capture_output=True, text=True, timeout=cfg.timeout_s, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise CompilerError(
            f"profiling {model.name} took longer than {cfg.timeout_s:.0f} s; use --preset fast "
            "or fewer profile iterations"
        ) from exc
    if proc.returncode != 0:
        raise CompilerError(f"profiling {model.name} failed (exit {proc.returncode}): {proc.stderr[-1500:]}")
    res: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    res["size_bytes"] = model.stat().st_size
    return res


def latency(prof: dict[str, Any], batch: int, threads: int | None = None, stat: str = "p95_ms") -> float:
    """A latency figure; the first profiled thread count by default."""
    th = prof["threads"]
    key = str(threads) if threads is not None and str(threads) in th else next(iter(th))
    return float(th[key]["batches"][str(batch)][stat])


def serial_fraction(prof: dict[str, Any], batch: int) -> float:
    """Amdahl serial fraction from the 1- and 2-thread timings; 0.5 when only one was measured.

    t(n) = t(1) * (s + (1 - s) / n)  =>  s = 2 * t(2) / t(1) - 1, clipped to [0, 1].
    """
    th = prof["threads"]
    if "1" in th and "2" in th:
        t1 = th["1"]["batches"][str(batch)]["p50_ms"]
        t2 = th["2"]["batches"][str(batch)]["p50_ms"]
        return float(min(1.0, max(0.0, 2 * t2 / t1 - 1)))
    return 0.5


def scaled_latency(prof: dict[str, Any], batch: int, vcpus: float, stat: str = "p95_ms") -> float:
    """Latency at ``vcpus`` threads, from the 1-thread figure and the serial fraction."""
    t1 = latency(prof, batch, 1, stat)
    s = serial_fraction(prof, batch)
    n = max(1.0, vcpus)
    return t1 * (s + (1 - s) / n) if vcpus >= 1 else t1 / vcpus  # below 1 vCPU: time-sliced


# --- causal LMs (issue 17): tokens/s and time to first token, one fresh process per variant ---------------

GENAI_WORKER = Path(__file__).with_name("_genai_profile_worker.py")
#: Prompt lengths (tokens) whose time to first token is measured (capped at the model's context).
TTFT_PROMPT_LENGTHS = (16, 128, 512)
#: Decode batch sizes measured.
DECODE_BATCHES = (1, 8)


def all_threads() -> int:
    import os

    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int = 4) -> int:
    """The KV cache's size per token of context: layers x 2 (key, value) x kv_heads x head_dim x dtype bytes."""
    return layers * 2 * kv_heads * head_dim * dtype_bytes


def profile_generative(folder: Path, *, context_length: int, vocab_size: int, layers: int, kv_per_token: int,
                       cfg: ProfileConfig, workdir: Path, decode_tokens: int = 32) -> dict[str, Any]:
    """Profile an onnxruntime-genai folder in a subprocess with 1 thread and all threads: time to first token
    at 16/128/512-token prompts, decode tokens/s at batch 1 and 8, peak RSS, the KV cache measured at a short
    context against ``kv_per_token`` (computed from the shape), and the folder's files with their sizes."""
    threads = sorted({1, all_threads()})
    spec = workdir / f"profile-{folder.name}.json"
    spec.write_text(json.dumps({
        "folder": str(folder), "threads": threads, "prompt_lengths": list(TTFT_PROMPT_LENGTHS),
        "batch_sizes": list(DECODE_BATCHES), "iterations": max(1, min(cfg.iterations, 3)), "warmup": 1,
        "decode_tokens": decode_tokens, "vocab_size": vocab_size, "context_length": context_length,
        "layers": layers, "kv_context": 256,
    }))
    try:
        proc = subprocess.run([sys.executable, str(GENAI_WORKER), str(spec)], capture_output=True, text=True,
                              timeout=cfg.timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise CompilerError(f"profiling {folder.name} took longer than {cfg.timeout_s:.0f} s; use --preset fast"
                            ) from exc
    if proc.returncode != 0:
        raise CompilerError(f"profiling {folder.name} failed (exit {proc.returncode}): {proc.stderr[-1500:]}")
    res: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    res["files"] = files
    res["size_bytes"] = sum(files.values())
    measured = float(res["kv"]["measured_bytes_per_token"])
    res["kv"].update({
        "computed_bytes_per_token": kv_per_token,
        "full_context": context_length,
        "full_context_bytes": kv_per_token * context_length,
        "matches": abs(measured - kv_per_token) <= 0.01 * kv_per_token,
    })
    return res


def amdahl(t1: float, tn: float, n: int, vcpus: float) -> float:
    """A time at ``vcpus`` threads from its 1-thread and ``n``-thread measurements (Amdahl's law; serial fraction
    0.5 when only 1 thread was measured). Below 1 vCPU the CPU is time-sliced."""
    s = 0.5 if n <= 1 or t1 <= 0 else min(1.0, max(0.0, (tn / t1 - 1 / n) / (1 - 1 / n)))
    if vcpus < 1:
        return t1 / max(vcpus, 1e-6)
    return t1 * (s + (1 - s) / vcpus)


def generative_at(prof: dict[str, Any], vcpus: float) -> dict[str, Any]:
    """Decode tokens/s at batch 1 and the time to first token per prompt length, estimated at ``vcpus``."""
    th = prof["threads"]
    n = max(int(k) for k in th)
    one, many = th["1"], th[str(n)]
    step = amdahl(one["batches"]["1"]["p50_ms"], many["batches"]["1"]["p50_ms"], n, vcpus)
    ttft = {int(k): amdahl(v, many["ttft_ms"][k], n, vcpus) for k, v in one["ttft_ms"].items()}
    return {"tokens_per_s": 1000.0 / step if step > 0 else 0.0, "ttft_ms": ttft, "step_ms": step}
