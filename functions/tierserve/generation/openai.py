"""OpenAI's chat completions and completions: parse a request body, render the answer, streamed or not.

Why its own module: every LLM client speaks this protocol (the ``openai`` SDK, LangChain, curl), and it is
strict about shapes, so the parsing and the rendering live in one place that knows no transport. The adapters
(the router's API, the edge, ``tierserve serve``) call :func:`parse_chat` / :func:`parse_completion`, then
``DataPlane.generate``, then :func:`completion_body` (not streamed) or :func:`stream` (SSE).

Parameters: ``model`` (``NAME`` or ``NAME:VERSION``), ``messages`` / ``prompt``, ``max_tokens`` and
``max_completion_tokens`` (absent: the model's ``default_max_tokens``, 256 unless the compiler says otherwise,
never past the context window; at most its ``max_tokens_cap``), ``temperature`` (0: greedy; default 1),
``top_p``, ``top_k`` (vLLM's extension; -1 or 0: off), ``seed``, ``stop`` (a string or up to 16), ``n`` (1
only), ``stream``, ``stream_options.include_usage``, and two more of vLLM's extensions that the field's bench tools
(guidellm, genai-perf) send: ``ignore_eos`` (an EOS id does not end the generation: it goes on to ``max_tokens``,
``finish_reason`` ``length``; EOS tokens count in the usage, and special ones add no text, as in vLLM) and
``stream_options.continuous_usage_stats`` (with ``include_usage``: every chunk carries the usage so far, the
prompt's tokens and the completion's tokens generated up to that chunk). Parameters that change nothing
(``user``, ``metadata``, ``store``, ``service_tier``, ``parallel_tool_calls``) are accepted. Any other parameter
that would change the output (``logprobs``, ``echo``, ``tools``, ``response_format``, ``logit_bias``, penalties,
...) is a 400 naming it unless it is given its neutral value (``logprobs: false``, ``n: 1``,
``presence_penalty: 0``, ...), and an unknown parameter is a 400 too: nothing is silently ignored. A ``null``
value is the parameter left out.

Answers follow the openai-python types (``ChatCompletion``, ``ChatCompletionChunk``, ``Completion``): ids
``chatcmpl-...`` / ``cmpl-...``, ``created`` in seconds, ``finish_reason`` ``stop`` or ``length``; ``usage`` in
every non-streamed answer, and in a stream only with ``stream_options.include_usage`` (then every chunk carries
``"usage": null`` and a last chunk with empty ``choices`` carries it, as OpenAI does). Streams are SSE:
``data: {chunk}\\n\\n`` lines, then ``data: [DONE]\\n\\n``; an error after the first chunk is one more
``data: {"error": {...}}`` event before ``[DONE]``.

**Which tier served it**: ``x_served_by`` (``cpu``, ``gpu``, ``edge``) in a non-streamed body and in a stream's
chunk that carries the ``finish_reason`` (and in the usage chunk), beside the ``x-served-by`` header; the SDK
keeps unknown fields (``completion.model_extra["x_served_by"]``). ``system_fingerprint`` is
``tierserve-<tier>`` on every chunk, since OpenAI defines it as "the backend configuration the model runs with".
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from tierserve import errors
from tierserve.generation.events import GenerationEvent, Usage
from tierserve.generation.requests import KIND_CHAT, KIND_COMPLETION, GenerationRequest, SamplingParams

DONE = b"data: [DONE]\n\n"
MAX_STOP = 16
#: Chat roles a message may have.
ROLES = ("system", "developer", "user", "assistant", "tool")

#: Parameters that change nothing about the output: accepted and not used.
_HARMLESS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier",
             "prompt_cache_key"}
#: Output-changing parameters not supported, with the value(s) that mean "not used" (accepted).
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (False, 0), "top_logprobs": (0,), "echo": (False,), "tools": ([],), "tool_choice": ("none",),
    "functions": ([],), "function_call": ("none",), "response_format": ({"type": "text"},), "logit_bias": ({},),
    "best_of": (1,), "suffix": ("",), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0),
    "audio": (), "modalities": (["text"],), "prediction": (), "reasoning_effort": (), "web_search_options": (),
    "min_p": (0, 0.0), "repetition_penalty": (1, 1.0), "min_tokens": (0,), "guided_json": (), "guided_regex": (),
    "guided_choice": (), "guided_grammar": (), "verbosity": (),
}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream",
           "stream_options", "ignore_eos"}
_CHAT = _COMMON | {"messages", "max_completion_tokens"}
_COMPLETION = _COMMON | {"prompt"}


def _bad(message: str, param: str | None, code: str = "invalid_value") -> errors.InvalidParameterError:
    return errors.InvalidParameterError(message, param=param, code=code)


def split_model(value: Any) -> tuple[str, str | None]:
    """``NAME`` or ``NAME:VERSION`` -> (name, version or None)."""
    if not isinstance(value, str) or not value:
        raise _bad("model is required: NAME or NAME:VERSION (GET /v1/models lists them)", "model",
                   "missing_required_parameter" if value is None else "invalid_type")
    name, sep, version = value.partition(":")
    if sep and not version:
        raise _bad(f"model {value!r}: give NAME or NAME:VERSION", "model")
    return name, (version if sep else None)


def _check_keys(body: dict[str, Any], allowed: set[str], route: str) -> None:
    for key, value in body.items():
        if value is None or key in allowed or key in _HARMLESS:
            continue
        if key in _UNSUPPORTED:
            if any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in _UNSUPPORTED[key]):
                continue  # its neutral value: it changes nothing
            raise _bad(f"{key} is not supported by this server (it would change the output); leave it out",
                       key, "unsupported_parameter")
        raise _bad(f"unrecognized request argument supplied: {key} (not a parameter of {route})", key,
                   "unknown_parameter")


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(f"{key} must be a number, got {json.dumps(value)}", key, "invalid_type")
    if not (lo < value if lo_open else lo <= value) or value > hi:
        raise _bad(f"{key} must be within {'(' if lo_open else '['}{lo:g}, {hi:g}], got {value}", key)
    return float(value)


def _integer(body: dict[str, Any], key: str, lo: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{key} must be an integer, got {json.dumps(value)}", key, "invalid_type")
    if lo is not None and value < lo:
        raise _bad(f"{key} must be at least {lo}, got {value}", key)
    return value


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(f"{key} must be true or false, got {json.dumps(value)}", key, "invalid_type")
    return value


def sampling(body: dict[str, Any], max_tokens_keys: tuple[str, ...]) -> SamplingParams:
    """The decoding parameters of an OpenAI (or vLLM-style) body, validated."""
    asked = [(k, _integer(body, k, lo=1)) for k in max_tokens_keys]
    given = [(k, v) for k, v in asked if v is not None]
    if len({v for _, v in given}) > 1:
        raise _bad(f"{' and '.join(k for k, _ in given)} disagree; give one of them", given[-1][0])
    top_k = _integer(body, "top_k", lo=-1)
    seed = _integer(body, "seed")
    n = _integer(body, "n")
    if n is not None and n != 1:
        raise _bad(f"n must be 1 here (one completion per request), got {n}; send {n} requests (with different "
                   "seeds) instead", "n", "unsupported_value")
    return SamplingParams(max_tokens=given[0][1] if given else None,
                          temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                          top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
                          top_k=0 if top_k is None or top_k <= 0 else top_k, seed=seed, stop=_stop(body.get("stop")),
                          ignore_eos=_flag(body, "ignore_eos"))


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise _bad("stop must be a string or a list of strings", "stop", "invalid_type")
    if len(items) > MAX_STOP:
        raise _bad(f"stop may hold at most {MAX_STOP} sequences, got {len(items)}", "stop")
    if any(not s for s in items):
        raise _bad("stop sequences must not be empty", "stop")
    return tuple(dict.fromkeys(items))


def _streaming(body: dict[str, Any]) -> tuple[bool, bool, bool]:
    """(stream, include_usage, continuous usage): vLLM's ``continuous_usage_stats`` counts only with
    ``include_usage``, as vLLM's server reads it."""
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False, False
    if not stream:
        raise _bad("stream_options is only allowed when stream is true", "stream_options")
    if not isinstance(options, dict):
        raise _bad("stream_options must be an object such as {\"include_usage\": true}", "stream_options",
                   "invalid_type")
    unknown = sorted(set(options) - {"include_usage", "include_obfuscation", "continuous_usage_stats"})
    if unknown:
        raise _bad(f"stream_options.{unknown[0]} is not supported; only include_usage and continuous_usage_stats "
                   "are", f"stream_options.{unknown[0]}", "unsupported_parameter")
    include_usage = _flag(options, "include_usage")
    try:
        continuous = _flag(options, "continuous_usage_stats")
    except errors.InvalidParameterError as exc:
        exc.param = "stream_options.continuous_usage_stats"
        raise
    return stream, include_usage, include_usage and continuous


