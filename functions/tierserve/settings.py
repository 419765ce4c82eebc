"""Environment settings, parsed once into a typed, frozen model.

Every knob of the runtime is an environment variable (set in ``template.yaml`` for AWS,
or by ``tierserve invoke`` / ``tierserve serve`` locally). ``get_settings()`` parses them on
first use and caches the result for the life of the execution environment.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any

from tierserve.errors import ConfigurationError
from tierserve.limits import MAX_REQUEST_BODY_BYTES

#: The largest body whose API Gateway event fits Lambda's 6 MB request payload, base64 included
#: (tierserve.limits); MAX_PAYLOAD_BYTES may lower it, never raise it. What the router accepts it can
#: always forward: a CPU Invoke over 6 MB is split into sub-batches that fit.
DEFAULT_MAX_PAYLOAD_BYTES = MAX_REQUEST_BODY_BYTES
#: Lambda gives one full vCPU at 1,769 MB of memory.
MB_PER_VCPU = 1769


def boolean(v: str) -> bool:
    """A true/false setting (1/0, true/false, yes/no, on/off, any case; empty is false); ValueError otherwise.
    The one parser of its kind: the edge's settings (``tierserve.edge.settings``) use it too."""
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false (1/0, yes/no, on/off), got {v!r}")


def queue_url(v: str) -> str:
    """An SQS queue's URL (``https://sqs.REGION.amazonaws.com/ACCOUNT/NAME``; ``http://`` for a local emulator);
    ValueError otherwise (a queue's name or ARN is not what SendMessage takes)."""
    if not v.startswith(("https://", "http://")) or "/" not in v.split("://", 1)[1].rstrip("/"):
        raise ValueError(f"expected an SQS queue URL (https://sqs.REGION.amazonaws.com/ACCOUNT/NAME), got {v!r}")
    return v


def choice(*allowed: str) -> Callable[[str], str]:
    """A parser that takes one of ``allowed`` exactly and raises ValueError naming them otherwise.
    The one choice parser: the edge's settings (``tierserve.edge.settings``) use it too."""
    def parse(v: str) -> str:
        if v not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {v!r}")
        return v

    return parse


@dataclass(frozen=True)
class Settings:
    # Where models live: a local folder or s3://bucket/prefix. The manifest is at its root.
    model_store_uri: str = "build/models"
    # Where fetched artifacts are cached (Lambda: /tmp is the only writable place).
    model_cache_dir: str = "/tmp/tierserve-models"  # noqa: S108 - Lambda's only writable path
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    # How the router reaches the CPU tier: "lambda" (boto3 Invoke) or "inprocess" (same process).
    cpu_backend: str = "inprocess"
    cpu_function_name: str = ""
    # The CPU function of each memory class, "1769=NAME,3538=NAME" (tierserve.memory_classes); "": all models
    # run in CPU_FUNCTION_NAME.
    cpu_functions: str = ""
    # Models a CPU function loads during init (provisioned concurrency, SnapStart): "class" = every model of this
    # function's memory class (default and canary versions), or "NAME,NAME"; "" = on first use.
    preload_models: str = ""
    # The GPU tier: "triton" (TRITON_URL), "sagemaker" (an endpoint running Triton's container) or "none";
    # "" picks "triton" when TRITON_URL is set, else none.
    gpu_backend: str = ""
    sagemaker_endpoint_name: str = ""
    # A single-model endpoint's model ("name" or "name/version"); other models are not sent to it.
    sagemaker_model: str = ""
    # A multi-model endpoint's archive per request, e.g. "{name}-{version}.tar.gz" ("": single-model endpoint).
    sagemaker_target_model: str = ""
    triton_url: str = ""
    triton_protocol: str = "http"
    triton_timeout_s: float = 10.0
    routing_policy: str = "size-aware"
    health_ttl_s: float = 2.0
    breaker_failure_threshold: int = 5
    breaker_cooldown_s: float = 30.0
    breaker_success_threshold: int = 3
    # The GPU tier's health shared by every router instance (tierserve.tier_health): a DynamoDB table keyed by
    # "id" with TTL "expiration" (the JobTable); "" = each instance on its own.
    tier_health_table: str = ""
    tier_health_ttl_s: float = 2.0
    # Threads for onnxruntime; 0 means "derive from the function's memory".
    ort_threads: int = 0
    memory_mb: int = MB_PER_VCPU
    # Concurrent generations per model version in one execution environment; 0 = the manifest's
    # generation.max_concurrency (issue 17: one more is a 429 with Retry-After).
    generation_max_concurrency: int = 0
    # Batch inference.
    job_table: str = ""
    continuation_queue_url: str = ""
    # Issue 19: where this function hands its OpenAI batch (text-generation) jobs, BatchGenerateFunction's queue; ""
    # = runs them here (when its package holds onnxruntime-genai) or refuses them with a ConfigurationError.
    generation_jobs_queue_url: str = ""
    chunk_rows: int = 4096
    # Batch fan-out (tierserve.batch.shards): a JSONL input over SHARD_BYTES, or an NPZ / Parquet input over
    # SHARD_ROWS rows, is cut into shards that run as concurrent invocations (a job message may ask "shards": N).
    shard_bytes: int = 256 * 1024 * 1024
    shard_rows: int = 2_000_000
    checkpoint_margin_ms: int = 30_000
    idempotency_expiry_s: int = 86_400
    service_name: str = "tierserve"
    # How long the manifest is cached before it is re-read: a publish, promote or rollback reaches every
    # function within this time, without a redeploy (issue 11: at most 10 s).
    manifest_ttl_s: float = 10.0
    # Batch parts of NPZ / Parquet inputs (columns read straight into arrays): up to this many rows, within an
    # eighth of the function's memory (tierserve.batch.io.part_rows); never fewer than CHUNK_ROWS.
    columnar_chunk_rows: int = 65_536
    # Progressive delivery (RolloutFunction and `tierserve models rollout`).
    rollout_table: str = ""
    router_function_name: str = "RouterFunction"
    metrics_namespace: str = "tierserve"
    # Tokens as the unit of account (issue 18, tierserve.usage): the table of usage counters, budget windows and
    # per-caller budget overrides ("" = usage as metrics only, no budget enforced); each caller's default budget
    # in tokens per fixed UTC minute and day (0 = no limit); how long a day's usage counters are kept.
    usage_table: str = ""
    tokens_per_minute: int = 0
    tokens_per_day: int = 0
    usage_retention_days: int = 400

    @property
    def intra_op_threads(self) -> int:
        """Threads for onnxruntime: one per vCPU Lambda gives this function's memory."""
        if self.ort_threads > 0:
            return self.ort_threads
        return max(1, min(6, round(self.memory_mb / MB_PER_VCPU)))


