"""The HTTP/1.1 server under the edge's HTTP API and the local emulators (API Gateway, Lambda Invoke, SageMaker).

Why: parsing HTTP by hand on ``http.server`` gave a thread per connection with no cap, deadlines checked
only between reads (a trickle of one byte every 0.5 s was answered at 80 s), bodies left unread on a 405
(the next keep-alive request was parsed from their bytes), and bare bodies or tracebacks for framing that
``http.server`` does not expect (issue 16, defects 2, 4, 12, 13). Here the framing is ``h11``'s (a
maintained, sans-I/O HTTP/1.1 parser: Content-Length, chunked, keep-alive, 100-continue), the I/O one
asyncio loop on a daemon thread, and the handlers run on a bounded pool of daemon threads:

* **Deadlines are absolute.** The request line and headers must arrive within ``header_timeout_s`` of the
  request's first byte, the body within ``body_timeout_s`` of the headers' end, whatever the pace:
  408, then the connection is closed. An idle keep-alive connection is closed after ``idle_timeout_s``.
* **Connections are bounded.** Past ``max_connections`` open connections a new one is answered 503 and
  closed at once; a connection costs a coroutine, never a thread. ``workers`` threads run handlers.
* **Framing.** No Content-Length and no Transfer-Encoding is an empty body (RFC 9112 §6.3); chunked bodies
  are decoded; Content-Length and Transfer-Encoding together, or two different Content-Lengths, are 400;
  a body over ``max_body_bytes`` is 413 before it is read; a request line over 64 KiB is 414, headers
  over 64 KiB 431; an HTTP/0.9 line or anything that is not ``METHOD TARGET HTTP/x.y`` is 400, a version
  other than 1.0/1.1 (an HTTP/2 preface, ``HTTP/9.9``) is 505. Every one is answered with an HTTP/1.1
  status line and the server's error body (``error_response``), then the connection is closed.
* **Methods.** With ``allowed_methods`` set, any other method is 405 with ``Allow`` after its body is read
  (so the connection stays usable). A handler's 405 on a route of ``tierserve.api.ENDPOINTS`` gets the
  route's ``Allow``.
* **Streaming.** A handler may answer with an iterator of ``bytes``: it is sent chunked, each chunk flushed
  as it comes, never compressed. ``Request.disconnected`` is set within milliseconds of the client going
  away (the connection is read while the handler runs), so a generation can stop; the iterator is closed.

No Lambda handler reaches this module (only ``tierserve.edge`` and ``tierserve_tools`` import it), so it
never ships in a function's artifact.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Self

import h11

log = logging.getLogger("tierserve.protocol.http_api")

STANDARD_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")
_READ = 65536
_LINE = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+ [^ \x00-\x1f\x7f]+ HTTP/(\d)\.(\d)$")
#: How long a handler runs before the connection is watched for the client going away.
WATCH_AFTER_S = 0.05
_HOP = {"content-length", "connection", "transfer-encoding", "date", "server", "keep-alive"}


@dataclass(frozen=True)
class Limits:
    """How long a client may take, and how much it may hold (the defaults are the local API's and the edge's)."""

    header_timeout_s: float = 10.0  # request line + headers, from the request's first byte
    body_timeout_s: float = 30.0  # the whole body, from the end of the headers
    idle_timeout_s: float = 60.0  # a keep-alive connection between requests
    write_timeout_s: float = 30.0  # each flush of an answer
    max_body_bytes: int = 10 * 1024 * 1024
    max_connections: int = 512
    workers: int = 32
    max_request_line: int = 65536
    max_header_bytes: int = 65536


@dataclass
class Request:
    """One request, its body read. ``headers`` keep their order and repeats, names lower-cased."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    client: tuple[str, int]
    http_version: str = "1.1"
    disconnected: threading.Event = field(default_factory=threading.Event)

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    def header_map(self) -> dict[str, str]:
        """Lower-cased names, repeated values comma-joined (as API Gateway and the edge see them)."""
        merged: dict[str, str] = {}
        for k, v in self.headers:
            merged[k] = f"{merged[k]},{v}" if k in merged else v
        return merged


