"""RouterFunction's HTTP API: the Open Inference Protocol over API Gateway HTTP API events.

``ENDPOINTS`` is the whole HTTP surface: (method, path pattern, operation). A path that matches
no endpoint is a 404 (never read as a model name), a known path with another method a 405.
Each operation is a thin adapter: it reads its parameters off the request and calls one operation of
the data plane (``tierserve.protocol.dataplane``: no HTTP there), then renders the answer. Every error goes
through ``tierserve.protocol.http_api.error_response`` (``tierserve.protocol.rendering``, the one error wrapper).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from tierserve import errors, inference
from tierserve.app import Runtime, get_runtime
from tierserve.observability import logger
from tierserve.protocol.calls import Body
from tierserve.protocol.dataplane import Answer, DataPlane
from tierserve.protocol.header import body_view, json_loads
from tierserve.protocol.http_api import (
    HttpRequest,
    accepted_coding,
    decode_content,
    encode_content,
    error_response,
    parse_http_event,
    response,
)
from tierserve.tiers import Tier

Operation = Callable[[Runtime, HttpRequest, dict[str, str], Any], dict[str, Any]]

_MODEL = r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?"


def _ok(answer: Answer) -> dict[str, Any]:
    return response(200, answer.document, answer.headers)


def _live(rt: Runtime, req: HttpRequest, params: dict[str, str], context: Any) -> dict[str, Any]:
    return _ok(DataPlane(rt).live())


def _ready(rt: Runtime, req: HttpRequest, params: dict[str, str], context: Any) -> dict[str, Any]:
    return _ok(DataPlane(rt).ready())


def _server_metadata(rt: Runtime, req: HttpRequest, params: dict[str, str], context: Any) -> dict[str, Any]:
    return _ok(DataPlane(rt).server_metadata())


def _model_metadata(rt: Runtime, req: HttpRequest, params: dict[str, str], context: Any) -> dict[str, Any]:
    return _ok(DataPlane(rt).model_metadata(params["name"], params.get("version")))


def _model_ready(rt: Runtime, req: HttpRequest, params: dict[str, str], context: Any) -> dict[str, Any]:
    return _ok(DataPlane(rt).model_ready(params["name"], params.get("version")))


def _model_config(rt: Runtime, req: HttpRequest, params: dict[str, str], context: Any) -> dict[str, Any]:
    return _ok(DataPlane(rt).model_config(params["name"], params.get("version")))


def _model_stats(rt: Runtime, req: HttpRequest, params: dict[str, str], context: Any) -> dict[str, Any]:
    return _ok(DataPlane(rt).statistics(params["name"], params.get("version")))


def _all_stats(rt: Runtime, req: HttpRequest, params: dict[str, str], context: Any) -> dict[str, Any]:
    return _ok(DataPlane(rt).statistics())


def _repository_index(rt: Runtime, req: HttpRequest, params: dict[str, str], context: Any) -> dict[str, Any]:
    raw = bytes(body_view(req.body)).strip()
    try:
        options = json_loads(raw) if raw else {}
    except ValueError as exc:
        raise errors.InvalidRequestError(f"the repository index request is not valid JSON: {exc}") from exc
    if not isinstance(options, dict) or not isinstance(options.get("ready", False), bool):
        raise errors.InvalidRequestError('the repository index request is {"ready": true|false} or empty')
    return _ok(DataPlane(rt).repository_index(options.get("ready", False)))


def _infer(rt: Runtime, req: HttpRequest, params: dict[str, str], context: Any) -> dict[str, Any]:
    plane = DataPlane(rt)
    plane.model(params["name"], params.get("version"))  # 404 before the body is looked at
    header_length = inference.header_length(req.header("inference-header-content-length"))
    coding = req.header("content-encoding")
    if coding and coding.strip().lower() != "identity":
        data = decode_content(body_view(req.body), coding, rt.settings.max_payload_bytes)
        body = Body(data, header_length)
    else:
        body = Body(req.body, header_length, req.event_text, req.is_base64)
    return plane.infer(params["name"], params.get("version"), body, req.header("x-target"), context)


#: The operations whose answers are compressed when the client accepts it: inference only, as in Triton
#: (its HTTP server compresses infer and generate responses, never metadata, config, statistics or the
#: index). tritonclient.http.aio turns aiohttp's decompression off but aiohttp still sends
#: Accept-Encoding: gzip, so a compressed config reached it as gzip bytes it tried to read as JSON.
COMPRESSED: frozenset[Operation] = frozenset({_infer})

#: (method, path pattern, operation): the only endpoints served; anything else is a 404.
ENDPOINTS: list[tuple[str, re.Pattern[str], Operation]] = [
    ("GET", re.compile(r"^/v2/health/live$"), _live),
    ("GET", re.compile(r"^/v2/health/ready$"), _ready),
    ("GET", re.compile(r"^/v2/?$"), _server_metadata),
    ("GET", re.compile(r"^/v2/models/stats$"), _all_stats),  # before the model routes: never a model name
    ("POST", re.compile(r"^/v2/repository/index$"), _repository_index),
    ("GET", re.compile(rf"^{_MODEL}/config$"), _model_config),
    ("GET", re.compile(rf"^{_MODEL}/stats$"), _model_stats),
    ("GET", re.compile(rf"^{_MODEL}/ready$"), _model_ready),
    ("POST", re.compile(rf"^{_MODEL}/infer$"), _infer),
    ("GET", re.compile(rf"^{_MODEL}/?$"), _model_metadata),
]


def endpoint(req: HttpRequest) -> tuple[Operation, dict[str, str]]:
    """The operation for a request's method and path; 404 / 405 otherwise."""
    path_matched = False
    for method, pattern, op in ENDPOINTS:
        m = pattern.fullmatch(req.path)
        if m is None:
            continue
        path_matched = True
        if method == req.method:
            return op, {k: v for k, v in m.groupdict().items() if v is not None}
    if path_matched:
        raise errors.MethodNotAllowedError(f"{req.method} is not allowed on {req.path}")
    raise errors.RouteNotFoundError(
        f"no route for {req.method} {req.path}; the Open Inference Protocol endpoints are under /v2"
    )


