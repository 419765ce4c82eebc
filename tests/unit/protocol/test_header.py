"""tierserve.protocol.header: request headers read without numpy (names, datatypes, shapes, where the data is),
every malformed header refused with what to send instead, and the checks against the manifest.

What the header's data turns into (numpy arrays) and its data errors are the codec's (test_codec.py).
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.http as httpclient

from tests.support.fakes import ALL_DATATYPES, client_request, fp32_input, raw_request, sample
from tierserve.errors import InvalidRequestError
from tierserve.manifest import ModelVersion, TensorSpec, Variant
from tierserve.protocol.header import Base64Body, check_request, parse_request
from tierserve.protocol.messages import InferRequest, RequestedOutput
from tierserve.protocol.tensors import request_from_header, tensor_from_numpy


def model(inputs, outputs=(("out", "FP32", (-1, 2)),), max_batch_size: int = 8) -> ModelVersion:
    return ModelVersion(
        name="m",
        version="1",
        inputs=tuple(TensorSpec(n, d, tuple(s)) for n, d, s in inputs),
        outputs=tuple(TensorSpec(n, d, tuple(s)) for n, d, s in outputs),
        variants={"fp32": Variant("m/1/model.onnx", "0" * 64, 1)},
        selected_variant="fp32",
        max_batch_size=max_batch_size,
    )


# --- what a header says, without numpy ----------------------------------------------------------------

NUMPY_FREE = """
import json, struct, sys
from tierserve.protocol.header import parse_request

header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2],
                                 "parameters": {"binary_data_size": 8}}]}).encode()
binary = parse_request(header + struct.pack("<2f", 1.0, 2.0), len(header))
plain = parse_request(json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2],
                                              "data": [1.0, 2.0]}]}).encode())
