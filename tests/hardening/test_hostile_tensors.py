"""Hostile tensors through `tierserve serve` (API Gateway emulator -> router -> CPU function or Triton): every
defect of issue 8 on the request side, and the ideas of Triton's L0_nan_inf and L0_large_payload.

Each case must get a clear 4xx (JSON, standard, with a message that says what was wrong) and the next
request must be served: nothing a client sends may break the stack or open the GPU circuit.
"""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import numpy as np
import pytest

from tests.hardening.conftest import (
    FIGURES,
    VOCAB,
    assert_served,
    ids_body,
    infer,
    lin_body,
    request,
    rows,
    scale,
)


def _fp32(name: str, shape: list, data: Any, datatype: str = "FP32") -> dict:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def _binary(header: dict, blobs: list[bytes]) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + b"".join(blobs), {"content-type": "application/octet-stream",
                                    "inference-header-content-length": str(len(head))}


SURROGATE = b'{"inputs":[{"name":"s","datatype":"BYTES","shape":[1],"data":["\\ud800"]}]}'

#: (id, model, body, headers, status, words the error must hold)
CASES: list[tuple[str, str, Any, dict[str, str] | None, int, str]] = [
    # defect 4: shapes and values that broke the server
    ("dim-2**64", "emb", {"inputs": [_fp32("ids", [0, 2**64], [], "INT64"), _fp32("mask", [0, 2**64], [], "INT64")]},
     None, 400, "does not fit in INT64"),
    ("dim-2**63", "emb", {"inputs": [_fp32("ids", [1, 2**63], [], "INT64"), _fp32("mask", [1, 2**63], [], "INT64")]},
     None, 400, "does not fit in INT64"),
    ("dim-2**62-empty", "emb", {"inputs": [_fp32("ids", [0, 2**62], [], "INT64"),
                                           _fp32("mask", [0, 2**62], [], "INT64")]},
     None, 400, "more elements than any tensor"),
    ("rank-33", "emb", {"inputs": [_fp32("ids", [1] * 33, [0], "INT64"), _fp32("mask", [1] * 33, [1], "INT64")]},
     None, 400, "at most 32"),
    ("lone-surrogate", "text", SURROGATE, None, 400, "not valid Unicode"),
    ("ids-4-mask-5", "emb", ids_body([[1, 2, 3, 4]], [[1] * 5]), None, 400, "inputs that share a dimension"),
    ("ids-4-mask-5-bare-manifest", "emb-bare", ids_body([[1, 2, 3, 4]], [[1] * 5]), None, 400,
     "rejected the inputs"),
    # defect 1: values the manifest knows are out of range, refused before any tier
    ("token-id-1e9", "emb", ids_body([[10**9]]), None, 400, f"[0, {VOCAB - 1}]"),
    ("token-id-negative", "emb", ids_body([[-1]]), None, 400, "outside the range"),
    # defect 5 / L0_nan_inf: non-finite inputs refused by default, naming the tensor and the index
    ("nan-token", "lin", b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":[1,NaN,3,4]}]}', None,
     400, "input 'x' holds nan at index [0, 1]"),
    ("inf-token", "lin", b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":[1,2,Infinity,4]}]}',
     None, 400, "holds inf at index [0, 2]"),
    ("nan-string", "lin", {"inputs": [_fp32("x", [1, 4], [1, 2, 3, "NaN"])]}, None, 400, "holds nan at index [0, 3]"),
    ("-inf-binary", "lin", _binary({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                                "parameters": {"binary_data_size": 16}}]},
                                   [struct.pack("<4f", 1, 2, 3, float("-inf"))]), None, 400, "holds -inf"),
    ("nan-digits-row", "digits", {"inputs": [_fp32("input", [1, 64], ["NaN"] * 64)]}, None, 400,
     "does not accept NaN or Infinity"),
    # malformed bodies and headers (Triton's L0_http_fuzz ideas)
    ("not-json", "lin", b"{not json", None, 400, "not valid JSON"),
    ("deep-nesting", "lin", b'{"inputs":' + b"[" * 100_000 + b"]" * 100_000 + b"}", None, 400, "not valid JSON"),
    ("inputs-not-list", "lin", {"inputs": {"x": 1}}, None, 400, "non-empty 'inputs' array"),
    ("unknown-datatype", "lin", {"inputs": [_fp32("x", [1, 4], [1, 2, 3, 4], "FLOAT")]}, None, 400,
     "unknown datatype"),
    ("bf16", "lin", {"inputs": [_fp32("x", [1, 4], [1, 2, 3, 4], "BF16")]}, None, 400, "BF16 is not supported"),
    ("wrong-datatype", "lin", {"inputs": [_fp32("x", [1, 4], [1, 2, 3, 4], "INT64")]}, None, 400,
     "expected datatype FP32"),
    ("too-few-elements", "lin", {"inputs": [_fp32("x", [2, 4], [1, 2, 3, 4])]}, None, 400, "needs 8 elements"),
    ("ragged", "lin", {"inputs": [_fp32("x", [2, 4], [[1, 2, 3, 4], [1, 2]])]}, None, 400, "not a regular"),
    ("duplicate-input", "lin", {"inputs": [_fp32("x", [1, 4], [1, 2, 3, 4])] * 2}, None, 400, "more than once"),
    ("unknown-input", "lin", {"inputs": [_fp32("z", [1, 4], [1, 2, 3, 4])]}, None, 400, "unknown input"),
    ("shared-memory", "lin", {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                          "parameters": {"shared_memory_region": "r"}}]}, None, 400, "shared-memory"),
    ("classification", "lin", lin_body(1, outputs=[{"name": "y", "parameters": {"classification": 2}}]), None, 400,
     "classification extension"),
    ("unknown-output", "lin", lin_body(1, outputs=[{"name": "nope"}]), None, 400, "unknown requested output"),
    ("header-length-past-body", "lin", b'{"inputs":[]}', {"inference-header-content-length": "99999"}, 400,
     "outside the request body"),
    ("header-length-not-int", "lin", b'{"inputs":[]}', {"inference-header-content-length": "x1"}, 400,
     "must be an integer"),
    ("binary-size-mismatch", "lin", _binary({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                                         "parameters": {"binary_data_size": 12}}]},
                                            [b"\x00" * 12]), None, 400, "expected 16"),
    ("binary-truncated", "lin", _binary({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                                     "parameters": {"binary_data_size": 16}}]}, [b"\x00" * 8]), None,
     400, "exceeds the 8 bytes left"),
    ("x-target-tpu", "lin", lin_body(1), {"x-target": "tpu"}, 400, "'cpu' or 'gpu'"),
    ("cpu-hint-gpu-only", "lin-gpu", lin_body(1), {"x-target": "cpu"}, 400, "not deployed on cpu"),
    ("bad-model-name", "../etc", lin_body(1), None, 404, "no route"),
    ("unknown-model", "nope", lin_body(1), None, 404, "unknown model"),
    # issue 16, defect 11: an integer past float64 in float data, and strings that cannot be echoed back as JSON
    ("fp32-integer-past-float64", "lin", b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":[1' +
     b"0" * 400 + b',2,3,4]}]}', None, 400, "out of range for FP32"),
    ("fp32-negative-integer-past-float64", "lin", b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":[-9' +
     b"9" * 330 + b',2,3,4]}]}', None, 400, "out of range for FP32"),
    ("id-lone-surrogate", "lin", b'{"id":"\\udfff","inputs":[{"name":"x","datatype":"FP32","shape":[1,4],'
     b'"data":[1,2,3,4]}]}', None, 400, "id"),
    ("parameter-lone-surrogate", "lin", b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":[1,2,3,4],'
     b'"parameters":{"p":"\\ud800"}}]}', None, 400, "parameter"),
]


