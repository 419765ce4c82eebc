"""Triton's generate extension (``POST /v2/models/{m}[/versions/{v}]/generate`` and ``/generate_stream``),
with the inputs and outputs of Triton's vLLM backend.

Why: Triton's own examples and the LLM benchmark tools that speak Triton (genai-perf, perf_analyzer's LLM
mode) send this shape, so a generative model on tierserve answers it as Triton with vLLM would. A request is
one JSON object whose keys are the model's inputs, by the vLLM backend's names, plus ``parameters``::

    {"text_input": "What is Triton?", "parameters": {"temperature": 0, "max_tokens": 64},
     "stream": false, "exclude_input_in_output": true}

- ``text_input`` (required), ``stream`` and ``exclude_input_in_output`` may be top-level inputs or
  parameters; ``sampling_parameters`` (the vLLM backend's BYTES input: a JSON object as a string) and
  ``parameters`` both carry vLLM's sampling parameters: ``max_tokens``, ``temperature``, ``top_p``,
  ``top_k`` (-1: off), ``seed``, ``stop``, ``n`` (1). ``return_finish_reason``, ``return_num_input_tokens``
  and ``return_num_output_tokens`` ask for the vLLM backend's extra outputs. Anything else is a 400 naming it.
- As in the vLLM backend, a non-streamed answer starts with the prompt unless ``exclude_input_in_output``
  is true; a streamed one never does.
- The answer is ``{"model_name", "model_version", "text_output"}`` (plus the extra outputs asked for);
  ``/generate_stream`` sends one such object per SSE ``data:`` event, each with the new text, and an error
  during the stream as ``data: {"error": "..."}`` (Triton's shape). The tier that served it is the
  ``x-served-by`` header.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from tierserve import errors
from tierserve.generation.events import GenerationEvent
from tierserve.generation.openai import sampling, sse
from tierserve.generation.requests import KIND_TRITON, GenerationRequest

_FLAGS = ("stream", "exclude_input_in_output", "return_finish_reason", "return_num_input_tokens",
          "return_num_output_tokens")
_SAMPLING = {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "ignore_eos"}  # as vLLM's backend
#: Top-level keys besides the inputs (``id`` is Triton's request id).
_TOP = {"text_input", "parameters", "sampling_parameters", "id", *_FLAGS}


def _bad(message: str, param: str | None, code: str = "invalid_value") -> errors.InvalidParameterError:
    return errors.InvalidParameterError(message, param=param, code=code)


def _flag(value: Any, key: str) -> bool:
    if isinstance(value, list) and len(value) == 1:  # a [1]-shaped BOOL input written as a list
        value = value[0]
    if not isinstance(value, bool):
        raise _bad(f"{key} must be true or false, got {json.dumps(value)}", key, "invalid_type")
    return value


def parse(body: Any, name: str, version: str | None, stream: bool, request_id: str = "") -> GenerationRequest:
    """A generate request body -> a GenerationRequest; ``stream`` is what the route says (generate_stream)."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object with text_input", None, "invalid_type")
    unknown = sorted(set(body) - _TOP)
    if unknown:
        raise _bad(f"{unknown[0]} is not an input of this model (inputs: text_input, stream, sampling_parameters, "
                   "exclude_input_in_output; decoding options go in parameters)", unknown[0], "unknown_parameter")
    text = body.get("text_input")
    if isinstance(text, list) and len(text) == 1:
        text = text[0]
    if not isinstance(text, str):
        raise _bad("text_input is required: the prompt, a string", "text_input",
                   "missing_required_parameter" if text is None else "invalid_type")
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad("parameters must be an object", "parameters", "invalid_type")
    merged: dict[str, Any] = {}
    raw = body.get("sampling_parameters")
    if isinstance(raw, list) and len(raw) == 1:
        raw = raw[0]
    if raw is not None:
        try:
            extra = json.loads(raw) if isinstance(raw, str) else None
        except ValueError:
            extra = None
        if not isinstance(extra, dict):
            raise _bad("sampling_parameters must be a JSON object written as a string", "sampling_parameters",
                       "invalid_type")
        merged.update(extra)
    merged.update(params)
    flags = {k: False for k in _FLAGS}
    hint = None
    for key, value in list(merged.items()):
        if key in _FLAGS:
            flags[key] = _flag(value, f"parameters.{key}")
            del merged[key]
        elif key == "target":
            hint = str(value)
            del merged[key]
        elif key not in _SAMPLING and value is not None:
            raise _bad(f"parameters.{key} is not supported (supported: {', '.join(sorted(_SAMPLING))})",
                       f"parameters.{key}", "unsupported_parameter")
    for key in _FLAGS:
        if body.get(key) is not None:
            flags[key] = _flag(body[key], key)
    try:
        sp = sampling(merged, ("max_tokens",))
    except errors.InvalidParameterError as exc:
        exc.param = f"parameters.{exc.param}" if exc.param else exc.param
        raise
    stream = stream or flags["stream"]
    return GenerationRequest(model=name, version=version, kind=KIND_TRITON, params=sp, prompt=text, stream=stream,
                             request_id=request_id or str(body.get("id") or ""),
                             echo_prompt=not flags["exclude_input_in_output"] and not stream, hint=hint,
                             extras=tuple(k for k in _FLAGS[2:] if flags[k]))


def _extras(request: GenerationRequest, event: GenerationEvent | None, out: dict[str, Any]) -> dict[str, Any]:
    if event is None or not event.final:
        return out
    if "return_finish_reason" in request.extras:
        out["finish_reason"] = event.finish_reason
    if event.usage is not None:
        if "return_num_input_tokens" in request.extras:
            out["num_input_tokens"] = event.usage.prompt_tokens
        if "return_num_output_tokens" in request.extras:
            out["num_output_tokens"] = event.usage.completion_tokens
    return out


def answer(request: GenerationRequest, model_version: str, events: Iterable[GenerationEvent]) -> dict[str, Any]:
    """The ``/generate`` answer: all the text (after the prompt, unless excluded)."""
    text: list[str] = [request.prompt or ""] if request.echo_prompt else []
    final: GenerationEvent | None = None
    for event in events:
        text.append(event.text)
        if event.final:
            final = event
    if final is None:
        raise errors.InferenceError("the generation ended without a finish reason (was it cancelled?)")
    return _extras(request, final, {"model_name": request.model, "model_version": model_version,
                                    "text_output": "".join(text)})


def stream(request: GenerationRequest, model_version: str, events: Iterable[GenerationEvent]) -> Iterator[bytes]:
    """The ``/generate_stream`` SSE bytes: one event per piece of new text (and the last, with the extras)."""
    it = iter(events)
    try:
        for event in it:
            if event.text or event.final:
                yield sse(_extras(request, event, {"model_name": request.model, "model_version": model_version,
                                                   "text_output": event.text}))
    except Exception as exc:
        from tierserve.protocol.rendering import render_error

        yield sse({"error": render_error(exc).message})
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
