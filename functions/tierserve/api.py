"""RouterFunction's HTTP API: the Open Inference Protocol over API Gateway HTTP API events.

``ENDPOINTS`` is the whole HTTP surface: (method, path pattern, operation). A path that matches
no endpoint is a 404 (never read as a model name), a known path with another method a 405.
Each operation is a thin adapter: it reads its parameters off the request and calls one operation of
the data plane (``tierserve.protocol.dataplane``: no HTTP there), then renders the answer. Every error goes
through ``tierserve.protocol.http_api.error_response`` (``tierserve.protocol.rendering``, the one error wrapper).

Generation (issue 17) adds OpenAI's routes (``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``,
``/v1/embeddings``; errors in OpenAI's shape, ``render_error(exc, "openai")``; and vLLM's ``GET /health``, issue
19) and Triton's generate extension
(``/v2/models/{m}[/versions/{v}]/generate[_stream]``). A streamed answer is a
:class:`~tierserve.streaming.response.StreamingResponse`: SSE (``text/event-stream``, never compressed), whose
``close`` sets the generation's cancelled flag, so a client that goes away stops it within one token. Three
entries, one per transport:

* :func:`handle_http`: API Gateway's HTTP API (payload 2.0), which buffers (29 s, 6 MB) and cannot stream:
  ``stream: true`` is a 400 that says so, and a generation that cannot finish within the integration timeout
  at the model's measured tokens/s is refused before any work with a 400 (stream, or ask for fewer tokens);
* :func:`handle_rest`: the streaming REST API (payload 1.0, ``ResponseTransferMode: STREAM``); under the
  streaming runtime loop every answer is a StreamingResponse (a buffered one is one chunk);
* :func:`handle_request`: a request parsed elsewhere (the edge's HTTP server, ``tierserve serve``), streams.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

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
    render_error,
    response,
)
from tierserve.streaming.response import StreamingResponse
from tierserve.tiers import Tier

if TYPE_CHECKING:
    from tierserve.generation.requests import GenerationRequest
    from tierserve.protocol.dataplane import Generation

#: What an operation answers: an HTTP API response, or (generation) a stream.
Answered = dict[str, Any] | StreamingResponse
Operation = Callable[[Runtime, HttpRequest, dict[str, str], Any], Answered]

_MODEL = r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?"


def _ok(answer: Answer) -> dict[str, Any]:
    return response(200, answer.document, answer.headers)


def _live(rt: Runtime, req: HttpRequest, params: dict[str, str], context: Any) -> dict[str, Any]:
    return _ok(DataPlane(rt).live())


def _ready(rt: Runtime, req: HttpRequest, params: dict[str, str], context: Any) -> dict[str, Any]:
    return _ok(DataPlane(rt).ready())


def _health(rt: Runtime, req: HttpRequest, params: dict[str, str], context: Any) -> dict[str, Any]:
    """vLLM's ``GET /health`` (the OpenAI surface's health check, which guidellm asks before a run): 200 with an
    empty body when the data plane is ready, else the readiness error's status."""
    DataPlane(rt).ready()
    return response(200, b"", {"content-type": "text/plain"})


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


# --- generation (issue 17) ---------------------------------------------------------------------------------

#: How the answer leaves this process: ``http-api`` (API Gateway's HTTP API: buffered, 29 s, no streaming),
#: ``rest`` (the streaming REST API, payload 1.0) or ``direct`` (the edge's HTTP server, ``tierserve serve``).
HTTP_API, REST, DIRECT = "http-api", "rest", "direct"
#: Seconds kept free of API Gateway's integration timeout when a buffered generation is estimated.
HTTP_API_MARGIN_S = 1.0
SSE_HEADERS = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache",
               "x-accel-buffering": "no"}


class _Transport(threading.local):
    kind = DIRECT
    streams = True
    cancelled: Callable[[], bool] | None = None
    #: Who is calling, as the gateway's authorizer said (an API key's caller, a JWT's subject); "" unknown.
    caller = ""


