"""A local Lambda Runtime API (``2018-06-01``) that hands out events and records what the runtime answers.

Why: the streaming runtime loop (``tierserve.streaming.runtime_loop``) is the one part of issue 17 that
only Lambda itself runs; this emulator lets tests, and the local Invoke endpoint, run the real loop in a
real process against the same HTTP API. It serves:

* ``GET /runtime/invocation/next``: blocks until :meth:`RuntimeApiEmulator.invoke` queues an event, then
  answers it with ``Lambda-Runtime-Aws-Request-Id``, ``-Deadline-Ms``, ``-Invoked-Function-Arn``,
  ``-Trace-Id``;
* ``POST /runtime/invocation/{id}/response``: buffered (at most 6 MB, else 413 and the invocation fails
  with ``Function.ResponseSizeTooLarge``), or streamed (``Lambda-Runtime-Function-Response-Mode:
  streaming``, chunked): each HTTP chunk is recorded with its arrival time (``time.time()``, comparable
  across processes), and the trailers (``Lambda-Runtime-Function-Error-Type`` / ``-Body``) are read; past
  200 MB the stream is cut with 413 and the invocation fails;
* ``POST /runtime/invocation/{id}/error`` and ``POST /runtime/init/error``.

Each :class:`Invocation` is live: :meth:`Invocation.stream` yields the bytes as they arrive, which is what
the Invoke endpoint relays as ``PayloadChunk`` frames. :meth:`Invocation.abandon` (closing that stream before
its end does it) is the caller gone: the runtime's streamed response connection is reset, so the loop's next
write fails and it closes the handler's stream (a generation is cancelled within one token). ``polled`` is set
by the runtime's first ``/next``: its init is over. :func:`start_runtime` starts the loop (through the
shipped ``AWS_LAMBDA_EXEC_WRAPPER`` script, as Lambda does) against an emulator.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tierserve_tools.invoke_stream_endpoint import FunctionStreamError

API_VERSION = "2018-06-01"
MAX_BUFFERED_BYTES = 6 * 1024 * 1024
MAX_STREAMED_BYTES = 200 * 1024 * 1024
HTTP_INTEGRATION = "application/vnd.awslambda.http-integration-response"
DELIMITER = b"\x00" * 8
ERROR_TYPE = "lambda-runtime-function-error-type"
ERROR_BODY = "lambda-runtime-function-error-body"
_PATH = re.compile(rf"^/{API_VERSION}/runtime/invocation/(?P<id>[^/]+)/(?P<kind>response|error)$")


@dataclass(eq=False)
class Invocation:
    """One event and what the runtime answered: ``mode`` is "buffered" or "streamed" once it answers."""

    request_id: str
    event: bytes
    deadline_ms: int
    function_arn: str
    mode: str | None = None
    request_headers: dict[str, str] = field(default_factory=dict)
    response: bytes | None = None  # a buffered answer
    chunks: list[tuple[float, bytes]] = field(default_factory=list)  # a streamed answer: (arrival, HTTP chunk)
    trailers: dict[str, str] = field(default_factory=dict)
    error: dict[str, Any] | None = None  # from /error, the trailers or a broken limit
    taken_at: float | None = None
    finished_at: float | None = None
    abandoned: bool = False
    _cond: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _sock: socket.socket | None = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return self.finished_at is not None

    @property
    def body(self) -> bytes:
        return self.response if self.response is not None else b"".join(c for _, c in self.chunks)

    def wait(self, timeout: float = 10.0) -> Invocation:
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout):
                raise TimeoutError(f"invocation {self.request_id} not answered within {timeout} s")
        return self

    def http_integration(self) -> tuple[dict[str, Any], list[tuple[float, bytes]]]:
        """A streamed HTTP-integration answer split: the JSON prelude, and the body's chunks after the
        8-NUL delimiter (with their arrival times), wherever the chunk boundaries fell."""
        data = self.body
        end = data.find(DELIMITER)
        if end < 0:
            raise ValueError("no HTTP-integration prelude: the 8 NUL bytes are missing")
        prelude = json.loads(data[:end])
        skip, rest = end + len(DELIMITER), []
        for at, chunk in self.chunks:
            if skip >= len(chunk):
                skip -= len(chunk)
                continue
            rest.append((at, chunk[skip:]))
            skip = 0
        return prelude, rest

    def abandon(self) -> None:
        """The caller went away: reset the runtime's streamed response connection (now, or as soon as it
        opens), so that the loop's next write fails and it closes the handler's stream."""
        with self._cond:
            self.abandoned = True
            sock = self._sock
        if sock is not None and not self.done:
            _reset(sock)

    def stream(self, timeout: float = 900.0) -> Iterator[bytes]:
        """The answer's bytes as they arrive (a buffered answer: once); :class:`FunctionStreamError` when the
        function failed (an ``/error``, the trailers, a limit), after the bytes that came before it. Closed
        before the end, the invocation is abandoned (:meth:`abandon`)."""
        try:
            yield from self._stream(timeout)
        finally:
            if not self.done:
                self.abandon()

    def _stream(self, timeout: float) -> Iterator[bytes]:
        seen = 0
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                self._cond.wait_for(partial(self._moved_past, seen), max(0.0, deadline - time.monotonic()))
                new = [c for _, c in self.chunks[seen:]]
                seen += len(new)
                done, response, error = self.done, self.response, self.error
            yield from new
            if done and seen >= len(self.chunks):
                break
            if time.monotonic() >= deadline:
                raise FunctionStreamError("Sandbox.Timedout", f"no answer within {timeout} s")
        if response is not None:
            yield response
        if error is not None:
            raise FunctionStreamError(str(error.get("errorType") or "Unhandled"),
                                      str(error.get("errorMessage") or error))

    def finish(self, error: dict[str, Any] | None = None) -> None:
        """End the invocation from outside the runtime (it was killed, or timed out): ``error`` is why."""
        self._finish(error)

    def _moved_past(self, seen: int) -> bool:
        return self.done or len(self.chunks) > seen

    def _finish(self, error: dict[str, Any] | None = None) -> None:
        with self._cond:
            if error is not None and self.error is None:
                self.error = error
            if self.finished_at is None:
                self.finished_at = time.time()
            self._cond.notify_all()


def _reset(sock: socket.socket) -> None:
    """Reset a connection (RST, not FIN): the peer's next write fails at once. A reader blocked on it wakes."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RD)