#: env var -> (field, parser). One explicit table; nothing is read from the environment elsewhere.
_ENV: dict[str, tuple[str, Callable[[str], Any]]] = {
    "MODEL_STORE_URI": ("model_store_uri", str),
    "MODEL_CACHE_DIR": ("model_cache_dir", str),
    "MAX_PAYLOAD_BYTES": ("max_payload_bytes", int),
    "CPU_BACKEND": ("cpu_backend", choice("lambda", "inprocess")),
    "CPU_FUNCTION_NAME": ("cpu_function_name", str),
    "CPU_FUNCTIONS": ("cpu_functions", str),
    "PRELOAD_MODELS": ("preload_models", str),
    "GPU_BACKEND": ("gpu_backend", choice("triton", "sagemaker", "none")),
    "SAGEMAKER_ENDPOINT_NAME": ("sagemaker_endpoint_name", str),
    "SAGEMAKER_MODEL": ("sagemaker_model", str),
    "SAGEMAKER_TARGET_MODEL": ("sagemaker_target_model", str),
    "TRITON_URL": ("triton_url", str),
    "TRITON_PROTOCOL": ("triton_protocol", choice("http", "grpc")),
    "TRITON_TIMEOUT_S": ("triton_timeout_s", float),
    "ROUTING_POLICY": ("routing_policy", str),
    "HEALTH_TTL_S": ("health_ttl_s", float),
    "BREAKER_FAILURE_THRESHOLD": ("breaker_failure_threshold", int),
    "BREAKER_COOLDOWN_S": ("breaker_cooldown_s", float),
    "BREAKER_SUCCESS_THRESHOLD": ("breaker_success_threshold", int),
    "TIER_HEALTH_TABLE": ("tier_health_table", str),
    "TIER_HEALTH_TTL_S": ("tier_health_ttl_s", float),
    "ORT_THREADS": ("ort_threads", int),
    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": ("memory_mb", int),
    "JOB_TABLE": ("job_table", str),
    "CONTINUATION_QUEUE_URL": ("continuation_queue_url", str),
    "GENERATION_JOBS_QUEUE_URL": ("generation_jobs_queue_url", queue_url),
    "CHUNK_ROWS": ("chunk_rows", int),
    "SHARD_BYTES": ("shard_bytes", int),
    "SHARD_ROWS": ("shard_rows", int),
    "CHECKPOINT_MARGIN_MS": ("checkpoint_margin_ms", int),
    "GENERATION_MAX_CONCURRENCY": ("generation_max_concurrency", int),
    "IDEMPOTENCY_EXPIRY_S": ("idempotency_expiry_s", int),
    "POWERTOOLS_SERVICE_NAME": ("service_name", str),
    "MANIFEST_TTL_S": ("manifest_ttl_s", float),
    "COLUMNAR_CHUNK_ROWS": ("columnar_chunk_rows", int),
    "ROLLOUT_TABLE": ("rollout_table", str),
    "ROUTER_FUNCTION_NAME": ("router_function_name", str),
    "POWERTOOLS_METRICS_NAMESPACE": ("metrics_namespace", str),
    "USAGE_TABLE": ("usage_table", str),
    "TOKENS_PER_MINUTE": ("tokens_per_minute", int),
    "TOKENS_PER_DAY": ("tokens_per_day", int),
    "USAGE_RETENTION_DAYS": ("usage_retention_days", int),
}

