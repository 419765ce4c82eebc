"""The local API's HTTP server against clients that misbehave (issue 8, defect 12): every case answered in the
API's JSON error format or bounded in time, never hung, never an HTML page or a stack trace."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.support import raw_http
from tests.support.raw_http import read_response
from tierserve.httpserver import Limits
from tierserve_tools.apigw import MAX_BODY_BYTES, ApiGatewayServer

#: The local API's limits with deadlines short enough for a test.
SHORT = Limits(header_timeout_s=0.5, body_timeout_s=0.5, idle_timeout_s=2.0, max_body_bytes=MAX_BODY_BYTES)


def echo(event: dict, context: object) -> dict:
    return {"statusCode": 200, "headers": {"content-type": "application/json"},
            "body": json.dumps({"method": event["requestContext"]["http"]["method"],
                                "length": len(event.get("body") or "")})}


@pytest.fixture
def gw() -> Iterator[ApiGatewayServer]:
    server = ApiGatewayServer(echo, lambda: None, port=0, limits=SHORT).start()
    yield server
    server.stop()


def exchange(gw: ApiGatewayServer, raw: bytes, wait_s: float = 5.0) -> tuple[int, dict[str, str], bytes, float]:
    """Send ``raw``, read one response; (status, headers, body, seconds it took)."""
    t0 = time.monotonic()
    status, headers, body = raw_http.exchange(gw.host, gw.port, raw, wait_s)
    return status, headers, body, time.monotonic() - t0


def error_of(body: bytes) -> dict:
    obj = json.loads(body)
    assert set(obj) == {"error", "code"} and "Traceback" not in obj["error"]
    return obj


@pytest.mark.parametrize(("request_head", "status", "code", "words"), [
    (b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400, "invalid_request",
     "Content-Length must be one non-negative integer"),
    (b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400, "invalid_request",
     "Content-Length must be one non-negative integer"),
    (b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 11000000\r\n\r\n", 413,
     "payload_too_large", "the limit is 10485760 bytes"),
    (b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400,
     "invalid_request", "conflicting Content-Length"),
    (b"TRACE / HTTP/1.1\r\nHost: x\r\n\r\n", 405, "method_not_allowed", "TRACE is not allowed"),
    (b"FOO / HTTP/1.1\r\nHost: x\r\n\r\n", 405, "method_not_allowed", "FOO is not allowed"),
    (b"GARBAGE\r\n\r\n", 400, "invalid_request", "request"),
    (b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", 505, "http_version_not_supported", "HTTP"),
], ids=["length-abc", "length-negative", "too-large", "two-lengths", "trace", "made-up", "garbage",
        "version"])
def test_bad_http_is_answered_in_the_apis_json_format(gw, request_head, status, code, words) -> None:
    got, headers, body, _ = exchange(gw, request_head)
    error = error_of(body)
    assert (got, error["code"]) == (status, code) and words in error["error"]
    assert headers["content-type"] == "application/json"
    if status == 405:
        assert headers["allow"] == "GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS"


@pytest.mark.parametrize("raw", [
    b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly-part",
    b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Len",
], ids=["body-shorter-than-its-length", "headers-never-finish"])
def test_a_client_that_stops_sending_costs_a_bounded_time_not_a_thread_forever(gw, raw) -> None:
    # When a client stops half-way, Then it gets a 408 (or a closed connection) once the timeout passes
    status, _, body, took = exchange(gw, raw)
    assert status == 408 and error_of(body)["code"] == "request_timeout"
    assert took < 3


def test_held_connections_are_released(gw) -> None:
    # Given 50 clients that each announce a body and never send it
    before = threading.active_count()
    socks = []
    for _ in range(50):
        s = socket.create_connection((gw.host, gw.port))
        s.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        socks.append(s)
    # Then within a few timeouts every connection thread is gone again
    deadline = time.monotonic() + 10
    while threading.active_count() > before + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert threading.active_count() <= before + 2
    for s in socks:
        s.close()


def test_a_chunked_body_is_decoded_and_delivered(gw) -> None:
    raw = (b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    status, _, body, _ = exchange(gw, raw)
    assert (status, json.loads(body)) == (200, {"method": "POST", "length": 11})


def test_a_burst_of_connections_is_queued_not_dropped(gw) -> None:
    # Given 64 clients connecting at the same instant (more than the standard library's backlog of 5)
    results: list[int] = []
    barrier = threading.Barrier(64)

    def one() -> None:
        barrier.wait()
        results.append(exchange(gw, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")[0])

    threads = [threading.Thread(target=one) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # Then every one was answered
    assert results == [200] * 64


# --- issue 16: defects 2, 4, 12 and 13 on the local API ------------------------------------------------------------


def trickle(gw: ApiGatewayServer, head: bytes, rest: bytes) -> tuple[int, float]:
    """Send ``head`` at once, then ``rest`` one byte every 0.1 s; (the status answered, seconds it took)."""
    return raw_http.trickle(gw.host, gw.port, head, rest)


def test_defect_2_a_post_without_a_body_or_a_length_has_an_empty_body(gw) -> None:
    # tritonclient 2.41's get_model_repository_index sends exactly this (RFC 9112 §6.3: the body is empty)
    status, _, body, _ = exchange(gw, b"POST /v2/repository/index HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (status, json.loads(body)) == (200, {"method": "POST", "length": 0})


def test_defect_4_an_unknown_method_with_a_body_leaves_the_connection_usable(gw) -> None:
    with socket.create_connection((gw.host, gw.port), timeout=5) as s:
        s.sendall(b"QUERY /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b'Content-Length: 13\r\n\r\n{"inputs": 1}')
        status, headers, body = read_response(s)
        assert status == 405 and headers["allow"] and error_of(body)["code"] == "method_not_allowed"
        if headers.get("connection") != "close":  # either the body was consumed, or the connection is closed
            s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(s)[0] == 200


def test_defect_4_a_405_on_a_known_route_names_the_allowed_methods() -> None:
    def api(event: dict, context: object) -> dict:  # the API's 405, as tierserve.api answers it (no Allow)
        return {"statusCode": 405, "headers": {"content-type": "application/json"},
                "body": json.dumps({"error": "GET is not allowed", "code": "method_not_allowed"})}

    server = ApiGatewayServer(api, lambda: None, port=0).start()
    try:
        status, headers, _, _ = exchange(server, b"GET /v2/models/m/infer HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (status, headers.get("allow")) == (405, "POST")
    finally:
        server.stop()


@pytest.mark.parametrize(("head", "rest", "limit"), [
    (b"GET /v2/health/live HTTP/1.1\r\n", b"X-Slow: " + b"a" * 200, 0.5),
    (b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 200\r\n\r\n", b"a" * 200, 0.5),
], ids=["headers", "body"])
def test_defect_12_a_trickle_is_cut_at_its_absolute_deadline(gw, head, rest, limit) -> None:
    # Given a client that sends one byte every 0.1 s (each read succeeds well within any per-read timeout)
    status, took = trickle(gw, head, rest)
    # Then it is answered 408 at the deadline, not after the whole trickle (20 s)
    assert status == 408 and limit <= took < limit + 1.0, took


def test_defect_13_a_body_shorter_than_its_length_is_a_408_at_the_body_deadline(gw) -> None:
    status, _, body, took = exchange(gw, b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
    assert status == 408 and error_of(body)["code"] == "request_timeout" and took < 1.5


@pytest.mark.parametrize(("raw", "statuses"), [
    (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", {414}),
    (b"GET /\r\n", {400, 505}),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", {400, 505}),
    (b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", {505}),
    (b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", {400}),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 140_000 + b"\r\n\r\n", {431}),
], ids=["line-over-64k", "http-0.9", "http2-preface", "http-9.9", "two-lengths", "headers-over-128k-at-once"])
def test_defect_13_bad_framing_gets_a_status_line_and_the_apis_json(gw, raw, statuses) -> None:
    status, headers, body, took = exchange(gw, raw)
    assert headers["content-type"] == "application/json"
    assert status in statuses and error_of(body) and took < 1.5


def test_defect_12_held_connections_cost_no_thread_each_and_are_capped() -> None:
    # Given a gateway capped at 16 connections, and 40 clients that each send half a request line and stall
    server = ApiGatewayServer(echo, lambda: None, port=0, limits=Limits(header_timeout_s=5, max_connections=16))
    server.start()
    before = threading.active_count()
    socks = [socket.create_connection((server.host, server.port), timeout=5) for _ in range(40)]
    try:
        for s in socks:
            s.sendall(b"GET /v2/health/live HT")
        time.sleep(0.5)
        # Then no thread was started for them, 16 are held and the other 24 were answered 503 and closed
        assert threading.active_count() <= before + 2
        assert server.open_connections == 16
        refused = 0
        for s in socks[16:]:
            s.settimeout(2)
            refused += s.recv(64).startswith(b"HTTP/1.1 503 ")
        assert refused == 24
    finally:
        for s in socks:
            s.close()
        server.stop()
