"""The router's side of a streamed CPU-function answer: ``InvokeWithResponseStream``, relayed as it comes.

Why its own module: a generation on the CPU tier is one JSON line per ``GenerationEvent`` streamed by the
CPU function (GENERATION.md), and the router must pass each on as it arrives rather than after the function
ends, as ``lambda_invoke``'s buffered Invoke would. The errors mean what they mean in ``lambda_invoke``: a
throttle (``TooManyRequestsException`` and the other codes of ``THROTTLED_CODES``) is
:class:`~tierserve.errors.TierThrottledError` (nothing ran: the dispatcher may fall back to another tier),
a read timeout is :class:`~tierserve.errors.BackendTimeoutError`, other call failures
:class:`~tierserve.errors.BackendUnavailableError`; a function error (``InvokeComplete`` with an
``ErrorCode``) is :class:`~tierserve.errors.InferenceError` (a timeout code: ``BackendTimeoutError``); a
non-2xx HTTP answer of the function is the tier's own error, status and code kept (``_tier_error``).

The CPU function answers with the HTTP-integration content type (a JSON prelude, 8 NUL bytes, the body):
:func:`invoke_stream` reads the prelude before it returns, so every error above that happens before the
first body byte is raised by the call itself, and the caller can still choose a status or another tier.
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tierserve import errors
from tierserve.backends.lambda_invoke import THROTTLED_CODES

HTTP_INTEGRATION = "application/vnd.awslambda.http-integration-response"
DELIMITER = b"\x00" * 8
#: A prelude longer than this is not one (the function did not write the HTTP-integration format).
MAX_PRELUDE_BYTES = 64 * 1024
#: ``InvokeComplete`` error codes that mean the function ran out of time.
TIMEOUT_CODES = ("Sandbox.Timedout", "Function.Timeout", "TimeoutError")
#: The longest a streamed invocation runs (Lambda's 15-minute function timeout; the REST API's stream limit).
MAX_STREAM_S = 900.0
#: Read timeouts (s) of the streaming clients: the wait for one chunk (the first one includes a cold start and
#: the model's load), picked by the stream's budget; past 300 s the REST API's idle timeout has ended it anyway.
READ_TIMEOUT_BUCKETS_S = (30.0, 60.0, 120.0, 300.0)


class ResponseStream:
    """An iterator over the body's bytes as they arrive, with the prelude's ``status`` and ``headers``.
    Iterating raises the project's error if the function fails mid-stream; :meth:`close` stops reading
    (the function itself runs on: Lambda gives it no signal)."""

    def __init__(self, function_name: str, status: int, headers: dict[str, str], first: bytes,
                 rest: Iterator[bytes], close: Any = None) -> None:
        self.function_name = function_name
        self.status = status
        self.headers = headers
        self._first = first
        self._rest = rest
        self._close = close

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks()

    def _chunks(self) -> Iterator[bytes]:
        try:
            if self._first:
                yield self._first
            yield from self._rest
        finally:
            self.close()

    def close(self) -> None:
        close, self._close = self._close, None
        if callable(close):
            with contextlib.suppress(Exception):  # closing a half-read HTTP stream may fail; nothing to do
                close()


def client_for(backend: Any, timeout_s: float | None) -> Any:
    """A boto3 Lambda client for a stream whose whole budget is ``timeout_s``: the backend's injected client
    (``LambdaInvokeBackend(client=...)``, tests) when it has one, else one per read-timeout bucket."""
    injected = getattr(backend, "_client", None)
    if injected is not None:
        return injected
    from tierserve.backends.base import ClientsByTimeout

    budget = MAX_STREAM_S if timeout_s is None else timeout_s
    read = next((b for b in READ_TIMEOUT_BUCKETS_S if b >= budget), READ_TIMEOUT_BUCKETS_S[-1])
    return ClientsByTimeout("lambda").get(read)


def _call_error(function_name: str, exc: Exception, timeout_s: float | None) -> errors.TierserveError:
    """An exception of the boto3 call (before or while reading the stream) as the project's error."""
    if isinstance(exc, errors.TierserveError):
        return exc
    if type(exc).__name__ in ("ReadTimeoutError", "ReadTimeout", "ConnectTimeoutError"):
        return errors.BackendTimeoutError(f"{function_name} did not answer within {timeout_s or 0:g} s")
    code = str(((getattr(exc, "response", None) or {}).get("Error") or {}).get("Code") or "")
    if code in THROTTLED_CODES:
        return errors.TierThrottledError(f"{function_name} is throttled ({code}: {exc})", retry_after_s=1)
    return errors.BackendUnavailableError(f"cannot invoke {function_name} with a response stream: "
                                          f"{type(exc).__name__}: {exc}")


