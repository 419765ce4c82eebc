"""The one error wrapper: a project error -> what every transport says about it.

Why: the router's HTTP API, the CPU function's Invoke, the edge's HTTP and the edge's gRPC each mapped
errors on their own, so a 503's ``Retry-After`` or a tier's own error code could survive one transport
and not another. Here an exception becomes one :class:`ErrorAnswer`: the status (``STATUS_BY_ERROR``, the
only table), the document in the shape of the protocol family (KServe's ``{"error", "code"}``
for the Open Inference Protocol; OpenAI's ``{"error": {"message", "type", "param", "code"}}`` for the
OpenAI-compatible routes), the headers (``retry-after``, ``x-served-by``), and the gRPC status code the
HTTP status maps to. Adapters render that, nothing else; no stack trace reaches a client.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from tierserve import errors, telemetry

Family = Literal["oip", "openai"]

#: HTTP status -> gRPC status code name (``grpc.StatusCode[name]``), as Triton maps them.
GRPC_CODE_BY_STATUS: dict[int, str] = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
    405: "UNIMPLEMENTED", 408: "DEADLINE_EXCEEDED", 413: "RESOURCE_EXHAUSTED", 415: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
}

#: HTTP status -> OpenAI's error ``type``.
_OPENAI_TYPE: dict[int, str] = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
    415: "invalid_request_error", 429: "rate_limit_error",
}


@dataclass(frozen=True)
class ErrorAnswer:
    status: int
    code: str
    message: str
    document: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def grpc_code(self) -> str:
        """The gRPC status code's name for this answer (INTERNAL for anything unmapped)."""
        return GRPC_CODE_BY_STATUS.get(self.status, "INTERNAL")


#: Exception class -> HTTP status. Looked up along the exception's MRO, most specific first.
STATUS_BY_ERROR: dict[type[errors.TierserveError], int] = {
    errors.InvalidRequestError: 400,
    errors.RouteNotFoundError: 404,
    errors.ModelNotFoundError: 404,
    errors.MethodNotAllowedError: 405,
    errors.PayloadTooLargeError: 413,
    errors.TooManyRequestsError: 429,
    errors.ArtifactUnavailableError: 503,
    errors.UnsupportedEncodingError: 415,
    errors.BackendUnavailableError: 503,
    errors.BackendTimeoutError: 504,
    errors.ConfigurationError: 500,
    errors.ManifestError: 500,
    errors.ArtifactError: 500,
    errors.InferenceError: 500,
    errors.TierserveError: 500,
}


def status_for(exc: BaseException) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]  # type: ignore[index]
    return 500


def render_error(exc: BaseException, family: Family = "oip", headers: dict[str, str] | None = None,
                 request_id: str = "") -> ErrorAnswer:
    """The answer to ``exc`` in ``family``'s shape; an exception that is not the project's is a 500 that
    names no internals (the request id points at the logs)."""
    status = status_for(exc)
    extra = dict(headers or {})
    if isinstance(exc, errors.TierserveError):
        message, code = exc.message, exc.code
        served_by = getattr(exc, "served_by", None)
        if served_by:
            extra["x-served-by"] = str(served_by)
    else:
        message = f"internal error{f' (request {request_id})' if request_id else ''}; see the function's logs"
        code = "internal_error"
    telemetry.error_code(code)  # every error answered, by code (a fixed set: never a name from the request)
    retry = getattr(exc, "retry_after_s", None)
    if isinstance(exc, errors.TierserveError) and retry is not None:
        extra["retry-after"] = str(max(1, math.ceil(retry)))
    if family == "openai":
        document: dict[str, Any] = {"error": {
            "message": message, "type": _OPENAI_TYPE.get(status, "server_error"),
            "param": getattr(exc, "param", None), "code": code}}
    else:
        document = {"error": message, "code": code}
    return ErrorAnswer(status, code, message, document, extra)