@dataclass
class Response:
    """An answer: ``body`` bytes (sent with Content-Length) or an iterator of bytes (sent chunked, each
    chunk flushed). ``close`` closes the connection after it."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | Iterable[bytes] = b""
    close: bool = False


class HttpError(Exception):
    """An error the server answers itself (status, a code for the body, a message saying what to do)."""

    def __init__(self, status: int, code: str, message: str, close: bool = True,
                 headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.close = status, code, message, close
        self.headers = headers or []


def allow_for(path: str) -> str | None:
    """The methods ``tierserve.api.ENDPOINTS`` serves on ``path`` (None when it is none of its routes)."""
    from tierserve.api import ENDPOINTS

    methods = [m for m, pattern, _ in ENDPOINTS if pattern.fullmatch(path)]
    if "GET" in methods:
        methods.append("HEAD")
    return ", ".join(dict.fromkeys(methods)) or None


class _Pool:
    """At most ``size`` daemon threads (started on demand) that run blocking calls for the loop."""

    def __init__(self, size: int, name: str) -> None:
        self._size, self._name = size, name
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads = 0
        self._idle = 0
        self._lock = threading.Lock()

    def run(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = loop.create_future()
        self._jobs.put((loop, fut, fn, args))
        with self._lock:
            if self._idle > 0:
                self._idle -= 1
            elif self._threads < self._size:
                self._threads += 1
                threading.Thread(target=self._work, name=f"{self._name}-{self._threads}", daemon=True).start()
        return fut

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            loop, fut, fn, args = job
            try:
                result, error = fn(*args), None
            except BaseException as exc:
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # the loop is closed: the server stopped
                loop.call_soon_threadsafe(_settle, fut, result, error)
            with self._lock:
                self._idle += 1

    def close(self) -> None:
        with self._lock:
            for _ in range(self._threads):
                self._jobs.put(None)
            self._threads = self._idle = 0


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


_DATE: list[Any] = [0.0, ""]


def _date() -> str:
    now = time.time()
    if now - _DATE[0] >= 1.0:
        _DATE[0], _DATE[1] = now, formatdate(now, usegmt=True)
    return str(_DATE[1])


class HttpServer:
    """Subclasses implement ``handle(request) -> Response`` (on a worker thread) and may override
    ``error_response`` (the body of the server's own errors), ``allowed_methods`` and ``limits``. They set
    ``self.host``/``self.port`` (port 0 = any free port) and may ``bind()`` early to know the port."""

    thread_name = "http"
    server_name = "tierserve"
    allowed_methods: tuple[str, ...] | None = STANDARD_METHODS
    limits = Limits()
    _sock: socket.socket | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _pool: _Pool | None = None
    _address: tuple[str, int] = ("127.0.0.1", 0)
    _tasks: set[asyncio.Task[Any]]

    # --- what subclasses provide -------------------------------------------------------------------------

    def handle(self, request: Request) -> Response:  # pragma: no cover - subclasses implement it
        raise NotImplementedError

    def error_response(self, error: HttpError) -> Response:
        """The body of the server's own errors: ``{"error": message, "code": code}`` (the API's format)."""
        body = json.dumps({"error": error.message, "code": error.code}).encode()
        return Response(error.status, [("content-type", "application/json"), *error.headers], body)

    # --- address, start, stop ----------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return str(self._sock.getsockname()[0]) if self._sock is not None else self._address[0]

    @host.setter
    def host(self, value: str) -> None:
        self._address = (value, self._address[1])

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1]) if self._sock is not None else self._address[1]

    @port.setter
    def port(self, value: int) -> None:
        self._address = (self._address[0], int(value))

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def open_connections(self) -> int:
        return len(getattr(self, "_tasks", ()))

    def bind(self) -> socket.socket:
        if self._sock is None:
            self._sock = socket.create_server(self._address, backlog=1024, reuse_port=False)
            self._sock.setblocking(False)
        return self._sock

    def start(self) -> Self:
        sock = self.bind()
        self._tasks = set()
        self._pool = _Pool(self.limits.workers, f"{self.thread_name}-worker")
        loop = self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)

            async def serve() -> None:
                self._server = await asyncio.start_server(self._accept, sock=sock, limit=_READ)
                ready.set()

            loop.run_until_complete(serve())
            loop.run_forever()

        self._thread = threading.Thread(target=run, name=self.thread_name, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        """Stop serving, cut open connections and close the socket (twice is fine; so is never started)."""
        loop, thread, sock = self._loop, self._thread, self._sock
        if sock is None:
            return
        self._address = (self.host, self.port)  # a restart binds the same port
        if loop is not None and thread is not None:
            async def shutdown() -> None:
                self._server.close()
                for task in list(self._tasks):
                    task.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)
                loop.stop()

            with contextlib.suppress(RuntimeError):
                asyncio.run_coroutine_threadsafe(shutdown(), loop)
            thread.join(timeout=5)
            with contextlib.suppress(RuntimeError):
                loop.close()
        if self._pool is not None:
            self._pool.close()
        sock.close()
        self._sock, self._loop, self._thread, self._pool = None, None, None, None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # --- one connection ----------------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._tasks) >= self.limits.max_connections:
            await self._send_error(writer, HttpError(503, "server_busy", f"the server holds its limit of "
                                                     f"{self.limits.max_connections} connections; retry shortly",
                                                     headers=[("retry-after", "1")]), head_only=False)
            writer.close()
            return
        self._tasks.add(task)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = writer.get_extra_info("peername") or ("", 0)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_request_line
                              + self.limits.max_header_bytes)
        try:
            while await self._one(conn, reader, writer, (str(peer[0]), int(peer[1]))):
                conn.start_next_cycle()
        except (ConnectionError, TimeoutError, asyncio.CancelledError, h11.ProtocolError):
            pass
        except Exception:
            log.exception("HTTP connection failed")
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _one(self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   peer: tuple[str, int]) -> bool:
        """Serve one request; True when the connection may serve another."""
        limits = self.limits
        if not conn.trailing_data[0]:
            try:
                data = await _within(reader.read(_READ), limits.idle_timeout_s)
            except TimeoutError:
                return False
            if not data:
                return False
            conn.receive_data(data)
        deadline = time.monotonic() + limits.header_timeout_s
        try:
            event = await self._head(conn, reader, deadline)
        except HttpError as exc:
            await self._send_error(writer, exc, head_only=False)
            return False
        if event is None:
            return False
        method = event.method.decode("ascii")
        head_only = method == "HEAD"
        try:
            request = self._request(event, method, peer)
            body = await self._body(conn, reader, writer, request, time.monotonic() + limits.body_timeout_s)
        except HttpError as exc:
            await self._send_error(writer, exc, head_only)
            return False
        request.body = body
        if self.allowed_methods is not None and method not in self.allowed_methods:
            error = HttpError(405, "method_not_allowed", f"{method} is not allowed; use one of "
                              f"{', '.join(self.allowed_methods)}", close=False,
                              headers=[("allow", ", ".join(self.allowed_methods))])
            return await self._respond(conn, writer, request, self.error_response(error), head_only)
        assert self._pool is not None and self._loop is not None
        # The connection is read while a handler runs (from WATCH_AFTER_S on: most answers come sooner, and
        # a watcher per request costs more than the request) and while a streamed answer is sent.
        loop = self._loop
        watching: list[asyncio.Task[None]] = []

        def watch() -> None:
            if not watching:
                watching.append(loop.create_task(self._watch(conn, reader, request)))

        timer = loop.call_later(WATCH_AFTER_S, watch)
        try:
            response = await self._pool.run(loop, self._handle, request)
            if not isinstance(response.body, bytes | bytearray | memoryview):
                watch()
            return await self._respond(conn, writer, request, response, head_only)
        finally:
            timer.cancel()
            if watching:
                watching[0].cancel()
                await asyncio.wait(watching)  # its read is over before the next one starts

    async def _head(self, conn: h11.Connection, reader: asyncio.StreamReader, deadline: float) -> h11.Request | None:
        """The request line and headers, by the header deadline; None when the client closed first."""
        limits = self.limits
        most = limits.max_request_line + limits.max_header_bytes
        checked = False
        while True:
            # h11 bounds only a head that is still incomplete: one that arrives whole is measured here
            buf = conn.trailing_data[0].lstrip(b"\r\n")
            if not checked:
                end = buf.find(b"\n")
                if end < 0 and len(buf) > limits.max_request_line:
                    raise HttpError(414, "uri_too_long", f"the request line is over {limits.max_request_line} "
                                    "bytes; send a shorter target (large inputs go in the body)")
                if end >= 0:
                    _check_line(buf[:end].rstrip(b"\r"), limits.max_request_line)
                    checked = True
            end = buf.find(b"\r\n\r\n")
            if end > most or (end < 0 and len(buf) > most):
                raise HttpError(431, "headers_too_large", f"the request line and headers are over {most} bytes; "
                                "send large values in the body")
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                code = {431: "headers_too_large", 501: "not_implemented"}.get(status, "invalid_request")
                message = _explain(str(exc)) if status != 431 else (
                    f"the request line and headers are over {limits.max_request_line + limits.max_header_bytes} "
                    "bytes; send large values in the body")
                raise HttpError(status, code, message) from None
            if isinstance(event, h11.Request):
                return event
            if isinstance(event, h11.ConnectionClosed):
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                raise HttpError(408, "request_timeout", "the request line and headers took longer than "
                                f"{limits.header_timeout_s:g} s to arrive")
            try:
                data = await _within(reader.read(_READ), left)
            except TimeoutError:
                raise HttpError(408, "request_timeout", "the request line and headers took longer than "
                                f"{limits.header_timeout_s:g} s to arrive") from None
            conn.receive_data(data)

    def _request(self, event: h11.Request, method: str, peer: tuple[str, int]) -> Request:
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers]
        names = [k for k, _ in headers]
        if "content-length" in names and "transfer-encoding" in names:
            raise HttpError(400, "invalid_request", "a request may not have both Content-Length and "
                            "Transfer-Encoding; send one")
        if "content-length" in names:
            length = int(next(v for k, v in headers if k == "content-length"))
            if length > self.limits.max_body_bytes:
                raise HttpError(413, "payload_too_large", f"the request body is {length} bytes; the limit is "
                                f"{self.limits.max_body_bytes} bytes")
        return Request(method, event.target.decode("latin-1"), headers, b"", peer,
                       event.http_version.decode("ascii"))

    async def _body(self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    request: Request, deadline: float) -> bytes:
        limits = self.limits
        parts: list[bytes] = []
        size = 0
        if conn.client_is_waiting_for_100_continue:
            writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise HttpError(400, "invalid_request", f"malformed request body: {exc}") from None
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > limits.max_body_bytes:
                    raise HttpError(413, "payload_too_large", f"the request body exceeds the limit of "
                                    f"{limits.max_body_bytes} bytes")
                parts.append(bytes(event.data))
                continue
            if isinstance(event, h11.EndOfMessage):
                return b"".join(parts)
            if isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("the client closed the connection during the body")
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError
                data = await _within(reader.read(_READ), left)
            except TimeoutError:
                raise HttpError(408, "request_timeout", f"the request body took longer than "
                                f"{limits.body_timeout_s:g} s to arrive ({size} bytes came)") from None
            conn.receive_data(data)

    def _handle(self, request: Request) -> Response:
        try:
            response = self.handle(request)
        except HttpError as exc:
            return self.error_response(exc)
        except Exception:
            log.exception("HTTP handler failed on %s %s", request.method, request.path)
            return self.error_response(HttpError(500, "internal_error", "internal error; see the server's log"))
        if response.status == 405 and not any(k.lower() == "allow" for k, _ in response.headers):
            allow = allow_for(request.path)
            if allow:
                response.headers = [*response.headers, ("allow", allow)]
        return response

    async def _watch(self, conn: h11.Connection, reader: asyncio.StreamReader, request: Request) -> None:
        """Read ahead while a handler runs: the next pipelined request is kept, an EOF or a reset is the
        client gone (``request.disconnected``)."""
        try:
            while len(conn.trailing_data[0]) < _READ * 16:
                data = await reader.read(_READ)
                if not data:
                    break
                conn.receive_data(data)
        except (ConnectionError, OSError):
            pass
        else:
            if len(conn.trailing_data[0]) >= _READ * 16:
                return
        request.disconnected.set()

    async def _respond(self, conn: h11.Connection, writer: asyncio.StreamWriter, request: Request,
                       response: Response, head_only: bool) -> bool:
        body = response.body
        streamed = not isinstance(body, bytes | bytearray | memoryview)
        headers = [(k, v) for k, v in response.headers if k.lower() not in _HOP]
        headers += [("server", self.server_name), ("date", _date())]
        if not streamed:
            headers.append(("content-length", str(len(body))))  # type: ignore[arg-type]
        if response.close or request.disconnected.is_set():
            headers.append(("connection", "close"))
        head = conn.send(h11.Response(status_code=response.status, headers=headers, reason=_reason(response.status)))
        if streamed:
            writer.write(head)
            if head_only:
                _close_iter(body)
            else:
                await self._stream(conn, writer, request, iter(body))  # type: ignore[arg-type]
            writer.write(conn.send(h11.EndOfMessage()))
        else:  # one write, one segment: head, body and end together
            data = conn.send(h11.Data(data=bytes(body))) if body and not head_only else b""  # type: ignore[arg-type]
            writer.write(b"".join((head, data, conn.send(h11.EndOfMessage()))))
        await _within(writer.drain(), self.limits.write_timeout_s)
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE and not request.disconnected.is_set()

    async def _stream(self, conn: h11.Connection, writer: asyncio.StreamWriter, request: Request,
                      chunks: Iterator[bytes]) -> None:
        """Each chunk as it comes, flushed; the client gone (or a write stuck) stops and closes the iterator."""
        assert self._pool is not None and self._loop is not None
        done = object()
        try:
            while not request.disconnected.is_set():
                chunk = await self._pool.run(self._loop, next, chunks, done)
                if chunk is done or request.disconnected.is_set():
                    break
                if chunk:
                    writer.write(conn.send(h11.Data(data=bytes(chunk))))
                    await _within(writer.drain(), self.limits.write_timeout_s)
        except (ConnectionError, TimeoutError):
            request.disconnected.set()
        finally:
            await self._pool.run(self._loop, _close_iter, chunks)
        if request.disconnected.is_set():
            raise ConnectionError("the client went away during a streamed answer")

    async def _send_error(self, writer: asyncio.StreamWriter, error: HttpError, head_only: bool) -> None:
        """One of the server's own errors, written directly (the request may not be parseable), then close."""
        response = self.error_response(error)
        body = response.body if isinstance(response.body, bytes) else b""
        lines = [f"HTTP/1.1 {error.status} {_reason(error.status).decode()}", f"server: {self.server_name}",
                 f"date: {_date()}", f"content-length: {len(body)}", "connection: close"]
        lines += [f"{k}: {v}" for k, v in response.headers if k.lower() not in _HOP]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body))
        with contextlib.suppress(ConnectionError, TimeoutError):
            await _within(writer.drain(), 5.0)