def _body(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None, "invalid_type")
    return body


def _message(m: Any, i: int) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise _bad(f"{where} must be an object with a role and a content", where, "invalid_type")
    role = m.get("role")
    if role not in ROLES:
        raise _bad(f"{where}.role must be one of {', '.join(ROLES)}, got {json.dumps(role)}", f"{where}.role")
    for key in ("tool_calls", "function_call", "audio"):
        if m.get(key):
            raise _bad(f"{where}.{key} is not supported by this server (no tool calling)", f"{where}.{key}",
                       "unsupported_parameter")
    content = m.get("content")
    if isinstance(content, list):  # content parts: text only, joined as vLLM joins them
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"{where}.content[{j}] must be a text part {{\"type\": \"text\", \"text\": ...}} "
                           "(images and audio are not supported)", f"{where}.content", "unsupported_parameter")
            texts.append(part["text"])
        content = "\n".join(texts)
    elif not isinstance(content, str):
        raise _bad(f"{where}.content must be a string or a list of text parts", f"{where}.content", "invalid_type")
    out = {"role": role, "content": content}
    if isinstance(m.get("name"), str):
        out["name"] = m["name"]
    return out


def parse_chat(body: Any, request_id: str = "") -> GenerationRequest:
    """A ``POST /v1/chat/completions`` body -> a GenerationRequest (400s name the parameter)."""
    body = _body(body)
    _check_keys(body, _CHAT, "/v1/chat/completions")
    name, version = split_model(body.get("model"))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages is required: a non-empty list of {\"role\", \"content\"} objects", "messages",
                   "missing_required_parameter" if messages is None else "invalid_value")
    params = sampling(body, ("max_completion_tokens", "max_tokens"))
    stream, include_usage, continuous = _streaming(body)
    return GenerationRequest(model=name, version=version, kind=KIND_CHAT, params=params,
                             messages=tuple(_message(m, i) for i, m in enumerate(messages)), stream=stream,
                             include_usage=include_usage, continuous_usage=continuous,
                             request_id=request_id or new_id(KIND_CHAT))