_POSITIVE = {
    "max_payload_bytes", "triton_timeout_s", "breaker_failure_threshold", "breaker_success_threshold",
    "memory_mb", "chunk_rows", "shard_bytes", "shard_rows", "manifest_ttl_s",
}  # fmt: skip


def parse_settings(env: Mapping[str, str]) -> Settings:
    """Parse ``env`` into Settings; raise ConfigurationError naming the bad variable."""
    values: dict[str, Any] = {}
    for var, (name, parse) in _ENV.items():
        raw = env.get(var)
        if raw is None or raw == "":
            continue
        try:
            values[name] = parse(raw)
        except ValueError as exc:
            raise ConfigurationError(f"environment variable {var}={raw!r} is invalid: {exc}") from exc
        if name in _POSITIVE and values[name] <= 0:
            raise ConfigurationError(f"environment variable {var}={raw!r} must be positive")
    if values.get("columnar_chunk_rows", 1) <= 0:
        raise ConfigurationError(f"environment variable COLUMNAR_CHUNK_ROWS={values['columnar_chunk_rows']} "
                                 "must be positive")
    if values.get("max_payload_bytes", 0) > MAX_REQUEST_BODY_BYTES:
        raise ConfigurationError(
            f"environment variable MAX_PAYLOAD_BYTES={values['max_payload_bytes']} is over {MAX_REQUEST_BODY_BYTES}, "
            "the largest body whose API Gateway event fits Lambda's 6 MB request payload (base64 included); "
            "a larger one could never reach the function")
    if values.get("cpu_backend") == "lambda" and not values.get("cpu_function_name"):
        raise ConfigurationError("CPU_BACKEND=lambda needs CPU_FUNCTION_NAME (the CpuInferenceFunction's name)")
    if values.get("cpu_functions"):
        from tierserve.memory_classes import parse_functions

        try:
            parse_functions(values["cpu_functions"])
        except ConfigurationError as exc:
            raise ConfigurationError(f"environment variable CPU_FUNCTIONS is invalid: {exc.message}") from None
    if values.get("gpu_backend") == "sagemaker" and not values.get("sagemaker_endpoint_name"):
        raise ConfigurationError("GPU_BACKEND=sagemaker needs SAGEMAKER_ENDPOINT_NAME (the SageMaker endpoint's name)")
    if values.get("gpu_backend") == "triton" and not values.get("triton_url"):
        raise ConfigurationError("GPU_BACKEND=triton needs TRITON_URL (host:port of the Triton server)")
    if values.get("generation_jobs_queue_url") and \
            values["generation_jobs_queue_url"] == values.get("continuation_queue_url"):
        raise ConfigurationError("GENERATION_JOBS_QUEUE_URL is CONTINUATION_QUEUE_URL: this function would hand its "
                                 "generation jobs to itself for ever; BatchInferenceFunction sets it to "
                                 "BatchGenerateJobsQueue, BatchGenerateFunction leaves it unset")
    known = {f.name for f in fields(Settings)}
    assert set(values) <= known
    return Settings(**values)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, parsed once from ``os.environ``."""
    return parse_settings(os.environ)


def reset_settings() -> None:
    """Forget the cached settings (tests and the local emulator change the environment)."""
    get_settings.cache_clear()