def _complete_error(function_name: str, complete: dict[str, Any]) -> errors.TierserveError | None:
    code = complete.get("ErrorCode")
    if not code:
        return None
    details = complete.get("ErrorDetails") or ""
    if code in TIMEOUT_CODES:
        return errors.BackendTimeoutError(f"{function_name} timed out mid-stream ({code}): {details}")
    return errors.InferenceError(f"{function_name} failed mid-stream ({code}): {details}; see its logs")


def _payloads(function_name: str, events: Iterable[dict[str, Any]], deadline: float | None,
              timeout_s: float | None) -> Iterator[bytes]:
    """Each ``PayloadChunk``'s bytes; the project's error for a failed ``InvokeComplete``, a stream that ends
    without one, or the deadline passed."""
    try:
        for ev in events:
            if "PayloadChunk" in ev:
                data = ev["PayloadChunk"].get("Payload") or b""
                if data:
                    yield bytes(data)
            elif "InvokeComplete" in ev:
                error = _complete_error(function_name, ev["InvokeComplete"] or {})
                if error is not None:
                    raise error
                return
            if deadline is not None and time.monotonic() > deadline:
                raise errors.BackendTimeoutError(f"{function_name} did not finish its stream within {timeout_s:g} s")
    except errors.TierserveError:
        raise
    except Exception as exc:
        raise _call_error(function_name, exc, timeout_s) from exc
    raise errors.BackendUnavailableError(f"{function_name}'s response stream ended without InvokeComplete: "
                                         "the connection was cut; the answer is incomplete")


