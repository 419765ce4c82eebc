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
