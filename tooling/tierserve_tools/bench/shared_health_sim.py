"""Issue 12 figure: how many requests pay a failed GPU attempt in one outage, each router instance on its own
vs the fleet sharing the GPU tier's health (tierserve.tier_health), by simulation.

The real ``TierDispatcher``, ``CircuitBreaker`` / ``SharedCircuitBreaker`` and ``HealthCache`` run on one
simulated clock; only the tiers and the shared item's store are stand-ins: a GPU tier that refuses every
call during the outage (as a SageMaker endpoint whose instances are gone: no health call to probe, like
the ``sagemaker`` backend), an always-healthy CPU tier, and ``MemoryHealthStore`` (the DynamoDB item's
semantics, tested against moto in tests/unit/runtime/test_tier_health.py). Requests arrive as a Poisson
process spread evenly over the instances; every request is a GPU decision (``gpu-first``).

    python -m tierserve_tools.bench.shared_health_sim [--instances 100] [--rate 1000] [--outage 20:110] [--duration 150]
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass, field
from typing import Any

from tierserve import errors
from tierserve.breaker import CircuitBreaker, HealthCache
from tierserve.manifest import ModelVersion, TensorSpec, Variant
from tierserve.protocol.calls import Body, InferenceCall, Reply
from tierserve.protocol.messages import InferResponse
from tierserve.routing import get_policy
from tierserve.tier_health import MemoryHealthStore, SharedCircuitBreaker
from tierserve.tiering import Deadline, TierDispatcher


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Gpu:
    clock: Clock
    down: tuple[float, float]
    tier: str = "gpu"
    calls: int = 0
    failed: int = 0
    failed_at: list[float] = field(default_factory=list)

    def infer(self, model: ModelVersion, call: InferenceCall, timeout_s: float) -> Reply:
        self.calls += 1
        if self.down[0] <= self.clock() < self.down[1]:
            self.failed += 1
            self.failed_at.append(self.clock())
            raise errors.BackendUnavailableError("the endpoint has no instance (ServiceUnavailable)")
        return Reply(InferResponse(model.name, model.version, []))

    def ready(self, model: ModelVersion | None = None) -> bool:
        return True  # SageMaker: no data-plane health call; the breaker carries the tier's health


class Cpu:
    tier = "cpu"

    def infer(self, model: ModelVersion, call: InferenceCall, timeout_s: float) -> Reply:
        return Reply(InferResponse(model.name, model.version, []))

    def ready(self, model: ModelVersion | None = None) -> bool:
        return True


MODEL = ModelVersion("enc", "1", (TensorSpec("x", "FP32", (-1, 4)),), (TensorSpec("y", "FP32", (-1, 3)),),
                     {"fp32": Variant("enc/1/model.onnx", "0" * 64, 1)}, "fp32", ("gpu", "cpu"), max_batch_size=64)


def simulate(shared: bool, instances: int, rate: float, outage: tuple[float, float], duration: float,
             seed: int = 0, threshold: int = 5, cooldown_s: float = 30.0, read_ttl_s: float = 2.0) -> dict[str, Any]:
    clock = Clock()
    gpu, store = Gpu(clock, outage), MemoryHealthStore()
    fleet = []
    for i in range(instances):
        if shared:
            breaker: CircuitBreaker = SharedCircuitBreaker(store, threshold, cooldown_s, 3, clock=clock, wall=clock,
                                                           read_ttl_s=read_ttl_s, instance=f"i{i}")
        else:
            breaker = CircuitBreaker(threshold, cooldown_s, 3, clock=clock)
        fleet.append(TierDispatcher(Cpu(), gpu, get_policy("gpu-first"), breaker, HealthCache(2.0, clock)))
    call = InferenceCall.from_body(Body(b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]}]}'))
    rng = random.Random(seed)
    served = {"gpu": 0, "cpu": 0}
    n = 0
    while True:
        clock.t += rng.expovariate(rate)
        if clock.t >= duration:
            break
        done = fleet[rng.randrange(instances)].dispatch(MODEL, call, deadline=Deadline(None))
        served[done.served_by] += 1
        n += 1
    onset = sum(1 for t in gpu.failed_at if t < outage[0] + cooldown_s)
    return {"requests": n, "gpu_calls": gpu.calls, "failed_gpu_attempts": gpu.failed, "failed_in_first_cooldown": onset,
            "failed_later": gpu.failed - onset, "served_by_gpu": served["gpu"], "served_by_cpu": served["cpu"],
            "store_reads": store.reads, "store_writes": store.writes}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--instances", type=int, default=100)
    ap.add_argument("--rate", type=float, default=1000.0, help="requests per second, all instances together")
    ap.add_argument("--outage", default="20:110", help="START:END seconds")
    ap.add_argument("--duration", type=float, default=150.0)
    ap.add_argument("--read-ttl", type=float, default=2.0, help="TIER_HEALTH_TTL_S")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    start, end = (float(x) for x in args.outage.split(":"))
    print(f"{args.instances} router instances, {args.rate:g} req/s Poisson (all GPU decisions), {args.duration:g} s, "
          f"GPU outage {start:g}-{end:g} s; breaker: 5 failures to open, 30 s cooldown, 3 trial successes to close; "
          f"shared item read at most every {args.read_ttl:g} s per instance, and after each failed GPU call")
    print(f"{'':<28}{'failed GPU attempts':>21}{'  in 1st cooldown':>18}{'  later':>8}{'  GPU calls':>12}"
          f"{'  reads':>8}{'  writes':>9}")
    rows = {}
    for label, shared in (("each instance on its own", False), ("shared health (DynamoDB)", True)):
        r = simulate(shared, args.instances, args.rate, (start, end), args.duration, args.seed,
                     read_ttl_s=args.read_ttl)
        rows[label] = r
        print(f"{label:<28}{r['failed_gpu_attempts']:>21,}{r['failed_in_first_cooldown']:>18,}{r['failed_later']:>8,}"
              f"{r['gpu_calls']:>12,}{r['store_reads']:>8,}{r['store_writes']:>9,}")
    before, after = (rows[k]["failed_gpu_attempts"] for k in rows)
    print(f"requests: {rows['each instance on its own']['requests']:,}; failed GPU attempts {before:,} -> {after:,} "
          f"({before / max(after, 1):.1f}x fewer)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
