"""`tierserve serve`: the API Gateway emulation's events, the Lambda Invoke endpoint as boto3 sees it,
and the whole stack as a command (ready line, tritonclient unchanged with and without binary data,
clean shutdown on SIGINT/SIGTERM with no orphan processes)."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.support.models import write_dual_tier_linear
from tierserve_tools.apigw import ApiGatewayServer, http_api_event
from tierserve_tools.lambda_endpoint import LambdaEndpoint, LocalFunction

ROOT = Path(__file__).resolve().parents[2]


# --- API Gateway HTTP API emulation -------------------------------------------------------------


def test_event_has_the_http_api_v2_shape() -> None:
    # Given a binary POST with a query string, cookies and a repeated header
    headers = [("Content-Type", "application/octet-stream"), ("Inference-Header-Content-Length", "12"),
               ("X-Multi", "a"), ("X-Multi", "b"), ("Cookie", "a=1; b=2")]
    # When it becomes an event
    ev = http_api_event("POST", "/v2/models/m/infer?x=1&y=2&x=3", headers, b"\x00\xffbinary")
    # Then it is what API Gateway sends: base64 body, lower-cased headers, no Cookie header
    assert ev["version"] == "2.0" and ev["routeKey"] == "$default"
    assert ev["rawPath"] == "/v2/models/m/infer" and ev["rawQueryString"] == "x=1&y=2&x=3"
    assert ev["queryStringParameters"] == {"x": "1,3", "y": "2"}
    assert ev["headers"]["inference-header-content-length"] == "12" and ev["headers"]["x-multi"] == "a,b"
    assert "cookie" not in ev["headers"] and ev["cookies"] == ["a=1", "b=2"]
    assert ev["requestContext"]["http"] == {"method": "POST", "path": "/v2/models/m/infer", "protocol": "HTTP/1.1",
                                            "sourceIp": "127.0.0.1", "userAgent": ""}
    assert ev["requestContext"]["requestId"] and ev["requestContext"]["stage"] == "$default"
    assert ev["isBase64Encoded"] is True and base64.b64decode(ev["body"]) == b"\x00\xffbinary"


@pytest.mark.parametrize(("ctype", "body", "b64"), [
    ("application/json", b'{"a": 1}', False), ("text/plain; charset=utf-8", b"hi", False),
    (None, b'{"a": 1}', True), ("application/octet-stream", b"{}", True), ("application/json", b"\xff", True),
])
def test_only_text_content_types_arrive_as_text(ctype, body, b64) -> None:
    headers = [("Content-Type", ctype)] if ctype else []
    ev = http_api_event("POST", "/", headers, body)
    assert ev["isBase64Encoded"] is b64
    assert (base64.b64decode(ev["body"]) if b64 else ev["body"].encode()) == body


def test_get_without_body_has_no_body_key() -> None:
    ev = http_api_event("GET", "/v2/health/ready", [("Host", "localhost:3000")], b"")
    assert "body" not in ev and ev["isBase64Encoded"] is False and "queryStringParameters" not in ev


def test_the_server_hands_events_to_the_handler_and_writes_results_back() -> None:
    seen: list[dict] = []

    def handler(event, context):
        seen.append(event)
        if event["rawPath"] == "/boom":
            raise RuntimeError("unhandled")
        if event["rawPath"] == "/plain":
            return {"hello": "world"}
        return {"statusCode": 201, "headers": {"content-type": "application/octet-stream", "x-a": "1"},
                "body": base64.b64encode(b"\x01\x02").decode(), "isBase64Encoded": True}

    gw = ApiGatewayServer(handler, lambda: None).start()
    try:
        req = urllib.request.Request(f"{gw.url}/bin?q=1", data=b"\x00\x01", method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 201 and resp.read() == b"\x01\x02" and resp.headers["x-a"] == "1"
        assert seen[-1]["isBase64Encoded"] and base64.b64decode(seen[-1]["body"]) == b"\x00\x01"
        with urllib.request.urlopen(f"{gw.url}/plain", timeout=10) as resp:
            assert resp.status == 200 and json.loads(resp.read()) == {"hello": "world"}
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{gw.url}/boom", timeout=10)
        assert err.value.code == 500 and json.loads(err.value.read()) == {"message": "Internal Server Error"}
    finally:
        gw.stop()


# --- the Lambda Invoke endpoint, through boto3 ----------------------------------------------------


def test_lambda_invoke_endpoint_as_boto3_sees_it() -> None:
    import boto3
    from botocore.config import Config

    # Given two local functions (stdlib callables as handlers: one returns, one raises)
    env = dict(os.environ)
    functions = [LocalFunction("ok", "operator.is_not", env, max_workers=1),
                 LocalFunction("raises", "operator.truediv", env, max_workers=1)]
    with LambdaEndpoint(functions) as endpoint:
        client = boto3.client("lambda", endpoint_url=endpoint.url, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing",
                              config=Config(retries={"total_max_attempts": 1}))
        # When boto3 invokes them
        ok = client.invoke(FunctionName="ok", Payload=b'{"a": 1}')
        arn = client.invoke(FunctionName="arn:aws:lambda:us-east-1:123456789012:function:ok:$LATEST", Payload=b"{}")
        bad = client.invoke(FunctionName="raises", Payload=b"{}")
        # Then results, function errors and unknown functions look as they do in AWS
        assert ok["StatusCode"] == 200 and json.loads(ok["Payload"].read()) is True and "FunctionError" not in ok
        assert json.loads(arn["Payload"].read()) is True
        assert bad["FunctionError"] == "Unhandled"
        assert json.loads(bad["Payload"].read())["errorType"] == "TypeError"
        with pytest.raises(client.exceptions.ResourceNotFoundException):
            client.invoke(FunctionName="missing", Payload=b"{}")
        # And a warm worker is reused
        assert len(functions[0]._all) == 1


# --- the whole stack as a command ------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-models")
    w, b = write_dual_tier_linear(root, seed=21)
    return root, w, b


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_tierserve_serve_command_serves_tritonclient_and_stops_cleanly(models, tmp_path, sig) -> None:
    pytest.importorskip("pytriton", reason="the nvidia-pytriton wheel provides the local tritonserver")
    import tritonclient.http as httpclient

    root, w, b = models
    # Given `tierserve serve` on a free port with S3 (moto), the CPU function and the local Triton
    cmd = [sys.executable, "-m", "tierserve_tools.cli", "serve", "--port", "0", "--models", str(root),
           "--workdir", str(tmp_path / "serve"), "--no-batch"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        # Then it prints one ready line naming every component
        assert line.startswith("tierserve serve: ready on http://127.0.0.1:"), line
        assert "lambda-invoke CpuInferenceFunction" in line and "gpu: triton" in line and "s3: moto" in line
        url = line.split("ready on http://", 1)[1].split(" ", 1)[0]
        # When tritonclient talks to it, unchanged
        client = httpclient.InferenceServerClient(url)
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("lin")
        assert client.is_model_ready("lin", "1") and not client.is_model_ready("nope")
        meta = client.get_model_metadata("lin")
        assert meta["name"] == "lin" and meta["inputs"][0]["shape"] == [-1, 4]
        assert client.get_model_metadata("lin", "1")["versions"] == ["1"]
        rng = np.random.default_rng(5)
        for rows, tier in ((2, "cpu"), (24, "gpu")):
            x = rng.standard_normal((rows, 4)).astype(np.float32)
            for binary_in in (False, True):
                for binary_out in (False, True):
                    inp = httpclient.InferInput("x", [rows, 4], "FP32")
                    inp.set_data_from_numpy(x, binary_data=binary_in)
                    out = httpclient.InferRequestedOutput("y", binary_data=binary_out)
                    result = client.infer("lin", [inp], outputs=[out], request_id=f"r{rows}{binary_in}{binary_out}")
                    # Then values, id and the binary extension round-trip, on the expected tier
                    np.testing.assert_allclose(result.as_numpy("y"), x @ w + b, rtol=1e-4, atol=1e-5)
                    body = result.get_response()
                    assert body["id"] == f"r{rows}{binary_in}{binary_out}"
                    assert ("binary_data_size" in body["outputs"][0].get("parameters", {})) == binary_out
            served = urllib.request.urlopen(urllib.request.Request(
                f"http://{url}/v2/models/lin/infer", method="POST", headers={"content-type": "application/json"},
                data=json.dumps({"inputs": [{"name": "x", "shape": [rows, 4], "datatype": "FP32",
                                             "data": x.ravel().tolist()}]}).encode()), timeout=30)
            assert served.headers["x-served-by"] == tier
        client.close()
        family = _descendants(proc.pid)
        assert len(family) >= 3  # workers, tritonserver (+ stubs), moto_server
        # When it gets the signal
        proc.send_signal(sig)
        # Then it exits 0 and leaves nothing running
        assert proc.wait(timeout=60) == 0
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in family) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in family if _alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