_transport = _Transport()


def _json(req: HttpRequest) -> Any:
    """The request body as JSON: a 400 naming what is wrong otherwise (OpenAI's shape on the /v1 routes)."""
    raw = bytes(body_view(req.body)).strip()
    if not raw:
        raise errors.InvalidParameterError("the request body is empty; send a JSON object", None, "invalid_json")
    try:
        return json_loads(raw)
    except ValueError as exc:
        raise errors.InvalidParameterError(f"the request body is not valid JSON: {exc}", None, "invalid_json") from exc


def _plane(rt: Runtime) -> DataPlane:
    """The data plane as this process answers: ``edge`` on a device (its dispatcher says so), else ``cpu``."""
    return DataPlane(rt, getattr(rt.dispatcher, "answered_by", Tier.CPU))


def _refuse_stream_on_http_api(param: str) -> None:
    if _transport.kind == HTTP_API:
        raise errors.InvalidParameterError(
            "API Gateway HTTP APIs cannot stream a response; send streamed requests to the streaming REST API's "
            "base URL (the stack's OpenAIBaseUrl output), or set stream to false", param, "streaming_unsupported")


def _check_http_api_budget(rt: Runtime, request: GenerationRequest) -> GenerationRequest:
    """On the buffered HTTP API, refuse (before any model runs) a generation that cannot finish within API
    Gateway's integration timeout at the model's measured speed; returns the prepared request."""
    from tierserve.generation import service
    from tierserve.limits import APIGW_INTEGRATION_TIMEOUT_S
    from tierserve.tiering import pick_version

    name, version = inference.resolve_name(rt, request.model, request.version)
    model = pick_version(rt.store.manifest(), name, version, request.request_id or None)
    if model.generation is None:
        return request  # DataPlane.generate says why (not a text-generation model)
    prepared = service.prepare(rt, model, request)
    assert prepared.prompt_ids is not None and prepared.params.max_tokens is not None
    tier = Tier.CPU if model.serves_cpu else Tier.GPU
    figures = model.generation.tiers.get(tier)
    if figures is None or figures.tokens_per_s <= 0:
        return prepared  # nothing measured to refuse it with: the function's deadline bounds it
    budget = APIGW_INTEGRATION_TIMEOUT_S - HTTP_API_MARGIN_S
    estimate = figures.ttft_at(len(prepared.prompt_ids)) / 1000 + prepared.params.max_tokens / figures.tokens_per_s
    if estimate > budget:
        fits = max(0, int((budget - figures.ttft_at(len(prepared.prompt_ids)) / 1000) * figures.tokens_per_s))
        param = "max_tokens" if request.kind != "triton" else "parameters.max_tokens"
        raise errors.InvalidParameterError(
            f"{prepared.params.max_tokens} tokens of {model.name!r} take about {estimate:.0f} s on the {tier} tier "
            f"({figures.tokens_per_s:g} tokens/s), longer than API Gateway's HTTP API waits "
            f"({APIGW_INTEGRATION_TIMEOUT_S:g} s), and an HTTP API cannot stream; send it with stream: true to "
            f"the streaming REST API's base URL (the stack's OpenAIBaseUrl output), or ask for at most {fits} "
            "tokens", param, "generation_too_long_for_http_api")
    return prepared


def _start(rt: Runtime, req: HttpRequest, request: GenerationRequest, context: Any
           ) -> tuple[Generation, threading.Event]:
    """Start a generation; errors before its first event raise (the adapter answers them with a status)."""
    request = replace(request, caller=request.caller or _transport.caller,
                      hint=request.hint if request.hint is not None else req.header("x-target"))
    if _transport.kind == HTTP_API:
        request = _check_http_api_budget(rt, request)
    stop = threading.Event()
    outer = _transport.cancelled

    def cancelled() -> bool:
        return stop.is_set() or (outer is not None and outer())

    return _plane(rt).generate(request, cancelled, context), stop


