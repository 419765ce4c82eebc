"""The router: resolve the model version, ask the policy for a tier, carry it out, fall back.

GPU calls go through a circuit breaker and a cached health probe. A GPU failure is never
retried on the GPU (it may already have the request); the request falls back to the model's
CPU variant when it has one, and gets a fast 503 with Retry-After when it does not.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from tierserve import errors
from tierserve.backends.base import Backend
from tierserve.breaker import CircuitBreaker, HealthCache
from tierserve.manifest import Manifest, ModelVersion
from tierserve.routing import Decision, Policy, RouteContext
from tierserve.types import InferRequest, InferResponse

#: Time kept back from the caller's remaining budget for encoding and the response's way out.
RESPONSE_MARGIN_S = 0.25


@dataclass
class Routed:
    response: InferResponse
    served_by: str
    decision: Decision
    fallback: str | None = None
    latency_ms: float = 0.0


def pick_version(manifest: Manifest, name: str, version: str | None, request_id: str | None) -> ModelVersion:
    """The version a request gets: the named one, else the default, or the canary for its share.

    The canary split is stable per request id (the same id always lands on the same version)."""
    if version:
        return manifest.resolve(name, version)
    default = manifest.resolve(name)
    entry = manifest.models[name]
    canary = entry.canary
    if not canary:
        return default
    key = (request_id or f"{time.time_ns()}").encode()
    bucket = int.from_bytes(hashlib.sha256(key).digest()[:4], "big") % 10_000
    if bucket < float(canary["percent"]) * 100:
        return manifest.resolve(name, str(canary["version"]))
    return default


class Router:
    def __init__(
        self,
        cpu: Backend,
        gpu: Backend | None,
        policy: Policy,
        breaker: CircuitBreaker | None = None,
        health: HealthCache | None = None,
        gpu_timeout_s: float = 10.0,
    ) -> None:
        self.cpu = cpu
        self.gpu = gpu
        self.policy = policy
        self.breaker = breaker or CircuitBreaker()
        self.health = health or HealthCache()
        self.gpu_timeout_s = gpu_timeout_s

    def gpu_usable(self, model: ModelVersion) -> bool:
        """Cheap: the breaker's state, then a cached model-ready probe (one in flight at a time)."""
        gpu = self.gpu
        if gpu is None or not model.serves_gpu:
            return False
        if self.breaker.state == "open":
            return False
        return self.health.get(f"{model.name}/{model.version}", lambda: self._probe(gpu, model))

    def _probe(self, gpu: Backend, model: ModelVersion) -> bool:
        """Model-ready; when it is not, a server-ready check tells a dead tier from an unloaded model.

        A dead tier (server not ready or unreachable) counts as a breaker failure, so the circuit
        opens on probes too, not only on failed calls. The probe runs at most once per TTL per
        model (HealthCache's single flight), so this never counts one outage more than once a TTL."""
        if gpu.ready(model):
            return True
        if not gpu.ready(None):
            self.breaker.record_failure()
        return False

    def decide(self, model: ModelVersion, request: InferRequest, payload_bytes: int,
               hint: str | None, remaining_ms: float | None) -> Decision:
        ctx = RouteContext(
            model=model, rows=request.rows, payload_bytes=payload_bytes,
            hint=hint if hint is not None else request.target_hint, remaining_ms=remaining_ms,
            gpu_usable=self.gpu_usable(model) if model.serves_gpu else False,
        )
        return self.policy(ctx)

    def infer(self, model: ModelVersion, request: InferRequest, payload_bytes: int = 0,
              hint: str | None = None, remaining_ms: float | None = None) -> Routed:
        start = time.perf_counter()
        decision = self.decide(model, request, payload_bytes, hint, remaining_ms)
        timeout = self._timeout(remaining_ms)
        if decision.target == "gpu":
            routed = self._infer_gpu(model, request, decision, timeout)
        else:
            resp = self.cpu.infer(model, request, timeout)
            routed = Routed(resp, "cpu", decision, decision.fallback)
        routed.latency_ms = (time.perf_counter() - start) * 1000
        return routed

    def _timeout(self, remaining_ms: float | None) -> float:
        if remaining_ms is None:
            return self.gpu_timeout_s
        return max(0.05, min(self.gpu_timeout_s, remaining_ms / 1000 - RESPONSE_MARGIN_S))

    def _infer_gpu(self, model: ModelVersion, request: InferRequest, decision: Decision, timeout: float) -> Routed:
        gpu = self.gpu
        if gpu is None or not self.breaker.allow():
            return self._fallback(model, request, decision, timeout, "circuit open" if gpu else "no GPU tier")
        try:
            resp = gpu.infer(model, request, timeout)
        except errors.InvalidRequestError:
            self.breaker.record_success()  # the GPU answered; the request was wrong
            raise
        except (errors.BackendUnavailableError, errors.InferenceError) as exc:
            self.breaker.record_failure()
            self.health.invalidate(f"{model.name}/{model.version}")
            return self._fallback(model, request, decision, timeout, exc.message)
        except BaseException:
            # Anything else (a backend bug, ModelNotFoundError, KeyboardInterrupt) still ends the call:
            # release a half-open trial, or the breaker would refuse every later trial for good.
            self.breaker.record_failure()
            raise
        self.breaker.record_success()
        return Routed(resp, "gpu", decision)

    def _fallback(self, model: ModelVersion, request: InferRequest, decision: Decision,
                  timeout: float, why: str) -> Routed:
        if not model.serves_cpu:
            retry = self.breaker.retry_after_s() or self.breaker.cooldown_s
            raise errors.BackendUnavailableError(
                f"model {model.name!r} v{model.version} runs on the GPU tier only, which is unavailable "
                f"({why}); retry later, or recompile it with a CPU variant (--target both)",
                retry_after_s=retry,
            )
        resp = self.cpu.infer(model, request, timeout)
        fallback = Decision("cpu", f"{decision.reason}; GPU tier unavailable ({why})", "gpu-unavailable")
        return Routed(resp, "cpu", fallback, "gpu-unavailable")
