"""API Gateway emulation: real HTTP requests in, Lambda proxy events to the router.

Two APIs on one port, as the deployed stack has two (template.yaml):

* **the HTTP API** (the Open Inference Protocol routes, everything not below): payload format 2.0 events,
  answered buffered within its 30 s integration timeout;
* **the streaming REST API** (``REST_ROUTES``: the OpenAI routes and Triton's generate extension, the paths of
  G4's StreamingApi), when a ``rest`` function is given: payload format 1.0 events (:func:`rest_api_event`, the
  shape of ``sam local generate-event apigateway aws-proxy``) invoked with response streaming, the router's
  HTTP-integration answer (a JSON prelude, 8 NUL bytes, the body) relayed chunk by chunk as it comes
  (:func:`rest_response`), with the REST API's limits: 15 minutes in all, 5 minutes idle between chunks, no
  content encoding. A client that goes away abandons the invocation (the router's stream is closed at its next
  chunk, and with it the generation).

``http_api_event`` builds the event exactly as API Gateway does for a ``$default`` route
(version 2.0, routeKey, rawPath, rawQueryString, lower-cased headers with repeated values
comma-joined, cookies, queryStringParameters, requestContext.http, requestId/time, body
base64-encoded with ``isBase64Encoded: true`` unless the content type is text). ``write_result``
turns the handler's result back into an HTTP response (a dict with statusCode/headers/body, or
any other JSON value, which API Gateway serves as a 200 application/json body).
"""

from __future__ import annotations

import base64
import contextlib
import json
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, unquote

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

#: The streaming REST API's limits: a stream ends at 15 minutes, or after 5 minutes without a byte.
REST_LIMIT_S = 900.0
REST_IDLE_S = 300.0
REST_STAGE = "api"
HTTP_INTEGRATION = "application/vnd.awslambda.http-integration-response"
DELIMITER = b"\x00" * 8
#: What the REST API answers itself: a function error or a malformed answer, and no answer in time.
REST_BAD_GATEWAY = (502, [("content-type", "application/json")], b'{"message": "Internal server error"}')
REST_TIMED_OUT = (504, [("content-type", "application/json")], b'{"message": "Endpoint request timed out"}')
_MODEL_PATH = r"/v2/models/(?P<model>[^/]+)"
#: (method, path pattern, resource): the streaming REST API's routes (template.yaml's StreamingApi).
REST_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("POST", re.compile(r"^/v1/chat/completions$"), "/v1/chat/completions"),
    ("POST", re.compile(r"^/v1/completions$"), "/v1/completions"),
    ("POST", re.compile(r"^/v1/embeddings$"), "/v1/embeddings"),
    ("GET", re.compile(r"^/v1/models$"), "/v1/models"),
    ("POST", re.compile(rf"^{_MODEL_PATH}/generate$"), "/v2/models/{model}/generate"),
    ("POST", re.compile(rf"^{_MODEL_PATH}/generate_stream$"), "/v2/models/{model}/generate_stream"),
    ("POST", re.compile(rf"^{_MODEL_PATH}/versions/(?P<version>[^/]+)/generate$"),
     "/v2/models/{model}/versions/{version}/generate"),
    ("POST", re.compile(rf"^{_MODEL_PATH}/versions/(?P<version>[^/]+)/generate_stream$"),
     "/v2/models/{model}/versions/{version}/generate_stream"),
]

Handler = Callable[[dict[str, Any], Any], Any]
#: The router invoked with response streaming: (event JSON bytes, answer) -> the response's bytes as they come.
#: ``answer`` gets ``content_type`` (the function's response type) and ``abandon`` (a callable: the caller went
#: away) once known (``tierserve_tools.lambda_endpoint.LocalFunction.stream``).
RestFunction = Callable[[bytes, dict[str, Any]], Iterable[bytes]]
#: (method, target, headers, body) -> None when allowed, else the refusal; or a dict: the authorizer's context.
RestAuthorizer = Callable[[str, str, dict[str, str], bytes],
                          "tuple[int, dict[str, str], bytes] | dict[str, Any] | None"]
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


def rest_route(method: str, path: str) -> tuple[str, dict[str, str]] | None:
    """The REST API's resource and path parameters for a request, or None when it is not one of its routes
    (then the HTTP API serves it, whose router answers 404 or 405)."""
    for verb, pattern, resource in REST_ROUTES:
        m = pattern.fullmatch(path)
        if m is not None and verb == method.upper():
            return resource, {k: unquote(v) for k, v in m.groupdict().items() if v is not None}
    return None


