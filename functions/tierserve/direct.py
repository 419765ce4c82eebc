"""CpuInferenceFunction's entry: serves the Invoke payload the router's LambdaInvokeBackend builds.

Why apart from the router's HTTP API: the CPU function is invoked by the router (never by API Gateway)
with the payload ``tierserve.invoke_payload`` defines: the client's body exactly as API Gateway handed it
to the router, so nothing is decoded and re-encoded on the way. The reply is an HTTP API response for
that body, encoded as the client asked; the router returns it to the client as it is. The version is
pinned by the router (its canary pick stands). It is a transport like the others: it serves the data
plane's infer and model readiness (``tierserve.protocol.dataplane``) and nothing else, and renders errors through
the one error wrapper (``http.error_response``).
"""

from __future__ import annotations

from typing import Any

from tierserve import errors, inference
from tierserve.app import Runtime, get_runtime
from tierserve.invoke_payload import SHAPE, is_readiness
from tierserve.observability import logger
from tierserve.protocol.calls import Body
from tierserve.protocol.dataplane import DataPlane
from tierserve.protocol.http_api import error_response, response
from tierserve.tiers import Tier


def _readiness(plane: DataPlane, event: dict[str, Any]) -> dict[str, Any]:
    version = str(event["model_version"]) if event.get("model_version") else None
    answer = plane.model_ready(str(event["model_name"]), version)
    return response(200, answer.document, {**answer.headers, "x-served-by": Tier.CPU})


def handle_direct(event: dict[str, Any], context: Any = None, runtime: Runtime | None = None) -> dict[str, Any]:
    """Serve the router's Invoke payload on this function's own CPU tier; never raises."""
    served: dict[str, str] = {"x-served-by": Tier.CPU}
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
