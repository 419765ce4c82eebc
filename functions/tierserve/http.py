"""HTTP plumbing for API Gateway HTTP API (payload format 2.0) events.

This is the ONE place where errors become HTTP status codes (``STATUS_BY_ERROR``). Every
handler and the local API emulator go through ``error_response``; no stack trace ever
reaches a client.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass, field
from typing import Any

from tierserve import errors
from tierserve.wire import Base64Body, BodyBytes

#: Exception class -> HTTP status. Looked up along the exception's MRO, most specific first.
STATUS_BY_ERROR: dict[type[errors.TierserveError], int] = {
    errors.InvalidRequestError: 400,
    errors.RouteNotFoundError: 404,
    errors.ModelNotFoundError: 404,
    errors.MethodNotAllowedError: 405,
    errors.PayloadTooLargeError: 413,
    errors.BackendUnavailableError: 503,
    errors.BackendTimeoutError: 504,
    errors.ConfigurationError: 500,
    errors.ManifestError: 500,
    errors.ArtifactError: 500,
    errors.InferenceError: 500,
    errors.TierserveError: 500,
}


def status_for(exc: BaseException) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]  # type: ignore[index]
    return 500


@dataclass
class HttpRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: BodyBytes
    query: dict[str, str] = field(default_factory=dict)
    request_id: str = ""
    #: The body as the event carried it (JSON text, or base64 when ``is_base64``): forwarded untouched.
    event_text: str | None = None
    is_base64: bool = False

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def parse_http_event(event: dict[str, Any], max_body_bytes: int) -> HttpRequest:
    """Parse an HTTP API v2 event. Oversized bodies are refused (413) before they are decoded."""
    if not isinstance(event, dict) or "requestContext" not in event:
        raise errors.InvalidRequestError(
            "event is not an API Gateway HTTP API (payload format 2.0) event; "
            "generate one with `sam local generate-event apigateway http-api-proxy`"
        )
    ctx = event.get("requestContext") or {}
    http = ctx.get("http") or {}
    method = str(http.get("method") or event.get("httpMethod") or "GET").upper()
    path = str(event.get("rawPath") or http.get("path") or "/")
    headers = {str(k).lower(): str(v) for k, v in (event.get("headers") or {}).items()}
    raw = event.get("body") or ""
    is_b64 = bool(event.get("isBase64Encoded"))
    # Cheap size check first: never decode or parse a body over the limit.
    approx = math.ceil(len(raw) * 3 / 4) - raw[-2:].count("=") if is_b64 else len(raw)
    if approx > max_body_bytes:
        raise errors.PayloadTooLargeError(
            f"request body is {approx} bytes; the limit is {max_body_bytes} bytes. Split the batch into "
            "smaller requests, or use batch inference from S3 for large jobs"
        )
    # A binary body stays base64: only its JSON header is decoded to route it (wire.Base64Body).
    try:
        body: BodyBytes = Base64Body(raw) if is_b64 else raw.encode("utf-8")
    except ValueError as exc:
        raise errors.InvalidRequestError(f"body is flagged isBase64Encoded but is not valid base64: {exc}") from exc
    if not is_b64 and len(body) > max_body_bytes:
        raise errors.PayloadTooLargeError(
            f"request body is {len(body)} bytes; the limit is {max_body_bytes} bytes. Split the batch into "
            "smaller requests, or use batch inference from S3 for large jobs"
        )
    query = {str(k): str(v) for k, v in (event.get("queryStringParameters") or {}).items()}
    return HttpRequest(method, path, headers, body, query, str(ctx.get("requestId") or ""), raw, is_b64)


def response(
    status: int, body: bytes | str | dict[str, Any], headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """An HTTP API v2 response; binary bodies are base64-encoded as API Gateway requires."""
    out_headers = {"content-type": "application/json"}
    if isinstance(body, dict):
        payload: bytes = json.dumps(body, separators=(",", ":")).encode()
    elif isinstance(body, str):
        payload = body.encode()
    else:
        payload = body
    out_headers.update(headers or {})
    binary = out_headers.get("content-type", "").startswith("application/octet-stream")
    return {
        "statusCode": status,
        "headers": out_headers,
        "body": base64.b64encode(payload).decode() if binary else payload.decode("utf-8"),
        "isBase64Encoded": binary,
    }


def error_response(exc: BaseException, headers: dict[str, str] | None = None, request_id: str = "") -> dict:
    """The single mapping from an exception to an HTTP response: protocol error body, no stack trace."""
    status = status_for(exc)
    extra = dict(headers or {})
    if isinstance(exc, errors.TierserveError):
        message = exc.message
        code = exc.code
    else:
        message = f"internal error{f' (request {request_id})' if request_id else ''}; see the function's logs"
        code = "internal_error"
    if isinstance(exc, errors.BackendUnavailableError) and exc.retry_after_s is not None:
        extra["retry-after"] = str(max(1, math.ceil(exc.retry_after_s)))
    return response(status, {"error": message, "code": code}, extra)


def decode_body(resp: dict[str, Any]) -> bytes:
    """The raw body bytes of an HTTP API v2 response (used by clients of the handlers)."""
    body = resp.get("body") or ""
    return base64.b64decode(body) if resp.get("isBase64Encoded") else body.encode("utf-8")
