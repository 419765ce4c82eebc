"""A local SageMaker Runtime ``InvokeEndpoint`` in front of the real local Triton's SageMaker front end.

Why: the router's ``sagemaker`` backend (``tierserve.backends.sagemaker``) must run the same code in
tests and in ``make demo`` as in AWS. boto3 sends ``POST /endpoints/{EndpointName}/invocations``
(SigV4-signed; the signature is not checked here) to ``AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME``; this
server plays SageMaker's part:

* the container is the real ``tritonserver`` from the nvidia-pytriton wheel, started with
  ``--allow-sagemaker=true`` and ``SAGEMAKER_TRITON_DEFAULT_MODEL_NAME`` as NVIDIA's SageMaker image
  starts it, so ``/invocations`` and ``/ping`` are Triton's own SageMaker front end, byte for byte;
* the body and its ``Content-Type`` (``application/json``, or
  ``application/vnd.sagemaker-triton.binary+json;json-header-size=N``) go to ``/invocations`` as they
  came, and a 2xx answer comes back with the container's body and content type;
* a non-2xx answer becomes what InvokeEndpoint returns: 424 ``ModelError`` with ``OriginalStatusCode``,
  ``OriginalMessage`` (the container's body) and SageMaker's wording in ``Message``;
* an unknown endpoint is 400 ``ValidationError``; a container that does not answer within
  ``container_timeout_s`` (SageMaker: 60 s) is a ``ModelError`` "invocation timed out"; a container
  that cannot be reached is 503 ``ServiceUnavailable``; a body over 6 MB is 400 ``ValidationError``.

``InvokeEndpointWithResponseStream`` (``POST /endpoints/{EndpointName}/invocations-response-stream``) streams a
generative model's tokens: the body (Triton's generate request with the vLLM backend's inputs) goes to Triton's
``generate_stream`` and each piece of its server-sent events comes back, as it arrives, in a ``PayloadPart``
event of the AWS event-stream framing (``tierserve.streaming.eventstream``); a stream Triton cuts ends with a
``ModelStreamError`` event, as SageMaker ends one. In AWS the Triton container does this itself with generation
enabled (``SAGEMAKER_TRITON_INFERENCE_TYPE``); the Triton 2.51 binary here has no such SageMaker mode, so the
emulator calls ``generate_stream`` on the container's HTTP port (``LocalEndpoint.generate_url``) instead. A
``PayloadPart`` holds whatever bytes arrived, so an event (a line) may be split across parts, as in AWS.

Not emulated: IAM (any signature passes), multi-model endpoints (``TargetModel`` is refused: the local
endpoints are single-model), production variants and autoscaling.
"""

from __future__ import annotations

import http.client
import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from tierserve.httpserver import HttpError, HttpServer, Limits, Request, Response

INVOKE_PATH = re.compile(r"^/endpoints/(?P<name>[^/]+)/invocations/?$")
STREAM_PATH = re.compile(r"^/endpoints/(?P<name>[^/]+)/invocations-response-stream/?$")
EVENTSTREAM = "application/vnd.amazon.eventstream"
#: InvokeEndpoint's request payload limit.
MAX_PAYLOAD_BYTES = 6 * 1024 * 1024
#: How long SageMaker waits for a container's answer.
CONTAINER_TIMEOUT_S = 60.0
ACCOUNT = "123456789012"
REGION = "us-east-1"

Reply = tuple[int, dict[str, str], bytes]


@dataclass
class LocalEndpoint:
    """One endpoint: its name and its container's base URL (Triton's SageMaker port)."""

    name: str
    container_url: str  # http://127.0.0.1:PORT
    model: str = ""  # what SAGEMAKER_TRITON_DEFAULT_MODEL_NAME names
    #: Triton's HTTP base URL (http://127.0.0.1:PORT) for InvokeEndpointWithResponseStream; "" when the endpoint
    #: does not generate.
    generate_url: str = ""


def _reply(status: int, body: bytes, headers: Mapping[str, str] | None = None) -> Reply:
    return status, {"Content-Type": "application/json", "x-amzn-RequestId": str(uuid.uuid4()), **(headers or {})}, body


def _aws_error(status: int, code: str, message: str, **fields: Any) -> Reply:
    return _reply(status, json.dumps({"message": message, **fields}).encode(), {"x-amzn-ErrorType": code})


def _model_error(endpoint: LocalEndpoint, status: int, message: str) -> Reply:
    kind = "client" if 400 <= status < 500 else "server"
    log_stream = f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:/aws/sagemaker/Endpoints/{endpoint.name}"
    wording = (f"Received {kind} error ({status}) from primary with message \"{message}\". See "
               f"https://{REGION}.console.aws.amazon.com/cloudwatch/home?region={REGION}#logEventViewer:group="
               f"/aws/sagemaker/Endpoints/{endpoint.name} in account {ACCOUNT} for more information.")
    return _aws_error(424, "ModelError", wording, OriginalStatusCode=status, OriginalMessage=message,
                      LogStreamArn=log_stream, ErrorCode=f"{kind.upper()}_ERROR_FROM_MODEL")


