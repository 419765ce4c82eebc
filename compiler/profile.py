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