def _streamed(generation: Generation, stop: threading.Event, chunks: Iterator[bytes]) -> Answered:
    """An SSE answer: a StreamingResponse whose ``close`` stops the generation (the client went away), or,
    where the transport cannot stream (the REST API under the managed runtime), the same bytes buffered."""
    headers = {**SSE_HEADERS, **generation.headers}  # x-served-by: the first tier (x-fallback when moved)

    def close() -> None:
        stop.set()
        generation.close()

    if not _transport.streams:
        try:
            data = b"".join(chunks)
        finally:
            close()
        return response(200, data, headers)
    return StreamingResponse(200, headers, chunks, close)


def _buffered(generation: Generation, render: Callable[[Generation], Any]) -> dict[str, Any]:
    try:
        document = render(generation)
    finally:
        generation.close()
    return response(200, document, generation.headers)  # x-served-by: the tier that finished


def _openai_generate(rt: Runtime, req: HttpRequest, context: Any, chat: bool) -> Answered:
    from tierserve.generation import openai

    body = _json(req)
    request = openai.parse_chat(body, req.request_id) if chat else openai.parse_completion(body, req.request_id)
    if request.stream:
        _refuse_stream_on_http_api("stream")
    relay = _relay(rt, req, request.model, request.version)
    if relay is not None:
        return relay
    generation, stop = _start(rt, req, request, context)
    if request.stream:
        return _streamed(generation, stop, openai.stream(generation.request, generation))
    return _buffered(generation, lambda g: openai.completion_body(g.request, g))


def _chat(rt: Runtime, req: HttpRequest, params: dict[str, str], context: Any) -> Answered:
    return _openai_generate(rt, req, context, chat=True)


def _completions(rt: Runtime, req: HttpRequest, params: dict[str, str], context: Any) -> Answered:
    return _openai_generate(rt, req, context, chat=False)


def _triton_generate(rt: Runtime, req: HttpRequest, params: dict[str, str], context: Any, stream: bool) -> Answered:
    from tierserve.generation import triton_generate

    if stream:
        _refuse_stream_on_http_api("stream")
    plane = _plane(rt)
    plane.model(params["name"], params.get("version"))  # 404 before the body is looked at
    request = triton_generate.parse(_json(req), params["name"], params.get("version"), stream, req.request_id)
    if request.stream and not stream:
        _refuse_stream_on_http_api("stream")
    relay = _relay(rt, req, request.model, request.version)
    if relay is not None:
        return relay
    generation, stop = _start(rt, req, request, context)
    version = generation.model.version
    if request.stream:
        return _streamed(generation, stop, triton_generate.stream(generation.request, version, generation))
    return _buffered(generation, lambda g: triton_generate.answer(g.request, version, g))


def _generate(rt: Runtime, req: HttpRequest, params: dict[str, str], context: Any) -> Answered:
    return _triton_generate(rt, req, params, context, stream=False)


def _generate_stream(rt: Runtime, req: HttpRequest, params: dict[str, str], context: Any) -> Answered:
    return _triton_generate(rt, req, params, context, stream=True)


def _relay(rt: Runtime, req: HttpRequest, name: str, version: str | None) -> Answered | None:
    """A dispatcher that relays generation elsewhere as it came (the edge, for a model it does not run: the
    cloud's answer, its stream relayed) answers here; None when this process generates."""
    relay = getattr(rt.dispatcher, "relay_generation", None)
    if relay is None:
        return None
    model = _plane(rt).model(name, version)  # 404 here, in this transport's shape
    answer: Answered | None = relay(model, req, _transport.cancelled)
    return answer


def _models(rt: Runtime, req: HttpRequest, params: dict[str, str], context: Any) -> Answered:
    answer = DataPlane(rt).models_list()
    return response(200, answer.document, {"x-served-by": getattr(rt.dispatcher, "answered_by", Tier.CPU)})