assert (binary.tensor_bytes, plain.tensor_bytes, binary.rows, plain.rows) == (8, 8, 1, 1)
print(json.dumps("numpy" in sys.modules))
"""


def test_parsing_a_json_and_a_binary_request_never_imports_numpy():
    # Given a fresh interpreter that imports only tierserve.protocol.header
    # When it parses a JSON body and a binary body
    out = subprocess.run([sys.executable, "-c", NUMPY_FREE], capture_output=True, text=True, check=True)
    # Then numpy was never imported
    assert json.loads(out.stdout) is False


@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_tensor_bytes_are_the_same_for_the_json_and_the_binary_encoding(datatype):
    # Given the same tensor sent by tritonclient as JSON and as binary data
    arrays = {"x": sample(datatype, (3, 5), seed=len(datatype))}
    json_form, binary_form = (parse_request(*client_request(arrays, binary=b)) for b in (False, True))
    # When routing reads their sizes from the headers
    # Then both say the same number of tensor bytes (the model's, whatever the wire form)
    assert json_form.tensor_bytes == binary_form.tensor_bytes
    if datatype != "BYTES":
        assert json_form.tensor_bytes == arrays["x"].nbytes


def test_a_binary_header_locates_each_tensor_in_the_body_without_copying_it():
    # Given a binary request with two inputs
    x, k = sample("FP32", (3, 4), seed=1), sample("INT64", (3,), seed=2)
    body, size = client_request({"x": x, "k": k}, binary=True, request_id="b-1")
    # When its header is parsed
    header = parse_request(body, size)
    # Then each tensor is located in the binary section, as a view into the body
    tx, tk = header.tensors
    assert (tx.binary, tk.binary) == ((0, 48), (48, 24))
    assert (tx.data, tk.data) == (None, None)
    assert isinstance(header.blob(tk), memoryview) and bytes(header.blob(tk)) == k.tobytes()
    assert (header.id, header.rows, header.binary_input, header.tensor_bytes) == ("b-1", 3, True, 72)


def test_a_json_header_keeps_the_parsed_data_and_the_requests_fields():
    # Given a JSON request with a target hint and a requested output
    body = raw_request([fp32_input(shape=[1, 2])], id="j-1", parameters={"target": "gpu"},
                       outputs=[{"name": "y", "parameters": {"binary_data": True}}])
    # When its header is parsed
    header = parse_request(body)
    # Then the data stays the parsed JSON list, and the request's fields are read
    [t] = header.tensors
    assert (t.data, t.binary, t.shape, t.nbytes) == ([1.0, 2.0], None, (1, 2), 8)
    assert (header.id, header.parameters, header.binary_input) == ("j-1", {"target": "gpu"}, False)
    assert [(o.name, o.binary_data) for o in header.outputs] == [("y", True)]


@pytest.mark.parametrize("rows", [2, 3, 4], ids=["pad-1", "pad-2", "no-pad"])
def test_a_base64_body_is_routed_from_its_header_and_decoded_only_when_a_tensor_is_read(rows):
    # Given a binary request still in base64 (as API Gateway hands it over) whose last tensor bytes are corrupt
    # (three sizes: the text ends with each of the three paddings)
    body, size = client_request({"x": sample("UINT8", (rows, 8))}, binary=True)
    text = base64.b64encode(body).decode()
    pad = text[-4:].count("=")
    corrupt = Base64Body(text[:-4] + "!" * (4 - pad) + "=" * pad)
    assert text.endswith("=" * pad) and len(Base64Body(text)) == len(corrupt) == len(body)
    # When its header is parsed
    header = parse_request(corrupt, size)
    # Then routing gets everything it needs from the decoded prefix alone
    assert (header.rows, header.tensor_bytes) == (rows, rows * 8)
    # And the corruption is found only when the tensor is materialised, as the client's error
    with pytest.raises(InvalidRequestError, match="not valid base64"):
        request_from_header(header)


def test_base64_text_of_an_impossible_length_is_refused_at_once():
    # When base64 text whose length is not a multiple of 4 is wrapped, Then it is refused before anything is read
    with pytest.raises(ValueError, match="not a multiple of 4"):
        Base64Body("abcde")


# --- malformed headers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe\x00", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object, got list"),
        (b"{}", "non-empty 'inputs' array"),
        (b'{"inputs": []}', "non-empty 'inputs' array"),
        (b'{"inputs": {"name": "x"}}', "non-empty 'inputs' array"),
        (b'{"inputs": [3]}', "input #0 must be a JSON object"),
        (b"[" * 100000, "not valid JSON"),
    ],
)
def test_malformed_request_bodies(body, message):
    with pytest.raises(InvalidRequestError, match=message):
        parse_request(body)


@pytest.mark.parametrize(
    ("inp", "message"),
    [
        ({"datatype": "FP32", "shape": [1], "data": [1]}, r"input #0: 'name' must be a non-empty string"),
        ({"name": "x", "shape": [1], "data": [1]}, r"input 'x': 'datatype' is missing"),
        ({"name": "x", "datatype": "FP32", "data": [1]}, r"input 'x': 'shape' is missing"),
        ({"name": "x", "datatype": "FP32", "shape": [1]}, r"input 'x': needs either 'data' or parameters"),
        (fp32_input(datatype="FLOAT32"), r"input 'x': unknown datatype 'FLOAT32'"),
        (fp32_input(datatype="BF16"), r"input 'x': BF16 is not supported"),
        (fp32_input(shape=[2.0]), r"input 'x': shape \[2.0\] has an invalid dimension 2.0"),
        (fp32_input(shape=[-1]), r"input 'x': shape \[-1\] has an invalid dimension -1"),
        (fp32_input(shape=[True, 2]), r"invalid dimension True"),
        (fp32_input(shape="2"), r"input 'x': 'shape' must be a list"),
        (fp32_input(shape=[1] * 33, data=[1.0]), r"input 'x': shape has 33 dimensions; at most 32 are supported"),
        (fp32_input(shape=[0, 2**64], data=[]), r"input 'x': dimension 18446744073709551616 does not fit in INT64"),
        (fp32_input(shape=[0, 2**63], data=[]), r"input 'x': dimension 9223372036854775808 does not fit in INT64"),
        (fp32_input(datatype="INT64", shape=[0, 2**62], data=[]), r"describes more elements than any tensor"),
        (fp32_input(shape=[2**31, 2**31, 2], data=[]), r"describes more elements than any tensor"),
        (fp32_input(parameters=[1]), r"input 'x': 'parameters' must be a JSON object"),
        (
            {"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"shared_memory_region": "r"}},
            r"input 'x': the shared-memory extension \(shared_memory_region\) is not supported",
        ),
        (
            fp32_input(parameters={"binary_data_size": 8}),
            r"input 'x': give either 'data' or parameters.binary_data_size, not both",
        ),
    ],
)
def test_invalid_input_headers_name_the_input_and_the_problem(inp, message):
    # Given a request whose only input header is wrong in one way
    body = raw_request([inp])
    # When parsed, Then the error names the input and what was expected
    with pytest.raises(InvalidRequestError, match=message):
        parse_request(body)


def test_duplicate_input_names_are_refused():
    with pytest.raises(InvalidRequestError, match=r"input 'x' is given more than once"):
        parse_request(raw_request([fp32_input(), fp32_input()]))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"id": 5}, r"'id' must be a string, got 5"),
        ({"parameters": [1]}, r"'parameters' must be a JSON object"),
        ({"outputs": {"name": "y"}}, r"'outputs' must be a JSON array"),
        ({"outputs": [{"nom": "y"}]}, r"requested output #0 must be an object with a non-empty string 'name'"),
        ({"outputs": [{"name": "y"}, {"name": "y"}]}, r"output 'y' is requested more than once"),
        ({"outputs": [{"name": "y", "parameters": {"binary_data": "yes"}}]}, r"output 'y': binary_data must be"),
        (
            {"outputs": [{"name": "y", "parameters": {"shared_memory_region": "r"}}]},
            r"output 'y': the shared-memory extension",
        ),
        ({"outputs": [{"name": "y", "parameters": {"classification": 3}}]}, r"classification extension"),
    ],
)
def test_invalid_request_fields(extra, message):
    with pytest.raises(InvalidRequestError, match=message):
        parse_request(raw_request([fp32_input()], **extra))


def test_tritonclient_classification_output_is_refused():
    body, size = client_request(
        {"x": sample("FP32", (1, 2))}, True, outputs=[httpclient.InferRequestedOutput("y", class_count=2)]
    )
    with pytest.raises(InvalidRequestError, match="classification"):
        parse_request(body, size)


# --- binary extension errors ---------------------------------------------------------------------


def binary_body(arrays: dict[str, np.ndarray]) -> tuple[bytes, int]:
    body, size = client_request(arrays, binary=True)
    assert size is not None
    return body, size


def test_truncated_binary_body_is_refused():
    body, size = binary_body({"x": sample("FP32", (2, 3))})
    with pytest.raises(InvalidRequestError, match=r"input 'x': binary_data_size 24 exceeds the 23 bytes left"):
        parse_request(body[:-1], size)


def test_trailing_bytes_are_refused():
    body, size = binary_body({"x": sample("FP32", (2, 3))})
    with pytest.raises(InvalidRequestError, match="3 unexpected trailing bytes"):
        parse_request(body + b"abc", size)


def test_trailing_bytes_after_a_json_only_header_are_refused():
    body = raw_request([fp32_input()])
    with pytest.raises(InvalidRequestError, match="2 unexpected trailing bytes"):
        parse_request(body + b"\x00\x00", len(body))


def test_binary_size_that_does_not_match_the_shape_is_refused():
    # Given a header whose binary_data_size disagrees with shape x itemsize
    header = json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": 20}}]}
    ).encode()
    # When parsed, Then the error gives the expected byte count
    with pytest.raises(InvalidRequestError, match=r"input 'x': binary_data_size is 20 bytes, expected 24"):
        parse_request(header + b"\x00" * 20, len(header))


def test_binary_body_without_header_length_says_the_header_is_needed():
    # Given a tritonclient binary request whose Inference-Header-Content-Length was lost
    body, _ = binary_body({"x": sample("FP32", (1,))})
    # When parsed as plain JSON, Then the error points at the missing header
    with pytest.raises(InvalidRequestError, match="needs the Inference-Header-Content-Length header"):
        parse_request(body)


def test_binary_data_size_without_a_binary_section_is_refused():
    header = json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}}]}
    ).encode()
    with pytest.raises(InvalidRequestError, match="Inference-Header-Content-Length header is missing"):
        parse_request(header)


@pytest.mark.parametrize("header_length", [-1, 10**9, "abc"])
def test_header_length_outside_the_body_is_refused(header_length):
    body, _ = binary_body({"x": sample("FP32", (1,))})
    with pytest.raises(InvalidRequestError, match="Inference-Header-Content-Length"):
        parse_request(body, header_length)


def test_header_length_cutting_the_json_is_refused():
    body, size = binary_body({"x": sample("FP32", (1,))})
    with pytest.raises(InvalidRequestError, match="not valid JSON"):
        parse_request(body, size - 5)


def test_binary_size_must_be_a_non_negative_integer():
    header = json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": -4}}]}
    ).encode()
    with pytest.raises(InvalidRequestError, match="binary_data_size must be a non-negative integer, got -4"):
        parse_request(header, len(header))


# --- validation against the model ----------------------------------------------------------------


def request_of(**arrays: np.ndarray) -> InferRequest:
    return InferRequest(inputs=[tensor_from_numpy(n, a) for n, a in arrays.items()])


TWO_INPUTS = (("input", "FP32", (-1, 4)), ("mask", "INT64", (-1,)))


def test_a_fitting_request_passes_validation():
    req = request_of(input=np.zeros((3, 4), np.float32), mask=np.zeros(3, np.int64))
    req.outputs = [RequestedOutput("out")]
    check_request(req.inputs, req.outputs, model(TWO_INPUTS))


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (
            {"input": np.zeros((3, 4), np.float32)},
            r"missing input\(s\) 'mask' for model 'm' v1; expected inputs: 'input', 'mask'",
        ),
        (
            {"input": np.zeros((3, 4), np.float32), "mask": np.zeros(3, np.int64), "extra": np.zeros(1)},
            r"unknown input\(s\) 'extra'.*expected inputs: 'input', 'mask'",
        ),
        (
            {"input": np.zeros((3, 4), np.int64), "mask": np.zeros(3, np.int64)},
            r"input 'input': expected datatype FP32, got INT64",
        ),
        (
            {"input": np.zeros((3, 4, 1), np.float32), "mask": np.zeros(3, np.int64)},
            r"input 'input': expected rank 2 \(shape \[-1, 4\]\), got rank 3 \(shape \[3, 4, 1\]\)",
        ),
        (
            {"input": np.zeros((3, 5), np.float32), "mask": np.zeros(3, np.int64)},
            r"input 'input': dimension 1 must be 4 \(shape \[-1, 4\]\), got 5 \(shape \[3, 5\]\)",
        ),
        (
            {"input": np.zeros((3, 4), np.float32), "mask": np.zeros(2, np.int64)},
            r"input 'mask': batch size \(dim 0\) 2 differs from input 'input''s 3",
        ),
    ],
)
def test_validation_errors_name_the_input_and_expected_vs_actual(arrays, message):
    with pytest.raises(InvalidRequestError, match=message):
        req = request_of(**arrays)
        check_request(req.inputs, req.outputs, model(TWO_INPUTS))


def test_batches_over_max_batch_size_are_valid_the_gpu_backend_splits_them():
    # Given a 9-row request and models whose Triton max_batch_size is 8
    import dataclasses

    req = request_of(input=np.zeros((9, 4), np.float32), mask=np.zeros(9, np.int64))
    # When validated, Then neither the CPU-capable nor the GPU-only model refuses it
    check_request(req.inputs, req.outputs, model(TWO_INPUTS))
    check_request(req.inputs, req.outputs, dataclasses.replace(model(TWO_INPUTS), targets=("gpu",)))


def test_unknown_requested_output_lists_the_model_outputs():
    req = request_of(input=np.zeros((1, 4), np.float32), mask=np.zeros(1, np.int64))
    req.outputs = [RequestedOutput("logits")]
    with pytest.raises(InvalidRequestError, match=r"unknown requested output 'logits'.*outputs: 'out'"):
        check_request(req.inputs, req.outputs, model(TWO_INPUTS))


def test_non_batching_model_with_fixed_dims_does_not_compare_batch_sizes():
    # Given a model without batching whose inputs have different fixed first dims
    mv = model((("a", "FP32", (2, 2)), ("b", "FP32", (3,))), max_batch_size=0)
    # When a fitting request is validated, Then it passes
    req = request_of(a=np.zeros((2, 2), np.float32), b=np.zeros(3, np.float32))
    check_request(req.inputs, req.outputs, mv)


def test_a_tritonclient_request_validates_from_its_header_alone():
    # Given a binary request built by tritonclient
    body, size = client_request({"input": sample("FP32", (2, 4)), "mask": sample("INT64", (2,))}, binary=True)
    # When its header is checked against the model, Then it fits, and no tensor was materialised for it
    header = parse_request(body, size)
    check_request(header.tensors, header.outputs, model(TWO_INPUTS))
    assert all(t.data is None and t.binary is not None for t in header.tensors)


# --- dimensions that inputs share ----------------------------------------------------------------------


def text_model() -> ModelVersion:
    """input_ids and attention_mask share [batch, sequence], as a transformer's do."""
    specs = tuple(TensorSpec(n, "INT64", (-1, -1), dim_names=("batch", "sequence"))
                  for n in ("input_ids", "attention_mask"))
    return ModelVersion("bert", "1", specs, (TensorSpec("emb", "FP32", (-1, 4)),),
                        {"fp32": Variant("bert/1/model.onnx", "0" * 64, 1)}, "fp32")


