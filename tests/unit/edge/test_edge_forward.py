"""CloudBackend: the client's body, untouched, to the cloud gateway; its answer back as it came."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.support.fakes import client_request, model_version, rows_of
from tierserve.client import Bearer, Client
from tierserve.edge.forward import CloudBackend
from tierserve.errors import BackendUnavailableError
from tierserve.protocol.calls import Body, InferenceCall


class Gateway:
    """A stand-in gateway: records requests and answers what ``reply`` says."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str], bytes]] = []
        self.reply: tuple[int, dict[str, str], bytes] = (200, {"content-type": "application/json"}, b"{}")


@pytest.fixture
def gateway() -> Iterator[tuple[str, Gateway]]:
    gw = Gateway()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            gw.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            status, headers, out = gw.reply
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        do_GET = do_POST

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", gw
    finally:
        server.shutdown()
        server.server_close()


def test_the_body_goes_as_it_came_with_the_version_pinned_and_the_devices_own_auth(gateway) -> None:
    url, gw = gateway
    body, length = client_request({"x": rows_of(2)}, binary=True)
    call = InferenceCall.from_body(Body(body, length))
    gw.reply = (200, {"content-type": "application/octet-stream", "inference-header-content-length": "3",
                      "x-served-by": "gpu", "apigw-requestid": "abc"}, b"{}\x00\x01\x02")
    reply, served_by = CloudBackend(Client(url, auth=Bearer("device.jwt"))).forward(
        model_version("m", version="7"), call, "gpu", 5.0)
    path, headers, got = gw.seen[-1]
    # Then the bytes are the client's, the header length and hint travel, the version is pinned
    assert got == body and path == "/v2/models/m/versions/7/infer"
    assert headers["inference-header-content-length"] == str(length) and headers["x-target"] == "gpu"
    assert headers["authorization"] == "Bearer device.jwt"
    # And the answer comes back as it was (binary as base64, as an HTTP API response), with the tier that served it
    assert served_by == "gpu" and reply.http["statusCode"] == 200 and reply.http["isBase64Encoded"]
    assert base64.b64decode(reply.http["body"]) == b"{}\x00\x01\x02"
    assert "apigw-requestid" not in reply.http["headers"]


def test_error_answers_pass_through_but_a_refused_device_is_the_links_failure(gateway) -> None:
    url, gw = gateway
    cloud = CloudBackend(Client(url))
    call = InferenceCall.from_body(Body(b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}'))
    gw.reply = (503, {"content-type": "application/json", "retry-after": "7", "x-served-by": "cpu"},
                b'{"error": "gpu down", "code": "backend_unavailable"}')
    reply, _ = cloud.forward(model_version(), call, None, 5.0)
    assert reply.http["statusCode"] == 503 and reply.http["headers"]["retry-after"] == "7"
    gw.reply = (403, {"content-type": "application/json"}, b'{"message": "Forbidden"}')
    with pytest.raises(BackendUnavailableError, match=r"refused this device's credentials.*Forbidden"):
        cloud.forward(model_version(), call, None, 5.0)


def test_ready_is_the_gateways_and_never_raises(gateway) -> None:
    url, gw = gateway
    gw.reply = (200, {}, b"{}")
    assert CloudBackend(Client(url)).ready(model_version("m", version="2"))
    assert gw.seen[-1][0] == "/v2/models/m/versions/2/ready"
    assert not CloudBackend(Client("http://127.0.0.1:9")).ready()