async def _within(awaitable: Any, seconds: float) -> Any:
    """``awaitable`` within ``seconds`` (TimeoutError past them), without wait_for's extra task."""
    async with asyncio.timeout(seconds):
        return await awaitable


def _check_line(line: bytes, limit: int) -> None:
    if len(line) > limit:
        raise HttpError(414, "uri_too_long", f"the request line is over {limit} bytes; send a shorter target "
                        "(large inputs go in the body)")
    m = _LINE.match(line)
    if m is None:
        raise HttpError(400, "invalid_request", "malformed request line: expected 'METHOD TARGET HTTP/1.1' "
                        f"(HTTP/0.9 is not served), got {line[:80]!r}")
    if (m.group(1), m.group(2)) not in ((b"1", b"1"), (b"1", b"0")):
        raise HttpError(505, "http_version_not_supported", f"HTTP/{m.group(1).decode()}.{m.group(2).decode()} "
                        "is not served here; use HTTP/1.1")


_EXPLAIN = {
    "bad Content-Length": "Content-Length must be one non-negative integer (the body's size in bytes)",
    "conflicting Content-Length headers": "conflicting Content-Length headers: send one",
    "Missing mandatory Host: header": "an HTTP/1.1 request needs a Host header",
}


def _explain(message: str) -> str:
    return f"malformed request: {_EXPLAIN.get(message, message)}"


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _close_iter(chunks: Any) -> None:
    close = getattr(chunks, "close", None)
    if close is not None:
        with contextlib.suppress(Exception):
            close()


__all__ = ["STANDARD_METHODS", "HttpError", "HttpServer", "Limits", "Request", "Response", "allow_for"]
