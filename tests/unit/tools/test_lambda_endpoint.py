"""The local Lambda Invoke endpoint (tierserve_tools.lambda_endpoint) with its execution environments running the
real streaming runtime loop (through wrapper.sh, under a Runtime API emulator each), read with boto3's real
invoke / invoke_with_response_stream. Handlers: tests/support/streaming_handlers.py."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from tests.conftest import ROOT
from tierserve_tools.lambda_endpoint import LambdaEndpoint, LocalFunction

H = "tests.support.streaming_handlers"
HTTP = "application/vnd.awslambda.http-integration-response"


def _fn(name: str, handler: str, timeout_s: int = 10) -> LocalFunction:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return LocalFunction(name, f"{H}.{handler}", env, timeout_s=timeout_s, max_workers=1)


@pytest.fixture
def endpoint() -> Iterator[tuple[LambdaEndpoint, object]]:
    functions = [_fn("streamed", "streamed"), _fn("endless", "endless"), _fn("fails", "fails_after_two"),
                 _fn("buffered", "buffered"), _fn("short", "endless", timeout_s=2), _fn("sleeps", "sleeps", 1)]
    server = LambdaEndpoint(functions).start()
    client = boto3.client("lambda", endpoint_url=server.url, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing",
                          config=Config(retries={"total_max_attempts": 1}, read_timeout=30))
    yield server, client
    server.stop()


def _read(out: dict) -> tuple[list[tuple[float, bytes]], dict]:
    chunks, complete = [], {}
    for event in out["EventStream"]:
        if "PayloadChunk" in event:
            chunks.append((time.time(), event["PayloadChunk"]["Payload"]))
        else:
            complete = event["InvokeComplete"]
    return chunks, complete


def test_each_chunk_the_handler_produces_arrives_as_a_payload_chunk_as_it_is_produced(endpoint) -> None:
    # Given a handler streaming 4 lines 0.3 s apart through the runtime loop
    _, client = endpoint
    out = client.invoke_with_response_stream(FunctionName="streamed", Payload=b'{"n": 4, "gap_s": 0.3}')
    # Then the response is the HTTP-integration stream: prelude, 8 NULs, the lines
    assert out["StatusCode"] == 200 and out["ResponseStreamContentType"] == HTTP
    chunks, complete = _read(out)
    data = b"".join(c for _, c in chunks)
    prelude, _, body = data.partition(b"\x00" * 8)
    assert json.loads(prelude)["statusCode"] == 200 and complete == {}
    lines = [json.loads(line) for line in body.splitlines()]
    assert [line["i"] for line in lines] == [0, 1, 2, 3]
    # And each line arrived within 0.15 s of being produced, not at the end
    arrivals = {json.loads(c)["i"]: at for at, c in chunks if c.startswith(b"{\"i\"")}
    for line in lines:
        assert 0 <= arrivals[line["i"]] - line["t"] < 0.15


def test_a_failure_mid_stream_is_in_invoke_complete_after_the_chunks_before_it(endpoint) -> None:
    _, client = endpoint
    chunks, complete = _read(client.invoke_with_response_stream(FunctionName="fails", Payload=b"{}"))
    body = b"".join(c for _, c in chunks).partition(b"\x00" * 8)[2]
    assert [json.loads(line)["i"] for line in body.splitlines()] == [0, 1]
    assert complete["ErrorCode"] == "ValueError" and "boom after 2 chunks" in complete["ErrorDetails"]


def test_a_buffered_invoke_of_a_streaming_handler_is_one_api_gateway_response(endpoint) -> None:
    _, client = endpoint
    out = client.invoke(FunctionName="streamed", Payload=b'{"n": 2, "gap_s": 0}')
    reply = json.loads(out["Payload"].read())
    assert reply["statusCode"] == 200 and reply["headers"]["content-type"] == "application/x-ndjson"
    assert [json.loads(line)["i"] for line in reply["body"].splitlines()] == [0, 1]
    assert reply["cookies"] == ["session=1"]
    # and a buffered handler's answer, with the streaming runtime set for it
    out = client.invoke(FunctionName="buffered", Payload=b'{"x": 1}')
    assert json.loads(json.loads(out["Payload"].read())["body"])["streaming_runtime"] == "1"


def test_a_caller_that_goes_away_closes_the_handlers_stream_and_the_environment_serves_again(
        endpoint, tmp_path: Path) -> None:
    server, client = endpoint
    marker = tmp_path / "closed"
    # Given an endless stream (a chunk every 50 ms)
    out = client.invoke_with_response_stream(FunctionName="endless",
                                             Payload=json.dumps({"marker": str(marker), "gap_s": 0.05}).encode())
    stream = iter(out["EventStream"])
    for _ in range(3):
        next(stream)
    pid = server.functions["endless"].worker_pids[0]
    # When the caller goes away
    out["EventStream"].close()
    # Then the handler's stream is closed within a second (its close ran: a generation would stop)
    deadline = time.monotonic() + 2.0
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.read_text() == "closed"
    # And the same warm environment serves the next invocation once the loop is back for its next event
    again = client.invoke_with_response_stream(FunctionName="endless", Payload=b'{"gap_s": 0.05}')
    next(iter(again["EventStream"]))
    assert server.functions["endless"].worker_pids == [pid]
    again["EventStream"].close()


def test_a_stream_past_the_functions_timeout_ends_with_sandbox_timedout(endpoint) -> None:
    _, client = endpoint
    started = time.monotonic()
    chunks, complete = _read(client.invoke_with_response_stream(FunctionName="short", Payload=b'{"gap_s": 0.05}'))
    assert complete["ErrorCode"] == "Sandbox.Timedout" and len(chunks) > 10
    assert 1.5 < time.monotonic() - started < 3.0


def test_an_invocation_that_never_answers_is_killed_a_second_past_its_timeout(endpoint) -> None:
    server, client = endpoint
    out = client.invoke(FunctionName="sleeps", Payload=b'{"s": 0.01}')
    assert json.loads(out["Payload"].read())["body"] == "late"
    pid = server.functions["sleeps"].worker_pids[0]
    started = time.monotonic()
    out = client.invoke(FunctionName="sleeps", Payload=b'{"s": 30}')
    reply = json.loads(out["Payload"].read())
    # Then at timeout + 1 s it is a timeout, and that environment's process is gone
    assert out["FunctionError"] == "Unhandled" and reply["errorMessage"] == "Task timed out after 1.00 seconds"
    assert 1.9 < time.monotonic() - started < 4.0
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]
    # And the next invocation gets a fresh environment
    out = client.invoke(FunctionName="sleeps", Payload=b'{"s": 0.01}')
    assert json.loads(out["Payload"].read())["body"] == "late" and server.functions["sleeps"].worker_pids != [pid]


def test_an_unknown_function_is_resource_not_found(endpoint) -> None:
    _, client = endpoint
    with pytest.raises(client.exceptions.ResourceNotFoundException):
        client.invoke_with_response_stream(FunctionName="missing", Payload=b"{}")