def _send(stack: Any, model: str, body: Any, headers: dict[str, str] | None):
    if isinstance(body, tuple):  # (bytes, headers) from _binary
        body, extra = body
        headers = {**extra, **(headers or {})}
    return infer(stack, model, body, headers)


@pytest.mark.parametrize(("case", "model", "body", "headers", "status", "words"), CASES, ids=[c[0] for c in CASES])
def test_each_hostile_request_gets_a_clear_4xx_and_the_next_request_is_served(stack, case, model, body, headers,
                                                                             status, words) -> None:
    answer = _send(stack, model, body, headers)
    assert answer.status == status, (case, answer.status, answer.body[:400])
    error = answer.json()
    assert words in error["error"], (case, error)
    assert "Traceback" not in error["error"] and error.get("code")
    assert_served(stack)


def test_zero_length_sequences_are_answered_not_crashed(stack) -> None:
    # MiniLM failed with 500 on [1, 0] and [0, 0]: here each is a valid empty request (200, standard JSON)
    for shape in ((1, 0), (0, 0)):
        answer = infer(stack, "emb", ids_body(np.zeros(shape, np.int64)))
        assert answer.status in (200, 400), answer.body[:300]
        answer.json()
    assert_served(stack)


def test_bad_token_ids_on_the_gpu_are_the_clients_error_and_never_open_the_circuit(stack) -> None:
    from tierserve.app import get_runtime

    # Given the model without the compiler's value range (an older manifest): Triton itself refuses the ids
    big = np.full((32, 4), 10**9, dtype=np.int64)
    # When five GPU-sized requests carry token id 1e9 (issue 8, defect 1: this opened the circuit for everyone)
    for _ in range(5):
        answer = infer(stack, "emb-bare", ids_body(big))
        # Then each is a 400 from the GPU tier, not a fallback and not a 500
        assert answer.status == 400, answer.body[:300]
        assert answer.headers.get("x-fallback") is None
    # And the circuit is closed: the next valid large request is served by the GPU
    assert get_runtime().dispatcher.state()["gpu"] == "closed"
    answer = infer(stack, "emb-bare", ids_body(np.ones((32, 4), np.int64)))
    assert (answer.status, answer.headers["x-served-by"], answer.headers.get("x-fallback")) == (200, "gpu", None)


