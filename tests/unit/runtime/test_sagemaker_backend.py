"""SageMakerBackend without Triton: real boto3 (SigV4) -> the local InvokeEndpoint -> a stand-in container
that answers what Triton's SageMaker front end answers. Error mapping, content types, timeouts, which
models a single-model endpoint holds. (With the real Triton behind it: tests/integration/test_sagemaker_tier.py.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from tests.support.fakes import json_body, model_version, rows_of
from tierserve.backends.sagemaker import (
    BINARY_CONTENT_TYPE,
    SageMakerBackend,
    classify_container_error,
    header_length_of,
    map_client_error,
)
from tierserve.errors import (
    BackendTimeoutError,
    BackendUnavailableError,
    ConfigurationError,
    InferenceError,
    InvalidRequestError,
)
from tierserve.protocol.calls import Body, InferenceCall
from tierserve.protocol.messages import InferRequest, InferResponse, RequestedOutput
from tierserve.protocol.tensors import encode_request, encode_response, tensor_from_numpy
from tierserve_tools.sagemaker import LocalEndpoint, SageMakerRuntime

MODEL = model_version("m", ("gpu", "cpu"), max_batch_size=8)


class Container:
    """What Triton's SageMaker front end does at /invocations, scripted: ``answer(body, content_type)``
    returns (status, content_type, body); each request's content type is recorded."""

    def __init__(self) -> None:
        self.content_types: list[str] = []
        self.delay_s = 0.0
        self.answer = self.ones
        container = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                ctype = self.headers.get("Content-Type", "")
                container.content_types.append(ctype)
                time.sleep(container.delay_s)
                status, out_type, body = container.answer(raw, ctype)
                self.send_response(status)
                self.send_header("Content-Type", out_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def ones(self, raw: bytes, ctype: str) -> tuple[int, str, bytes]:
        """y = ones(rows, 3), binary, for model 'm' v1 (rows read from the request's header)."""
        from tierserve.protocol.tensors import decode_request

        request = decode_request(raw, header_length_of(ctype))
        rows = request.inputs[0].shape[0]
        y = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
        out = InferResponse("m", "1", [tensor_from_numpy("y", y)])
        body, headers = encode_response(out, InferRequest([], outputs=[RequestedOutput("y", binary_data=True)]))
        length = headers.get("inference-header-content-length")
        return 200, f"{BINARY_CONTENT_TYPE}{length}" if length else "application/json", body

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def container():
    c = Container()
    yield c
    c.stop()


@pytest.fixture
def endpoint(container, monkeypatch):
    runtime = SageMakerRuntime([LocalEndpoint("ep", container.url, "m")], container_timeout_s=2).start()
    for key, value in {"AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME": runtime.url, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    yield runtime
    runtime.stop()


def _call(rows: int = 2) -> InferenceCall:
    return InferenceCall.from_body(Body(json_body(rows_of(rows))))


def _answer(status: int, message: str):
    return lambda raw, ctype: (status, "application/json", json.dumps({"error": message}).encode())


# --- the happy path ------------------------------------------------------------------------------


def test_json_body_goes_as_application_json_and_binary_with_its_header_size(container, endpoint):
    backend = SageMakerBackend("ep", timeout_s=5)
    reply = backend.infer(MODEL, _call(3), timeout_s=5)
    assert reply.arrays()["y"].shape == (3, 3)
    data, length = encode_request(InferRequest([tensor_from_numpy("x", rows_of(2))]), binary=True)
    backend.infer(MODEL, InferenceCall.from_body(Body(data, length)), timeout_s=5)
    assert container.content_types == ["application/json", f"{BINARY_CONTENT_TYPE}{length}"]


def test_a_batch_over_max_batch_size_goes_in_binary_parts_and_comes_back_in_order(container, endpoint):
    reply = SageMakerBackend("ep", timeout_s=5).infer(MODEL, _call(20), timeout_s=5)
    y = reply.arrays()["y"]
    assert y.shape == (20, 3)
    expected = np.concatenate([np.arange(n * 3, dtype=np.float32).reshape(n, 3) for n in (8, 8, 4)])
    np.testing.assert_array_equal(y, expected)
    assert len(container.content_types) == 3 and all(c.startswith(BINARY_CONTENT_TYPE) for c in container.content_types)


# --- errors: input errors apart from tier failures -----------------------------------------------


@pytest.mark.parametrize(("status", "message", "error"), [
    (400, "[request id: <id_unknown>] unexpected shape for input 'x' for model 'm'. Expected [-1,4], got [2,5].",
     InvalidRequestError),
    (400, "inference request batch-size must be <= 8 for 'm'", InvalidRequestError),
    (400, "onnx runtime error 2: Non-zero status code returned while running Gather node. indices element out of "
          "data bounds", InvalidRequestError),
    (400, "onnx runtime error 6: CUDA failure 700: an illegal memory access was encountered", InferenceError),
    (507, "CUDA out of memory. Tried to allocate 2.00 GiB", InferenceError),
    (400, "Request for unknown model: 'm' is not found", BackendUnavailableError),
    (500, "internal error", InferenceError),
])
def test_container_errors_are_told_apart(container, endpoint, status, message, error):
    container.answer = _answer(status, message)
    with pytest.raises(error) as info:
        SageMakerBackend("ep", timeout_s=5).infer(MODEL, _call(), timeout_s=5)
    assert message.split(":")[0][:20] in info.value.message  # Triton's own words reach the operator
    assert info.value.__cause__ is None  # nothing from botocore leaks


def test_a_slow_container_is_a_timeout_within_the_budget(container, endpoint):
    container.delay_s = 1.5
    t0 = time.monotonic()
    with pytest.raises(BackendTimeoutError):
        SageMakerBackend("ep", timeout_s=5).infer(MODEL, _call(), timeout_s=0.3)
    assert time.monotonic() - t0 < 1.0


def test_the_endpoints_own_container_timeout_is_a_timeout(container, endpoint):
    container.delay_s = 2.5  # the local endpoint gives its container 2 s here (SageMaker: 60 s)
    with pytest.raises(BackendTimeoutError, match="timed out"):
        SageMakerBackend("ep", timeout_s=10).infer(MODEL, _call(), timeout_s=10)


def test_a_container_that_is_down_and_an_unknown_endpoint_are_unavailable(container, endpoint):
    with pytest.raises(BackendUnavailableError, match="not found"):
        SageMakerBackend("nope", timeout_s=5).infer(MODEL, _call(), timeout_s=5)
    container.stop()
    with pytest.raises(BackendUnavailableError, match="ServiceUnavailable"):
        SageMakerBackend("ep", timeout_s=5).infer(MODEL, _call(), timeout_s=5)


def test_a_response_for_another_model_is_refused(container, endpoint):
    other = model_version("other", ("gpu",), max_batch_size=8)
    with pytest.raises(InferenceError, match="answered with model 'm'"):
        SageMakerBackend("ep", timeout_s=5).infer(other, _call(), timeout_s=5)


def test_a_multi_model_endpoint_names_the_archive_per_request(container, endpoint):
    # The local endpoints are single-model: SageMaker refuses TargetModel there, which shows it was sent.
    backend = SageMakerBackend("ep", target_model="{name}-{version}.tar.gz", timeout_s=5)
    with pytest.raises(BackendUnavailableError, match="single-model endpoint"):
        backend.infer(MODEL, _call(), timeout_s=5)
    with pytest.raises(ConfigurationError, match="SAGEMAKER_TARGET_MODEL"):
        SageMakerBackend("ep", target_model="{model}.tar.gz")


@pytest.mark.parametrize(("code", "status", "error"), [
    ("ModelNotReadyException", 429, BackendUnavailableError),
    ("ServiceUnavailable", 503, BackendUnavailableError),
    ("ThrottlingException", 400, BackendUnavailableError),
    ("InternalFailure", 500, InferenceError),
    ("InternalDependencyException", 530, BackendUnavailableError),
])
def test_aws_error_codes(code, status, error):
    from botocore.exceptions import ClientError

    exc = ClientError({"Error": {"Code": code, "Message": "x"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                      "InvokeEndpoint")
    assert type(map_client_error(exc, "model 'm'")) is error


def test_classification_needs_triton_words_for_an_input_error():
    # Triton's SageMaker front end answers 400 for every failure: a 400 alone is not the client's fault
    assert isinstance(classify_container_error(400, '{"error": "failed to load model"}', "m"), InferenceError)
    assert isinstance(classify_container_error(0, "Your invocation timed out", "m"), BackendTimeoutError)


# --- configuration -------------------------------------------------------------------------------


def test_a_single_model_endpoint_holds_only_its_model_and_version():
    backend = SageMakerBackend("ep", model="m/1")
    assert backend.ready(MODEL) and backend.ready()
    assert not backend.ready(model_version("m", ("gpu",), version="2"))
    assert not backend.ready(model_version("other", ("gpu",)))
    assert not backend.ready(model_version("m", ("cpu",)))
    assert SageMakerBackend("ep", model="m").ready(model_version("m", ("gpu",), version="2"))
    with pytest.raises(BackendUnavailableError, match="serves model 'm/1'"):
        backend.infer(model_version("m", ("gpu",), version="2"), _call(), timeout_s=1)


def test_settings_select_the_backend_and_name_the_missing_variable():
    from tierserve.app import build_gpu_backend
    from tierserve.settings import parse_settings

    gpu = build_gpu_backend(parse_settings({"GPU_BACKEND": "sagemaker", "SAGEMAKER_ENDPOINT_NAME": "ep",
                                            "SAGEMAKER_MODEL": "m/1", "TRITON_TIMEOUT_S": "3"}))
    assert isinstance(gpu, SageMakerBackend) and gpu.timeout_s == 3 and gpu.model == "m/1"
    assert build_gpu_backend(parse_settings({"GPU_BACKEND": "none", "TRITON_URL": "h:1"})) is None
    with pytest.raises(ConfigurationError, match="SAGEMAKER_ENDPOINT_NAME"):
        parse_settings({"GPU_BACKEND": "sagemaker"})
    with pytest.raises(ConfigurationError, match="GPU_BACKEND"):
        parse_settings({"GPU_BACKEND": "gpu"})


def test_importing_the_backend_loads_neither_boto3_nor_numpy():
    code = ("import sys; import tierserve.backends.sagemaker; "
            "print(any(m in sys.modules for m in ('boto3', 'botocore', 'numpy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
