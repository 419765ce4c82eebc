"""Serving one generation in process: prepare the request, admit it, run the engine, count it.

Why its own module: the same steps hold on every tier that runs a model itself (the CPU function, the edge,
``tierserve serve`` when its CPU tier is in process), and the router needs the first one without the engine:

- :func:`prepare` renders the chat template (``generation.chat``), tokenizes, resolves ``max_tokens`` (the
  manifest's ``default_max_tokens`` when the request names none, never more than the context left;
  ``max_tokens_cap`` bounds what a request may ask for, because in AWS nothing tells a function that its
  client went away), and refuses a prompt plus ``max_tokens`` over the context window with OpenAI's 400
  ``context_length_exceeded``, all before any model runs. It reads the variant's tokenizer and chat template
  files only (:data:`PREPARE_FILES`, through ``ModelStore.fetch_files``: each sha256-verified), never its
  weights: the router prepares every request, and the weights it never runs would cost its ``/tmp`` hundreds of
  MB to GBs and its cold start seconds. The tokenizer (``tokenizers``) and the template are loaded once per
  variant digest (:func:`text_side`), on the first generative request, and forgotten when the store evicts it.
- :class:`Admission` caps concurrent generations per model version in this execution environment
  (``GenerationSpec.max_concurrency``, or the ``GENERATION_MAX_CONCURRENCY`` setting): a streamed CPU
  generation holds two Lambda environments for its whole length, and a new account has 10. One more is a 429
  with ``Retry-After``, in OpenAI's shape, before any work.
- :func:`generate_local` holds the admission slot for the whole stream (released when the stream ends, fails
  or is closed), runs :mod:`generation.engine`, and emits the generation's EMF metrics (time to first token,
  inter-token latency, prompt and completion tokens, tokens/s) after its last event: a stream outlives the
  handler that returned it, so metrics flushed at the handler's return would miss it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tierserve import errors, telemetry
from tierserve.generation.events import GenerationEvent
from tierserve.generation.metering import MeteredStream
from tierserve.generation.requests import KIND_CHAT, GenerationRequest
from tierserve.manifest import GenerationSpec, ModelVersion, Variant

if TYPE_CHECKING:
    from tierserve.app import Runtime
    from tierserve.generation.chat import ChatTemplate

#: The files :func:`prepare` reads from a variant (those it lists): the tokenizer, the chat template and the named
#: special tokens the template sees (``generation.chat``); never ``model.onnx`` or its weights.
PREPARE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

#: Seconds a client is told to wait when a model is at its cap (a short generation frees a slot in about this).
RETRY_AFTER_S = 1.0


def spec_of(model: ModelVersion) -> GenerationSpec:
    if model.generation is None:
        raise errors.InvalidRequestError(f"model {model.name!r} is not a text-generation model; use "
                                         f"/v2/models/{model.name}/infer")
    return model.generation


def variant_for(model: ModelVersion, tier: str) -> Variant:
    """The variant this tier runs: the edge's at the edge, else the CPU tier's."""
    return model.edge_artifact if tier == "edge" else model.cpu_artifact


def folder_of(runtime: Runtime, model: ModelVersion, tier: str = "cpu") -> Path:
    """The verified local folder of the model's onnxruntime-genai files (fetched once, then cached)."""
    _hook_eviction(runtime)
    return runtime.store.fetch(variant_for(model, tier)).parent


def threads_for(runtime: Runtime) -> int:
    """Threads follow this function's vCPUs (``ORT_THREADS``, else the memory class), as for other models."""
    return int(runtime.settings.intra_op_threads)


_hooked: set[int] = set()


def _hook_eviction(runtime: Runtime) -> None:
    """When the store evicts a model no version serves any more, the engine forgets it too."""
    store = runtime.store
    if id(store) in _hooked or not hasattr(store, "on_evict"):
        return
    from tierserve.generation import engine

    if engine.evict not in store.on_evict:
        store.on_evict.append(engine.evict)
    if forget not in store.on_evict:
        store.on_evict.append(forget)
    _hooked.add(id(store))


# --- the text side: tokenizer and chat template, without the weights ----------------------------------------


