"""A local Lambda Invoke endpoint: ``POST /2015-03-31/functions/{name}/invocations``, as boto3 calls it.

Each function runs in warm worker processes (one execution environment = one process, one
invocation at a time, like Lambda), with the function's own environment from template.yaml.
The handler module is imported once per worker (cold start) and reused (warm). Replies follow
the Lambda Invoke API: 200 with the handler's JSON result; an unhandled exception is a 200 with
``X-Amz-Function-Error: Unhandled`` and ``{"errorMessage", "errorType"}``; an unknown function is
404 ``ResourceNotFoundException``. boto3 with ``AWS_ENDPOINT_URL_LAMBDA`` pointed here works as
against AWS. Each worker is ``python -m tierserve_tools.worker HANDLER`` (``tierserve_tools.worker``).
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from tierserve import limits
from tierserve.httpserver import HttpError, HttpServer, Limits, Request, Response

INVOKE_PATH = re.compile(r"^/2015-03-31/functions/(?P<name>[^/]+)/invocations/?$")
#: Lambda's synchronous invocation payload limits (tierserve.limits holds the quotas).
MAX_PAYLOAD_BYTES = limits.LAMBDA_REQUEST_BYTES
MAX_RESPONSE_BYTES = limits.LAMBDA_RESPONSE_BYTES
#: The Invoke API's own body quota (413 RequestTooLargeException past it).
MAX_BODY_BYTES = limits.APIGW_PAYLOAD_BYTES


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
    _idle: list[_Worker] = field(default_factory=list, repr=False)
    _all: list[_Worker] = field(default_factory=list, repr=False)
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
            ok = True  # the worker is healthy; the handler raised
            raise
        finally:
            self._release(worker, healthy=ok)

    def _acquire(self) -> _Worker:
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
            worker = _Worker.start(self)
        except BaseException:
            with self._cond:
                self._all.remove(placeholder)
                self._cond.notify()
            raise
        with self._cond:
            self._all[self._all.index(placeholder)] = worker
        return worker

    def _release(self, worker: _Worker, healthy: bool) -> None:
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