def _embeddings(rt: Runtime, req: HttpRequest, params: dict[str, str], context: Any) -> Answered:
    from tierserve import embeddings

    request = embeddings.parse(_json(req))
    plane = _plane(rt)
    model = plane.model(request.model, request.version)
    body, output = embeddings.infer_body(model, request)
    resp = plane.infer(model.name, model.version, Body(body), req.header("x-target"), context)
    document = embeddings.answer(request, model, resp, output)
    return response(200, document, {"x-served-by": str((resp.get("headers") or {}).get("x-served-by") or Tier.CPU)})


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
    ("POST", re.compile(rf"^{_MODEL}/generate$"), _generate),
    ("POST", re.compile(rf"^{_MODEL}/generate_stream$"), _generate_stream),
    # OpenAI-compatible (issue 17): errors in OpenAI's shape (``OPENAI_PREFIX``)
    ("POST", re.compile(r"^/v1/chat/completions$"), _chat),
    ("POST", re.compile(r"^/v1/completions$"), _completions),
    ("GET", re.compile(r"^/v1/models$"), _models),
    ("POST", re.compile(r"^/v1/embeddings$"), _embeddings),
    ("GET", re.compile(r"^/health$"), _health),  # vLLM's OpenAI server's health check (issue 19: guidellm asks it)
]
#: Paths whose errors are rendered in OpenAI's shape (``render_error(exc, "openai")``).
OPENAI_PREFIX = "/v1/"


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


def _caller(event: dict[str, Any]) -> str:
    """Who is calling, for usage and budgets: an API key's caller, a JWT's ``sub``, else the IAM principal that
    signed the request (``usage.caller_of``: the same rule on both APIs)."""
    from tierserve.usage import ANONYMOUS, caller_of

    found = caller_of(event)
    return "" if found == ANONYMOUS else found


def handle_http(event: dict[str, Any], context: Any = None, runtime: Runtime | None = None) -> dict[str, Any]:
    """Serve one API Gateway HTTP API event (with the environment's runtime unless one is given); never raises.

    The HTTP API buffers and gives up after 29 s, so generation here never streams (``stream: true`` is a 400
    that points at the streaming REST API) and one that cannot finish in time is refused before any work."""
    answer = _answer(lambda rt: parse_http_event(event, rt.settings.max_payload_bytes), context, runtime,
                     HTTP_API, streams=False, caller=_caller(event) if isinstance(event, dict) else "")
    assert isinstance(answer, dict)  # nothing streams on the HTTP API
    return answer


def handle_request(req: HttpRequest, context: Any = None, runtime: Runtime | None = None,
                   cancelled: Callable[[], bool] | None = None) -> Answered:
    """Serve one request parsed elsewhere (the edge runtime's HTTP server reads it off a socket, no event
    in between; it checks the body against MAX_PAYLOAD_BYTES before reading it); never raises.

    A generation may answer with a :class:`StreamingResponse` (send its chunks as they come, call ``release``
    at the end or when the client goes away); ``cancelled`` tells a generation the client has gone."""
    return _answer(lambda rt: req, context, runtime, DIRECT, streams=True, cancelled=cancelled)


def handle_rest(event: dict[str, Any], context: Any = None, runtime: Runtime | None = None) -> Answered:
    """Serve one API Gateway REST API event (payload format 1.0: the streaming REST API that carries the OpenAI
    routes and the generate extension, ``ResponseTransferMode: STREAM``); never raises.

    Under the streaming runtime loop (``TIERSERVE_STREAMING_RUNTIME=1``) every answer is a StreamingResponse
    (a buffered one becomes one chunk: API Gateway reads every answer of a streamed integration as the
    HTTP-integration prelude and the body); under the managed runtime a stream is buffered into one body."""
    from tierserve.streaming.runtime_loop import STREAMING_RUNTIME_ENV

    streams = os.environ.get(STREAMING_RUNTIME_ENV) == "1"
    ctx = event.get("requestContext") if isinstance(event, dict) else None
    caller = _caller(event) if ctx is not None else ""
    answer = _answer(lambda rt: parse_rest_event(event, rt.settings.max_payload_bytes), context, runtime, REST,
                     streams=streams, caller=caller)
    if streams and isinstance(answer, dict):
        return as_stream(answer)
    return answer


