"""The edge runtime's HTTP server: the Open Inference Protocol on a local port, plus health and metrics.

Every protocol request is served by the cloud's own endpoint table (``tierserve.api.handle_request``):
the same routes, codec, errors and limits. There is no API Gateway in front of a device, so this server
does what the gateway does for the cloud, and nothing more. The HTTP is ``tierserve.httpserver`` (h11 on
one asyncio loop, handlers on a bounded pool), as for the local emulators:

* a body over ``MAX_PAYLOAD_BYTES`` gets 413 from its Content-Length, before it is read; chunked bodies are
  decoded (and refused past the same limit); a POST without a body is an empty body;
* the request line and headers must arrive within ``LIMITS.header_timeout_s`` (10 s) and the body within
  ``LIMITS.body_timeout_s`` (30 s), whatever the pace (408); at most ``LIMITS.max_connections`` connections
  are open (a device faces a local network: a slow or flooding client costs a coroutine, not a thread);
* bad framing (two Content-Lengths, a request line over 64 KiB, HTTP/0.9, HTTP/2, ``HTTP/9.9``) gets an
  HTTP/1.1 status line and the protocol's JSON; any method reaches the endpoint table, whose 405 names
  the route's methods in ``Allow``;
* ``x-served-by`` is ``edge`` for what this device answered (inference, health, metadata, errors) and the
  cloud's own (``cpu`` / ``gpu``) for what it forwarded.

Two routes are the device's own: ``GET /metrics`` (Prometheus text) and ``GET /v2/health/edge`` (JSON:
sync state, versions held, hit and forward counts).

Generation (issue 17): the OpenAI routes and Triton's generate extension are the endpoint table's too; a streamed
answer (a :class:`~tierserve.streaming.response.StreamingResponse`) is sent chunked, each SSE event flushed as it
is produced, never compressed. The server reads the connection while it streams: a client that goes away sets
``Request.disconnected``, which the generation checks before every token (``handle_request``'s ``cancelled``), and
the stream is released (its slot and KV memory freed; a stream relayed from the cloud drops its connection).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qsl

from tierserve.api import handle_request
from tierserve.app import Runtime
from tierserve.edge.dispatch import FORWARDED
from tierserve.edge.metrics import EdgeCounters
from tierserve.httpserver import HttpError, HttpServer, Limits, Request, Response
from tierserve.protocol.http_api import HttpRequest, error_response
from tierserve.streaming.response import StreamingResponse

#: The deadlines and bounds of the device's HTTP (the body limit comes from the runtime's settings).
LIMITS = Limits(header_timeout_s=10.0, body_timeout_s=30.0, max_connections=512, workers=16)
_MODEL = re.compile(r"^/v2/models/([^/]+)")
log = logging.getLogger("tierserve.edge")


class EdgeHttpServer(HttpServer):
    """Serves ``runtime`` (an edge Runtime) on ``host:port``; ``status()`` and ``metrics()`` feed its own routes."""

    thread_name = "edge-http"
    server_name = "tierserve-edge"
    allowed_methods = None  # every method reaches the endpoint table (404 / 405 with Allow)

    def __init__(self, runtime: Runtime, counters: EdgeCounters, status: Callable[[], dict[str, Any]],
                 metrics: Callable[[], str], host: str = "127.0.0.1", port: int = 8000,
                 after_request: Callable[[], None] | None = None, limits: Limits | None = None) -> None:
        self.runtime = runtime
        self.counters = counters
        self.status = status
        self.metrics = metrics
        self.after_request = after_request
        self.limits = dataclasses.replace(limits or LIMITS, max_body_bytes=runtime.settings.max_payload_bytes)
        self.host, self.port = host, port
        self.bind()  # the port is known (and taken) from here on

    # --- one request -----------------------------------------------------------------------------------

    def handle(self, request: Request) -> Response:
        FORWARDED.set(False)
        body: bytes | Iterator[bytes]
        try:
            status, headers, body = self.answer(request.method, request.target, request.header_map(), request.body,
                                                request.disconnected.is_set)
        except Exception:  # never a stack trace to a client
            log.exception("edge request failed")
            status, headers, body = _unpack(error_response(RuntimeError()))
        served_by = headers.get("x-served-by", "edge") if FORWARDED.get() else "edge"
        headers["x-served-by"] = served_by
        self._count(request.path, served_by, status)
        if self.after_request is not None:
            self.after_request()
        return Response(status, list(headers.items()), body)

    def error_response(self, error: HttpError) -> Response:
        """The server's own errors (framing, deadlines, limits): the protocol's JSON, answered by the edge."""
        self._count("-", "edge", error.status)
        body = json.dumps({"error": error.message, "code": error.code}).encode()
        return Response(error.status, [("content-type", "application/json"), ("x-served-by", "edge"),
                                       *error.headers], body)

    def _count(self, path: str, served_by: str, status: int) -> None:
        m = _MODEL.match(path)
        self.counters.request(m.group(1) if m else "-", served_by, "http", status)

    def answer(self, method: str, target: str, headers: dict[str, str], body: bytes,
               disconnected: Callable[[], bool] | None = None) -> tuple[int, dict[str, str], bytes | Iterator[bytes]]:
        """(status, headers, body) for one request whose body has been read; a streamed answer's body is an
        iterator of chunks (closing it releases the stream). ``disconnected`` says the client went away."""
        path, _, raw_query = target.partition("?")
        if method == "GET" and path == "/metrics":
            return 200, {"content-type": "text/plain; version=0.0.4; charset=utf-8"}, self.metrics().encode()
        if method == "GET" and path == "/v2/health/edge":
            return 200, {"content-type": "application/json"}, json.dumps(self.status()).encode()
        query = dict(parse_qsl(raw_query, keep_blank_values=True))
        req = HttpRequest(method, path, headers, query, uuid.uuid4().hex[:16], _body=body)
        answered = handle_request(req, None, self.runtime, cancelled=disconnected)
        if isinstance(answered, StreamingResponse):
            out = {str(k).lower(): str(v) for k, v in answered.headers.items()}
            return answered.status, out, _chunks(answered)
        return _unpack(answered)


def _chunks(stream: StreamingResponse) -> Iterator[bytes]:
    """A stream's chunks; closed (the client went away) or ended, the stream is released."""
    try:
        yield from stream.chunks
    finally:
        stream.release()


def _unpack(resp: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    raw = resp.get("body") or ""
    body = base64.b64decode(raw) if resp.get("isBase64Encoded") else str(raw).encode("utf-8")
    return int(resp["statusCode"]), {str(k).lower(): str(v) for k, v in (resp.get("headers") or {}).items()}, body
