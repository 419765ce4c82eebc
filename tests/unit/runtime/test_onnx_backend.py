"""OnnxBackend: the CPU tier in-process, on a verified artifact; what onnxruntime refuses is the client's error.

Models are built in the test (tests/support/models.py) and served from a store in tmp_path.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.support.models import write_embedding
from tierserve.backends.base import is_input_error
from tierserve.backends.onnx import OnnxBackend
from tierserve.errors import ArtifactError, InferenceError, InvalidRequestError
from tierserve.protocol.calls import Body, InferenceCall
from tierserve.store import ModelStore


def call(ids: list, mask: list) -> InferenceCall:
    def tensor(name: str, data: list) -> dict:
        arr = np.asarray(data, dtype=np.int64)
        return {"name": name, "datatype": "INT64", "shape": list(arr.shape), "data": arr.ravel().tolist()}

    body = json.dumps({"inputs": [tensor("ids", ids), tensor("mask", mask)]}).encode()
    return InferenceCall.from_body(Body(body))


@pytest.fixture
def bare(tmp_path):
    """An embedding model of vocabulary 10 whose manifest entry has no dim names or value range."""
    mv = write_embedding(tmp_path / "store", checks=False)
    return OnnxBackend(ModelStore(str(tmp_path / "store"), tmp_path / "cache")), mv


def test_an_id_past_the_embedding_is_onnxruntimes_invalid_argument_and_a_400(bare) -> None:
    # Given a model the manifest knows nothing about but shapes, and an id past its vocabulary of 10
    backend, mv = bare
    # When it runs, Then onnxruntime's INVALID_ARGUMENT is the client's error, naming the model
    with pytest.raises(InvalidRequestError, match=r"model 'emb' rejected the inputs: .*INVALID_ARGUMENT.*Gather"):
        backend.infer(mv, call([[10**9]], [[1]]))


def test_a_node_failing_on_mismatched_inputs_is_onnxruntimes_fail_and_a_400(bare) -> None:
    # Given ids of length 4 and a mask of length 5 (onnxruntime's Mul cannot broadcast them: FAIL, not
    # INVALID_ARGUMENT)
    backend, mv = bare
    # When it runs, Then it is still the client's error
    with pytest.raises(InvalidRequestError, match=r"rejected the inputs: .*FAIL.*Mul node"):
        backend.infer(mv, call([[0, 1, 2, 3]], [[1] * 5]))


def test_a_model_that_is_not_onnx_is_the_artifacts_fault_with_a_clear_message(tmp_path) -> None:
    # Given a model whose artifact is not ONNX at all (and whose sha256 matches, so the store fetches it)
    from tests.support.models import write_model

    mv = write_embedding(tmp_path / "store")
    bad = write_model(tmp_path / "store", "junk", "1", b"not onnx", mv.inputs, mv.outputs)
    backend = OnnxBackend(ModelStore(str(tmp_path / "store"), tmp_path / "cache"))
    # When it is asked to run, Then the error is the artifact's (500), says what is wrong and what to do, and
    # is not replaced by the mmap's BufferError ("cannot close exported pointers exist")
    with pytest.raises(ArtifactError, match=r"junk/1/model.onnx is not a readable ONNX model .*; recompile it"):
        backend.infer(bad, call([[1]], [[1]]))


def test_good_inputs_run_and_zero_length_sequences_are_a_valid_empty_mean(bare) -> None:
    backend, mv = bare
    reply = backend.infer(mv, call([[1, 2]], [[1, 1]]))
    assert reply.decoded().outputs[0].data.shape == (1, 4)
    assert backend.infer(mv, call(np.zeros((1, 0)), np.zeros((1, 0)))).decoded().outputs[0].data.shape == (1, 4)


@pytest.mark.parametrize(
    ("message", "input_error"),
    [
        ("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Invalid rank for input: ids Got: 3 Expected: 2", True),
        ("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Mul node.", True),
        ("onnx runtime error 2: Non-zero status code returned while running Gather node", True),
        ("onnxruntime failed: Fail: [ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while "
         "running Reshape node", True),
        ("onnx runtime error 1: Non-zero status code returned while running FusedMatMul node: CUDA failure 700", False),
        ("onnx runtime error 6: Failed to allocate memory for requested buffer of size 123456789", False),
        ("onnx runtime error 6: CUBLAS failure 13", False),
        ("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Exception during initialization", False),
        ("model instance is unavailable", False),
    ],
)
def test_which_onnxruntime_messages_are_the_inputs_fault(message: str, input_error: bool) -> None:
    assert is_input_error(message) is input_error


def test_inference_error_is_not_an_input_error() -> None:
    assert not issubclass(InferenceError, InvalidRequestError)


# --- readiness: the model loads and runs (issue 8, defect 11) -------------------------------------------


def test_ready_runs_the_model_once_and_remembers_it(tmp_path, monkeypatch) -> None:
    # Given an embedding model whose ids must lie in [0, 9]
    mv = write_embedding(tmp_path / "store")
    backend = OnnxBackend(ModelStore(str(tmp_path / "store"), tmp_path / "cache"))
    runs: list[dict] = []
    real_run = backend.run
    monkeypatch.setattr(backend, "run", lambda model, feeds, names=None: runs.append(feeds) or real_run(model, feeds))
    # When readiness is asked twice, Then the model ran once, on the smallest request it takes
    assert backend.ready(mv) and backend.ready(mv)
    [feeds] = runs
    assert {k: v.shape for k, v in feeds.items()} == {"ids": (1, 1), "mask": (1, 1)}


def test_a_tampered_artifact_is_not_ready_for_its_integrity_error(tmp_path) -> None:
    from tierserve.errors import IntegrityError

    mv = write_embedding(tmp_path / "store")
    (tmp_path / "store" / mv.cpu_artifact.path).write_bytes(b"tampered")
    backend = OnnxBackend(ModelStore(str(tmp_path / "store"), tmp_path / "cache"))
    assert backend.ready(mv) is False
    with pytest.raises(IntegrityError, match="sha256"):
        backend.check_ready(mv)


@pytest.mark.parametrize("binary", [False, True])
def test_bytes_inputs_reach_a_string_model_as_the_text_they_are(tmp_path, binary: bool) -> None:
    # Given a string lookup model (a -> 1, b -> 2, é -> 3) on the CPU tier
    from tests.support.models import label_encoder_onnx, write_model
    from tierserve.manifest import TensorSpec
    from tierserve.protocol.messages import InferRequest
    from tierserve.protocol.tensors import tensor_from_numpy

    mv = write_model(tmp_path / "store", "text", "1", label_encoder_onnx(), (TensorSpec("s", "BYTES", (-1,)),),
                     (TensorSpec("y", "INT64", (-1,)),))
    backend = OnnxBackend(ModelStore(str(tmp_path / "store"), tmp_path / "cache"))
    # When the strings come as JSON text, or as binary BYTES elements (what tritonclient sends)
    if binary:
        request = InferRequest(inputs=[tensor_from_numpy("s", np.array([b"a", b"b", "é".encode(), b"z"], object))])
        c = InferenceCall.from_request(request)
    else:
        body = {"inputs": [{"name": "s", "datatype": "BYTES", "shape": [4], "data": ["a", "b", "é", "z"]}]}
        c = InferenceCall.from_body(Body(json.dumps(body).encode()))
    # Then onnxruntime sees the text: every key found, the unknown one its default
    assert backend.infer(mv, c).arrays()["y"].tolist() == [1, 2, 3, -1]


def test_bytes_that_are_not_utf8_are_the_clients_error_for_a_string_model(tmp_path) -> None:
    from tests.support.models import label_encoder_onnx, write_model
    from tierserve.manifest import TensorSpec
    from tierserve.protocol.messages import InferRequest
    from tierserve.protocol.tensors import tensor_from_numpy

    mv = write_model(tmp_path / "store", "text", "1", label_encoder_onnx(), (TensorSpec("s", "BYTES", (-1,)),),
                     (TensorSpec("y", "INT64", (-1,)),))
    backend = OnnxBackend(ModelStore(str(tmp_path / "store"), tmp_path / "cache"))
    request = InferRequest(inputs=[tensor_from_numpy("s", np.array([b"a", b"\xff\xfe"], object))])
    with pytest.raises(InvalidRequestError, match=r"input 's': BYTES element 1 is not UTF-8 text"):
        backend.infer(mv, InferenceCall.from_request(request))


def test_versions_sharing_model_onnx_run_each_with_their_own_weights(tmp_path) -> None:
    # Given v1 and v2 with the same model.onnx and other external weights (issue 17: a variant is all its files)
    from tests.support.fakes import json_call, rows_of
    from tests.support.models import linear_onnx
    from tests.support.variant_pairs import write_pair
    from tierserve.sessions import clear_sessions

    clear_sessions()
    write_pair(tmp_path / "store", "pair", "external")
    store = ModelStore(str(tmp_path / "store"), tmp_path / "cache")
    backend = OnnxBackend(store)
    # When each is run, in turn, on the same rows
    for v in ("1", "2", "1"):
        out = backend.infer(store.manifest().resolve("pair", v), json_call(2)).arrays()["y"]
        # Then each answers with its own weights (its own session), not the other's
        _, w, b = linear_onnx(seed=int(v))
        np.testing.assert_allclose(out, rows_of(2) @ w + b, rtol=1e-5, atol=1e-5)
