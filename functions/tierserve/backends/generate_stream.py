"""A generation on the GPU tier: Triton's ``generate_stream`` with the vLLM backend's inputs and outputs, read as
``GenerationEvent``s, whichever transport carries it (Triton's HTTP port, SageMaker's response stream).

Why its own module: ``backends/triton.py`` and ``backends/sagemaker.py`` send the same request body and read the
same server-sent events; only the bytes' way differs. Stdlib only (the router's cold start).

The request (:func:`request_body`) is Triton's generate extension with the vLLM backend's names: ``text_input``
(the prompt's text: the vLLM backend has no token-id input, see :func:`prompt_text`), ``stream`` true,
``exclude_input_in_output`` true, and ``sampling_parameters`` as a JSON string (vLLM ``SamplingParams`` fields;
a request parameter cannot carry the ``stop`` list). It asks for two of the vLLM backend's additional outputs:

- ``return_finish_reason``: ``finish_reason`` is ``"None"`` until the last response (``stop`` / ``length``);
  a stream that ends without one was cut (the tier failed), never a silent truncation;
- ``return_logprobs`` with ``logprobs: 0``: each response's ``logprobs`` is a JSON list with one
  ``{token_id: {...}}`` per new token, and with ``logprobs: 0`` vLLM puts only the sampled token in it. That is
  how the router learns the token ids the GPU produced (the vLLM backend sends no ids otherwise), so a stream
  that breaks after N tokens continues on the CPU from those ids, never from re-tokenized text (issue 18).
  vLLM computes a log-softmax per token for it, a small cost against the decode step.

Errors: a non-2xx status before the stream is the transport's to classify (4xx: the input's fault, never the
tier's, except a model Triton does not know or has not loaded; 5xx: the tier's); an ``{"error": ...}`` event
during the stream is the tier's failure (:class:`~tierserve.errors.InferenceError`) unless its message says the
input was at fault.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from tierserve import errors
from tierserve.backends.base import is_input_error
from tierserve.generation.events import FINISH_REASONS, GenerationEvent, Usage
from tierserve.generation.requests import GenerationRequest
from tierserve.tiers import Tier

#: What Triton says when the model is not there to run (a tier failure, even on a 400).
UNAVAILABLE_HINTS = ("unknown model", "is not found", "not ready", "unavailable", "is not loaded", "no model")
#: What Triton's request checks say about a bad request (its 400s), besides onnxruntime's markers.
INPUT_HINTS = ("unexpected", "not allowed", "not implemented by", "must be", "maximum context length",
               "failed to parse", "unable to parse", "invalid", "is not supported")


def prompt_text(tokenizer: Any, prompt_ids: Sequence[int]) -> str:
    """The text whose tokenization as vLLM tokenizes a text prompt (``encode(text, add_special_tokens=True)``)
    gives ``prompt_ids``: the special tokens the tokenizer adds by itself (a BOS) are dropped from the front and
    the rest decoded with special tokens kept (a chat template's markers). Raises
    :class:`~tierserve.errors.InvalidRequestError` when no such text exists (the ids would differ on the GPU)."""
    ids = [int(t) for t in prompt_ids]
    added = list(tokenizer.encode("", add_special_tokens=True).ids)
    body = ids[len(added):] if added and ids[:len(added)] == added else ids
    text = str(tokenizer.decode(body, skip_special_tokens=False))
    if list(tokenizer.encode(text, add_special_tokens=True).ids) != ids:
        raise errors.InvalidRequestError(
            "this prompt's tokens cannot be sent to the GPU tier as text without changing them (the vLLM backend "
            "takes text only); serve it on the CPU tier (x-target: cpu)")
    return text


def request_body(request: GenerationRequest, text_input: str) -> dict[str, Any]:
    """The ``generate_stream`` body for a prepared request (``params.max_tokens`` resolved)."""
    p = request.params
    if p.max_tokens is None:
        raise errors.InferenceError("the request was not prepared: max_tokens is unresolved")
    sampling: dict[str, Any] = {"max_tokens": int(p.max_tokens), "temperature": float(p.temperature),
                                "top_p": float(p.top_p), "top_k": int(p.top_k) if p.top_k > 0 else -1,
                                "logprobs": 0}
    if p.seed is not None:
        sampling["seed"] = int(p.seed)
    if p.stop:
        sampling["stop"] = list(p.stop)
    if p.ignore_eos:  # vLLM's own parameter: the GPU tier goes on past EOS as the CPU tier does
        sampling["ignore_eos"] = True
    return {"text_input": text_input, "stream": True, "exclude_input_in_output": True,
            "return_finish_reason": True, "return_logprobs": True, "sampling_parameters": json.dumps(sampling)}


def sse_data(chunks: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """The JSON object of each server-sent event's ``data:`` lines, from chunks split anywhere (an event may span
    chunks, a chunk may hold several events, a multi-byte character may be cut between two chunks)."""
    buf = b""
    for chunk in chunks:
        buf += chunk
        while True:
            cut = _event_end(buf)
            if cut is None:
                break
            end, sep = cut
            event, buf = buf[:end], buf[end + sep:]
            obj = _event(event)
            if obj is not None:
                yield obj
    if buf.strip():
        raise errors.BackendUnavailableError(f"the GPU tier's stream ended inside an event ({buf[:200]!r}): the "
                                             "connection was cut")


def _event_end(buf: bytes) -> tuple[int, int] | None:
    found = [(i, len(s)) for s in (b"\n\n", b"\r\n\r\n") if (i := buf.find(s)) >= 0]
    return min(found) if found else None


def _event(raw: bytes) -> dict[str, Any] | None:
    data = [line[5:].lstrip(b" ") for line in raw.replace(b"\r\n", b"\n").split(b"\n") if line.startswith(b"data:")]
    if not data:
        return None  # a comment or a keep-alive
    try:
        obj = json.loads(b"\n".join(data))
    except ValueError as exc:
        raise errors.InferenceError(f"the GPU tier streamed an event that is not JSON ({exc}): {raw[:200]!r}") from exc
    if not isinstance(obj, dict):
        raise errors.InferenceError(f"the GPU tier streamed {type(obj).__name__}, not a JSON object: {raw[:200]!r}")
    return obj


def error_for_status(status: int, message: str, what: str) -> errors.TierserveError:
    """A non-2xx answer to ``generate_stream`` (before any event) as the project's error."""
    low = message.lower()
    if status in (408, 504) or "timeout" in low or "timed out" in low:
        return errors.BackendTimeoutError(f"the GPU tier did not answer {what} in time: {message}")
    if status in (404, 502, 503) or any(h in low for h in UNAVAILABLE_HINTS):
        return errors.BackendUnavailableError(f"the GPU tier cannot serve {what}: {message}")
    if 400 <= status < 500:
        return errors.InvalidRequestError(f"the GPU tier rejected {what}: {message}")
    return errors.InferenceError(f"the GPU tier failed to run {what} ({status}): {message}")


