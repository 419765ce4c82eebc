"""The streaming runtime loop, run for real: a subprocess started through the shipped AWS_LAMBDA_EXEC_WRAPPER
script, with AWS_LAMBDA_RUNTIME_API pointing at the local Runtime API emulator (tierserve_tools.runtime_api).
Handlers are in tests/support/streaming_handlers.py."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tierserve.streaming.response import StreamingResponse
from tierserve_tools.runtime_api import RuntimeApiEmulator, start_runtime

HANDLERS = "tests.support.streaming_handlers"
Start = Callable[..., tuple[RuntimeApiEmulator, subprocess.Popen]]


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Start]:
    """start(handler, **emulator options) -> (emulator, the loop's process); both stopped afterwards."""
    started: list[tuple[RuntimeApiEmulator, subprocess.Popen]] = []

    def start(handler: str, stdout_file: Path | None = None, **options: int) -> tuple[RuntimeApiEmulator,
                                                                                     subprocess.Popen]:
        api = RuntimeApiEmulator(**options).start()
        env = {"POWERTOOLS_METRICS_NAMESPACE": "tierserve-test", "POWERTOOLS_TRACE_DISABLED": "true"}
        proc = start_runtime(api, f"{HANDLERS}.{handler}", env=env, task_root=str(ROOT),
                             stderr=open(tmp_path / "stderr.log", "ab"))  # noqa: SIM115 - the child keeps it
        if stdout_file is not None:  # read the loop's stdout (EMF lines) into a file
            def drain() -> None:
                assert proc.stdout is not None
                with stdout_file.open("ab") as f:
                    for line in proc.stdout:
                        f.write(line)
                        f.flush()
            import threading
            threading.Thread(target=drain, daemon=True).start()
        started.append((api, proc))
        return api, proc

    yield start
    for api, proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()
        api.stop()


def _trailer_error(inv) -> dict:
    return json.loads(base64.b64decode(inv.trailers["lambda-runtime-function-error-body"]))


def test_a_dict_answer_is_posted_buffered_with_the_context(runtime: Start) -> None:
    # Given the loop running a handler that returns an API Gateway response object
    api, _ = runtime("buffered")
    # When an event is invoked
    inv = api.invoke({"hello": "world"}, timeout_s=30).wait(20)
    # Then it was posted to /response as one JSON body, not streamed, with the context filled from /next
    assert inv.mode == "buffered" and inv.error is None
    reply = json.loads(inv.response)
    body = json.loads(reply["body"])
    assert body["echo"] == {"hello": "world"} and body["request_id"] == inv.request_id
    assert 20_000 < body["remaining_ms"] <= 30_000 and body["function_name"] == api.function_name
    assert body["streaming_runtime"] == "1"  # handlers can tell they may return a StreamingResponse
    # And the same warm process answers the next one
    assert json.loads(json.loads(api.invoke({"n": 2}).wait(10).response)["body"])["echo"] == {"n": 2}


def test_a_stream_is_posted_in_streaming_mode_with_the_prelude_and_each_chunk_as_it_is_produced(
        runtime: Start, tmp_path: Path) -> None:
    # Given a handler that streams 4 lines 0.3 s apart, each stamped with the time it was produced
    api, _ = runtime("streamed")
    marker = tmp_path / "closed"
    # When it is invoked
    inv = api.invoke({"n": 4, "gap_s": 0.3, "marker": str(marker)}).wait(20)
    # Then the Runtime API saw the streaming mode, chunked, with the error trailers declared
    headers = inv.request_headers
    assert inv.mode == "streamed" and inv.error is None
    assert headers["lambda-runtime-function-response-mode"] == "streaming"
    assert headers["transfer-encoding"] == "chunked"
    assert headers["content-type"] == "application/vnd.awslambda.http-integration-response"
    assert "Lambda-Runtime-Function-Error-Type" in headers["trailer"]
    assert "Lambda-Runtime-Function-Error-Body" in headers["trailer"]
    # And the body is the JSON prelude (status, headers, the cookie apart), 8 NUL bytes, then the lines
    prelude, chunks = inv.http_integration()
    assert prelude == {"statusCode": 200, "headers": {"content-type": "application/x-ndjson"},
                       "cookies": ["session=1"]}
    lines = [json.loads(line) for line in b"".join(c for _, c in chunks).splitlines()]
    assert [line["i"] for line in lines] == [0, 1, 2, 3]
    # And each line arrived as it was produced (one HTTP chunk per handler chunk), not when the handler ended
    assert len(chunks) == 4
    for (arrived, data), line in zip(chunks, lines, strict=True):
        assert json.loads(data)["i"] == line["i"]
        assert 0 <= arrived - line["t"] < 0.15, f"chunk {line['i']} arrived {arrived - line['t']:.3f} s late"
    assert chunks[0][0] < inv.finished_at - 0.75  # the first line was out ~0.9 s before the stream ended
    # And no trailers were sent for a stream that completed, and the response's close ran
    assert inv.trailers == {}
    assert marker.read_text() == "closed"


def test_an_error_after_two_chunks_is_reported_in_the_trailers(runtime: Start, tmp_path: Path) -> None:
    # Given a stream that fails after its second chunk
    api, proc = runtime("fails_after_two")
    marker = tmp_path / "closed"
    inv = api.invoke({"marker": str(marker)}).wait(20)
    # Then the two chunks were delivered, then the error came in the trailers, base64 JSON
    _, chunks = inv.http_integration()
    assert [json.loads(c)["i"] for _, c in chunks] == [0, 1]
    assert inv.trailers["lambda-runtime-function-error-type"] == "ValueError"
    body = _trailer_error(inv)
    assert body["errorType"] == "ValueError" and body["errorMessage"] == "boom after 2 chunks"
    assert any("boom after" in line for line in body["stackTrace"])
    assert inv.error and inv.error["errorType"] == "ValueError"
    assert marker.read_text() == "closed"
    # And the loop lives on for the next invocation
    assert proc.poll() is None
    assert api.invoke({}).wait(20).trailers["lambda-runtime-function-error-type"] == "ValueError"


@pytest.mark.parametrize(("handler", "error_type"), [("fails_before_first", "ValueError"), ("raises", "KeyError")])
def test_an_error_before_the_first_byte_is_an_invocation_error(runtime: Start, handler: str, error_type: str,
                                                               tmp_path: Path) -> None:
    # Given a handler that fails before anything was streamed
    api, _ = runtime(handler)
    marker = tmp_path / "closed"
    inv = api.invoke({"marker": str(marker)}).wait(20)
    # Then it went to /invocation/{id}/error (nothing was half-sent), with the error's type
    assert inv.mode == "error" and inv.chunks == [] and inv.response is None
    assert inv.error["errorType"] == error_type
    assert inv.request_headers["lambda-runtime-function-error-type"] == error_type
    assert marker.exists() is (handler == "fails_before_first")  # a stream's close runs even then


def test_a_stream_still_running_at_the_deadline_is_ended_with_a_timeout_trailer(runtime: Start,
                                                                                 tmp_path: Path) -> None:
    # Given an endless stream and a 1.5 s function timeout
    api, _ = runtime("endless")
    marker = tmp_path / "closed"
    started = time.time()
    inv = api.invoke({"gap_s": 0.05, "marker": str(marker)}, timeout_s=1.5).wait(20)
    # Then the loop ended it before the deadline, saying why in the trailers, and closed it
    assert inv.finished_at - started < 1.5
    assert inv.trailers["lambda-runtime-function-error-type"] == "Sandbox.Timedout"
    assert "timeout" in _trailer_error(inv)["errorMessage"]
    assert len(inv.http_integration()[1]) > 5
    assert marker.read_text() == "closed"


def test_the_emulator_enforces_the_buffered_and_streamed_limits(runtime: Start) -> None:
    # Given an emulator with a 1 KB buffered limit and a 4 KB streamed limit
    api, _ = runtime("big_buffered", max_buffered_bytes=1024)
    # When a buffered answer is over it, Then the invocation fails as Lambda's does
    inv = api.invoke({"size": 5000}).wait(20)
    assert inv.error["errorType"] == "Function.ResponseSizeTooLarge"
    # And under it, it passes
    assert api.invoke({"size": 100}).wait(20).error is None
    # And a stream past the streamed limit is cut and fails, the loop living on
    api2, proc2 = runtime("streamed", max_streamed_bytes=4096)
    cut = api2.invoke({"n": 20, "gap_s": 0.01, "size": 1000}).wait(20)
    assert cut.error["errorType"] == "Function.ResponseSizeTooLarge"
    assert sum(len(c) for _, c in cut.chunks) <= 4096
    ok = api2.invoke({"n": 2, "gap_s": 0.0}).wait(20)
    assert ok.error is None and proc2.poll() is None


def test_metrics_are_flushed_after_the_last_chunk(runtime: Start, tmp_path: Path) -> None:
    # Given a handler decorated with Powertools' log_metrics whose stream adds a metric per chunk
    out = tmp_path / "stdout.log"
    api, _ = runtime("with_metrics", stdout_file=out)
    # When it streams
    inv = api.invoke({}).wait(20)
    assert inv.error is None and b"chunk 2" in inv.body
    # Then the metrics added while streaming are published (log_metrics flushed before the first chunk)
    deadline = time.time() + 10
    while time.time() < deadline and b"StreamedChunks" not in (out.read_bytes() if out.exists() else b""):
        time.sleep(0.05)
    emf = [json.loads(line) for line in out.read_bytes().splitlines() if b"StreamedChunks" in line]
    assert emf and emf[0]["StreamedChunks"] == [1.0, 1.0, 1.0]


def test_an_import_error_is_reported_to_init_error(runtime: Start) -> None:
    # Given a handler that does not exist
    api, proc = runtime("no_such_handler")
    # Then the loop reports it to /runtime/init/error and exits
    assert api.init_failed.wait(20)
    assert api.init_error["errorType"] == "Runtime.HandlerNotFound"
    assert "no_such_handler" in api.init_error["errorMessage"]
    assert proc.wait(timeout=10) == 1


def test_the_prelude_moves_set_cookie_to_cookies() -> None:
    response = StreamingResponse(201, {"X-A": "1", "set-cookie": "b=2"}, iter(()), cookies=["a=1"])
    assert response.prelude() == {"statusCode": 201, "headers": {"X-A": "1"}, "cookies": ["a=1", "b=2"]}
