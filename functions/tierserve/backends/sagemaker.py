"""The GPU tier as a SageMaker real-time endpoint running NVIDIA's Triton container.

Why SageMaker: it deploys, scales, patches and authenticates the GPU fleet, so the router needs no
VPC route to a server of its own and Triton is never exposed. The router reaches it with
``InvokeEndpoint`` (boto3 ``sagemaker-runtime``, SigV4-signed with the function's role); locally the
same code path points at ``tierserve serve``'s emulation through ``AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME``.

The payload is Triton's own. Triton's SageMaker front end (``/invocations`` in the container) takes
the Open Inference Protocol body unchanged: JSON (``application/json``), or JSON plus binary tensors,
where the header's length travels in the content type because SageMaker strips custom headers:
``application/vnd.sagemaker-triton.binary+json;json-header-size=N``. The reply uses the same two
content types. So a client's body is forwarded as it came (no tensor is decoded by the router),
unless its batch exceeds the model's ``max_batch_size``: then it is split along dim 0
(``tierserve.backends.split``), sent as binary parts concurrently, and the outputs concatenated in order.

Endpoints: a single-model endpoint serves the one model in its ``model.tar.gz``
(``SAGEMAKER_TRITON_DEFAULT_MODEL_NAME``; ``SAGEMAKER_MODEL`` tells the router which one, so that
other models fall back without a failed call); a multi-model endpoint serves any archive under its
S3 prefix, named per request by ``TargetModel`` (``SAGEMAKER_TARGET_MODEL``, e.g.
``{name}-{version}.tar.gz``).

Errors, mapped like the Triton backend's, with input errors kept apart from tier failures:

* ``ModelError`` (424): the container answered non-2xx. Triton's SageMaker front end answers 400 for
  every failed inference (it does not pass Triton's own error code on), so the container's message
  decides: a request Triton refused while checking it (shape, datatype, batch size, unknown input,
  onnxruntime's INVALID_ARGUMENT) is the client's (``InvalidRequestError``, never a breaker failure);
  a model that is not loaded is ``BackendUnavailableError``; a timeout is ``BackendTimeoutError``;
  anything else (out of memory: 507, a CUDA fault) is ``InferenceError``, a tier failure.
* ``ModelNotReadyException`` (429), ``ServiceUnavailable`` (503), throttling, an unknown endpoint,
  connection errors: ``BackendUnavailableError``; a read timeout: ``BackendTimeoutError``;
  ``InternalFailure`` and the rest: ``InferenceError``.

Timeouts: the request's remaining deadline, rounded down to one of ``TIMEOUT_BUCKETS_S`` (boto3
clients fix their read timeout at construction; one client per bucket, shared by threads). No
automatic retries: an InvokeEndpoint may have run. SageMaker itself gives a container 60 s.

Generation (issue 18): :meth:`SageMakerBackend.generate` streams a generative model's tokens with
``InvokeEndpointWithResponseStream``: the body is Triton's generate request with the vLLM backend's inputs
(``tierserve.backends.generate_stream``), and the endpoint's ``PayloadPart`` events carry the container's
server-sent events. A ``PayloadPart`` holds whatever bytes the container had written, so an event (a line) may
be split across parts, or several share one: the bytes are reassembled before any event is parsed. A container
error before the stream is a ``ModelError`` whose original status decides (4xx: the input's fault, unless the
model is not there; 5xx: the tier's); ``ModelStreamError`` / ``InternalStreamFailure`` during the stream, a cut
connection or a read timeout are the tier's failures. The API has no ``TargetModel``: a generative model needs
a single-model endpoint of its own (as SageMaker's Triton container sets its inference type per container).

Health: SageMaker has no data-plane health call (``DescribeEndpoint`` is a control-plane API with low
rate limits), so ``ready()`` answers from configuration; the shared breaker carries the tier's
health, opened by failed calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from tierserve import errors
from tierserve.backends.base import ClientsByTimeout, shared_pool
from tierserve.backends.split import binary_outputs, max_batch_bounds, run_parts
from tierserve.manifest import ModelVersion
from tierserve.protocol.calls import InferenceCall, Reply
from tierserve.protocol.messages import InferRequest, InferResponse
from tierserve.tiers import Tier

if TYPE_CHECKING:
    from tierserve.generation.events import GenerationEvent
    from tierserve.generation.requests import GenerationRequest

#: The content type of a body whose JSON header is followed by binary tensors (Triton's SageMaker front end).
BINARY_CONTENT_TYPE = "application/vnd.sagemaker-triton.binary+json;json-header-size="
JSON_CONTENT_TYPE = "application/json"
#: Read timeouts (s) the clients are built with; a call's budget is rounded down to one of them.
TIMEOUT_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
#: InvokeEndpoint's request payload limit.
MAX_REQUEST_BYTES = 6 * 1024 * 1024
#: The longest a generation streams (the REST API's 15-minute streamed response).
MAX_STREAM_S = 900.0
#: Concurrent InvokeEndpoint calls for the parts of requests split by max_batch_size (the process's pool).
SPLIT_THREADS = 32

#: What Triton says when it refuses a request while checking it (core request validation, the
#: HTTP front end's parser, onnxruntime's INVALID_ARGUMENT): the client's error, not the tier's.
_INPUT_HINTS = (
    "unexpected shape", "unexpected datatype", "data-type is", "unexpected inference input",
    "unexpected inference output", "unexpected additional input", "inputs but got", "batch-size must be",
    "byte size", "unable to parse", "failed to parse", "json parse error", "missing 'datatype'",
    "missing 'shape'", "invalid argument", "invalid_argument", "invalidargument", "onnx runtime error 2:",
    "out of data bounds",
)
_UNAVAILABLE_HINTS = ("unknown model", "is not found", "not ready", "unavailable", "is not loaded", "no model")
_TIMEOUT_HINTS = ("timed out", "deadline exceeded")
#: AWS error codes of InvokeEndpoint (and the service in front of it) that mean "the tier cannot serve now".
_UNAVAILABLE_CODES = {
    "ModelNotReadyException", "ServiceUnavailable", "ServiceUnavailableException", "ThrottlingException",
    "Throttling", "TooManyRequestsException", "InternalDependencyException", "EndpointConnectionError",
}  # fmt: skip


def _bucket(timeout_s: float) -> float:
    below = [b for b in TIMEOUT_BUCKETS_S if b <= timeout_s]
    return below[-1] if below else TIMEOUT_BUCKETS_S[0]


def content_type(header_length: int | None) -> str:
    """The InvokeEndpoint content type for a protocol body (JSON, or header + binary tensors)."""
    return JSON_CONTENT_TYPE if header_length is None else f"{BINARY_CONTENT_TYPE}{header_length}"


def header_length_of(content_type_value: str | None) -> int | None:
    """The JSON header's length from a Triton-on-SageMaker content type (None: the body is JSON)."""
    value = (content_type_value or "").strip()
    if not value.startswith(BINARY_CONTENT_TYPE):
        return None
    raw = value[len(BINARY_CONTENT_TYPE):].split(";", 1)[0].strip()
    try:
        return int(raw)
    except ValueError:
        raise errors.InferenceError(f"the endpoint answered an unreadable content type {value!r}") from None


