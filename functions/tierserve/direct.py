"""CpuInferenceFunction's Invoke payload: built by the router's LambdaInvokeBackend, served here.

The payload carries the client's body exactly as API Gateway handed it to the router, so nothing
is decoded and re-encoded on the way (events/cpu_direct_infer.json is an example)::

    {"model_name": "digits", "model_version": "1",
     "headers": {"content-type": "application/json", "inference-header-content-length": "..."},
     "body": "<the JSON text, or base64 of a binary body>", "isBase64Encoded": false}

The reply is an HTTP API response for that body, encoded as the client asked; the router returns
it to the client as it is. The version is pinned by the router (its canary pick stands).
"""

from __future__ import annotations

from typing import Any

from tierserve import errors, inference
from tierserve.app import Runtime, get_runtime
from tierserve.calls import Body, InferenceCall
from tierserve.http import error_response, response
from tierserve.manifest import ModelVersion
from tierserve.observability import logger
from tierserve.tiering import readiness_of

#: The headers of the client's request that the CPU function needs to read its body.
FORWARDED_HEADERS = ("content-type", "inference-header-content-length")
_SHAPE = ("CpuInferenceFunction expects {'model_name', 'model_version'?, 'body', 'isBase64Encoded'?, "
          "'headers'?}; see events/cpu_direct_infer.json")


def payload(model: ModelVersion, call: InferenceCall) -> dict[str, Any]:
    """The Invoke payload for ``call`` on ``model``: the client's body as it came, when there is one."""
    body = call.body()
    text, is_base64 = body.as_event()
    headers = {"content-type": "application/octet-stream" if is_base64 else "application/json"}
    if body.header_length is not None:
        headers["inference-header-content-length"] = str(body.header_length)
    return {"model_name": model.name, "model_version": model.version, "headers": headers,
            "body": text, "isBase64Encoded": is_base64}


def readiness_payload(model: ModelVersion) -> dict[str, Any]:
    """The Invoke payload that asks whether ``model`` loads and runs here (no inference body)."""
    return {"model_name": model.name, "model_version": model.version, "ready": True}


def _readiness(runtime: Runtime, event: dict[str, Any]) -> dict[str, Any]:
    name, version = inference.resolve_name(runtime, str(event["model_name"]),
                                           str(event["model_version"]) if event.get("model_version") else None)
    model = runtime.store.manifest().resolve(name, version)
    problem = readiness_of(runtime.dispatcher, model)
    if problem is not None:
        raise problem
    return response(200, {"name": model.name, "version": model.version, "ready": True}, {"x-served-by": "cpu"})


def handle_direct(event: dict[str, Any], context: Any = None, runtime: Runtime | None = None) -> dict[str, Any]:
    """Serve the router's Invoke payload on this function's own CPU tier; never raises."""
    served = {"x-served-by": "cpu"}
    try:
        runtime = runtime or get_runtime()
        if isinstance(event, dict) and event.get("ready") is True and "model_name" in event:
            return _readiness(runtime, event)
        if not isinstance(event, dict) or "model_name" not in event or not isinstance(event.get("body"), str):
            raise errors.InvalidRequestError(_SHAPE)
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
        return inference.infer(runtime, str(event["model_name"]), str(version) if version else None, body,
                               "cpu", context)
    except errors.TierserveError as exc:
        logger.info("request refused", extra={"error": exc.code, "detail": exc.message})
        return error_response(exc, served)
    except Exception:
        logger.exception("unhandled error")
        return error_response(RuntimeError(), served)
