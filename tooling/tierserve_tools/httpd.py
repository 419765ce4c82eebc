"""The local emulation's HTTP server, robust to clients that misbehave (the API and the Invoke endpoint).

Users run ``tierserve serve`` on their machines and point arbitrary clients, fuzzers and load
generators at it, so the standard library's ``BaseHTTPRequestHandler`` is not enough as it is:

* **Time.** A connection may idle for ``idle_timeout_s`` between requests; once a request line has
  arrived, its headers must complete within ``header_timeout_s`` and its body within
  ``body_timeout_s`` (each read also waits at most what is left). A ``Content-Length`` larger than
  the body, or a client that stops sending, costs one thread for seconds, not forever.
* **Bodies.** ``Content-Length`` must be one non-negative integer (400), a body is required to have
  a length (411, unless it is chunked: chunked bodies are decoded), and a body over ``max_body_bytes``
  is refused before it is read (413).
* **Methods.** One outside ``allowed_methods`` (``TRACE``, ``CONNECT``, made-up ones) is a 405 with
  ``Allow``.
* **Errors.** Every error is the serving API's JSON (``error_body``), never the standard library's
  HTML page, and never a stack trace: an exception in a handler is logged here and answered 500.
* **Bursts.** The listen backlog is 128, not the standard library's 5.
"""

from __future__ import annotations

import json
import logging
import time
from http.server import BaseHTTPRequestHandler
from typing import Any

log = logging.getLogger("tierserve_tools")

STANDARD_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")
_CHUNK = 1 << 16


_CODES = {414: "uri_too_long", 431: "headers_too_large", 505: "http_version_not_supported"}


