"""RouterFunction's HTTP API: the Open Inference Protocol over API Gateway HTTP API events.

``ENDPOINTS`` is the whole HTTP surface: (method, path pattern, operation). A path that matches
no endpoint is a 404 (never read as a model name), a known path with another method a 405.
Operations take their dependencies from the composition root (``tierserve.app``) and ask the
tier dispatcher, never its parts. Every error goes through ``tierserve.http.error_response``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from tierserve import errors, inference
from tierserve.app import Runtime, get_runtime
from tierserve.calls import Body
from tierserve.http import (
    HttpRequest,
    accepted_coding,
    decode_content,
    encode_content,
    error_response,
    parse_http_event,
    response,
)
from tierserve.manifest import ModelVersion
from tierserve.model_config import model_config, repository_index
from tierserve.observability import logger
from tierserve.tiering import readiness_of
from tierserve.wire import body_view, json_loads

SERVER_NAME = "tierserve"
SERVER_VERSION = "0.1.0"
#: The protocol extensions served, by Triton's names and in its order (docs/protocol/extension_*.md): the
#: repository index (load and unload are not served: the store is the repository, as in Triton's polling
#: modes, which also list model_repository), model config, binary tensors and statistics. Shared memory,
#: classification and sequences are refused, so they are not listed.
EXTENSIONS = ["model_repository", "model_configuration", "binary_tensor_data", "statistics"]
#: What model metadata reports as the platform: every variant is an ONNX model run by onnxruntime.
PLATFORM = "onnxruntime_onnx"

Operation = Callable[[Runtime, HttpRequest, dict[str, str], Any], dict[str, Any]]

_MODEL = r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?"


def _live(rt: Runtime, req: HttpRequest, params: dict[str, str], context: Any) -> dict[str, Any]:
    return response(200, {"live": True}, {"x-served-by": "cpu"})


def _ready(rt: Runtime, req: HttpRequest, params: dict[str, str], context: Any) -> dict[str, Any]:
    rt.store.manifest()  # ready means: the manifest is readable
    return response(200, {"ready": True}, {"x-served-by": "cpu"})


def _server_metadata(rt: Runtime, req: HttpRequest, params: dict[str, str], context: Any) -> dict[str, Any]:
    body = {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}
    return response(200, body, {"x-served-by": "cpu"})


def _model(rt: Runtime, params: dict[str, str]) -> ModelVersion:
    name, version = inference.resolve_name(rt, params["name"], params.get("version"))
    return rt.store.manifest().resolve(name, version)


def model_metadata(model: ModelVersion, versions: list[str]) -> dict[str, Any]:
    """KServe v2 model metadata."""
    return {
        "name": model.name,
        "versions": [str(v) for v in versions],
        "platform": PLATFORM,
        "inputs": [s.to_json() for s in model.inputs],
        "outputs": [s.to_json() for s in model.outputs],
    }


def _model_metadata(rt: Runtime, req: HttpRequest, params: dict[str, str], context: Any) -> dict[str, Any]:
    mv = _model(rt, params)
    versions = sorted(rt.store.manifest().models[mv.name].listed(), key=int)  # retired versions are not listed
    return response(200, model_metadata(mv, versions), {"x-served-by": "cpu"})


def _model_ready(rt: Runtime, req: HttpRequest, params: dict[str, str], context: Any) -> dict[str, Any]:
    mv = _model(rt, params)
    headers = {"x-served-by": "cpu" if mv.serves_cpu else "gpu"}
    problem = readiness_of(rt.dispatcher, mv)  # ready means: it loads and runs (cached), on some tier
    if problem is not None:
        exc = errors.BackendUnavailableError(f"model {mv.name!r} v{mv.version} is not ready: {problem.message}",
                                             retry_after_s=getattr(problem, "retry_after_s", None) or 5)
        exc.code = problem.code  # the tier's own reason survives (integrity_error, unsafe_model, ...)
        return error_response(exc, headers)
    return response(200, {"name": mv.name, "version": mv.version, "ready": True}, headers)


def _model_config(rt: Runtime, req: HttpRequest, params: dict[str, str], context: Any) -> dict[str, Any]:
    return response(200, model_config(_model(rt, params)), {"x-served-by": "cpu"})


def _stats(rt: Runtime, versions: list[tuple[str, str]]) -> dict[str, Any]:
    return response(200, rt.stats.to_triton(versions), {"x-served-by": "cpu"})


def _model_stats(rt: Runtime, req: HttpRequest, params: dict[str, str], context: Any) -> dict[str, Any]:
    mv = _model(rt, params)
    named = params.get("version")
    versions = [named] if named else sorted(rt.store.manifest().models[mv.name].listed(), key=int)
    return _stats(rt, [(mv.name, v) for v in versions])


def _all_stats(rt: Runtime, req: HttpRequest, params: dict[str, str], context: Any) -> dict[str, Any]:
    models = rt.store.manifest().models
    return _stats(rt, [(n, v) for n in sorted(models) for v in sorted(models[n].listed(), key=int)])


def _repository_index(rt: Runtime, req: HttpRequest, params: dict[str, str], context: Any) -> dict[str, Any]:
    raw = bytes(body_view(req.body)).strip()
    try:
        options = json_loads(raw) if raw else {}
    except ValueError as exc:
        raise errors.InvalidRequestError(f"the repository index request is not valid JSON: {exc}") from exc
    if not isinstance(options, dict) or not isinstance(options.get("ready", False), bool):
        raise errors.InvalidRequestError('the repository index request is {"ready": true|false} or empty')
    index = repository_index(rt.store.manifest(), rt.dispatcher.gpu is not None, options.get("ready", False),
                             getattr(rt.dispatcher, "index_readiness", None))  # the edge's: /ready's predicate
    return response(200, index, {"x-served-by": "cpu"})


def _infer(rt: Runtime, req: HttpRequest, params: dict[str, str], context: Any) -> dict[str, Any]:
    inference.resolve_name(rt, params["name"], params.get("version"))  # 404 before the body is looked at
    header_length = inference.header_length(req.header("inference-header-content-length"))
    coding = req.header("content-encoding")
    if coding and coding.strip().lower() != "identity":
        data = decode_content(body_view(req.body), coding, rt.settings.max_payload_bytes)
        body = Body(data, header_length)
    else:
        body = Body(req.body, header_length, req.event_text, req.is_base64)
    return inference.infer(rt, params["name"], params.get("version"), body, req.header("x-target"), context)


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
    base_headers = {"x-served-by": "cpu"}
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
