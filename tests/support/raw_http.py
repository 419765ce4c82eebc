"""Raw HTTP/1.1 on a socket, for the tests of our HTTP servers' framing (the edge's, the local emulators').

Why: those tests send bytes that no HTTP client would (bad lengths, unknown methods, trickles) and read
the answer as bytes, so that a missing status line or a leftover body shows. One reader for all of them.
"""

from __future__ import annotations

import socket

Answer = tuple[int, dict[str, str], bytes]  # (status, lower-cased headers, body)


def read_response(s: socket.socket) -> Answer:
    """One response from an open connection; the connection stays usable (keep-alive)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a whole response head: {data[:200]!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 "), f"no HTTP/1.1 status line: {data[:200]!r}"
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def exchange(host: str, port: int, request: bytes, timeout_s: float = 10.0) -> Answer:
    """Send ``request`` on a new connection and read one response."""
    with socket.create_connection((host, port), timeout=timeout_s) as s:
        s.sendall(request)
        return read_response(s)
