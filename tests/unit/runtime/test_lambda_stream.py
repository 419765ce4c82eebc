"""The router's InvokeWithResponseStream relay (tierserve.backends.lambda_stream).

moto 5.2 does not implement invoke_with_response_stream, so the client is either a fake yielding boto3's
event dicts, or real boto3 against the local endpoint (tierserve_tools.invoke_stream_endpoint) relaying the
real streaming runtime loop under the Runtime API emulator."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from tests.conftest import ROOT
from tierserve import errors
from tierserve.backends.lambda_stream import event_lines, generation_events, invoke_stream
from tierserve.generation.events import GenerationEvent, Usage

HTTP = "application/vnd.awslambda.http-integration-response"
FUNCTION = "tierserve-CpuInferenceFunction"


class FakeStreamClient:
    """invoke_with_response_stream answering ``events`` (boto3's dicts) lazily; ``pulled`` counts those read."""

    def __init__(self, events: list[dict[str, Any]] | None = None, content_type: str = HTTP,
                 exc: BaseException | None = None) -> None:
        self.events, self.content_type, self.exc = events or [], content_type, exc
        self.pulled = 0
        self.closed = False
        self.calls: list[dict[str, Any]] = []

    def _gen(self) -> Iterator[dict[str, Any]]:
        for ev in self.events:
            self.pulled += 1
            yield ev

    def invoke_with_response_stream(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(kwargs)
        if self.exc is not None:
            raise self.exc
        client = self

        class Stream:
            def __iter__(self) -> Iterator[dict[str, Any]]:
                return client._gen()

            def close(self) -> None:
                client.closed = True

        return {"StatusCode": 200, "ResponseStreamContentType": self.content_type, "EventStream": Stream()}


def chunk(data: bytes) -> dict[str, Any]:
    return {"PayloadChunk": {"Payload": data}}


def complete(code: str | None = None, details: str | None = None) -> dict[str, Any]:
    return {"InvokeComplete": {k: v for k, v in (("ErrorCode", code), ("ErrorDetails", details)) if v}}


PRELUDE = json.dumps({"statusCode": 200, "headers": {"Content-Type": "application/x-ndjson"}, "cookies": []}).encode()


def test_the_prelude_is_read_before_returning_and_the_rest_is_relayed_as_it_comes() -> None:
    # Given a stream: the prelude split over two chunks, the delimiter, then three lines
    client = FakeStreamClient([chunk(PRELUDE[:10]), chunk(PRELUDE[10:] + b"\x00" * 8 + b'{"a":1}\n'),
                               chunk(b'{"b":2}\n'), chunk(b'{"c":3}\n'), complete()])
    stream = invoke_stream(client, FUNCTION, b'{"generate": {}}', timeout_s=10)
    # Then the call read only up to the prelude, and knows the status and headers
    assert client.pulled == 2 and client.calls[0] == {"FunctionName": FUNCTION, "Payload": b'{"generate": {}}'}
    assert stream.status == 200 and stream.headers == {"content-type": "application/x-ndjson"}
    # And iterating yields the body's bytes chunk by chunk, pulling one event per chunk
    it = iter(stream)
    assert next(it) == b'{"a":1}\n' and client.pulled == 2
    assert next(it) == b'{"b":2}\n' and client.pulled == 3
    assert list(it) == [b'{"c":3}\n'] and client.closed


@pytest.mark.parametrize(("code", "error"), [("Unhandled", errors.InferenceError),
                                             ("ValueError", errors.InferenceError),
                                             ("Sandbox.Timedout", errors.BackendTimeoutError)])
def test_an_invoke_complete_error_mid_stream_is_raised_after_the_chunks_before_it(code: str, error: type) -> None:
    client = FakeStreamClient([chunk(PRELUDE + b"\x00" * 8), chunk(b"line 1\n"), complete(code, "it broke")])
    stream = invoke_stream(client, FUNCTION, b"{}")
    got = []
    with pytest.raises(error, match=f"{FUNCTION} .*{code}.*it broke"):
        for data in stream:
            got.append(data)
    assert got == [b"line 1\n"] and client.closed


def test_a_stream_that_ends_without_invoke_complete_is_an_incomplete_answer() -> None:
    stream = invoke_stream(FakeStreamClient([chunk(PRELUDE + b"\x00" * 8 + b"half")]), FUNCTION, b"{}")
    with pytest.raises(errors.BackendUnavailableError, match="without InvokeComplete"):
        list(stream)


@pytest.mark.parametrize(("code", "error"), [("TooManyRequestsException", errors.TierThrottledError),
                                             ("EC2ThrottledException", errors.TierThrottledError),
                                             ("ResourceNotFoundException", errors.BackendUnavailableError)])
def test_call_errors_map_as_lambda_invoke_maps_them(code: str, error: type) -> None:
    exc = ClientError({"Error": {"Code": code, "Message": "no"}}, "InvokeWithResponseStream")
    with pytest.raises(error) as info:
        invoke_stream(FakeStreamClient(exc=exc), FUNCTION, b"{}")
    # a throttle is the fallback signal: nothing ran, the dispatcher may use another tier
    assert (type(info.value) is errors.TierThrottledError) is (code != "ResourceNotFoundException")


def test_a_non_2xx_prelude_is_the_tiers_own_error_with_its_code() -> None:
    prelude = json.dumps({"statusCode": 404, "headers": {}, "cookies": []}).encode()
    body = json.dumps({"error": "model 'x' not found", "code": "model_not_found"}).encode()
    client = FakeStreamClient([chunk(prelude + b"\x00" * 8), chunk(body), complete()])
    with pytest.raises(errors.ModelNotFoundError, match="model 'x' not found") as info:
        invoke_stream(client, FUNCTION, b"{}")
    assert info.value.code == "model_not_found" and client.closed


def test_a_buffered_answer_is_returned_whole_or_raised_with_its_status() -> None:
    # the handler answered before any event (an error, or a non-streamed request): a JSON proxy response
    ok = {"statusCode": 200, "headers": {"content-type": "application/json"}, "body": '{"done": true}'}
    stream = invoke_stream(FakeStreamClient([chunk(json.dumps(ok).encode()), complete()], "application/json"),
                           FUNCTION, b"{}")
    assert stream.status == 200 and b"".join(stream) == b'{"done": true}'
    busy = {"statusCode": 429, "headers": {"Retry-After": "2"},
            "body": json.dumps({"error": {"message": "at its cap", "code": "rate_limit_exceeded"}})}
    with pytest.raises(errors.TooManyRequestsError, match="at its cap") as info:
        invoke_stream(FakeStreamClient([chunk(json.dumps(busy).encode()), complete()], "application/json"),
                      FUNCTION, b"{}")
    assert info.value.retry_after_s == 2.0
    with pytest.raises(errors.InferenceError, match="boom"):
        invoke_stream(FakeStreamClient([chunk(b'{"errorMessage": "boom", "errorType": "X"}'),
                                        complete("Unhandled", "boom")], "application/json"), FUNCTION, b"{}")


def test_the_whole_stream_is_bounded_by_timeout_s() -> None:
    def slow_events() -> Iterator[dict[str, Any]]:
        yield chunk(PRELUDE + b"\x00" * 8)
        for _ in range(100):
            time.sleep(0.02)
            yield chunk(b"x\n")

    client = FakeStreamClient()
    client._gen = slow_events  # type: ignore[method-assign]
    with pytest.raises(errors.BackendTimeoutError, match=r"within 0\.2 s"):
        list(invoke_stream(client, FUNCTION, b"{}", timeout_s=0.2))


# --- event_lines -----------------------------------------------------------------------------------------

LINES = [{"text": "héllo wörld ✓ 🎉", "token_ids": [1, 2]}, {"text": "", "token_ids": []},
         {"text": "end", "token_ids": [3], "finish_reason": "stop"}]


def test_lines_split_at_every_byte_boundary_are_reassembled() -> None:
    data = b"".join(json.dumps(line, ensure_ascii=False).encode() + b"\n" for line in LINES)
    for cut in range(len(data) + 1):
        assert list(event_lines([data[:cut], data[cut:]])) == LINES
    assert list(event_lines(data[i:i + 1] for i in range(len(data)))) == LINES
    assert list(event_lines([data[:-1]])) == LINES  # the last line without its newline


def test_a_line_that_is_not_a_json_object_is_an_error_naming_it() -> None:
    with pytest.raises(errors.InferenceError, match="not JSON"):
        list(event_lines([b'{"text": "a"}\n{"text": \n']))
    with pytest.raises(errors.InferenceError, match="not a JSON object"):
        list(event_lines([b"[1, 2]\n"]))


def test_generation_events_and_an_error_line() -> None:
    final = GenerationEvent("!", (7,), finish_reason="stop", usage=Usage(3, 2), served_by="cpu")
    data = (json.dumps(GenerationEvent("hi", (5,)).to_json()) + "\n" + json.dumps(final.to_json()) + "\n").encode()
    assert list(generation_events([data])) == [GenerationEvent("hi", (5,)), final]
    err = {"error": {"status": 429, "code": "rate_limit_exceeded", "message": "cap reached"}}
    got = []
    with pytest.raises(errors.TooManyRequestsError, match="cap reached"):
        for ev in generation_events([data[:20], data[20:] + json.dumps(err).encode() + b"\n"]):
            got.append(ev)
    assert len(got) == 2


# --- for real: boto3 -> the local endpoint -> the Runtime API emulator -> the streaming runtime loop -------

@pytest.fixture
def local_cpu_function(tmp_path) -> Iterator[tuple[Any, Any]]:
    from tierserve_tools.invoke_stream_endpoint import InvokeStreamServer
    from tierserve_tools.runtime_api import RuntimeApiEmulator, start_runtime

    apis, procs = {}, []
    for name in ("streamed", "fails_after_two"):
        api = apis[name] = RuntimeApiEmulator(function_name=name).start()
        procs.append(start_runtime(api, f"tests.support.streaming_handlers.{name}", task_root=str(ROOT),
                                   env={"POWERTOOLS_TRACE_DISABLED": "true"},
                                   stderr=open(tmp_path / f"{name}.log", "ab")))  # noqa: SIM115
    server = InvokeStreamServer({name: api.stream for name, api in apis.items()},
                                content_types={name: HTTP for name in apis}).start()
    client = boto3.client("lambda", endpoint_url=server.url, region_name="us-east-1", aws_access_key_id="test",
                          aws_secret_access_key="test",
                          config=Config(retries={"total_max_attempts": 1}, read_timeout=20))
    yield client, apis
    server.stop()
    for proc in procs:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        proc.stdout.close()
    for api in apis.values():
        api.stop()


def test_the_real_runtime_loop_streamed_through_the_local_endpoint(local_cpu_function) -> None:
    client, _ = local_cpu_function
    # When the router invokes a function that streams 4 lines 0.3 s apart
    stream = invoke_stream(client, "streamed", json.dumps({"n": 4, "gap_s": 0.3}).encode(), timeout_s=20)
    assert stream.status == 200 and stream.headers == {"content-type": "application/x-ndjson"}
    arrived = [(time.time(), line) for line in event_lines(stream)]
    # Then each line reached the router as the function produced it
    assert [line["i"] for _, line in arrived] == [0, 1, 2, 3]
    for at, line in arrived:
        assert 0 <= at - line["t"] < 0.2, f"line {line['i']} came {at - line['t']:.3f} s after it was made"
    # And a failure after two lines (in the runtime's trailers) is InvokeComplete's error, raised after them
    got = []
    with pytest.raises(errors.InferenceError, match=r"fails_after_two failed mid-stream \(ValueError\): boom"):
        for line in event_lines(invoke_stream(client, "fails_after_two", b"{}", timeout_s=20)):
            got.append(line["i"])
    assert got == [0, 1]
