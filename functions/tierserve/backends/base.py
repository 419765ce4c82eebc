"""The interface every backend implements (onnxruntime in-process, Lambda Invoke, Triton)."""

from __future__ import annotations

from typing import Protocol

from tierserve.calls import InferenceCall, Reply
from tierserve.manifest import ModelVersion


class Backend(Protocol):
    #: "cpu" or "gpu": the tier it serves, what the response's x-served-by header says.
    tier: str

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