def ids(name: str, shape: list[int]) -> dict:
    return {"name": name, "datatype": "INT64", "shape": shape, "data": [0] * int(np.prod(shape))}


def test_inputs_that_share_a_dimension_name_must_agree_on_it_before_anything_runs():
    # Given a model whose two inputs share the symbolic dimension "sequence"
    mv = text_model()
    # When input_ids is [1, 4] and attention_mask [1, 5]
    header = parse_request(raw_request([ids("input_ids", [1, 4]), ids("attention_mask", [1, 5])]))
    # Then the request is refused with both inputs, the dimension's name and both sizes
    with pytest.raises(InvalidRequestError, match=r"input 'attention_mask': dimension 1 \('sequence'\) is 5, "
                       r"but input 'input_ids' has 4 in its dimension 1"):
        check_request(header.tensors, header.outputs, mv)
    # And the same pair with agreeing sizes passes
    good = parse_request(raw_request([ids("input_ids", [2, 5]), ids("attention_mask", [2, 5])]))
    check_request(good.tensors, good.outputs, mv)


# --- what the answer echoes must be writable as JSON -------------------------------------------------------


@pytest.mark.parametrize(("extra", "message"), [
    ({"id": "\udfff"}, r"'id' is not valid Unicode: it holds a lone surrogate, '\\udfff'"),
    ({"id": "ok\ud800ok"}, r"'id' is not valid Unicode: it holds a lone surrogate, '\\ud800'"),
    ({"parameters": {"note": "\udfff"}}, r"parameters\['note'\] is not valid Unicode"),
    ({"parameters": {"\udfff": 1}}, r"parameters holds a key that is not valid Unicode"),
    ({"parameters": {"n": [1, {"deep": 10**400}]}}, r"parameters\['n'\]\[1\]\['deep'\]: the integer 10{2}\.\.\.0{3} "
                                                     r"\(401 digits\) does not fit in 64 bits"),
    # (orjson reads an integer past 64 bits as a float; a bare NaN token elsewhere sends the whole body to the
    # standard library, which keeps it an exact int)
    ({"parameters": {"n": -(2**63) - 1, "f": float("nan")}},
     r"parameters\['n'\]: the integer -9223372036854775809 does not fit"),
    ({"outputs": [{"name": "y", "parameters": {"tag": "\ud800"}}]},
     r"output 'y': parameters\['tag'\] is not valid Unicode"),
])
def test_strings_and_integers_that_cannot_be_written_back_as_json_are_refused_with_the_header(extra, message):
    # Given a request whose id or parameters hold what no JSON writer can write back (a lone surrogate,
    # an integer past 64 bits): the answer echoes the id, and a split request re-encodes the parameters
    body = raw_request([fp32_input()], **extra)
    # When its header is parsed, Then it is a 400 that says which field and why, before any inference
    with pytest.raises(InvalidRequestError, match=message):
        parse_request(body)


def test_an_input_parameter_that_cannot_be_written_back_is_refused():
    body = raw_request([fp32_input(parameters={"note": "\udc80"})])
    with pytest.raises(InvalidRequestError, match=r"input 'x': parameters\['note'\] is not valid Unicode"):
        parse_request(body)


def test_unicode_ids_and_64_bit_parameters_are_accepted_as_they_are():
    extra = {"id": "req-é-漢字-🙂", "parameters": {"big": 2**64 - 1, "small": -(2**63), "s": "ü", "l": [1.5, None]}}
    header = parse_request(raw_request([fp32_input()], **extra))
    assert (header.id, header.parameters) == (extra["id"], extra["parameters"])
