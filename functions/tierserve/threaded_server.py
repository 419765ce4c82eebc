"""An ``http.server`` served on a daemon thread: the one start/stop that every server of ours shares.

Why a module of its own: the edge device's HTTP server ships (``tierserve[edge]``), while the local
emulation's servers (API Gateway, the Lambda Invoke API, the SageMaker runtime) must never be imported by
shipped code. Both need the same few things done the same way: a thread per connection with daemon threads
and a real listen backlog, the bound address read back after binding port 0, a ``stop()`` that is safe to
call twice and closes the socket even when the server never started. Stdlib only, so importing it costs
nothing on a cold start.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


class Server(ThreadingHTTPServer):
    """A thread per connection, daemon threads, and a real listen backlog (socketserver's default is 5:
    a burst of connections, perf_analyzer's at concurrency 16 for one, would be reset)."""

    daemon_threads = True
    request_queue_size = 128
    allow_reuse_address = True


class ThreadedServer:
    """Mixin: ``host``, ``port`` and ``url`` (the bound address once bound, else the configured one),
    ``start()``, ``stop()`` and the context manager. Subclasses set ``self.host``/``self.port`` (the
    address to bind; port 0 = any free port) and implement ``request_handler()``; they may call ``bind()`` early
    (in ``__init__``) to know their port before ``start()``."""

    thread_name = "http"
    poll_interval_s = 0.5
    _server: Server | None = None
    _thread: threading.Thread | None = None
    _address: tuple[str, int] = ("127.0.0.1", 0)

    def request_handler(self) -> type[BaseHTTPRequestHandler]:  # pragma: no cover - subclasses implement it
        raise NotImplementedError

    @property
    def host(self) -> str:
        return str(self._server.server_address[0]) if self._server is not None else self._address[0]

    @host.setter
    def host(self, value: str) -> None:
        self._address = (value, self._address[1])

    @property
    def port(self) -> int:
        return int(self._server.server_address[1]) if self._server is not None else self._address[1]

    @port.setter
    def port(self, value: int) -> None:
        self._address = (self._address[0], int(value))

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def bind(self) -> Server:
        if self._server is None:
            self._server = Server(self._address, self.request_handler())
        return self._server

    def start(self) -> Self:
        server = self.bind()
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": self.poll_interval_s},
                                        name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (twice is fine; so is a server that never started)."""
        server, thread = self._server, self._thread
        if server is None:
            return
        if thread is not None:
            server.shutdown()
            thread.join(timeout=5)
        server.server_close()
        self._address = (self.host, self.port)  # a restart binds the same port
        self._server, self._thread = None, None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