def handle_http(event: dict[str, Any], context: Any = None, runtime: Runtime | None = None) -> dict[str, Any]:
    """Serve one API Gateway HTTP API event (with the environment's runtime unless one is given); never raises."""
    return _answer(lambda rt: parse_http_event(event, rt.settings.max_payload_bytes), context, runtime)


def handle_request(req: HttpRequest, context: Any = None, runtime: Runtime | None = None) -> dict[str, Any]:
    """Serve one request parsed elsewhere (the edge runtime's HTTP server reads it off a socket, no event
    in between; it checks the body against MAX_PAYLOAD_BYTES before reading it); never raises."""
    return _answer(lambda rt: req, context, runtime)


def _answer(parse: Callable[[Runtime], HttpRequest], context: Any, runtime: Runtime | None) -> dict[str, Any]:
    base_headers = {"x-served-by": Tier.CPU.value}
    request_id = ""
    try:
        rt = runtime or get_runtime()
        req = parse(rt)
        request_id = req.request_id
        op, params = endpoint(req)
        resp = op(rt, req, params, context)
        coding = accepted_coding(req.header("accept-encoding")) if op in COMPRESSED else None
        if coding is not None and resp["statusCode"] == 200 and resp.get("body"):
            resp = encode_content(resp, coding)  # errors stay plain: clients read them before any decoding
        return resp
    except errors.TierserveError as exc:
        logger.info("request refused", extra={"error": exc.code, "detail": exc.message})
        return error_response(exc, base_headers, request_id)
    except Exception:
        logger.exception("unhandled error")
        return error_response(RuntimeError(), base_headers, request_id)