@dataclass(frozen=True)
class TextSide:
    """A variant's tokenizer (``tokenizers.Tokenizer``) and chat template (None when it has none)."""

    tokenizer: Any
    template: ChatTemplate | None


_text_lock = threading.Lock()
_texts: dict[str, TextSide] = {}  # Variant.digest -> its text side


def text_side(runtime: Runtime, model: ModelVersion, tier: str = "cpu") -> TextSide:
    """The tokenizer and chat template of the variant ``tier`` runs, loaded once per variant digest from its
    tokenizer files alone (``ModelStore.fetch_files``: verified; the weights are never fetched)."""
    variant = variant_for(model, tier)
    side = _texts.get(variant.digest)
    if side is not None:
        return side
    _hook_eviction(runtime)
    with _text_lock:
        side = _texts.get(variant.digest)
        if side is None:
            side = _load_text_side(runtime, variant)
            _texts[variant.digest] = side
        return side


def _load_text_side(runtime: Runtime, variant: Variant) -> TextSide:
    from tierserve.generation import chat, tokens
    from tierserve.store import files_by_location

    store = runtime.store
    names = [n for n in PREPARE_FILES if n in files_by_location(variant)]
    if tokens.TOKENIZER_FILE not in names:
        raise errors.ArtifactError(f"{variant.path} lists no {tokens.TOKENIZER_FILE}, so its prompts cannot be "
                                   "tokenized; recompile the model (tierserve compile writes the tokenizer files)")
    fetch_files = getattr(store, "fetch_files", None)
    folder = fetch_files(variant, names) if fetch_files is not None else store.fetch(variant).parent
    try:
        tok = tokens.load_tokenizer((folder / tokens.TOKENIZER_FILE).read_bytes())
    except Exception as exc:  # tokenizers raises its own Exception type
        raise errors.ArtifactError(f"cannot read the model's tokenizer {tokens.TOKENIZER_FILE} ({exc}); recompile "
                                   "it") from exc
    return TextSide(tok, chat.ChatTemplate.from_folder(folder))


def forget(digests: set[str]) -> None:
    """Drop the text sides of variants the store evicted (``ModelStore.on_evict``)."""
    with _text_lock:
        for digest in digests:
            _texts.pop(digest, None)


def clear() -> None:
    with _text_lock:
        _texts.clear()


# --- prepare ------------------------------------------------------------------------------------------------


def prepare(runtime: Runtime, model: ModelVersion, request: GenerationRequest, tier: str = "cpu"
            ) -> GenerationRequest:
    """``request`` with ``prompt_ids`` filled and ``params.max_tokens`` resolved; 400s before any model runs."""
    spec = spec_of(model)
    ids = (list(request.prompt_ids) if request.prompt_ids is not None
           else _tokenize(text_side(runtime, model, tier), model, request))
    param = "messages" if request.kind == KIND_CHAT else "prompt"
    if not ids:
        raise errors.InvalidParameterError("the prompt is empty: give the model some text to continue",
                                           param=param)
    if spec.vocab_size and any(not 0 <= t < spec.vocab_size for t in ids):
        raise errors.InvalidParameterError(
            f"prompt token ids must be within [0, {spec.vocab_size}) for model {model.name!r}", param=param)
    max_tokens = resolve_max_tokens(model, spec, len(ids), request.params.max_tokens, param)
    return replace(request, prompt_ids=tuple(ids), params=replace(request.params, max_tokens=max_tokens))


def _tokenize(side: TextSide, model: ModelVersion, request: GenerationRequest) -> list[int]:
    tok = side.tokenizer
    if request.kind == KIND_CHAT or request.messages is not None:
        template = side.template
        if template is None:
            raise errors.InvalidParameterError(
                f"model {model.name!r} has no chat template, so /v1/chat/completions cannot format a conversation "
                "for it; send the text with /v1/completions (prompt) instead, or recompile the model with a "
                "tokenizer that ships a chat template", param="messages", code="model_has_no_chat_template")
        text = template.render(request.messages or ())
        return list(tok.encode(text, add_special_tokens=False).ids)  # the template wrote the special tokens
    if request.prompt is None:
        raise errors.InvalidParameterError("a prompt is required", param="prompt", code="missing_required_parameter")
    return list(tok.encode(request.prompt, add_special_tokens=True).ids)


