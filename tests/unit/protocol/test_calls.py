"""InferenceCall, Body and Reply: one inference in whichever form it came, each other form derived once, lazily.

Why it matters: the router forwards the client's body to the CPU function as it came and must not
pay to decode it; onnxruntime and Triton need arrays, materialised once; the CPU function's encoded
answer goes back untouched, decoded only when someone (batch) asks for arrays.
"""

from __future__ import annotations

import base64

import numpy as np
import pytest

from tests.support.fakes import json_body, model_version, ones_like_outputs, rows_of, sample
from tierserve.protocol.calls import Body, InferenceCall, Reply
from tierserve.protocol.http_api import response
from tierserve.protocol.messages import InferRequest, RequestedOutput
from tierserve.protocol.tensors import decode_request, encode_request, encode_response, tensor_from_numpy


def binary_call(x: np.ndarray, request_id: str = "b-1") -> tuple[InferenceCall, bytes]:
    data, header_length = encode_request(InferRequest([tensor_from_numpy("x", x)], id=request_id), binary=True)
    return InferenceCall.from_body(Body(data, header_length)), data


# --- InferenceCall ------------------------------------------------------------------------------------


def test_a_call_from_a_body_reads_its_header_and_leaves_the_tensors_unread() -> None:
    # Given a JSON body of 3 rows with an id, a target hint and a requested output
    body = json_body(rows_of(3), "c-1", parameters={"target": "gpu"}, outputs=[{"name": "y"}])
    # When a call is built from it
    call = InferenceCall.from_body(Body(body))
    # Then everything routing and validation read is there, and no tensor was materialised
    assert ([t.name for t in call.inputs], call.rows, call.tensor_bytes) == (["x"], 3, 3 * 4 * 4)
    assert (call.id, call.target_hint, [o.name for o in call.outputs]) == ("c-1", "gpu", ["y"])
    assert call.materialized is False


def test_the_request_is_materialised_on_first_use_and_only_once() -> None:
    # Given a call from a binary body
    x = rows_of(4, seed=1)
    call, data = binary_call(x)
    # When a backend asks for numpy arrays twice
    first, second = call.request(), call.request()
    # Then the same request is returned, its data viewing the body's bytes in place (not a copy)
    assert first is second and call.materialized
    np.testing.assert_array_equal(first.inputs[0].data, x)
    assert np.shares_memory(first.inputs[0].data, np.frombuffer(data, dtype=np.uint8))


@pytest.mark.parametrize("is_base64", [False, True], ids=["json-text", "base64-text"])
def test_a_call_from_a_body_forwards_the_original_event_text(is_base64: bool) -> None:
    # Given a body as API Gateway's event held it: JSON text, or base64 of a binary body
    if is_base64:
        data, header_length = encode_request(InferRequest([tensor_from_numpy("x", rows_of(2))]), binary=True)
        text = base64.b64encode(data).decode()
    else:
        text, header_length = json_body(rows_of(2)).decode(), None
    body = Body.from_event_text(text, is_base64, header_length)
    call = InferenceCall.from_body(body)
    # When the body to forward is asked for
    forwarded = call.body()
    # Then it is the client's own body, carrying the very text of the event (nothing re-encoded)
    assert forwarded is body
    event_text, flag = forwarded.as_event()
    assert event_text is text and flag is is_base64


def test_a_call_from_arrays_is_encoded_once_as_binary_data() -> None:
    # Given a call built from numpy arrays, as batch scoring builds it
    x = rows_of(3, seed=2)
    request = InferRequest([tensor_from_numpy("x", x)], id="a-1", outputs=[RequestedOutput("y", binary_data=True)])
    call = InferenceCall.from_request(request)
    # When the body to forward is asked for twice
    body = call.body()
    # Then it is encoded once, with binary tensor data, and decodes back to the same request
    assert call.body() is body and body.header_length is not None
    again = decode_request(bytes(body.data), body.header_length)
    np.testing.assert_array_equal(again.inputs[0].data, x)
    assert (again.id, [o.name for o in again.outputs]) == ("a-1", ["y"])
    # And the arrays it was built from are the request, nothing re-materialised
    assert call.request() is request


def test_an_inference_call_needs_a_header_or_a_request() -> None:
    # When a call is built from nothing, Then it is refused at once
    with pytest.raises(ValueError, match="parsed header or a materialised request"):
        InferenceCall()


@pytest.mark.parametrize(
    "datatype",
    ["FP32", "BYTES"],
)
def test_tensor_bytes_are_the_same_for_a_body_and_for_the_same_request_as_arrays(datatype: str) -> None:
    # Given the same request as a parsed body and as numpy arrays
    request = InferRequest([tensor_from_numpy("x", sample(datatype, (4, 3), seed=5))])
    from_arrays = InferenceCall.from_request(request)
    from_body = InferenceCall.from_body(Body(*encode_request(request, binary=True)))
    # When routing reads their size
    # Then both forms report the same tensor bytes (a batch job routes as its HTTP twin would)
    assert from_arrays.tensor_bytes == from_body.tensor_bytes


# --- Body ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "header_length", "expected_base64"),
    [(b'{"inputs":[]}\x00\x00\x80?', 13, True), (b'{"inputs":[]}', None, False), (b"\xff\xfe not utf-8", None, True)],
    ids=["binary", "json", "not-utf8"],
)
def test_a_body_without_event_text_is_encoded_once_for_a_json_event(data: bytes, header_length: int | None,
                                                                     expected_base64: bool) -> None:
    # Given a body that did not come from an event
    body = Body(data, header_length)
    # When it is put into a JSON event
    text, is_base64 = body.as_event()
    # Then JSON stays text and anything else goes as base64 of the very same bytes
    assert is_base64 is expected_base64
    assert (base64.b64decode(text) if is_base64 else text.encode()) == data
    assert body.event_bytes == len(text)
    assert body.as_event()[0] is text


def test_an_event_body_flagged_base64_must_be_base64() -> None:
    # When an event's body is flagged isBase64Encoded but is not base64
    # Then it is refused (the handlers turn this into a 400)
    with pytest.raises(ValueError):
        Body.from_event_text("not base64 at all!", True, None)


# --- Reply --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["decoded", "http-json", "http-binary"])
def test_a_reply_gives_its_outputs_as_arrays_whatever_form_it_came_in(form: str) -> None:
    # Given the outputs of a 2-row answer, as a backend decoded them or as the CPU function encoded them
    outputs = ones_like_outputs(model_version(), 2, "r-1")
    if form == "decoded":
        reply = Reply(outputs)
    else:
        binary = form == "http-binary"
        body, headers = encode_response(outputs, InferRequest([], parameters={"binary_data_output": binary}))
        encoded = response(200, body, headers)
        encoded["headers"] = {k.title(): v for k, v in encoded["headers"].items()}  # names may come in any case
        assert encoded["isBase64Encoded"] is binary
        reply = Reply(http=encoded)
    # When the outputs are asked for
    decoded = reply.decoded()
    # Then they are the model's outputs, decoded once
    assert reply.decoded() is decoded and decoded.id == "r-1"
    np.testing.assert_array_equal(reply.arrays()["y"], np.ones((2, 3), np.float32))
