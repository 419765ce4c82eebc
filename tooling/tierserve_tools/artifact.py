"""`tierserve artifact-invoke`: what `sam build` + `sam local invoke` prove, without Docker.

`sam local invoke` runs a function's *built artifact* in a container: only the artifact in
``/var/task`` (read-only), Lambda's runtime (which brings boto3) beside it, the environment from
template.yaml and ``--env-vars``, one event. Whatever the developer's virtualenv holds is not there.
This module does the same on the host:

1. **build** the artifact with the same ``functions/Makefile`` target SAM runs (``BuildMethod: makefile``;
   :mod:`tierserve_tools.lambda_build`: the requirements' wheels and the modules the handler can reach), for
   the host's architecture and Python (``ARCH``, ``PYTHON_VERSION``; SAM builds arm64 / 3.12 for Lambda),
   into ``ARTIFACTS_DIR``;
2. **runtime**: boto3 and botocore installed on their own, standing in for ``/var/runtime`` (the
   Makefile strips them from artifacts because Lambda's Python runtime provides them);
3. **invoke** the handler in an isolated interpreter (``python -I -S -B``: no site-packages, no
   user site, no PYTHONPATH, no bytecode writes) whose ``sys.path`` is the artifact, the runtime
   folder and the standard library, nothing else; working directory the artifact; the function's
   environment as SAM builds it. The artifact's tree is fingerprinted before and after each run, and
   any file created or changed fails the run (``/var/task`` is read-only in Lambda).

``serve_invoke_api`` answers Lambda's Invoke API by running CpuInferenceFunction's artifact the same
way, so RouterFunction's artifact reaches the CPU tier through boto3 as under `sam local start-lambda`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tierserve.errors import ConfigurationError
from tierserve_tools import paths

#: What Lambda's Python runtime provides next to /var/task (the Makefile strips these from artifacts).
RUNTIME_PACKAGES = ("boto3", "botocore")
INVOKE_PATH = re.compile(r"^/2015-03-31/functions/(?P<name>[^/]+)/invocations/?$")

#: How every isolated boot program starts, after its imports (json, os, sys, time, uuid): argv = [task, runtime,
#: handler] read and put on sys.path, the artifact as working directory, a Lambda context with the function's
#: name, memory and timeout, the event from stdin, and the real stdout kept as ``real_stdout`` (the program
#: writes its one result line there). ``bench/cold_start_s3``'s GENERATE_BOOT starts with it too.
BOOT_PRELUDE = r"""task, runtime, handler = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path[:0] = [task, runtime]
os.chdir(task)
class Context:
    def __init__(self):
        self.function_name = os.environ.get("AWS_LAMBDA_FUNCTION_NAME", "function")
        self.function_version = "$LATEST"
        self.memory_limit_in_mb = int(os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128"))
        self.invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:" + self.function_name
        self.aws_request_id = str(uuid.uuid4())
        self.log_group_name = "/aws/lambda/" + self.function_name
        self.log_stream_name = "artifact"
        self._deadline = time.monotonic() + float(os.environ.get("AWS_LAMBDA_FUNCTION_TIMEOUT", "3"))
    def get_remaining_time_in_millis(self):
        return max(0, int((self._deadline - time.monotonic()) * 1000))
event = json.loads(sys.stdin.read())
real_stdout = sys.stdout
"""
#: The isolated interpreter's program: argv = [task, runtime, handler]; the event on stdin; the result (or
#: {"errorMessage", "errorType"}) as the last stdout line. Nothing from tierserve_tools is importable there.
BOOT = r"""
import json, os, sys, time, traceback, uuid
""" + BOOT_PRELUDE + r"""sys.stdout = sys.stderr  # the function's prints and EMF metrics are its logs
timings = {}
try:
    t0 = time.perf_counter()
    module, _, name = handler.rpartition(".")
    fn = getattr(__import__(module, fromlist=[name]), name)
    t1 = time.perf_counter()
    out = {"result": fn(event, Context())}
    timings = {"init_s": t1 - t0, "invoke_s": time.perf_counter() - t1}
except Exception as exc:
    traceback.print_exc()
    out = {"error": {"errorMessage": str(exc), "errorType": type(exc).__name__}}
out["timings"] = timings
real_stdout.write(json.dumps(out) + "\n")
real_stdout.flush()
"""


def host_arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def host_python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def build(logical_id: str, out_dir: Path, functions_dir: Path = Path("functions"), arch: str | None = None,
          python_version: str | None = None) -> Path:
    """``make -C functions build-LOGICAL_ID ARTIFACTS_DIR=out_dir`` for the host (what `sam build` runs)."""
    out_dir = Path(out_dir).resolve()
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    cmd = ["make", "-s", "-C", str(functions_dir), f"build-{logical_id}", f"ARTIFACTS_DIR={out_dir}",
           f"ARCH={arch or host_arch()}", f"PYTHON_VERSION={python_version or host_python()}",
           f"PIP={sys.executable} -m pip"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ConfigurationError(f"building {logical_id} failed ({' '.join(cmd)}):\n{done.stdout[-2000:]}"
                                 f"{done.stderr[-4000:]}")
    return out_dir


def runtime_dir(cache: Path) -> Path:
    """boto3 and botocore on their own (what Lambda's runtime provides), installed once into ``cache``."""
    cache = Path(cache)
    marker = cache / ".installed"
    if marker.is_file():
        return cache
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--target", str(cache), "--only-binary=:all:",
           *RUNTIME_PACKAGES]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ConfigurationError(f"installing the Lambda runtime's packages failed:\n{done.stderr[-3000:]}")
    marker.touch()
    return cache


def fingerprint(tree: Path) -> str:
    """Names, sizes and modification times of every entry under ``tree``: any write changes it."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(tree):
        dirs.sort()
        for name in sorted(files) + [f"{d}/" for d in dirs]:
            p = Path(root) / name.rstrip("/")
            st = p.lstat()
            h.update(f"{p.relative_to(tree)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


@dataclass
class Invocation:
    result: Any = None
    error: dict[str, Any] | None = None
    logs: str = ""
    #: init_s: importing the handler's module (Lambda's init phase); invoke_s: the first invocation
    timings: dict[str, float] | None = None


def invoke(task: Path, runtime: Path, handler: str, event: Any, env: dict[str, str],
           timeout_s: float = 60.0) -> Invocation:
    """Run ``handler`` from the artifact ``task`` in an isolated interpreter (see the module docstring)."""
    task, runtime = Path(task).resolve(), Path(runtime).resolve()
    before = fingerprint(task)
    clean = {k: v for k, v in env.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    clean.setdefault("PATH", "/usr/bin:/bin")
    done = subprocess.run([sys.executable, "-I", "-S", "-B", "-c", BOOT, str(task), str(runtime), handler],
                          input=json.dumps(event), capture_output=True, text=True, env=clean, cwd=task,
                          timeout=timeout_s, check=False)
    after = fingerprint(task)
    if before != after:
        raise ConfigurationError(f"{handler} wrote into its artifact {task}; Lambda's /var/task is read-only")
    lines = [ln for ln in done.stdout.splitlines() if ln.strip()]
    if not lines:
        return Invocation(error={"errorMessage": f"the runtime exited with {done.returncode}",
                                 "errorType": "Runtime.ExitError"}, logs=done.stderr)
    reply = json.loads(lines[-1])
    return Invocation(reply.get("result"), reply.get("error"), done.stderr, reply.get("timings"))


class InvokeApi:
    """Lambda's Invoke API on loopback for artifacts: each invocation runs its function's artifact cold,
    isolated (``invoke``). ``functions``: logical id -> (task dir, handler, environment)."""

    def __init__(self, functions: dict[str, tuple[Path, str, dict[str, str]]], runtime: Path) -> None:
        self.functions = functions
        self.runtime = runtime
        self.invocations: list[str] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                m = INVOKE_PATH.match(self.path.split("?", 1)[0])
                name = m.group("name").split(":")[-1] if m else ""
                headers = {"Content-Type": "application/json"}
                if name not in api.functions:
                    status, body = 404, {"Type": "User", "message": f"Function not found: {name}"}
                    headers["x-amzn-ErrorType"] = "ResourceNotFoundException"
                else:
                    task, handler, env = api.functions[name]
                    api.invocations.append(name)
                    run = invoke(task, api.runtime, handler, json.loads(raw or b"{}"), env)
                    status, body = 200, run.result if run.error is None else run.error
                    if run.error is not None:
                        headers["X-Amz-Function-Error"] = "Unhandled"
                data = json.dumps(body).encode()
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def __enter__(self) -> InvokeApi:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def sam_environment(template_path: Path, logical_id: str, env_vars: Path | None,
                    hosts: dict[str, str] | None = None) -> tuple[str, dict[str, str], int]:
    """(handler, environment, timeout) as `sam local invoke` gives the function: Lambda's own variables,
    template.yaml's, then the env-vars file's. ``hosts`` rewrites URLs in it (a SAM container reaches the
    host as ``host.docker.internal``; this host reaches its services on their own ports)."""
    from tierserve_tools.emulation import lambda_environment
    from tierserve_tools.sam import function_spec, load_env_vars, load_template

    spec = function_spec(load_template(template_path), logical_id, template_path.parent, load_env_vars(env_vars),
                         only_declared=True)
    # SAM passes the shell's AWS credentials and region into the container (samcli's _get_aws_variables).
    shell = {k: v for k, v in os.environ.items() if k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                          "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION")}
    env = lambda_environment(spec.logical_id, spec.memory_mb, spec.timeout_s, spec.environment,
                             base={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **shell})
    for old, new in (hosts or {}).items():
        env = {k: v.replace(old, new) for k, v in env.items()}
    return spec.handler, env, spec.timeout_s


# --- CLI -----------------------------------------------------------------------------------------


def register(subparsers) -> None:  # type: ignore[no-untyped-def]
    p = subparsers.add_parser("artifact-invoke", help="build a function's artifact as sam build does and invoke "
                                                      "it isolated, as sam local invoke does (no Docker)")
    p.add_argument("function_id", help="the function's logical id in the template, e.g. RouterFunction")
    p.add_argument("-e", "--event", required=True, type=Path, help="the event JSON to invoke it with (see events/)")
    p.add_argument("-n", "--env-vars", type=Path, default=None,
                   help="SAM-format environment (default: ./events/sam-env.json, else the shipped one)")
    p.add_argument("-t", "--template", type=Path, default=None,
                   help="the SAM template (default: ./template.yaml, else the one that ships with tierserve)")
    p.add_argument("--build-dir", type=Path, default=Path("build/artifacts"),
                   help="where the function's artifact is built (one folder per function)")
    p.add_argument("--host", action="append", default=[], metavar="FROM=TO",
                   help="rewrite a URL in the environment, e.g. http://host.docker.internal:5000=http://127.0.0.1:5000")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    hosts = dict(h.split("=", 1) for h in args.host if "=" in h)
    template = paths.template(args.template).resolve()
    handler, env, timeout = sam_environment(template, args.function_id, paths.sam_env(args.env_vars), hosts)
    functions = template.parent / "functions"
    if not (functions / "Makefile").is_file():
        functions = paths.require_repo_root("building a function's artifact") / "functions"
    task = build(args.function_id, args.build_dir / args.function_id, functions)
    runtime = runtime_dir(args.build_dir / ".lambda-runtime")
    with contextlib.suppress(KeyboardInterrupt):
        run = invoke(task, runtime, handler, json.loads(args.event.read_text()), env, timeout + 5)
        sys.stderr.write(run.logs)
        print(json.dumps(run.error if run.error is not None else run.result))
        return 0 if run.error is None else 1
    return 130
