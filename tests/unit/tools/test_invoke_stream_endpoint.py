"""response-streaming-invocations served locally, read with boto3's real invoke_with_response_stream."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import boto3
import pytest
from botocore.config import Config

from tierserve_tools.invoke_stream_endpoint import (
    FunctionStreamError,
    InvokeRefused,
    InvokeStreamServer,
    function_name,
    response_for,
)


def slow(payload: bytes) -> Iterator[bytes]:
    n = json.loads(payload or b"{}").get("n", 3)
    for i in range(n):
        if i:
            time.sleep(0.4)
        yield json.dumps({"i": i, "t": time.time()}).encode() + b"\n"


def fails_mid_stream(payload: bytes) -> Iterator[bytes]:
    yield b"one\n"
    raise FunctionStreamError("Sandbox.Timedout", "Task timed out after 1.00 seconds")


def crashes(payload: bytes) -> Iterator[bytes]:
    yield b"one\n"
    raise RuntimeError("the handler broke")


def throttled(payload: bytes) -> Iterator[bytes]:
    raise InvokeRefused(429, "TooManyRequestsException", "Rate Exceeded.")


@pytest.fixture
def lambda_client() -> Iterator[tuple[InvokeStreamServer, object]]:
    server = InvokeStreamServer({"slow": slow, "fails": fails_mid_stream, "crashes": crashes, "busy": throttled},
                                content_types={"slow": "application/x-ndjson"}).start()
    client = boto3.client("lambda", endpoint_url=server.url, region_name="us-east-1", aws_access_key_id="test",
                          aws_secret_access_key="test",
                          config=Config(retries={"total_max_attempts": 1}, read_timeout=10))
    yield server, client
    server.stop()


def test_boto3_reads_each_payload_chunk_before_the_function_finishes(lambda_client) -> None:
    _, client = lambda_client
    out = client.invoke_with_response_stream(FunctionName="slow", Payload=b'{"n": 3}')
    assert out["StatusCode"] == 200 and out["ResponseStreamContentType"] == "application/x-ndjson"
    assert out["ExecutedVersion"] == "$LATEST"
    got: list[tuple[float, dict]] = []
    complete = None
    for event in out["EventStream"]:
        if "PayloadChunk" in event:
            got.append((time.time(), json.loads(event["PayloadChunk"]["Payload"])))
        else:
            complete = event["InvokeComplete"]
    # Then each chunk arrived as the function produced it (0.4 s apart), and InvokeComplete came last, no error
    assert [line["i"] for _, line in got] == [0, 1, 2]
    for arrived, line in got:
        assert 0 <= arrived - line["t"] < 0.15
    assert got[-1][0] - got[0][0] > 0.7
    assert complete == {}


@pytest.mark.parametrize(("name", "code", "details"), [
    ("fails", "Sandbox.Timedout", "Task timed out after 1.00 seconds"),
    ("crashes", "Unhandled", "RuntimeError: the handler broke"),
])
def test_a_failure_mid_stream_is_in_invoke_complete(lambda_client, name: str, code: str, details: str) -> None:
    _, client = lambda_client
    events = list(client.invoke_with_response_stream(FunctionName=name, Payload=b"{}")["EventStream"])
    assert events[0] == {"PayloadChunk": {"Payload": b"one\n"}}
    assert events[-1] == {"InvokeComplete": {"ErrorCode": code, "ErrorDetails": details}}


def test_refusals_are_the_errors_boto3_raises(lambda_client) -> None:
    _, client = lambda_client
    with pytest.raises(client.exceptions.TooManyRequestsException):
        client.invoke_with_response_stream(FunctionName="busy", Payload=b"{}")
    with pytest.raises(client.exceptions.ResourceNotFoundException, match="nope"):
        client.invoke_with_response_stream(FunctionName="nope", Payload=b"{}")


def test_the_path_names_the_function_or_its_arn() -> None:
    assert function_name("/2021-11-15/functions/cpu/response-streaming-invocations") == "cpu"
    arn = "arn%3Aaws%3Alambda%3Aus-east-1%3A123456789012%3Afunction%3Acpu"
    assert function_name(f"/2021-11-15/functions/{arn}/response-streaming-invocations?Qualifier=x") == "cpu"
    assert function_name("/2015-03-31/functions/cpu/invocations") is None


def test_a_function_that_fails_before_its_first_chunk_still_answers_200_with_the_error() -> None:
    def fails_at_once(payload: bytes) -> Iterator[bytes]:
        raise FunctionStreamError("Runtime.ExitError", "exited")
        yield b""  # pragma: no cover

    status, _, body = response_for(fails_at_once, b"{}")
    from tierserve.streaming.eventstream import decode_stream

    messages = list(decode_stream(body if isinstance(body, list | tuple) else list(body)))
    assert status == 200 and [m.event_type for m in messages] == ["InvokeComplete"]
    assert json.loads(messages[0].payload) == {"ErrorCode": "Runtime.ExitError", "ErrorDetails": "exited"}
