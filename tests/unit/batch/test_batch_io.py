"""Readers, row parsing and part encoding (no AWS needed except where a body is read)."""

from __future__ import annotations

import io
import itertools
import json
import re

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
    for bad in ("batch/in/digits/../x.jsonl", "batch/in/di gits/x.jsonl", "/abs.jsonl", "batch/in/digits/x\n.jsonl"):
        with pytest.raises(InvalidNameError):
            split_input_key(bad)
    with pytest.raises(InvalidNameError):
        parse_s3_uri("s3://bucket\n/key.jsonl", "input")  # '$' would match before a final newline
    with pytest.raises(BatchInputError, match=r"\.jsonl, \.npz or \.parquet"):
        split_input_key("batch/in/digits/x.csv")
    with pytest.raises(BatchInputError, match="s3://"):
        parse_s3_uri("https://bucket/key", "input")
    with pytest.raises(InvalidNameError):
        parse_s3_uri("s3://Bad_Bucket/key.jsonl", "input")


# --- chunks, ranges and Parquet ----------------------------------------------------------------------


class FakeS3:
    """get_object with Range, over objects held in memory (what the readers ask of S3)."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects

    def get_object(self, Bucket: str, Key: str, Range: str | None = None, **_):
        data = self.objects[Key]
        if Range:
            data = data[int(Range.removeprefix("bytes=").rstrip("-")):]
        return {"Body": Body(data)}


def _lines(rows: np.ndarray, ids: str = "r") -> bytes:
    return b"".join(json.dumps({"id": f"{ids}{i}", "inputs": {"input": r.tolist()}}).encode() + b"\n"
                    for i, r in enumerate(rows))


def test_a_regular_chunk_is_assembled_at_once_and_equals_the_line_by_line_feeds(digits):
    from tierserve.batch.io import chunk_feeds, read_line

    # Given 50 one-row shorthand lines
    rows = np.random.default_rng(1).integers(0, 17, (50, 64))
    raw = _lines(rows).splitlines()
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
    from tierserve.batch.io import chunk_feeds, read_line

    # Given a chunk of good lines with one bad line in the middle and a protocol-form line
    good = _lines(np.ones((4, 64), int)).splitlines()
    proto = json.dumps({"id": "p", "inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32",
                                               "data": [0] * 128}]}).encode()
    chunk = [read_line(x, i + 1, 0) for i, x in enumerate([good[0], good[1], bad, proto, good[2]])]
    # When it is assembled
    feeds = chunk_feeds(chunk, digits)
    # Then only the bad line has an error, and the others' rows are all there (the protocol line's two)
    assert [r.error is None for r in chunk] == [True, True, False, True, True]
    assert reason in chunk[2].error and feeds["input"].shape == (1 + 1 + 2 + 1, 64)


def test_jsonl_shards_by_byte_range_cover_every_line_once(digits):
    from tierserve.batch.io import S3Location, jsonl_records

    # Given a 30-line object cut into three byte ranges that fall inside lines
    data = _lines(np.zeros((30, 64), int))
    s3, loc = FakeS3({"k.jsonl": data}), S3Location("bucket-1", "k.jsonl")
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]

    def first_line_at(offset: int) -> int:  # a shard starts at the first line that starts at or after its cut
        return 0 if offset == 0 else data.index(b"\n", offset - 1) + 1

    # When each shard reads the lines that start inside its range
    ids = []
    for lo, hi in itertools.pairwise(cuts):
        start = first_line_at(lo)
        ids += [r.id for r in jsonl_records(s3, loc, {}, digits, start, 1, len(data), stop=hi)]
    # Then every line is read exactly once, in order
    assert ids == [f"r{i}" for i in range(30)]


def _parquet(rows: np.ndarray, ids: list | None = None, row_group_size: int = 7, fixed: bool = False) -> bytes:
    import io as _io

    import pyarrow as pa
    import pyarrow.parquet as pq

    flat = pa.array(rows.reshape(-1).astype(np.float32))
    col = (pa.FixedSizeListArray.from_arrays(flat, rows.shape[1]) if fixed
           else pa.ListArray.from_arrays(pa.array(np.arange(0, rows.size + 1, rows.shape[1], dtype=np.int32)), flat))
    cols = {"input": col, **({"id": pa.array(ids)} if ids is not None else {})}
    buf = _io.BytesIO()
    pq.write_table(pa.table(cols), buf, row_group_size=row_group_size)
    return buf.getvalue()


@pytest.mark.parametrize("fixed", [False, True], ids=["list", "fixed-size-list"])
def test_parquet_rows_are_read_by_row_range_across_row_groups(digits, fixed):
    pytest.importorskip("pyarrow")
    from tierserve.batch.io import S3Location, parquet_records

    # Given 30 rows in row groups of 7, with ids
    rows = np.random.default_rng(2).integers(0, 17, (30, 64))
    s3 = FakeS3({"k.parquet": _parquet(rows, [f"p{i}" for i in range(30)], fixed=fixed)})
    loc = S3Location("bucket-1", "k.parquet")
    # When rows [10, 23) are read in chunks of 4
    recs = list(parquet_records(s3, loc, {}, digits, 10, 4, stop_row=23))
    # Then exactly those rows come back, numbered, with their ids and float32 feeds
    assert [r.line for r in recs] == list(range(11, 24)) and [r.end for r in recs] == list(range(11, 24))
    assert [r.id for r in recs] == [f"p{i}" for i in range(10, 23)]
    np.testing.assert_array_equal(np.concatenate([r.feeds["input"] for r in recs]), rows[10:23].astype(np.float32))
    # And the whole file reads back whole
    assert len(list(parquet_records(s3, loc, {}, digits, 0, 8))) == 30


def test_parquet_inputs_that_do_not_fit_the_model_are_refused_with_the_reason(digits):
    pa = pytest.importorskip("pyarrow")
    import io as _io

    import pyarrow.parquet as pq

    from tierserve.batch.io import S3Location, parquet_records

    def table_bytes(**cols) -> bytes:
        buf = _io.BytesIO()
        pq.write_table(pa.table(cols), buf)
        return buf.getvalue()

    cases = {
        "no-column.parquet": (table_bytes(pixels=pa.array([1.0])), "no column 'input'"),
        "ragged.parquet": (table_bytes(input=pa.array([[1.0] * 64, [1.0] * 63])), "rows of different lengths"),
        "narrow.parquet": (table_bytes(input=pa.array([[1.0] * 8])), "expects [64]"),
        "garbage.parquet": (b"not parquet at all", "not a readable Parquet file"),
    }
    s3 = FakeS3({k: v for k, (v, _) in cases.items()})
    for key, (_, reason) in cases.items():
        with pytest.raises(BatchInputError, match=re.escape(reason)):
            list(parquet_records(s3, S3Location("bucket-1", key), {}, digits, 0, 4))


def test_parquet_parts_are_deterministic_and_hold_one_row_per_input_row():
    pytest.importorskip("pyarrow")
    import io as _io

    import pyarrow.parquet as pq

    from tierserve.batch.io import encode_parquet_part

    recs = [Record(line=1, end=1, id="a", rows=1), Record(line=2, end=2, id=7, rows=2)]
    outs = {"label": np.array([3, 1, 4], dtype=np.int64), "p": np.arange(6, dtype=np.float32).reshape(3, 2)}
    body = encode_parquet_part(recs, outs)
    assert body == encode_parquet_part(recs, outs)
    table = pq.read_table(_io.BytesIO(body)).to_pydict()
    assert table == {"id": ["a", "7", "7"], "line": [1, 2, 2], "label": [3, 1, 4],
                     "p": [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]}
