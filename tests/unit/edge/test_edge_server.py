"""The edge HTTP server: the cloud's protocol (same codec, errors, limits) on a device, plus health and metrics."""

from __future__ import annotations

import dataclasses
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.support.edge import EDGE, synced_edge
from tests.support.fakes import json_body, rows_of, write_linear
from tests.support.make_events import http_event
from tests.support.raw_http import exchange, read_response, trickle
from tierserve.api import handle_http
from tierserve.app import build_runtime
from tierserve.client import Client
from tierserve.edge.runtime import EdgeRuntime
from tierserve.protocol.http_api import decode_body
from tierserve.settings import Settings

LIMIT = 64 * 1024


@pytest.fixture
def edge(store_dir: Path, tmp_path: Path) -> Iterator[EdgeRuntime]:
    with synced_edge(LIMIT, store_uri=str(store_dir), cache_dir=str(tmp_path / "cache"), port=0,
                     grpc_port=-1) as rt:
        yield rt


def raw(url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read one response (status, lower-cased headers, body)."""
    host, port = url.removeprefix("http://").split(":")
    return exchange(host, int(port), request)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_infers_at_the_edge(edge: EdgeRuntime, store_dir: Path, binary: bool) -> None:
    import tritonclient.http as httpclient

    _, w, b = write_linear(store_dir, "lin", "1", seed=1, targets=EDGE)  # the same bytes: (W, b) of v1
    x = rows_of(4)
    inp = httpclient.InferInput("x", [4, 4], "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    result = Client(edge.url).infer("lin", [inp], [httpclient.InferRequestedOutput("y", binary_data=binary)])
    np.testing.assert_allclose(result.as_numpy("y"), x @ w + b, rtol=1e-5, atol=1e-5)
    assert result.served_by == "edge"
    # tritonclient's own client works unchanged too
    client = httpclient.InferenceServerClient(edge.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("lin")
    assert client.get_model_metadata("lin")["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    out = client.infer("lin", [inp]).as_numpy("y")
    np.testing.assert_allclose(out, x @ w + b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("path", "body"), [
    ("/v2/models/lin/infer", b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 5], "data": [1,2,3,4,5]}]}'),
    ("/v2/models/lin/infer", b"not json"),
    ("/v2/models/nosuch/infer", b"{}"),
    ("/v2/models/lin/versions/9/infer", b"{}"),
    ("/v3/anything", b""),
])
def test_errors_are_the_clouds_errors(edge: EdgeRuntime, store_dir: Path, tmp_path: Path, path: str,
                                      body: bytes) -> None:
    # Given the same request to the device and to RouterFunction's handler over the same store
    at_edge = Client(edge.url).request("POST", path, body, {"Content-Type": "application/json"})
    cloud_rt = build_runtime(Settings(model_store_uri=str(store_dir), model_cache_dir=str(tmp_path / "c2")))
    event = http_event("POST", path, "$default", body.decode(), {}, {"content-type": "application/json"})
    in_cloud = handle_http(event, None, runtime=cloud_rt)
    # Then the status, code and message are the same; only x-served-by says where it was answered
    assert at_edge.status == in_cloud["statusCode"] and at_edge.status >= 400
    assert at_edge.json() == json.loads(decode_body(in_cloud))
    assert at_edge.served_by == "edge"


def test_limits_and_bad_http_get_the_protocols_json(edge: EdgeRuntime) -> None:
    # A body over MAX_PAYLOAD_BYTES: 413 from its Content-Length, before a byte of it is read
    status, headers, body = raw(edge.url, b"POST /v2/models/lin/infer HTTP/1.1\r\nHost: x\r\nContent-Length: "
                                + str(LIMIT + 1).encode() + b"\r\n\r\n")
    assert status == 413 and json.loads(body)["code"] == "payload_too_large" and headers["x-served-by"] == "edge"
    status, _, body = raw(edge.url, b"POST /v2/models/lin/infer HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
    assert status == 400 and "Content-Length" in json.loads(body)["error"]
    # a chunked body is decoded (issue 16: h11 frames it), and held to the same limit as it arrives
    doc = json_body(rows_of(1))
    status, _, body = raw(edge.url, b"POST /v2/models/lin/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                          b"\r\n" + f"{len(doc):x}".encode() + b"\r\n" + doc + b"\r\n0\r\n\r\n")
    assert status == 200 and json.loads(body)["outputs"][0]["name"] == "y"
    chunk = b"f000\r\n" + b"a" * 0xF000 + b"\r\n"
    status, _, body = raw(edge.url, b"POST /v2/models/lin/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                          b"\r\n" + chunk * 2 + b"0\r\n\r\n")
    assert status == 413 and json.loads(body)["code"] == "payload_too_large"
    status, _, body = raw(edge.url, b"TRACE /v2 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 405 and json.loads(body)["code"] == "method_not_allowed"


def test_health_and_metrics_report_sync_versions_and_counts(edge: EdgeRuntime) -> None:
    client = Client(edge.url)
    assert client.request("POST", "/v2/models/lin/infer", json_body(rows_of(1))).status == 200
    assert client.request("POST", "/v2/models/gpu-only/infer", json_body(rows_of(1))).status == 503
    health = client.request("GET", "/v2/health/edge").json()
    assert health["sync"]["state"] == "ok" and health["sync"]["syncs"] == 1
    assert [(m["name"], m["version"], m["role"], m["loaded"]) for m in health["models"]] == [
        ("lin", "1", "default", True)]
    assert health["counts"]["lin"] == {"edge": 1} and health["cloud"] == {"url": None, "circuit": "none"}
    text = client.request("GET", "/metrics").body.decode()
    assert 'tierserve_edge_inferences_total{model="lin",version="1"} 1' in text
    assert 'tierserve_edge_requests_total{model="gpu-only",served_by="edge",protocol="http",status="503"} 1' in text
    assert 'tierserve_edge_model_held{model="lin",version="1"' in text and "tierserve_edge_syncs_total 1" in text
    assert client.request("GET", "/v2/health/ready").served_by == "edge"


# --- issue 16: defects 2, 4, 12 and 13 at the edge ------------------------------------------------------------------


@pytest.fixture
def quick_edge(store_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[EdgeRuntime]:
    """The edge with short deadlines (header 0.5 s, body 0.5 s) so that slow clients are cut in a test's time."""
    import tierserve.edge.server as server

    monkeypatch.setattr(server, "READ_TIMEOUT_S", 0.5, raising=False)  # the server before issue 16
    if hasattr(server, "LIMITS"):
        monkeypatch.setattr(server, "LIMITS", dataclasses.replace(server.LIMITS, header_timeout_s=0.5,
                                                                   body_timeout_s=0.5))
    with synced_edge(LIMIT, store_uri=str(store_dir), cache_dir=str(tmp_path / "cache"), port=0,
                     grpc_port=-1) as rt:
        yield rt


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def test_defect_2_a_post_without_a_body_or_a_length_is_served(edge: EdgeRuntime) -> None:
    status, _, body = raw(edge.url, b"POST /v2/repository/index HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200 and "lin" in [m["name"] for m in json.loads(body)]


def test_defect_4_an_unknown_method_with_a_body_gets_405_with_allow_and_the_connection_stays_usable(
        edge: EdgeRuntime) -> None:
    with connect(edge.url) as s:
        s.sendall(b"QUERY /v2/models/lin/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b'Content-Length: 13\r\n\r\n{"inputs": 1}')
        status, headers, body = read_response(s)
        assert (status, headers.get("allow"), json.loads(body)["code"]) == (405, "POST", "method_not_allowed")
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(s)[0] == 200
    status, headers, _ = raw(edge.url, b"GET /v2/models/lin/infer HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (status, headers.get("allow")) == (405, "POST")


@pytest.mark.parametrize(("head", "rest"), [
    (b"GET /v2/health/live HTTP/1.1\r\n", b"X-Slow: " + b"a" * 100),
    (b"POST /v2/models/lin/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n", b"a" * 100),
], ids=["headers", "body"])
def test_defect_12_a_trickle_is_cut_at_its_deadline(quick_edge: EdgeRuntime, head: bytes, rest: bytes) -> None:
    host, port = quick_edge.url.removeprefix("http://").split(":")
    status, took = trickle(host, int(port), head, rest, every_s=0.1, wait_s=10)
    assert status == 408 and 0.5 <= took < 1.5, took


@pytest.mark.parametrize(("request_bytes", "statuses"), [
    (b"POST /v2/models/lin/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc", {408}),
    (b"POST /v2/models/lin/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", {400}),
    (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", {414}),
    (b"GET /v2/health/live\r\n", {400, 505}),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", {400, 505}),
    (b"GET /v2/health/live HTTP/9.9\r\nHost: x\r\n\r\n", {505}),
], ids=["length-over-body", "two-lengths", "line-over-64k", "http-0.9", "http2-preface", "http-9.9"])
def test_defect_13_bad_framing_gets_a_status_line_and_the_protocols_json(quick_edge: EdgeRuntime,
                                                                         request_bytes: bytes,
                                                                         statuses: set[int]) -> None:
    t0 = time.monotonic()
    with connect(quick_edge.url) as s:
        s.sendall(request_bytes)
        status, headers, body = read_response(s)
    assert status in statuses and json.loads(body)["code"] and headers["x-served-by"] == "edge"
    assert time.monotonic() - t0 < 1.5
