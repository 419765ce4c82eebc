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

Generation (issue 17): a text-generation model the device holds runs here (:meth:`EdgeDispatcher.generate`:
``generation.service.generate_local`` with the edge variant, onnxruntime-genai), admitted within the device's KV
memory (:class:`KvAdmission`: past it, a 429 with ``Retry-After``) as well as the model's cap on concurrent
generations. Any other is relayed to the cloud's own route as it came (:meth:`relay_generation`: the client's
body, the cloud's answer and its stream passed on chunk by chunk; the client going away drops the connection, so
the cloud stops too).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from tierserve import errors
from tierserve.breaker import CircuitBreaker, HealthCache
from tierserve.edge.backend import EdgeBackend
from tierserve.edge.forward import CloudBackend
from tierserve.edge.metrics import EdgeCounters
from tierserve.edge.store import EdgeStore
from tierserve.generation.events import HeldEvents
from tierserve.generation.kv import kv_bytes_per_token
from tierserve.manifest import ModelVersion
from tierserve.protocol.calls import InferenceCall, Reply
from tierserve.routing import DEFAULT_EDGE_MAX_ROWS, Decision, EdgeFacts, Policy, RouteContext
from tierserve.tiering import Deadline, Dispatched, score_arrays
from tierserve.tiers import Tier

if TYPE_CHECKING:
    from tierserve.app import Runtime
    from tierserve.generation.events import GenerationEvent
    from tierserve.generation.requests import GenerationRequest
    from tierserve.protocol.http_api import HttpRequest
    from tierserve.streaming.response import StreamingResponse

#: True while a request's answer comes from the cloud (set per request by the dispatcher).
FORWARDED: ContextVar[bool] = ContextVar("tierserve_edge_forwarded", default=False)
#: Seconds a client is told to wait when the device's KV memory is full.
KV_RETRY_AFTER_S = 2.0
#: Headers of the cloud's generation answer passed back to the client.
GENERATION_PASSED_BACK = ("content-type", "retry-after", "x-served-by", "cache-control")


class KvAdmission:
    """Generations running on the device, each holding the KV cache of its prompt plus ``max_tokens``: together
    within ``budget()`` bytes (the device's memory budget less what its loaded models take). One more is a 429
    with Retry-After; one that could never fit, even alone, is a 400 that says how many tokens would."""

    def __init__(self, budget: Callable[[], int]) -> None:
        self.budget = budget
        self._lock = threading.Lock()
        self.reserved = 0
        self.running = 0

    def acquire(self, model: ModelVersion, tokens: int, per_token: int) -> Callable[[], None]:
        need = tokens * per_token
        budget = self.budget()
        with self._lock:
            if need > budget:
                fits = budget // per_token if per_token else 0
                raise errors.InvalidParameterError(
                    f"{tokens} tokens of {model.name!r} need {need / 2**20:.1f} MB of KV cache, more than this edge "
                    f"device has for it ({max(0, budget) / 2**20:.1f} MB of --max-memory-mb); ask for fewer tokens "
                    f"(prompt plus max_tokens at most {fits})", param="max_tokens", code="context_length_exceeded")
            if self.reserved + need > budget:
                raise errors.TooManyRequestsError(
                    f"this edge device's KV memory is held by {self.running} generation(s) "
                    f"({self.reserved / 2**20:.1f} of {budget / 2**20:.1f} MB); retry after the Retry-After seconds",
                    retry_after_s=KV_RETRY_AFTER_S)
            self.reserved += need
            self.running += 1
        released = threading.Event()

        def release() -> None:
            if released.is_set():
                return
            released.set()
            with self._lock:
                self.reserved -= need
                self.running -= 1

        return release


class _Held(HeldEvents):
    """A generation's events with its KV reservation held until they end, fail or are closed."""

    def __init__(self, events: Iterator[GenerationEvent], release: Callable[[], None]) -> None:
        super().__init__(events)
        self._release = release

    def _end(self) -> None:
        self._release()