def rest_api_event(method: str, target: str, headers: list[tuple[str, str]], body: bytes, resource: str,
                   path_parameters: dict[str, str], source_ip: str = "127.0.0.1", stage: str = REST_STAGE,
                   authorizer: dict[str, Any] | None = None) -> dict[str, Any]:
    """A REST API (payload format 1.0) proxy event for one request, as API Gateway builds it."""
    path, _, raw_query = target.partition("?")
    single: dict[str, str] = {}
    multi: dict[str, list[str]] = {}
    for k, v in headers:
        single[k] = v  # the last value, as REST APIs give it
        multi.setdefault(k, []).append(v)
    query: dict[str, str] = {}
    multi_query: dict[str, list[str]] = {}
    for k, v in parse_qsl(raw_query, keep_blank_values=True):
        query[k] = v
        multi_query.setdefault(k, []).append(v)
    now = datetime.now(UTC)
    lower = {k.lower(): v for k, v in single.items()}
    text = _is_text(lower.get("content-type"), body)
    context: dict[str, Any] = {
        "accountId": "123456789012", "apiId": "local", "resourceId": "local", "stage": stage,
        "requestId": str(uuid.uuid4()), "requestTime": now.strftime("%d/%b/%Y:%H:%M:%S +0000"),
        "requestTimeEpoch": int(now.timestamp() * 1000), "path": f"/{stage}{path}", "resourcePath": resource,
        "httpMethod": method.upper(), "protocol": "HTTP/1.1", "domainName": lower.get("host", "localhost"),
        "identity": {"cognitoIdentityPoolId": None, "accountId": None, "cognitoIdentityId": None, "caller": None,
                     "accessKey": None, "sourceIp": source_ip, "cognitoAuthenticationType": None,
                     "cognitoAuthenticationProvider": None, "userArn": None,
                     "userAgent": lower.get("user-agent", ""), "user": None},
    }
    if authorizer is not None:
        context["authorizer"] = authorizer
    return {
        "resource": resource, "path": path, "httpMethod": method.upper(), "headers": single or None,
        "multiValueHeaders": multi or None, "queryStringParameters": query or None,
        "multiValueQueryStringParameters": multi_query or None, "pathParameters": path_parameters or None,
        "stageVariables": None, "requestContext": context,
        "body": (body.decode("utf-8") if text else base64.b64encode(body).decode()) if body else None,
        "isBase64Encoded": bool(body) and not text,
    }


class _Pump:
    """A function's response read on a thread of its own, so that the REST API's idle and total limits hold
    while it is silent; ``abandon`` (from ``answer``) is called when the relay stops before the end."""

    def __init__(self, chunks: Iterable[bytes], answer: dict[str, Any], idle_s: float, limit_s: float) -> None:
        self.answer, self.idle_s = answer, idle_s
        self.ends_at = time.monotonic() + limit_s
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._done = False
        threading.Thread(target=self._run, args=(chunks,), daemon=True, name="rest-relay").start()

    def _run(self, chunks: Iterable[bytes]) -> None:
        try:
            for chunk in chunks:
                self._queue.put(("data", bytes(chunk)))
            self._queue.put(("end", None))
        except Exception as exc:  # the function failed: the relay decides what the client sees
            self._queue.put(("error", exc))

    def get(self) -> tuple[str, Any]:
        """("data", bytes) | ("end", None) | ("error", exc) | ("idle", seconds) | ("limit", seconds)."""
        left = self.ends_at - time.monotonic()
        wait = min(self.idle_s, left)
        if wait <= 0:
            return "limit", REST_LIMIT_S
        try:
            item = self._queue.get(timeout=wait)
        except queue.Empty:
            return ("idle", self.idle_s) if wait == self.idle_s else ("limit", REST_LIMIT_S)
        if item[0] != "data":
            self._done = True
        return item

    def abandon(self) -> None:
        if not self._done:
            self._done = True
            abandon = self.answer.get("abandon")
            if callable(abandon):
                with contextlib.suppress(Exception):
                    abandon()


