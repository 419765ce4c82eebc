"""The Open Inference Protocol's operations, once, for every transport.

Why: the router's HTTP API, the CPU function's Invoke, the edge's HTTP server and the edge's gRPC
server each carried their own copy of health, metadata, config, statistics and the repository index,
and the copies drifted (the edge's gRPC listed retired versions; the HTTP API did not). Here each
operation exists once, as KServe's ``protocol/dataplane.py`` does it: it takes a request that is
already parsed (names, versions, options, a body), never HTTP, returns an :class:`Answer` (a document
plus the headers the transport carries, ``x-served-by`` among them), and raises the project's errors
(``tierserve.errors``). Each transport is an adapter: it parses its own wire format, calls one method
here, and renders the answer or the error (``tierserve.protocol.http_api.error_response`` for the OIP routes, the
gRPC status for the edge's gRPC). What streams (generation, next) returns an iterator of events.

Readiness is one predicate (:meth:`DataPlane.model_problem`) for HTTP's ``/ready`` and gRPC's
``ModelReady``; the repository index uses it too where a dispatcher can answer it cheaply (the edge).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tierserve import errors, inference
from tierserve.manifest import ModelVersion
from tierserve.tiers import Tier

if TYPE_CHECKING:
    from tierserve.app import Runtime
    from tierserve.generation.events import GenerationEvent
    from tierserve.generation.requests import GenerationRequest
    from tierserve.protocol.calls import Body

SERVER_NAME = "tierserve"
SERVER_VERSION = "0.1.0"
#: The protocol extensions listed, by Triton's names and in its order (docs/protocol/extension_*.md): the
#: repository index (load and unload are not served: the store is the repository, as in Triton's polling
#: modes, which also list model_repository), model config and binary tensors. Shared memory, classification
#: and sequences are refused, so they are not listed. Statistics are served (``/v2/models[/NAME]/stats``) but
#: not listed: a listed "statistics" promises the aggregate of all activity since the server started, while
#: these are one execution environment's counters (one of the API's many Lambda environments, or router
#: workers under ``tierserve serve``), so two reads can go backwards; perf_analyzer polls them around every
#: window when the extension is listed and then stops with "failed to find the requested model version".
EXTENSIONS = ["model_repository", "model_configuration", "binary_tensor_data"]
#: What model metadata reports as the platform: every variant is an ONNX model run by onnxruntime.
PLATFORM = "onnxruntime_onnx"


@dataclass(frozen=True)
class Answer:
    """An operation's result: the protocol document and the headers (metadata) that go with it."""

    document: Any
    headers: dict[str, str] = field(default_factory=dict)


def model_metadata(model: ModelVersion, versions: list[str]) -> dict[str, Any]:
    """KServe v2 model metadata."""
    return {
        "name": model.name,
        "versions": [str(v) for v in versions],
        "platform": PLATFORM,
        "inputs": [s.to_json() for s in model.inputs],
        "outputs": [s.to_json() for s in model.outputs],
    }


