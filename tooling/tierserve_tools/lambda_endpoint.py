"""A local Lambda Invoke endpoint: ``POST /2015-03-31/functions/{name}/invocations`` and
``POST /2021-11-15/functions/{name}/response-streaming-invocations`` (InvokeWithResponseStream), as boto3 calls them.

Each function runs in warm execution environments (one process each, one invocation at a time, like Lambda),
with the function's own environment from template.yaml. An environment is, by default (``runtime="loop"``),
the streaming runtime loop that ``AWS_LAMBDA_EXEC_WRAPPER`` starts in AWS (``tierserve.streaming.runtime_loop``
through ``wrapper.sh``), against a Runtime API emulator of its own (``tierserve_tools.runtime_api``): the
handler is imported once (cold start, over when the loop first asks for an event) and reused (warm). A
streamed invocation relays each chunk the handler produces as a ``PayloadChunk`` frame as it comes
(``tierserve_tools.invoke_stream_endpoint``); a caller that goes away abandons the invocation (the loop's
stream is reset, so the handler's stream is closed: a generation stops); the environment serves again once
the loop is back for its next event. An invocation still running one second past the function's timeout has
its environment's process group killed, as Lambda ends a timed-out environment. ``runtime="pipe"`` is the
older worker (``python -m tierserve_tools.worker HANDLER``: one JSON line each way), which cannot stream.

Replies follow the Lambda Invoke API: 200 with the handler's JSON result (a streamed answer to a buffered
Invoke: the HTTP-integration prelude and body as one API Gateway response object); an unhandled exception is a
200 with ``X-Amz-Function-Error: Unhandled`` and ``{"errorMessage", "errorType"}``; an unknown function is
404 ``ResourceNotFoundException``. boto3 with ``AWS_ENDPOINT_URL_LAMBDA`` pointed here works as against AWS.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from tierserve import limits
from tierserve.httpserver import HttpError, HttpServer, Limits, Request, Response
from tierserve_tools import invoke_stream_endpoint
from tierserve_tools.runtime_api import Invocation, RuntimeApiEmulator, start_runtime

INVOKE_PATH = re.compile(r"^/2015-03-31/functions/(?P<name>[^/]+)/invocations/?$")
#: Lambda's synchronous invocation payload limits (tierserve.limits holds the quotas).
MAX_PAYLOAD_BYTES = limits.LAMBDA_REQUEST_BYTES
MAX_RESPONSE_BYTES = limits.LAMBDA_RESPONSE_BYTES
#: The Invoke API's own body quota (413 RequestTooLargeException past it).
MAX_BODY_BYTES = limits.APIGW_PAYLOAD_BYTES
#: How long an environment's init (the handler's import) may take before it is given up.
INIT_TIMEOUT_S = 120.0
#: A timed-out invocation's environment is killed this long after the function's timeout.
KILL_GRACE_S = 1.0


class FunctionError(Exception):
    """The function raised (Lambda's ``Unhandled`` function error)."""

    def __init__(self, payload: dict[str, Any]) -> None:
        super().__init__(payload.get("errorMessage", ""))
        self.payload = payload


@dataclass(eq=False)
class LocalFunction:
    """One function from template.yaml: its handler, environment, memory and timeout."""

    name: str
    handler: str
    environment: dict[str, str]
    memory_mb: int = 128
    timeout_s: int = 3
    max_workers: int = 4
    aliases: tuple[str, ...] = ()
    log_path: str | None = None  # the workers' stderr (the function's logs); None = inherit
    #: "loop": the streaming runtime loop under a Runtime API emulator (as AWS_LAMBDA_EXEC_WRAPPER runs it);
    #: "pipe": tierserve_tools.worker (buffered only).
    runtime: str = "loop"
    _idle: list[Any] = field(default_factory=list, repr=False)
    _all: list[Any] = field(default_factory=list, repr=False)
    _cond: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _closed: bool = False

    @property
    def worker_pids(self) -> list[int]:
        """The process ids of this function's warm workers (the stability tests read their memory)."""
        with self._cond:
            return [w.proc.pid for w in self._all if w.proc is not None]

    def invoke(self, event: Any) -> Any:
        """Run the handler on a warm worker (starting one if none is idle); FunctionError if it raised."""
        worker = self._acquire()
        ok = False
        try:
            result = worker.call(event, self.timeout_s)
            ok = True
            return result
        except FunctionError:
            ok = worker.alive()  # the handler raised: the environment serves on, unless it was killed
            raise
        finally:
            self._release(worker, healthy=ok)

    def stream(self, payload: bytes, answer: dict[str, Any] | None = None) -> Iterator[bytes]:
        """InvokeWithResponseStream: the function's response bytes as the handler produces them
        (:class:`~tierserve_tools.invoke_stream_endpoint.FunctionStreamError` when it fails). ``answer`` gets
        ``abandon`` (a thread-safe callable: the caller went away) at once, and the response's ``content_type``
        once the runtime answers. Closing this before the end abandons the invocation too; the environment
        serves again when the loop has finished with it."""
        worker = self._acquire()
        if not isinstance(worker, _RuntimeWorker):
            self._release(worker, healthy=True)
            raise invoke_stream_endpoint.InvokeRefused(
                400, "InvalidRuntimeException", f"{self.name} runs on the pipe worker, which cannot stream; "
                "serve it with runtime='loop'")
        try:
            inv = worker.begin(payload, self.timeout_s)
        except BaseException:
            self._release(worker, healthy=worker.alive())
            raise
        if answer is not None:
            answer["abandon"] = inv.abandon
        return self._relay(worker, inv, answer)

    def _relay(self, worker: _RuntimeWorker, inv: Invocation, answer: dict[str, Any] | None) -> Iterator[bytes]:
        try:
            for data in inv.stream(self.timeout_s + KILL_GRACE_S + 5.0):
                if answer is not None and "content_type" not in answer:
                    answer["content_type"] = inv.request_headers.get("content-type", "application/json")
                yield data
        finally:
            if inv.done:
                self._release(worker, healthy=worker.alive())
            else:  # abandoned: the environment is busy until the loop is back for its next event
                threading.Thread(target=self._release_when_done, args=(worker, inv), daemon=True,
                                 name=f"{self.name}-abandoned").start()

    def _release_when_done(self, worker: _RuntimeWorker, inv: Invocation) -> None:
        with contextlib.suppress(TimeoutError):
            inv.wait(self.timeout_s + KILL_GRACE_S + 5.0)
        self._release(worker, healthy=inv.done and worker.alive())

    def _acquire(self) -> Any:
        with self._cond:
            while True:
                if self._closed:
                    raise RuntimeError(f"function {self.name} is shut down")
                if self._idle:
                    return self._idle.pop()
                if len(self._all) < self.max_workers:
                    break
                self._cond.wait()
            placeholder = _Worker.placeholder()
            self._all.append(placeholder)
        try:
            worker = (_RuntimeWorker if self.runtime == "loop" else _Worker).start(self)
        except BaseException:
            with self._cond:
                self._all.remove(placeholder)
                self._cond.notify()
            raise
        with self._cond:
            self._all[self._all.index(placeholder)] = worker
        return worker

    def _release(self, worker: Any, healthy: bool) -> None:
        with self._cond:
            if healthy and not self._closed and worker.alive():
                self._idle.append(worker)
            else:
                worker.stop()
                with contextlib.suppress(ValueError):
                    self._all.remove(worker)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            workers, self._all, self._idle = list(self._all), [], []
            self._cond.notify_all()
        for w in workers:
            w.stop()


class _Worker:
    """A warm execution environment: a child process running ``main()`` below."""

    def __init__(self, proc: subprocess.Popen | None) -> None:
        self.proc = proc

    @classmethod
    def placeholder(cls) -> _Worker:
        return cls(None)

    @classmethod
    def start(cls, fn: LocalFunction) -> _Worker:
        env = dict(fn.environment)
        log = open(fn.log_path, "ab") if fn.log_path else None  # noqa: SIM115 - the child keeps its copy
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tierserve_tools.worker", fn.handler],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env,
                start_new_session=True,  # Ctrl-C goes to `tierserve serve`, which stops workers in order
            )
        finally:
            if log is not None:
                log.close()
        worker = cls(proc)
        line = proc.stdout.readline() if proc.stdout else b""
        if not line:
            worker.stop()
            raise RuntimeError(f"{fn.name}: worker exited before it was ready (rc={proc.poll()}); see stderr")
        return worker

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def call(self, event: Any, timeout_s: float) -> Any:
        proc = self.proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps({"event": event, "timeout_s": timeout_s}).encode() + b"\n")
        proc.stdin.flush()
        timer = threading.Timer(timeout_s + 1.0, self._timeout_kill)
        timer.start()
        try:
            line = proc.stdout.readline()
        finally:
            timer.cancel()
        if not line:
            raise FunctionError({"errorMessage": f"Task timed out after {timeout_s:.2f} seconds"
                                 if proc.poll() == -9 else "Runtime exited without providing a reason",
                                 "errorType": "Runtime.ExitError"})
        reply = json.loads(line)
        if "error" in reply:
            raise FunctionError(reply["error"])
        return reply["result"]

    def _timeout_kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(Exception):
            if proc.stdin:
                proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


