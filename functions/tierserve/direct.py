"""CpuInferenceFunction's entry: serves the Invoke payload the router's LambdaInvokeBackend builds.

Why apart from the router's HTTP API: the CPU function is invoked by the router (never by API Gateway)
with the payload ``tierserve.invoke_payload`` defines: the client's body exactly as API Gateway handed it
to the router, so nothing is decoded and re-encoded on the way. The reply is an HTTP API response for
that body, encoded as the client asked; the router returns it to the client as it is. The version is
pinned by the router (its canary pick stands). It is a transport like the others: it serves the data
plane's infer and model readiness (``tierserve.protocol.dataplane``) and nothing else, and renders errors through
the one error wrapper (``http.error_response``).

A generation (issue 17) comes as ``{"generate": GenerationRequest.to_json()}`` through
``InvokeWithResponseStream``, and is answered as a stream: one JSON line per ``GenerationEvent`` (NDJSON), each
sent as it is produced by the streaming runtime loop (``tierserve.streaming.runtime_loop``, which
``AWS_LAMBDA_EXEC_WRAPPER`` starts: Python's managed runtime cannot stream). Whatever fails before the first
event (admission's 429, a bad request, an unknown model) is a buffered HTTP answer with its status; a failure
after it is one ``{"error": {"status", "code", "message"}}`` line, then the end. Closing the stream (the loop
does when it ends or is abandoned) sets ``cancelled``, so the engine stops within one token.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from typing import Any

from tierserve import errors, inference
from tierserve.app import Runtime, get_runtime
from tierserve.invoke_payload import SHAPE, is_readiness
from tierserve.observability import logger
from tierserve.protocol.calls import Body
from tierserve.protocol.dataplane import DataPlane
from tierserve.protocol.http_api import error_response, response
from tierserve.protocol.rendering import render_error, status_for
from tierserve.streaming.response import StreamingResponse
from tierserve.tiers import Tier

#: Set by the streaming runtime loop before the handler is imported (``runtime_loop.STREAMING_RUNTIME_ENV``).
STREAMING_RUNTIME_ENV = "TIERSERVE_STREAMING_RUNTIME"
NDJSON = "application/x-ndjson"


def _readiness(plane: DataPlane, event: dict[str, Any]) -> dict[str, Any]:
    version = str(event["model_version"]) if event.get("model_version") else None
    answer = plane.model_ready(str(event["model_name"]), version)
    return response(200, answer.document, {**answer.headers, "x-served-by": Tier.CPU})


def _generation_error(exc: BaseException) -> dict[str, Any]:
    """An error as the CPU function answers a generation before its first event: OpenAI's shape, with its
    status and ``retry-after`` (the router's ``lambda_stream`` reads both)."""
    answer = render_error(exc, "openai", {"x-served-by": Tier.CPU})
    return response(answer.status, answer.document, answer.headers)


def error_line(exc: BaseException) -> bytes:
    """The NDJSON line that ends a generation which failed after its first event."""
    answer = render_error(exc, "openai")
    error: dict[str, Any] = {"status": status_for(exc), "code": answer.code, "message": answer.message}
    retry = getattr(exc, "retry_after_s", None)
    if isinstance(exc, errors.TierserveError) and retry is not None:
        error["retry_after_s"] = retry
    return json.dumps({"error": error}).encode() + b"\n"


def handle_generate(event: dict[str, Any], context: Any = None,
                    runtime: Runtime | None = None) -> dict[str, Any] | StreamingResponse:
    """A ``{"generate": ...}`` payload: an NDJSON stream of the generation's events, or a buffered error
    answer when it fails before its first event; never raises."""
    try:
        if os.environ.get(STREAMING_RUNTIME_ENV) != "1":
            raise errors.InvalidRequestError(
                "a generation is streamed: this function must run with the streaming runtime "
                "(AWS_LAMBDA_EXEC_WRAPPER=/var/task/tierserve/streaming/wrapper.sh) and be invoked with "
                "InvokeWithResponseStream")
        from tierserve.generation.requests import GenerationRequest

        raw = event.get("generate")
        try:
            if not isinstance(raw, dict):
                raise TypeError("not a JSON object")
            request = GenerationRequest.from_json(raw)
        except (KeyError, TypeError, ValueError) as exc:
            raise errors.InvalidRequestError(f'"generate" is not a generation request ({exc}): send '
                                             "GenerationRequest.to_json()") from exc
        cancelled = threading.Event()
        generation = DataPlane(runtime or get_runtime()).generate(request, cancelled.is_set, context)
    except errors.TierserveError as exc:
        logger.info("generation refused", extra={"error": exc.code, "detail": exc.message})
        return _generation_error(exc)
    except Exception as exc:
        logger.exception("unhandled error")
        return _generation_error(exc)

    def lines() -> Iterator[bytes]:
        try:
            for ev in generation:
                yield json.dumps(ev.to_json()).encode() + b"\n"
        except errors.TierserveError as exc:
            logger.info("generation failed mid-stream", extra={"error": exc.code, "detail": exc.message})
            yield error_line(exc)
        except Exception as exc:
            logger.exception("generation failed mid-stream")
            yield error_line(exc)

    def close() -> None:
        cancelled.set()
        generation.close()

    return StreamingResponse(200, {"content-type": NDJSON, "x-served-by": Tier.CPU.value}, lines(), close)


def handle_direct(event: dict[str, Any], context: Any = None,
                  runtime: Runtime | None = None) -> dict[str, Any] | StreamingResponse:
    """Serve the router's Invoke payload on this function's own CPU tier; never raises."""
    served: dict[str, str] = {"x-served-by": Tier.CPU}
    if isinstance(event, dict) and "generate" in event:
        return handle_generate(event, context, runtime)
    try:
        runtime = runtime or get_runtime()
        plane = DataPlane(runtime)
        if is_readiness(event):
            return _readiness(plane, event)
        if not isinstance(event, dict) or "model_name" not in event or not isinstance(event.get("body"), str):
            raise errors.InvalidRequestError(SHAPE)
        headers = {str(k).lower(): str(v) for k, v in (event.get("headers") or {}).items()}
        is_base64 = bool(event.get("isBase64Encoded"))
        text = event["body"]
        size = len(text) * 3 // 4 if is_base64 else len(text)
        if size > runtime.settings.max_payload_bytes:
            raise errors.PayloadTooLargeError(
                f"payload body is {size} bytes; the limit is {runtime.settings.max_payload_bytes} bytes")
        try:
            body = Body.from_event_text(text, is_base64,
                                        inference.header_length(headers.get("inference-header-content-length")))
        except ValueError as exc:
            raise errors.InvalidRequestError(f"body is flagged isBase64Encoded but is not valid base64: {exc}") from exc
        version = event.get("model_version")
        return plane.infer(str(event["model_name"]), str(version) if version else None, body, Tier.CPU, context)
    except errors.TierserveError as exc:
        logger.info("request refused", extra={"error": exc.code, "detail": exc.message})
        return error_response(exc, served)
    except Exception:
        logger.exception("unhandled error")
        return error_response(RuntimeError(), served)
