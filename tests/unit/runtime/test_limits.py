"""tierserve.limits: every size limit derives from Lambda's and API Gateway's documented quotas, and the
response-size prediction the router refuses 413s with before any inference."""

from __future__ import annotations

import json
import random

import pytest

from tierserve import limits
from tierserve.manifest import TensorSpec


def test_limits_derive_from_the_quotas_so_an_accepted_body_always_fits_its_event() -> None:
    # Given the largest body the router accepts, binary (base64 in the event) with the envelope's room
    body = limits.MAX_REQUEST_BODY_BYTES
    # Then its event fits Lambda's 6 MB request payload, and one more base64 quantum would not leave the room
    assert limits.base64_len(body) + limits.ENVELOPE_BYTES <= limits.LAMBDA_REQUEST_BYTES == 6 * 1024 * 1024
    assert limits.base64_len(body + 3) + limits.ENVELOPE_BYTES > limits.LAMBDA_REQUEST_BYTES
    # And a binary response body of the largest size fits a Lambda response once base64-encoded
    assert limits.base64_len(limits.MAX_BINARY_RESPONSE_BYTES) + limits.ENVELOPE_BYTES <= limits.LAMBDA_RESPONSE_BYTES
    assert (limits.APIGW_PAYLOAD_BYTES, limits.APIGW_INTEGRATION_TIMEOUT_S) == (10 * 1024 * 1024, 30.0)


@pytest.mark.parametrize("seed", range(5))
def test_a_text_bodys_size_inside_json_is_never_underestimated(seed: int) -> None:
    rng = random.Random(seed)
    text = "".join(rng.choice(['"', "\\", "\n", "\t", "\x01", "a", "é", "✓", " "]) for _ in range(500))
    assert limits.json_string_len(text) >= len(json.dumps(text, ensure_ascii=False).encode())


def test_the_response_size_follows_the_outputs_dims_named_like_the_inputs() -> None:
    # Given MiniLM's outputs: [batch, sequence, 384] and [batch, 384], sequence named like input_ids' dim
    outputs = (TensorSpec("last_hidden_state", "FP32", (-1, -1, 384), ("batch", "s53", "")),
               TensorSpec("sentence_embedding", "FP32", (-1, 384), ("batch", "")))
    known = {"batch": 128, "s53": 16}
    # When 128 sentences of 16 tokens ask for both outputs as binary, or only the embedding as JSON
    both = limits.predict_response(outputs, 128, {"last_hidden_state": True, "sentence_embedding": True}, known, True)
    one = limits.predict_response(outputs, 128, {"sentence_embedding": False}, known, True)
    # Then binary is exact (4 bytes a float) and fits; JSON is estimated per element
    assert both.binary_bytes == 128 * (16 * 384 + 384) * 4 and both.fits()
    assert one.json_bytes >= 128 * 384 * limits.JSON_BYTES_PER_ELEMENT["FP32"] and one.binary is False
    # And both as JSON would not fit, and the most rows that would is known
    as_json = limits.predict_response(outputs, 128, {"last_hidden_state": False, "sentence_embedding": False}, known,
                                      True)
    assert not as_json.fits() and 0 < as_json.max_rows() < 128
    assert limits.predict_response(outputs, as_json.max_rows(), {"last_hidden_state": False,
                                                                 "sentence_embedding": False}, known, True).fits()


def test_an_integer_outputs_value_range_bounds_its_json_width() -> None:
    # Given 1.1 M labels in [-1, 3] (a lookup's output), and the same output without a range
    bounded = (TensorSpec("y", "INT64", (-1,), value_range=(-1, 3)),)
    unbounded = (TensorSpec("y", "INT64", (-1,)),)
    # When their JSON responses are predicted
    rows = 1_100_000
    tight = limits.predict_response(bounded, rows, {"y": False}, {}, True)
    typical = limits.predict_response(unbounded, rows, {"y": False}, {}, True)
    # Then the range's widest bound ("-1," is 3 bytes) sizes each element, and the real JSON fits it
    assert tight.outputs[0].bytes_per_row == 3 and tight.fits()
    real = json.dumps({"outputs": [{"name": "y", "datatype": "INT64", "shape": [rows],
                                    "data": [3, -1] * (rows // 2)}]}, separators=(",", ":"))
    assert len(real) <= tight.json_bytes
    # And without a range the typical INT64 width stands (and 1.1 M of them would not fit)
    assert typical.outputs[0].bytes_per_row == limits.JSON_BYTES_PER_ELEMENT["INT64"] and not typical.fits()
    # And binary outputs are exact whatever the range
    assert limits.predict_response(bounded, 10, {"y": True}, {}, True).binary_bytes == 80