def invoke(endpoints: Mapping[str, LocalEndpoint], method: str, target: str, headers: Mapping[str, str],
           body: bytes, container_timeout_s: float = CONTAINER_TIMEOUT_S) -> Reply | None:
    """InvokeEndpoint for one HTTP request; None when the path is not InvokeEndpoint's."""
    m = INVOKE_PATH.match(target.split("?", 1)[0])
    if m is None or method != "POST":
        return None
    lower = {k.lower(): v for k, v in headers.items()}
    name = unquote(m.group("name"))
    endpoint = endpoints.get(name)
    if endpoint is None:
        return _aws_error(400, "ValidationError", f"Endpoint {name} of account {ACCOUNT} not found.")
    if "x-amzn-sagemaker-target-model" in lower:
        return _aws_error(400, "ValidationError",
                          f"Endpoint {name} is a single-model endpoint: TargetModel is only for multi-model endpoints "
                          "(the local emulation runs single-model endpoints only).")
    if len(body) > MAX_PAYLOAD_BYTES:
        return _aws_error(400, "ValidationError",
                          f"Request payload of {len(body)} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit of "
                          "InvokeEndpoint.")
    forward = {"Content-Type": lower.get("content-type", "application/octet-stream"),
               "Accept": lower.get("accept", "*/*")}
    url = urlsplit(endpoint.container_url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port or 8080, timeout=container_timeout_s)
    try:
        conn.request("POST", "/invocations", body=body, headers=forward)
        resp = conn.getresponse()
        data = resp.read()
        status, ctype = resp.status, resp.getheader("Content-Type", "application/json")
    except TimeoutError:
        return _model_error(endpoint, 0, "Your invocation timed out while waiting for a response from container "
                                         "primary. Review the latency metrics for each container in Amazon "
                                         "CloudWatch, resolve the issue, and try again.")
    except OSError as exc:
        return _aws_error(503, "ServiceUnavailable",
                          f"The endpoint {name} is unavailable: its container does not answer ({type(exc).__name__}).")
    finally:
        conn.close()
    if 200 <= status < 300:
        return _reply(200, data, {"Content-Type": ctype, "x-Amzn-Invoked-Production-Variant": "AllTraffic"})
    return _model_error(endpoint, status, data.decode("utf-8", "replace"))


StreamReply = tuple[int, dict[str, str], Any]


