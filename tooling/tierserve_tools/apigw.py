"""API Gateway HTTP API emulation: real HTTP requests in, payload-format-2.0 events to a handler.

``http_api_event`` builds the event exactly as API Gateway does for a ``$default`` route
(version 2.0, routeKey, rawPath, rawQueryString, lower-cased headers with repeated values
comma-joined, cookies, queryStringParameters, requestContext.http, requestId/time, body
base64-encoded with ``isBase64Encoded: true`` unless the content type is text). ``write_result``
turns the handler's result back into an HTTP response (a dict with statusCode/headers/body, or
any other JSON value, which API Gateway serves as a 200 application/json body).
"""

from __future__ import annotations

import base64
import json
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

from tierserve import limits
from tierserve.httpserver import HttpServer, Limits, Request, Response

#: Content types API Gateway passes through as text; every other body is base64-encoded.
_TEXT_TYPES = ("text/", "application/json", "application/xml", "application/javascript",
               "application/x-www-form-urlencoded", "+json", "+xml")
#: Lambda's synchronous invocation payload limits: a bigger event never reaches the function, a bigger
#: result never reaches the client (tierserve.limits holds the quotas).
MAX_EVENT_BYTES = limits.LAMBDA_REQUEST_BYTES
MAX_RESULT_BYTES = limits.LAMBDA_RESPONSE_BYTES
#: API Gateway HTTP API: the largest request body, and the integration timeout.
MAX_BODY_BYTES = limits.APIGW_PAYLOAD_BYTES
INTEGRATION_TIMEOUT_S = limits.APIGW_INTEGRATION_TIMEOUT_S
#: What API Gateway itself answers when a quota is hit (its own bodies, not the function's).
TOO_LARGE = (413, [("content-type", "application/json")], b'{"message":"Request Entity Too Large"}')
INTERNAL_ERROR = (500, [("content-type", "application/json")], b'{"message":"Internal Server Error"}')
TIMED_OUT = (503, [("content-type", "application/json")], b'{"message":"Service Unavailable"}')

Handler = Callable[[dict[str, Any], Any], Any]
ContextFactory = Callable[[], Any]
#: (method, target, headers, body) -> (status, headers, body), or None when the request is not its.
Extra = Callable[[str, str, dict[str, str], bytes], "tuple[int, dict[str, str], bytes] | None"]
#: (method, target, headers, body) -> None when allowed, else the refusal (status, headers, body).
Authorizer = Callable[[str, str, dict[str, str], bytes], "tuple[int, dict[str, str], bytes] | None"]


def _is_text(content_type: str | None, body: bytes) -> bool:
    if not body:
        return True
    ct = (content_type or "").lower()
    if not any(t in ct for t in _TEXT_TYPES):
        return False
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def http_api_event(method: str, target: str, headers: list[tuple[str, str]], body: bytes,
                   source_ip: str = "127.0.0.1", stage: str = "$default") -> dict[str, Any]:
    """An HTTP API (payload format 2.0) event for one request, as API Gateway builds it."""
    path, _, raw_query = target.partition("?")
    merged: dict[str, str] = {}
    cookies: list[str] = []
    for k, v in headers:
        key = k.lower()
        if key == "cookie":
            cookies.extend(c.strip() for c in v.split(";") if c.strip())
            continue
        merged[key] = f"{merged[key]},{v}" if key in merged else v
    query: dict[str, str] = {}
    for k, v in parse_qsl(raw_query, keep_blank_values=True):
        query[k] = f"{query[k]},{v}" if k in query else v
    now = datetime.now(UTC)
    request_id = base64.b32encode(uuid.uuid4().bytes)[:16].decode().rstrip("=")
    text = _is_text(merged.get("content-type"), body)
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": raw_query,
        "headers": merged,
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "local",
            "domainName": merged.get("host", "localhost"),
            "domainPrefix": merged.get("host", "localhost").split(".")[0],
            "http": {
                "method": method.upper(),
                "path": path,
                "protocol": "HTTP/1.1",
                "sourceIp": source_ip,
                "userAgent": merged.get("user-agent", ""),
            },
            "requestId": request_id,
            "routeKey": "$default",
            "stage": stage,
            "time": now.strftime("%d/%b/%Y:%H:%M:%S +0000"),
            "timeEpoch": int(now.timestamp() * 1000),
        },
        "isBase64Encoded": not text,
    }
    if cookies:
        event["cookies"] = cookies
    if query:
        event["queryStringParameters"] = query
    if body:
        event["body"] = body.decode("utf-8") if text else base64.b64encode(body).decode()
    return event


