"""The single error -> HTTP status mapping, error bodies, and API Gateway event parsing."""

from __future__ import annotations

import json

import pytest

from tierserve import errors
from tierserve.protocol.http_api import (
    STATUS_BY_ERROR,
    encode_content,
    error_response,
    parse_http_event,
    response,
    status_for,
)


def test_every_error_class_maps_to_a_status_in_the_one_table():
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.TierserveError)]
    for cls in classes:
        assert status_for(cls.__new__(cls)) in {400, 404, 405, 413, 415, 429, 500, 503, 504}
    assert status_for(errors.InvalidNameError("x")) == 400
    assert status_for(errors.BackendTimeoutError("x")) == 504
    assert errors.TierserveError in STATUS_BY_ERROR


def test_unknown_exceptions_become_500_without_a_stack_trace():
    resp = error_response(ZeroDivisionError("secret detail"), request_id="r-1")
    body = json.loads(resp["body"])
    assert resp["statusCode"] == 500
    assert "secret detail" not in resp["body"] and "Traceback" not in resp["body"]
    assert "r-1" in body["error"]


def test_retry_after_is_set_for_unavailable_backends():
    resp = error_response(errors.BackendUnavailableError("down", retry_after_s=12.2))
    assert resp["statusCode"] == 503 and resp["headers"]["retry-after"] == "13"


def test_oversized_body_is_refused_before_decoding():
    ev = {"requestContext": {"http": {"method": "POST"}}, "rawPath": "/v2/models/m/infer",
          "body": "A" * 4000, "isBase64Encoded": True}
    with pytest.raises(errors.PayloadTooLargeError, match="limit is 1000 bytes"):
        parse_http_event(ev, max_body_bytes=1000)


def test_a_body_flagged_base64_that_cannot_be_base64_is_a_400():
    # Given an event whose body is flagged isBase64Encoded but has an impossible length
    ev = {"requestContext": {"http": {"method": "POST"}}, "rawPath": "/v2/models/m/infer",
          "body": "abcde", "isBase64Encoded": True}
    # When it is parsed, Then nothing is decoded yet (the route and the model come first)
    req = parse_http_event(ev, max_body_bytes=1000)
    # And reading the body is the client's error, saying why
    with pytest.raises(errors.InvalidRequestError, match="not valid base64"):
        req.body


def test_an_event_stream_is_never_compressed() -> None:
    # Given a server-sent event stream, and a client that accepts gzip
    stream = response(200, "data: {}\n\n", {"content-type": "text/event-stream"})
    # Then its body is never compressed: a compressed stream is held back until the compressor flushes
    assert encode_content(stream, "gzip") == stream
    with_charset = response(200, "data: {}\n\n", {"Content-Type": "text/event-stream; charset=utf-8"})
    assert encode_content(with_charset, "deflate") == with_charset
    # And a body that already has a content coding is not encoded twice, while plain JSON is
    encoded = encode_content(response(200, {"a": 1}), "gzip")
    assert encoded["headers"]["content-encoding"] == "gzip" and encode_content(encoded, "gzip") == encoded
