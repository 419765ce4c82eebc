"""The local emulation enforces the quotas of the services it stands in for, so that what works locally
fits in AWS (issue 8, defect 3): API Gateway's 10 MB body and 30 s integration timeout, and Lambda's 6 MB
request and response payloads for every function, the router included (`tierserve serve`, `tierserve invoke`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.handlers import echo_size, sleep
from tierserve_tools.apigw import ApiGatewayServer, http_api_event

ROOT = Path(__file__).resolve().parents[3]
SIX_MB = 6 * 1024 * 1024


def gateway(handler) -> ApiGatewayServer:
    return ApiGatewayServer(handler, lambda: None, port=0)


def event_with(body: bytes) -> dict:
    return http_api_event("POST", "/v2/models/m/infer", [("content-type", "application/octet-stream")], body)


def test_a_router_result_over_lambdas_6_mb_is_api_gateways_500_not_a_reply() -> None:
    gw = gateway(lambda event, ctx: echo_size({"n": SIX_MB, "http": True}, ctx))
    try:
        status, _, body = gw.invoke(event_with(b"{}"))
        assert (status, json.loads(body)) == (500, {"message": "Internal Server Error"})
        ok, _, _ = ApiGatewayServer(lambda e, c: echo_size({"n": SIX_MB - 1024, "http": True}, c),
                                    lambda: None).invoke(event_with(b"{}"))
        assert ok == 200
    finally:
        gw.stop()


def test_an_event_over_lambdas_6_mb_never_reaches_the_router() -> None:
    calls: list = []
    gw = gateway(lambda event, ctx: calls.append(event))
    try:
        # 4.8 MB of binary body is 6.4 MB of base64 in the event
        status, _, body = gw.invoke(event_with(b"\x00" * (4_800_000)))
        assert (status, json.loads(body), calls) == (413, {"message": "Request Entity Too Large"}, [])
    finally:
        gw.stop()


def test_the_integration_times_out_at_api_gateways_limit_with_a_503() -> None:
    gw = gateway(lambda event, ctx: sleep({"s": 2}, ctx))
    gw.integration_timeout_s = 0.2
    try:
        status, _, body = gw.invoke(event_with(b"{}"))
        assert (status, json.loads(body)) == (503, {"message": "Service Unavailable"})
    finally:
        gw.stop()


@pytest.mark.parametrize(("event", "error_type"), [
    ({"n": SIX_MB}, "Function.ResponseSizeTooLarge"),
    ({"pad": "x" * SIX_MB}, "RequestTooLargeException"),
], ids=["response", "request"])
def test_tierserve_invoke_enforces_lambdas_payload_quotas(tmp_path: Path, event: dict, error_type: str) -> None:
    # Given an event file for a handler (the worker `tierserve invoke` runs)
    path = tmp_path / "event.json"
    path.write_text(json.dumps(event))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "tierserve_tools.worker", "tests.support.handlers.echo_size",
                          "--event", str(path)], capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    # Then it fails as Lambda would, with Lambda's error type
    assert out.returncode == 1
    assert json.loads(out.stdout)["errorType"] == error_type
