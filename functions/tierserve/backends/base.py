"""The interface every backend implements (onnxruntime in-process, Triton, Lambda-invoke)."""

from __future__ import annotations

from typing import Protocol

from tierserve.manifest import ModelVersion
from tierserve.types import InferRequest, InferResponse


class Backend(Protocol):
    #: "cpu" or "gpu": what the response's x-served-by header says.
    tier: str

    def infer(self, model: ModelVersion, request: InferRequest, timeout_s: float | None = None) -> InferResponse:
        """Run ``request`` (already validated against ``model``) and return the response.

        Raises tierserve.errors.BackendUnavailableError / BackendTimeoutError when the backend
        cannot be reached in time, InferenceError when it ran and failed.
        """
        ...

    def ready(self, model: ModelVersion | None = None) -> bool:
        """Server readiness, or the model's readiness when ``model`` is given."""
        ...