def invoke_stream(client: Any, function_name: str, payload: bytes, timeout_s: float | None = None) -> ResponseStream:
    """Invoke ``function_name`` with ``InvokeWithResponseStream`` and return its body's bytes as they come.

    ``timeout_s`` bounds the whole stream (the client's read timeout bounds each wait). Raises, before
    returning, every error known before the body's first byte (see the module's docstring); a buffered
    answer (a JSON API Gateway response object, what the handler returns for an error before any event) is
    read whole: a non-2xx status raises the tier's error, a 2xx one is returned as its body."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        out = client.invoke_with_response_stream(FunctionName=function_name, Payload=payload)
    except Exception as exc:
        raise _call_error(function_name, exc, timeout_s) from exc
    stream = out.get("EventStream")
    close = getattr(stream, "close", None)
    payloads = _payloads(function_name, stream or (), deadline, timeout_s)
    content_type = str(out.get("ResponseStreamContentType") or "")
    try:
        if content_type.startswith(HTTP_INTEGRATION):
            status, headers, first = _read_prelude(function_name, payloads)
            if status >= 300:
                body = first + b"".join(payloads)
                raise _status_error(function_name, status, {"statusCode": status, "headers": headers,
                                                            "body": body.decode("utf-8", "replace")})
            return ResponseStream(function_name, status, headers, first, payloads, close)
        # a buffered answer: an API Gateway proxy response object (the handler did not stream)
        body = b"".join(payloads)
        return _buffered(function_name, body, close)
    except BaseException:
        if callable(close):
            with contextlib.suppress(Exception):  # best effort on the error path
                close()
        raise


def _read_prelude(function_name: str, payloads: Iterator[bytes]) -> tuple[int, dict[str, str], bytes]:
    buf = b""
    for data in payloads:
        buf += data
        end = buf.find(DELIMITER)
        if end >= 0:
            try:
                prelude = json.loads(buf[:end])
            except ValueError as exc:
                raise errors.InferenceError(f"{function_name} streamed a bad HTTP-integration prelude: {exc}") from exc
            if not isinstance(prelude, dict):
                raise errors.InferenceError(f"{function_name} streamed a prelude that is not a JSON object")
            headers = {str(k).lower(): str(v) for k, v in (prelude.get("headers") or {}).items()}
            return int(prelude.get("statusCode", 200)), headers, buf[end + len(DELIMITER):]
        if len(buf) > MAX_PRELUDE_BYTES:
            break
    raise errors.InferenceError(f"{function_name} streamed no HTTP-integration prelude (a JSON object and 8 NUL "
                                "bytes); check that its runtime is tierserve.streaming.runtime_loop")


def _buffered(function_name: str, body: bytes, close: Any) -> ResponseStream:
    try:
        reply = json.loads(body or b"{}")
    except ValueError as exc:
        raise errors.InferenceError(f"{function_name} answered neither a stream nor JSON: {body[:200]!r}") from exc
    if isinstance(reply, dict) and "errorMessage" in reply and "statusCode" not in reply:
        raise errors.InferenceError(f"{function_name} failed: {reply.get('errorMessage')}; see its logs")
    if not isinstance(reply, dict) or "statusCode" not in reply:
        raise errors.InferenceError(f"{function_name} answered {type(reply).__name__} without a statusCode, not an "
                                    "HTTP response; check that it is CpuInferenceFunction")
    status = int(reply.get("statusCode", 500))
    if status >= 300:
        raise _status_error(function_name, status, reply)
    raw = reply.get("body") or ""
    data = base64.b64decode(raw) if reply.get("isBase64Encoded") else str(raw).encode()
    headers = {str(k).lower(): str(v) for k, v in (reply.get("headers") or {}).items()}
    return ResponseStream(function_name, status, headers, data, iter(()), close)


#: The CPU function's HTTP status -> the error the router raises (``lambda_invoke``'s table, plus 429).
ERROR_BY_STATUS: dict[int, type[errors.TierserveError]] = {
    400: errors.InvalidRequestError,
    404: errors.ModelNotFoundError,
    413: errors.PayloadTooLargeError,
    429: errors.TooManyRequestsError,
    503: errors.BackendUnavailableError,
    504: errors.BackendTimeoutError,
}


def _tier_error(status: int, error: Any, retry_after: Any = None) -> errors.TierserveError:
    """The CPU tier's error as it answered it: the class its status maps to, its message and its own code.
    ``error`` is the body's ``error`` (a message, or OpenAI's ``{message, code}``) or the body itself."""
    code = param = None
    if isinstance(error, dict):
        code, param = error.get("code"), error.get("param")
        error = error.get("message") or error.get("error")
    exc = ERROR_BY_STATUS.get(status, errors.InferenceError)(str(error or f"the CPU tier answered {status}"))
    if isinstance(code, str):
        exc.code = code  # the tier's own code survives the hop (e.g. context_length_exceeded)
    if isinstance(param, str):
        exc.param = param  # type: ignore[attr-defined]  # OpenAI's "param" too (the renderer reads it)
    if retry_after is not None and hasattr(exc, "retry_after_s"):
        with contextlib.suppress(TypeError, ValueError):
            exc.retry_after_s = float(retry_after)
    return exc


def _status_error(function_name: str, status: int, reply: dict[str, Any]) -> errors.TierserveError:
    """The CPU function's non-2xx HTTP answer (an API Gateway response object) as the tier's error."""
    raw = reply.get("body") or ""
    body = base64.b64decode(raw) if reply.get("isBase64Encoded") else str(raw).encode()
    try:
        obj = json.loads(body)
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        error: Any = obj.get("error") if "error" in obj else obj
        if isinstance(error, str) and isinstance(obj.get("code"), str):
            error = {"message": error, "code": obj["code"]}
    else:
        error = body[:200].decode("utf-8", "replace") or f"{function_name} answered {status}"
    retry = {str(k).lower(): v for k, v in (reply.get("headers") or {}).items()}.get("retry-after")
    return _tier_error(status, error, retry)


def event_lines(chunks: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """Newline-delimited JSON objects from chunks split anywhere (a line may span chunks, a chunk may hold
    several lines, a multi-byte character may be cut between two chunks)."""
    buf = b""
    for chunk in chunks:
        buf += chunk
        while True:
            end = buf.find(b"\n")
            if end < 0:
                break
            line, buf = buf[:end], buf[end + 1:]
            if line.strip():
                yield _line(line)
    if buf.strip():
        yield _line(buf)


def _line(line: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise errors.InferenceError(f"the CPU function streamed a line that is not JSON ({exc}): {line[:200]!r}; "
                                    "the stream was cut or is not the generation format") from exc
    if not isinstance(obj, dict):
        raise errors.InferenceError(f"the CPU function streamed {type(obj).__name__}, not a JSON object: "
                                    f"{line[:200]!r}")
    return obj


def raise_error_line(obj: dict[str, Any]) -> None:
    """An ``{"error": {status, code, message}}`` line as the tier's error (its code kept); else nothing."""
    err = obj.get("error")
    if isinstance(err, dict):
        raise _tier_error(int(err.get("status") or 500), err, err.get("retry_after_s"))


def generation_events(chunks: Iterable[bytes]) -> Iterator[Any]:
    """``GenerationEvent`` per line; an error line raises the tier's error (after the events before it)."""
    from tierserve.generation.events import GenerationEvent

    for obj in event_lines(chunks):
        raise_error_line(obj)
        yield GenerationEvent.from_json(obj)
