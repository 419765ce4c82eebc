"""`tierserve invoke FUNCTION_ID -e EVENT.json`: what `sam local invoke` does, without Docker.

The handler runs in a fresh Python interpreter (a cold start) through the streaming runtime loop, as
``AWS_LAMBDA_EXEC_WRAPPER`` starts it in AWS (``tierserve.streaming.runtime_loop`` through ``wrapper.sh``),
against a local Runtime API emulator (``tierserve_tools.runtime_api``) in this process, with the function's
environment from template.yaml (plus --env-vars) and its timeout. stdout carries the answer: a buffered one as
its JSON on one line (as before), a streamed one (a generation) as its body's bytes, printed as they arrive,
after one line with the HTTP-integration prelude's JSON (status and headers). A function error is its
``{"errorMessage", "errorType"}`` JSON and exit status 1. The function's logs go to stderr.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO

from tierserve_tools import paths
from tierserve_tools.emulation import lambda_environment
from tierserve_tools.sam import function_spec, load_env_vars, load_template

#: How long the handler's import (the cold start) may take.
INIT_TIMEOUT_S = 120.0
HTTP_INTEGRATION = "application/vnd.awslambda.http-integration-response"
DELIMITER = b"\x00" * 8


def invoke(function_id: str, event_path: Path, template_path: Path | None = None,
           env_vars: Path | None = None, extra_env: dict[str, str] | None = None,
           capture: bool = False, out: BinaryIO | None = None) -> subprocess.CompletedProcess:
    """Invoke once; the answer goes to ``out`` (default: stdout), or with ``capture`` into the result's
    ``stdout`` (text)."""
    template_path = paths.template(template_path).resolve()
    template = load_template(template_path)
    env_vars = paths.local_env(env_vars) if env_vars is not None else paths.default_local_env()
    spec = function_spec(template, function_id, template_path.parent, load_env_vars(env_vars))
    env = lambda_environment(spec.logical_id, spec.memory_mb, spec.timeout_s,
                             {**spec.environment, **(extra_env or {})}, spec.code_uri)
    sink: BinaryIO = io.BytesIO() if capture else (out or sys.stdout.buffer)
    rc = run_once(spec.logical_id, spec.handler, env, float(spec.timeout_s), event_path.read_bytes(), sink)
    text = sink.getvalue().decode("utf-8", "replace") if isinstance(sink, io.BytesIO) else ""
    return subprocess.CompletedProcess([function_id, str(event_path)], rc, stdout=text, stderr="")


def run_once(name: str, handler: str, env: dict[str, str], timeout_s: float, event: bytes, out: BinaryIO) -> int:
    """One cold invocation of ``handler`` through the streaming runtime loop; the answer written to ``out`` as
    it arrives; 0 when the function answered, 1 when it failed."""
    from tierserve_tools.invoke_stream_endpoint import FunctionStreamError
    from tierserve_tools.lambda_endpoint import MAX_PAYLOAD_BYTES, request_too_large
    from tierserve_tools.runtime_api import RuntimeApiEmulator, start_runtime

    if len(event) > MAX_PAYLOAD_BYTES:  # Lambda refuses the event before the handler runs
        out.write(json.dumps(request_too_large(len(event))).encode() + b"\n")
        return 1
    with RuntimeApiEmulator(function_name=name) as api:
        # the function's prints and logs are its logs: stderr, never the answer's stdout
        proc = start_runtime(api, handler, env=env, inherit=False, stdout=sys.stderr, stderr=sys.stderr)
        try:
            if not _initialised(api, proc):
                out.write(json.dumps(api.init_error or {"errorMessage": "the runtime exited during init",
                                                        "errorType": "Runtime.ExitError"}).encode() + b"\n")
                return 1
            inv = api.invoke(json.loads(event), timeout_s)
            try:
                _write(inv.stream(timeout_s + 1.0), inv, out)
            except FunctionStreamError as exc:
                error = inv.error or {"errorMessage": exc.details, "errorType": exc.error_code}
                if inv.mode == "streamed":
                    out.write(b"\n")
                out.write(json.dumps({k: v for k, v in error.items() if k != "stackTrace"}).encode() + b"\n")
                out.flush()
                return 1
            return 0
        finally:
            _stop(proc)


def _initialised(api: Any, proc: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + INIT_TIMEOUT_S
    while not api.polled.wait(0.02):
        if api.init_failed.is_set() or proc.poll() is not None or time.monotonic() > deadline:
            return False
    return True


def _write(chunks: Any, inv: Any, out: BinaryIO) -> None:
    """A buffered answer as its JSON line; a streamed one as its prelude's line, then the body as it comes."""
    buf = b""
    prelude_done = False
    for chunk in chunks:
        if inv.mode != "streamed":
            buf += chunk
            continue
        if prelude_done:
            out.write(chunk)
            out.flush()
            continue
        buf += chunk
        end = buf.find(DELIMITER)
        if end >= 0:
            out.write(buf[:end] + b"\n" + buf[end + len(DELIMITER):])
            out.flush()
            prelude_done, buf = True, b""
    if inv.mode == "streamed" and not prelude_done:
        out.write(buf)
    elif inv.mode != "streamed":
        out.write(buf.rstrip(b"\n") + b"\n")
    out.flush()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    import contextlib
    import os
    import signal

    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    if proc.stdout is not None:
        proc.stdout.close()


def register(subparsers) -> None:  # type: ignore[no-untyped-def]
    p = subparsers.add_parser("invoke", help="invoke a function from template.yaml locally (no Docker)")
    p.add_argument("function_id", help="logical id in template.yaml, e.g. RouterFunction")
    p.add_argument("-e", "--event", required=True, type=Path, help="event JSON file (see events/)")
    p.add_argument("-t", "--template", type=Path, default=None,
                   help="the SAM template (default: ./template.yaml, else the one that ships with tierserve)")
    p.add_argument("-n", "--env-vars", type=Path, default=None,
                   help="SAM-format environment overrides (default: ./events/local-env.json, else the shipped one)")
    p.set_defaults(func=_run)


def _run(args) -> int:  # type: ignore[no-untyped-def]
    if not args.event.is_file():
        print(f"error: event file {args.event} does not exist", file=sys.stderr)
        return 2
    return invoke(args.function_id, args.event, args.template, args.env_vars).returncode
