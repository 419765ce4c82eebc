"""The edge runtime's HTTP server: the Open Inference Protocol on a local port, plus health and metrics.

Every protocol request is served by the cloud's own endpoint table (``tierserve.api.handle_request``):
the same routes, codec, errors and limits. There is no API Gateway in front of a device, so this server
does what the gateway does for the cloud, and nothing more:

* a body over ``MAX_PAYLOAD_BYTES`` gets 413 from its Content-Length, before it is read;
* a bad Content-Length gets 400, a chunked body 411 (send Content-Length), both as protocol JSON;
* reads are bounded (``READ_TIMEOUT_S`` per socket operation), the listen backlog is real, and an
  unknown method gets the protocol's 405/404, never an HTML page;
* ``x-served-by`` is ``edge`` for what this device answered (inference, health, metadata, errors) and the
  cloud's own (``cpu`` / ``gpu``) for what it forwarded.

Two routes are the device's own: ``GET /metrics`` (Prometheus text) and ``GET /v2/health/edge`` (JSON:
sync state, versions held, hit and forward counts).
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qsl

from tierserve import errors
from tierserve.api import handle_request
from tierserve.app import Runtime
from tierserve.edge.dispatch import FORWARDED
from tierserve.edge.metrics import EdgeCounters
from tierserve.http import HttpRequest, error_response, payload_too_large
from tierserve.threaded_server import ThreadedServer

#: Per socket operation (request line, headers, body): a client that stalls is dropped.
READ_TIMEOUT_S = 30.0
_MODEL = re.compile(r"^/v2/models/([^/]+)")


class EdgeHttpServer(ThreadedServer):
    """Serves ``runtime`` (an edge Runtime) on ``host:port``; ``status()`` and ``metrics()`` feed its own routes."""

    thread_name = "edge-http"

    def __init__(self, runtime: Runtime, counters: EdgeCounters, status: Callable[[], dict[str, Any]],
                 metrics: Callable[[], str], host: str = "127.0.0.1", port: int = 8000,
                 after_request: Callable[[], None] | None = None) -> None:
        self.runtime = runtime
        self.counters = counters
        self.status = status
        self.metrics = metrics
        self.after_request = after_request
        self.host, self.port = host, port
        self.bind()  # the port is known (and taken) from here on

    def request_handler(self) -> type[BaseHTTPRequestHandler]:
        return _handler(self)

    # --- one request -----------------------------------------------------------------------------------

    def answer(self, method: str, target: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str],
                                                                                                 bytes]:
        """(status, headers, body) for one request whose body has been read."""
        path, _, raw_query = target.partition("?")
        if method == "GET" and path == "/metrics":
            return 200, {"content-type": "text/plain; version=0.0.4; charset=utf-8"}, self.metrics().encode()
        if method == "GET" and path == "/v2/health/edge":
            return 200, {"content-type": "application/json"}, json.dumps(self.status()).encode()
        query = dict(parse_qsl(raw_query, keep_blank_values=True))
        req = HttpRequest(method, path, headers, query, uuid.uuid4().hex[:16], _body=body)
        return _unpack(handle_request(req, None, self.runtime))


def _unpack(resp: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    raw = resp.get("body") or ""
    body = base64.b64decode(raw) if resp.get("isBase64Encoded") else str(raw).encode("utf-8")
    return int(resp["statusCode"]), {str(k).lower(): str(v) for k, v in (resp.get("headers") or {}).items()}, body


def _handler(server: EdgeHttpServer) -> type[BaseHTTPRequestHandler]:
    max_body = server.runtime.settings.max_payload_bytes

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "tierserve-edge"
        timeout = READ_TIMEOUT_S
        # Headers and body are separate writes: without TCP_NODELAY, Nagle and a delayed ACK add ~40 ms.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def __getattr__(self, name: str) -> Any:  # every method, known or not: the endpoint table answers
            if name.startswith("do_"):
                return self._serve
            raise AttributeError(name)

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            """Malformed request lines and headers: the protocol's JSON error, not an HTML page."""
            self.close_connection = True
            self._reply(code, {"content-type": "application/json"},
                        json.dumps({"error": message or explain or "bad request", "code": "invalid_request"}).encode())

        def _serve(self) -> None:
            FORWARDED.set(False)
            try:
                status, headers, body = self._route()
            except Exception:  # never a stack trace to a client
                import logging

                logging.getLogger("tierserve.edge").exception("edge request failed")
                status, headers, body = _unpack(error_response(RuntimeError()))
            served_by = headers.get("x-served-by", "edge") if FORWARDED.get() else "edge"
            headers["x-served-by"] = served_by
            m = _MODEL.match(self.path)
            server.counters.request(m.group(1) if m else "-", served_by, "http", status)
            self._reply(status, headers, body)
            if server.after_request is not None:
                server.after_request()

        def _route(self) -> tuple[int, dict[str, str], bytes]:
            if (self.headers.get("Transfer-Encoding") or "identity").lower() != "identity":
                self.close_connection = True
                return 411, {"content-type": "application/json"}, json.dumps(
                    {"error": "chunked request bodies are not accepted; send the body with a Content-Length",
                     "code": "length_required"}).encode()
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if length < 0:
                    raise ValueError
            except ValueError:
                self.close_connection = True
                return _unpack(error_response(errors.InvalidRequestError(
                    f"Content-Length {self.headers.get('Content-Length')!r} is not a byte count")))
            if length > max_body:
                self.close_connection = True  # the body is never read
                return _unpack(error_response(payload_too_large(length, max_body)))
            body = self.rfile.read(length) if length else b""
            if len(body) < length:
                self.close_connection = True
                return _unpack(error_response(errors.InvalidRequestError(
                    f"the body ended after {len(body)} of {length} bytes")))
            headers: dict[str, str] = {}
            for k, v in self.headers.items():
                key = k.lower()
                headers[key] = f"{headers[key]},{v}" if key in headers else v
            return server.answer(self.command, self.path, headers, body)

        def _reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
            self.send_response(status)
            for k, v in headers.items():
                if k not in ("content-length", "connection", "transfer-encoding", "date", "server"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if getattr(self, "command", None) != "HEAD":
                self.wfile.write(body)

    return Handler
