"""The Runtime API emulator on its own, spoken to with plain http.client (the loop itself:
tests/unit/streaming/test_runtime_loop.py)."""

from __future__ import annotations

import base64
import http.client
import json
import threading

import pytest

from tierserve_tools.invoke_stream_endpoint import FunctionStreamError
from tierserve_tools.runtime_api import RuntimeApiEmulator

BASE = "/2018-06-01/runtime"


def _conn(api: RuntimeApiEmulator) -> http.client.HTTPConnection:
    host, port = api.address.split(":")
    return http.client.HTTPConnection(host, int(port), timeout=10)


def _next(conn: http.client.HTTPConnection) -> tuple[dict[str, str], bytes]:
    conn.request("GET", f"{BASE}/invocation/next")
    resp = conn.getresponse()
    return {k.lower(): v for k, v in resp.getheaders()}, resp.read()


def _post_chunked(conn: http.client.HTTPConnection, path: str, parts: list[bytes], trailers: str = "") -> int:
    conn.putrequest("POST", path)
    conn.putheader("Lambda-Runtime-Function-Response-Mode", "streaming")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    for part in parts:
        conn.send(b"%x\r\n%s\r\n" % (len(part), part))
    conn.send(b"0\r\n" + trailers.encode() + b"\r\n")
    resp = conn.getresponse()
    resp.read()
    return resp.status


@pytest.fixture
def api():
    with RuntimeApiEmulator(function_name="fn") as emulator:
        yield emulator


def test_next_hands_out_the_event_with_lambdas_headers(api: RuntimeApiEmulator) -> None:
    inv = api.invoke({"x": 1}, timeout_s=5)
    headers, body = _next(_conn(api))
    assert json.loads(body) == {"x": 1} and headers["lambda-runtime-aws-request-id"] == inv.request_id
    assert int(headers["lambda-runtime-deadline-ms"]) == inv.deadline_ms
    assert headers["lambda-runtime-invoked-function-arn"].endswith(":function:fn")
    assert headers["lambda-runtime-trace-id"].startswith("Root=1-")


def test_a_streamed_answer_is_live_and_its_trailer_error_ends_the_stream(api: RuntimeApiEmulator) -> None:
    inv = api.invoke({})
    conn = _conn(api)
    _next(conn)
    received: list[bytes] = []
    error: list[FunctionStreamError] = []

    def read() -> None:
        try:
            received.extend(inv.stream(timeout=10))
        except FunctionStreamError as exc:
            error.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    body = base64.b64encode(json.dumps({"errorType": "ValueError", "errorMessage": "late"}).encode()).decode()
    status = _post_chunked(conn, f"{BASE}/invocation/{inv.request_id}/response",
                           [b'{"statusCode": 200}' + b"\x00" * 4, b"\x00" * 4 + b"ab", b"cd"],
                           f"Lambda-Runtime-Function-Error-Type: ValueError\r\n"
                           f"Lambda-Runtime-Function-Error-Body: {body}\r\n")
    reader.join(10)
    assert status == 202 and inv.mode == "streamed"
    assert b"".join(received) == b'{"statusCode": 200}' + b"\x00" * 8 + b"abcd"
    assert error and error[0].error_code == "ValueError" and error[0].details == "late"
    prelude, chunks = inv.http_integration()  # the delimiter split across two chunks
    assert prelude == {"statusCode": 200} and [c for _, c in chunks] == [b"ab", b"cd"]


def test_errors_and_bad_requests(api: RuntimeApiEmulator) -> None:
    inv = api.invoke({})
    conn = _conn(api)
    _next(conn)
    conn.request("POST", f"{BASE}/invocation/{inv.request_id}/error", body=b'{"errorMessage": "no"}',
                 headers={"Lambda-Runtime-Function-Error-Type": "Custom.Error"})
    assert conn.getresponse().read() and inv.error == {"errorMessage": "no", "errorType": "Custom.Error"}
    with pytest.raises(FunctionStreamError, match=r"Custom\.Error: no"):
        list(inv.stream(timeout=1))
    # answering twice, or an unknown id, is refused
    for path in (f"{BASE}/invocation/{inv.request_id}/response", f"{BASE}/invocation/nope/response"):
        conn.request("POST", path, body=b"{}")
        resp = conn.getresponse()
        assert resp.status == 400 and json.loads(resp.read())["errorType"] in ("InvalidStateTransition",
                                                                               "InvalidRequestID")
