"""The composition root: every dependency of the serving runtime is built here, once, from Settings.

Why one place: the three functions (router, CPU, batch) and the local emulator differ only in
their settings, not in how the parts fit together. ``build_runtime`` wires the model store, the
CPU and GPU backends, the routing policy, the GPU circuit breaker and health cache into one
``TierDispatcher`` (with the token counter that routes a generation: ``generation.tokens``), plus the AWS
clients the batch path uses. HTTP (``tierserve.api``), the CPU
function's Invoke entry (``tierserve.direct``) and batch (``tierserve.batch``) all take their
dependencies from ``get_runtime()`` and never build or inspect parts themselves.

Which backend serves the CPU tier follows ``CPU_BACKEND``: ``lambda`` (the router in AWS: a
synchronous Invoke of CpuInferenceFunction, forwarding the client's body untouched) or
``inprocess`` (onnxruntime in this function: the CPU function, the batch function, and the
router under ``tierserve invoke``). The GPU tier follows ``GPU_BACKEND``: ``triton`` (a Triton server
at ``TRITON_URL``; the default when it is set), ``sagemaker`` (InvokeEndpoint on a SageMaker endpoint
running Triton's container) or ``none``.

``reset_runtime()`` is the one reset: settings, runtime, AWS clients (``tierserve.aws``) and onnxruntime sessions
(tests and the local emulator change the environment between invocations).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from tierserve import aws
from tierserve.backends.base import Backend
from tierserve.breaker import CircuitBreaker, HealthCache
from tierserve.protocol.statistics import InferenceStats
from tierserve.routing import get_policy
from tierserve.settings import Settings, get_settings, reset_settings
from tierserve.store import ModelStore
from tierserve.tiering import Dispatcher, TierDispatcher, log_transition


@dataclass
class Runtime:
    """What one execution environment holds while warm."""

    settings: Settings
    store: ModelStore
    dispatcher: Dispatcher  # TierDispatcher in the cloud; EdgeDispatcher on a device (tierserve.edge)
    #: This execution environment's inference counters (``GET /v2/models/stats``); they live as long as it.
    stats: InferenceStats = field(default_factory=InferenceStats)

    def aws(self, service: str) -> Any:
        """A boto3 client (``"dynamodb-resource"``: the resource) built once per execution environment
        (``tierserve.aws``, the one cache of them).

        Endpoints come from boto3's own variables (``AWS_ENDPOINT_URL_S3`` ...), so the local
        emulator and moto_server use the same code path as AWS."""
        return aws.resource("dynamodb") if service == "dynamodb-resource" else aws.client(service)


def build_cpu_backend(settings: Settings, store: ModelStore) -> Backend:
    if settings.cpu_backend == "lambda":
        from tierserve.backends.lambda_invoke import LambdaInvokeBackend
        from tierserve.memory_classes import parse_functions

        return LambdaInvokeBackend(settings.cpu_function_name, functions=parse_functions(settings.cpu_functions))
    from tierserve.backends.onnx import OnnxBackend

    return OnnxBackend(store, settings.intra_op_threads)


def build_gpu_backend(settings: Settings) -> Backend | None:
    if settings.gpu_backend == "sagemaker":
        from tierserve.backends.sagemaker import SageMakerBackend

        return SageMakerBackend(settings.sagemaker_endpoint_name, model=settings.sagemaker_model,
                                target_model=settings.sagemaker_target_model, timeout_s=settings.triton_timeout_s)
    if settings.gpu_backend == "none" or not settings.triton_url:
        return None
    from tierserve.backends.triton import TritonBackend

    return TritonBackend(settings.triton_url, settings.triton_protocol, settings.triton_timeout_s)


def build_breaker(settings: Settings) -> CircuitBreaker:
    """The GPU circuit breaker: shared by the fleet through ``TIER_HEALTH_TABLE`` (``tierserve.tier_health``)
    when it is set, else this instance's own."""
    args = (settings.breaker_failure_threshold, settings.breaker_cooldown_s, settings.breaker_success_threshold)
    if not settings.tier_health_table:
        return CircuitBreaker(*args, on_transition=log_transition)
    import os

    from tierserve.tier_health import DynamoHealthStore, SharedCircuitBreaker

    def client() -> Any:
        return aws.client("dynamodb")

    instance = f"{settings.service_name}:{os.getpid()}@{os.uname().nodename}"
    return SharedCircuitBreaker(DynamoHealthStore(settings.tier_health_table, client), *args,
                                on_transition=log_transition, read_ttl_s=settings.tier_health_ttl_s,
                                instance=instance)


