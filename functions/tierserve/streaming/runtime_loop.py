"""A Lambda Runtime API client loop that can stream a Python handler's answer.

Why: Python's managed runtime has no response streaming (aws-lambda-roadmap #39), and the Lambda Web
Adapter cannot be obtained here. The managed ``python3.12`` runtime honours ``AWS_LAMBDA_EXEC_WRAPPER``:
Lambda runs the wrapper with the interpreter's path and the standard start-up arguments, and our wrapper
(``wrapper.sh`` beside this file) execs this loop with that interpreter instead. The loop:

* ``GET /2018-06-01/runtime/invocation/next`` (no timeout: the environment may be frozen in between);
* calls the handler (``_HANDLER``, ``module.function``) with the event and a context object;
* a :class:`~tierserve.streaming.response.StreamingResponse` answer is posted to ``/response`` with
  ``Lambda-Runtime-Function-Response-Mode: streaming``, ``Transfer-Encoding: chunked``, content type
  ``application/vnd.awslambda.http-integration-response`` (a JSON prelude ``{statusCode, headers, cookies}``,
  8 NUL bytes, then the body), one HTTP chunk per handler chunk, written to the socket as it is produced
  (TCP_NODELAY). An error once bytes are out goes in the trailers ``Lambda-Runtime-Function-Error-Type`` /
  ``Lambda-Runtime-Function-Error-Body`` (base64 of ``{errorType, errorMessage, stackTrace}``), as AWS's own
  runtimes do; an error before the first chunk is an ordinary invocation error (``/error``);
* any other answer is posted buffered as JSON, as the managed runtime does;
* init errors go to ``/runtime/init/error``, invocation errors to ``/runtime/invocation/{id}/error``.

The deadline (``Lambda-Runtime-Deadline-Ms``) is honoured between chunks: a stream still running
``DEADLINE_MARGIN_MS`` before it ends is closed with a ``Sandbox.Timedout`` trailer, so the caller learns
why rather than seeing a cut. Streams stop at Lambda's 200 MB. Powertools' ``log_metrics`` flushes when the
handler returns, which for a stream is before its first chunk: the loop flushes
``tierserve.observability.metrics`` again after the last chunk, when that module is loaded.

Stdlib only; run as ``python -m tierserve.streaming.runtime_loop [HANDLER]``.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import importlib
import json
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from tierserve.streaming.response import StreamingResponse

API_VERSION = "2018-06-01"
HTTP_INTEGRATION = "application/vnd.awslambda.http-integration-response"
DELIMITER = b"\x00" * 8
ERROR_TYPE_TRAILER = "Lambda-Runtime-Function-Error-Type"
ERROR_BODY_TRAILER = "Lambda-Runtime-Function-Error-Body"
#: Lambda's quotas for one response.
MAX_BUFFERED_BYTES = 6 * 1024 * 1024
MAX_STREAMED_BYTES = 200 * 1024 * 1024
#: A stream still running this close to the deadline is ended with an error trailer while it still can be.
DEADLINE_MARGIN_MS = 250
#: Set to "1" in the environment before the handler is imported: a handler returns a StreamingResponse only
#: under this loop (the managed runtime would fail to serialise one).
STREAMING_RUNTIME_ENV = "TIERSERVE_STREAMING_RUNTIME"


class LambdaContext:
    """The context object the managed runtime passes (the attributes Powertools reads)."""

    def __init__(self, request_id: str, deadline_ms: int, function_arn: str, client_context: Any = None,
                 identity: Any = None, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ if env is None else env)
        self.aws_request_id = request_id
        self.invoked_function_arn = function_arn
        self.function_name = env.get("AWS_LAMBDA_FUNCTION_NAME", "")
        self.function_version = env.get("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        self.memory_limit_in_mb = env.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "")
        self.log_group_name = env.get("AWS_LAMBDA_LOG_GROUP_NAME", "")
        self.log_stream_name = env.get("AWS_LAMBDA_LOG_STREAM_NAME", "")
        self.client_context = client_context
        self.identity = identity
        self._deadline_ms = deadline_ms

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int(self._deadline_ms - time.time() * 1000))


def error_document(exc: BaseException, error_type: str | None = None) -> dict[str, Any]:
    """``{errorMessage, errorType, stackTrace}``, the shape Lambda's runtimes report."""
    return {"errorMessage": str(exc) or type(exc).__name__, "errorType": error_type or type(exc).__name__,
            "stackTrace": traceback.format_exception(type(exc), exc, exc.__traceback__)[-20:]}