class _RuntimeWorker:
    """A warm execution environment running the streaming runtime loop against its own Runtime API emulator.
    A monitor thread per invocation ends it when the process dies, and kills the process group
    ``KILL_GRACE_S`` past the function's timeout (``Sandbox.Timedout``)."""

    def __init__(self, api: RuntimeApiEmulator, proc: subprocess.Popen[bytes], name: str) -> None:
        self.api, self.proc, self.name = api, proc, name

    @classmethod
    def start(cls, fn: LocalFunction) -> _RuntimeWorker:
        api = RuntimeApiEmulator(function_name=fn.name).start()
        log = open(fn.log_path, "ab") if fn.log_path else None  # noqa: SIM115 - the child keeps its copy
        try:
            # stdout too: a handler's prints and Powertools' logs are the function's logs (never an unread pipe)
            proc = start_runtime(api, fn.handler, env=fn.environment, inherit=False, stdout=log or sys.stderr,
                                 stderr=log)
        except BaseException:
            api.stop()
            raise
        finally:
            if log is not None:
                log.close()
        worker = cls(api, proc, fn.name)
        deadline = time.monotonic() + INIT_TIMEOUT_S
        while not api.polled.wait(0.02):
            if api.init_failed.is_set() or proc.poll() is not None or time.monotonic() > deadline:
                why = api.init_error or (f"exited with {proc.poll()}" if proc.poll() is not None
                                         else f"no first /next within {INIT_TIMEOUT_S:g} s")
                worker.stop()
                raise RuntimeError(f"{fn.name}: the runtime's init failed ({why}); see its log")
        return worker

    def alive(self) -> bool:
        return self.proc.poll() is None

    def begin(self, event: Any, timeout_s: float) -> Invocation:
        """Queue one invocation (an event, or its JSON bytes) and watch it."""
        inv = self.api.invoke(event, timeout_s)
        threading.Thread(target=self._monitor, args=(inv, timeout_s), daemon=True, name=f"{self.name}-monitor").start()
        return inv

    def _monitor(self, inv: Invocation, timeout_s: float) -> None:
        kill_at = time.monotonic() + timeout_s + KILL_GRACE_S
        while not inv.done:
            with inv._cond:
                inv._cond.wait_for(lambda: inv.done, 0.05)
            if inv.done:
                return
            if self.proc.poll() is not None:
                inv.finish({"errorMessage": "Runtime exited without providing a reason",
                            "errorType": "Runtime.ExitError"})
                return
            if time.monotonic() >= kill_at:
                self.kill()
                inv.finish({"errorMessage": f"Task timed out after {timeout_s:.2f} seconds",
                            "errorType": "Sandbox.Timedout"})
                return

    def call(self, event: Any, timeout_s: float) -> Any:
        """A buffered invocation: the handler's JSON result (a streamed answer as one API Gateway response)."""
        inv = self.begin(event, timeout_s)
        inv.wait(timeout_s + KILL_GRACE_S + 5.0)
        if inv.error is not None:
            raise FunctionError({k: v for k, v in inv.error.items()
                                 if k in ("errorMessage", "errorType", "stackTrace")})
        if inv.mode == "streamed":
            return streamed_as_response(inv)
        return json.loads(inv.response or b"null")

    def kill(self) -> None:
        """SIGKILL the environment's process group, and reap it (it is dead when this returns)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)

    def stop(self) -> None:
        self.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self.api.stop()


def streamed_as_response(inv: Invocation) -> dict[str, Any]:
    """A streamed HTTP-integration answer as the API Gateway response object it stands for (a buffered Invoke
    of a streaming function); bytes without a prelude as a base64 body."""
    try:
        prelude, chunks = inv.http_integration()
    except ValueError:
        return {"statusCode": 200, "body": base64.b64encode(inv.body).decode(), "isBase64Encoded": True}
    body = b"".join(c for _, c in chunks)
    try:
        text, b64 = body.decode("utf-8"), False
    except UnicodeDecodeError:
        text, b64 = base64.b64encode(body).decode(), True
    out = {"statusCode": int(prelude.get("statusCode", 200)), "headers": dict(prelude.get("headers") or {}),
           "body": text, "isBase64Encoded": b64}
    if prelude.get("cookies"):
        out["cookies"] = list(prelude["cookies"])
    return out


class LambdaEndpoint(HttpServer):
    """Serves the Invoke API for ``functions`` on its own port (never the API's: API clients must not
    reach the functions); a context manager. The HTTP server is ``tierserve.httpserver`` (deadlines,
    bounded connections); errors are the Invoke API's (``x-amzn-ErrorType``)."""

    thread_name = "lambda-endpoint"
    server_name = "tierserve-lambda-local"

    def __init__(self, functions: list[LocalFunction], host: str = "127.0.0.1", port: int = 0,
                 limits: Limits | None = None) -> None:
        self.functions: dict[str, LocalFunction] = {}
        for fn in functions:
            self.add(fn)
        self.limits = limits or Limits(max_body_bytes=MAX_BODY_BYTES, workers=64)
        self.host, self.port = host, port

    def handle(self, request: Request) -> Response:
        if request.method == "POST" and invoke_stream_endpoint.function_name(request.path) is not None:
            return self.handle_stream(request)
        reply = self.handle_invoke(request.method, request.target, request.header_map(), request.body)
        status, headers, body = reply or _error(404, "ResourceNotFoundException", f"no such API: {request.path}")
        return Response(status, list(headers.items()), body)

    def error_response(self, error: HttpError) -> Response:
        code = "".join(w.title() for w in error.code.split("_")) + "Exception"
        status, headers, body = _error(error.status, code, error.message)
        return Response(status, [*headers.items(), *error.headers], body)

    def handle_invoke(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> Reply | None:
        """Serve an Invoke request (None when it is not one)."""
        return handle_invoke(self, method, target, headers, body)

    def handle_stream(self, request: Request) -> Response:
        """InvokeWithResponseStream: event-stream frames (``PayloadChunk`` as each chunk comes, then
        ``InvokeComplete``), or the Invoke API's error before anything ran."""
        name = invoke_stream_endpoint.function_name(request.path) or ""
        fn = self.lookup(name)
        if fn is None:
            known = ", ".join(sorted(self.functions))
            status, headers, body = _error(404, "ResourceNotFoundException",
                                           f"Function not found: {name} (local: {known})")
            return Response(status, list(headers.items()), body)
        answer: dict[str, Any] = {}

        def function(payload: bytes) -> Iterator[bytes]:
            try:
                return fn.stream(payload, answer)
            except RuntimeError as exc:  # the environment could not start: a service error, nothing ran
                raise invoke_stream_endpoint.InvokeRefused(500, "ServiceException", str(exc)) from exc

        status, out, frames = invoke_stream_endpoint.response_for(function, request.body)
        content_type = str(answer.get("content_type", "application/json"))
        out = [(k, content_type if k.lower() == "content-type" and status == 200 else v) for k, v in out]
        return Response(status, [*out, ("x-amzn-RequestId", str(uuid.uuid4()))], frames)

    def add(self, fn: LocalFunction) -> None:
        """Serve ``fn`` (under its name and aliases) from now on."""
        for key in (fn.name, *fn.aliases):
            self.functions[key] = fn

    def lookup(self, name: str) -> LocalFunction | None:
        name = unquote(name)
        # FunctionName may be a name, an ARN, or a partial ARN, optionally with :qualifier.
        if ":function:" in f":{name}":
            name = f":{name}".split(":function:", 1)[1]
        return self.functions.get(name.split(":", 1)[0])

    def stop(self) -> None:
        """Stop the server (if started) and every warm worker."""
        super().stop()
        for fn in {id(f): f for f in self.functions.values()}.values():
            fn.close()


Reply = tuple[int, dict[str, str], bytes]


def _reply(status: int, body: bytes, headers: Mapping[str, str] | None = None) -> Reply:
    return status, {"Content-Type": "application/json", "x-amzn-RequestId": str(uuid.uuid4()), **(headers or {})}, body


def _error(status: int, error_type: str, message: str) -> Reply:
    return _reply(status, json.dumps({"Type": "User", "message": message}).encode(), {"x-amzn-ErrorType": error_type})


def handle_invoke(endpoint: LambdaEndpoint, method: str, target: str, headers: Mapping[str, str],
                  raw: bytes) -> Reply | None:
    """The Invoke API for one HTTP request; None when the path is not an Invoke path."""
    path = target.split("?", 1)[0]
    m = INVOKE_PATH.fullmatch(path)
    if m is None or method != "POST":
        return None
    lower = {k.lower(): v for k, v in headers.items()}
    fn = endpoint.lookup(m.group("name"))
    if fn is None:
        known = ", ".join(sorted(endpoint.functions))
        return _error(404, "ResourceNotFoundException", f"Function not found: {m.group('name')} (local: {known})")
    if len(raw) > MAX_PAYLOAD_BYTES:
        return _error(413, "RequestTooLargeException",
                      f"Request must be smaller than {MAX_PAYLOAD_BYTES} bytes for the InvokeFunction operation")
    try:
        event = json.loads(raw or b"{}")
    except ValueError:
        return _error(400, "InvalidRequestContentException", "Could not parse request body into json")
    invocation_type = lower.get("x-amz-invocation-type", "RequestResponse")
    if invocation_type == "Event":
        threading.Thread(target=_swallow, args=(fn, event), daemon=True).start()
        return _reply(202, b"")
    if invocation_type == "DryRun":
        return _reply(204, b"")
    try:
        result = fn.invoke(event)
    except FunctionError as exc:
        return _reply(200, json.dumps(exc.payload).encode(),
                      {"X-Amz-Function-Error": "Unhandled", "X-Amz-Executed-Version": "$LATEST"})
    except Exception as exc:  # the worker could not start: a service error
        return _error(500, "ServiceException", f"{type(exc).__name__}: {exc}")
    body = json.dumps(result).encode()
    if len(body) > MAX_RESPONSE_BYTES:
        payload = response_too_large(len(body))
        return _reply(200, json.dumps(payload).encode(), {"X-Amz-Function-Error": "Unhandled"})
    return _reply(200, body, {"X-Amz-Executed-Version": "$LATEST"})


def response_too_large(size: int) -> dict[str, str]:
    """Lambda's error for a result over the response payload quota."""
    return {"errorMessage": f"Response payload size ({size} bytes) exceeded maximum allowed payload size "
                            f"({MAX_RESPONSE_BYTES} bytes).", "errorType": "Function.ResponseSizeTooLarge"}


def request_too_large(size: int) -> dict[str, str]:
    """Lambda's error for an event over the request payload quota (RequestTooLargeException)."""
    return {"errorMessage": f"Request must be smaller than {MAX_PAYLOAD_BYTES} bytes for the InvokeFunction "
                            f"operation (this one is {size} bytes)", "errorType": "RequestTooLargeException"}


def _swallow(fn: LocalFunction, event: Any) -> None:
    with contextlib.suppress(Exception):
        fn.invoke(event)