def resolve_max_tokens(model: ModelVersion, spec: GenerationSpec, prompt_len: int, asked: int | None,
                       param: str) -> int:
    """The completion's length: what was asked (at most ``max_tokens_cap``) or the default, within the context."""
    room = spec.context_length - prompt_len
    if asked is not None:
        if asked > spec.max_tokens_cap:
            raise errors.InvalidParameterError(
                f"max_tokens is {asked}, over this model's cap of {spec.max_tokens_cap} tokens per request; ask "
                f"for at most {spec.max_tokens_cap} (or stream several requests)", param="max_tokens")
        if asked > room:
            raise errors.ContextLengthExceededError(
                f"This model's maximum context length is {spec.context_length} tokens. However, you requested "
                f"{prompt_len + asked} tokens ({prompt_len} in the messages, {asked} in the completion). Please "
                "reduce the length of the messages or completion.", param=param)
        return asked
    if room < 1:
        raise errors.ContextLengthExceededError(
            f"This model's maximum context length is {spec.context_length} tokens. However, your prompt is "
            f"{prompt_len} tokens, which leaves no room for a completion. Please reduce the length of the "
            "messages or prompt.", param=param)
    return min(spec.default_max_tokens, spec.max_tokens_cap, room)


# --- admission ----------------------------------------------------------------------------------------------


class Admission:
    """Generations in flight per model version in this execution environment, each under its cap."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[tuple[str, str], int] = {}

    def cap(self, runtime: Runtime, model: ModelVersion) -> int:
        override = int(getattr(runtime.settings, "generation_max_concurrency", 0) or 0)
        return override if override > 0 else spec_of(model).max_concurrency

    def acquire(self, runtime: Runtime, model: ModelVersion) -> Callable[[], None]:
        """A slot for one generation (call the returned function once to free it); 429 past the cap."""
        key = (model.name, model.version)
        cap = self.cap(runtime, model)
        with self._lock:
            running = self._running.get(key, 0)
            if running >= cap:
                raise errors.TooManyRequestsError(
                    f"model {model.name!r} v{model.version} is generating for {running} requests here, its cap "
                    f"({cap}); retry after the Retry-After seconds", retry_after_s=RETRY_AFTER_S)
            self._running[key] = running + 1
        freed = threading.Event()

        def release() -> None:
            if freed.is_set():
                return
            freed.set()
            with self._lock:
                left = self._running.get(key, 1) - 1
                if left > 0:
                    self._running[key] = left
                else:
                    self._running.pop(key, None)

        return release

    def running(self, model: ModelVersion) -> int:
        with self._lock:
            return self._running.get((model.name, model.version), 0)


#: This execution environment's admission (one per process, like the sessions).
ADMISSION = Admission()


# --- the local path -----------------------------------------------------------------------------------------


def generate_local(runtime: Runtime, model: ModelVersion, request: GenerationRequest,
                   cancelled: Callable[[], bool] = lambda: False, tier: str = "cpu",
                   admission: Admission | None = None) -> Iterator[GenerationEvent]:
    """Run ``request`` here. Admission, the model load and a bad request fail now, as exceptions (nothing
    streamed yet); what fails later ends the returned stream with the exception."""
    from tierserve.generation import engine

    if request.prompt_ids is None or request.params.max_tokens is None:
        request = prepare(runtime, model, request, tier)
    assert request.prompt_ids is not None and request.params.max_tokens is not None
    spec = spec_of(model)
    release = (admission or ADMISSION).acquire(runtime, model)
    try:
        folder = folder_of(runtime, model, tier)
        threads = threads_for(runtime)
        cold = not engine.is_loaded(folder, threads)
        loaded = engine.load(folder, threads)
        if cold:
            telemetry.model_loaded(model.name, model.version, loaded.load_ms)
        events = loaded.generate(request.prompt_ids, request.params, spec.eos_token_ids, request.params.max_tokens,
                                 cancelled, served_by=str(tier))
    except BaseException:
        release()
        raise
    return MeteredStream(events, release, model, str(tier))


