"""Issue 16's defects 11-13 against `tierserve serve`'s API and a real edge device server: hostile numbers and
strings (11) and bad HTTP framing (13) never get a 5xx or a reply without a status line, and slow clients
(12) are cut at their deadlines (within 1 s of the limit) without a thread each.

Quick (`make test`): the deadlines are shortened on the running servers (header 2 s, body 3 s), 50 held
connections. Full (`make test-hardening`): the real limits (header 10 s, body 30 s), each trickle and each
short body in parallel, 300 held connections.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.hardening.conftest import FIGURES, FULL, scale
from tests.support import raw_http
from tierserve.httpserver import Limits

REAL = Limits()
QUICK = dataclasses.replace(REAL, header_timeout_s=2.0, body_timeout_s=3.0)
LIN = '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [%s, 1, 2, 3]}]%s}'


@dataclasses.dataclass
class Target:
    name: str
    host: str
    port: int
    model: str  # a model served there with one FP32 input x [-1, 4]
    server: Any  # its HttpServer (limits read per request)


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tests.support.edge import synced_edge, write_edge_store

    root = write_edge_store(tmp_path_factory.mktemp("edge-store"))
    with synced_edge(1 << 20, store_uri=str(root), cache_dir=str(tmp_path_factory.mktemp("edge-cache")), port=0,
                     grpc_port=-1) as rt:
        yield rt


@pytest.fixture(params=["gateway", "edge"])
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    if request.param == "gateway":
        stack = request.getfixturevalue("stack")
        server, model = stack.api, "lin"  # x [-1, 4] FP32 -> y; 1 row is served on the CPU tier
    else:
        server, model = request.getfixturevalue("edge").http, "lin"
    real = server.limits
    if not FULL:  # read per request: shorter deadlines for the quick run, restored after it
        server.limits = dataclasses.replace(real, header_timeout_s=QUICK.header_timeout_s,
                                            body_timeout_s=QUICK.body_timeout_s)
    try:
        yield Target(request.param, server.host, server.port, model, server)
    finally:
        server.limits = real


def send(t: Target, raw: bytes, timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    return raw_http.exchange(t.host, t.port, raw, timeout)


def post(t: Target, body: str) -> bytes:
    data = body.encode("utf-8", "surrogatepass")
    return (f"POST /v2/models/{t.model}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


def hostile(t: Target) -> dict[str, tuple[bytes, set[int]]]:
    """name -> (raw request, the statuses allowed)."""
    infer = f"/v2/models/{t.model}/infer".encode()
    return {
        "d11-integer-over-float64": (post(t, LIN % ("1" + "0" * 400, "")), {400}),
        "d11-lone-surrogate-id": (post(t, LIN % ("0", ', "id": "\\udfff"')), {200, 400}),
        "d11-1e400": (post(t, LIN % ("1e400", "")), {400}),
        "d13-two-lengths": (b"POST " + infer + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2"
                            b"\r\n\r\nab", {400}),
        "d13-length-and-chunked": (b"POST " + infer + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                                   b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", {400}),
        "d13-line-over-64k": (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", {414}),
        "d13-headers-over-128k": (b"GET /v2 HTTP/1.1\r\nHost: x\r\n" + b"X-A: " + b"a" * 140_000 + b"\r\n\r\n",
                                 {431}),
        "d13-http-0.9": (b"GET /v2/health/live\r\n", {400, 505}),
        "d13-http2-preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", {400, 505}),
        "d13-http-9.9": (b"GET /v2/health/live HTTP/9.9\r\nHost: x\r\n\r\n", {505}),
        "d13-garbage": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", {400}),
        "d13-bad-chunk": (b"POST " + infer + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                          {400}),
        "d4-query-with-body": (b"QUERY " + infer + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", {405}),
        "d2-post-without-body": (b"POST /v2/repository/index HTTP/1.1\r\nHost: x\r\n\r\n", {200}),
    }


def test_hostile_values_and_bad_framing_never_get_a_5xx(target: Target, capfd: pytest.CaptureFixture[str]) -> None:
    statuses: dict[str, int] = {}
    for name, (raw, allowed) in hostile(target).items():
        status, _, body = send(target, raw)
        statuses[name] = status
        assert status in allowed, (name, status, body[:300])
        assert "Traceback" not in body.decode("utf-8", "replace")
        if status != 200:
            assert json.loads(body), name
    # the server goes on serving, and nothing went to stderr as a traceback
    assert send(target, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")[0] == 200
    assert "Traceback" not in capfd.readouterr().err
    FIGURES[f"issue 16 hostile HTTP ({target.name})"] = {"cases": len(statuses), "5xx": 0, "statuses": statuses}


def trickle(t: Target, head: bytes, rest: bytes, every_s: float) -> tuple[int, float]:
    """``head`` at once, then ``rest`` a byte every ``every_s`` (empty: send nothing more): (status, seconds)."""
    return raw_http.trickle(t.host, t.port, head, rest, every_s, wait_s=120)


def test_slow_clients_are_cut_at_their_deadlines_within_a_second(target: Target) -> None:
    limits = target.server.limits
    infer = f"POST /v2/models/{target.model}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n".encode()
    cases = {  # name -> (head, trickled bytes, the deadline it must hit)
        "header-trickle": (b"GET /v2/health/live HTTP/1.1\r\n", b"X-Slow: " + b"a" * 1000, limits.header_timeout_s),
        "body-trickle": (infer, b"1" * 1000, limits.body_timeout_s),
        "length-over-body": (infer + b"{}", b"", limits.body_timeout_s),
    }
    took: dict[str, tuple[int, float]] = {}

    def run(name: str) -> None:
        head, rest, _ = cases[name]
        took[name] = trickle(target, head, rest, 0.5)

    threads = [threading.Thread(target=run, args=(name,)) for name in cases]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    FIGURES[f"issue 16 slow clients ({target.name})"] = {
        name: {"status": took[name][0], "seconds": round(took[name][1], 2), "limit_s": cases[name][2]}
        for name in cases}
    for name, (_, _, limit) in cases.items():
        status, seconds = took[name]
        assert status == 408 and limit <= seconds < limit + 1.0, (name, status, seconds, limit)


def test_the_served_limits_are_the_real_ones(stack: Any) -> None:
    """What `tierserve serve` and `tierserve edge` run with (the quick run shortens them only while it runs)."""
    from tierserve.edge.server import LIMITS

    for server in (stack.api, stack.lambda_endpoint):
        assert (server.limits.header_timeout_s, server.limits.body_timeout_s) == (10.0, 30.0)

    assert (LIMITS.header_timeout_s, LIMITS.body_timeout_s) == (10.0, 30.0)
    assert (stack.api.limits.max_connections, LIMITS.max_connections) == (REAL.max_connections,) * 2


def test_held_connections_cost_no_thread_and_the_server_goes_on(target: Target) -> None:
    n = scale(50, 300)
    assert n < target.server.limits.max_connections
    before = threading.active_count()
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection((target.host, target.port), timeout=10)
            s.sendall(b"GET /v2/health/live HTTP/1.1\r\nX-Slow: a")
            socks.append(s)
        time.sleep(0.5)
        grown = threading.active_count() - before
        t0 = time.monotonic()
        status = send(target, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")[0]
        served_ms = (time.monotonic() - t0) * 1e3
    finally:
        for s in socks:
            s.close()
    FIGURES[f"issue 16 held connections ({target.name})"] = {"connections": n, "threads_grown": grown,
                                                             "live_ms_meanwhile": round(served_ms, 1)}
    assert status == 200 and grown <= 4, (status, grown)