def classify_container_error(status: int, message: str, what: str) -> errors.TierserveError:
    """The error for a container's non-2xx answer (ModelError's OriginalStatusCode and OriginalMessage)."""
    text = _container_message(message)
    low = text.lower()
    if status == 507 or "out of memory" in low:
        return errors.InferenceError(f"the GPU endpoint ran out of memory for {what}: {text}")
    if status in (0, 408, 504) or any(h in low for h in _TIMEOUT_HINTS):
        return errors.BackendTimeoutError(f"the GPU endpoint did not answer {what} in time: {text}")
    if any(h in low for h in _UNAVAILABLE_HINTS) or status in (404, 502, 503):
        return errors.BackendUnavailableError(f"the GPU endpoint cannot serve {what}: {text}")
    if 400 <= status < 500 and any(h in low for h in _INPUT_HINTS):
        return errors.InvalidRequestError(f"the GPU tier rejected {what}: {text}")
    return errors.InferenceError(f"the GPU endpoint failed to run {what}: {text}")


def _container_message(message: str) -> str:
    """Triton answers ``{"error": "..."}``; SageMaker may hand it over as text. The error's text either way."""
    import json

    try:
        obj = json.loads(message)
    except (TypeError, ValueError):
        return str(message)
    if isinstance(obj, dict) and isinstance(obj.get("error"), str):
        return obj["error"]
    return str(message)


