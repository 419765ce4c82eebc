"""threaded_server.py: the start/stop every server of ours shares (the edge's, and the emulators')."""

from __future__ import annotations

import urllib.request
from http.server import BaseHTTPRequestHandler

from tierserve.threaded_server import ThreadedServer


class Hello(ThreadedServer):
    thread_name = "test-hello"

    def __init__(self) -> None:
        self.host, self.port = "127.0.0.1", 0

    def request_handler(self) -> type[BaseHTTPRequestHandler]:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"hi")

            def log_message(self, *args: object) -> None:
                pass

        return Handler


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as r:
        return bytes(r.read())


def test_port_0_binds_a_free_port_serves_and_stops_twice_without_error() -> None:
    # Given a server configured on port 0
    server = Hello()
    assert server.port == 0
    # When it starts, its url names the bound port and it serves
    with server:
        assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}"
        assert get(server.url) == b"hi"
        port = server.port
    # Then it is stopped (a second stop is fine) and a restart binds the same port
    server.stop()
    with server:
        assert server.port == port and get(server.url) == b"hi"


def test_a_server_bound_but_never_started_is_closed_by_stop() -> None:
    server = Hello()
    server.bind()
    port = server.port
    server.stop()
    rebound = Hello()
    rebound.port = port
    with rebound:  # the port was released
        assert get(rebound.url) == b"hi"
