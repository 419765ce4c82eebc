"""Handlers the streaming runtime loop runs in tests (``tests/unit/streaming/test_runtime_loop.py``).

Each is a Lambda handler ``(event, context)``; the streamed ones return a ``StreamingResponse`` whose chunks
carry the wall-clock time they were produced, so a test can compare it with their arrival at the Runtime
API emulator. ``event["marker"]``, when given, is a file the response's ``close`` writes.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tierserve.streaming.response import StreamingResponse


def _closer(event: dict[str, Any]) -> Any:
    marker = event.get("marker")
    return (lambda: Path(marker).write_text("closed")) if marker else None


def _ticks(n: int, gap_s: float, fail_after: int | None = None, size: int = 0) -> Iterator[bytes]:
    for i in range(n):
        if fail_after is not None and i == fail_after:
            raise ValueError(f"boom after {fail_after} chunks")
        if i:
            time.sleep(gap_s)
        line = {"i": i, "t": time.time(), "pad": "x" * size}
        yield json.dumps(line).encode() + b"\n"


def buffered(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return {"statusCode": 200, "headers": {"content-type": "application/json"},
            "body": json.dumps({"echo": event, "request_id": context.aws_request_id,
                                "remaining_ms": context.get_remaining_time_in_millis(),
                                "function_name": context.function_name,
                                "streaming_runtime": os.environ.get("TIERSERVE_STREAMING_RUNTIME")})}


def streamed(event: dict[str, Any], context: Any) -> StreamingResponse:
    return StreamingResponse(200, {"content-type": "application/x-ndjson", "Set-Cookie": "session=1"},
                             _ticks(int(event.get("n", 4)), float(event.get("gap_s", 0.3)),
                                    size=int(event.get("size", 0))), _closer(event))


def fails_after_two(event: dict[str, Any], context: Any) -> StreamingResponse:
    return StreamingResponse(200, {"content-type": "application/x-ndjson"},
                             _ticks(5, float(event.get("gap_s", 0.05)), fail_after=2), _closer(event))


def fails_before_first(event: dict[str, Any], context: Any) -> StreamingResponse:
    return StreamingResponse(200, {}, _ticks(3, 0.0, fail_after=0), _closer(event))


def raises(event: dict[str, Any], context: Any) -> dict[str, Any]:
    raise KeyError("the handler itself failed")


def endless(event: dict[str, Any], context: Any) -> StreamingResponse:
    return StreamingResponse(200, {}, _ticks(10**6, float(event.get("gap_s", 0.05))), _closer(event))


def big_buffered(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return {"statusCode": 200, "body": "x" * int(event["size"])}


def with_metrics(event: dict[str, Any], context: Any) -> Any:
    """Decorated like the real handlers: Powertools' log_metrics flushes when this returns, before the stream."""
    from tierserve.observability import MetricUnit, metrics

    @metrics.log_metrics
    def handler(event: dict[str, Any], context: Any) -> StreamingResponse:
        def chunks() -> Iterator[bytes]:
            for i in range(3):
                metrics.add_metric(name="StreamedChunks", unit=MetricUnit.Count, value=1)
                yield b"chunk %d\n" % i

        return StreamingResponse(200, {}, chunks())

    return handler(event, context)


def sleeps(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Runs ``event["s"]`` seconds without answering (a function past its timeout is killed)."""
    time.sleep(float(event["s"]))
    return {"statusCode": 200, "body": "late"}


def rest_stream(event: dict[str, Any], context: Any) -> Any:
    """A router for the streaming REST API's tests: ``POST .../stream`` bodies {"n", "gap_s", "marker"} are
    answered with SSE events (the event's resource, path parameters and authorizer in the first), a
    ``buffered`` body field with a buffered proxy response."""
    body = json.loads(event.get("body") or "{}")
    if body.get("buffered"):
        return {"statusCode": 201, "headers": {"content-type": "application/json", "x-kind": "buffered"},
                "body": json.dumps({"resource": event["resource"]})}
    first = {"resource": event["resource"], "params": event.get("pathParameters"), "version": event.get("version"),
             "authorizer": event["requestContext"].get("authorizer"), "method": event["httpMethod"],
             "remaining_ms": context.get_remaining_time_in_millis()}

    def events() -> Iterator[bytes]:
        yield b"data: " + json.dumps(first).encode() + b"\n\n"
        for i in range(int(body.get("n", 3))):
            time.sleep(float(body.get("gap_s", 0.2)))
            yield b"data: " + json.dumps({"i": i, "t": time.time()}).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    return StreamingResponse(200, {"content-type": "text/event-stream", "content-encoding": "gzip"}, events(),
                             _closer(body))