def parse_completion(body: Any, request_id: str = "") -> GenerationRequest:
    """A ``POST /v1/completions`` body -> a GenerationRequest: ``prompt`` is a string or a list of token ids
    (one prompt per request)."""
    body = _body(body)
    _check_keys(body, _COMPLETION, "/v1/completions")
    name, version = split_model(body.get("model"))
    prompt = body.get("prompt")
    text: str | None = None
    ids: tuple[int, ...] | None = None
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        text = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = tuple(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise _bad("one prompt per request here; send each prompt as its own request", "prompt",
                   "unsupported_value")
    else:
        raise _bad("prompt is required: a string (or a list of token ids)", "prompt",
                   "missing_required_parameter" if prompt is None else "invalid_type")
    params = sampling(body, ("max_tokens",))
    stream, include_usage, continuous = _streaming(body)
    return GenerationRequest(model=name, version=version, kind=KIND_COMPLETION, params=params, prompt=text,
                             prompt_ids=ids, stream=stream, include_usage=include_usage,
                             continuous_usage=continuous, request_id=request_id or new_id(KIND_COMPLETION))


# --- rendering ----------------------------------------------------------------------------------------------


def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == KIND_CHAT else 'cmpl'}-{uuid.uuid4().hex}"


def model_label(request: GenerationRequest) -> str:
    return f"{request.model}:{request.version}" if request.version else request.model


def _ident(request: GenerationRequest) -> str:
    rid = request.request_id
    prefix = "chatcmpl-" if request.kind == KIND_CHAT else "cmpl-"
    return rid if rid.startswith(prefix) else f"{prefix}{rid or uuid.uuid4().hex}"


