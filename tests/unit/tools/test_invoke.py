"""`tierserve invoke` (tierserve_tools.invoke): the handler through the real streaming runtime loop in a fresh
interpreter; a streamed answer written as it arrives, a buffered one as its JSON line."""

from __future__ import annotations

import io
import json
import os
import time

from tests.conftest import ROOT
from tierserve_tools.invoke import run_once

H = "tests.support.streaming_handlers"


class TimedSink(io.BytesIO):
    """Records when each write came."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[float, bytes]] = []

    def write(self, data) -> int:  # type: ignore[no-untyped-def, override]
        self.writes.append((time.time(), bytes(data)))
        return super().write(data)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def test_a_streamed_answer_is_printed_as_it_arrives_after_its_prelude_line() -> None:
    sink = TimedSink()
    rc = run_once("fn", f"{H}.streamed", _env(), 10.0, b'{"n": 3, "gap_s": 0.4}', sink)
    assert rc == 0
    prelude, _, body = sink.getvalue().partition(b"\n")
    assert json.loads(prelude)["statusCode"] == 200
    lines = [json.loads(line) for line in body.splitlines()]
    assert [line["i"] for line in lines] == [0, 1, 2]
    # each line was written within 0.2 s of being produced: not all at the end
    written = {json.loads(data)["i"]: at for at, data in sink.writes if data.startswith(b'{"i"')}
    for line in lines[1:]:
        assert 0 <= written[line["i"]] - line["t"] < 0.2


def test_a_buffered_answer_is_one_json_line_and_a_failure_its_error_with_status_1() -> None:
    sink = io.BytesIO()
    assert run_once("fn", f"{H}.buffered", _env(), 10.0, b'{"x": 1}', sink) == 0
    reply = json.loads(sink.getvalue())
    assert reply["statusCode"] == 200 and json.loads(reply["body"])["streaming_runtime"] == "1"
    sink = io.BytesIO()
    assert run_once("fn", f"{H}.raises", _env(), 10.0, b"{}", sink) == 1
    assert json.loads(sink.getvalue())["errorType"] == "KeyError"
    sink = io.BytesIO()
    assert run_once("fn", f"{H}.fails_after_two", _env(), 10.0, b'{"gap_s": 0}', sink) == 1
    *_, last = sink.getvalue().splitlines()
    assert json.loads(last)["errorType"] == "ValueError"