class DataPlane:
    """The operations on one runtime. ``answered_by`` is the tier named in ``x-served-by`` for what this
    process answers itself (``cpu`` in the cloud, ``edge`` on a device)."""

    def __init__(self, runtime: Runtime, answered_by: str = Tier.CPU) -> None:
        self.rt = runtime
        self.answered_by = answered_by

    def _answer(self, document: Any, served_by: str | None = None) -> Answer:
        return Answer(document, {"x-served-by": served_by or self.answered_by})

    # --- health -----------------------------------------------------------------------------------------

    def live(self) -> Answer:
        return self._answer({"live": True})

    def ready(self) -> Answer:
        self.rt.store.manifest()  # ready means: the manifest is readable (raises what it cannot)
        return self._answer({"ready": True})

    def model(self, name: str, version: str | None) -> ModelVersion:
        """The named model version (or the default): 404 for an unknown model, a retired or unknown version."""
        name, version = inference.resolve_name(self.rt, name, version or None)
        return self.rt.store.manifest().resolve(name, version)

    def model_problem(self, model: ModelVersion) -> errors.TierserveError | None:
        """Why ``model`` is not ready (it must load and run on some tier, cached), or None: THE readiness."""
        from tierserve.tiering import readiness_of

        return readiness_of(self.rt.dispatcher, model)

    def _model_tier(self, model: ModelVersion) -> str:
        return self.answered_by if self.answered_by == Tier.EDGE else (Tier.CPU if model.serves_cpu else Tier.GPU)

    def model_ready(self, name: str, version: str | None) -> Answer:
        """200 when the model loads and runs; otherwise a 503 that keeps the tier's own reason as its code."""
        mv = self.model(name, version)
        problem = self.model_problem(mv)
        if problem is not None:
            exc = errors.BackendUnavailableError(f"model {mv.name!r} v{mv.version} is not ready: {problem.message}",
                                                 retry_after_s=getattr(problem, "retry_after_s", None) or 5)
            exc.code = problem.code  # integrity_error, unsafe_model, ... survive
            exc.served_by = self._model_tier(mv)
            raise exc
        return self._answer({"name": mv.name, "version": mv.version, "ready": True}, self._model_tier(mv))

    # --- metadata -----------------------------------------------------------------------------------------

    def server_metadata(self) -> Answer:
        return self._answer({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(EXTENSIONS)})

    def listed_versions(self, name: str) -> list[str]:
        """The versions a client may name: retired ones are not listed, on any transport."""
        return sorted(self.rt.store.manifest().models[name].listed(), key=int)

    def model_metadata(self, name: str, version: str | None) -> Answer:
        mv = self.model(name, version)
        return self._answer(model_metadata(mv, self.listed_versions(mv.name)))

    def model_config(self, name: str, version: str | None) -> Answer:
        from tierserve.protocol.model_config import model_config

        return self._answer(model_config(self.model(name, version)))

    def statistics(self, name: str | None = None, version: str | None = None) -> Answer:
        """Triton's statistics for one model (a version, or every listed one), or for every model."""
        models = self.rt.store.manifest().models
        if name:
            mv = self.model(name, version)
            versions = [mv.version] if version else self.listed_versions(mv.name)
            pairs = [(mv.name, v) for v in versions]
        else:
            pairs = [(n, v) for n in sorted(models) for v in self.listed_versions(n)]
        return self._answer(self.rt.stats.to_triton(pairs))

    def repository_index(self, ready_only: bool = False) -> Answer:
        """Every listed model version with its state (``model_config.repository_index``). In the cloud the
        state is what the manifest and the configuration say (it probes nothing); a dispatcher that answers
        readiness cheaply (the edge's ``index_readiness``) decides it with ``/ready``'s own predicate."""
        from tierserve.protocol.model_config import repository_index

        dispatcher = self.rt.dispatcher
        return self._answer(repository_index(self.rt.store.manifest(), getattr(dispatcher, "gpu", None) is not None,
                                             ready_only, getattr(dispatcher, "index_readiness", None)))

    # --- inference ------------------------------------------------------------------------------------------

    def infer(self, name: str, version: str | None, body: Body, hint: str | None, context: Any) -> dict[str, Any]:
        """One inference: the encoded reply (status, headers, body) as the client asked for it."""
        return inference.infer(self.rt, name, version, body, hint, context)

    # --- generation (issue 17) ------------------------------------------------------------------------------

    def generate(self, request: GenerationRequest, cancelled: Callable[[], bool] = lambda: False,
                 context: Any = None) -> Generation:
        """One generation, as a stream of events (:class:`Generation`: the resolved model version and the
        prepared request ride along for the renderers).

        The model is resolved (404 ``model_not_found``; the canary split by request id, as for inference) and
        must be a text-generation model (400 otherwise); the request is prepared (chat template, tokens,
        ``max_tokens``; 400s before any work); then the dispatcher's generation backend runs it when it has
        one (``dispatcher.generate(model, request, deadline, cancelled)``: the router's CPU function over a
        streamed Invoke, the GPU tier), else this process does (``generation.service.generate_local``). The
        stream is started before this returns, so whatever fails before the first event (admission's 429, a
        load failure, the remote tier's refusal) is raised here and the adapter answers it with a status; what
        fails later is raised by the iteration, and the adapter ends its stream with an error event."""
        from tierserve import admission, telemetry, usage
        from tierserve.generation import service
        from tierserve.protocol.rendering import status_for
        from tierserve.tiering import Deadline, pick_version

        name, version = inference.resolve_name(self.rt, request.model, request.version)
        model = pick_version(self.rt.store.manifest(), name, version, request.request_id or None)
        if not model.generative:
            raise errors.InvalidRequestError(f"model {model.name!r} is not a text-generation model; use "
                                             f"/v2/models/{model.name}/infer")
        tier = Tier.EDGE if self.answered_by == Tier.EDGE else Tier.CPU
        dispatcher = self.rt.dispatcher
        tiers = getattr(dispatcher, "generate_tiers", None)
        remote = getattr(dispatcher, "generate", None)
        # issue 18: counted as a request of its version (the rollout's error rate), whatever its outcome
        counted = telemetry.CountedGeneration(model.name, model.version, status_for)
        prepared = counted.guard(service.prepare, self.rt, model, request, tier)
        deadline = Deadline.from_context(context)

        def start() -> Iterator[GenerationEvent]:
            if tiers is not None:  # the cloud's dispatcher: routed across the tiers, with failover (issue 18)
                rt = self.rt

                def local(m: ModelVersion, r: GenerationRequest, c: Callable[[], bool]) -> Iterator[GenerationEvent]:
                    return service.generate_local(rt, m, r, c, tier)

                return tiers(model, prepared, deadline, cancelled, local=local,
                             tokenizer=lambda: self.tokenizer(model, tier))
            if remote is not None:
                return remote(model, prepared, deadline, cancelled)
            return service.generate_local(self.rt, model, prepared, cancelled, tier)

        def metered() -> Iterator[GenerationEvent]:
            # issue 18: the caller's token budget (a 429 before any work), its usage recorded when the stream ends
            return usage.run_metered(prepared, model, start)

        if tier == Tier.EDGE:  # one process serving at once: generation.service.Admission counts the device's;
            # a device keeps no usage table (budgets are the cloud's), whatever the process's environment holds
            events = counted.guard(start)
        else:  # issue 17: the model's cap shared by the router fleet (429 before any work; freed when it ends)
            events = counted.guard(admission.run_capped, model, deadline.remaining(), metered)
        return Generation(model, prepared, counted.stream(events))

    def tokenizer(self, model: ModelVersion, tier: str = Tier.CPU) -> Any:
        """The model's ``tokenizers.Tokenizer`` (the one ``prepare`` tokenizes with): what turns a prepared prompt
        back into the GPU tier's text and decodes a continuation after a failover."""
        from tierserve.generation import engine, service

        text_side = getattr(service, "text_side", None)  # the tokenizer files alone, never the weights
        if text_side is not None:
            return text_side(self.rt, model, tier).tokenizer
        return engine.tokenizer(service.folder_of(self.rt, model, tier))

    def models_list(self) -> Answer:
        """OpenAI's ``GET /v1/models``: every listed model (generative or not), ``NAME`` for its default version
        and ``NAME:VERSION`` for each listed version; ``created`` is when the version was published (or
        compiled), in seconds."""
        from tierserve.manifest import parse_time

        data: list[dict[str, Any]] = []
        for name, entry in sorted(self.rt.store.manifest().models.items()):
            listed = entry.listed()
            default = listed.get(entry.default_version)
            ids = [(name, default)] if default is not None else []
            ids += [(f"{name}:{v}", listed[v]) for v in sorted(listed, key=int)]
            for ident, mv in ids:
                created = parse_time(mv.published_at or mv.created_at)
                data.append({"id": ident, "object": "model", "created": int(created or 0), "owned_by": SERVER_NAME})
        return self._answer({"object": "list", "data": data})


