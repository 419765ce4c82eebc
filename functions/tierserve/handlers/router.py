"""RouterFunction: the Open Inference Protocol API behind API Gateway's HTTP API, and the OpenAI routes and
Triton's generate extension behind the streaming REST API (issue 17).

Thin by design: Powertools decorators, then one call into the shared runtime. Which API sent the event
decides two things:

* **the entry point**: an HTTP API event (payload format 2.0) goes to ``api.handle_http``; a REST API event
  (format 1.0: ``httpMethod``, ``resource``) to ``api.handle_rest``, which may answer with a
  :class:`~tierserve.streaming.response.StreamingResponse`. Only the streaming runtime loop
  (``AWS_LAMBDA_EXEC_WRAPPER``, ``TIERSERVE_STREAMING_RUNTIME=1``) can send one as a stream; elsewhere (the
  managed runtime, ``tierserve invoke`` without the loop) it is collected into one buffered answer;
* **the request's time limit**: the context the runtime sees is capped at what the API waits for. An HTTP
  API ends the integration at 30 s, so an HTTP API request gets ``HTTP_API_LIMIT_S`` (29 s), even though the
  function's timeout (900 s, for the streams) is longer; a REST streaming request gets the REST API's 15
  minutes (``REST_STREAM_LIMIT_S``), within the function's own timeout.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.typing import LambdaContext

from tierserve import api
from tierserve.api import handle_http
from tierserve.observability import logger, metrics, tracer
from tierserve.streaming.response import StreamingResponse

#: An HTTP API integration ends at 30 s (API Gateway's quota): the router answers within 29.
HTTP_API_LIMIT_S = 29.0
#: A REST API with ResponseTransferMode STREAM streams for 15 minutes at most.
REST_STREAM_LIMIT_S = 900.0
STREAMING_RUNTIME_ENV = "TIERSERVE_STREAMING_RUNTIME"


class CappedContext:
    """A Lambda context whose remaining time is at most ``cap_s`` from now (every other attribute is the
    wrapped context's), so that every deadline derived from it (``tiering.Deadline.from_context``) ends
    before the API gives up on the request."""

    def __init__(self, context: Any, cap_s: float, clock: Any = time.monotonic) -> None:
        self._context = context
        self._clock = clock
        self._until = clock() + cap_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def get_remaining_time_in_millis(self) -> int:
        capped = max(0, int((self._until - self._clock()) * 1000))
        inner = getattr(self._context, "get_remaining_time_in_millis", None)
        return capped if inner is None else min(capped, int(inner()))


def is_rest_event(event: Any) -> bool:
    """A REST API (payload format 1.0) proxy event, as opposed to an HTTP API (2.0) one."""
    return isinstance(event, dict) and event.get("version") != "2.0" and "httpMethod" in event


def limit_for(event: Any) -> float:
    """The seconds the API that sent ``event`` waits for the answer."""
    return REST_STREAM_LIMIT_S if is_rest_event(event) else HTTP_API_LIMIT_S


def buffered(result: StreamingResponse) -> dict[str, Any]:
    """A streamed answer collected into one API Gateway response (where nothing can stream)."""
    try:
        body = b"".join(bytes(c) if not isinstance(c, str) else c.encode() for c in result.chunks)
    finally:
        result.release()
    headers = {str(k): str(v) for k, v in result.headers.items()}
    try:
        text, b64 = body.decode("utf-8"), False
    except UnicodeDecodeError:
        import base64

        text, b64 = base64.b64encode(body).decode(), True
    out: dict[str, Any] = {"statusCode": int(result.status), "headers": headers, "body": text,
                           "isBase64Encoded": b64}
    if result.cookies:
        out["multiValueHeaders"] = {"Set-Cookie": list(result.cookies)}
    return out


def _no_rest_entry(event: dict[str, Any]) -> dict[str, Any]:
    doc = {"error": {"message": f"no route for {event.get('httpMethod')} {event.get('path')} on this router "
                                "(it serves the REST API's routes only with tierserve.api.handle_rest)",
                     "type": "invalid_request_error", "param": None, "code": "route_not_found"}}
    return {"statusCode": 404, "headers": {"content-type": "application/json"}, "body": json.dumps(doc),
            "isBase64Encoded": False}


def route(event: dict[str, Any], context: Any) -> dict[str, Any] | StreamingResponse:
    """The API's event to its entry point, with the context capped at the API's time limit."""
    capped = CappedContext(context, limit_for(event))
    if not is_rest_event(event):
        return handle_http(event, capped)
    handle_rest = getattr(api, "handle_rest", None)
    if handle_rest is None:
        return _no_rest_entry(event)
    result = handle_rest(event, capped)
    if isinstance(result, StreamingResponse) and os.environ.get(STREAMING_RUNTIME_ENV) != "1":
        return buffered(result)
    return result  # type: ignore[no-any-return]


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_HTTP, log_event=False)
@tracer.capture_lambda_handler(capture_response=False)
@metrics.log_metrics(capture_cold_start_metric=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any] | StreamingResponse:
    return route(event, context)