def error_message(body: bytes) -> str:
    """Triton's error text from a body: ``{"error": ...}``, possibly as an SSE event; else the body's text."""
    text = body.decode("utf-8", "replace").strip()
    candidate = text[5:].strip() if text.startswith("data:") else text
    try:
        obj = json.loads(candidate)
    except ValueError:
        return text[:500]
    if isinstance(obj, dict) and isinstance(obj.get("error"), str):
        return obj["error"]
    return text[:500]


def token_ids(obj: dict[str, Any]) -> tuple[int, ...]:
    """The ids of the tokens a response carries, from the vLLM backend's ``logprobs`` output (``logprobs: 0``:
    one single-key object per token)."""
    raw = obj.get("logprobs")
    if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], str):
        raw = raw[0]
    if raw in (None, "null"):
        return ()
    try:
        steps = json.loads(raw) if isinstance(raw, str) else raw
        ids = []
        for step in steps:
            if not isinstance(step, dict) or len(step) != 1:
                raise ValueError(f"expected one token per step (logprobs: 0), got {step!r}")
            ids.append(int(next(iter(step))))
    except (TypeError, ValueError) as exc:
        raise errors.InferenceError(f"the GPU tier's logprobs output is unreadable ({exc})") from exc
    return tuple(ids)


def _scalar(value: Any) -> Any:
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def events(objects: Iterable[dict[str, Any]], request: GenerationRequest, what: str, started: float,
           deadline_at: float | None = None, cancelled: Callable[[], bool] = lambda: False,
           served_by: str = Tier.GPU.value) -> Iterator[GenerationEvent]:
    """``GenerationEvent``s from the decoded ``generate_stream`` events: text, ids, the finish reason and usage
    (prompt: the request's ids; completion: the ids streamed) on the last. ``started`` (``time.perf_counter()``
    when the request was sent) gives the time to first token. A stream that ends without a finish reason, an
    error event, the deadline passed between events: the project's errors. ``cancelled()`` ends it quietly."""
    prompt_tokens = len(request.prompt_ids or ())
    produced = 0
    first_at: float | None = None
    for obj in objects:
        if "error" in obj:
            message = str(obj.get("error"))
            if is_input_error(message) or any(h in message.lower() for h in INPUT_HINTS):
                raise errors.InvalidRequestError(f"the GPU tier rejected {what}: {message}")
            raise errors.InferenceError(f"the GPU tier failed mid-stream for {what}: {message}")
        now = time.perf_counter()
        ids = token_ids(obj)
        produced += len(ids)
        text = _scalar(obj.get("text_output", ""))
        finish = _scalar(obj.get("finish_reason"))
        finish = finish if finish in FINISH_REASONS else None
        ttft = None
        if first_at is None:
            first_at = now
            ttft = (now - started) * 1000
        if finish is None:
            yield GenerationEvent(str(text or ""), ids, served_by=served_by, ttft_ms=ttft)
        else:
            decode_s = now - first_at
            tps = (produced - 1) / decode_s if produced > 1 and decode_s > 0 else None
            yield GenerationEvent(str(text or ""), ids, finish_reason=finish, usage=Usage(prompt_tokens, produced),
                                  served_by=served_by, ttft_ms=ttft, tokens_per_s=tps)
            return
        if cancelled():
            return
        if deadline_at is not None and time.monotonic() > deadline_at:
            raise errors.BackendTimeoutError(f"the GPU tier did not finish {what} within the request's deadline")
    raise errors.BackendUnavailableError(f"the GPU tier's stream for {what} ended before its last token "
                                         f"({produced} tokens streamed): the connection was cut")
