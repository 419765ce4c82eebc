"""``POST /2021-11-15/functions/{name}/response-streaming-invocations``: InvokeWithResponseStream, locally.

Why: the router reads the CPU function's generation with boto3's ``invoke_with_response_stream``
(``tierserve.backends.lambda_stream``); locally boto3 points at our Invoke endpoint
(``AWS_ENDPOINT_URL_LAMBDA``), which must answer with the same event-stream frames as AWS: one
``PayloadChunk`` per chunk the function produces, sent as it is produced, then ``InvokeComplete``
(``ErrorCode`` / ``ErrorDetails`` when the function failed, even mid-stream: the HTTP status is 200 once
the function ran). A refusal before anything runs (unknown function, throttled) is an ordinary error
answer with ``X-Amzn-ErrorType``, which boto3 raises as ``ResourceNotFoundException`` /
``TooManyRequestsException``.

What a function is here: a callable ``payload bytes -> Iterator[bytes]`` (:data:`StreamFunction`); it raises
:class:`FunctionStreamError` (or any exception) to fail, :class:`InvokeRefused` before its first chunk to
refuse. ``tierserve_tools.runtime_api.RuntimeApiEmulator.stream`` is such a callable for a real function
running under the streaming runtime loop.

:func:`response_for` gives the status, headers and body iterator to answer with, for any HTTP server that
sends an iterator chunked and flushed (``tierserve.httpserver``: ``Response(status, headers, body)``).
:class:`InvokeStreamServer` is a standalone stdlib server doing the same, for tests and tools.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

from tierserve.streaming import eventstream

STREAM_PATH = re.compile(r"^/2021-11-15/functions/(?P<name>[^/?]+)/response-streaming-invocations/?$")
#: The Invoke API's request payload quota (413 RequestTooLargeException past it).
MAX_REQUEST_BYTES = 6 * 1024 * 1024

StreamFunction = Callable[[bytes], Iterable[bytes]]


class FunctionStreamError(Exception):
    """The function failed (before or after its first chunk): ``InvokeComplete`` carries these."""

    def __init__(self, error_code: str, details: str) -> None:
        super().__init__(f"{error_code}: {details}")
        self.error_code = error_code
        self.details = details


class InvokeRefused(Exception):
    """Lambda refused the invocation before running anything (an HTTP error answer, not a stream)."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error_type, self.message = status, error_type, message


def function_name(path: str) -> str | None:
    """The function a response-streaming-invocations path names (an ARN's last part), else None."""
    match = STREAM_PATH.match(path.partition("?")[0])
    if not match:
        return None
    name = unquote(match.group("name"))
    if name.startswith("arn:"):
        parts = name.split(":")
        name = parts[6] if len(parts) > 6 else parts[-1]
    return name


def error_response(refused: InvokeRefused) -> tuple[int, list[tuple[str, str]], bytes]:
    """The AWS JSON error answer boto3 maps to the named exception."""
    body = json.dumps({"Type": "User", "message": refused.message}).encode()
    return refused.status, [("Content-Type", "application/json"), ("X-Amzn-ErrorType", refused.error_type)], body


def frames(chunks: Iterable[bytes], first: bytes | None = None) -> Iterator[bytes]:
    """Event-stream frames: ``PayloadChunk`` per non-empty chunk, then ``InvokeComplete`` (with the error,
    when the chunks raised). Closing this iterator closes ``chunks``."""
    it = iter(chunks)
    error: tuple[str, str] | None = None
    try:
        if first:
            yield from eventstream.payload_chunks(first)
        while True:
            try:
                chunk = next(it)
            except StopIteration:
                break
            except FunctionStreamError as exc:
                error = (exc.error_code, exc.details)
                break
            except Exception as exc:
                error = ("Unhandled", f"{type(exc).__name__}: {exc}")
                break
            if chunk:
                yield from eventstream.payload_chunks(bytes(chunk))
    finally:
        close = getattr(it, "close", None)
        if callable(close):
            close()
    yield eventstream.invoke_complete(*(error or (None, None)))


def response_for(function: StreamFunction, payload: bytes,
                 content_type: str = "application/octet-stream") -> tuple[int, list[tuple[str, str]],
                                                                         Iterable[bytes] | bytes]:
    """``(status, headers, body)`` for one invocation. The function is started and its first chunk awaited
    here, so that a refusal (:class:`InvokeRefused`) is still an HTTP error; its failure is in the stream.
    ``Content-Type`` is the function's response type (boto3's ``ResponseStreamContentType``)."""
    if len(payload) > MAX_REQUEST_BYTES:
        return error_response(InvokeRefused(413, "RequestTooLargeException",
                                            f"Request must be smaller than {MAX_REQUEST_BYTES} bytes for the "
                                            "InvokeWithResponseStream operation"))
    headers = [("Content-Type", content_type), ("X-Amz-Executed-Version", "$LATEST")]
    try:
        it = iter(function(payload))
        first = next(it, b"")
    except InvokeRefused as refused:
        return error_response(refused)
    except FunctionStreamError as exc:
        return 200, headers, iter([eventstream.invoke_complete(exc.error_code, exc.details)])
    except Exception as exc:
        return 200, headers, iter([eventstream.invoke_complete("Unhandled", f"{type(exc).__name__}: {exc}")])
    return 200, headers, frames(it, bytes(first))


class InvokeStreamServer:
    """A standalone HTTP/1.1 server for ``response-streaming-invocations`` (chunked, each frame flushed);
    a context manager. ``functions`` maps a name to a :data:`StreamFunction`."""

    def __init__(self, functions: Mapping[str, StreamFunction], host: str = "127.0.0.1", port: int = 0,
                 content_types: Mapping[str, str] | None = None) -> None:
        self.functions = dict(functions)
        self.content_types = dict(content_types or {})
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each frame at once

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                payload = self.rfile.read(length) if length else b""
                name = function_name(self.path)
                if name is None:
                    self._send(*error_response(InvokeRefused(404, "UnknownOperationException",
                                                             f"no operation at {self.path}")))
                    return
                function = outer.functions.get(name)
                if function is None:
                    self._send(*error_response(InvokeRefused(
                        404, "ResourceNotFoundException", f"Function not found: {name} (known: "
                        f"{', '.join(sorted(outer.functions)) or 'none'})")))
                    return
                self._send(*response_for(function, payload, outer.content_types.get(name,
                                                                                    "application/octet-stream")))

            def _send(self, status: int, headers: list[tuple[str, str]], body: Iterable[bytes] | bytes) -> None:
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                if isinstance(body, bytes):
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                it = iter(body)
                try:
                    for frame in it:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(frame), frame))
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                except OSError:
                    self.close_connection = True  # the caller went away: the frames iterator closes the function
                finally:
                    close = getattr(it, "close", None)
                    if callable(close):
                        close()

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> InvokeStreamServer:
        self._thread = threading.Thread(target=self._server.serve_forever, name="invoke-stream", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> InvokeStreamServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