def map_client_error(exc: BaseException, what: str) -> errors.TierserveError:
    """A botocore exception from InvokeEndpoint as a tierserve error (nothing from botocore leaks)."""
    if isinstance(exc, errors.TierserveError):
        return exc
    name = type(exc).__name__
    if name in ("ReadTimeoutError", "ReadTimeout", "ConnectTimeoutError") or isinstance(exc, TimeoutError):
        return errors.BackendTimeoutError(f"the GPU endpoint did not answer {what} in time ({name})")
    if name in ("EndpointConnectionError", "ConnectionClosedError", "ProxyConnectionError") or isinstance(
            exc, ConnectionError):
        return errors.BackendUnavailableError(f"the GPU endpoint is unreachable for {what} ({name}: {exc})")
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return errors.InferenceError(f"InvokeEndpoint for {what} failed ({name}: {exc})")
    err = response.get("Error") or {}
    code = str(err.get("Code") or "")
    message = str(err.get("Message") or exc)
    if code == "ModelError":
        original = response.get("OriginalStatusCode", err.get("OriginalStatusCode"))
        try:
            status = int(original) if original is not None else 0
        except (TypeError, ValueError):
            status = 0
        original_message = response.get("OriginalMessage") or err.get("OriginalMessage") or message
        return classify_container_error(status, str(original_message), what)
    if code in _UNAVAILABLE_CODES:
        return errors.BackendUnavailableError(f"the GPU endpoint cannot serve {what} now ({code}: {message})")
    if code == "ValidationError" and ("not found" in message.lower() or "endpoint" in message.lower()):
        return errors.BackendUnavailableError(
            f"InvokeEndpoint refused {what} ({message}); check SAGEMAKER_ENDPOINT_NAME and that the endpoint is "
            "InService")
    return errors.InferenceError(f"InvokeEndpoint for {what} failed ({code or name}: {message})")