class RuntimeApiEmulator:
    """The Runtime API on ``host:port`` (``address`` is what ``AWS_LAMBDA_RUNTIME_API`` takes); a context
    manager. ``max_buffered_bytes`` / ``max_streamed_bytes`` default to Lambda's quotas."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, function_name: str = "local-function",
                 max_buffered_bytes: int = MAX_BUFFERED_BYTES, max_streamed_bytes: int = MAX_STREAMED_BYTES) -> None:
        self.function_name = function_name
        self.max_buffered_bytes = max_buffered_bytes
        self.max_streamed_bytes = max_streamed_bytes
        self.invocations: dict[str, Invocation] = {}
        self.init_error: dict[str, Any] | None = None
        self.init_failed = threading.Event()
        self.polled = threading.Event()  # the runtime asked for its first event: its init is over
        self._queue: queue.Queue[Invocation] = queue.Queue()
        self._closing = threading.Event()
        self._server = _QuietServer((host, port), _handler_class(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host!s}:{port}"

    def start(self) -> RuntimeApiEmulator:
        self._thread = threading.Thread(target=self._server.serve_forever, name="runtime-api", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> RuntimeApiEmulator:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def invoke(self, event: Any, timeout_s: float = 30.0) -> Invocation:
        """Queue ``event`` (JSON-serialisable, or bytes as they are) for the next ``/next``; returns at once."""
        data = event if isinstance(event, bytes) else json.dumps(event).encode()
        inv = Invocation(request_id=str(uuid.uuid4()), event=data, deadline_ms=int((time.time() + timeout_s) * 1000),
                         function_arn=f"arn:aws:lambda:us-east-1:123456789012:function:{self.function_name}")
        self.invocations[inv.request_id] = inv
        self._queue.put(inv)
        return inv

    def stream(self, payload: bytes, timeout_s: float = 30.0) -> Iterator[bytes]:
        """A ``StreamFunction`` (``tierserve_tools.invoke_stream_endpoint``): invoke and yield as it arrives."""
        inv = self.invoke(payload, timeout_s)
        yield from inv.stream(timeout_s + 5.0)

    def _next(self) -> Invocation | None:
        while not self._closing.is_set():
            try:
                inv = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            inv.taken_at = time.time()
            return inv
        return None


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A runtime killed or gone (the tests kill it while it waits on /next) is no error of the emulator."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _error_doc(body: bytes, error_type: str | None) -> dict[str, Any]:
    try:
        doc = json.loads(body) if body else {}
    except ValueError:
        doc = {"errorMessage": body[:1000].decode("utf-8", "replace")}
    if not isinstance(doc, dict):
        doc = {"errorMessage": str(doc)}
    doc.setdefault("errorType", error_type or "Unhandled")
    return doc


def _handler_class(api: RuntimeApiEmulator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _json(self, status: int, doc: dict[str, Any], headers: Mapping[str, str] | None = None,
                  close: bool = False) -> None:
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path != f"/{API_VERSION}/runtime/invocation/next":
                self._json(404, {"errorType": "NotFound", "errorMessage": f"no route {self.path}"})
                return
            api.polled.set()
            inv = api._next()
            if inv is None:
                self._json(503, {"errorType": "ShuttingDown", "errorMessage": "the emulator is stopping"}, close=True)
                return
            self.send_response(200)
            for k, v in (("Content-Type", "application/json"), ("Content-Length", str(len(inv.event))),
                         ("Lambda-Runtime-Aws-Request-Id", inv.request_id),
                         ("Lambda-Runtime-Deadline-Ms", str(inv.deadline_ms)),
                         ("Lambda-Runtime-Invoked-Function-Arn", inv.function_arn),
                         ("Lambda-Runtime-Trace-Id", f"Root=1-{int(time.time()):08x}-{uuid.uuid4().hex[:24]};"
                                                     "Sampled=0")):
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(inv.event)

        def do_POST(self) -> None:
            headers = {k.lower(): v for k, v in self.headers.items()}
            if self.path == f"/{API_VERSION}/runtime/init/error":
                api.init_error = _error_doc(self._read_all(headers, api.max_buffered_bytes)[0],
                                            headers.get(ERROR_TYPE))
                api.init_failed.set()
                self._json(202, {"status": "OK"})
                return
            match = _PATH.match(self.path)
            inv = api.invocations.get(match.group("id")) if match else None
            if match is None or inv is None:
                self._read_all(headers, api.max_buffered_bytes)
                self._json(400, {"errorType": "InvalidRequestID", "errorMessage": f"unknown invocation: {self.path}"})
                return
            if inv.mode is not None or inv.done:
                self._read_all(headers, api.max_buffered_bytes)
                self._json(400, {"errorType": "InvalidStateTransition",
                                 "errorMessage": f"invocation {inv.request_id} was already answered"})
                return
            inv.request_headers = headers
            if match.group("kind") == "error":
                inv.mode = "error"
                inv._finish(_error_doc(self._read_all(headers, api.max_buffered_bytes)[0], headers.get(ERROR_TYPE)))
                self._json(202, {"status": "OK"})
                return
            if headers.get("lambda-runtime-function-response-mode", "").lower() == "streaming":
                self._streamed(inv, headers)
                return
            inv.mode = "buffered"
            body, too_large = self._read_all(headers, api.max_buffered_bytes)
            if too_large:
                inv._finish({"errorType": "Function.ResponseSizeTooLarge",
                             "errorMessage": f"Response payload size exceeded maximum allowed payload size "
                                             f"({api.max_buffered_bytes} bytes)."})
                self._json(413, {"errorType": "RequestEntityTooLarge",
                                 "errorMessage": f"Exceeded maximum allowed payload size "
                                                 f"({api.max_buffered_bytes} bytes)."}, close=True)
                return
            with inv._cond:
                inv.response = body
            inv._finish()
            self._json(202, {"status": "OK"})

        def _read_all(self, headers: dict[str, str], limit: int) -> tuple[bytes, bool]:
            """A whole body (Content-Length or chunked); ``(b"", True)`` when it is over ``limit``."""
            if headers.get("transfer-encoding", "").lower() == "chunked":
                parts, size = [], 0
                for chunk in self._chunks():
                    size += len(chunk)
                    if size > limit:
                        return b"", True
                    parts.append(chunk)
                return b"".join(parts), False
            length = int(headers.get("content-length") or 0)
            if length > limit:
                return b"", True
            return self.rfile.read(length), False

        def _chunks(self) -> Iterator[bytes]:
            """The chunks of a chunked body as each one is whole; the trailers land in ``self._trailers``."""
            self._trailers: dict[str, str] = {}
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise ConnectionError("the runtime closed the connection inside a chunked body")
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while True:
                        trailer = self.rfile.readline(65537)
                        if trailer in (b"\r\n", b"\n", b""):
                            return
                        name, _, value = trailer.decode("latin-1").partition(":")
                        self._trailers[name.strip().lower()] = value.strip()
                data = self.rfile.read(size)
                self.rfile.readline(3)  # the CRLF after the data
                yield data

        def _streamed(self, inv: Invocation, headers: dict[str, str]) -> None:
            inv.mode = "streamed"
            if headers.get("transfer-encoding", "").lower() != "chunked":
                body, _ = self._read_all(headers, api.max_streamed_bytes)
                with inv._cond:
                    inv.chunks.append((time.time(), body))
                inv._finish()
                self._json(202, {"status": "OK"})
                return
            size = 0
            with inv._cond:
                inv._sock = self.connection
                abandoned = inv.abandoned
            if abandoned:
                _reset(self.connection)
            try:
                for chunk in self._chunks():
                    size += len(chunk)
                    if size > api.max_streamed_bytes:
                        inv._finish({"errorType": "Function.ResponseSizeTooLarge",
                                     "errorMessage": f"Response payload size exceeded maximum allowed payload "
                                                     f"size ({api.max_streamed_bytes} bytes)."})
                        self._json(413, {"errorType": "RequestEntityTooLarge",
                                         "errorMessage": "the streamed response exceeds "
                                                         f"{api.max_streamed_bytes} bytes"}, close=True)
                        return
                    with inv._cond:
                        inv.chunks.append((time.time(), chunk))
                        inv._cond.notify_all()
            except (ConnectionError, ValueError, OSError) as exc:
                if inv.abandoned:
                    inv._finish({"errorType": "Client.Disconnected",
                                 "errorMessage": "the caller went away; the runtime's stream was reset"})
                else:
                    inv._finish({"errorType": "Runtime.ExitError", "errorMessage": f"the stream broke: {exc}"})
                self.close_connection = True
                return
            finally:
                with inv._cond:
                    inv._sock = None
            inv.trailers = dict(self._trailers)
            error = None
            if inv.trailers.get(ERROR_TYPE):
                error = {"errorType": inv.trailers[ERROR_TYPE]}
                with contextlib.suppress(ValueError):
                    error.update(json.loads(base64.b64decode(inv.trailers.get(ERROR_BODY, ""))))
            inv._finish(error)
            self._json(202, {"status": "OK"})

    return Handler


WRAPPER = Path(__file__).resolve().parents[2] / "functions" / "tierserve" / "streaming" / "wrapper.sh"


def wrapper_path() -> Path:
    """The shipped ``AWS_LAMBDA_EXEC_WRAPPER`` script (from the installed runtime package, else the repository)."""
    with contextlib.suppress(ImportError):
        import tierserve.streaming

        shipped = Path(tierserve.streaming.__file__).parent / "wrapper.sh"
        if shipped.exists():
            return shipped
    return WRAPPER


def start_runtime(api: RuntimeApiEmulator, handler: str, env: Mapping[str, str] | None = None,
                  task_root: str | None = None, python: str = sys.executable,
                  stderr: Any = None, stdout: Any = subprocess.PIPE, inherit: bool = True) -> subprocess.Popen[bytes]:
    """Start the streaming runtime loop as Lambda would: ``wrapper.sh PYTHON BOOTSTRAP-ARGS`` with
    ``_HANDLER``, ``AWS_LAMBDA_RUNTIME_API`` and the function's environment (over this process's unless
    ``inherit`` is False: ``env`` is then the whole environment). Its own process group (``start_new_session``):
    kill the group to end it, as Lambda ends an environment."""
    full = {**(os.environ if inherit else {}), **(env or {})}
    full.update({"AWS_LAMBDA_RUNTIME_API": api.address, "_HANDLER": handler,
                 "AWS_LAMBDA_FUNCTION_NAME": api.function_name, "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST"})
    if task_root:
        full["LAMBDA_TASK_ROOT"] = task_root
    return subprocess.Popen(["/bin/sh", str(wrapper_path()), python, "/var/runtime/bootstrap.py"],
                            env=full, stdout=stdout, stderr=stderr, start_new_session=True)