# --- L0_nan_inf: a model that allows non-finite values ------------------------------------------------------


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_a_model_that_allows_nan_gets_it_and_answers_in_standard_json(stack, binary: bool) -> None:
    import tritonclient.http as httpclient

    # Given nan-ok (allow_non_finite in its manifest) and inputs with NaN, +inf and -inf
    x = np.array([[np.nan, 1, 2, 3], [np.inf, 0, 0, 0], [-np.inf, 0, 0, 0]], dtype=np.float32)
    client = httpclient.InferenceServerClient(stack.url.removeprefix("http://"))
    inp = httpclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = httpclient.InferRequestedOutput("y", binary_data=binary)
    result = client.infer("nan-ok", [inp], outputs=[out])
    # Then it is served, and the outputs are the same non-finite values onnxruntime computes
    w, b = stack.weights
    with np.errstate(invalid="ignore"):
        expected = x @ w + b
    np.testing.assert_array_equal(np.isnan(result.as_numpy("y")), np.isnan(expected))
    np.testing.assert_array_equal(np.isinf(result.as_numpy("y")), np.isinf(expected))
    client.close()
    # And in JSON mode the body is standard JSON, spelling them as strings
    answer = infer(stack, "nan-ok", {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                                 "data": ["NaN", 1, 2, 3]}]})
    assert answer.status == 200 and answer.json()["outputs"][0]["data"][0] == "NaN"


# --- L0_large_payload: near and past every limit ------------------------------------------------------------


def test_a_body_under_the_limit_is_served_whatever_the_json_costs_inside_the_invoke(stack) -> None:
    from sklearn.datasets import load_digits

    # Given 20,000 digits rows as JSON (3.8 MB: issue 8, defect 2 answered 503 RequestTooLargeException)
    n = scale(20_000, 20_000)
    x, _ = load_digits(return_X_y=True)
    data = np.resize(x.astype(np.int64), (n, 64))  # digits' pixels are 0..16: JSON integers, as a client sends them
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [n, 64],
                                   "data": data.ravel().tolist()}]}, separators=(",", ":")).encode()
    answer = infer(stack, "digits", body, timeout=120)
    # Then it is served by the CPU tier, every row answered
    assert answer.status == 200, answer.body[:500]
    out = {o["name"]: o for o in answer.json()["outputs"]}
    assert out["label"]["shape"] == [n]
    FIGURES["large JSON request served (digits rows, body MB)"] = (n, round(len(body) / 2**20, 2))


