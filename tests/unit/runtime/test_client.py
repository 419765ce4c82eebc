"""tierserve.client: SigV4 and bearer auth on real HTTP, tritonclient's objects against the real API handler.

The signatures botocore makes are checked by the local gateway's independent verifier
(``tierserve_tools.sigv4``), so a signing mistake and a verification mistake cannot cancel out.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from tests.support.fakes import rows_of, write_linear
from tierserve import errors
from tierserve.api import handle_http
from tierserve.app import build_runtime
from tierserve.client import ApiError, Bearer, Client, NoAuth, SigV4, auth_from
from tierserve.settings import Settings
from tierserve_tools.apigw import ApiGatewayServer
from tierserve_tools.sigv4 import MISMATCH, SignatureError, iam_authorizer, verify

KEY, SECRET = "AKIDLOCAL", "local-secret"


class Captured:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []


@pytest.fixture
def echo_server() -> Iterator[tuple[str, Captured]]:
    """A plain HTTP server that records every request and answers 200 {"ok": true} (x-served-by: edge)."""
    seen = Captured()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _serve(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            out = b'{"ok": true}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("x-served-by", "edge")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        do_GET = do_POST = _serve

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def local_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """The standard credential chain resolves to KEY/SECRET (environment variables)."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")


# --- SigV4 -------------------------------------------------------------------------------------------


def test_a_sigv4_signed_request_verifies_and_any_change_breaks_it(echo_server, local_credentials) -> None:
    # Given a client signing with the credential chain, and a server that records what it receives
    url, seen = echo_server
    client = Client(url, auth=SigV4(region="us-east-1"))
    body = b'{"inputs": []}'
    # When it sends a request
    resp = client.request("POST", "/v2/models/digits/infer", body, {"Content-Type": "application/json"})
    assert resp.status == 200 and resp.served_by == "edge" and resp.json() == {"ok": True}
    method, path, headers, got = seen.requests[-1]
    assert headers["authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={KEY}/")
    # Then the independent verifier accepts exactly what arrived
    assert verify(method, path, headers, got, {KEY: SECRET}, "us-east-1") == KEY
    # And a changed body, path, signed header, secret or region does not verify
    for args in [(method, path, headers, got + b" "), (method, "/v2/models/other/infer", headers, got),
                 (method, path, {**headers, "content-type": "text/plain"}, got), ("PUT", path, headers, got)]:
        with pytest.raises(SignatureError, match="signature we calculated does not match"):
            verify(*args, {KEY: SECRET}, "us-east-1")
    with pytest.raises(SignatureError, match="does not match"):
        verify(method, path, headers, got, {KEY: "another-secret"}, "us-east-1")
    with pytest.raises(SignatureError, match="correct service and region"):
        verify(method, path, headers, got, {KEY: SECRET}, "eu-west-1")


def test_the_verifier_refuses_unsigned_unknown_and_stale_requests(echo_server, local_credentials) -> None:
    url, seen = echo_server
    Client(url, auth=SigV4(region="us-east-1")).request("GET", "/v2/health/ready")
    method, path, headers, body = seen.requests[-1]
    # Given the same request: without its signature, under an unknown key, or verified 6 minutes later
    unsigned = {k: v for k, v in headers.items() if k != "authorization"}
    with pytest.raises(SignatureError, match=r"^Forbidden$"):
        verify(method, path, unsigned, body, {KEY: SECRET}, "us-east-1")
    with pytest.raises(SignatureError, match="security token included in the request is invalid"):
        verify(method, path, headers, body, {"OTHER": SECRET}, "us-east-1")
    import time

    with pytest.raises(SignatureError, match="Signature expired"):
        verify(method, path, headers, body, {KEY: SECRET}, "us-east-1", now=time.time() + 360)
    garbled = {**headers, "authorization": "AWS4-HMAC-SHA256 Credential=x"}
    with pytest.raises(SignatureError, match="requires 'Credential'"):
        verify(method, path, garbled, body, {KEY: SECRET}, "us-east-1")


def test_the_region_comes_from_an_execute_api_host_name(local_credentials) -> None:
    signer = SigV4()
    assert signer.region_for("https://abc123.execute-api.eu-central-1.amazonaws.com/v2") == "eu-central-1"
    assert signer.region_for("http://127.0.0.1:3000") == "us-east-1"  # the session's region
    assert SigV4(region="ap-south-1").region_for("https://abc.execute-api.us-east-1.amazonaws.com") == "ap-south-1"


