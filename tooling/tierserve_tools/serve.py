"""`tierserve serve`: the whole stack on loopback, with no Docker and no AWS account.

* **API Gateway HTTP API** (``tierserve_tools.apigw``): every HTTP request becomes a real
  payload-format-2.0 event and is handed to RouterFunction's handler, in this process, with a
  LambdaContext-like object (30 s, API Gateway's integration limit).
* **The streaming REST API** on the same port (``apigw.REST_ROUTES``: ``/v1/...`` and Triton's generate
  extension, G4's StreamingApi): payload-format-1.0 events to RouterFunction in its own execution
  environments running the streaming runtime loop, its answer relayed chunk by chunk (15 minutes, 5 minutes
  idle). ``--auth keys`` checks a bearer API key there (``tierserve keys --stack WORKDIR`` makes one);
  ``--auth jwt`` an ID token of a Cognito user pool on moto_server, as API Gateway's Cognito authorizer does
  (``tierserve_tools.jwt_auth``; ``LocalStack.id_token(user)`` signs a user in).
* **Lambda Invoke endpoint** (``tierserve_tools.lambda_endpoint``, on its own port, never the API's):
  CpuInferenceFunction (and
  BatchInferenceFunction) in warm execution environments running the streaming runtime loop that
  ``AWS_LAMBDA_EXEC_WRAPPER`` starts in AWS, each with its own environment from template.yaml. The router
  runs with ``CPU_BACKEND=lambda`` and reaches it with boto3 ``Invoke`` (``InvokeWithResponseStream`` for a
  generation) through ``AWS_ENDPOINT_URL_LAMBDA``, the same code path as in AWS.
* **Triton**: the real ``tritonserver`` from the nvidia-pytriton wheel over ``MODELS/triton``
  (converted for the local Python backend by ``tierserve_tools.triton``), when both exist.
* **GPU tier as SageMaker** (``gpu_tier="sagemaker"``, ``--gpu-tier sagemaker``): the GPU model's
  Triton container (the same tritonserver with its SageMaker front end, one single-model endpoint)
  behind a local SageMaker Runtime ``InvokeEndpoint`` (``tierserve_tools.sagemaker``) on its own
  port; the router and batch functions use the ``sagemaker`` backend through
  ``AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME``, the same code path as in AWS.
* **S3** (optional, ``--s3``): a ``moto_server``; the models folder is uploaded to a bucket and
  every function reads ``MODEL_STORE_URI=s3://...``. With batch (the default), the batch queues
  are created, S3 notifications wired (``tierserve_tools.batch``), and pollers feed
  BatchInferenceFunction and BatchGenerateFunction (the OpenAI batch jobs BatchInferenceFunction hands to its queue
  through ``GENERATION_JOBS_QUEUE_URL``, issue 19). The same moto_server serves CloudWatch (the functions' metrics) and
  DynamoDB (rollouts), with ``--no-s3`` too.
* **Operations** (``tierserve_tools.stack_ops``): the functions' EMF metrics into moto's CloudWatch and
  on ``GET /metrics`` (with Triton's), and the local Triton loading the versions the store lists.

Function environments come from template.yaml (``tierserve_tools.sam.function_spec``) with
``events/local-env.json``-style overrides, then the local endpoints. ``LocalStack`` is the same
stack as a context manager for tests; each component is optional.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tierserve import ports
from tierserve.errors import ConfigurationError, TierserveError
from tierserve_tools import batch as batch_local
from tierserve_tools import paths
from tierserve_tools.apigw import INTEGRATION_TIMEOUT_S, ApiGatewayServer, context_factory
from tierserve_tools.emulation import lambda_environment
from tierserve_tools.lambda_endpoint import FunctionError, LambdaEndpoint, LocalFunction
from tierserve_tools.sam import FunctionSpec, function_spec, load_env_vars, load_template
from tierserve_tools.signals import stop_on_signals
from tierserve_tools.stack_ops import ROLLOUT_TABLE, TRITON_EXPLICIT, StackOps, create_rollout_table
from tierserve_tools.triton import RESTART_BACKOFF_S

ROUTER, CPU, BATCH = "RouterFunction", "CpuInferenceFunction", "BatchInferenceFunction"
#: OpenAI batch jobs (issue 19): BatchInferenceFunction hands them to this function's queue, as in AWS
GENERATE = "BatchGenerateFunction"
FUNCTIONS = (ROUTER, CPU, BATCH, GENERATE)
#: The CPU memory classes' functions (tierserve.memory_classes), as template.yaml names them. Locally every class
#: the template defines runs (workers start on first use); in AWS only those tierserve deploy-config enables.
CPU_CLASSES = {1769: CPU, 3538: "CpuInferenceFunction3538", 5307: "CpuInferenceFunction5307",
               10240: "CpuInferenceFunction10240"}
#: The model bucket's name as template.yaml gives it for account 123456789012 in us-east-1.
BUCKET = "tierserve-models-123456789012-us-east-1"
MODEL_PREFIX = "models"
JOB_TABLE = "tierserve-jobs"
AUTH_MODES = ("none", "iam", "keys", "jwt")
_AWS_LOCAL = {
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
    "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
}  # fmt: skip


class LocalStack:
    """The local tierserve stack; ``with LocalStack(DIR, port=0) as stack: stack.url``.

    Parameters (every component is optional):
        models: the compiler's output folder (``manifest.json``, ``NAME/VERSION/*.onnx``, ``triton/``).
        port, host: where the API listens; port 0 = a free port.
        invoke_port: where the Lambda Invoke API listens (AWS_ENDPOINT_URL_LAMBDA); 0 = a free port; None = ``port``
            + 1 (what `tierserve serve` does without --invoke-port; a free port when ``port`` is 0).
        triton: True = a local tritonserver over ``models/triton`` when it exists and the wheel is
            installed; False = no GPU tier; a started ``TritonServer`` = use that one (the caller's).
        s3: serve the models from a moto_server bucket (as in AWS) instead of the folder.
        batch: with ``s3``, the batch queues, the S3 -> SQS wiring and pollers for BatchInferenceFunction.
        env_overrides: SAM ``--env-vars`` format ({"Parameters": {...}, "<LogicalId>": {...}}), applied
            over template.yaml, ``env_vars`` (a file; default events/local-env.json) and the local wiring.
        env: extra variables for every function (e.g. {"BREAKER_COOLDOWN_S": "2"}).
        router_inprocess: call RouterFunction's handler in this process (default, as the API
            emulation does); False = in a worker process like the other functions.
        cpu_workers: concurrent execution environments for CpuInferenceFunction.
        router_workers: RouterFunction's concurrent execution environments (the streaming REST API's always; the
            HTTP API's too with ``router_inprocess=False``)
            (Lambda's concurrency: each one invocation at a time, so throughput scales with them).
        auth: "iam" = the API verifies SigV4 signatures made with the local credentials (403 otherwise),
            as the deployed API does; "keys" = the streaming REST API's routes need ``Authorization: Bearer
            <tierserve API key>`` (a keys table on moto, as ``ApiAuth=keys`` deploys it; 401 otherwise); "jwt" =
            they need an ID token of a user pool on moto (``ApiAuth=jwt``'s Cognito authorizer; :meth:`id_token`);
            "none" (default) = no authorization, for plain tritonclient.
        triton_restart_backoff_s: the Triton supervisor's first restart delay and the most it doubles to, after
            the stack's tritonserver exits on its own (``stack_ops``); ``on_triton_event`` hears each exit and
            restart as a line of text (``triton_events`` keeps them).
        gpu_tier: "triton" (the router calls Triton's KServe API) or "sagemaker" (InvokeEndpoint on a
            local SageMaker endpoint running the same Triton); ``sagemaker_model`` names the endpoint's
            model (default: the only, or first, GPU model).
    """

    def __init__(self, models: Path | str = Path("build/models"), port: int = 3000, host: str = "127.0.0.1",
                 triton: Any = True, batch: bool = True, template: Path | str | None = None,
                 workdir: Path | None = None, env_overrides: dict[str, dict[str, str]] | None = None, *,
                 s3: bool = True, env: dict[str, str] | None = None, env_vars: Path | str | None = None,
                 router_inprocess: bool = True, cpu_workers: int = 2, auth: str = "none",
                 invoke_port: int | None = 0, router_workers: int = 4, gpu_tier: str = "triton",
                 sagemaker_model: str | None = None, batch_workers: int = 1,
                 triton_restart_backoff_s: tuple[float, float] = RESTART_BACKOFF_S,
                 on_triton_event: Callable[[str], None] | None = None) -> None:
        if gpu_tier not in ("triton", "sagemaker"):
            raise ConfigurationError(f"gpu_tier must be 'triton' or 'sagemaker', not {gpu_tier!r}")
        self.models = Path(models).resolve()
        self.host, self.port = host, port
        self.triton_option = triton
        self.s3 = s3
        self.want_batch = batch and s3
        self.template = paths.template(template).resolve()
        self._tmp_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="tierserve-serve-"))
        self.env_overrides = env_overrides or {}
        self.extra_env = {k: str(v) for k, v in (env or {}).items()}
        self.env_vars = paths.local_env(env_vars) if env_vars else paths.default_local_env()
        self.router_inprocess = router_inprocess
        self.cpu_workers = cpu_workers
        self.router_workers = max(1, router_workers)
        if auth not in AUTH_MODES:
            raise ConfigurationError(f"auth {auth!r} is not known; use one of {', '.join(AUTH_MODES)}")
        self.auth = auth
        self.jwt_pool: tuple[str, str, str] | None = None  # --auth jwt: (user pool id, app client id, issuer)
        self.invoke_port_derived = invoke_port is None  # --port + 1: said in the startup lines and when busy
        self.invoke_port = (port + 1 if port else 0) if invoke_port is None else invoke_port
        self.triton: Any = None
        self.gpu_tier = gpu_tier
        self.batch_workers = max(1, batch_workers)
        self.triton_restart_backoff_s = triton_restart_backoff_s
        self.on_triton_event = on_triton_event
        self.triton_events: list[str] = []
        self.sagemaker_model = sagemaker_model
        self.sagemaker: Any = None  # the local SageMaker Runtime (gpu_tier="sagemaker")
        self.endpoint_model = ""  # "name/version" the local endpoint serves
        self.moto: Any = None
        self.lambda_endpoint: LambdaEndpoint | None = None
        self.api: ApiGatewayServer | None = None
        self.queues: dict[str, str] = {}
        self.model_store_uri = ""
        self.env_file: Path | None = None
        self.notes: list[str] = []
        self._own_triton = False
        self._saved_env: dict[str, str] | None = None
        self._router_log: Any = None
        self._router_log_restore: Any = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.ops: Any = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def invoke_url(self) -> str:
        """The Lambda Invoke API (AWS_ENDPOINT_URL_LAMBDA), on its own port."""
        assert self.lambda_endpoint is not None
        return self.lambda_endpoint.url

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

    # --- start ---------------------------------------------------------------------------------------

    def _start(self) -> None:
        if not (self.models / "manifest.json").is_file():
            raise ConfigurationError(f"no manifest.json in {self.models}; compile a model first (tierserve compile)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        template = load_template(self.template)
        file_overrides = load_env_vars(self.env_vars)
        self._bind_ports()
        self._start_triton()
        self.model_store_uri = str(self.models)
        self._start_moto()
        envs = {fn: self.function_env(fn) for fn in FUNCTIONS}
        self.env_file = self.workdir / "env.json"
        self.env_file.write_text(json.dumps(envs, indent=2))
        specs = {fn: self._spec(template, file_overrides, fn, envs[fn]) for fn in FUNCTIONS}
        functions = [self._local_function(specs[CPU], max_workers=self.cpu_workers)]
        for name in self.cpu_classes.values():
            if name != CPU:
                env = {**self.function_env(CPU), **self.env_overrides.get(name, {})}
                functions.append(self._local_function(self._spec(template, file_overrides, name, env),
                                                      max_workers=self.cpu_workers))
        if self.want_batch:
            functions.append(self._local_function(specs[BATCH], max_workers=self.batch_workers))
            functions.append(self._local_function(specs[GENERATE], max_workers=self.batch_workers))
        # RouterFunction's own environments: the streaming REST API always runs it there (through the streaming
        # runtime loop), and the HTTP API too unless it runs in this process
        functions.append(self._local_function(specs[ROUTER], max_workers=self.router_workers))
        assert self.lambda_endpoint is not None and self.api is not None  # bound by _bind_ports
        for fn in functions:
            self.lambda_endpoint.add(fn)
        if self.router_inprocess:
            self._router = self._inprocess_router(specs[ROUTER])
        self.ops = StackOps(self, FUNCTIONS).start()
        self.api.start()
        if self.want_batch:
            self._start_batch_pollers()

    def _bind_ports(self) -> None:
        """The API's port, then the Invoke API's on a port of its own (the functions need AWS_ENDPOINT_URL_LAMBDA;
        API clients never reach a function directly): bound first, so that a busy one fails before anything
        starts, with the port and the flag that moves it."""
        with ports.naming(self.host, self.port, "--port", "the API"):
            self.api = ApiGatewayServer(self._route_http, lambda: None, self.host, self.port,
                                        extra=self._local_pages, authorizer=self._authorizer(), rest=self._route_rest,
                                        rest_authorizer=self._rest_authorizer())
        self.port = self.api.port
        note = f"it is --port {self.port} + 1, the default of --invoke-port" if self.invoke_port_derived else ""
        with ports.naming(self.host, self.invoke_port, "--invoke-port", "the Lambda Invoke API", note):
            self.lambda_endpoint = LambdaEndpoint([], host=self.host, port=self.invoke_port).start()
        where = "--port + 1" if self.invoke_port_derived and self.invoke_port else "--invoke-port"
        self.notes.append(f"Lambda Invoke API on port {self.lambda_endpoint.port} ({where})")

    def _authorizer(self) -> Any:
        if self.auth != "iam":
            return None
        from tierserve_tools.sigv4 import iam_authorizer

        self.notes.append("auth: iam (SigV4, local credentials)")
        return iam_authorizer({_AWS_LOCAL["AWS_ACCESS_KEY_ID"]: _AWS_LOCAL["AWS_SECRET_ACCESS_KEY"]},
                              _AWS_LOCAL["AWS_REGION"])

    def _rest_authorizer(self) -> Any:
        """``--auth keys``: the streaming REST API's bearer-key check (``tierserve_tools.keys_auth``) against the
        keys table on this stack's moto_server; the key's caller is the authorizer's context, as in AWS.
        ``--auth jwt``: the Cognito authorizer's check (``tierserve_tools.jwt_auth``) of the local user pool's ID
        tokens; the token's claims are the context."""
        if self.auth == "jwt":
            return self._jwt_authorizer()
        if self.auth != "keys":
            return None
        from tierserve import keys
        from tierserve_tools.keys_auth import keys_authorizer
        from tierserve_tools.keys_cli import LOCAL_TABLE

        self.notes.append(f"auth: keys (Bearer API keys in {LOCAL_TABLE} on moto; tierserve keys --stack "
                          f"{self.workdir} create --caller NAME)")
        stores: list[Any] = []

        def store() -> Any:
            if not stores:
                stores.append(keys.KeyStore(LOCAL_TABLE, self.client("dynamodb")))
            return stores[0]

        def authorize(method: str, target: str, headers: dict[str, str], body: bytes) -> Any:
            denied = keys_authorizer(store())(method, target, headers, body)
            if denied is not None:
                return denied
            key = store().lookup(keys.bearer_token(keys.header(headers, "Authorization")))
            if key is None:  # revoked between the two reads
                return keys_authorizer(store())(method, target, {}, body)
            return {"caller": key.caller, "key_id": key.key_id, "principalId": key.caller}

        return authorize

    def _jwt_authorizer(self) -> Any:
        from tierserve_tools.jwt_auth import cognito_authorizer

        checks: list[Any] = []

        def authorize(method: str, target: str, headers: dict[str, str], body: bytes) -> Any:
            if not checks:  # the pool is made with moto_server, after the API's port is bound
                assert self.jwt_pool is not None and self.moto is not None
                pool, _, issuer = self.jwt_pool
                checks.append(cognito_authorizer(issuer, f"{self.moto.url}/{pool}/.well-known/jwks.json"))
            return checks[0](method, target, headers, body)

        return authorize

    def id_token(self, username: str) -> str:
        """``--auth jwt``: sign ``username`` in to the local user pool (made if new) and return its ID token, the
        bearer token (the openai SDK's ``api_key``) the streaming REST API takes."""
        from tierserve_tools.jwt_auth import id_token

        assert self.jwt_pool is not None, "the stack runs without --auth jwt"
        pool, client, _ = self.jwt_pool
        return id_token(self.client("cognito-idp"), pool, client, username)

    @property
    def cpu_classes(self) -> dict[int, str]:
        """The CPU class functions template.yaml defines: memory class (MB) -> logical id."""
        resources = (load_template(self.template).get("Resources") or {}) if self.template.is_file() else {}
        return {mb: fn for mb, fn in CPU_CLASSES.items() if fn in resources}

    def function_env(self, logical_id: str) -> dict[str, str]:
        """What `tierserve serve` sets for a function, over template.yaml (also written to env.json)."""
        env = {
            "MODEL_STORE_URI": self.model_store_uri,
            "MODEL_CACHE_DIR": str(self.workdir / "cache" / logical_id),
            "TRITON_URL": self.triton.http_url if self.triton is not None and self.sagemaker is None else "",
            "TRITON_PROTOCOL": "http",
            "POWERTOOLS_TRACE_DISABLED": "true",
        }
        if logical_id == GENERATE:  # it runs models on its own CPUs only (template.yaml: GPU_BACKEND none)
            env["TRITON_URL"] = ""
        elif self.sagemaker is not None:
            from tierserve_tools.sagemaker import ENDPOINT_NAME

            env.update({"GPU_BACKEND": "sagemaker", "SAGEMAKER_ENDPOINT_NAME": ENDPOINT_NAME,
                        "SAGEMAKER_MODEL": self.endpoint_model,
                        "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME": self.sagemaker.url, **_AWS_LOCAL})
        if logical_id == ROUTER:
            env.update({"CPU_BACKEND": "lambda", "CPU_FUNCTION_NAME": CPU, "AWS_ENDPOINT_URL_LAMBDA": self.invoke_url,
                        "CPU_FUNCTIONS": ",".join(f"{mb}={fn}" for mb, fn in self.cpu_classes.items()),
                        **_AWS_LOCAL})
            if self.auth == "keys":
                from tierserve_tools.keys_cli import LOCAL_TABLE

                env["KEYS_TABLE"] = LOCAL_TABLE
        else:
            env["CPU_BACKEND"] = "inprocess"
        if self.moto is not None:
            env.update({**_AWS_LOCAL, "AWS_ENDPOINT_URL_S3": self.moto.url, "AWS_ENDPOINT_URL_SQS": self.moto.url,
                        "AWS_ENDPOINT_URL_DYNAMODB": self.moto.url, "AWS_ENDPOINT_URL_CLOUDWATCH": self.moto.url,
                        "AWS_ENDPOINT_URL_STS": self.moto.url, "ROLLOUT_TABLE": ROLLOUT_TABLE})
            if logical_id == ROUTER:  # issue 18: usage per caller and token budgets, as the router has them in AWS
                env.update(self._usage_env())
        if self.queues and logical_id in (ROUTER, BATCH):  # the JobTable exists: share the GPU tier's health
            env["TIER_HEALTH_TABLE"] = JOB_TABLE
        if logical_id == BATCH and self.queues:
            env.update({"JOB_TABLE": JOB_TABLE, "CONTINUATION_QUEUE_URL": self.queues["jobs_queue_url"],
                        "GENERATION_JOBS_QUEUE_URL": self.queues["generate_queue_url"]})
        if logical_id == GENERATE and self.queues:  # its continuations and shards stay on its own queue
            env.update({"JOB_TABLE": JOB_TABLE, "CONTINUATION_QUEUE_URL": self.queues["generate_queue_url"]})
        env.update(self.extra_env)
        env.update(self.env_overrides.get("Parameters", {}))
        env.update(self.env_overrides.get(logical_id, {}))
        return {k: str(v) for k, v in env.items()}

    def _usage_env(self) -> dict[str, str]:
        """RouterFunction's usage table (on moto_server, made by _start_moto) and the default budgets of
        template.yaml's TokensPerMinute / TokensPerDay (``--env TOKENS_PER_MINUTE=N`` overrides them), so that
        ``tierserve serve`` enforces budgets (429 with Retry-After) and ``tierserve usage --stack`` reads real usage."""
        from tierserve_tools.usage_cli import LOCAL_TABLE

        params = (load_template(self.template).get("Parameters") or {}) if self.template.is_file() else {}
        env = {"USAGE_TABLE": LOCAL_TABLE}
        for var, param in (("TOKENS_PER_MINUTE", "TokensPerMinute"), ("TOKENS_PER_DAY", "TokensPerDay")):
            default = (params.get(param) or {}).get("Default")
            if default is not None:
                env[var] = str(default)
        return env

    def _spec(self, template: dict[str, Any], file_overrides: dict[str, Any], logical_id: str,
              local: dict[str, str]) -> FunctionSpec:
        spec = function_spec(template, logical_id, self.template.parent, file_overrides)
        spec.environment = {**spec.environment, **local}
        return spec

    def _local_function(self, spec: FunctionSpec, max_workers: int) -> LocalFunction:
        env = lambda_environment(spec.logical_id, spec.memory_mb, spec.timeout_s, spec.environment, spec.code_uri)
        return LocalFunction(spec.logical_id, spec.handler, env, spec.memory_mb, spec.timeout_s, max_workers,
                             log_path=str(self.workdir / f"{spec.logical_id}.log"))

    def _inprocess_router(self, spec: FunctionSpec) -> Any:
        """RouterFunction in this process: its environment goes into os.environ (restored by stop())."""
        from importlib import import_module

        from tierserve.app import reset_runtime

        self._saved_env = dict(os.environ)
        env = lambda_environment(spec.logical_id, spec.memory_mb, spec.timeout_s, spec.environment)
        os.environ.clear()
        os.environ.update(env)
        reset_runtime()
        module_name, _, func = spec.handler.rpartition(".")
        handler = getattr(import_module(module_name), func)
        make_ctx = context_factory(ROUTER, spec.memory_mb, min(spec.timeout_s, INTEGRATION_TIMEOUT_S))
        # One execution environment runs one invocation at a time, as in Lambda; Powertools' Logger
        # and Metrics are per-process singletons that concurrent invocations would mix up. For
        # concurrent router invocations use router_inprocess=False (a pool of worker processes).
        lock = threading.Lock()
        # Its logs and EMF metrics go to RouterFunction.log like every other function's, so that
        # stdout carries only the ready line (and callers' own output).
        log = open(self.workdir / f"{ROUTER}.log", "a", buffering=1)  # noqa: SIM115 - closed in stop()
        self._router_log = log
        from tierserve.observability import logger as function_logger

        stream_handler = getattr(function_logger, "registered_handler", None)
        if isinstance(stream_handler, logging.StreamHandler):
            self._router_log_restore = (stream_handler, stream_handler.setStream(log))

        def invoke(event: dict[str, Any]) -> Any:
            with lock, contextlib.redirect_stdout(log):
                return handler(event, make_ctx())

        return invoke

    def _route_http(self, event: dict[str, Any], _context: Any) -> Any:
        """API Gateway's integration: RouterFunction, in-process or through its worker."""
        if self.router_inprocess:
            return self._router(event)
        assert self.lambda_endpoint is not None
        return self.lambda_endpoint.functions[ROUTER].invoke(event)

    def _route_rest(self, payload: bytes, answer: dict[str, Any]) -> Any:
        """The streaming REST API's integration: RouterFunction invoked with response streaming, in its own
        environments (the streaming runtime loop)."""
        assert self.lambda_endpoint is not None
        return self.lambda_endpoint.functions[ROUTER].stream(payload, answer)

    def _local_pages(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Any:
        """The emulator's own pages on the API's port (GET /metrics); None for the API's requests."""
        return self.ops.http(method, target) if self.ops is not None else None

    def _start_triton(self) -> None:
        opt = self.triton_option
        if opt is False or opt is None:
            self.notes.append("gpu: none")
            return
        if opt is not True:  # a TritonServer the caller started and manages
            self.triton = opt
            self.notes.append(f"gpu: triton {opt.http_url}")
            return
        from tierserve_tools.triton import TritonServer, build_local_repository, pytriton_available

        prod = self.models / "triton"
        if not prod.is_dir() or not any(prod.glob("*/config.pbtxt")):
            self.notes.append(f"gpu: none (no {prod})")
            return
        if not pytriton_available():
            self.notes.append("gpu: none (nvidia-pytriton not installed)")
            return
        repo_dir = self.workdir / "triton-repo"
        shutil.rmtree(repo_dir, ignore_errors=True)
        if self.gpu_tier == "sagemaker":
            self._start_sagemaker(prod, repo_dir)
            return
        onnx = self._onnx_entries(prod, repo_dir.with_name("triton-onnx"))
        if onnx is not None:
            repo = build_local_repository(onnx, repo_dir)
        else:  # generative models only: TritonSync writes their entries (the stand-in for the vLLM backend)
            repo_dir.mkdir(parents=True)
            repo = repo_dir
        self.triton = TritonServer(repo, log_path=self.workdir / "triton.log", extra_args=TRITON_EXPLICIT).start()
        self._own_triton = True
        self.notes.append(f"gpu: triton {self.triton.http_url}")

    def _start_sagemaker(self, prod: Path, repo_dir: Path) -> None:
        """One single-model endpoint: the GPU model's container (tritonserver with its SageMaker front end,
        serving the repository its model.tar.gz holds) behind a local InvokeEndpoint."""
        from tierserve_tools.sagemaker import (
            ENDPOINT_NAME,
            LocalEndpoint,
            SageMakerRuntime,
            endpoint_repository,
            triton_container,
        )

        generative = self._generative_endpoint(prod, repo_dir)
        if generative is not None:
            repo, name, version, others = generative
        else:
            repo, name, version, others = endpoint_repository(self.models, prod, repo_dir, self.sagemaker_model)
        server, container_url = triton_container(repo, name, log_path=self.workdir / "triton.log")
        self.triton = server.start()
        self._own_triton = True
        self.endpoint_model = f"{name}/{version}"
        # A generative model's endpoint streams (InvokeEndpointWithResponseStream): the 2.51 binary has no SageMaker
        # generate mode, so the emulator maps it to the container's generate_stream on Triton's HTTP port.
        generate_url = f"http://{server.http_url}" if generative is not None else ""
        endpoint = LocalEndpoint(ENDPOINT_NAME, container_url, name, generate_url=generate_url)
        self.sagemaker = SageMakerRuntime([endpoint], host=self.host).start()
        extra = f"; {', '.join(others)} not on it (CPU fallback)" if others else ""
        self.notes.append(f"gpu: sagemaker endpoint {ENDPOINT_NAME} ({name} v{version}) at {self.sagemaker.url} "
                          f"-> triton {container_url}{extra}")

    def _onnx_entries(self, prod: Path, work: Path) -> Path | None:
        """``prod`` without its generative models (a ``backend: "vllm"`` entry, which the local server cannot run and
        TritonSync writes as the stand-in instead): ``prod`` itself when it has none, else a folder of links to the
        others (None when nothing is left)."""
        from tierserve.manifest import Manifest

        manifest = Manifest.loads((self.models / "manifest.json").read_bytes())
        generative = {n for n, e in manifest.models.items() if any(v.generative for v in e.versions.values())}
        entries = sorted(p for p in prod.iterdir() if (p / "config.pbtxt").is_file())
        if not generative & {p.name for p in entries}:
            return prod
        kept = [p for p in entries if p.name not in generative]
        if not kept:
            return None
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        for p in kept:
            (work / p.name).symlink_to(p.resolve(), target_is_directory=True)
        return work

    def _generative_endpoint(self, prod: Path, repo_dir: Path) -> tuple[Path, str, str, list[str]] | None:
        """When the endpoint's model is generative: its repository as TritonSync writes a generative entry (the
        stand-in for the vLLM backend over the CPU tier's onnxruntime-genai variant; the production entry's
        ``backend: "vllm"`` cannot run here), with (repository, name, version, the other GPU models); else None."""
        from tierserve.lifecycle.objects import open_objects
        from tierserve.manifest import Manifest
        from tierserve_tools.triton import default_site_packages, genai_local_config, write_genai_version

        manifest = Manifest.loads((self.models / "manifest.json").read_bytes())
        gpu = sorted(n for n in manifest.models if manifest.resolve(n).serves_gpu and (prod / n).is_dir())
        name = self.sagemaker_model or (gpu[0] if gpu else "")
        if name not in gpu or not manifest.resolve(name).generative:
            return None
        mv = manifest.resolve(name)
        repo = repo_dir / "repository"
        objects = open_objects(str(self.models))
        write_genai_version(repo / name / mv.version, objects.download, mv.cpu_artifact)
        concurrency = mv.generation.max_concurrency if mv.generation is not None else 1
        (repo / name / "config.pbtxt").write_text(genai_local_config(
            name, [mv.version], default_site_packages(), 0, concurrency, source=f"{self.models} (SageMaker endpoint)"))
        return repo, name, mv.version, [n for n in gpu if n != name]

    def client(self, service: str) -> Any:
        """A boto3 client for the stack's moto_server."""
        import boto3

        assert self.moto is not None, "this stack runs without moto_server (s3=False)"
        return boto3.client(service, endpoint_url=self.moto.url, **_creds())

    def _start_moto(self) -> None:
        from tierserve_tools.moto import MotoServer

        self.moto = MotoServer(self.workdir / "moto.log").start()
        create_rollout_table(self.client("dynamodb"))
        from tierserve_tools import usage_cli

        usage_cli.create_table(self.client("dynamodb"), usage_cli.LOCAL_TABLE)  # RouterFunction's USAGE_TABLE
        if self.auth == "keys":
            from tierserve_tools.keys_cli import LOCAL_TABLE, create_table

            create_table(self.client("dynamodb"), LOCAL_TABLE)
        if self.auth == "jwt":
            from tierserve_tools.jwt_auth import create_user_pool

            self.jwt_pool = create_user_pool(self.client("cognito-idp"))
            self.notes.append(f"auth: jwt (ID tokens of user pool {self.jwt_pool[0]} on moto, app client "
                              f"{self.jwt_pool[1]}, issuer {self.jwt_pool[2]}; admin-initiate-auth against "
                              f"{self.moto.url} signs a user in)")
        if not self.s3:
            self.notes.append(f"metrics and rollouts: moto {self.moto.url}")
            return
        s3 = self.client("s3")
        if self.want_batch:
            # Each queue as template.yaml has it (5,400 s: a job holds its message while its function may still run it;
            # 120 s redelivered a long local generation call while it ran); 120 s where the template says nothing.
            self.queues = batch_local.create_local_stack(s3, self.client("dynamodb"), self.client("sqs"), BUCKET,
                                                         JOB_TABLE, visibility_timeout_s=120,
                                                         queues=self.batch_queue_settings())
        else:
            s3.create_bucket(Bucket=BUCKET)
        for path in sorted(self.models.rglob("*")):
            rel = path.relative_to(self.models).as_posix()
            if path.is_file() and not rel.startswith(".") and "/." not in rel:  # triton/ too, as in AWS
                s3.upload_file(str(path), BUCKET, f"{MODEL_PREFIX}/{rel}")
        if self.want_batch:
            batch_local.wire_local_notifications(s3, self.client("sqs"), BUCKET, self.queues["queue_url"])
            self.notes.append(f"batch: s3://{BUCKET}/batch/in/ -> {BATCH} (OpenAI batch jobs -> {GENERATE})")
        self.model_store_uri = f"s3://{BUCKET}/{MODEL_PREFIX}"
        self.notes.append(f"s3: moto {self.moto.url} ({self.model_store_uri})")

    def batch_queue_settings(self) -> dict[str, tuple[int, int]]:
        """The local batch queues' (visibility timeout, receive count), by ``create_local_stack``'s key, from
        template.yaml's BatchEventsQueue, BatchJobsQueue and BatchGenerateJobsQueue."""
        return batch_local.template_queues(load_template(self.template)) if self.template.is_file() else {}

    def _start_batch_pollers(self) -> None:
        assert self.lambda_endpoint is not None

        def handler_of(name: str) -> Callable[[dict[str, Any], Any], Any]:
            fn = self.lambda_endpoint.functions[name]  # type: ignore[union-attr]

            def handler(event: dict[str, Any], _context: Any) -> Any:
                try:
                    return fn.invoke(event)
                except FunctionError as exc:  # the event source mapping sees a failed invocation
                    raise RuntimeError(exc.payload.get("errorMessage", f"{name} failed")) from None

            return handler

        # The S3 events queue: one poller, batches of 10 (template.yaml's ObjectCreated). The jobs queues (BatchJobs,
        # BatchGenerateJobs): one poller per batch worker, one message each (JobMessages, GenerateJobs: BatchSize 1),
        # as Lambda's SQS scaling runs concurrent invocations: a job's shards run in parallel.
        pollers = [("queue_url", BATCH, 10, 0)] + [(key, fn, 1, i) for key, fn in (("jobs_queue_url", BATCH),
                                                                                   ("generate_queue_url", GENERATE))
                                                   for i in range(self.batch_workers)]
        for key, name, size, i in pollers:
            t = threading.Thread(target=batch_local.poll_queue_forever,
                                 args=(self.queues[key], handler_of(name), self._stop),
                                 kwargs={"sqs_client": self.client("sqs"), "batch_size": size},
                                 name=f"serve-poll-{key}-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    # --- use and stop ----------------------------------------------------------------------------------

    def spawn(self, logical_id: str, max_workers: int = 1) -> LocalFunction:
        """A new pool of ``logical_id``'s workers with this stack's environment, apart from the served ones
        (the stability tests watch one warm worker's memory over thousands of invocations). Close it after."""
        template = load_template(self.template)
        spec = self._spec(template, load_env_vars(self.env_vars), logical_id, self.function_env(logical_id))
        return self._local_function(spec, max_workers=max_workers)

    def invoke(self, logical_id: str, event: Any) -> dict[str, Any]:
        """Invoke a function as Lambda would: {"result": ...} or {"error": {...}} (KeyError if unknown)."""
        if logical_id == ROUTER and self.router_inprocess:
            return {"result": self._router(event)}
        assert self.lambda_endpoint is not None
        fn = self.lambda_endpoint.functions[logical_id]
        try:
            return {"result": fn.invoke(event)}
        except FunctionError as exc:
            return {"error": exc.payload}

    def stop(self) -> None:
        """Stop everything this stack started, in order (idempotent); a caller's Triton is left running.

        Every step runs even when an earlier one fails, so a failure never leaves orphans."""
        self._stop.set()
        errors: list[BaseException] = []
        for step in (self._stop_api, self._stop_ops, self._stop_pollers, self._stop_functions, self._stop_sagemaker,
                     self._stop_triton, self._stop_moto, self._restore_env):
            try:
                step()
            except Exception as exc:  # keep stopping the rest
                errors.append(exc)
        if self._tmp_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise errors[0]

    def _stop_api(self) -> None:
        api, self.api = self.api, None
        if api is not None:
            api.stop()

    def _stop_ops(self) -> None:
        ops, self.ops = self.ops, None
        if ops is not None:
            ops.stop()

    def _stop_pollers(self) -> None:
        for t in self._threads:
            t.join(timeout=10)
        self._threads = []

    def _stop_functions(self) -> None:
        endpoint, self.lambda_endpoint = self.lambda_endpoint, None
        if endpoint is not None:
            endpoint.stop()

    def _stop_sagemaker(self) -> None:
        runtime, self.sagemaker = self.sagemaker, None
        if runtime is not None:
            runtime.stop()

    def _stop_triton(self) -> None:
        if self.triton is not None and self._own_triton:
            triton, self.triton = self.triton, None
            triton.stop(grace_s=5.0)

    def _stop_moto(self) -> None:
        moto, self.moto = self.moto, None
        if moto is not None:
            moto.stop()

    def _restore_env(self) -> None:
        restore, self._router_log_restore = self._router_log_restore, None
        if restore is not None:
            restore[0].setStream(restore[1])
        log, self._router_log = self._router_log, None
        if log is not None:
            log.close()
        if self._saved_env is None:
            return
        from tierserve.app import reset_runtime

        os.environ.clear()
        os.environ.update(self._saved_env)
        self._saved_env = None
        reset_runtime()

    def describe(self) -> str:
        """The one ready line."""
        where = "in-process" if self.router_inprocess else "worker"
        cpu = f"cpu: lambda-invoke {CPU} at {self.invoke_url}/2015-03-31/functions/{CPU}/invocations"
        return (f"tierserve serve: ready on {self.url} (router: {where}; openai: {self.url}/v1 streamed by the "
                f"router's own environments; {cpu}; {'; '.join(self.notes)}; "
                f"logs and env.json in {self.workdir})")

    ready_line = describe


def _creds() -> dict[str, str]:
    return {"aws_access_key_id": "testing", "aws_secret_access_key": "testing",
            "region_name": "us-east-1"}


# --- CLI -----------------------------------------------------------------------------------------


def register(subparsers) -> None:  # type: ignore[no-untyped-def]
    p = subparsers.add_parser("serve", help="run the whole stack on loopback: API, CPU Lambda, Triton, S3")
    p.add_argument("--port", type=int, default=3000,
                   help="the API's port (API Gateway's HTTP API: /v2/...); 0: a free port. The Lambda Invoke API "
                        "takes the next one unless --invoke-port says otherwise")
    p.add_argument("--invoke-port", type=int, default=None,
                   help="the Lambda Invoke API's port (AWS_ENDPOINT_URL_LAMBDA), never the API's "
                        "(default: --port + 1, so --port 3000 takes 3001 too; a free port with --port 0)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--models", type=Path, default=Path("build/models"), help="the compiler's output folder")
    p.add_argument("--no-triton", action="store_true", help="no GPU tier")
    p.add_argument("--gpu-tier", choices=("triton", "sagemaker"), default="triton",
                   help="how the router reaches the local Triton: its KServe API (as GpuTier=url), or InvokeEndpoint "
                        "on a local SageMaker endpoint running it (as GpuTier=sagemaker)")
    p.add_argument("--sagemaker-model", default=None, help="the GPU model the local endpoint serves (default: the "
                                                          "only or first GPU model)")
    p.add_argument("--no-s3", action="store_true",
                   help="read models from the folder; no batch (moto_server still serves CloudWatch and DynamoDB)")
    p.add_argument("--no-batch", action="store_true", help="no BatchInferenceFunction or queue pollers")
    p.add_argument("--batch-workers", type=int, default=1,
                   help="concurrent BatchInferenceFunction environments (a fanned-out job's shards run in parallel)")
    p.add_argument("--router-worker", action="store_true",
                   help="run RouterFunction in worker processes instead of in-process (one invocation at a time)")
    p.add_argument("--router-workers", type=int, default=None, metavar="N",
                   help="RouterFunction's worker processes (implies --router-worker; default 4): Lambda's "
                        "concurrency, so that the emulator is not the bottleneck of a load test")
    p.add_argument("--triton-restart-backoff", type=_backoff, default=RESTART_BACKOFF_S, metavar="FIRST[,MOST]",
                   help="when tritonserver exits on its own, seconds before it is started again, doubling after "
                        "each failed start up to MOST (default: %(default)s)")
    p.add_argument("--workdir", type=Path, default=Path("build/serve"), help="logs, caches, env.json")
    p.add_argument("--auth", choices=AUTH_MODES, default="none",
                   help="iam: verify SigV4 signatures made with the local credentials (AWS_ACCESS_KEY_ID=testing), "
                        "403 otherwise, as the deployed API does; keys: the OpenAI and generate routes (the streaming "
                        "REST API) need 'Authorization: Bearer <API key>' (the openai SDK's api_key), 401 otherwise, "
                        "as ApiAuth=keys deploys it: make one with 'tierserve keys --stack WORKDIR create --caller "
                        "NAME'; jwt: the same routes need an ID token of a Cognito user pool made on the stack's "
                        "moto_server (ApiAuth=jwt), checked as API Gateway's Cognito authorizer does; none: no "
                        "authorization")
    p.add_argument("-t", "--template", type=Path, default=None,
                   help="the SAM template (default: ./template.yaml, else the one that ships with tierserve)")
    p.add_argument("-n", "--env-vars", type=Path, default=None,
                   help="SAM-format environment overrides file "
                        "(default: ./events/local-env.json, else the shipped one)")
    p.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for every function (repeatable), e.g. BREAKER_COOLDOWN_S=5")
    p.set_defaults(func=run_cli)


def _backoff(text: str) -> tuple[float, float]:
    try:
        parts = [float(x) for x in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or parts[0] <= 0 or parts[-1] < parts[0]:
        raise argparse.ArgumentTypeError(f"{text!r}: give FIRST or FIRST,MOST seconds, e.g. 1,30 (0 < FIRST <= MOST)")
    return (parts[0], max(parts[0], RESTART_BACKOFF_S[1])) if len(parts) == 1 else (parts[0], parts[1])


def run_cli(args: argparse.Namespace) -> int:
    with stop_on_signals() as stop:
        return _serve(args, stop)


def _serve(args: argparse.Namespace, stop: threading.Event) -> int:
    extra = dict(kv.split("=", 1) for kv in args.env if "=" in kv)
    stack = LocalStack(args.models, port=args.port, host=args.host, triton=not args.no_triton,
                       batch=not args.no_batch, template=args.template, workdir=args.workdir, s3=not args.no_s3,
                       env=extra, env_vars=args.env_vars,
                       router_inprocess=not (args.router_worker or args.router_workers), auth=args.auth,
                       invoke_port=args.invoke_port, router_workers=args.router_workers or 4,
                       gpu_tier=args.gpu_tier, sagemaker_model=args.sagemaker_model,
                       batch_workers=args.batch_workers, triton_restart_backoff_s=args.triton_restart_backoff,
                       on_triton_event=lambda text: print(f"tierserve serve: {text}", file=sys.stderr, flush=True))
    try:
        stack.start()
        print(stack.describe(), flush=True)
        while not stop.wait(0.5):  # the supervisor restarts tritonserver and says so on stderr (on_triton_event)
            pass
        return 0
    except (TierserveError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        stack.stop()
        print("tierserve serve: stopped", file=sys.stderr, flush=True)