def rest_response(function: RestFunction, event: dict[str, Any], idle_s: float = REST_IDLE_S,
                  limit_s: float = REST_LIMIT_S) -> tuple[int, list[tuple[str, str]], Iterable[bytes] | bytes]:
    """``(status, headers, body)`` for one REST API request: the router invoked with response streaming; a
    streamed (HTTP-integration) answer relayed chunk by chunk (body: an iterator), a buffered one as it is. A
    function error, or an answer that is neither, is API Gateway's 502; no first byte within the limits 504."""
    import logging

    log = logging.getLogger("tierserve_tools")
    payload = json.dumps(event).encode()
    if len(payload) > MAX_EVENT_BYTES:
        return TOO_LARGE
    answer: dict[str, Any] = {}
    try:
        pump = _Pump(function(payload, answer), answer, idle_s, limit_s)
    except Exception:
        log.exception("RouterFunction could not be invoked")
        return REST_BAD_GATEWAY
    buf = b""
    while True:
        kind, value = pump.get()
        if kind == "data":
            buf += value
            streamed = str(answer.get("content_type", "")).startswith(HTTP_INTEGRATION)
            if streamed and DELIMITER in buf:
                break
            continue
        if kind == "end" and buf and not str(answer.get("content_type", "")).startswith(HTTP_INTEGRATION):
            try:  # a buffered answer: the router's proxy response object
                return result_to_http(json.loads(buf))
            except (ValueError, TypeError, KeyError):
                log.error("RouterFunction answered neither a stream nor a proxy response: %r", buf[:200])
                return REST_BAD_GATEWAY
        pump.abandon()
        if kind in ("idle", "limit"):
            log.warning("RouterFunction sent nothing within the REST API's %s limit (%g s)", kind, value)
            return REST_TIMED_OUT
        log.error("RouterFunction failed before its answer began: %s", value if kind == "error" else "no prelude")
        return REST_BAD_GATEWAY
    head, _, first = buf.partition(DELIMITER)
    try:
        prelude = json.loads(head)
        status = int(prelude.get("statusCode", 200))
    except (ValueError, TypeError, AttributeError):
        pump.abandon()
        return REST_BAD_GATEWAY
    headers = [(str(k).lower(), str(v)) for k, v in (prelude.get("headers") or {}).items()
               if str(k).lower() != "content-encoding"]  # REST streams carry no content encoding
    headers += [("set-cookie", str(c)) for c in prelude.get("cookies") or []]
    return status, headers, _relay(pump, first)


def _relay(pump: _Pump, first: bytes) -> Iterator[bytes]:
    """The body after the prelude, chunk by chunk; the stream just ends at an error or a limit (the status is
    out), and the invocation is abandoned when this is closed before the end (the client went away)."""
    import logging

    try:
        if first:
            yield first
        while True:
            kind, value = pump.get()
            if kind != "data":
                if kind != "end":
                    logging.getLogger("tierserve_tools").warning("the REST stream ended early: %s %s", kind, value)
                return
            if value:
                yield value
    finally:
        pump.abandon()


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
                 limits: Limits | None = None, rest: RestFunction | None = None,
                 rest_authorizer: RestAuthorizer | None = None) -> None:
        self.handler = handler
        self.context_factory = context_factory
        self.also = extra  # the emulator's own pages (GET /metrics); None = not theirs, the API's
        self.authorizer = authorizer  # IAM auth (tierserve_tools.sigv4): None = allowed, else the refusal
        self.rest = rest  # the streaming REST API's integration (REST_ROUTES); None: every route is the HTTP API's
        self.rest_authorizer = rest_authorizer  # its own authorizer (keys), applied after ``authorizer``
        self.rest_idle_s, self.rest_limit_s = REST_IDLE_S, REST_LIMIT_S
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
        route = rest_route(request.method, request.path) if self.rest is not None else None
        if route is not None:
            return self.handle_rest(request, headers, *route)
        event = http_api_event(request.method, request.target, request.headers, request.body, request.client[0])
        status, out, payload = self.invoke(event)
        return Response(status, [*out, ("apigw-requestid", event["requestContext"]["requestId"])], payload)

    def handle_rest(self, request: Request, headers: dict[str, str], resource: str,
                    params: dict[str, str]) -> Response:
        """One request of the streaming REST API: its authorizer, a 1.0 event, the router's answer relayed."""
        assert self.rest is not None
        authorizer: dict[str, Any] | None = None
        if self.rest_authorizer is not None:
            verdict = self.rest_authorizer(request.method, request.target, headers, request.body)
            if isinstance(verdict, tuple):
                return Response(verdict[0], list(verdict[1].items()), verdict[2])
            authorizer = verdict
        event = rest_api_event(request.method, request.target, request.headers, request.body, resource, params,
                               request.client[0], authorizer=authorizer)
        status, out, body = rest_response(self.rest, event, self.rest_idle_s, self.rest_limit_s)
        return Response(status, [*out, ("x-amzn-requestid", event["requestContext"]["requestId"])], body)

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


__all__ = ["REST_ROUTES", "ApiGatewayServer", "context_factory", "http_api_event", "rest_api_event", "rest_response",
           "result_to_http"]
