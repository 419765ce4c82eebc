"""The Open Inference Protocol service behind RouterFunction and CpuInferenceFunction.

``handle_http`` serves API Gateway HTTP API events (the router); ``handle_direct`` serves the
router's Invoke payload (the CPU function). Both build their dependencies once per execution
environment (``get_app``) and return HTTP API v2 responses; every error goes through
``tierserve.http.error_response``.
"""

from __future__ import annotations

import base64
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tierserve import errors
from tierserve.breaker import CircuitBreaker, HealthCache
from tierserve.http import HttpRequest, error_response, parse_http_event, response
from tierserve.manifest import ModelVersion, check_model_name, check_version
from tierserve.observability import MetricUnit, logger, metrics
from tierserve.router import Router, pick_version
from tierserve.routing import get_policy
from tierserve.settings import Settings, get_settings
from tierserve.store import ModelStore

SERVER_NAME = "tierserve"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data"]

_MODEL = r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?"
#: (method, path pattern, operation). The only routes served; anything else is a 404.
ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("GET", re.compile(r"^/v2/health/live$"), "live"),
    ("GET", re.compile(r"^/v2/health/ready$"), "ready"),
    ("GET", re.compile(r"^/v2/?$"), "server_metadata"),
    ("GET", re.compile(rf"^{_MODEL}/ready$"), "model_ready"),
    ("POST", re.compile(rf"^{_MODEL}/infer$"), "infer"),
    ("GET", re.compile(rf"^{_MODEL}/?$"), "model_metadata"),
]


@dataclass
class App:
    settings: Settings
    store: ModelStore
    router: Router


def build_app(settings: Settings) -> App:
    from tierserve.backends.onnx import OnnxBackend

    store = ModelStore(settings.model_store_uri, settings.model_cache_dir, settings.manifest_ttl_s)
    cpu: Any
    if settings.cpu_backend == "lambda":
        from tierserve.backends.lambda_invoke import LambdaInvokeBackend

        cpu = LambdaInvokeBackend(settings.cpu_function_name)
    else:
        cpu = OnnxBackend(store, settings)
    gpu = None
    if settings.triton_url:
        from tierserve.backends.triton import TritonBackend

        gpu = TritonBackend(settings.triton_url, settings.triton_protocol, settings.triton_timeout_s)
    router = Router(
        cpu=cpu, gpu=gpu, policy=get_policy(settings.routing_policy),
        breaker=CircuitBreaker(settings.breaker_failure_threshold, settings.breaker_cooldown_s,
                               settings.breaker_success_threshold),
        health=HealthCache(settings.health_ttl_s), gpu_timeout_s=settings.triton_timeout_s,
    )
    return App(settings, store, router)


_app: App | None = None
_app_lock = threading.Lock()


def get_app() -> App:
    """The execution environment's App: built on the first invocation, reused while warm."""
    global _app
    if _app is None:
        with _app_lock:
            if _app is None:
                _app = build_app(get_settings())
    return _app


def reset_app() -> None:
    global _app
    _app = None


def _remaining_ms(context: Any) -> float | None:
    fn: Callable[[], int] | None = getattr(context, "get_remaining_time_in_millis", None)
    return float(fn()) if fn else None


# --- the router's HTTP entry point ---------------------------------------------------------------