def invoke_stream(endpoints: Mapping[str, LocalEndpoint], method: str, target: str, headers: Mapping[str, str],
                  body: bytes, container_timeout_s: float = CONTAINER_TIMEOUT_S) -> StreamReply | None:
    """InvokeEndpointWithResponseStream for one HTTP request (see the module docstring); None when the path is
    not its. The answer's body is an iterator of event-stream frames once Triton has started streaming."""
    m = STREAM_PATH.match(target.split("?", 1)[0])
    if m is None or method != "POST":
        return None
    name = unquote(m.group("name"))
    endpoint = endpoints.get(name)
    if endpoint is None:
        return _aws_error(400, "ValidationError", f"Endpoint {name} of account {ACCOUNT} not found.")
    if not endpoint.generate_url or not endpoint.model:
        return _aws_error(400, "ValidationError", f"Endpoint {name} does not stream responses: its container does "
                                                  "not serve a generative model.")
    if len(body) > MAX_PAYLOAD_BYTES:
        return _aws_error(400, "ValidationError",
                          f"Request payload of {len(body)} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit.")
    url = urlsplit(endpoint.generate_url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port or 8000, timeout=container_timeout_s)
    try:
        conn.request("POST", f"/v2/models/{endpoint.model}/generate_stream", body=body,
                     headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
        resp = conn.getresponse()
    except TimeoutError:
        conn.close()
        return _model_error(endpoint, 0, "Your invocation timed out while waiting for a response from container "
                                         "primary.")
    except OSError as exc:
        conn.close()
        return _aws_error(503, "ServiceUnavailable",
                          f"The endpoint {name} is unavailable: its container does not answer ({type(exc).__name__}).")
    if not 200 <= resp.status < 300:
        data = resp.read()
        conn.close()
        return _model_error(endpoint, resp.status, data.decode("utf-8", "replace"))
    out = {"Content-Type": EVENTSTREAM, "x-amzn-RequestId": str(uuid.uuid4()),
           "X-Amzn-SageMaker-Content-Type": resp.getheader("Content-Type", "text/event-stream"),
           "x-Amzn-Invoked-Production-Variant": "AllTraffic"}
    return 200, out, _payload_parts(conn, resp)


def _payload_parts(conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> Any:
    """A ``PayloadPart`` event per piece of the container's stream as it arrives; ``ModelStreamError`` when the
    container's stream is cut (closing this closes the container's connection, which cancels the request)."""
    from tierserve.streaming import eventstream

    try:
        while True:
            try:
                data = resp.read1(65536)
            except (OSError, http.client.HTTPException) as exc:
                yield eventstream.encode_message(
                    {":message-type": "exception", ":exception-type": "ModelStreamError",
                     ":content-type": "application/json"},
                    json.dumps({"Message": f"The container's response stream was interrupted "
                                           f"({type(exc).__name__}: {exc}).", "ErrorCode": "ModelStreamError"}
                               ).encode())
                return
            if not data:
                return
            yield eventstream.event("PayloadPart", data, "application/octet-stream")
    finally:
        conn.close()


class SageMakerRuntime(HttpServer):
    """Serves InvokeEndpoint for ``endpoints`` on its own port (``tierserve.httpserver``: deadlines, bounded
    connections); a context manager."""

    thread_name = "sagemaker-runtime"
    server_name = "tierserve-sagemaker-runtime-local"

    def __init__(self, endpoints: list[LocalEndpoint], host: str = "127.0.0.1", port: int = 0,
                 container_timeout_s: float = CONTAINER_TIMEOUT_S, limits: Limits | None = None) -> None:
        self.endpoints = {e.name: e for e in endpoints}
        self.host, self.port = host, port
        self.container_timeout_s = container_timeout_s
        # bodies up to twice InvokeEndpoint's limit are read, so that its own 400 ValidationError answers them
        self.limits = limits or Limits(max_body_bytes=2 * MAX_PAYLOAD_BYTES, workers=64)

    def handle(self, request: Request) -> Response:
        reply: Any = invoke(self.endpoints, request.method, request.target, request.header_map(), request.body,
                            self.container_timeout_s)
        if reply is None:
            reply = invoke_stream(self.endpoints, request.method, request.target, request.header_map(),
                                  request.body, self.container_timeout_s)
        status, headers, body = reply or _aws_error(404, "UnknownOperationException",
                                                    f"no such operation: {request.method} {request.path}")
        return Response(status, list(headers.items()), body)

    def error_response(self, error: HttpError) -> Response:
        code = "ValidationError" if error.status < 500 else "ServiceUnavailable"
        status, headers, body = _aws_error(error.status, code, error.message)
        return Response(status, [*headers.items(), *error.headers], body)


def triton_container(repository: Any, model: str, log_path: Any = None) -> tuple[Any, str]:
    """A local tritonserver started the way NVIDIA's SageMaker image starts it for a single-model
    endpoint (SageMaker front end on, ``SAGEMAKER_TRITON_DEFAULT_MODEL_NAME``), not yet running,
    and the base URL of its SageMaker port."""
    from tierserve_tools.emulation import free_port
    from tierserve_tools.triton import TritonServer

    port = free_port()
    server = TritonServer(repository, log_path=log_path,
                          extra_args=("--allow-sagemaker=true", f"--sagemaker-port={port}"),
                          env={"SAGEMAKER_TRITON_DEFAULT_MODEL_NAME": model})
    return server, f"http://127.0.0.1:{port}"


#: The local endpoint's name (the template's default SageMaker endpoint name).
ENDPOINT_NAME = "tierserve-gpu"


def endpoint_repository(models: Any, prod: Any, work: Any, model: str | None = None) -> tuple[Any, str, str, list[str]]:
    """What a local single-model endpoint serves, prepared as SageMaker would: the GPU model's
    ``model.tar.gz`` (``tierserve sagemaker-package``) unpacked as ``/opt/ml/model``, then localized
    for the CPU tritonserver (``tierserve_tools.triton``). Returns (repository, name, version, the
    other GPU models, which this endpoint does not hold)."""
    from pathlib import Path

    from tierserve.errors import ConfigurationError
    from tierserve.manifest import Manifest
    from tierserve_compiler.sagemaker import package, unpack
    from tierserve_tools.triton import build_local_repository

    models, work = Path(models), Path(work)
    manifest = Manifest.loads((models / "manifest.json").read_bytes())
    gpu = sorted(n for n in manifest.models if manifest.resolve(n).serves_gpu and (Path(prod) / n).is_dir())
    if not gpu:
        raise ConfigurationError(f"no GPU-placed model with a Triton repository under {prod}: nothing for the "
                                 "SageMaker endpoint to serve; compile one with --target gpu|both")
    name = model or gpu[0]
    if name not in gpu:
        raise ConfigurationError(f"{name!r} is not a GPU-placed model here; choose one of {', '.join(gpu)}")
    pkg = package(models, name, None, work / "model-data")
    opt_ml_model = unpack(pkg.path, work / "opt-ml-model")
    repo = build_local_repository(opt_ml_model, work / "repository")
    return repo, name, pkg.version, [n for n in gpu if n != name]
