"""An HTTP proxy in front of moto_server that misbehaves on demand, as S3 does on a bad day.

``mode`` (set at any time): ``"pass"`` forwards as is; ``"error"`` answers 503 SlowDown (S3's own XML) to
every request; ``"hang"`` reads the request and answers nothing for ``hang_s``; ``"cut"`` forwards, sends the
answer's headers and half its body, then drops the connection (a stream cut mid-object). Only requests whose
path contains ``only`` are disturbed (the model's objects, not the manifest), and ``requests`` counts them.
"""

from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


class FaultProxy:
    def __init__(self, upstream: str, only: str = "") -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.mode = "pass"
        self.only = only
        self.hang_s = 30.0
        self.requests = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            disturbed = proxy.mode != "pass" and proxy.only in self.path
            if disturbed:
                proxy.requests += 1
            if disturbed and proxy.mode == "error":
                self._send(503, {"Content-Type": "application/xml"}, SLOW_DOWN)
                return
            if disturbed and proxy.mode == "hang":
                time.sleep(proxy.hang_s)
                self.close_connection = True
                return
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=30)
            try:
                conn.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
                resp = conn.getresponse()
                data = resp.read()
                headers = {k: v for k, v in resp.getheaders() if k.lower() not in ("transfer-encoding", "connection")}
            finally:
                conn.close()
            if disturbed and proxy.mode == "cut" and len(data) > 1:
                self.send_response(resp.status)
                for k, v in headers.items():
                    if k.lower() != "content-length":
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self._send(resp.status, headers, data)

        def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
            self.send_response(status)
            for k, v in headers.items():
                if k.lower() != "content-length":
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

    return Handler
