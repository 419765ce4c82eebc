"""The local API Gateway's streaming REST API (tierserve_tools.apigw): REST (payload 1.0) events to a router
running the real streaming runtime loop (tierserve_tools.lambda_endpoint), its answer relayed chunk by chunk,
with the REST API's limits; a client that goes away closes the router's stream."""

from __future__ import annotations

import http.client
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tierserve_tools.apigw import REST_ROUTES, ApiGatewayServer, rest_api_event, rest_route
from tierserve_tools.lambda_endpoint import LocalFunction

#: The keys of `sam local generate-event apigateway aws-proxy` (SAM CLI 1.170), the REST API's event.
SAM_EVENT_KEYS = {"body", "headers", "httpMethod", "isBase64Encoded", "multiValueHeaders",
                  "multiValueQueryStringParameters", "path", "pathParameters", "queryStringParameters",
                  "requestContext", "resource", "stageVariables"}
SAM_CONTEXT_KEYS = {"accountId", "apiId", "httpMethod", "identity", "path", "protocol", "requestId", "requestTime",
                    "requestTimeEpoch", "resourceId", "resourcePath", "stage"}


def test_a_rest_event_has_the_shape_sam_generates_with_the_routes_resource_and_parameters() -> None:
    route = rest_route("POST", "/v2/models/tiny/versions/3/generate_stream")
    assert route == ("/v2/models/{model}/versions/{version}/generate_stream", {"model": "tiny", "version": "3"})
    event = rest_api_event("POST", "/v2/models/tiny/versions/3/generate_stream?a=1&a=2",
                           [("content-type", "application/json"), ("x-k", "1"), ("x-k", "2")], b'{"x": 1}', *route)
    assert set(event) == SAM_EVENT_KEYS and set(event["requestContext"]) >= SAM_CONTEXT_KEYS
    assert event["httpMethod"] == "POST" and event["path"] == "/v2/models/tiny/versions/3/generate_stream"
    assert event["requestContext"]["path"] == "/api/v2/models/tiny/versions/3/generate_stream"
    assert event["headers"]["x-k"] == "2" and event["multiValueHeaders"]["x-k"] == ["1", "2"]
    assert event["queryStringParameters"] == {"a": "2"}
    assert event["multiValueQueryStringParameters"] == {"a": ["1", "2"]}
    assert event["body"] == '{"x": 1}' and event["isBase64Encoded"] is False and "version" not in event
    # every StreamingApi route is one; the OIP routes are not (they stay on the HTTP API)
    assert rest_route("GET", "/v1/models") == ("/v1/models", {}) and len(REST_ROUTES) == 8
    assert rest_route("POST", "/v2/models/tiny/infer") is None and rest_route("GET", "/v1/chat/completions") is None


@pytest.fixture
def api() -> Iterator[ApiGatewayServer]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    router = LocalFunction("RouterFunction", "tests.support.streaming_handlers.rest_stream", env, timeout_s=900,
                           max_workers=1)

    def buffered_http(event, context):
        return {"statusCode": 200, "body": "http api"}

    server = ApiGatewayServer(buffered_http, lambda: None, rest=router.stream).start()
    server.router = router  # type: ignore[attr-defined]
    yield server
    server.stop()
    router.close()


def _post(server: ApiGatewayServer, path: str, body: dict) -> tuple[http.client.HTTPConnection,
                                                                    http.client.HTTPResponse]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    conn.request("POST", path, json.dumps(body).encode(), {"content-type": "application/json"})
    return conn, conn.getresponse()


def _events(resp: http.client.HTTPResponse) -> Iterator[tuple[float, bytes]]:
    while True:
        line = resp.readline()
        if not line:
            return
        if line.startswith(b"data: "):
            yield time.time(), line[6:].strip()


def test_the_routers_stream_is_relayed_event_by_event_as_it_is_produced(api: ApiGatewayServer) -> None:
    # Given the router streaming 3 SSE events 0.3 s apart
    conn, resp = _post(api, "/v2/models/tiny/generate_stream", {"n": 3, "gap_s": 0.3})
    # Then the prelude's status and headers are the answer's, without its content encoding (REST streams none)
    assert resp.status == 200 and resp.getheader("content-type") == "text/event-stream"
    assert resp.getheader("content-encoding") is None and resp.getheader("transfer-encoding") == "chunked"
    got = list(_events(resp))
    conn.close()
    first = json.loads(got[0][1])
    # And the router got a REST event (format 1.0) for the route, with the REST API's 15 minutes
    assert first["resource"] == "/v2/models/{model}/generate_stream" and first["params"] == {"model": "tiny"}
    assert first["method"] == "POST" and first["version"] is None and first["remaining_ms"] > 890_000
    # And each event arrived as the router produced it, not at the end
    ticks = [(at, json.loads(data)) for at, data in got[1:-1]]
    assert [t["i"] for _, t in ticks] == [0, 1, 2] and got[-1][1] == b"[DONE]"
    for arrived, tick in ticks:
        assert 0 <= arrived - tick["t"] < 0.2


def test_a_buffered_router_answer_passes_through_whole(api: ApiGatewayServer) -> None:
    conn, resp = _post(api, "/v1/chat/completions", {"buffered": True})
    assert resp.status == 201 and resp.getheader("x-kind") == "buffered"
    assert json.loads(resp.read()) == {"resource": "/v1/chat/completions"}
    conn.close()
    # and an OIP route stays on the HTTP API
    conn = http.client.HTTPConnection(api.host, api.port, timeout=10)
    conn.request("GET", "/v2/health/ready")
    assert conn.getresponse().read() == b"http api"
    conn.close()


def test_a_client_that_goes_away_closes_the_routers_stream_within_a_chunk(api: ApiGatewayServer,
                                                                           tmp_path: Path) -> None:
    marker = tmp_path / "closed"
    conn, resp = _post(api, "/v1/completions", {"n": 1000, "gap_s": 0.05, "marker": str(marker)})
    events = _events(resp)
    for _ in range(3):
        next(events)
    # When the client goes away
    conn.sock.close()  # type: ignore[union-attr]
    conn.close()
    # Then the router's stream is closed (its close ran: the generation it relays is cancelled) within a second
    deadline = time.monotonic() + 2.0
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists()


def test_the_rest_apis_idle_limit_ends_a_silent_stream(api: ApiGatewayServer, tmp_path: Path) -> None:
    api.rest_idle_s = 0.5
    marker = tmp_path / "closed"
    conn, resp = _post(api, "/v1/completions", {"n": 3, "gap_s": 1.0, "marker": str(marker)})
    started = time.monotonic()
    got = list(_events(resp))
    conn.close()
    # the first event came, then 0.5 s of silence ended the stream (the status was out: it just ends)
    assert len(got) == 1 and time.monotonic() - started < 0.9
    deadline = time.monotonic() + 3.0
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists()