def handle_http(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """Serve one API Gateway HTTP API event; never raises."""
    base_headers = {"x-served-by": "cpu"}
    request_id = ""
    try:
        app = get_app()
        req = parse_http_event(event, app.settings.max_payload_bytes)
        request_id = req.request_id
        op, params = _match(req)
        return _OPERATIONS[op](app, req, params, context)
    except errors.TierserveError as exc:
        logger.info("request refused", extra={"error": exc.code, "detail": exc.message})
        return error_response(exc, base_headers, request_id)
    except Exception:
        logger.exception("unhandled error")
        return error_response(RuntimeError(), base_headers, request_id)


def _match(req: HttpRequest) -> tuple[str, dict[str, str]]:
    path_matched = False
    for method, pattern, op in ROUTES:
        m = pattern.match(req.path)
        if m is None:
            continue
        path_matched = True
        if method == req.method:
            return op, {k: v for k, v in m.groupdict().items() if v is not None}
    if path_matched:
        raise errors.MethodNotAllowedError(f"{req.method} is not allowed on {req.path}")
    raise errors.RouteNotFoundError(
        f"no route for {req.method} {req.path}; the Open Inference Protocol routes are under /v2"
    )


def _model(app: App, params: dict[str, str], request_id: str | None = None) -> ModelVersion:
    name = check_model_name(params["name"])
    version = params.get("version")
    if version is not None:
        check_version(version)
    return pick_version(app.store.manifest(), name, version, request_id)


def _live(app: App, req: HttpRequest, params: dict[str, str], context: Any) -> dict[str, Any]:
    return response(200, {"live": True}, {"x-served-by": "cpu"})


def _ready(app: App, req: HttpRequest, params: dict[str, str], context: Any) -> dict[str, Any]:
    app.store.manifest()  # ready means: the manifest is readable
    return response(200, {"ready": True}, {"x-served-by": "cpu"})


def _server_metadata(app: App, req: HttpRequest, params: dict[str, str], context: Any) -> dict[str, Any]:
    body = {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}
    return response(200, body, {"x-served-by": "cpu"})


def _model_metadata(app: App, req: HttpRequest, params: dict[str, str], context: Any) -> dict[str, Any]:
    from tierserve.codec import model_metadata

    mv = _model(app, params)
    versions = sorted(app.store.manifest().models[mv.name].versions, key=int)
    return response(200, model_metadata(mv, versions), {"x-served-by": "cpu"})


def _model_ready(app: App, req: HttpRequest, params: dict[str, str], context: Any) -> dict[str, Any]:
    mv = _model(app, params)
    ready = (mv.serves_cpu and app.router.cpu.ready(mv)) or app.router.gpu_usable(mv)
    headers = {"x-served-by": "gpu" if not mv.serves_cpu else "cpu"}
    body = {"name": mv.name, "version": mv.version, "ready": bool(ready)}
    if not ready:
        return error_response(errors.BackendUnavailableError(f"model {mv.name!r} v{mv.version} is not ready",
                                                             retry_after_s=5), headers)
    return response(200, body, headers)


def _infer(app: App, req: HttpRequest, params: dict[str, str], context: Any) -> dict[str, Any]:
    from tierserve.codec import decode_request, encode_response, validate_request

    length = req.header("inference-header-content-length")
    try:
        header_length = int(length) if length is not None else None
    except ValueError:
        raise errors.InvalidRequestError(
            f"Inference-Header-Content-Length must be an integer, got {length!r}"
        ) from None
    request = decode_request(req.body, header_length)
    model = _model(app, params, request.id)
    validate_request(request, model)
    routed = app.router.infer(model, request, len(req.body), req.header("x-target"), _remaining_ms(context))
    body, headers = encode_response(routed.response, request)
    headers["x-served-by"] = routed.served_by
    if routed.fallback:
        headers["x-fallback"] = routed.fallback
    _record(model, routed.served_by, routed.fallback, routed.latency_ms, app.router.breaker.state, request.rows)
    logger.info("routed", extra={"model": model.name, "version": model.version, "target": routed.served_by,
                                 "reason": routed.decision.reason, "rows": request.rows,
                                 "fallback": routed.fallback, "latency_ms": round(routed.latency_ms, 3)})
    return response(200, body, headers)


_OPERATIONS: dict[str, Callable[[App, HttpRequest, dict[str, str], Any], dict[str, Any]]] = {
    "live": _live,
    "ready": _ready,
    "server_metadata": _server_metadata,
    "model_metadata": _model_metadata,
    "model_ready": _model_ready,
    "infer": _infer,
}


def _record(model: ModelVersion, target: str, fallback: str | None, latency_ms: float,
            circuit: str, rows: int) -> None:
    metrics.add_dimension("model", model.name)
    metrics.add_dimension("target", target)
    metrics.add_metric("InferenceLatency", MetricUnit.Milliseconds, latency_ms)
    metrics.add_metric("Requests", MetricUnit.Count, 1)
    metrics.add_metric("Rows", MetricUnit.Count, rows)
    if fallback:
        metrics.add_metric("Fallbacks", MetricUnit.Count, 1)
    metrics.add_metadata("circuit_state", circuit)
    metrics.add_metadata("model_version", model.version)


# --- the CPU function's direct entry point -------------------------------------------------------


def handle_direct(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """Serve the router's Invoke payload on this function's onnxruntime; never raises.

    Payload: {"model_name", "model_version"?, and either "inference_request" (a protocol JSON
    request object) or "body_base64" + "inference_header_content_length" (binary extension)}.
    """
    try:
        app = get_app()
        return _direct(app, event)
    except errors.TierserveError as exc:
        return error_response(exc, {"x-served-by": "cpu"})
    except Exception:
        logger.exception("unhandled error")
        return error_response(RuntimeError(), {"x-served-by": "cpu"})


def _direct(app: App, event: dict[str, Any]) -> dict[str, Any]:
    import json

    from tierserve.backends.onnx import OnnxBackend
    from tierserve.codec import decode_request, encode_response, validate_request

    if not isinstance(event, dict) or "model_name" not in event:
        raise errors.InvalidRequestError(
            "CpuInferenceFunction expects {'model_name', 'model_version'?, 'inference_request' | 'body_base64'}; "
            "see events/cpu_direct_infer.json"
        )
    if "body_base64" in event:
        raw = event["body_base64"] or ""
        if len(raw) * 3 // 4 > app.settings.max_payload_bytes:
            raise errors.PayloadTooLargeError(f"payload over {app.settings.max_payload_bytes} bytes")
        try:
            body = base64.b64decode(raw, validate=True)
        except ValueError as exc:
            raise errors.InvalidRequestError(f"body_base64 is not valid base64: {exc}") from exc
        hl = event.get("inference_header_content_length")
        request = decode_request(body, int(hl) if hl is not None else None)
    elif isinstance(event.get("inference_request"), dict):
        body = json.dumps(event["inference_request"]).encode()
        if len(body) > app.settings.max_payload_bytes:
            raise errors.PayloadTooLargeError(f"payload over {app.settings.max_payload_bytes} bytes")
        request = decode_request(body, None)
    else:
        raise errors.InvalidRequestError("payload needs 'inference_request' (object) or 'body_base64' (string)")
    version = event.get("model_version")
    model = app.store.manifest().resolve(check_model_name(str(event["model_name"])),
                                         check_version(str(version)) if version else None)
    validate_request(request, model)
    backend = app.router.cpu if isinstance(app.router.cpu, OnnxBackend) else OnnxBackend(app.store, app.settings)
    start = time.perf_counter()
    resp = backend.infer(model, request)
    latency_ms = (time.perf_counter() - start) * 1000
    body_out, headers = encode_response(resp, request)
    headers["x-served-by"] = "cpu"
    _record(model, "cpu", None, latency_ms, "n/a", request.rows)
    return response(200, body_out, headers)
