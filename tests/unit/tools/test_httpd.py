"""The local API's HTTP server against clients that misbehave (issue 8, defect 12): every case answered in the
API's JSON error format or bounded in time, never hung, never an HTML page or a stack trace."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tierserve_tools.apigw import ApiGatewayServer


def echo(event: dict, context: object) -> dict:
    return {"statusCode": 200, "headers": {"content-type": "application/json"},
            "body": json.dumps({"method": event["requestContext"]["http"]["method"],
                                "length": len(event.get("body") or "")})}


@pytest.fixture
def gw() -> Iterator[ApiGatewayServer]:
    server = ApiGatewayServer(echo, lambda: None, port=0).start()
    handler = server._server.RequestHandlerClass
    handler.header_timeout_s, handler.body_timeout_s, handler.idle_timeout_s = 0.5, 0.5, 2.0
    yield server
    server.stop()


def exchange(gw: ApiGatewayServer, raw: bytes, wait_s: float = 5.0) -> tuple[int, dict[str, str], bytes, float]:
    """Send ``raw``, read one response; (status, headers, body, seconds it took)."""
    t0 = time.monotonic()
    with socket.create_connection((gw.host, gw.port), timeout=wait_s) as s:
        s.sendall(raw)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        while len(body) < int(headers.get("content-length", 0)):
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
    return int(lines[0].split()[1]), headers, body, time.monotonic() - t0


def error_of(body: bytes) -> dict:
    obj = json.loads(body)
    assert set(obj) == {"error", "code"} and "Traceback" not in obj["error"]
    return obj


@pytest.mark.parametrize(("request_head", "status", "code", "words"), [
    (b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400, "invalid_request",
     "Content-Length must be an integer"),
    (b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400, "invalid_request",
     "must not be negative"),
    (b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\n\r\n", 411, "length_required", "needs a Content-Length"),
    (b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 11000000\r\n\r\n", 413,
     "payload_too_large", "the limit is 10485760 bytes"),
    (b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400,
     "invalid_request", "conflicting Content-Length"),
    (b"TRACE / HTTP/1.1\r\nHost: x\r\n\r\n", 405, "method_not_allowed", "TRACE is not allowed"),
    (b"FOO / HTTP/1.1\r\nHost: x\r\n\r\n", 405, "method_not_allowed", "FOO is not allowed"),
    (b"GARBAGE\r\n\r\n", 400, "invalid_request", "request"),
    (b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", 505, "http_version_not_supported", "HTTP"),
], ids=["length-abc", "length-negative", "no-length", "too-large", "two-lengths", "trace", "made-up", "garbage",
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