class Generation:
    """A started generation: iterate it for its events. ``model`` is the version serving it, ``request`` the
    prepared request (prompt ids, resolved ``max_tokens``), ``served_by`` the tier of the first event, then of the
    last one read (after a failover in the middle of the stream, the tier that finished); ``fallback`` the
    ``x-fallback`` value when the tier the policy chose could not start it; :attr:`headers` what the transport
    sends with it; :meth:`close` stops it (the client went away)."""

    def __init__(self, model: ModelVersion, request: GenerationRequest, events: Iterator[GenerationEvent]) -> None:
        self.model = model
        self.request = request
        self._source = events
        self.served_by = ""
        self.fallback: str | None = None
        try:
            first = next(events)
        except StopIteration:
            self._events: Iterator[GenerationEvent] = iter(())
        except BaseException:
            self.close()
            raise
        else:
            self._events = itertools.chain((first,), events)
            self.served_by = first.served_by
        self.fallback = getattr(events, "fallback", None)

    @property
    def headers(self) -> dict[str, str]:
        """``x-served-by`` (and ``x-fallback`` when the chosen tier could not start it)."""
        out = {"x-served-by": self.served_by or Tier.CPU.value}
        if self.fallback:
            out["x-fallback"] = self.fallback
        return out

    def __iter__(self) -> Iterator[GenerationEvent]:
        return self

    def __next__(self) -> GenerationEvent:
        event = next(self._events)
        if event.served_by:
            self.served_by = event.served_by
        return event

    def close(self) -> None:
        close = getattr(self._source, "close", None)
        if close is not None:
            close()