def completion_body(request: GenerationRequest, events: Iterable[GenerationEvent], created: int | None = None
                    ) -> dict[str, Any]:
    """The non-streamed answer (``chat.completion`` or ``text_completion``) from all of a generation's events."""
    text: list[str] = []
    final: GenerationEvent | None = None
    served_by = ""
    for event in events:
        text.append(event.text)
        served_by = event.served_by or served_by
        if event.final:
            final = event
    if final is None:
        raise errors.InferenceError("the generation ended without a finish reason (was it cancelled?)")
    content = "".join(text)
    created = int(time.time()) if created is None else created
    usage = (final.usage or Usage(0, 0)).to_json()
    failover = {"x_failover": final.extra["failover"]} if final.extra.get("failover") else {}
    if request.kind == KIND_CHAT:
        return {"id": _ident(request), "object": "chat.completion", "created": created, "model": model_label(request),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": None},
                             "logprobs": None, "finish_reason": final.finish_reason}],
                "usage": usage, "system_fingerprint": fingerprint(served_by), "x_served_by": served_by, **failover}
    return {"id": _ident(request), "object": "text_completion", "created": created, "model": model_label(request),
            "choices": [{"text": content, "index": 0, "logprobs": None, "finish_reason": final.finish_reason}],
            "usage": usage, "system_fingerprint": fingerprint(served_by), "x_served_by": served_by, **failover}


def fingerprint(served_by: str) -> str | None:
    return f"tierserve-{served_by}" if served_by else None


def chunk(request: GenerationRequest, event: GenerationEvent | None, created: int, first: bool = False,
          served_by: str = "", usage: Usage | None = None) -> dict[str, Any]:
    """One streamed chunk for ``event`` (None with ``first``: the chat stream's opening role chunk); ``usage`` is
    the usage so far, which a chunk carries with ``continuous_usage`` (else ``"usage": null`` with
    ``include_usage``)."""
    served_by = (event.served_by if event is not None else "") or served_by
    text = event.text if event is not None else ""
    finish = event.finish_reason if event is not None else None
    if request.kind == KIND_CHAT:
        delta: dict[str, Any] = {"role": "assistant", "content": text} if first else (
            {"content": text} if text or finish is None else {})
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    out: dict[str, Any] = {"id": _ident(request), "object": obj, "created": created, "model": model_label(request),
                           "system_fingerprint": fingerprint(served_by), "choices": [choice]}
    if request.include_usage:
        out["usage"] = usage.to_json() if request.continuous_usage and usage is not None else None
    if finish is not None:
        out["x_served_by"] = served_by  # after a failover: the tier that finished (x_failover says the rest)
        failover = event.extra.get("failover") if event is not None else None
        if failover:
            out["x_failover"] = failover
    return out


def usage_chunk(request: GenerationRequest, usage: Usage, created: int, served_by: str) -> dict[str, Any]:
    """The last chunk of a stream with ``include_usage``: empty ``choices`` and the usage."""
    return {"id": _ident(request), "object": "chat.completion.chunk" if request.kind == KIND_CHAT
            else "text_completion", "created": created, "model": model_label(request),
            "system_fingerprint": fingerprint(served_by), "choices": [], "usage": usage.to_json(),
            "x_served_by": served_by}


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def error_event(exc: BaseException) -> dict[str, Any]:
    """An error after the stream started, in OpenAI's error shape (the status is gone: it was 200)."""
    from tierserve.protocol.rendering import render_error

    return render_error(exc, "openai").document


def stream(request: GenerationRequest, events: Iterable[GenerationEvent], created: int | None = None
           ) -> Iterator[bytes]:
    """The SSE bytes of a streamed answer. Empty deltas (bytes held back) are not sent; an error raised by the
    events after the stream started becomes an error event; the stream always ends with ``[DONE]``."""
    created = int(time.time()) if created is None else created
    served_by = str(getattr(events, "served_by", "") or "")  # a started DataPlane Generation knows its tier
    prepared = getattr(events, "request", None)  # a started DataPlane Generation holds the prepared request
    ids = getattr(prepared, "prompt_ids", None) or request.prompt_ids or ()
    so_far = Usage(len(ids), 0)  # continuous usage: the completion's tokens generated up to each chunk
    it = iter(events)
    if request.kind == KIND_CHAT:
        yield sse(chunk(request, None, created, first=True, served_by=served_by, usage=so_far))
    try:
        for event in it:
            served_by = event.served_by or served_by
            so_far = event.usage or Usage(so_far.prompt_tokens, so_far.completion_tokens + len(event.token_ids))
            if event.final:
                yield sse(chunk(request, event, created, served_by=served_by, usage=so_far))
                if request.include_usage and event.usage is not None:
                    yield sse(usage_chunk(request, event.usage, created, served_by))
            elif event.text:
                yield sse(chunk(request, event, created, served_by=served_by, usage=so_far))
    except Exception as exc:
        yield sse(error_event(exc))
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    yield DONE
