"""The interface every backend implements (onnxruntime in-process, Lambda Invoke, Triton)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from tierserve.errors import TierserveError
from tierserve.manifest import ModelVersion
from tierserve.protocol.calls import InferenceCall, Reply


class Backend(Protocol):
    @property
    def tier(self) -> str:
        """The tier it serves (a ``tierserve.tiers.Tier``): what the response's x-served-by header says."""
        ...

    def infer(self, model: ModelVersion, call: InferenceCall, timeout_s: float) -> Reply:
        """Run ``call`` (already checked against ``model``) within ``timeout_s`` and return the reply.

        Each backend takes the form of the request it needs from ``call``: the client's body as it
        came (Lambda Invoke) or numpy arrays (onnxruntime, Triton). Raises
        tierserve.errors.BackendUnavailableError / BackendTimeoutError when the tier cannot be reached
        in time, InvalidRequestError when the tier refused the input, InferenceError when it ran and failed.
        """
        ...

    def ready(self, model: ModelVersion | None = None) -> bool:
        """Server readiness, or the model's readiness when ``model`` is given; never raises."""
        ...


#: What onnxruntime says when the *input* was wrong, in its Python form
#: (``[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : ...``) and as Triton's onnxruntime backend relays it
#: (HTTP 500 ``onnx runtime error 2: ...``): a node that fails on inputs that passed the manifest's
#: checks failed on their values or shapes (an index past an embedding, a broadcast of mismatched dims).
INPUT_ERROR_MARKERS = (
    "INVALID_ARGUMENT", "onnx runtime error 2:", "Invalid rank for input", "Got invalid dimensions",
    "Unexpected input data type", "Non-zero status code returned while running",
)
#: ... unless the message names the device: a CUDA, cuDNN or TensorRT fault is the tier's, whatever the node.
DEVICE_FAULT_MARKERS = ("cuda", "cudnn", "cublas", "tensorrt", "out of memory", "failed to allocate")


def is_input_error(message: str) -> bool:
    """Whether a backend's error message says the request's input was at fault (400, not a tier failure)."""
    low = message.lower()
    return any(m in message for m in INPUT_ERROR_MARKERS) and not any(m in low for m in DEVICE_FAULT_MARKERS)


class Readiness:
    """A backend's readiness answers, remembered per key: a probe (an Invoke, a model load and run) is
    too dear to repeat for every health check, and a failing one must not be hammered either.

    ``ok_ttl_s`` is how long a success stands (None: for good, as for a content-addressed artifact that
    cannot change); ``retry_s`` how long a failure does before the next probe."""

    def __init__(self, ok_ttl_s: float | None, retry_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ok_ttl_s, self.retry_s, self.clock = ok_ttl_s, retry_s, clock
        self._known: dict[str, tuple[TierserveError | None, float]] = {}

    def check(self, key: str, probe: Callable[[], TierserveError | None]) -> None:
        """Raise what ``probe`` found for ``key`` (now, or remembered while it stands); return when ready."""
        known = self._known.get(key)
        if known is not None:
            problem, at = known
            ttl = self.ok_ttl_s if problem is None else self.retry_s
            if ttl is None or self.clock() - at < ttl:
                if problem is not None:
                    raise problem
                return
        problem = probe()
        self._known[key] = (problem, self.clock())
        if problem is not None:
            raise problem


def ready_by(check_ready: Callable[[ModelVersion], None], model: ModelVersion | None) -> bool:
    """``Backend.ready`` from a ``check_ready`` that raises: never raises itself."""
    if model is None:
        return True
    try:
        check_ready(model)
        return True
    except TierserveError:
        return False


_pools: dict[str, Any] = {}
_pools_lock = threading.Lock()


def shared_pool(name: str, max_workers: int) -> Any:
    """The process's thread pool called ``name``, made on first use (a cold start that never splits a
    request or calls the GPU never starts its threads); shared by every backend instance."""
    pool = _pools.get(name)
    if pool is None:
        with _pools_lock:
            pool = _pools.get(name)
            if pool is None:
                from concurrent.futures import ThreadPoolExecutor

                pool = _pools[name] = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=name)
    return pool


class ClientsByTimeout:
    """boto3 clients of one AWS service, one per read timeout: a client's timeout is fixed when it is
    made, while each request brings its own remaining deadline. boto3 clients are thread-safe and keep
    their connection pools, so a few buckets of them serve every request; they live in the process's one
    cache (``tierserve.aws``). ``injected`` (tests) is used for every timeout."""

    def __init__(self, service: str, injected: Any = None, **config: Any) -> None:
        self.service, self.injected, self.config = service, injected, config

    def get(self, read_timeout_s: float) -> Any:
        if self.injected is not None:
            return self.injected
        from tierserve import aws

        # No automatic retries: a retried call (an Invoke, an InvokeEndpoint) could run the same request
        # twice. botocore's "max_attempts" counts retries; the total is what must be 1.
        return aws.client(self.service, read_timeout=read_timeout_s, connect_timeout=min(2.0, read_timeout_s),
                          retries={"total_max_attempts": 1, "mode": "standard"}, **self.config)