def test_the_region_comes_from_aws_region_first_then_aws_default_region(echo_server, local_credentials,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    local = "http://127.0.0.1:3000"
    # Given only AWS_REGION (what the error below tells a user to set; Lambda sets it too)
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    # Then it is the region signed for, and the verifier accepts the signature for that region
    assert SigV4().region_for(local) == "eu-west-3"
    url, seen = echo_server
    Client(url, auth=SigV4()).request("GET", "/v2/health/ready")
    method, path, headers, body = seen.requests[-1]
    assert verify(method, path, headers, body, {KEY: SECRET}, "eu-west-3") == KEY
    # And with both set, AWS_REGION comes first (as in Lambda and the AWS SDKs); AWS_DEFAULT_REGION alone is kept
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    assert SigV4().region_for(local) == "eu-west-3"
    monkeypatch.delenv("AWS_REGION")
    assert SigV4().region_for(local) == "us-east-1"
    # And an execute-api host name, or an explicit region, still comes before either
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    assert SigV4().region_for("https://abc.execute-api.ap-south-1.amazonaws.com") == "ap-south-1"
    assert SigV4(region="sa-east-1").region_for(local) == "sa-east-1"


def test_no_region_anywhere_says_which_variables_to_set(local_credentials, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    with pytest.raises(errors.ConfigurationError, match=r"set AWS_REGION \(or AWS_DEFAULT_REGION\)"):
        SigV4().region_for("http://127.0.0.1:3000")


def test_signing_without_credentials_says_how_to_provide_them(monkeypatch: pytest.MonkeyPatch) -> None:
    class NoCredentials:
        def get_credentials(self) -> None:
            return None

    with pytest.raises(errors.ConfigurationError, match="no AWS credentials found"):
        SigV4(region="us-east-1", session=NoCredentials()).headers("GET", "http://h/", {}, b"")


# --- bearer JWT and the auth factory -----------------------------------------------------------------


def test_a_bearer_token_is_sent_and_a_callable_is_asked_each_time(echo_server, tmp_path: Path) -> None:
    url, seen = echo_server
    tokens = iter(["first.jwt", "second.jwt"])
    client = Client(url, auth=Bearer(lambda: next(tokens)))
    client.request("GET", "/v2")
    client.request("GET", "/v2")
    assert [r[2]["authorization"] for r in seen.requests] == ["Bearer first.jwt", "Bearer second.jwt"]
    # A token file is re-read on every request (a sidecar may rotate it)
    token_file = tmp_path / "token"
    token_file.write_text("file.jwt\n")
    Client(url, auth=auth_from("jwt", token_file=str(token_file))).request("GET", "/v2")
    assert seen.requests[-1][2]["authorization"] == "Bearer file.jwt"
    with pytest.raises(errors.ConfigurationError, match="token"):
        auth_from("jwt")
    with pytest.raises(errors.ConfigurationError, match="empty"):
        Bearer("  ")
    assert isinstance(auth_from("none"), NoAuth)


# --- transport failures ------------------------------------------------------------------------------


def test_an_unreachable_api_and_a_silent_one_are_told_apart() -> None:
    # Given a port nobody listens on, and one that accepts but never answers
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    with pytest.raises(errors.BackendUnavailableError, match="cannot reach"):
        Client(f"http://127.0.0.1:{dead}").request("GET", "/v2")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    try:
        with pytest.raises(errors.BackendTimeoutError, match="did not answer"):
            Client(f"http://127.0.0.1:{silent.getsockname()[1]}").request("GET", "/v2", timeout_s=0.2)
    finally:
        silent.close()
    with pytest.raises(errors.ConfigurationError, match="must be http"):
        Client("127.0.0.1:3000")


# --- tritonclient's objects against the real API handler, behind the local gateway with IAM on --------


@pytest.fixture
def signed_api(runtime_env, tmp_path: Path, local_credentials) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """RouterFunction's handle_http (in-process CPU tier, a linear model) behind ApiGatewayServer with SigV4."""
    store = tmp_path / "store"
    _, w, b = write_linear(store, "lin")
    rt = build_runtime(Settings(model_store_uri=str(store), model_cache_dir=str(tmp_path / "cache")))
    gw = ApiGatewayServer(lambda event, ctx: handle_http(event, ctx, runtime=rt), lambda: None,
                          authorizer=iam_authorizer({KEY: SECRET}, "us-east-1")).start()
    try:
        yield gw.url, w, b
    finally:
        gw.stop()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_with_tritonclient_objects_through_the_signed_gateway(signed_api, binary: bool) -> None:
    import tritonclient.http as httpclient

    url, w, b = signed_api
    x = rows_of(3)
    inp = httpclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = httpclient.InferRequestedOutput("y", binary_data=binary)
    # When the client infers through the gateway that verifies SigV4
    result = Client(url, auth=SigV4(region="us-east-1")).infer("lin", [inp], [out], request_id="r1")
    # Then the outputs are the model's, and the tier that served them is reported
    np.testing.assert_allclose(result.as_numpy("y"), x @ w + b, rtol=1e-5, atol=1e-5)
    assert result.served_by == "cpu" and result.get_response()["id"] == "r1"


def test_a_bad_signature_is_refused_by_the_gateway_and_errors_keep_their_code(signed_api, monkeypatch) -> None:
    import tritonclient.http as httpclient

    url, _, _ = signed_api
    inp = httpclient.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(rows_of(1))
    # Given credentials whose secret is wrong: API Gateway's 403, before the function runs
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(ApiError) as err:
        Client(url, auth=SigV4(region="us-east-1")).infer("lin", [inp])
    assert err.value.status == 403 and MISMATCH in err.value.message
    # And no signature at all
    resp = Client(url).request("GET", "/v2/health/ready")
    assert resp.status == 403 and resp.json() == {"message": "Forbidden"}
    # Given the right secret, an unknown model is the protocol's 404 with its code
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    api = Client(url, auth=SigV4(region="us-east-1"))
    with pytest.raises(ApiError) as err:
        api.infer("nosuch", [inp])
    assert err.value.status == 404 and err.value.code == "model_not_found" and err.value.served_by == "cpu"
    assert api.live() and api.ready() and api.model_ready("lin")
    assert api.model_metadata("lin")["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert json.loads(json.dumps(api.server_metadata()))["name"] == "tierserve"
