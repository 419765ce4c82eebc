"""Readers, row parsing and part encoding (no AWS needed except where a body is read)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from tierserve.batch.io import (
    BatchInputError,
    Record,
    encode_errors,
    encode_part,
    iter_lines,
    parse_line,
    parse_s3_uri,
    split_input_key,
)
from tierserve.errors import InvalidNameError
from tierserve.manifest import Manifest


@pytest.fixture(scope="module")
def digits(digits_store):
    return Manifest.loads((digits_store / "manifest.json").read_text()).resolve("digits")


class Body(io.BytesIO):
    """A streaming body that hands out data in small pieces, like botocore's."""

    def read(self, n: int = -1) -> bytes:
        return super().read(min(n, 7) if n and n > 0 else 7)


def test_iter_lines_reports_offsets_that_resume_exactly_at_the_next_line():
    # Given a body whose lines straddle read boundaries, with no final newline
    data = b'{"a":1}\n\n{"b":22}\r\n{"c":333}'
    # When it is read whole, and again from the offset after line 2
    whole = list(iter_lines(Body(data), 0, 1))
    resumed = list(iter_lines(Body(data[whole[1][1]:]), whole[1][1], 3))
    # Then line numbers and offsets line up, and the resumed read yields the same tail
    assert [(n, raw) for n, _, raw in whole] == [(1, b'{"a":1}'), (2, b""), (3, b'{"b":22}\r'), (4, b'{"c":333}')]
    assert whole[-1][1] == len(data)
    assert resumed == whole[2:]


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


def test_encode_part_is_deterministic_and_splits_outputs_by_rows():
    # Given two records (1 row, then 2 rows) and their batched outputs
    recs = [Record(line=1, end=5, id="a", rows=1), Record(line=2, end=9, id=None, rows=2)]
    outs = {"label": np.array([3, 1, 4], dtype=np.int64), "p": np.arange(6, dtype=np.float32).reshape(3, 2)}
    # When the part is encoded twice
    body = encode_part(recs, outs, {"label": "INT64", "p": "FP32"})
    # Then it is byte-identical and each line holds its own rows
    assert body == encode_part(recs, outs, {"label": "INT64", "p": "FP32"})
    first, second = (json.loads(x) for x in body.splitlines())
    assert first == {"id": "a", "line": 1, "outputs": [
        {"name": "label", "datatype": "INT64", "shape": [1], "data": [3]},
        {"name": "p", "datatype": "FP32", "shape": [1, 2], "data": [0.0, 1.0]}]}
    assert second["outputs"][1] == {"name": "p", "datatype": "FP32", "shape": [2, 2], "data": [2.0, 3.0, 4.0, 5.0]}
    assert encode_part([], {}, {}) == b"" and encode_errors([]) == b""


def test_keys_and_uris_are_checked_against_the_allowlists():
    # Then well-formed inputs split into model and job, and anything else is refused clearly
    assert split_input_key("batch/in/digits/night-1.jsonl") == ("digits", "night-1")
    assert split_input_key("elsewhere/x.npz") == (None, "x")
    for bad in ("batch/in/digits/../x.jsonl", "batch/in/di gits/x.jsonl", "/abs.jsonl"):
        with pytest.raises(InvalidNameError):
            split_input_key(bad)
    with pytest.raises(BatchInputError, match=r"\.jsonl or \.npz"):
        split_input_key("batch/in/digits/x.csv")
    with pytest.raises(BatchInputError, match="s3://"):
        parse_s3_uri("https://bucket/key", "input")
    with pytest.raises(InvalidNameError):
        parse_s3_uri("s3://Bad_Bucket/key.jsonl", "input")
