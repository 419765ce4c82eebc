"""Raw HTTP/1.1 on a socket, for the tests of our HTTP servers' framing (the edge's, the local emulators').

Why: those tests send bytes that no HTTP client would (bad lengths, unknown methods, trickles) and read
the answer as bytes, so that a missing status line or a leftover body shows. One reader and one trickling
client for all of them.
"""

from __future__ import annotations

import socket
import time

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


def trickle(host: str, port: int, head: bytes, rest: bytes, every_s: float = 0.1,
            wait_s: float = 20.0) -> tuple[int, float]:
    """Send ``head`` at once, then ``rest`` one byte every ``every_s`` until the server answers or closes;
    (the status answered, seconds it took)."""
    t0 = time.monotonic()
    with socket.create_connection((host, port), timeout=wait_s) as s:
        s.sendall(head)
        s.settimeout(every_s)  # the wait for an answer after each byte paces the trickle
        answer = b""
        for i in range(len(rest)):
            try:
                s.send(rest[i:i + 1])
                answer = s.recv(65536)
                break
            except TimeoutError:
                continue
            except OSError:  # the server closed while we were sending
                break
        s.settimeout(wait_s)
        while b"\r\n" not in answer:
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 "), f"no HTTP/1.1 status line: {answer[:100]!r}"
    return int(answer.split(b" ", 2)[1]), time.monotonic() - t0