class SageMakerBackend:
    """A Backend that sends Triton payloads to a SageMaker endpoint (see the module docstring)."""

    tier = Tier.GPU

    def __init__(self, endpoint_name: str, *, model: str = "", target_model: str = "", timeout_s: float = 10.0,
                 client: Any = None) -> None:
        if not endpoint_name:
            raise errors.ConfigurationError("GPU_BACKEND=sagemaker needs SAGEMAKER_ENDPOINT_NAME (the endpoint's name)")
        if timeout_s <= 0:
            raise errors.ConfigurationError(f"the GPU tier's timeout must be positive, not {timeout_s!r}")
        if target_model:
            try:
                target_model.format(name="m", version="1")
            except (KeyError, IndexError, ValueError) as exc:
                raise errors.ConfigurationError(
                    f"SAGEMAKER_TARGET_MODEL={target_model!r} may use only {{name}} and {{version}}: {exc}") from None
        self.endpoint_name = endpoint_name
        self.model = model
        self.target_model = target_model
        self.timeout_s = float(timeout_s)
        self._clients = ClientsByTimeout("sagemaker-runtime", client, max_pool_connections=32)

    def __repr__(self) -> str:
        return f"SageMakerBackend({self.endpoint_name!r}, model={self.model!r}, target_model={self.target_model!r})"

    def client(self, timeout_s: float) -> Any:
        """A ``sagemaker-runtime`` client whose read timeout fits ``timeout_s`` (one per bucket, thread-safe)."""
        return self._clients.get(_bucket(timeout_s))

    def serves(self, model: ModelVersion) -> bool:
        """Whether this endpoint holds ``model``: a single-model endpoint holds only ``SAGEMAKER_MODEL``
        (``name`` or ``name/version``); a multi-model endpoint (or no ``SAGEMAKER_MODEL``) holds any."""
        if not model.serves_gpu:
            return False
        if not self.model:
            return True
        name, _, version = self.model.partition("/")
        return name == model.name and (not version or version == model.version)

    def ready(self, model: ModelVersion | None = None) -> bool:
        """From configuration only (see the module docstring); never raises, never calls AWS."""
        return model is None or self.serves(model)

    # --- Backend ---------------------------------------------------------------------------------

    def infer(self, model: ModelVersion, call: InferenceCall, timeout_s: float | None = None) -> Reply:
        what = f"model {model.name!r} version {model.version!r}"
        if not self.serves(model):
            raise errors.BackendUnavailableError(
                f"endpoint {self.endpoint_name!r} serves model {self.model!r}, not {model.name!r} v{model.version}")
        timeout = self.timeout_s if timeout_s is None else min(float(timeout_s), self.timeout_s)
        if timeout <= 0:
            raise errors.BackendTimeoutError("no time left in the request's budget to call the GPU endpoint")
        bounds = max_batch_bounds(call.rows, model.max_batch_size, all(t.shape for t in call.inputs))
        if len(bounds) == 1:  # the client's body as it came: no tensor is decoded
            body = call.body()
            data = bytes(_view(body.data))
            return Reply(self._invoke(model, data, body.header_length, timeout, what))
        request = call.request()
        deadline = time.monotonic() + timeout
        return Reply(run_parts(request, bounds, lambda part: self._invoke_request(model, part, timeout, what),
                               pool=shared_pool("sagemaker-split", SPLIT_THREADS), deadline=deadline,
                               outputs=binary_outputs(request, model),
                               timeout_message=f"the GPU endpoint did not answer {what} within the request's "
                                               "deadline"))

    def _invoke_request(self, model: ModelVersion, request: InferRequest, timeout: float, what: str) -> InferResponse:
        from tierserve.protocol.tensors import encode_request

        data, header_length = encode_request(request, binary=True)
        return self._invoke(model, data, header_length, timeout, what)

    def _invoke(self, model: ModelVersion, data: bytes, header_length: int | None, timeout: float,
                what: str) -> InferResponse:
        if len(data) > MAX_REQUEST_BYTES:
            raise errors.InvalidRequestError(
                f"the request for {what} is {len(data)} bytes, over InvokeEndpoint's 6 MB limit; send fewer rows")
        kwargs: dict[str, Any] = {"EndpointName": self.endpoint_name, "Body": data,
                                  "ContentType": content_type(header_length), "Accept": JSON_CONTENT_TYPE}
        if self.target_model:
            kwargs["TargetModel"] = self.target_model.format(name=model.name, version=model.version)
        try:
            out = self.client(timeout).invoke_endpoint(**kwargs)
            raw = out["Body"].read()
        except Exception as exc:
            raise map_client_error(exc, what) from None
        try:
            from tierserve.protocol.tensors import decode_response

            response = decode_response(raw, header_length_of(out.get("ContentType")))
        except errors.TierserveError as exc:
            raise errors.InferenceError(f"cannot read the GPU endpoint's answer for {what}: {exc.message}") from None
        # A multi-model endpoint names the model after its archive; a single-model one by its own name.
        served = (response.model_name or model.name, str(response.model_version or model.version))
        if not self.target_model and served != (model.name, model.version):
            raise errors.InferenceError(
                f"endpoint {self.endpoint_name!r} answered with model {served[0]!r} v{served[1]}, not "
                f"{model.name!r} v{model.version}: set SAGEMAKER_MODEL to the name/version its model.tar.gz holds")
        return response


    # --- generation ------------------------------------------------------------------------------------

    def generate(self, model: ModelVersion, request: GenerationRequest, deadline: Any = None,
                 cancelled: Callable[[], bool] = lambda: False, *, text_input: str | None = None
                 ) -> Iterator[GenerationEvent]:
        """One generation of ``request`` (prepared) on the endpoint, as events (see the module docstring);
        ``text_input`` as for ``TritonBackend.generate``. A generator: what fails before the first event is
        raised by the first ``next()``."""
        import json
        import time

        from tierserve.backends import generate_stream as gs

        what = f"model {model.name!r} version {model.version!r}"
        if not self.serves(model):
            raise errors.BackendUnavailableError(
                f"endpoint {self.endpoint_name!r} serves model {self.model!r}, not {model.name!r} v{model.version}")
        if self.target_model:
            raise errors.BackendUnavailableError(
                f"InvokeEndpointWithResponseStream has no TargetModel: {what} needs a single-model endpoint of its "
                "own to stream (unset SAGEMAKER_TARGET_MODEL)")
        text = text_input if text_input is not None else request.prompt
        if text is None:
            raise errors.InvalidRequestError(f"the GPU tier needs the prompt's text for {what}: pass text_input")
        budget = float(deadline.budget(MAX_STREAM_S)) if deadline is not None else MAX_STREAM_S
        if budget <= 0:
            raise errors.BackendTimeoutError("no time left in the request's budget to call the GPU endpoint")
        body = json.dumps(gs.request_body(request, text)).encode()
        started = time.perf_counter()
        try:
            out = self.client(min(self.timeout_s, budget)).invoke_endpoint_with_response_stream(
                EndpointName=self.endpoint_name, Body=body, ContentType=JSON_CONTENT_TYPE,
                Accept="text/event-stream")
        except Exception as exc:
            raise _stream_error(exc, what) from None
        stream = out["Body"]
        try:
            yield from gs.events(gs.sse_data(payload_parts(stream, what)), request, what, started,
                                 time.monotonic() + budget, cancelled)
        finally:
            close = getattr(stream, "close", None)
            if callable(close):
                close()


