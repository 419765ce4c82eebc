"""httpserver.py: the HTTP/1.1 server under the edge and the local emulators (issue 16): streamed answers
flushed chunk by chunk, a client gone seen within a second, never compressed; the server's own errors."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tierserve.httpserver import HttpServer, Limits, Request, Response


class Streams(HttpServer):
    """GET /stream: a chunk whenever ``release`` is set; records when it stopped (the client gone)."""

    thread_name = "test-stream"

    def __init__(self) -> None:
        self.host, self.port = "127.0.0.1", 0
        self.limits = Limits(header_timeout_s=1, body_timeout_s=1, workers=4)
        self.release = threading.Event()
        self.gone_at: float | None = None
        self.closed = threading.Event()

    def handle(self, request: Request) -> Response:
        if request.path == "/boom":
            raise RuntimeError("a bug")
        if request.path == "/wait":  # a long computation that checks for the client going away
            t0 = time.monotonic()
            request.disconnected.wait(5)
            self.gone_at = time.monotonic() - t0
            self.closed.set()
            return Response(200, [], b"late")
        if request.path != "/stream":
            return Response(200, [("content-type", "text/plain")], b"plain")

        def events() -> Iterator[bytes]:
            try:
                n = 0
                while not request.disconnected.is_set():
                    if self.release.wait(0.05):
                        self.release.clear()
                        n += 1
                        yield f"data: {n}\n\n".encode()
            finally:  # the flag seen, or the iterator closed by the server (GeneratorExit at the yield)
                self.gone_at = time.monotonic()
                self.closed.set()

        return Response(200, [("content-type", "text/event-stream")], events())


@pytest.fixture
def server() -> Iterator[Streams]:
    with Streams() as s:
        yield s


def test_a_streamed_answer_is_chunked_and_each_chunk_is_flushed_uncompressed(server: Streams) -> None:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    conn.request("GET", "/stream", headers={"Accept-Encoding": "gzip"})
    resp = conn.getresponse()
    assert resp.getheader("transfer-encoding") == "chunked" and resp.getheader("content-encoding") is None
    assert resp.getheader("content-type") == "text/event-stream"
    for n in (1, 2, 3):  # each chunk arrives before the next one is even produced
        server.release.set()
        assert resp.read1() == f"data: {n}\n\n".encode()
    conn.close()


def test_a_client_that_goes_away_is_seen_within_a_second_and_the_stream_is_closed(server: Streams) -> None:
    s = socket.create_connection((server.host, server.port), timeout=5)
    s.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    server.release.set()
    data = b""
    while b"data: 1" not in data:
        data += s.recv(4096)
    gone = time.monotonic()
    s.close()
    assert server.closed.wait(2)
    assert server.gone_at is not None and server.gone_at - gone < 1.0


def test_a_handler_that_computes_sees_its_client_go_away_within_a_second(server: Streams) -> None:
    s = socket.create_connection((server.host, server.port), timeout=5)
    s.sendall(b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.2)
    s.close()
    assert server.closed.wait(3)
    assert server.gone_at is not None and server.gone_at < 0.2 + 1.0


def test_a_handler_that_raises_is_a_500_in_json_and_the_server_goes_on(server: Streams) -> None:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    conn.request("GET", "/boom")
    resp = conn.getresponse()
    assert resp.status == 500 and b"Traceback" not in resp.read()
    conn.request("HEAD", "/plain")  # keep-alive: the same connection serves on; HEAD has no body
    resp = conn.getresponse()
    assert (resp.status, resp.getheader("content-length"), resp.read()) == (200, "5", b"")
    conn.close()


def test_expect_100_continue_and_pipelined_requests(server: Streams) -> None:
    with socket.create_connection((server.host, server.port), timeout=5) as s:
        s.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 100 ")
        s.sendall(b"{}GET /y HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while data.count(b"\r\n\r\nplain") < 2:
            data += s.recv(4096)
        assert data.count(b"HTTP/1.1 200 ") == 2


def get(url: str) -> bytes:
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=5)
    try:
        conn.request("GET", "/plain")
        return conn.getresponse().read()
    finally:
        conn.close()


def test_port_0_binds_a_free_port_serves_and_stops_twice_without_error() -> None:
    # Given a server configured on port 0
    server = Streams()
    assert server.port == 0
    # When it starts, its url names the bound port and it serves
    with server:
        assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}"
        assert get(server.url) == b"plain"
        port = server.port
    # Then it is stopped (a second stop is fine) and a restart binds the same port
    server.stop()
    with server:
        assert server.port == port and get(server.url) == b"plain"


def test_a_server_bound_but_never_started_is_closed_by_stop() -> None:
    server = Streams()
    server.bind()
    port = server.port
    server.stop()
    rebound = Streams()
    rebound.port = port
    with rebound:  # the port was released
        assert get(rebound.url) == b"plain"


def test_stop_cuts_keep_alive_connections() -> None:
    server = Streams().start()
    s = socket.create_connection((server.host, server.port), timeout=5)
    s.sendall(b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n")
    assert s.recv(4096).startswith(b"HTTP/1.1 200 ")
    server.stop()
    assert s.recv(4096) == b""  # a stopped server answers nothing more on an open connection
    s.close()
