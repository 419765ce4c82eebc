"""Every error the serving runtime raises, under one root.

Messages say what was wrong and what to do about it. The mapping from these
classes to HTTP status codes lives in exactly one place: ``tierserve.protocol.http_api``.
Nothing here knows about HTTP.
"""

from __future__ import annotations


class TierserveError(Exception):
    """Root of every error raised by the tierserve runtime."""

    code = "internal_error"
    #: The tier whose answer this error is, when a tier produced it (a ``tierserve.tiers.Tier``: the GPU
    #: tier's 400), else None: the answer of whoever renders it. The ``x-served-by`` of its response.
    served_by: str | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# --- client errors -----------------------------------------------------------------------------


class InvalidRequestError(TierserveError):
    """The request is malformed: bad JSON, wrong names, datatypes, shapes or lengths."""

    code = "invalid_request"


class PayloadTooLargeError(TierserveError):
    """The request body is larger than the configured limit."""

    code = "payload_too_large"


class ModelNotFoundError(TierserveError):
    """No such model, or no such version of it, in the manifest."""

    code = "model_not_found"


class RouteNotFoundError(TierserveError):
    """The HTTP method and path match no Open Inference Protocol route."""

    code = "route_not_found"


class MethodNotAllowedError(TierserveError):
    code = "method_not_allowed"


class UnsupportedEncodingError(TierserveError):
    """The request's Content-Encoding is not one the API decodes (gzip, deflate, identity)."""

    code = "unsupported_content_encoding"


class InvalidParameterError(InvalidRequestError):
    """One request parameter is wrong, unknown or not supported (the OpenAI-compatible routes): ``param`` names
    it, and ``code`` says which (``invalid_value``, ``unknown_parameter``, ``unsupported_parameter``,
    ``missing_required_parameter``, ``invalid_type``)."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class ContextLengthExceededError(InvalidRequestError):
    """The prompt plus the completion asked for do not fit the model's context window (refused before any work)."""

    code = "context_length_exceeded"

    def __init__(self, message: str, param: str | None = "messages") -> None:
        super().__init__(message)
        self.param = param


class TooManyRequestsError(TierserveError):
    """This execution environment is at its cap of concurrent generations for the model: retry after
    ``retry_after_s`` (a 429 with Retry-After). Nothing ran."""

    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class InvalidNameError(InvalidRequestError):
    """A model name, version or S3 key fails the allowlist pattern."""

    code = "invalid_name"


# --- server-side errors ------------------------------------------------------------------------


class ConfigurationError(TierserveError):
    """An environment setting is missing or invalid."""

    code = "configuration_error"


class ManifestError(TierserveError):
    """The manifest is unreadable or does not follow the schema."""

    code = "manifest_error"


class ArtifactError(TierserveError):
    """An artifact could not be fetched, or failed verification."""

    code = "artifact_error"


class ArtifactNotFoundError(ArtifactError):
    code = "artifact_not_found"


class IntegrityError(ArtifactError):
    """The sha256 of a fetched artifact does not match the manifest."""

    code = "integrity_error"


class UnsafeModelError(ArtifactError):
    """The ONNX model references external data outside its own folder."""

    code = "unsafe_model"


class InferenceError(TierserveError):
    """The backend accepted the request but failed to run it."""

    code = "inference_error"


class BackendUnavailableError(TierserveError):
    """A backend (Triton, the CPU function) is unreachable, unhealthy or its circuit is open."""

    code = "backend_unavailable"

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BackendTimeoutError(BackendUnavailableError):
    code = "backend_timeout"


class TierThrottledError(BackendUnavailableError):
    """The tier is out of capacity now (Lambda's TooManyRequestsException: its concurrency is spent).
    Nothing ran, so another tier may take the request."""

    code = "tier_throttled"


# --- model lifecycle (publish, canary, promote, rollback, retire, rollout) ---------------------


class LifecycleError(TierserveError):
    """A lifecycle change was refused: the message says why and what to do instead."""

    code = "lifecycle_error"


class ConflictError(LifecycleError):
    """A conditional write lost a race (S3 412 PreconditionFailed / 409 ConditionalRequestConflict, or the
    folder store's ETag moved): re-read, merge and retry."""

    code = "conflict"


class ArtifactUnavailableError(ArtifactError, BackendUnavailableError):
    """The model store (S3) could not be read just now: a 5xx, a timeout, a dropped connection. A 503 with
    Retry-After: nothing is wrong with the model, and nothing half-fetched was kept."""

    code = "artifact_unavailable"