def test_a_forwarded_body_that_grows_past_6_mb_as_a_json_string_is_split_and_served(stack) -> None:
    if scale(True, False):
        pytest.skip("full run only (TIERSERVE_HARDENING=full): 1.1 M strings")
    # Given 1.1 M one-letter strings: a 4.5 MB body whose quotes double inside the Invoke payload (> 6 MB)
    n = 1_100_000
    text = {"name": "s", "datatype": "BYTES", "shape": [n], "data": ["a", "b"] * (n // 2)}
    body = json.dumps({"inputs": [text]}, separators=(",", ":")).encode()
    answer = infer(stack, "text", body, timeout=120)
    # Then it is served in parts and merged in order
    assert answer.status == 200, answer.body[:500]
    assert answer.json()["outputs"][0]["data"][:4] == [1, 2, 1, 2]


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_a_response_that_cannot_fit_is_a_413_before_inference_and_binary_is_served(stack, target: str) -> None:
    # Given 32 rows of 50,000 floats: about 32 MB as JSON, 6.4 MB binary, on either tier
    answer = infer(stack, "wide", lin_body(32), {"x-target": target})
    assert answer.status == 413, answer.body[:300]
    error = answer.json()["error"]
    assert "more than a Lambda response can carry" in error and "binary outputs" in error
    # And 16 rows as binary (3.2 MB, 4.3 MB once base64) are served by that tier
    answer = infer(stack, "wide", lin_body(16, parameters={"binary_data_output": True}), {"x-target": target})
    assert answer.status == 200 and answer.headers["x-served-by"] == target, answer.body[:300]
    assert_served(stack)


def test_bodies_past_the_limits_are_413s(stack) -> None:
    # One byte over the router's limit (the largest body whose base64 event fits 6 MB)
    from tierserve.limits import MAX_REQUEST_BODY_BYTES

    over = b"{" + b" " * (MAX_REQUEST_BODY_BYTES - 1) + b"}"
    answer = infer(stack, "lin", over, {"content-type": "application/octet-stream"})
    assert answer.status == 413, answer.body[:300]
    assert f"the limit is {MAX_REQUEST_BODY_BYTES} bytes" in answer.json()["error"]
    # Past API Gateway's 10 MB: refused from the Content-Length, before the body is read
    import socket

    host, port = stack.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(f"POST /v2/models/lin/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {10 * 1024 * 1024 + 1}"
                  "\r\n\r\n".encode())
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    assert_served(stack)


def test_garbage_base64_and_gzip_bombs_are_refused(stack) -> None:
    import gzip

    bomb = gzip.compress(b"\x00" * (64 * 1024 * 1024))
    answer = infer(stack, "lin", bomb, {"content-encoding": "gzip"})
    assert answer.status == 413, answer.body[:200]
    answer = request(stack, "POST", "/v2/models/lin/infer", base64.b64decode(b"AAAA" * 10),
                     {"content-type": "application/octet-stream", "inference-header-content-length": "3"})
    assert answer.status == 400
    assert_served(stack)


def test_the_stack_still_serves_every_model_after_the_hostile_requests(stack) -> None:
    for model, body in (("lin", lin_body(1)), ("digits", {"inputs": [{"name": "input", "datatype": "FP32",
                                                                       "shape": [1, 64], "data": [0.0] * 64}]}),
                        ("emb", ids_body([[1, 2]])), ("text", {"inputs": [{"name": "s", "datatype": "BYTES",
                                                                           "shape": [2], "data": ["a", "é"]}]})):
        answer = infer(stack, model, body)
        assert answer.status == 200, (model, answer.body[:300])
    assert rows(1).shape == (1, 4)
