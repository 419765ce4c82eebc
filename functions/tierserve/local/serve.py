"""`tierserve serve`: the whole stack on loopback, no Docker, no AWS account.

- **API Gateway HTTP API emulation** on ``--port``: each HTTP request becomes a real HTTP API
  payload-2.0 event (binary bodies base64-encoded, as API Gateway does) handed to RouterFunction.
- **A Lambda Invoke endpoint** on the same port (``POST /2015-03-31/functions/{name}/invocations``):
  the router reaches CpuInferenceFunction through boto3 and ``AWS_ENDPOINT_URL_LAMBDA``, the same
  code path as in AWS.
- **Each function runs in its own warm worker process** (``tierserve.local.worker``) with the
  environment template.yaml gives it, so settings and caches are per function, as in Lambda.
- **moto_server** for S3, SQS and DynamoDB: the model store is uploaded to the model bucket, and the
  bucket's ``batch/in/`` ObjectCreated notifications go to an SQS queue that a poller delivers to
  BatchInferenceFunction (as the template's event source mapping does).
- **The real tritonserver** (nvidia-pytriton wheel) over ``MODELS/triton`` when it exists.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tierserve.local.moto import MotoServer
from tierserve.local.sam import function_spec, load_template

BUCKET = "tierserve-models-123456789012-us-east-1"
MODEL_PREFIX = "models"
JOB_TABLE = "tierserve-jobs"
FUNCTIONS = ("RouterFunction", "CpuInferenceFunction", "BatchInferenceFunction")
_INVOKE_RE = re.compile(r"^/2015-03-31/functions/(?P<name>[^/]+)/invocations$")
_TEXT_TYPES = ("application/json", "text/", "application/x-www-form-urlencoded")
AWS_TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}


class FunctionWorker:
    """One warm execution environment: a worker process; one invocation at a time (like Lambda)."""

    def __init__(self, logical_id: str, handler: str, env: dict[str, str], timeout_s: int, log: Any) -> None:
        self.logical_id = logical_id
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tierserve.local.worker", handler], env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1,
            start_new_session=True,  # Ctrl-C reaches `tierserve serve`, which stops workers in order;
        )                            # a worker also exits on its own when its stdin closes
        assert self._proc.stdout is not None
        ready = self._proc.stdout.readline()
        if not ready:
            raise RuntimeError(f"{logical_id} worker failed to start; see its log")

    def invoke(self, event: Any) -> dict[str, Any]:
        with self._lock:
            assert self._proc.stdin is not None and self._proc.stdout is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"{self.logical_id} worker exited with {self._proc.returncode}")
            self._proc.stdin.write(json.dumps({"event": event, "timeout_s": self.timeout_s}) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.logical_id} worker died during the invocation; see its log")
        return json.loads(line)

    def stop(self) -> None:
        if self._proc.poll() is None:
            if self._proc.stdin:
                self._proc.stdin.close()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


def http_api_event(method: str, raw_path: str, query: str, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    """An API Gateway HTTP API payload-format-2.0 event, as API Gateway builds it."""
    from urllib.parse import parse_qsl

    lowered = {k.lower(): v for k, v in headers.items()}
    ctype = lowered.get("content-type", "")
    is_text = not body or ctype.startswith(_TEXT_TYPES)
    now = time.time()
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": raw_path,
        "rawQueryString": query,
        "headers": lowered,
        "requestContext": {
            "accountId": "123456789012", "apiId": "local", "domainName": "localhost", "domainPrefix": "localhost",
            "http": {"method": method, "path": raw_path, "protocol": "HTTP/1.1", "sourceIp": "127.0.0.1",
                     "userAgent": lowered.get("user-agent", "")},
            "requestId": str(uuid.uuid4()), "routeKey": "$default", "stage": "$default",
            "time": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now)), "timeEpoch": int(now * 1000),
        },
        "isBase64Encoded": not is_text,
    }
    if query:
        event["queryStringParameters"] = dict(parse_qsl(query))
    if body:
        event["body"] = body.decode("utf-8") if is_text else base64.b64encode(body).decode()
    return event


class LocalStack:
    """The local stack; a context manager. Each component is optional."""

    def __init__(self, models: Path, port: int = 3000, host: str = "127.0.0.1", triton: bool = True,
                 batch: bool = True, template: Path = Path("template.yaml"), workdir: Path | None = None,
                 env_overrides: dict[str, dict[str, str]] | None = None) -> None:
        self.models = Path(models).resolve()
        self.host, self.port = host, port
        self.want_triton, self.want_batch = triton, batch
        self.template = template
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="tierserve-serve-"))
        self.env_overrides = env_overrides or {}
        self.moto: MotoServer | None = None
        self.triton: Any = None
        self.workers: dict[str, FunctionWorker] = {}
        self.httpd: ThreadingHTTPServer | None = None
        self.queues: dict[str, str] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._logs: list[Any] = []

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # --- lifecycle -----------------------------------------------------------------------------------

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> LocalStack:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        if not (self.models / "manifest.json").is_file():
            raise RuntimeError(f"no manifest.json in {self.models}; compile a model first (tierserve compile)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.moto = MotoServer(self.workdir / "moto.log").start()
        self._provision_aws()
        if self.want_triton and (self.models / "triton").is_dir() and any((self.models / "triton").iterdir()):
            from tierserve.local.triton import TritonServer, build_local_repository

            repo = build_local_repository(self.models / "triton", self.workdir / "triton-repo")
            self.triton = TritonServer(repo, log_path=self.workdir / "triton.log").start()
        self.httpd = ThreadingHTTPServer((self.host, self.port), _handler_class(self))
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._spawn(threading.Thread(target=self.httpd.serve_forever, name="serve-http", daemon=True))
        self.env_file = self._write_env_file()
        for fn in FUNCTIONS:
            if fn == "BatchInferenceFunction" and not self.want_batch:
                continue
            self.workers[fn] = self._worker(fn)
        if self.want_batch:
            self._start_batch_poller()

    def stop(self) -> None:
        self._stop.set()
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None
        for t in self._threads:
            t.join(timeout=10)
        for w in self.workers.values():
            w.stop()
        self.workers.clear()
        if self.triton is not None:
            self.triton.stop()
            self.triton = None
        if self.moto is not None:
            self.moto.stop()
            self.moto = None
        for f in self._logs:
            f.close()
        self._logs.clear()

    def _spawn(self, thread: threading.Thread) -> None:
        self._threads.append(thread)
        thread.start()

    # --- AWS resources in moto_server ------------------------------------------------------------------

    def client(self, service: str) -> Any:
        import boto3

        assert self.moto is not None
        return boto3.client(service, endpoint_url=self.moto.url, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")  # noqa: S106

    def _provision_aws(self) -> None:
        from tierserve.batch.local import create_local_stack, wire_local_notifications

        s3 = self.client("s3")
        self.queues = create_local_stack(s3, self.client("dynamodb"), self.client("sqs"), BUCKET, JOB_TABLE)
        for path in sorted(self.models.rglob("*")):
            rel = path.relative_to(self.models).as_posix()
            if path.is_file() and not rel.startswith(("triton/", ".")) and "/." not in rel:
                s3.upload_file(str(path), BUCKET, f"{MODEL_PREFIX}/{rel}")
        wire_local_notifications(s3, self.client("sqs"), BUCKET, self.queues["queue_url"])

    def function_env(self, logical_id: str) -> dict[str, str]:
        assert self.moto is not None
        common = {
            **AWS_TEST_CREDENTIALS,
            "MODEL_STORE_URI": f"s3://{BUCKET}/{MODEL_PREFIX}",
            "MODEL_CACHE_DIR": str(self.workdir / "cache" / logical_id),
            "AWS_ENDPOINT_URL": self.moto.url,
            "AWS_ENDPOINT_URL_LAMBDA": self.url,
            "CPU_FUNCTION_NAME": "CpuInferenceFunction",
            "TRITON_URL": self.triton.http_url if self.triton is not None else "",
            "JOB_TABLE": JOB_TABLE,
            "CONTINUATION_QUEUE_URL": self.queues.get("jobs_queue_url", ""),
            "POWERTOOLS_TRACE_DISABLED": "true",
        }
        return {**common, **self.env_overrides.get("Parameters", {}), **self.env_overrides.get(logical_id, {})}

    def _write_env_file(self) -> Path:
        """SAM `--env-vars` format, so `tierserve invoke FN -e EVENT --env-vars FILE` uses this stack."""
        path = self.workdir / "env.json"
        path.write_text(json.dumps({fn: self.function_env(fn) for fn in FUNCTIONS}, indent=2))
        return path

    def _worker(self, logical_id: str) -> FunctionWorker:
        template = load_template(self.template)
        spec = function_spec(template, logical_id, self.template.parent, {logical_id: self.function_env(logical_id)})
        env = {k: v for k, v in os.environ.items() if not k.startswith(("POWERTOOLS_", "AWS_"))}
        env.update({"AWS_LAMBDA_FUNCTION_NAME": logical_id, "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(spec.memory_mb),
                    "AWS_LAMBDA_FUNCTION_TIMEOUT": str(spec.timeout_s), "AWS_SAM_LOCAL": "true"})
        env.update(spec.environment)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(spec.code_uri), os.environ.get("PYTHONPATH", "")]))
        log = open(self.workdir / f"{logical_id}.log", "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        return FunctionWorker(logical_id, spec.handler, env, spec.timeout_s, log)

    def _start_batch_poller(self) -> None:
        from tierserve.batch.local import poll_queue_forever

        worker = self.workers["BatchInferenceFunction"]

        def handler(event: dict, context: Any) -> Any:
            reply = worker.invoke(event)
            if "error" in reply:
                raise RuntimeError(reply["error"]["errorMessage"])
            return reply["result"]

        for key in ("queue_url", "jobs_queue_url"):
            self._spawn(threading.Thread(
                target=poll_queue_forever, args=(self.queues[key], handler, self._stop),
                kwargs={"sqs_client": self.client("sqs")}, name=f"serve-poll-{key}", daemon=True))

    # --- request handling -------------------------------------------------------------------------

    def invoke(self, logical_id: str, event: Any) -> dict[str, Any]:
        worker = self.workers.get(logical_id)
        if worker is None:
            raise KeyError(logical_id)
        return worker.invoke(event)

    def describe(self) -> str:
        triton = f"triton {self.triton.http_url}" if self.triton is not None else "none"
        return (f"tierserve serve: ready on {self.url} (cpu: lambda-invoke CpuInferenceFunction, gpu: {triton}, "
                f"s3/sqs/dynamodb: moto {self.moto.url if self.moto else '-'}, bucket {BUCKET}, "
                f"env for tierserve invoke: {self.env_file})")


def _handler_class(stack: LocalStack) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "tierserve-local"

        def log_message(self, format: str, *args: Any) -> None:  # quiet: functions log to their own files
            pass

        def _body(self) -> bytes:
            length = int(self.headers.get("content-length") or 0)
            return self.rfile.read(length) if length else b""

        def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
            self.send_response(status)
            for k, v in headers.items():
                if k.lower() not in ("content-length", "connection", "transfer-encoding"):
                    self.send_header(k, v)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _dispatch(self) -> None:
            path, _, query = self.path.partition("?")
            body = self._body()
            m = _INVOKE_RE.match(path)
            if m and self.command == "POST":
                return self._lambda_invoke(m.group("name"), body)
            reply = stack.invoke("RouterFunction", http_api_event(self.command, path, query, dict(self.headers), body))
            if "error" in reply:  # API Gateway answers 500 when the integration fails
                return self._send(500, {"content-type": "application/json"}, b'{"message":"Internal Server Error"}')
            resp = reply["result"]
            raw = resp.get("body") or ""
            payload = base64.b64decode(raw) if resp.get("isBase64Encoded") else raw.encode("utf-8")
            return self._send(int(resp.get("statusCode", 200)), dict(resp.get("headers") or {}), payload)

        def _lambda_invoke(self, name: str, body: bytes) -> None:
            name = name.rsplit(":", 1)[-1]  # accept ARNs
            try:
                reply = stack.invoke(name, json.loads(body or b"{}"))
            except KeyError:
                msg = {"Type": "User", "message": f"Function not found: {name}"}
                return self._send(404, {"x-amzn-errortype": "ResourceNotFoundException"}, json.dumps(msg).encode())
            headers = {"content-type": "application/json", "x-amz-executed-version": "$LATEST"}
            if "error" in reply:
                headers["x-amz-function-error"] = "Unhandled"
                return self._send(200, headers, json.dumps(reply["error"]).encode())
            return self._send(200, headers, json.dumps(reply["result"]).encode())

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _dispatch  # noqa: N815

    return Handler


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="run the whole stack on loopback (API, functions, Triton, moto)")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--models", type=Path, default=Path("build/models"))
    p.add_argument("--no-triton", action="store_true", help="do not start the local tritonserver")
    p.add_argument("--no-batch", action="store_true", help="no BatchInferenceFunction or queue poller")
    p.add_argument("--workdir", type=Path, default=Path("build/serve"), help="logs, caches, env.json")
    p.set_defaults(func=run)


def run(args: Any) -> int:
    if args.workdir.exists():
        shutil.rmtree(args.workdir / "triton-repo", ignore_errors=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with LocalStack(args.models, port=args.port, host=args.host, triton=not args.no_triton,
                    batch=not args.no_batch, workdir=args.workdir) as stack:
        print(stack.describe(), flush=True)
        stop.wait()
        print("tierserve serve: shutting down", file=sys.stderr, flush=True)
    return 0
