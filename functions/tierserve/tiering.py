"""The tier dispatcher: which tier serves a request, carried out within its deadline, with one fallback.

``TierDispatcher`` is the only object that knows the tiers' backends, the GPU circuit breaker and
the health cache. Everything else asks it three questions: ``ready(model)``, ``state()`` and, to
run a model, ``dispatch(model, call)`` (a protocol request) or ``score(model, arrays)`` (batch).

Order of a dispatch:

1. the routing policy (``tierserve.routing.POLICIES``) names the preferred tier from facts alone:
   targets, rows and tensor bytes (from the header, whatever the encoding), the client's hint and
   the time left; it never pays for a health probe unless it asks for one;
2. a GPU decision consults the breaker and the cached health probe, lazily, only then;
3. a GPU failure that is the tier's fault (unreachable, timeout, server error) counts against the
   breaker; an input error never does: the GPU answered, the request was wrong;
4. ``_fallback`` is the single place a GPU decision becomes CPU: the model's CPU copy gets what is
   left of the request's deadline, or a GPU-only model gets a fast 503 with Retry-After;
5. ``_cpu_first`` is the single place a CPU decision becomes GPU: only when the CPU tier is throttled
   (``TierThrottledError``: nothing ran), for a model the GPU tier serves and finds usable, marked
   ``cpu-unavailable``; if that GPU call fails too, the request gets a 503 (never a CPU retry).

A GPU call is never retried on the GPU: it may already have run.

A generation (issues 17 and 18) is routed by :meth:`TierDispatcher.generate_tiers`: ``routing.decide_generation``
from its prompt's tokens and ``max_tokens`` (the ``x-target`` header / ``parameters.target`` still override), then
:class:`TieredGeneration` carries the decision out as one stream of events:

- on the GPU tier, ``gpu.generate`` (Triton's ``generate_stream`` or SageMaker's response stream) with the prompt
  as the vLLM backend takes it (text, ``generate_stream.prompt_text``); the breaker and the health cache as for
  an inference; a failure before the first token (or an open circuit) goes to the model's CPU copy, marked
  ``x-fallback: gpu-unavailable``; an input error is the client's 400 and never counts against the tier;
- when the GPU stream breaks after N tokens, the same generation goes on on the CPU copy (**failover in the middle
  of a stream**): the prompt's ids plus the N ids already streamed (never re-tokenized text), ``max_tokens - N``;
  the text goes on from the ids already sent (:class:`ContinuedText` decodes the combined ids, so a character
  split across the failover, a space a SentencePiece decoder adds at a boundary or a stop string that spans it
  come out right); the final event records it (``extra["failover"]``: from, to, after_tokens) and so does the
  ``FailoverMidStream`` metric; when no tier can continue, the stream ends with an error (the adapter's error
  event), never a silent truncation;
- on the CPU tier, the model's CPU class function over ``InvokeWithResponseStream`` (``backends.lambda_stream``)
  when the CPU tier is remote (``CPU_BACKEND=lambda``), else the data plane's in-process path
  (``generation.service.generate_local``, passed in as ``local``: the dispatcher never imports the engine's
  service, which would close an import cycle through ``tierserve.app``); a CPU tier at its limit before the first
  event goes to the GPU when the policy chose (no hint) and the GPU can take it, marked ``cpu-unavailable``.

The request's deadline and ``cancelled()`` are checked between events on every path (:func:`_bounded`).
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from tierserve import errors
from tierserve.backends.base import Backend
from tierserve.breaker import CircuitBreaker, HealthCache
from tierserve.manifest import Manifest, ModelVersion
from tierserve.protocol.calls import InferenceCall, Reply
from tierserve.protocol.messages import InferRequest, RequestedOutput
from tierserve.routing import Decision, Policy, RouteContext
from tierserve.tiers import Tier

if TYPE_CHECKING:
    from tierserve.generation.events import GenerationEvent
    from tierserve.generation.requests import GenerationRequest

#: A generation backend: (model, prepared request, deadline, cancelled) -> events.
GenerateFn = Callable[["ModelVersion", "GenerationRequest", "Deadline | None", Callable[[], bool]],
                      Iterator["GenerationEvent"]]
#: The data plane's in-process generation: (model, prepared request, cancelled) -> events.
LocalGenerateFn = Callable[["ModelVersion", "GenerationRequest", Callable[[], bool]], Iterator["GenerationEvent"]]

#: Time kept back from the caller's remaining budget for encoding and the response's way out.
RESPONSE_MARGIN_S = 0.25
#: The least time a call is given; below it the deadline has passed.
MIN_CALL_S = 0.05


class Deadline:
    """A request's total time budget on a monotonic clock: each tier gets what is left, not a fresh timeout."""

    def __init__(self, seconds: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._at = None if seconds is None else clock() + seconds

    @classmethod
    def from_context(cls, context: Any, margin_s: float = RESPONSE_MARGIN_S) -> Deadline:
        """What a Lambda context has left, less a margin for the response's way out (None: no limit)."""
        fn: Callable[[], int] | None = getattr(context, "get_remaining_time_in_millis", None)
        return cls(None if fn is None else fn() / 1000 - margin_s)

    def remaining(self) -> float | None:
        return None if self._at is None else self._at - self._clock()

    def remaining_ms(self) -> float | None:
        r = self.remaining()
        return None if r is None else r * 1000

    def budget(self, cap_s: float) -> float:
        """The timeout for the next call: what is left, at most ``cap_s``; BackendTimeoutError when spent."""
        left = self.remaining()
        t = cap_s if left is None else min(cap_s, left)
        if t < MIN_CALL_S:
            raise errors.BackendTimeoutError("the request's deadline has passed; no time is left to call a tier")
        return t


@dataclass
class Dispatched:
    reply: Reply
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
    canary = manifest.models[name].canary
    if not canary:
        return default
    key = (request_id or f"{time.time_ns()}").encode()
    bucket = int.from_bytes(hashlib.sha256(key).digest()[:4], "big") % 10_000
    if bucket < float(canary["percent"]) * 100:
        return manifest.resolve(name, str(canary["version"]))
    return default


class Dispatcher(Protocol):
    """What the rest of the runtime asks of a dispatcher: this module's TierDispatcher (the cloud), or the
    edge runtime's EdgeDispatcher (a device in front of the cloud, ``tierserve.edge.dispatch``)."""

    def decide(self, model: ModelVersion, call: InferenceCall, hint: str | None = None,
               deadline: Deadline | None = None) -> Decision: ...

    def dispatch(self, model: ModelVersion, call: InferenceCall, hint: str | None = None,
                 deadline: Deadline | None = None) -> Dispatched: ...

    def score(self, model: ModelVersion, arrays: dict[str, Any], deadline: Deadline | None = None
              ) -> dict[str, Any]: ...

    def ready(self, model: ModelVersion) -> bool: ...

    def state(self) -> dict[str, str]: ...

    @property
    def gpu(self) -> object | None:
        """How a GPU-only model is reached from here (the GPU backend; at an edge, the cloud), or None."""
        ...


def readiness_of(dispatcher: Any, model: ModelVersion) -> errors.TierserveError | None:
    """Why ``dispatcher`` cannot serve ``model`` now (None: it can): ``TierDispatcher.readiness``, or for a
    dispatcher without one (the edge's), its plain ``ready``."""
    check = getattr(dispatcher, "readiness", None)
    if check is not None:
        return check(model)  # type: ignore[no-any-return]
    return None if dispatcher.ready(model) else errors.BackendUnavailableError("no tier can serve it now",
                                                                              retry_after_s=5)


def _readiness(backend: Backend, model: ModelVersion) -> errors.TierserveError | None:
    """A backend's reason not to serve ``model`` (``check_ready`` when it has one, else ``ready``)."""
    check = getattr(backend, "check_ready", None)
    if check is None:
        return None if backend.ready(model) else errors.BackendUnavailableError("the CPU tier cannot load it")
    try:
        check(model)
    except errors.TierserveError as exc:
        return exc
    return None


def _daemon(fn: Callable[[], None]) -> None:
    threading.Thread(target=fn, name="gpu-health-check", daemon=True).start()


def log_transition(old: str, new: str, why: str) -> None:
    """The GPU circuit's transitions as structured log events (a warning when it opens, with the reason) and
    as the BreakerTransitions metric (``tierserve.telemetry``, by state: alarm on ``open``)."""
    from tierserve import telemetry
    from tierserve.observability import logger

    level = logger.warning if new == "open" else logger.info
    level("circuit breaker transition", extra={"event": "circuit_breaker", "tier": Tier.GPU, "from": old,
                                               "to": new, "reason": why})
    telemetry.breaker_transition(old, new)


def check_values(call: InferenceCall, model: ModelVersion) -> None:
    """The manifest's value checks (non-finite floats, value ranges) on the call's tensors (materialised)."""
    from tierserve.protocol.tensors import check_values as check

    check(call.request(), model)


class TierDispatcher:
    def __init__(
        self,
        cpu: Backend | None,
        gpu: Backend | None,
        policy: Policy,
        breaker: CircuitBreaker | None = None,
        health: HealthCache | None = None,
        gpu_timeout_s: float = 10.0,
        cpu_timeout_s: float = 30.0,
        tokens: Any = None,
    ) -> None:
        self.cpu = cpu
        self.gpu = gpu
        self.policy = policy
        self.breaker = breaker or CircuitBreaker()
        self.health = health or HealthCache()
        self.gpu_timeout_s = gpu_timeout_s
        self.cpu_timeout_s = cpu_timeout_s
        #: Counts a prompt that is not tokenized yet (``generation.tokens.TokenCounter``), or None.
        self.tokens = tokens
        #: How the post-timeout health check runs: a daemon thread (tests run it inline).
        self.run_in_background: Callable[[Callable[[], None]], None] = _daemon
        self._probe_lock = threading.Lock()
        self._probing = False

    # --- what the rest of the runtime asks -----------------------------------------------------------

    def gpu_usable(self, model: ModelVersion) -> bool:
        """Cheap: the breaker's state, then a cached model-ready probe (one in flight at a time)."""
        gpu = self.gpu
        if gpu is None or not model.serves_gpu or self.breaker.state == "open":
            return False
        if self._probing:  # a call just timed out and the server check is still out: send nothing more there
            return False
        return self.health.get(f"{model.name}/{model.version}", lambda: self._probe(gpu, model))

    def _probe(self, gpu: Backend, model: ModelVersion) -> bool:
        """Model-ready; when it is not, a server-ready check tells a dead tier from an unloaded model.

        A server that does not answer its own health check (refused: dead; no answer within the short
        ready timeout: frozen) opens the circuit at once: counting failures would send the next requests
        into it, each paying a timeout. A live server without the model leaves the circuit alone."""
        if gpu.ready(model):
            return True
        if not gpu.ready(None):
            self.breaker.trip("the GPU server did not answer its health check")
        return False

    def ready(self, model: ModelVersion) -> bool:
        """Whether some tier can serve ``model`` now: its CPU copy loads and runs, or the GPU tier is usable."""
        return self.readiness(model) is None

    def readiness(self, model: ModelVersion) -> errors.TierserveError | None:
        """None when some tier can serve ``model`` now, else why not: the CPU tier's own error (its code,
        e.g. ``integrity_error``, kept), or the GPU tier's unavailability."""
        problem: errors.TierserveError | None = None
        if model.serves_cpu and self.cpu is not None:
            problem = _readiness(self.cpu, model)
            if problem is None:
                return None
        if self.gpu_usable(model):
            return None
        if problem is None:
            if self.gpu is None or not model.serves_gpu:
                why = "no tier here can serve it"
            elif self.breaker.state != "closed":
                why = f"the GPU tier's circuit is {self.breaker.state}"
            else:
                why = "the GPU tier does not report it ready"
            problem = errors.BackendUnavailableError(why, retry_after_s=self.breaker.retry_after_s() or 5)
        return problem

    def state(self) -> dict[str, str]:
        """The tiers as operators see them: which are configured, and the GPU circuit's state."""
        # plain str keys (.value): orjson refuses a str subclass as a key
        return {Tier.CPU.value: "configured" if self.cpu is not None else "none",
                Tier.GPU.value: self.breaker.state if self.gpu is not None else "none"}

    def decide(self, model: ModelVersion, call: InferenceCall, hint: str | None = None,
               deadline: Deadline | None = None) -> Decision:
        ctx = RouteContext(
            model=model, rows=call.rows, tensor_bytes=call.tensor_bytes,
            hint=hint if hint is not None else call.target_hint,
            remaining_ms=deadline.remaining_ms() if deadline is not None else None,
            gpu_usable=lambda: self.gpu_usable(model),
        )
        return self.policy(ctx)

    # --- running a model ------------------------------------------------------------------------------

    def dispatch(self, model: ModelVersion, call: InferenceCall, hint: str | None = None,
                 deadline: Deadline | None = None) -> Dispatched:
        """Run ``call`` (already checked against ``model``) on the tier the policy picks; fall back once."""
        start = time.perf_counter()
        deadline = deadline or Deadline(None)
        decision = self.decide(model, call, hint, deadline)
        if decision.target == Tier.GPU:
            done = self._gpu(model, call, decision, deadline)
        else:
            done = self._cpu_first(model, call, decision, deadline)
        done.latency_ms = (time.perf_counter() - start) * 1000
        return done

    def score(self, model: ModelVersion, arrays: dict[str, Any], deadline: Deadline | None = None) -> dict[str, Any]:
        """Batch scoring: numpy feeds in, every output as a numpy array out, through the same tiers."""
        return score_arrays(self, model, arrays, deadline)

    @property
    def generate(self) -> GenerateFn | None:
        """This dispatcher's generation backend, ``generate(model, request, deadline, cancelled)``, when it can
        generate without the data plane's in-process path: its CPU tier is a CPU function (``CPU_BACKEND=lambda``)
        or its GPU tier generates. None otherwise (the data plane runs ``generation.service.generate_local``). The
        data plane itself calls :meth:`generate_tiers`, passing its in-process path."""
        if getattr(self.cpu, "function_for", None) is None and getattr(self.gpu, "generate", None) is None:
            return None
        return self.generate_tiers

    def generation_facts(self, model: ModelVersion, request: GenerationRequest) -> tuple[int, int]:
        """(prompt tokens, max_tokens) for routing: exact from the prepared ids; else the token counter (the
        tokenizer or the manifest's calibrated estimate); ``max_tokens`` resolved, else the model's default."""
        if request.prompt_ids is not None:
            prompt = len(request.prompt_ids)
        elif self.tokens is not None:
            prompt = int(self.tokens.count(model, request).count)
        else:
            prompt = 0
        asked = request.params.max_tokens
        spec = model.generation
        default = min(spec.default_max_tokens, spec.max_tokens_cap) if spec is not None else 0
        return prompt, int(asked if asked is not None else default)

    def decide_generation(self, model: ModelVersion, request: GenerationRequest,
                          deadline: Deadline | None = None) -> Decision:
        """The tier for a generation: ``routing.decide_generation`` from its facts (hints override)."""
        from tierserve.routing import decide_generation

        prompt, max_tokens = self.generation_facts(model, request)
        ctx = RouteContext(model=model, rows=1, tensor_bytes=0, hint=request.hint or None,
                           remaining_ms=deadline.remaining_ms() if deadline is not None else None,
                           gpu_usable=lambda: self.gpu_usable(model), prompt_tokens=prompt, max_tokens=max_tokens)
        return decide_generation(ctx, self.policy)

    def generate_tiers(self, model: ModelVersion, request: GenerationRequest, deadline: Deadline | None = None,
                       cancelled: Callable[[], bool] = lambda: False, local: LocalGenerateFn | None = None,
                       tokenizer: Callable[[], Any] | None = None) -> TieredGeneration:
        """One generation (``request`` prepared: prompt ids and ``max_tokens`` set) on the tier the policy picks,
        with the fallback before the first token and the failover in the middle of a stream (module docstring).

        ``local(model, request, cancelled)`` runs a generation in this process (the data plane's
        ``generate_local``; needed when the CPU tier is in process); ``tokenizer()`` gives the model's
        ``tokenizers.Tokenizer`` (the GPU tier's prompt text for a chat, and the text of a continuation), called
        only when needed. What fails before the first event is raised by the first ``next()``."""
        deadline = deadline or Deadline(None)
        decision = self.decide_generation(model, request, deadline)
        return TieredGeneration(self, model, request, deadline, cancelled, decision, local, tokenizer)

    def generate_remote(self, model: ModelVersion, request: GenerationRequest, deadline: Deadline | None = None,
                        cancelled: Callable[[], bool] = lambda: False) -> Iterator[GenerationEvent]:
        """One generation (``request`` prepared: prompt ids and ``max_tokens`` set) on the model's CPU function,
        as events.

        The caller (``DataPlane.generate``) reads the first event at once, so a refusal (429 with Retry-After
        when the CPU function is throttled or at its cap, the tier's own 4xx with its code) is raised before
        anything is streamed. Between events the deadline (``BackendTimeoutError``) and ``cancelled()`` (the
        stream ends and is closed) are checked."""
        deadline = deadline or Deadline(None)
        if self.cpu is None or not model.serves_cpu:
            raise errors.BackendUnavailableError(
                f"model {model.name!r} v{model.version} has no CPU variant; the CPU tier cannot generate it",
                retry_after_s=60)
        return _bounded(self._generate_remote(model, request, deadline, cancelled), deadline, cancelled, model)

    def _generate_remote(self, model: ModelVersion, request: GenerationRequest, deadline: Deadline,
                         cancelled: Callable[[], bool]) -> Iterator[GenerationEvent]:
        """The CPU class function over ``InvokeWithResponseStream``: ``{"generate": request}`` with the version
        pinned (this router's canary pick stands), its NDJSON lines as events."""
        import json

        from tierserve.backends import lambda_stream

        cpu: Any = self.cpu
        function_name = cpu.function_for(model)
        # the version this router picked stands, and so does its tier: the CPU function generates it itself
        pinned = replace(request, version=model.version, hint=Tier.CPU.value)
        payload = json.dumps({"generate": pinned.to_json()}).encode()
        timeout = deadline.budget(lambda_stream.MAX_STREAM_S)
        client = lambda_stream.client_for(cpu, timeout)
        try:
            stream = lambda_stream.invoke_stream(client, function_name, payload, timeout)
        except errors.TierThrottledError as exc:  # nothing ran; no other tier generates yet
            raise errors.TooManyRequestsError(f"the CPU tier is at its concurrency limit ({exc.message}); retry "
                                              "after the Retry-After seconds",
                                              retry_after_s=exc.retry_after_s or 1) from exc
        try:
            yield from lambda_stream.generation_events(stream)
        finally:
            stream.close()

    def _cpu(self, model: ModelVersion, call: InferenceCall, deadline: Deadline) -> Reply:
        if self.cpu is None or not model.serves_cpu:
            raise errors.BackendUnavailableError(
                f"model {model.name!r} v{model.version} has no CPU variant and no GPU tier can serve it here",
                retry_after_s=60)
        return self.cpu.infer(model, call, deadline.budget(self.cpu_timeout_s))

    def _cpu_first(self, model: ModelVersion, call: InferenceCall, decision: Decision,
                   deadline: Deadline) -> Dispatched:
        """The CPU tier; when it is throttled (nothing ran: its concurrency is spent), a model that the GPU
        tier also serves goes there, marked ``cpu-unavailable``. The other way round from ``_fallback``."""
        try:
            return Dispatched(self._cpu(model, call, deadline), Tier.CPU, decision)
        except errors.TierThrottledError as exc:
            if self.gpu is None or not model.serves_gpu or not self.gpu_usable(model):
                raise
            why = exc.message
        moved = Decision(Tier.GPU, f"{decision.reason}; CPU tier unavailable ({why})", "cpu-unavailable")
        done = self._gpu(model, call, moved, deadline, cpu_fallback=False)
        done.fallback = "cpu-unavailable"
        return done

    def _gpu(self, model: ModelVersion, call: InferenceCall, decision: Decision, deadline: Deadline,
             cpu_fallback: bool = True) -> Dispatched:
        """The GPU tier; a failure falls back to the CPU copy unless the CPU tier is why we are here."""
        if not cpu_fallback:
            def fallback(model: ModelVersion, call: InferenceCall, decision: Decision, deadline: Deadline,
                         why: str) -> Dispatched:
                raise errors.BackendUnavailableError(
                    f"model {model.name!r} v{model.version}: the CPU tier is throttled and the GPU tier failed "
                    f"({why}); retry later", retry_after_s=1)
        else:
            fallback = self._fallback
        gpu = self.gpu
        if gpu is None:
            return fallback(model, call, decision, deadline, "no GPU tier is configured")
        if not self.gpu_usable(model):
            why = "circuit open" if self.breaker.state == "open" else "not ready"
            return fallback(model, call, decision, deadline, why)
        check_values(call, model)  # an input the model cannot take is the client's error: the GPU never sees it
        timeout = deadline.budget(self.gpu_timeout_s)  # a spent deadline is the request's, not the tier's
        if not self.breaker.allow():
            return fallback(model, call, decision, deadline, "circuit open")
        try:
            reply = gpu.infer(model, call, timeout)
        except errors.InvalidRequestError as exc:
            self.breaker.record_success()  # the GPU answered; the request was wrong
            exc.served_by = Tier.GPU  # its answer: the response says so (x-served-by), not the renderer's default
            raise
        except (errors.BackendUnavailableError, errors.InferenceError) as exc:
            self.breaker.record_failure(exc.code)
            self.health.invalidate(f"{model.name}/{model.version}")
            if isinstance(exc, errors.BackendTimeoutError):
                self._check_server(gpu)
            return fallback(model, call, decision, deadline, exc.message)
        except BaseException:
            # Anything else (a backend bug, KeyboardInterrupt) still ends the call: release a half-open
            # trial, or the breaker would refuse every later trial for good.
            self.breaker.record_failure()
            raise
        self.breaker.record_success()
        return Dispatched(reply, Tier.GPU, decision)

    def _check_server(self, gpu: Backend) -> None:
        """After a timeout: one short server health check (in the background, one at a time), which
        opens the circuit at once when the server does not answer it. A frozen server (SIGSTOP, a hung
        GPU) then costs the first wave of requests one timeout each, instead of ``failure_threshold``
        timeouts in a row; a server that answers the check only had a slow call, counted as usual."""
        with self._probe_lock:
            if self._probing:
                return
            self._probing = True

        def check() -> None:
            try:
                if not gpu.ready(None):
                    self.breaker.trip("a call timed out and the server did not answer a health check")
                    self.health.invalidate()
            finally:
                with self._probe_lock:
                    self._probing = False

        self.run_in_background(check)

    def _fallback(self, model: ModelVersion, call: InferenceCall, decision: Decision, deadline: Deadline,
                  why: str) -> Dispatched:
        """The one place a GPU decision becomes CPU (or a fast 503 for a GPU-only model)."""
        if not model.serves_cpu or self.cpu is None:
            retry = self.breaker.retry_after_s() or self.breaker.cooldown_s
            raise errors.BackendUnavailableError(
                f"model {model.name!r} v{model.version} runs on the GPU tier only, which is unavailable "
                f"({why}); retry later, or recompile it with a CPU variant (--target both)",
                retry_after_s=retry,
            )
        reply = self._cpu(model, call, deadline)
        fallback = Decision(Tier.CPU, f"{decision.reason}; GPU tier unavailable ({why})", "gpu-unavailable")
        return Dispatched(reply, Tier.CPU, fallback, "gpu-unavailable")


    def gpu_failed(self, model: ModelVersion, exc: errors.TierserveError) -> None:
        """A GPU call failed for the tier's own reasons: count it, forget the cached probe, check the server after
        a timeout."""
        self.breaker.record_failure(exc.code)
        self.health.invalidate(f"{model.name}/{model.version}")
        if isinstance(exc, errors.BackendTimeoutError) and self.gpu is not None:
            self._check_server(self.gpu)

#: What a tier failure is, before the first token or in the middle of a stream (an input error never is).
TIER_FAILURES = (errors.BackendUnavailableError, errors.InferenceError)


class TieredGeneration:
    """One generation carried out on the tiers (:meth:`TierDispatcher.generate_tiers`), as an iterator of events.

    ``decision`` is the policy's; ``served_by`` the tier of the first event; ``fallback`` the ``x-fallback`` value
    when the decided tier could not start it (``gpu-unavailable``, ``cpu-unavailable``); ``failover`` the record of a
    failover in the middle of the stream (``{"from", "to", "after_tokens"}``), also on the final event's
    ``extra["failover"]``. :meth:`close` stops it (the client went away)."""

    def __init__(self, dispatcher: TierDispatcher, model: ModelVersion, request: GenerationRequest,
                 deadline: Deadline, cancelled: Callable[[], bool], decision: Decision,
                 local: LocalGenerateFn | None = None, tokenizer: Callable[[], Any] | None = None) -> None:
        self.d = dispatcher
        self.model = model
        self.request = request
        self.deadline = deadline
        self.cancelled = cancelled
        self.decision = decision
        self.local = local
        self._tokenizer_fn = tokenizer
        self._tokenizer: Any = None
        self.served_by = ""
        self.fallback: str | None = None
        self.failover: dict[str, Any] | None = None
        self._it = _bounded(self._run(), deadline, cancelled, model)

    def __iter__(self) -> TieredGeneration:
        return self

    def __next__(self) -> GenerationEvent:
        event = next(self._it)
        if not self.served_by:
            self.served_by = event.served_by
        return event

    def close(self) -> None:
        self._it.close()

    # --- the paths -------------------------------------------------------------------------------------------

    def _run(self) -> Iterator[GenerationEvent]:
        if self.decision.target == Tier.GPU:
            started, why = self._start_gpu()
            if started is None:
                yield from self._cpu_instead(why)
                return
            yield from self._gpu_stream(started)
            return
        yield from self._cpu_first()

    def tokenizer(self) -> Any:
        """The model's tokenizer (once), or None when there is no way to get it here."""
        if self._tokenizer is None and self._tokenizer_fn is not None:
            self._tokenizer = self._tokenizer_fn()
        return self._tokenizer

    def _prompt_text(self) -> str:
        """The prompt as the vLLM backend takes it: the completion's own text, else the text of the prepared ids
        (``generate_stream.prompt_text``: InvalidRequestError when no text gives the same ids)."""
        request = self.request
        if request.messages is None and request.prompt is not None:
            return request.prompt
        from tierserve.backends import generate_stream as gs

        tok = self.tokenizer()
        if tok is None:
            raise errors.InvalidRequestError("the prompt's text cannot be rebuilt here (no tokenizer) for the GPU "
                                             "tier, which takes text only; serve it on the CPU tier (x-target: cpu)")
        return gs.prompt_text(tok, request.prompt_ids or ())

    def _start_gpu(self) -> tuple[Iterator[GenerationEvent] | None, str]:
        """The GPU stream with its first event read (None and why not, when the GPU cannot start it)."""
        d, model = self.d, self.model
        gpu: Any = d.gpu
        if gpu is None or getattr(gpu, "generate", None) is None:
            return None, "no GPU tier that generates is configured"
        if not d.gpu_usable(model):
            return None, "circuit open" if d.breaker.state == "open" else "not ready"
        try:
            text = self._prompt_text()
        except errors.InvalidRequestError as exc:
            if (self.request.hint or "").lower() == Tier.GPU or not model.serves_cpu:
                exc.served_by = Tier.GPU
                raise
            return None, exc.message  # the prompt cannot go there as text: the CPU copy serves it (never counted)
        if not d.breaker.allow():
            return None, "circuit open"
        try:
            events = gpu.generate(model, self.request, self.deadline, self.cancelled, text_input=text)
            first = next(events)
        except StopIteration:
            d.breaker.record_success()
            return iter(()), ""
        except errors.InvalidRequestError as exc:
            d.breaker.record_success()  # the GPU answered; the request was wrong
            exc.served_by = Tier.GPU
            raise
        except TIER_FAILURES as exc:
            d.gpu_failed(model, exc)
            return None, exc.message
        except BaseException:
            d.breaker.record_failure()  # release a half-open trial whatever happened
            raise
        d.breaker.record_success()
        from tierserve.generation.metering import MeteredStream

        # the GPU tier's own figures (TTFT, ITL, tokens/s, tokens) from the router, which alone sees its stream: what
        # a rollout of a GPU-served generative version and the TTFT alarm judge (the CPU tier meters in its process)
        return MeteredStream(itertools.chain((first,), events), lambda: None, model, str(Tier.GPU)), ""

    def _cpu_events(self, request: GenerationRequest) -> Iterator[GenerationEvent]:
        """``request`` on the CPU tier: its CPU function (remote) or this process (``local``)."""
        d, model = self.d, self.model
        if d.cpu is None or not model.serves_cpu:
            raise errors.BackendUnavailableError(
                f"model {model.name!r} v{model.version} has no CPU variant here", retry_after_s=60)
        if getattr(d.cpu, "function_for", None) is not None:
            return d._generate_remote(model, request, self.deadline, self.cancelled)
        if self.local is None:
            raise errors.ConfigurationError("the CPU tier runs in this process but no in-process generation was "
                                            "given (generate_tiers(local=...))")
        return self.local(model, request, self.cancelled)

    def _cpu_instead(self, why: str) -> Iterator[GenerationEvent]:
        """The GPU could not start it: the CPU copy (``gpu-unavailable``), or a fast 503 for a GPU-only model."""
        d, model = self.d, self.model
        if not model.serves_cpu or d.cpu is None:
            retry = d.breaker.retry_after_s() or d.breaker.cooldown_s
            raise errors.BackendUnavailableError(
                f"model {model.name!r} v{model.version} runs on the GPU tier only, which is unavailable ({why}); "
                "retry later, or recompile it with a CPU variant (--target both)", retry_after_s=retry)
        self.fallback = "gpu-unavailable"
        self.decision = Decision(Tier.CPU, f"{self.decision.reason}; GPU tier unavailable ({why})", self.fallback)
        yield from self._cpu_events(self.request)

    def _cpu_first(self) -> Iterator[GenerationEvent]:
        """The CPU tier; at its limit before the first event (a 429: nothing ran) a generation the policy placed
        (no hint) goes to the GPU when it can take it (``cpu-unavailable``)."""
        try:
            events = self._cpu_events(self.request)
            first = next(events)
        except StopIteration:
            return
        except errors.TooManyRequestsError as exc:
            if self.request.hint or not self.model.serves_gpu or not self.d.gpu_usable(self.model):
                raise
            started, why = self._start_gpu()
            if started is None:
                raise errors.BackendUnavailableError(
                    f"model {self.model.name!r} v{self.model.version}: the CPU tier is at its limit ({exc.message}) "
                    f"and the GPU tier failed ({why}); retry later", retry_after_s=exc.retry_after_s or 1) from exc
            self.fallback = "cpu-unavailable"
            self.decision = Decision(Tier.GPU, f"{self.decision.reason}; CPU tier at its limit", self.fallback)
            yield from self._gpu_stream(started)
            return
        yield first
        yield from events

    def _gpu_stream(self, events: Iterator[GenerationEvent]) -> Iterator[GenerationEvent]:
        """The GPU's events; when the stream breaks for the tier's reasons, the rest on the CPU copy."""
        ids: list[int] = []
        text: list[str] = []
        try:
            for event in events:
                ids.extend(event.token_ids)
                text.append(event.text)
                yield event
                if event.final:
                    return
            return  # ended without a final event: cancelled
        except errors.InvalidRequestError:
            raise
        except TIER_FAILURES as exc:
            left = self.deadline.remaining()
            if left is not None and left <= MIN_CALL_S:
                raise errors.BackendTimeoutError(
                    f"model {self.model.name!r} v{self.model.version}: the generation ran past the request's time "
                    "limit; ask for fewer tokens (max_tokens)") from exc
            self.d.gpu_failed(self.model, exc)
            failure = exc
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()
        yield from self._continue(ids, "".join(text), failure)

    def _continue(self, sent_ids: list[int], sent_text: str, failure: errors.TierserveError
                  ) -> Iterator[GenerationEvent]:
        """The failover in the middle of a stream: the same generation on the CPU copy, from the ids sent."""
        from tierserve import telemetry
        from tierserve.generation.events import FINISH_LENGTH, FINISH_STOP, GenerationEvent, Usage
        from tierserve.observability import logger

        model, request = self.model, self.request
        n = len(sent_ids)
        prompt = tuple(request.prompt_ids or ())
        max_tokens = int(request.params.max_tokens or 0)
        self.failover = {"from": Tier.GPU.value, "to": Tier.CPU.value, "after_tokens": n}
        logger.warning("generation failover mid-stream", extra={
            "event": "failover_mid_stream", "model": model.name, "version": model.version, "after_tokens": n,
            "reason": failure.message})
        telemetry.failover_mid_stream(model.name, model.version, Tier.GPU.value, Tier.CPU.value, n)
        if self.d.cpu is None or not model.serves_cpu:
            raise errors.BackendUnavailableError(
                f"the GPU tier failed after {n} tokens ({failure.message}) and model {model.name!r} "
                f"v{model.version} has no CPU copy to continue it; retry the request", retry_after_s=5) from failure
        eos = frozenset(model.generation.eos_token_ids) if model.generation is not None else frozenset()
        tok = None
        try:
            tok = self.tokenizer()
        except errors.TierserveError:
            tok = None
        follow = ContinuedText(tok, sent_ids, sent_text, request.params.stop, eos)
        record = dict(self.failover)
        remaining = max_tokens - n
        if remaining <= 0:  # every token was sent; only the end was lost
            delta, _ = follow.finish()
            yield GenerationEvent(delta, (), finish_reason=FINISH_LENGTH, usage=Usage(len(prompt), n),
                                  served_by=Tier.CPU.value, extra={"failover": record})
            return
        cont = replace(request.with_ids(prompt + tuple(sent_ids)),
                       params=replace(request.params, max_tokens=remaining))
        try:
            events = self._cpu_events(cont)
        except errors.TierserveError as exc:
            raise self._lost(n, failure, exc) from exc
        produced = 0
        try:
            while True:
                try:
                    event = next(events)
                except StopIteration:
                    return  # cancelled
                except errors.TierserveError as exc:
                    if produced:
                        raise
                    raise self._lost(n, failure, exc) from exc
                produced += len(event.token_ids)
                delta, stopped = follow.feed(event.token_ids, event.text, final=event.final)
                if not (event.final or stopped):
                    yield replace(event, text=delta, served_by=Tier.CPU.value, extra=dict(event.extra))
                    continue
                finish = FINISH_STOP if stopped else (event.finish_reason or FINISH_LENGTH)
                yield GenerationEvent(delta, event.token_ids, finish_reason=finish,
                                      usage=Usage(len(prompt), n + produced), served_by=Tier.CPU.value,
                                      tokens_per_s=event.tokens_per_s, extra={**event.extra, "failover": record})
                return
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()

    def _lost(self, n: int, failure: errors.TierserveError, exc: errors.TierserveError) -> errors.TierserveError:
        return errors.BackendUnavailableError(
            f"the GPU tier failed after {n} tokens ({failure.message}) and the CPU tier could not continue the "
            f"generation ({exc.message}); the answer is incomplete: retry the request",
            retry_after_s=getattr(exc, "retry_after_s", None) or 5)


class ContinuedText:
    """The text of a continuation that must join what a client already has, decoded from the combined ids.

    ``sent_ids`` / ``sent_text``: the completion's ids and the text the client got for them (the GPU's deltas).
    :meth:`feed` takes the continuation's next ids and returns the text they add, from the tokenizer's decode of
    every completion id so far (so the detokenizer's state accounts for the ids already sent: a multi-byte
    character split across the failover is whole, a SentencePiece space at the boundary is right), held back
    while it ends in an incomplete character; and whether a stop string appeared (also one that started in the
    text already sent). Without a tokenizer the continuation's own text is used as it comes."""

    def __init__(self, tokenizer: Any, sent_ids: Sequence[int], sent_text: str, stop: Sequence[str],
                 eos: frozenset[int]) -> None:
        from tierserve.generation.engine import StopMatcher

        self.tok = tokenizer
        self.eos = eos
        self.ids = [int(t) for t in sent_ids if int(t) not in eos]
        self.emitted = sent_text
        self.matcher = StopMatcher(stop)
        longest = max((len(s) for s in self.matcher.stop), default=1)
        tail = sent_text[len(sent_text) - (longest - 1):] if longest > 1 else ""
        self.matcher.pending = tail  # a stop string may have started in the text already sent
        self.skip = len(tail)

    def _decoded(self) -> str:
        return str(self.tok.decode(self.ids, skip_special_tokens=True))

    def _delta(self, text: str, final: bool) -> str:
        if self.tok is None:
            return text
        full = self._decoded()
        if not final and full.endswith("\ufffd"):
            return ""
        if len(full) <= len(self.emitted):
            return ""
        delta = full[len(self.emitted):]  # (a decoder that disagrees with the GPU's text: best effort, no repeat)
        self.emitted = full
        return delta

    def feed(self, ids: Sequence[int], text: str, final: bool = False) -> tuple[str, bool]:
        self.ids.extend(int(t) for t in ids if int(t) not in self.eos)
        delta = self._delta(text, final)
        out, stopped = self.matcher.finish(delta) if final else self.matcher.feed(delta)
        return self._unskip(out), stopped

    def finish(self) -> tuple[str, bool]:
        out, stopped = self.matcher.finish(self._delta("", True))
        return self._unskip(out), stopped

    def _unskip(self, out: str) -> str:
        """Drop the already-sent tail the stop matcher was seeded with."""
        if self.skip:
            cut = min(self.skip, len(out))
            out, self.skip = out[cut:], self.skip - cut
        return out


def _bounded(events: Iterator[GenerationEvent], deadline: Deadline, cancelled: Callable[[], bool],
             model: ModelVersion) -> Generator[GenerationEvent, None, None]:
    """``events`` until the last one, the client gone (``cancelled()``: the source is closed, the stream ends)
    or the deadline passed (``BackendTimeoutError`` mid-stream, the source closed)."""
    try:
        for event in events:
            yield event
            if event.final or cancelled():
                return
            left = deadline.remaining()
            if left is not None and left <= 0:
                raise errors.BackendTimeoutError(
                    f"model {model.name!r} v{model.version}: the generation ran past the request's time limit; "
                    "ask for fewer tokens (max_tokens), or stream it on the streaming API")
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()


def score_arrays(dispatcher: Any, model: ModelVersion, arrays: dict[str, Any],
                 deadline: Deadline | None = None) -> dict[str, Any]:
    """``score`` for any dispatcher (the cloud's, the edge's): the arrays as a binary-output request
    through ``dispatcher.dispatch``, every output back as a numpy array."""
    from tierserve.protocol.tensors import tensor_from_numpy

    request = InferRequest(inputs=[tensor_from_numpy(k, v) for k, v in arrays.items()],
                           outputs=[RequestedOutput(o.name, binary_data=True) for o in model.outputs])
    reply: Reply = dispatcher.dispatch(model, InferenceCall.from_request(request), deadline=deadline).reply
    return reply.arrays()