class RuntimeClient:
    """One keep-alive HTTP/1.1 connection to the Runtime API (``AWS_LAMBDA_RUNTIME_API``: host:port)."""

    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self.host, self.port = host or address, int(port or 80)
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=None)
            conn.connect()
            assert conn.sock is not None
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a small chunk leaves at once
            self._conn = conn
        return self._conn

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _request(self, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        for attempt in (1, 2):  # a keep-alive connection the server closed meanwhile: reconnect once
            try:
                conn = self._connection()
                conn.request(method, f"/{API_VERSION}{path}", body=body, headers=headers or {})
                resp = conn.getresponse()
                data = resp.read()
                return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
            except (ConnectionError, http.client.HTTPException, OSError):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def next(self) -> tuple[dict[str, str], bytes]:
        status, headers, body = self._request("GET", "/runtime/invocation/next")
        if status != 200:
            raise RuntimeError(f"the Runtime API answered {status} to /runtime/invocation/next: {body[:200]!r}")
        return headers, body

    def post_response(self, request_id: str, body: bytes) -> tuple[int, bytes]:
        status, _, data = self._request("POST", f"/runtime/invocation/{request_id}/response", body,
                                        {"Content-Type": "application/json"})
        return status, data

    def post_error(self, request_id: str | None, doc: dict[str, Any]) -> int:
        path = "/runtime/init/error" if request_id is None else f"/runtime/invocation/{request_id}/error"
        status, _, _ = self._request("POST", path, json.dumps(doc, default=str).encode(),
                                     {"Content-Type": "application/json", ERROR_TYPE_TRAILER: doc["errorType"]})
        return status

    def stream_response(self, request_id: str, response: StreamingResponse, first: bytes,
                        rest: Iterator[bytes], deadline_ms: int) -> dict[str, Any] | None:
        """Post a streamed answer: prelude, delimiter, ``first``, then each chunk of ``rest`` as it comes.
        Returns the error reported in the trailers (None when the stream completed)."""
        conn = self._connection()
        conn.putrequest("POST", f"/{API_VERSION}/runtime/invocation/{request_id}/response",
                        skip_accept_encoding=True)
        for name, value in (("Lambda-Runtime-Function-Response-Mode", "streaming"),
                            ("Transfer-Encoding", "chunked"),
                            ("Trailer", f"{ERROR_TYPE_TRAILER}, {ERROR_BODY_TRAILER}"),
                            ("Content-Type", HTTP_INTEGRATION)):
            conn.putheader(name, value)
        conn.endheaders()
        sent = 0
        error: dict[str, Any] | None = None

        def send(data: bytes) -> None:
            nonlocal sent
            if data:
                conn.send(b"%x\r\n%s\r\n" % (len(data), data))
                sent += len(data)

        try:
            send(json.dumps(response.prelude()).encode() + DELIMITER)
            chunk: bytes | None = first
            while chunk is not None:
                if sent + len(chunk) > MAX_STREAMED_BYTES:
                    error = {"errorType": "Function.ResponseSizeTooLarge",
                             "errorMessage": f"the streamed response exceeds Lambda's "
                                             f"{MAX_STREAMED_BYTES // (1024 * 1024)} MB; it was ended there",
                             "stackTrace": []}
                    break
                send(chunk)
                if deadline_ms and time.time() * 1000 > deadline_ms - DEADLINE_MARGIN_MS:
                    error = {"errorType": "Sandbox.Timedout",
                             "errorMessage": "the stream was still running at the function's timeout; it was "
                                             "ended there (raise the timeout, or ask for fewer tokens)",
                             "stackTrace": []}
                    break
                try:
                    chunk = _as_bytes(next(rest))
                except StopIteration:
                    chunk = None
                except Exception as exc:  # the handler's stream failed after the first byte: trailers say so
                    error = error_document(exc)
                    break
        finally:
            with contextlib.suppress(Exception):
                response.release()
        trailer = b""
        if error is not None:
            encoded = base64.b64encode(json.dumps(error, default=str).encode()).decode()
            trailer = f"{ERROR_TYPE_TRAILER}: {error['errorType']}\r\n{ERROR_BODY_TRAILER}: {encoded}\r\n".encode()
        conn.send(b"0\r\n" + trailer + b"\r\n")
        flush_metrics()  # after the last chunk, not when the handler returned
        resp = conn.getresponse()
        data = resp.read()
        if resp.status >= 300:
            print(f"the Runtime API answered {resp.status} to a streamed response: {data[:300]!r}", file=sys.stderr)
        return error


def _as_bytes(chunk: Any) -> bytes:
    if isinstance(chunk, bytes | bytearray | memoryview):
        return bytes(chunk)
    if isinstance(chunk, str):
        return chunk.encode("utf-8")
    raise TypeError(f"a streamed chunk must be bytes, not {type(chunk).__name__}")


def flush_metrics() -> None:
    """Flush Powertools' metrics of ``tierserve.observability`` when it is loaded (nothing to flush: no-op)."""
    module = sys.modules.get("tierserve.observability")
    metrics = getattr(module, "metrics", None)
    if metrics is not None:
        with contextlib.suppress(Exception):
            metrics.flush_metrics(raise_on_empty_metrics=False)


def load_handler(name: str) -> Callable[[Any, Any], Any]:
    """``package.module.function`` (or ``path/module.function``) -> the function."""
    module_name, _, function_name = name.rpartition(".")
    if not module_name or not function_name:
        raise ValueError(f"bad handler {name!r}: expected module.function")
    module = importlib.import_module(module_name.replace("/", "."))
    handler = getattr(module, function_name, None)
    if not callable(handler):
        raise AttributeError(f"handler {function_name!r} missing on module {module_name!r}")
    return handler  # type: ignore[no-any-return]


def handle_one(client: RuntimeClient, handler: Callable[[Any, Any], Any], headers: dict[str, str],
               body: bytes) -> None:
    """One invocation: call the handler and post its answer (buffered, streamed or an error)."""
    request_id = headers.get("lambda-runtime-aws-request-id", "")
    deadline_ms = int(headers.get("lambda-runtime-deadline-ms") or 0)
    if headers.get("lambda-runtime-trace-id"):
        os.environ["_X_AMZN_TRACE_ID"] = headers["lambda-runtime-trace-id"]
    else:
        os.environ.pop("_X_AMZN_TRACE_ID", None)
    context = LambdaContext(request_id, deadline_ms, headers.get("lambda-runtime-invoked-function-arn", ""),
                            _json_header(headers.get("lambda-runtime-client-context")),
                            _json_header(headers.get("lambda-runtime-cognito-identity")))
    try:
        event = json.loads(body) if body else {}
        result = handler(event, context)
    except Exception as exc:
        client.post_error(request_id, error_document(exc))
        return
    if isinstance(result, StreamingResponse):
        chunks = iter(result.chunks)
        try:  # an error before the first byte is an ordinary invocation error: nothing was sent yet
            first = _first_chunk(chunks)
        except Exception as exc:
            with contextlib.suppress(Exception):
                result.release()
            client.post_error(request_id, error_document(exc))
            return
        try:
            client.stream_response(request_id, result, first, chunks, deadline_ms)
        except (OSError, http.client.HTTPException) as exc:
            # the Runtime API ended the request (a limit: it answered 413 and closed): nothing more to send
            print(f"the streamed response to {request_id} was cut by the Runtime API: {exc}", file=sys.stderr)
            client.close()
        return
    try:
        data = json.dumps(result).encode()
    except (TypeError, ValueError) as exc:
        client.post_error(request_id, error_document(exc, "Runtime.MarshalError"))
        return
    status, answer = client.post_response(request_id, data)
    if status == 413 or status >= 400:
        client.post_error(request_id, {"errorMessage": f"the Runtime API refused the response ({status}): "
                                                       f"{answer[:300].decode('utf-8', 'replace')}",
                                       "errorType": "Function.ResponseSizeTooLarge" if status == 413
                                       else "Runtime.InvalidResponse", "stackTrace": []})


def _first_chunk(chunks: Iterator[Any]) -> bytes:
    """The first non-empty chunk (an empty stream: b"", so the prelude is still sent)."""
    for chunk in chunks:
        data = _as_bytes(chunk)
        if data:
            return data
    return b""


def _json_header(value: str | None) -> Any:
    if not value:
        return None
    try:
        return json.loads(value)
    except ValueError:
        return value


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    address = os.environ.get("AWS_LAMBDA_RUNTIME_API")
    if not address:
        print("AWS_LAMBDA_RUNTIME_API is not set: this loop runs inside Lambda (or under "
              "tierserve_tools.runtime_api locally)", file=sys.stderr)
        return 2
    task_root = os.environ.get("LAMBDA_TASK_ROOT")
    if task_root and task_root not in sys.path:
        sys.path.insert(0, task_root)
    os.environ[STREAMING_RUNTIME_ENV] = "1"
    client = RuntimeClient(address)
    name = argv[0] if argv else os.environ.get("_HANDLER", "")
    try:
        handler = load_handler(name)
    except Exception as exc:
        kind = ("Runtime.ImportModuleError" if isinstance(exc, ImportError)
                else "Runtime.HandlerNotFound" if isinstance(exc, AttributeError | ValueError)
                else "Runtime.InitError")
        client.post_error(None, error_document(exc, kind))
        return 1
    while True:
        headers, body = client.next()
        handle_one(client, handler, headers, body)


if __name__ == "__main__":
    sys.exit(main())