def build_runtime(settings: Settings, *, cpu: Backend | None = None, gpu: Backend | None = None,
                  store: ModelStore | None = None) -> Runtime:
    """A runtime from ``settings``; tests may pass their own backends or store (the seams)."""
    store = store or ModelStore(settings.model_store_uri, settings.model_cache_dir, settings.manifest_ttl_s)
    from tierserve.sessions import evict_sessions

    store.on_evict.append(evict_sessions)  # versions no longer served leave the session cache too
    from tierserve.generation.tokens import TokenCounter

    dispatcher = TierDispatcher(
        cpu=cpu if cpu is not None else build_cpu_backend(settings, store),
        gpu=gpu if gpu is not None else build_gpu_backend(settings),
        policy=get_policy(settings.routing_policy),
        breaker=build_breaker(settings),
        health=HealthCache(settings.health_ttl_s),
        gpu_timeout_s=settings.triton_timeout_s,
        tokens=TokenCounter(store),  # a generation's prompt tokens when it is not tokenized yet (routing)
    )
    return Runtime(settings, store, dispatcher)


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def get_runtime() -> Runtime:
    """The execution environment's runtime: built on the first invocation, reused while warm."""
    global _runtime
    if _runtime is None:
        with _runtime_lock:
            if _runtime is None:
                _runtime = build_runtime(get_settings())
    return _runtime


def set_runtime(runtime: Runtime | None) -> None:
    """Install a runtime built elsewhere (tests, benchmarks, the local emulator)."""
    global _runtime
    _runtime = runtime


def preload_models(runtime: Runtime | None = None) -> list[str]:
    """Load the models ``PRELOAD_MODELS`` names into this CPU function's sessions, during init.

    Why: with provisioned concurrency or SnapStart, init runs before any request (and, with SnapStart,
    once per published version, then restored from its snapshot), so a model fetched from S3, verified
    and loaded there costs no request anything. ``class`` picks the models of this function's memory
    class (``AWS_LAMBDA_FUNCTION_MEMORY_SIZE``). A model that fails to load is logged and skipped: it
    loads (or reports its error) on first use, as without preloading. Returns "NAME/VERSION" loaded."""
    if runtime is None and not get_settings().preload_models.strip():
        return []  # the usual case: no runtime is built at import time
    runtime = runtime or get_runtime()
    wanted = runtime.settings.preload_models.strip()
    session = getattr(getattr(runtime.dispatcher, "cpu", None), "session", None)
    if not wanted or session is None:
        return []
    from tierserve.memory_classes import class_for, model_class
    from tierserve.observability import logger

    manifest = runtime.store.manifest()
    names = set(manifest.models) if wanted == "class" else {n.strip() for n in wanted.split(",") if n.strip()}
    mine = class_for(runtime.settings.memory_mb) if runtime.settings.memory_mb <= 10240 else 10240
    loaded = []
    for name in sorted(names):
        entry = manifest.models.get(name)
        if entry is None:
            logger.warning("PRELOAD_MODELS names an unknown model", extra={"model": name})
            continue
        versions = {entry.default_version, *([str(entry.canary["version"])] if entry.canary else [])}
        for version in sorted(versions):
            mv = entry.versions[version]
            if not mv.serves_cpu or (wanted == "class" and model_class(mv) != mine):
                continue
            try:
                session(mv)
                loaded.append(f"{name}/{version}")
            except Exception as exc:  # init must not fail for one model
                logger.warning("preloading a model failed", extra={"model": name, "version": version,
                                                                   "error": str(exc)})
    return loaded


def reset_runtime() -> None:
    """Forget settings, runtime, AWS clients and onnxruntime sessions: the next call rebuilds them."""
    global _runtime
    _runtime = None
    reset_settings()
    aws.clear()
    from tierserve.sessions import clear_sessions

    clear_sessions()
