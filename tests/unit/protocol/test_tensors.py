"""Open Inference Protocol codec: numpy tensors to and from the wire, round trips against the real
tritonclient, and every error found while materialising data.

Header-level parsing and the checks against the manifest are tierserve.protocol.header's (test_wire.py).
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import tritonclient.http as httpclient

from tests.support.fakes import ALL_DATATYPES, client_request, fp32_input, raw_request, sample
from tierserve.errors import InferenceError, InvalidRequestError
from tierserve.protocol.messages import InferRequest, InferResponse, RequestedOutput, Tensor
from tierserve.protocol.tensors import (
    DATATYPE_TO_DTYPE,
    datatype_to_dtype,
    decode_request,
    decode_response,
    dtype_to_datatype,
    encode_request,
    encode_response,
    error_body,
    tensor_from_numpy,
)


def client_result(body: bytes, headers: dict[str, str]) -> httpclient.InferResult:
    hl = headers.get("inference-header-content-length")
    return httpclient.InferResult.from_response_body(body, header_length=int(hl) if hl is not None else None)


def assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    if expected.dtype == object:
        assert [bytes(x) if not isinstance(x, str) else x.encode() for x in actual.ravel()] == list(expected.ravel())
    else:
        assert actual.dtype == expected.dtype
        np.testing.assert_array_equal(actual, expected)


# --- datatypes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_datatype_mapping_round_trips_and_matches_tritonclient(datatype):
    # Given a protocol datatype
    # When it is mapped to numpy and back
    dtype = datatype_to_dtype(datatype)
    # Then it is the same datatype, and tritonclient agrees on the numpy dtype
    assert dtype_to_datatype(dtype) == datatype
    assert np.dtype(httpclient.triton_to_np_dtype(datatype)) == dtype


@pytest.mark.parametrize("dtype", [np.str_, np.bytes_, object, "U5", "S3"])
def test_strings_and_objects_are_bytes(dtype):
    assert dtype_to_datatype(dtype) == "BYTES"


def test_bf16_is_refused_as_unsupported():
    with pytest.raises(InvalidRequestError, match="BF16 is not supported"):
        datatype_to_dtype("BF16")


def test_unknown_datatype_lists_the_known_ones():
    with pytest.raises(InvalidRequestError, match=r"unknown datatype 'FLOAT'.*FP32"):
        datatype_to_dtype("FLOAT")


def test_complex_numpy_dtype_has_no_datatype():
    with pytest.raises(InvalidRequestError, match="complex"):
        dtype_to_datatype(np.complex64)


def test_tensor_from_numpy_encodes_strings_to_bytes():
    # Given a numpy array of str
    # When it becomes a Tensor
    t = tensor_from_numpy("s", np.array([["a", "é"]]), {"k": 1})
    # Then it is BYTES, an object array of utf-8 bytes, with the shape and parameters kept
    assert (t.datatype, t.shape, t.parameters) == ("BYTES", (1, 2), {"k": 1})
    assert t.data.dtype == object and list(t.data.ravel()) == [b"a", "é".encode()]


# --- requests from tritonclient ------------------------------------------------------------------


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_decode_request_built_by_tritonclient(datatype, binary):
    # Given a request built by tritonclient.http for this datatype, with a second input and outputs
    arr = sample(datatype, (3, 4), seed=len(datatype))
    other = sample("INT64", (3,), seed=1)
    outputs = [httpclient.InferRequestedOutput("y", binary_data=binary), httpclient.InferRequestedOutput("z")]
    body, json_size = client_request({"x": arr, "k": other}, binary, outputs=outputs, request_id="req-7")
    # When the codec decodes it
    req = decode_request(body, json_size)
    # Then every input, the id and the requested outputs come back exactly
    assert [t.name for t in req.inputs] == ["x", "k"]
    x = req.inputs[0]
    assert (x.datatype, x.shape) == (datatype, (3, 4))
    assert_same(x.data, arr)
    assert_same(req.inputs[1].data, other)
    assert req.id == "req-7"
    assert req.binary_input is binary
    assert [(o.name, o.binary_data) for o in req.outputs] == [("y", binary), ("z", True)]
    assert "binary_data_size" not in x.parameters


def test_decode_request_keeps_binary_bytes_that_are_not_utf8():
    # Given arbitrary (non-utf-8) BYTES sent with the binary extension
    arr = sample("BYTES", (2, 5), seed=3, utf8=False)
    body, json_size = client_request({"b": arr}, binary=True)
    # When decoded
    req = decode_request(body, json_size)
    # Then the bytes are exact, including empty elements and NULs
    assert_same(req.inputs[0].data, arr)


def test_decode_request_without_outputs_defaults_to_binary_output():
    # Given tritonclient's request with no outputs, which sets binary_data_output
    body, json_size = client_request({"x": sample("FP32", (2, 2))}, binary=False)
    # When decoded
    req = decode_request(body, json_size)
    # Then the parameter is kept and no outputs are requested
    assert json_size is None
    assert req.parameters == {"binary_data_output": True}
    assert req.outputs == []
    assert req.id is None


def test_decode_request_flattens_nested_json_lists_row_major():
    body = raw_request([{"name": "x", "datatype": "INT32", "shape": [2, 3], "data": [[1, 2, 3], [4, 5, 6]]}])
    req = decode_request(body)
    np.testing.assert_array_equal(req.inputs[0].data, np.arange(1, 7, dtype=np.int32).reshape(2, 3))


def test_decode_request_flattens_nested_bytes_lists():
    body = raw_request([{"name": "s", "datatype": "BYTES", "shape": [2, 2], "data": [["a", "b"], ["c", "d"]]}])
    assert list(decode_request(body).inputs[0].data.ravel()) == [b"a", b"b", b"c", b"d"]


def test_decode_request_accepts_scalars_and_empty_tensors():
    body = raw_request(
        [
            {"name": "s", "datatype": "FP32", "shape": [], "data": [1.5]},
            {"name": "e", "datatype": "INT64", "shape": [0, 3], "data": []},
        ]
    )
    s, e = decode_request(body).inputs
    assert s.data.shape == () and float(s.data) == 1.5
    assert e.data.shape == (0, 3) and e.data.dtype == np.int64


# --- encode_request is the inverse of decode_request ---------------------------------------------


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_encode_request_round_trips(datatype, binary):
    # Given a request with every field set
    arr = sample(datatype, (2, 3), seed=11)
    request = InferRequest(
        inputs=[tensor_from_numpy("x", arr, {"note": "kept"})],
        id="abc",
        outputs=[RequestedOutput("y", binary_data=True), RequestedOutput("z")],
        parameters={"binary_data_output": False, "target": "cpu"},
    )
    # When encoded and decoded again
    body, header_length = encode_request(request, binary=binary)
    decoded = decode_request(body, header_length)
    # Then it is the same request
    assert (header_length is not None) is binary
    assert decoded.id == "abc" and decoded.parameters == request.parameters
    assert [(o.name, o.binary_data) for o in decoded.outputs] == [("y", True), ("z", None)]
    assert decoded.inputs[0].parameters == {"note": "kept"}
    assert_same(decoded.inputs[0].data, arr)


def test_encode_request_refuses_non_utf8_bytes_as_json():
    request = InferRequest(inputs=[tensor_from_numpy("b", np.array([b"\xff"], dtype=object))])
    with pytest.raises(InvalidRequestError, match=r"'b'.*not valid utf-8.*binary"):
        encode_request(request, binary=False)


# --- responses read by tritonclient --------------------------------------------------------------


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_encode_response_is_read_by_tritonclient(datatype, binary):
    # Given a model response and a request asking for the output in JSON or binary
    arr = sample(datatype, (4, 3), seed=5 + len(datatype))
    response = InferResponse("m", "1", [tensor_from_numpy("y", arr)], id="r1")
    request = InferRequest(inputs=[], id="r1", outputs=[RequestedOutput("y", binary_data=binary)])
    # When encoded
    body, headers = encode_response(response, request)
    # Then tritonclient.http reads back the same array, id and model
    result = client_result(body, headers)
    got = result.as_numpy("y")
    assert_same(got, arr)
    if datatype == "FP16":
        assert got.dtype == np.float16
    resp = result.get_response()
    assert (resp["model_name"], resp["model_version"], resp["id"]) == ("m", "1", "r1")
    if binary:
        assert headers["content-type"] == "application/octet-stream"
        assert int(headers["inference-header-content-length"]) < len(body)
    else:
        assert headers == {"content-type": "application/json"}


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_encode_response_follows_binary_data_output_when_outputs_omitted(binary):
    # Given a request naming no outputs, with binary_data_output set
    a, b = sample("FP32", (2, 2), seed=1), sample("INT64", (2,), seed=2)
    response = InferResponse("m", "1", [tensor_from_numpy("a", a), tensor_from_numpy("b", b)])
    request = InferRequest(inputs=[], parameters={"binary_data_output": binary})
    # When encoded
    body, headers = encode_response(response, request)
    # Then every output is returned, binary or JSON as asked
    result = client_result(body, headers)
    assert_same(result.as_numpy("a"), a)
    assert_same(result.as_numpy("b"), b)
    sizes = [o.get("parameters", {}).get("binary_data_size") for o in result.get_response()["outputs"]]
    assert all((s is not None) is binary for s in sizes)


def test_encode_response_filters_and_mixes_json_and_binary_outputs():
    # Given three outputs, a request for two of them: one binary, one defaulting to JSON
    arrs = {n: sample("FP32", (2, 2), seed=i) for i, n in enumerate("abc")}
    response = InferResponse("m", "1", [tensor_from_numpy(n, a) for n, a in arrs.items()])
    request = InferRequest(
        inputs=[], outputs=[RequestedOutput("c", binary_data=True), RequestedOutput("a")], parameters={}
    )
    # When encoded
    body, headers = encode_response(response, request)
    # Then only the requested outputs come back, c binary and a JSON
    result = client_result(body, headers)
    outs = {o["name"]: o for o in result.get_response()["outputs"]}
    assert set(outs) == {"a", "c"}
    assert "data" in outs["a"] and outs["c"]["parameters"]["binary_data_size"] == 16
    assert_same(result.as_numpy("a"), arrs["a"])
    assert_same(result.as_numpy("c"), arrs["c"])
    assert result.as_numpy("b") is None


def test_encode_response_without_request_is_json_and_omits_empty_fields():
    body, headers = encode_response(InferResponse("m", "2", [tensor_from_numpy("y", np.array([True, False]))]))
    obj = json.loads(body)
    assert headers == {"content-type": "application/json"}
    assert obj == {
        "model_name": "m",
        "model_version": "2",
        "outputs": [{"name": "y", "datatype": "BOOL", "shape": [2], "data": [True, False]}],
    }


def test_encode_response_sends_non_utf8_bytes_as_binary_even_in_json_mode():
    # Given BYTES outputs that are not utf-8, and a client that asked for JSON
    arr = sample("BYTES", (3,), seed=9, utf8=False)
    arr[0] = b"\xff\xfe"
    response = InferResponse("m", "1", [tensor_from_numpy("y", arr)])
    request = InferRequest(inputs=[], outputs=[RequestedOutput("y", binary_data=False)])
    # When encoded
    body, headers = encode_response(response, request)
    # Then the output goes binary, and tritonclient still reads the exact bytes
    assert headers["content-type"] == "application/octet-stream"
    assert_same(client_result(body, headers).as_numpy("y"), arr)


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
def test_encode_response_keeps_non_finite_floats_readable_by_tritonclient(datatype):
    # Given an output holding NaN, +inf and -inf, for a client that asked for JSON
    arr = np.array([np.nan, np.inf, -np.inf, 1.0], dtype=DATATYPE_TO_DTYPE[datatype])
    # When encoded
    body, headers = encode_response(InferResponse("m", "1", [tensor_from_numpy("y", arr)]))
    # Then the body is standard JSON (no bare NaN/Infinity token: a strict parser reads it), the values are
    # spelled as the strings the protocol's tensor data allows, and tritonclient reads back the very same values
    strict = json.loads(body, parse_constant=lambda token: pytest.fail(f"non-standard JSON token {token}"))
    assert strict["outputs"][0]["data"] == ["NaN", "Infinity", "-Infinity", 1.0]
    np.testing.assert_array_equal(client_result(body, headers).as_numpy("y"), arr)
    # And our own decoder (the router reading a CPU reply, batch) reads them back too
    np.testing.assert_array_equal(decode_response(body).outputs[0].data, arr)


def test_encode_response_refuses_data_that_does_not_fit_the_shape():
    bad = Tensor("y", "FP32", (3,), np.zeros(2, dtype=np.float32))
    with pytest.raises(InferenceError, match=r"'y'.*shape \[3\] needs 3 elements, data has 2"):
        encode_response(InferResponse("m", "1", [bad]))


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_decode_response_is_the_inverse_of_encode_response(binary):
    arrays = {dt: sample(dt, (2, 2), seed=i) for i, dt in enumerate(ALL_DATATYPES)}
    response = InferResponse(
        "m", "3", [tensor_from_numpy(dt, a) for dt, a in arrays.items()], id="q", parameters={"p": 1}
    )
    request = InferRequest(inputs=[], parameters={"binary_data_output": binary})
    body, headers = encode_response(response, request)
    hl = headers.get("inference-header-content-length")
    decoded = decode_response(body, int(hl) if hl else None)
    assert (decoded.model_name, decoded.model_version, decoded.id, decoded.parameters) == ("m", "3", "q", {"p": 1})
    for t in decoded.outputs:
        assert_same(t.data, arrays[t.name])


def test_decode_response_raises_the_error_body_message():
    with pytest.raises(InferenceError, match="model exploded"):
        decode_response(error_body("model exploded"))


def test_decode_response_refuses_truncated_binary():
    body, headers = encode_response(
        InferResponse("m", "1", [tensor_from_numpy("y", np.ones(4, np.float32))]),
        InferRequest(inputs=[], parameters={"binary_data_output": True}),
    )
    with pytest.raises(InferenceError, match="exceeds"):
        decode_response(body[:-1], int(headers["inference-header-content-length"]))


def test_error_body_is_the_triton_error_object():
    assert json.loads(error_body("bad input 'x'")) == {"error": "bad input 'x'"}


# --- materialising JSON and binary data: errors -----------------------------------------------------


@pytest.mark.parametrize(
    ("inp", "message"),
    [
        (fp32_input(shape=[3]), r"input 'x': shape needs 3 elements, data has 2"),
        (fp32_input(shape=[2, 2]), r"input 'x': shape needs 4 elements, data has 2"),
        (fp32_input(data=[1.0, "2.0"]), r"input 'x': FP32 data must be numbers"),
        (fp32_input(data=[1.0, None]), r"input 'x': FP32 data must be numbers"),
        (fp32_input(data=[[1.0], [2.0, 3.0]]), r"input 'x': data is not a regular"),
        (fp32_input(data=1.0), r"input 'x': 'data' must be a JSON array, got float"),
        (fp32_input(data=[{"a": 1}, 2]), r"input 'x': FP32 data must be numbers"),
        (fp32_input(datatype="INT64", data=[1.5, 2]), r"input 'x': INT64 data must be integers"),
        (fp32_input(datatype="INT64", data=[1, "NaN"]), r"input 'x': INT64 data must be integers"),
        (fp32_input(datatype="UINT8", data=[1, 256]), r"input 'x': value 256 is out of range for UINT8"),
        (fp32_input(datatype="UINT32", data=[-1, 2]), r"input 'x': value -1 is out of range for UINT32"),
        (fp32_input(datatype="INT64", data=[1, 2**64]),
         r"input 'x': value 18446744073709551616 is out of range for INT64"),
        (fp32_input(datatype="INT32", data=[True, False]), r"input 'x': INT32 data must be integers"),
        (fp32_input(datatype="BOOL", data=[1, 0]), r"input 'x': BOOL data must be true/false"),
        (fp32_input(datatype="BYTES", data=["a", 1]), r"input 'x': BYTES data must be JSON strings, got 1"),
        (fp32_input(datatype="BYTES", data=["a"]), r"input 'x': shape needs 2 elements, data has 1"),
        (fp32_input(datatype="BYTES", data=["a", "\ud800"]),
         r"input 'x': BYTES element 1 is not valid Unicode \(surrogates not allowed: '\\ud800'\)"),
        (fp32_input(data=[1.0, "nan"]), r"input 'x': FP32 data must be numbers \(or \"NaN\""),
    ],
)
def test_invalid_data_names_the_input_and_the_problem(inp, message):
    # Given a request whose only input has a well-formed header but data that does not fit it
    body = raw_request([inp])
    # When decoded, Then the error names the input and what was expected
    with pytest.raises(InvalidRequestError, match=message):
        decode_request(body)


def test_nan_and_infinity_spelled_as_json_strings_are_read_as_floats():
    # Given the standard-JSON spelling of non-finite values that tierserve itself writes
    body = raw_request([fp32_input(shape=[4], data=["NaN", "Infinity", "-Infinity", 1.5])])
    # When decoded, Then they are the floats they name
    np.testing.assert_array_equal(decode_request(body).inputs[0].data,
                                  np.array([np.nan, np.inf, -np.inf, 1.5], dtype=np.float32))


def test_nan_and_infinity_sent_by_tritonclient_as_json_are_accepted():
    # Given a JSON request built by tritonclient.http whose data holds NaN and infinities
    arr = np.array([np.nan, np.inf, -np.inf, 1.0], dtype=np.float32)
    body, size = client_request({"x": arr}, binary=False)
    # When decoded, Then the values come through as sent
    np.testing.assert_array_equal(decode_request(body, size).inputs[0].data, arr)


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (struct.pack("<I", 1) + b"a" + b"\x02\x00", r"BYTES element 1 is truncated: its 4-byte length prefix"),
        (struct.pack("<I", 9) + b"abc", r"BYTES element 0 declares 9 bytes but only 3 remain"),
        (struct.pack("<I", 1) + b"a", r"shape needs 2 elements, binary BYTES data has 1"),
        ((struct.pack("<I", 1) + b"a") * 3, r"binary BYTES data holds more than the 2 elements"),
    ],
)
def test_malformed_binary_bytes_elements_are_refused(blob, message):
    header = json.dumps(
        {"inputs": [{"name": "s", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(blob)}}]}
    ).encode()
    with pytest.raises(InvalidRequestError, match=rf"input 's': {message}"):
        decode_request(header + blob, len(header))


def test_binary_bool_must_be_zero_or_one():
    header = json.dumps(
        {"inputs": [{"name": "b", "datatype": "BOOL", "shape": [2], "parameters": {"binary_data_size": 2}}]}
    ).encode()
    with pytest.raises(InvalidRequestError, match=r"input 'b': binary BOOL data must hold only 0 or 1"):
        decode_request(header + b"\x01\x07", len(header))


# --- values the manifest refuses (issue 8, defects 1 and 5) ---------------------------------------------


def _model(allow_non_finite: bool = False, value_range=None):
    from tierserve.manifest import ModelVersion, TensorSpec, Variant

    return ModelVersion("m", "1", (TensorSpec("x", "FP32", (-1, 3)), TensorSpec("ids", "INT64", (-1, 3),
                                                                                value_range=value_range)),
                        (TensorSpec("y", "FP32", (-1,)),), {"fp32": Variant("m/1/model.onnx", "0" * 64, 1)}, "fp32",
                        allow_non_finite=allow_non_finite)


def _request(x, ids=((0, 0, 0),)) -> InferRequest:
    return InferRequest([tensor_from_numpy("x", np.asarray(x, dtype=np.float32)),
                         tensor_from_numpy("ids", np.asarray(ids, dtype=np.int64))])


@pytest.mark.parametrize(("value", "shown"), [(np.nan, "nan"), (np.inf, "inf"), (-np.inf, "-inf")])
def test_non_finite_inputs_are_refused_by_default_naming_the_tensor_and_the_index(value, shown):
    from tierserve.protocol.tensors import check_values

    # Given a model whose manifest says nothing about non-finite values, and a 2x3 input with one at [1, 2]
    x = np.zeros((2, 3), dtype=np.float32)
    x[1, 2] = value
    # When checked, Then it is refused, naming the input, the value, its index and what to do
    with pytest.raises(InvalidRequestError, match=rf"input 'x' holds {shown} at index \[1, 2\]; model 'm' v1 does "
                       r"not accept NaN or Infinity \(allow_non_finite is off"):
        check_values(_request(x, [[0] * 3] * 2), _model())
    # And a model that allows them takes them
    check_values(_request(x, [[0] * 3] * 2), _model(allow_non_finite=True))


def test_values_outside_an_inputs_range_are_refused_naming_the_value_and_the_range():
    from tierserve.protocol.tensors import check_values

    model = _model(value_range=(0, 9))
    check_values(_request([[1, 2, 3]], [[0, 9, 5]]), model)
    for bad, index in (([[0, 10**9, 5]], "[0, 1]"), ([[0, 1, -1]], "[0, 2]")):
        with pytest.raises(InvalidRequestError, match=rf"input 'ids' holds -?\d+ at index \{index[:-1]}\], "
                           r"outside the range model 'm' v1 accepts, \[0, 9\]"):
            check_values(_request([[1, 2, 3]], bad), model)


# --- numbers past what a datatype (or float64) can hold -----------------------------------------------

#: A JSON integer past float64's range (``1`` and 400 zeros): orjson refuses it, the standard library
#: reads it as an exact Python int that numpy cannot turn into a float.
HUGE = 10**400
INTEGER_DATATYPES = ["INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"]


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
@pytest.mark.parametrize("data", [[HUGE, 1.0], [1.5, -HUGE], ["NaN", HUGE]], ids=["alone", "negative", "with-nan"])
def test_a_json_integer_past_float64s_range_is_the_clients_error_for_every_float_datatype(datatype, data):
    # Given float data holding an integer that no float can hold
    body = raw_request([fp32_input(datatype=datatype, data=data)])
    # When decoded, Then it is a 400 naming the input, the value (abbreviated) and the datatype
    with pytest.raises(InvalidRequestError, match=rf"input 'x': value -?10{{2}}\.\.\.0{{3}} \(401 digits\) is "
                                                  rf"out of range for {datatype}"):
        decode_request(body)


@pytest.mark.parametrize("datatype", INTEGER_DATATYPES)
@pytest.mark.parametrize("value", [HUGE, -HUGE, float(2**70)], ids=["huge", "-huge", "past-64-bits-as-float"])
def test_a_huge_integer_is_out_of_range_for_every_integer_datatype_and_the_message_stays_short(datatype, value):
    body = raw_request([fp32_input(datatype=datatype, data=[1, value])])
    with pytest.raises(InvalidRequestError, match=rf"input 'x': value .+ is out of range for {datatype}") as info:
        decode_request(body)
    assert len(info.value.message) < 200, info.value.message
