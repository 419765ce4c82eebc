"""The GPU tier as a SageMaker endpoint: the router's ``sagemaker`` backend (real boto3, SigV4) against
`tierserve serve`'s local InvokeEndpoint, with the real tritonserver (its own SageMaker front end,
serving the model.tar.gz that ``tierserve sagemaker-package`` wrote) behind it.

One stack, two models: 'lin' on the GPU with a CPU copy (the endpoint's model), 'other' on the GPU
with a CPU copy but not on the endpoint (a single-model endpoint holds one model).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from tests.support.fakes import X_SPEC, Y_SPEC, FakeBackend, json_body, rows_of
from tests.support.models import linear_onnx, write_model
from tierserve.errors import BackendUnavailableError, InvalidRequestError
from tierserve.protocol.calls import Body, InferenceCall
from tierserve.protocol.messages import InferRequest, RequestedOutput
from tierserve.protocol.tensors import encode_request, tensor_from_numpy

pytestmark = pytest.mark.integration
pytest.importorskip("pytriton", reason="the nvidia-pytriton wheel provides the local tritonserver")

MAX_BATCH = 16


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from tierserve_compiler.triton import write_triton_repo
    from tierserve_tools.serve import LocalStack

    root = tmp_path_factory.mktemp("models")
    data, w, b = linear_onnx(seed=11)
    other, _, _ = linear_onnx(seed=12)
    for name, onnx_bytes in (("lin", data), ("other", other)):
        write_model(root, name, "1", onnx_bytes, (X_SPEC,), (Y_SPEC,), targets=("gpu", "cpu"),
                    max_batch_size=MAX_BATCH, routing={"gpu_min_rows": 8, "gpu_min_bytes": 1 << 30})
        write_triton_repo(root, name, "1", root / name / "1" / "model.onnx", [X_SPEC], [Y_SPEC], MAX_BATCH,
                          tensorrt_fp16=False, warmup=False)
    overrides = {"RouterFunction": {"BREAKER_FAILURE_THRESHOLD": "2", "BREAKER_COOLDOWN_S": "60",
                                    "TRITON_TIMEOUT_S": "5"}}
    with LocalStack(root, port=0, batch=False, s3=False, gpu_tier="sagemaker", sagemaker_model="lin",
                    workdir=tmp_path_factory.mktemp("serve"), env_overrides=overrides) as s:
        s.weights = (w, b)
        yield s


@pytest.fixture
def backend(stack, monkeypatch):
    """The router's backend as app.build_gpu_backend makes it, pointed at the stack's InvokeEndpoint."""
    from tierserve.app import build_gpu_backend
    from tierserve.settings import parse_settings

    env = stack.function_env("RouterFunction")
    for key in ("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(key, env[key])
    gpu = build_gpu_backend(parse_settings(env))
    assert type(gpu).__name__ == "SageMakerBackend"
    return gpu


def _expected(stack, x):
    w, b = stack.weights
    return x @ w + b


def _http(stack, model: str, x: np.ndarray, headers: dict | None = None):
    req = urllib.request.Request(f"{stack.url}/v2/models/{model}/infer", data=json_body(x), method="POST",
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, json.loads(err.read())


def test_the_endpoint_serves_the_packaged_model_with_tritons_own_sagemaker_front_end(stack):
    # Given the stack started with --gpu-tier sagemaker
    # Then Triton got the endpoint's model.tar.gz, unpacked, with the model named for SageMaker
    assert stack.endpoint_model == "lin/1"
    assert "--allow-sagemaker=true" in stack.triton.command()
    assert stack.triton.env["SAGEMAKER_TRITON_DEFAULT_MODEL_NAME"] == "lin"
    env = stack.function_env("RouterFunction")
    assert env["GPU_BACKEND"] == "sagemaker" and env["TRITON_URL"] == ""


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_backend_forwards_the_clients_body_and_decodes_the_answer(stack, backend, binary):
    # Given a client's body as tritonclient builds it (JSON, or binary tensors)
    from tierserve.manifest import Manifest

    model = Manifest.loads((stack.models / "manifest.json").read_text()).resolve("lin")
    x = rows_of(5, seed=3)
    request = InferRequest([tensor_from_numpy("x", x)], id="sm-1",
                           outputs=[RequestedOutput("y", binary_data=binary)])
    data, header_length = encode_request(request, binary=binary)
    call = InferenceCall.from_body(Body(data, header_length))
    # When the sagemaker backend runs it
    reply = backend.infer(model, call, timeout_s=5)
    # Then the outputs are the model's, and the request was never materialised by the router
    np.testing.assert_allclose(reply.arrays()["y"], _expected(stack, x), rtol=1e-5, atol=1e-5)
    assert reply.decoded().model_name == "lin" and reply.decoded().model_version == "1"
    assert not call.materialized


def test_batch_over_max_batch_size_is_split_and_reassembled_in_order(stack, backend):
    from tierserve.manifest import Manifest

    model = Manifest.loads((stack.models / "manifest.json").read_text()).resolve("lin")
    x = rows_of(3 * MAX_BATCH + 5, seed=4)
    reply = backend.infer(model, InferenceCall.from_body(Body(json_body(x))), timeout_s=5)
    np.testing.assert_allclose(reply.arrays()["y"], _expected(stack, x), rtol=1e-5, atol=1e-5)


def test_tritons_refusal_is_an_input_error_and_never_a_breaker_failure(stack, backend):
    # Given a request the manifest check would have stopped (wrong width), sent straight to the backend
    from tierserve.breaker import CircuitBreaker
    from tierserve.manifest import Manifest
    from tierserve.routing import get_policy
    from tierserve.tiering import TierDispatcher

    model = Manifest.loads((stack.models / "manifest.json").read_text()).resolve("lin")
    bad = InferenceCall.from_body(Body(json_body(rows_of(MAX_BATCH, seed=5, cols=5))))
    # When the backend sends it, Triton refuses it (400 inside a ModelError)
    with pytest.raises(InvalidRequestError, match="unexpected shape"):
        backend.infer(model, bad, timeout_s=5)
    # And through the dispatcher, the breaker counts a success: the tier answered
    breaker = CircuitBreaker(failure_threshold=1)
    cpu = FakeBackend("cpu")
    dispatcher = TierDispatcher(cpu=cpu, gpu=backend, policy=get_policy("gpu-first"), breaker=breaker)
    for _ in range(3):
        with pytest.raises(InvalidRequestError):
            dispatcher.dispatch(model, InferenceCall.from_body(Body(json_body(rows_of(MAX_BATCH, seed=5, cols=5)))))
    assert breaker.state == "closed" and cpu.calls == []


def test_an_unknown_endpoint_is_a_tier_failure(stack, backend):
    from tierserve.backends.sagemaker import SageMakerBackend
    from tierserve.manifest import Manifest

    model = Manifest.loads((stack.models / "manifest.json").read_text()).resolve("lin")
    missing = SageMakerBackend("no-such-endpoint", timeout_s=5)
    with pytest.raises(BackendUnavailableError, match="not found"):
        missing.infer(model, InferenceCall.from_body(Body(json_body(rows_of(2)))), timeout_s=5)


def test_router_sends_large_batches_to_the_endpoint_and_other_models_to_the_cpu(stack):
    # Given the endpoint's model: a large batch goes to the GPU tier through InvokeEndpoint
    x = rows_of(12, seed=6)
    status, headers, body = _http(stack, "lin", x)
    assert status == 200 and headers["x-served-by"] == "gpu" and "x-fallback" not in headers
    np.testing.assert_allclose(np.asarray(body["outputs"][0]["data"]).reshape(12, 3), _expected(stack, x),
                               rtol=1e-4, atol=1e-5)
    # And a GPU model the single-model endpoint does not hold falls back to its CPU copy, no failed call paid
    status, headers, _ = _http(stack, "other", rows_of(12, seed=7))
    assert status == 200 and headers["x-served-by"] == "cpu" and headers["x-fallback"] == "gpu-unavailable"


def test_container_down_means_cpu_fallback(stack):
    # Given the endpoint's container stops (last test in this module: it leaves Triton stopped)
    stack.triton.stop()
    # When large batches arrive, Then they are served by the CPU copy, marked as fallbacks
    for seed in range(3):
        x = rows_of(12, seed=seed)
        status, headers, body = _http(stack, "lin", x)
        assert status == 200 and headers["x-served-by"] == "cpu"
        assert headers["x-fallback"] == "gpu-unavailable"
        np.testing.assert_allclose(np.asarray(body["outputs"][0]["data"]).reshape(12, 3), _expected(stack, x),
                                   rtol=1e-4, atol=1e-5)
