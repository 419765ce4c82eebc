"""tierserve.batch.records: lines parsed with the HTTP API's checks, a chunk's feeds at once or line by line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.support.batch_inputs import jsonl_lines
from tierserve.batch.records import parse_line


def test_parse_line_accepts_the_shorthand_and_the_protocol_form(digits):
    # Given one line of each form for the digits model (input FP32 [-1, 64])
    row = list(range(64))
    short = json.dumps({"id": "a", "inputs": {"input": row}}).encode()
    proto = json.dumps({"id": "b", "inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32",
                                               "data": row + row}]}).encode()
    # When they are parsed
    a, b = parse_line(short, 1, 10, digits), parse_line(proto, 2, 20, digits)
    # Then each becomes float32 feeds with a batch axis
    assert a.error is None and a.feeds["input"].shape == (1, 64) and a.feeds["input"].dtype == np.float32
    assert b.error is None and b.rows == 2 and b.feeds["input"].shape == (2, 64)


@pytest.mark.parametrize(("line", "reason"), [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"id": 1}', "'inputs' must be"),
    # the same parser and messages as the HTTP API
    (b'{"inputs": {"pixels": [1]}}', "unknown input(s) 'pixels'"),
    (b'{"inputs": {"input": [1, 2, 3]}}', "got 3 (shape [1, 3])"),
    (b'{"inputs": {"input": "abc"}}', "'data' must be a JSON array"),
    (b'{"inputs": {"input": [[1, 2], [3]]}}', "not a regular (nested) array"),
    (b'{"inputs": [{"name": "input", "shape": [1, 64], "data": [0]}]}', "'datatype' is missing"),
    (b'{"inputs": [{"name": "input", "shape": [1, 64], "datatype": "INT64", "data": [0]}]}', "got INT64"),
    (b'{"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0]}]}', "needs 64 elements"),
])
def test_malformed_lines_become_record_errors_with_a_reason(digits, line, reason):
    # When a malformed line is parsed
    rec = parse_line(line, 7, 99, digits)
    # Then it is an error for that record alone, naming what is wrong
    assert rec.feeds is None and reason in rec.error and rec.line == 7


def test_a_regular_chunk_is_assembled_at_once_and_equals_the_line_by_line_feeds(digits):
    from tierserve.batch.records import chunk_feeds, read_line

    # Given 50 one-row shorthand lines
    rows = np.random.default_rng(1).integers(0, 17, (50, 64))
    raw = jsonl_lines(rows).splitlines()
    # When the chunk is assembled, and the same lines are parsed one by one
    chunk = [read_line(x, i + 1, 0) for i, x in enumerate(raw)]
    feeds = chunk_feeds(chunk, digits)
    each = [parse_line(x, i + 1, 0, digits) for i, x in enumerate(raw)]
    # Then the feeds are the same float32 rows, each record one row, none left with its JSON
    np.testing.assert_array_equal(feeds["input"], np.concatenate([r.feeds["input"] for r in each]))
    assert feeds["input"].dtype == np.float32 and feeds["input"].shape == (50, 64)
    assert all(r.rows == 1 and r.error is None and r.inputs is None for r in chunk)


@pytest.mark.parametrize(("bad", "reason"), [
    (b'{"id": "x", "inputs": {"input": [1, 2, 3]}}', "got 3"),
    (b'{"id": "x", "inputs": {"input": "abc"}}', "'data' must be a JSON array"),
    (b'{"id": "x", "inputs": {"pixels": [1]}}', "unknown input(s) 'pixels'"),
], ids=["short-row", "not-a-list", "unknown-name"])
def test_a_chunk_with_a_bad_line_names_that_line_alone(digits, bad, reason):
    from tierserve.batch.records import chunk_feeds, read_line

    # Given a chunk of good lines with one bad line in the middle and a protocol-form line
    good = jsonl_lines(np.ones((4, 64), int)).splitlines()
    proto = json.dumps({"id": "p", "inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32",
                                               "data": [0] * 128}]}).encode()
    chunk = [read_line(x, i + 1, 0) for i, x in enumerate([good[0], good[1], bad, proto, good[2]])]
    # When it is assembled
    feeds = chunk_feeds(chunk, digits)
    # Then only the bad line has an error, and the others' rows are all there (the protocol line's two)
    assert [r.error is None for r in chunk] == [True, True, False, True, True]
    assert reason in chunk[2].error and feeds["input"].shape == (1 + 1 + 2 + 1, 64)