class HttpError(Exception):
    """An HTTP error to answer (and, with ``close``, the connection to close after it)."""

    def __init__(self, status: int, code: str, message: str, close: bool = False,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.close = status, code, message, close
        self.headers = headers or {}


class _DeadlineReader:
    """The connection's reader, where every read waits at most what is left of the handler's deadline."""

    def __init__(self, raw: Any, handler: RobustHandler) -> None:
        self._raw = raw
        self._handler = handler

    def _arm(self) -> None:
        left = self._handler.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the client took too long")
        self._handler.connection.settimeout(left)

    def readline(self, limit: int = -1) -> bytes:
        self._arm()
        return self._raw.readline(limit)

    def read(self, n: int = -1) -> bytes:
        self._arm()
        return self._raw.read(n)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class RobustHandler(BaseHTTPRequestHandler):
    """Subclasses implement ``serve()`` (read the body with ``read_body()``) and may override ``error_body``."""

    protocol_version = "HTTP/1.1"
    # Headers and body are separate writes: without TCP_NODELAY, Nagle + the client's delayed ACK
    # stall each small response by ~40 ms.
    disable_nagle_algorithm = True
    idle_timeout_s = 60.0
    header_timeout_s = 10.0
    body_timeout_s = 30.0
    write_timeout_s = 30.0
    max_body_bytes = 10 * 1024 * 1024
    allowed_methods: tuple[str, ...] = STANDARD_METHODS
    deadline = 0.0

    def setup(self) -> None:
        super().setup()
        self.rfile = _DeadlineReader(self.rfile, self)  # type: ignore[assignment]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # --- one request -----------------------------------------------------------------------------------

    def handle_one_request(self) -> None:
        try:
            self.deadline = time.monotonic() + self.idle_timeout_s
            self.raw_requestline = self.rfile.readline(65537)
            if not self.raw_requestline:
                self.close_connection = True
                return
            self.deadline = time.monotonic() + self.header_timeout_s
            if len(self.raw_requestline) > 65536:
                raise HttpError(414, "uri_too_long", "the request line is over 65,536 bytes", close=True)
            if not self.parse_request():  # answered through send_error below
                return
            self.connection.settimeout(self.write_timeout_s)
            if self.command not in self.allowed_methods:
                raise HttpError(405, "method_not_allowed",
                                f"{self.command} is not allowed; use one of {', '.join(self.allowed_methods)}",
                                headers={"Allow": ", ".join(self.allowed_methods)})
            self.serve()
            self.wfile.flush()
        except HttpError as exc:
            self._answer_error(exc)
        except TimeoutError:
            self._answer_error(HttpError(408, "request_timeout", "the client took too long to send its request",
                                         close=True))
        except (ConnectionError, BrokenPipeError):
            self.close_connection = True
        except Exception:
            log.exception("local HTTP handler failed on %s %s", getattr(self, "command", "?"),
                          getattr(self, "path", "?"))
            self._answer_error(HttpError(500, "internal_error", "internal error; see the server's log", close=True))

    def serve(self) -> None:  # pragma: no cover - subclasses implement it
        raise NotImplementedError

    # --- bodies --------------------------------------------------------------------------------------------

    def read_body(self) -> bytes:
        """The request's body: by Content-Length, or chunked; 400 / 411 / 413 / 408 as ``HttpError``."""
        self.deadline = time.monotonic() + self.body_timeout_s
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return self._read_chunked()
        values = self.headers.get_all("Content-Length") or []
        if not values:
            if self.command in ("POST", "PUT", "PATCH"):
                raise HttpError(411, "length_required", "a request body needs a Content-Length header "
                                "(or Transfer-Encoding: chunked)", close=True)
            return b""
        if len(set(values)) > 1:
            raise HttpError(400, "invalid_request", f"conflicting Content-Length headers {values}", close=True)
        try:
            length = int(values[0])
        except ValueError:
            raise HttpError(400, "invalid_request", f"Content-Length must be an integer, got {values[0]!r}",
                            close=True) from None
        if length < 0:
            raise HttpError(400, "invalid_request", f"Content-Length must not be negative, got {length}", close=True)
        if length > self.max_body_bytes:
            raise HttpError(413, "payload_too_large", f"the body is {length} bytes; the limit is "
                            f"{self.max_body_bytes} bytes", close=True)
        body = self._read_exactly(length)
        self.connection.settimeout(self.write_timeout_s)  # the answer may take longer to write than what was left
        return body

    def _read_exactly(self, n: int) -> bytes:
        parts: list[bytes] = []
        left = n
        while left:
            chunk = self.rfile.read(min(left, _CHUNK))
            if not chunk:
                raise HttpError(400, "invalid_request", f"the body ended after {n - left} of the {n} bytes its "
                                "Content-Length announced", close=True)
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)

    def _read_chunked(self) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1026)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise HttpError(400, "invalid_request", "malformed chunked body (bad chunk size line)",
                                close=True) from None
            if size < 0:
                raise HttpError(400, "invalid_request", "malformed chunked body (negative chunk size)", close=True)
            if size == 0:
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                self.connection.settimeout(self.write_timeout_s)
                return b"".join(parts)
            total += size
            if total > self.max_body_bytes:
                raise HttpError(413, "payload_too_large", f"the chunked body exceeds the limit of "
                                f"{self.max_body_bytes} bytes", close=True)
            parts.append(self._read_exactly(size))
            if self.rfile.readline(3) not in (b"\r\n", b"\n"):
                raise HttpError(400, "invalid_request", "malformed chunked body (no CRLF after a chunk)", close=True)

    # --- answers -------------------------------------------------------------------------------------------

    def error_body(self, status: int, code: str, message: str) -> tuple[dict[str, str], bytes]:
        """The serving API's error format (the Open Inference Protocol's ``{"error": ...}``, with a code)."""
        return {"content-type": "application/json"}, json.dumps({"error": message, "code": code}).encode()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's errors (malformed request lines and headers) in the API's JSON format."""
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            self.request_version = "HTTP/1.0"  # a status line and headers, whatever the client sent
        name = _CODES.get(code, "invalid_request" if code < 500 else "internal_error")
        self._answer_error(HttpError(code, name, message or self.responses.get(code, ("error",))[0], close=True))

    def _answer_error(self, exc: HttpError) -> None:
        if exc.close:
            self.close_connection = True
        headers, body = self.error_body(exc.status, exc.code, exc.message)
        try:
            self.connection.settimeout(5.0)
            self.send_response(exc.status)
            for k, v in {**headers, **exc.headers}.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            if exc.close:
                self.send_header("Connection", "close")
            self.end_headers()
            if getattr(self, "command", None) != "HEAD":
                self.wfile.write(body)
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    def send_reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        skip = {"content-length", "connection", "transfer-encoding", "date", "server"}
        for k, v in headers:
            if k.lower() not in skip:
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
