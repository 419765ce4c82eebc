"""Placement on the edge: which variant a device serves, how fast it would be there, and how large a batch it takes.

A device profile says what a device has: ``memory_mb`` (what the runtime may use for models), ``cores``
and ``speed``, one core's speed relative to one core of the machine that profiled the model (the
compile host). Built in: :data:`PROFILES`; or a JSON file with those three keys (``--edge-profile``).
The speeds are rough, stated assumptions (a Cortex-A72 at 1.5 GHz against a current x86 core is about
0.3); measure your device with ``tierserve_tools.bench.edge`` and pass a file for honest estimates.

The rules, recorded with the cloud's in report.json and report.md:

1. ``edge_variant``: among the CPU-tier variants within their accuracy budget (fp32 always is), the
   smallest file: a device is bound by memory and storage more than by anything else;
2. ``edge_memory``: its estimated session memory (twice the file plus 8 MB, or the measured peak RSS if
   higher) must fit the profile's ``memory_mb``;
3. ``edge_latency``: the estimated p95 at batch 1 on the device (the measured 1-thread p95, Amdahl-scaled
   to the device's cores, divided by its speed) against the SLO (``--slo-ms``, else 100 ms);
4. ``edge_max_rows`` (routing): the largest batch the device finishes within that budget, extrapolated
   per row from the largest profiled batch, and at most the model's ``max_batch_size`` (a batch the cloud
   would split); the runtime forwards bigger batches to the cloud.

Decision: ``--target edge`` puts the model on the edge beside the cloud tier(s) the other rules choose
(forced: failed edge rules are noted); without ``--target``, a model is also placed on the edge when an
``--edge-profile`` is given and rules 2 and 3 pass. Without a profile the edge is never chosen.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tierserve_compiler.errors import ConfigError
from tierserve_compiler.placement import DEFAULT_LATENCY_BUDGET_MS, Placement, Reason
from tierserve_compiler.profile import scaled_latency

MB = 1024 * 1024


@dataclass(frozen=True)
class EdgeProfile:
    name: str
    memory_mb: int
    cores: int
    speed: float  # one core, relative to one core of the profiling machine

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "memory_mb": self.memory_mb, "cores": self.cores, "speed": self.speed}


#: Built-in device profiles (memory is what the model runtime may use, not the device's total).
PROFILES: dict[str, EdgeProfile] = {
    "rpi4": EdgeProfile("rpi4", memory_mb=1024, cores=4, speed=0.3),  # Raspberry Pi 4, 2-8 GB, Cortex-A72
    "rpi5": EdgeProfile("rpi5", memory_mb=2048, cores=4, speed=0.6),  # Raspberry Pi 5, 4-8 GB, Cortex-A76
    "x86-small": EdgeProfile("x86-small", memory_mb=2048, cores=2, speed=0.7),  # a fanless x86 gateway
}
DEFAULT_PROFILE = "rpi4"


@dataclass(frozen=True)
class Candidate:
    """A CPU-tier variant within its accuracy budget: its key, file size and measured profile."""

    key: str
    size_bytes: int
    profile: dict[str, Any]


def load_profile(spec: str | None) -> EdgeProfile:
    """A built-in profile by name, or a JSON file ``{"memory_mb", "cores", "speed"}``; else a ConfigError."""
    spec = spec or DEFAULT_PROFILE
    if spec in PROFILES:
        return PROFILES[spec]
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"--edge-profile {spec!r} is neither a built-in profile ({', '.join(PROFILES)}) nor a "
                          "JSON file; write one as {\"memory_mb\": 1024, \"cores\": 4, \"speed\": 0.3}")
    try:
        d = json.loads(path.read_text())
        prof = EdgeProfile(path.stem, int(d["memory_mb"]), int(d["cores"]), float(d["speed"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--edge-profile {path}: needs memory_mb, cores and speed as numbers ({exc!r})") from None
    if prof.memory_mb <= 0 or prof.cores <= 0 or prof.speed <= 0:
        raise ConfigError(f"--edge-profile {path}: memory_mb, cores and speed must be positive")
    return prof


def place_edge(placement: Placement, candidates: list[Candidate], profile: EdgeProfile, *, target: str,
               explicit_profile: bool, slo_ms: float | None, max_batch_size: int = 0) -> tuple[Placement, str | None]:
    """``placement`` with the edge rules' reasons added (and ``edge`` in its targets when it goes there);
    returns it and the variant the edge serves (None: not on the edge)."""
    if not candidates:
        raise ConfigError("no CPU variant is within its accuracy budget, so none can go to the edge; "
                          "relax the budget or drop --target edge")
    best = min(candidates, key=lambda c: (c.size_bytes, c.key))
    budget = slo_ms or DEFAULT_LATENCY_BUDGET_MS
    reasons = [Reason("edge_variant", True,
                      f"{best.key}: the smallest CPU variant within its accuracy budget "
                      f"({best.size_bytes / MB:.2f} MB; candidates {', '.join(c.key for c in candidates)})")]
    memory_mb = max(float(best.profile.get("peak_rss_mb", 0.0)), (8 * MB + 2 * best.size_bytes) / MB)
    memory_ok = memory_mb <= profile.memory_mb
    reasons.append(Reason("edge_memory", memory_ok, f"needs ~{memory_mb:.0f} MB vs {profile.memory_mb:,} MB on "
                          f"{profile.name}"))
    p95 = scaled_latency(best.profile, 1, profile.cores) / profile.speed
    latency_ok = p95 <= budget
    reasons.append(Reason("edge_latency", latency_ok, f"estimated p95 at batch 1 on {profile.name} is {p95:.2f} ms "
                          f"({profile.cores} cores at {profile.speed:g}x this machine's) vs "
                          f"{'SLO' if slo_ms else 'budget'} {budget:g} ms"))
    bmax = max(int(b) for b in next(iter(best.profile["threads"].values()))["batches"])
    per_row = scaled_latency(best.profile, bmax, profile.cores, "p50_ms") / profile.speed / bmax
    fit = max(1, math.floor(budget / max(per_row, 1e-6)))
    max_rows = min(fit, max_batch_size) if max_batch_size > 0 else fit
    capped = f", capped at the model's max_batch_size {max_batch_size}" if max_rows < fit else ""
    reasons.append(Reason("edge_max_rows", True, f"batches up to {max_rows} rows ({fit} fit {budget:g} ms on "
                          f"{profile.name} at {per_row:.3f} ms/row{capped}); larger ones are forwarded to the cloud"))
    if target == "edge":
        failed = [r.rule for r in reasons if not r.ok]
        note = f" (rules that failed and were overridden: {', '.join(failed)})" if failed else ""
        reasons.append(Reason("edge_decision", True, f"on the edge, forced by --target edge{note}"))
        on_edge = True
    elif explicit_profile and memory_ok and latency_ok:
        reasons.append(Reason("edge_decision", True, f"on the edge too: it fits {profile.name}"))
        on_edge = True
    else:
        why = "no --edge-profile given" if not explicit_profile else f"it does not fit {profile.name}"
        reasons.append(Reason("edge_decision", True, f"not on the edge: {why}"))
        on_edge = False
    placement.reasons.extend(reasons)
    placement.edge = {"profile": profile.to_json(), "variant": best.key, "p95_ms_estimate": round(p95, 3),
                      "memory_mb_estimate": round(memory_mb, 1), "max_rows": max_rows, "placed": on_edge}
    if not on_edge:
        return placement, None
    placement.targets = ["edge", *[t for t in placement.targets if t != "edge"]]
    placement.routing = {**placement.routing, "edge_max_rows": int(max_rows)}
    return placement, best.key