def payload_parts(stream: Iterable[dict[str, Any]], what: str) -> Iterator[bytes]:
    """The bytes of each ``PayloadPart`` of an InvokeEndpointWithResponseStream body, as they come; a stream
    error event, a cut connection or a read timeout as the project's error."""
    try:
        for event in stream:
            part = event.get("PayloadPart")
            if part is not None:
                data = part.get("Bytes") or b""
                if data:
                    yield bytes(data)
            elif "ModelStreamError" in event or "InternalStreamFailure" in event:
                (kind, detail), = ((k, v) for k, v in event.items())
                raise errors.InferenceError(f"the GPU endpoint's stream for {what} failed ({kind}: "
                                            f"{(detail or {}).get('Message')})")
    except errors.TierserveError:
        raise
    except Exception as exc:
        raise _stream_error(exc, what) from None


def _stream_error(exc: BaseException, what: str) -> errors.TierserveError:
    """InvokeEndpointWithResponseStream's errors: a container's 4xx before the stream is the input's fault
    (unless the model is not there), everything else as for InvokeEndpoint."""
    from tierserve.backends import generate_stream as gs

    response = getattr(exc, "response", None)
    err = (response.get("Error") or {}) if isinstance(response, dict) else {}
    if err.get("Code") == "ModelError":
        assert isinstance(response, dict)
        try:
            status = int(response.get("OriginalStatusCode", err.get("OriginalStatusCode")) or 0)
        except (TypeError, ValueError):
            status = 0
        message = str(response.get("OriginalMessage") or err.get("OriginalMessage") or err.get("Message") or exc)
        if 400 <= status < 500:
            return gs.error_for_status(status, gs.error_message(message.encode()), what)
    if err.get("Code") in ("ModelStreamError", "InternalStreamFailure"):
        return errors.InferenceError(f"the GPU endpoint's stream for {what} failed ({err.get('Code')}: "
                                     f"{err.get('Message')})")
    return map_client_error(exc, what)


def _view(data: Any) -> memoryview:
    from tierserve.protocol.header import body_view

    return body_view(data)