def _event_bytes(event: dict[str, Any]) -> int:
    """The event's size as Lambda receives it (serialised exactly only when its body is large)."""
    body = event.get("body") or ""
    if len(body) < MAX_EVENT_BYTES - 64 * 1024:
        return len(body)
    return len(json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass"))


def result_to_http(result: Any) -> tuple[int, list[tuple[str, str]], bytes]:
    """(status, headers, body) for a handler's result, interpreted as API Gateway does (format 2.0)."""
    if not isinstance(result, dict) or "statusCode" not in result:
        body = json.dumps(result).encode() if not isinstance(result, str) else result.encode()
        return 200, [("content-type", "application/json")], body
    status = int(result["statusCode"])
    headers = [(str(k), str(v)) for k, v in (result.get("headers") or {}).items()]
    for k, values in (result.get("multiValueHeaders") or {}).items():
        headers.extend((str(k), str(v)) for v in values)
    headers.extend(("set-cookie", str(c)) for c in result.get("cookies") or [])
    raw = result.get("body")
    if raw is None:
        body = b""
    elif result.get("isBase64Encoded"):
        body = base64.b64decode(raw)
    else:
        body = (raw if isinstance(raw, str) else json.dumps(raw)).encode()
    return status, headers, body


class ApiGatewayServer(HttpServer):
    """An HTTP server (``tierserve.httpserver``: absolute header and body deadlines, a bounded number of
    connections, 400/405/408/413/414/505 in the API's JSON) that serves every request through
    ``handler(event, context)``, within API Gateway's quotas. ``limits`` may shorten the deadlines (tests)."""

    thread_name = "apigw"
    server_name = "tierserve-apigw-local"

    def __init__(self, handler: Handler, context_factory: ContextFactory, host: str = "127.0.0.1",
                 port: int = 0, extra: Extra | None = None, authorizer: Authorizer | None = None,
                 limits: Limits | None = None) -> None:
        self.handler = handler
        self.context_factory = context_factory
        self.also = extra  # the emulator's own pages (GET /metrics); None = not theirs, the API's
        self.authorizer = authorizer  # IAM auth (tierserve_tools.sigv4): None = allowed, else the refusal
        self.integration_timeout_s = INTEGRATION_TIMEOUT_S
        self.limits = limits or Limits(max_body_bytes=MAX_BODY_BYTES)
        self.host, self.port = host, port
        self.bind()

    def handle(self, request: Request) -> Response:
        headers = request.header_map()
        if self.also is not None:
            other = self.also(request.method, request.target, headers, request.body)
            if other is not None:
                return Response(other[0], list(other[1].items()), other[2])
        if self.authorizer is not None:
            denied = self.authorizer(request.method, request.target, headers, request.body)
            if denied is not None:
                return Response(denied[0], list(denied[1].items()), denied[2])
        event = http_api_event(request.method, request.target, request.headers, request.body, request.client[0])
        status, out, payload = self.invoke(event)
        return Response(status, [*out, ("apigw-requestid", event["requestContext"]["requestId"])], payload)

    def invoke(self, event: dict[str, Any]) -> tuple[int, list[tuple[str, str]], bytes]:
        """The integration, with API Gateway's and Lambda's quotas: an event over Lambda's request payload
        is 413, a result over its response payload or an unhandled error 500, no answer within the
        integration timeout 503 (the handler is left to finish, as Lambda would)."""
        import logging

        log = logging.getLogger("tierserve_tools")
        if _event_bytes(event) > MAX_EVENT_BYTES:
            return TOO_LARGE
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["result"] = self.handler(event, self.context_factory())
            except Exception as exc:  # Lambda reports an unhandled error; API Gateway answers 500
                box["error"] = exc

        worker = threading.Thread(target=run, name="apigw-integration", daemon=True)
        worker.start()
        worker.join(self.integration_timeout_s)
        if worker.is_alive():
            log.warning("RouterFunction did not answer within the %g s integration timeout", self.integration_timeout_s)
            return TIMED_OUT
        if "error" in box:
            log.error("RouterFunction raised", exc_info=box["error"])
            return INTERNAL_ERROR
        result = box["result"]
        size = len(json.dumps(result, separators=(",", ":")))
        if size > MAX_RESULT_BYTES:
            log.error("RouterFunction's response (%d bytes) exceeds Lambda's %d-byte response payload", size,
                      MAX_RESULT_BYTES)
            return INTERNAL_ERROR
        return result_to_http(result)


def context_factory(function_name: str, memory_mb: int, timeout_s: float) -> ContextFactory:
    """A LambdaContext-like object per invocation (remaining time counts down from ``timeout_s``)."""
    from tierserve_tools.emulation import LocalContext

    def make() -> Any:
        return LocalContext(function_name, memory_mb, timeout_s)

    return make


__all__ = ["ApiGatewayServer", "context_factory", "http_api_event", "result_to_http"]