class EdgeDispatcher:
    #: What this process answers as (``x-served-by``, the data plane's tier for what it runs itself).
    answered_by = Tier.EDGE
    #: The runtime this dispatcher serves (set by the edge runtime once composed): generation runs through it.
    runtime: Runtime | None = None

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
        self.kv = KvAdmission(self._kv_budget)

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
        if self._runs_here(model):
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

    def _runs_here(self, model: ModelVersion) -> bool:
        """The device holds ``model`` and can load it: onnxruntime (a probe run) for an inference model,
        onnxruntime-genai (the model loaded, then cached for its generations) for a text-generation one."""
        if not model.generative:
            return self.edge.ready(model)
        held = self.store.held(model)
        if held is None or self.runtime is None:
            return False
        from tierserve.generation import engine, service

        try:
            engine.load(held.path.parent, service.threads_for(self.runtime))
        except Exception:  # ArtifactError, or a bug: a model the device cannot load is not ready here
            return False
        return True

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

    # --- generation (issue 17) -----------------------------------------------------------------------------

    def _kv_budget(self) -> int:
        """Bytes the KV caches of generations may take: the device's memory budget, less the sessions loaded and
        the weights of the generative models it holds (their files, as onnxruntime-genai maps them)."""
        weights = sum(h.size_bytes for h in self.store.snapshot.held.values() if h.model.generative)
        return int(getattr(self.edge.pool, "max_bytes", 0)) - self.edge.pool.used_bytes - weights

    def generate(self, model: ModelVersion, request: GenerationRequest, deadline: Deadline | None = None,
                 cancelled: Callable[[], bool] = lambda: False) -> Iterator[GenerationEvent]:
        """Run a prepared generation on this device (``relay_generation`` sent the others to the cloud): within
        the KV memory (429 past it), then the model's cap on concurrent generations, then onnxruntime-genai."""
        from tierserve.generation import service

        runtime = self.runtime
        if runtime is None:
            raise errors.ConfigurationError("the edge dispatcher has no runtime to generate with")
        held = self.store.held(model)
        if held is None:
            raise errors.BackendUnavailableError(f"model {model.name!r} v{model.version} is not held by this edge "
                                                 "device", retry_after_s=5)
        assert request.prompt_ids is not None and request.params.max_tokens is not None
        tokens = len(request.prompt_ids) + request.params.max_tokens
        release = self.kv.acquire(model, tokens, kv_bytes_per_token(model, held.path.parent))
        try:
            events = service.generate_local(runtime, model, request, cancelled, Tier.EDGE)
        except BaseException:
            release()
            raise
        self.counters.hit(model.name, model.version)
        return _Held(events, release)

    def relay_generation(self, model: ModelVersion, req: HttpRequest, cancelled: Callable[[], bool] | None = None
                         ) -> dict[str, Any] | StreamingResponse | None:
        """None when this device generates for ``model`` (it holds it); else the cloud's answer to the same route
        and body, its stream relayed chunk by chunk (a 503 with Retry-After when the cloud cannot be used)."""
        from tierserve.protocol.header import body_view
        from tierserve.protocol.http_api import response
        from tierserve.streaming.response import StreamingResponse

        if self.store.held(model) is not None:
            return None
        cloud = self.cloud
        why = ("no cloud gateway is configured (--cloud-url)" if cloud is None
               else "circuit open" if not self.breaker.allow() else "")
        if cloud is None or why:
            raise errors.BackendUnavailableError(
                f"model {model.name!r} v{model.version} is not held by this edge device and is generated in the cloud, "
                f"which it cannot use ({why}); retry later",
                retry_after_s=self.breaker.retry_after_s() or self.breaker.cooldown_s)
        headers = {"Content-Type": req.header("content-type") or "application/json",
                   "Accept": req.header("accept") or "*/*"}
        if req.header("x-target"):
            headers["x-target"] = str(req.header("x-target"))
        FORWARDED.set(True)
        try:
            streamed = cloud.client.stream(req.method, req.path, bytes(body_view(req.body)), headers,
                                           self.forward_timeout_s)
        except errors.BackendUnavailableError:
            self.breaker.record_failure()
            self.counters.forward_failure(model.name)
            FORWARDED.set(False)
            raise
        if streamed.status in (401, 403):
            self.breaker.record_failure()
            refusal = streamed.read()
            FORWARDED.set(False)
            raise errors.BackendUnavailableError(
                f"the cloud gateway {cloud.url} refused this device's credentials ({refusal.body[:200]!r}); check "
                "--cloud-auth and the device's role or token", retry_after_s=60)
        self.breaker.record_success()
        served_by = streamed.served_by or Tier.CPU
        self.counters.forward(model.name, model.version, served_by)
        out = {k: v for k, v in streamed.headers.items() if k in GENERATION_PASSED_BACK}
        out["x-served-by"] = served_by
        if not out.get("content-type", "").startswith("text/event-stream"):
            whole = streamed.read()
            return response(whole.status, whole.body, out)
        return StreamingResponse(streamed.status, out, streamed.chunks(), streamed.close)

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

