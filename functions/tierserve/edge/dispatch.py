"""The edge dispatcher: serve a request on this device or forward it to the cloud, with one fallback.

It answers the same questions as the cloud's TierDispatcher (``decide``, ``dispatch``, ``score``,
``ready``, ``state``), so the same endpoint table and inference path run on the device. Order of a
dispatch:

1. the policy (``routing.at_edge`` around the ``ROUTING_POLICY`` the cloud uses) decides from facts:
   whether the device holds the version, the batch's rows against the device's ``edge_max_rows``,
   and whether the device is saturated (``--max-concurrency`` inferences already running);
2. ``edge``: onnxruntime here. A failure of the device itself (the artifact cannot be loaded) goes to
   ``_fallback``; an input error is the request's (400);
3. anything else is forwarded, behind the cloud link's circuit breaker: no answer (unreachable,
   timeout) counts against it and goes to ``_fallback``; any HTTP answer is passed back as it is;
4. ``_fallback`` is the one place a decision changes: a version the device holds is served here
   (``x-fallback: cloud-unavailable``, or ``edge-unavailable`` the other way round), any other gets a
   fast 503 with ``Retry-After`` (the breaker's time left, or its cooldown).

``FORWARDED`` tells the HTTP and gRPC servers, per request, whether the answer came from the cloud (its
``x-served-by`` stands) or from this device (``x-served-by: edge``, health and metadata included).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from tierserve import errors
from tierserve.breaker import CircuitBreaker, HealthCache
from tierserve.edge.backend import EdgeBackend
from tierserve.edge.forward import CloudBackend
from tierserve.edge.metrics import EdgeCounters
from tierserve.edge.store import EdgeStore
from tierserve.manifest import ModelVersion
from tierserve.protocol.calls import InferenceCall, Reply
from tierserve.routing import DEFAULT_EDGE_MAX_ROWS, Decision, EdgeFacts, Policy, RouteContext
from tierserve.tiering import Deadline, Dispatched, score_arrays
from tierserve.tiers import Tier

#: True while a request's answer comes from the cloud (set per request by the dispatcher).
FORWARDED: ContextVar[bool] = ContextVar("tierserve_edge_forwarded", default=False)


class EdgeDispatcher:
    def __init__(self, store: EdgeStore, edge: EdgeBackend, cloud: CloudBackend | None, policy: Policy,
                 breaker: CircuitBreaker, health: HealthCache, *, max_rows: int = 0, concurrency: int = 1,
                 forward_timeout_s: float = 30.0, edge_timeout_s: float = 30.0,
                 counters: EdgeCounters | None = None) -> None:
        self.store = store
        self.edge = edge
        self.cloud = cloud
        self.policy = policy
        self.breaker = breaker
        self.health = health
        self.max_rows = max_rows
        self.concurrency = concurrency
        self.forward_timeout_s = forward_timeout_s
        self.edge_timeout_s = edge_timeout_s
        self.counters = counters or EdgeCounters()
        self._inflight = 0

    # --- what the runtime asks -----------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        return self._inflight

    def max_rows_for(self, model: ModelVersion) -> int:
        """The device's own limit (--max-rows) when set, else the compiler's (routing.edge_max_rows)."""
        return self.max_rows or int(model.routing.get("edge_max_rows", DEFAULT_EDGE_MAX_ROWS))

    @property
    def gpu(self) -> CloudBackend | None:
        """A GPU-only model is reached through the cloud (the repository index reports it READY)."""
        return self.cloud

    def cloud_usable(self) -> bool:
        return self.cloud is not None and self.breaker.state != "open"

    def ready(self, model: ModelVersion) -> bool:
        """The device can run it, or the cloud (reachable, breaker closed) says the model is ready."""
        return self.readiness(model) is None

    def readiness(self, model: ModelVersion) -> errors.TierserveError | None:
        """Why neither this device nor the cloud can serve ``model`` now (None: one can). The one predicate
        of ``/v2/models/NAME/ready``, gRPC ``ModelReady`` and the repository index's state (HTTP and gRPC):
        the device runs the version it holds, else the cloud (configured, its circuit not open) reports the
        model ready (cached for ``HEALTH_TTL_S``)."""
        if self.edge.ready(model):
            return None
        here = ("this device holds it but cannot load it" if self.store.held(model) is not None
                else "this device does not hold it")
        cloud = self.cloud
        if cloud is None:
            why = f"{here}, and no cloud gateway is configured (--cloud-url)"
        elif not self.cloud_usable():
            why = f"{here}, and the cloud link's circuit is {self.breaker.state}"
        elif self.health.get(f"{model.name}/{model.version}", lambda: cloud.ready(model)):
            return None
        else:
            why = f"{here}, and the cloud gateway does not report it ready"
        return errors.BackendUnavailableError(why, retry_after_s=self.breaker.retry_after_s() or 5)

    #: What the repository index asks for each version (``api`` / ``model_config.repository_index``).
    index_readiness = readiness

    def state(self) -> dict[str, str]:
        return {Tier.EDGE.value: f"{len(self.store.snapshot.held)} held",
                "cloud": self.breaker.state if self.cloud is not None else "none"}

    def decide(self, model: ModelVersion, call: InferenceCall, hint: str | None = None,
               deadline: Deadline | None = None) -> Decision:
        facts = EdgeFacts(held=self.store.held(model) is not None, max_rows=self.max_rows_for(model),
                          saturated=lambda: self._inflight >= self.concurrency)
        ctx = RouteContext(model=model, rows=call.rows, tensor_bytes=call.tensor_bytes,
                           hint=hint if hint is not None else call.target_hint,
                           remaining_ms=deadline.remaining_ms() if deadline is not None else None, edge=facts)
        return self.policy(ctx)

    # --- running a model -------------------------------------------------------------------------------

    def dispatch(self, model: ModelVersion, call: InferenceCall, hint: str | None = None,
                 deadline: Deadline | None = None) -> Dispatched:
        start = time.perf_counter()
        deadline = deadline or Deadline(None)
        FORWARDED.set(False)
        decision = self.decide(model, call, hint, deadline)
        if decision.target == Tier.EDGE:
            done = self._edge(model, call, decision, deadline)
        else:
            done = self._forward(model, call, hint, decision, deadline)
        done.latency_ms = (time.perf_counter() - start) * 1000
        return done

    def score(self, model: ModelVersion, arrays: dict[str, Any], deadline: Deadline | None = None) -> dict[str, Any]:
        return score_arrays(self, model, arrays, deadline)

    @contextlib.contextmanager
    def _slot(self) -> Iterator[None]:
        self._inflight += 1  # a gauge for saturation: an off-by-one under a race only shifts one decision
        try:
            yield
        finally:
            self._inflight -= 1

    def _run_here(self, model: ModelVersion, call: InferenceCall, deadline: Deadline) -> Reply:
        with self._slot():
            reply = self.edge.infer(model, call, deadline.budget(self.edge_timeout_s))
        self.counters.hit(model.name, model.version)
        return reply

    def _edge(self, model: ModelVersion, call: InferenceCall, decision: Decision, deadline: Deadline) -> Dispatched:
        try:
            return Dispatched(self._run_here(model, call, deadline), Tier.EDGE, decision)
        except errors.InvalidRequestError:
            raise
        except (errors.ArtifactError, errors.InferenceError, errors.BackendUnavailableError) as exc:
            if not self.cloud_usable():
                raise
            return self._forward(model, call, None, Decision(Tier.CPU, f"{decision.reason}; the device failed "
                                 f"({exc.message})", "edge-unavailable"), deadline, fallback="edge-unavailable")

    def _forward(self, model: ModelVersion, call: InferenceCall, hint: str | None, decision: Decision,
                 deadline: Deadline, fallback: str | None = None) -> Dispatched:
        cloud = self.cloud
        if cloud is None:
            return self._fallback(model, call, decision, deadline, "no cloud gateway is configured (--cloud-url)")
        if not self.breaker.allow():
            return self._fallback(model, call, decision, deadline, "circuit open")
        timeout = deadline.budget(self.forward_timeout_s)
        FORWARDED.set(True)
        try:
            reply, served_by = cloud.forward(model, call, hint, timeout)
        except errors.BackendUnavailableError as exc:  # timeouts included
            self.breaker.record_failure()
            self.counters.forward_failure(model.name)
            FORWARDED.set(False)
            if fallback is not None:
                raise
            return self._fallback(model, call, decision, deadline, exc.message)
        except BaseException:
            self.breaker.record_failure()  # release a half-open trial whatever happened
            FORWARDED.set(False)
            raise
        self.breaker.record_success()
        self.counters.forward(model.name, model.version, served_by)
        return Dispatched(reply, served_by, decision, fallback)

    def _fallback(self, model: ModelVersion, call: InferenceCall, decision: Decision, deadline: Deadline,
                  why: str) -> Dispatched:
        """The one place a forward becomes an answer from this device, or a fast 503 with Retry-After."""
        if self.store.held(model) is not None:
            reply = self._run_here(model, call, deadline)
            self.counters.fallback(model.name)
            return Dispatched(reply, Tier.EDGE, Decision(Tier.EDGE, f"{decision.reason}; cloud unavailable ({why})",
                                                      "cloud-unavailable"), "cloud-unavailable")
        retry = self.breaker.retry_after_s() or self.breaker.cooldown_s
        raise errors.BackendUnavailableError(
            f"model {model.name!r} v{model.version} is served by the cloud, which this edge device cannot use "
            f"({why}); retry later", retry_after_s=retry)