def parse_rest_event(event: dict[str, Any], max_body_bytes: int) -> HttpRequest:
    """A REST API (payload format 1.0) proxy event as the request the endpoint table reads; 413 over the limit."""
    if not isinstance(event, dict) or "httpMethod" not in event or "requestContext" not in event:
        raise errors.InvalidRequestError(
            "event is not an API Gateway REST API (payload format 1.0) proxy event; generate one with "
            "`sam local generate-event apigateway aws-proxy`")
    ctx = event.get("requestContext") or {}
    headers = {str(k).lower(): str(v) for k, v in (event.get("headers") or {}).items()}
    for k, values in (event.get("multiValueHeaders") or {}).items():
        if isinstance(values, list) and values and str(k).lower() not in headers:
            headers[str(k).lower()] = ",".join(str(v) for v in values)
    converted = {
        "requestContext": {"requestId": ctx.get("requestId") or "",
                           "http": {"method": event.get("httpMethod"), "path": event.get("path") or "/"}},
        "rawPath": event.get("path") or "/", "headers": headers, "body": event.get("body") or "",
        "isBase64Encoded": bool(event.get("isBase64Encoded")),
        "queryStringParameters": event.get("queryStringParameters") or {},
    }
    return parse_http_event(converted, max_body_bytes)


def as_stream(resp: dict[str, Any]) -> StreamingResponse:
    """A buffered HTTP answer as a one-chunk StreamingResponse (its body decoded from the event's encoding)."""
    from tierserve.protocol.http_api import decode_body

    body = decode_body(resp)
    return StreamingResponse(int(resp["statusCode"]), dict(resp.get("headers") or {}), iter((body,) if body else ()))


def _answer(parse: Callable[[Runtime], HttpRequest], context: Any, runtime: Runtime | None, kind: str,
            streams: bool, cancelled: Callable[[], bool] | None = None, caller: str = "") -> Answered:
    base_headers = {"x-served-by": Tier.CPU.value}
    request_id = ""
    family = "oip"
    _transport.kind, _transport.streams, _transport.cancelled, _transport.caller = kind, streams, cancelled, caller
    try:
        rt = runtime or get_runtime()
        base_headers["x-served-by"] = str(getattr(rt.dispatcher, "answered_by", Tier.CPU))
        req = parse(rt)
        request_id = req.request_id
        family = "openai" if req.path.startswith(OPENAI_PREFIX) else "oip"
        op, params = endpoint(req)
        resp = op(rt, req, params, context)
        if isinstance(resp, StreamingResponse):
            return resp  # an event stream is never compressed
        coding = accepted_coding(req.header("accept-encoding")) if op in COMPRESSED else None
        if coding is not None and resp["statusCode"] == 200 and resp.get("body"):
            resp = encode_content(resp, coding)  # errors stay plain: clients read them before any decoding
        return resp
    except errors.TierserveError as exc:
        logger.info("request refused", extra={"error": exc.code, "detail": exc.message})
        return _error(exc, base_headers, request_id, family)
    except Exception:
        logger.exception("unhandled error")
        return _error(RuntimeError(), base_headers, request_id, family)
    finally:
        _transport.cancelled, _transport.caller = None, ""


def _error(exc: BaseException, headers: dict[str, str], request_id: str, family: str) -> dict[str, Any]:
    if family == "openai":
        answer = render_error(exc, "openai", headers, request_id)
        return response(answer.status, answer.document, answer.headers)
    return error_response(exc, headers, request_id)
