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


# --- chunks: JSONL parsed a chunk at a time, columns straight into arrays, vectorised parts ----------------


def _chunks(data: bytes, n: int, start: int = 0, first_line: int = 1, stop: int | None = None):
    from tierserve.batch.io import S3Location, iter_chunks, jsonl_records

    src = jsonl_records(FakeS3({"k.jsonl": data}), S3Location("bucket-1", "k.jsonl"), {}, None, start, first_line,
                        len(data), stop=stop)
    return list(iter_chunks(src, n))


def test_jsonl_chunks_cut_lines_like_the_line_reader_and_resume_at_their_end():
    # Given lines that straddle the reader's 7-byte pieces, a blank line, CRLF, and no final newline
    data = b'{"a":1}\n\n{"b":22}\r\n{"c":333}\n{"d":4444}\n{"e":5}'
    # When they are cut into chunks of 2 lines, and read again from the end of the first chunk
    chunks = _chunks(data, 2)
    again = _chunks(data, 2, chunks[0].end, chunks[0].next_line)
    # Then the chunks hold the line reader's lines, in order, each ending where the next one starts
    lines = [raw for _, _, raw in iter_lines(Body(data), 0, 1)]
    assert [raw for c in chunks for raw in c.raws] == lines
    assert [(c.first_line, len(c)) for c in chunks] == [(1, 2), (3, 2), (5, 2)]
    assert [c.end for c in chunks] == [9, 29, len(data)]
    assert [r.end for c in chunks for r in c.records()] == [end for _, end, _ in iter_lines(Body(data), 0, 1)]
    assert [c.raws for c in again] == [c.raws for c in chunks[1:]]


def test_jsonl_chunks_of_a_byte_range_hold_the_lines_that_start_inside_it():
    # Given 30 lines and a range that ends inside line 12
    data = _lines(np.zeros((30, 64), int))
    ends = [end for _, end, _ in iter_lines(Body(data), 0, 1)]
    # When the range [0, middle of line 12) is read in chunks of 5
    chunks = _chunks(data, 5, stop=ends[10] + 3)
    # Then lines 1-12 come back (the last chunk shorter), and the next shard starts at line 13's offset
    assert [len(c) for c in chunks] == [5, 5, 2] and chunks[-1].end == ends[11]
    assert _chunks(data, 5, ends[11], 13)[0].raws[0].startswith(b'{"id": "r12"')


def test_a_regular_jsonl_chunk_is_parsed_at_once_and_equals_the_line_by_line_path(digits):
    # Given 50 one-row shorthand lines with mixed id types
    rows = np.random.default_rng(4).integers(0, 17, (50, 64))
    data = b"".join(json.dumps({"id": i if i % 2 else f"s{i}", "inputs": {"input": r.tolist()}}).encode() + b"\n"
                    for i, r in enumerate(rows))
    (chunk,) = _chunks(data, 64)
    # When it is assembled at once, and through the record-by-record reference path
    fast = chunk.assemble(digits)
    from tierserve.batch.io import records_batch

    slow = records_batch(chunk.records(), digits)
    # Then both give the same feeds, ids and line numbers, one row a line, nothing bad
    np.testing.assert_array_equal(fast.feeds["input"], slow.feeds["input"])
    assert fast.feeds["input"].dtype == np.float32 and fast.ids == slow.ids and fast.counts is None
    assert fast.lines.tolist() == slow.lines.tolist() == list(range(1, 51))
    assert fast.rows == 50 and fast.bad == [] and fast.blank == 0


@pytest.mark.parametrize("odd", [
    b"", b"   ", b"{not json", b"[1, 2]", b'{"id": "x"}', b'{"id": "x", "inputs": {"input": [1, 2]}}',
    b'{"id": "x", "inputs": {"input": [true] }}', b'{"id": 1, "inputs": {"input": [NaN, 1]}}',
], ids=["empty", "spaces", "not-json", "not-object", "no-inputs", "short-row", "bools", "nan-literal"])
def test_a_jsonl_chunk_with_an_odd_line_is_parsed_line_by_line_and_names_it(digits, odd):
    from tierserve.batch.io import LineChunk, records_batch

    # Given a chunk of good lines with one odd line in the middle
    good = _lines(np.ones((4, 64), int)).splitlines()
    raws = [good[0], good[1], odd, good[2], good[3]]
    chunk = LineChunk(raws, 1, 0, sum(len(r) + 1 for r in raws))
    # When it is assembled
    batch = chunk.assemble(digits)
    # Then it equals the reference path: the odd line is bad (or blank) alone, the others are scored
    ref = records_batch(chunk.records(), digits)
    assert batch.lines.tolist() == ref.lines.tolist() == [1, 2, 4, 5]
    assert [(r.line, r.error) for r in batch.bad] == [(r.line, r.error) for r in ref.bad]
    assert batch.blank + len(batch.bad) == 1 and batch.feeds["input"].shape == (4, 64)


def test_lines_that_fail_when_scored_one_at_a_time_join_the_bad_ones_in_line_order():
    from tierserve.batch.io import Batch, Record

    # Given a batch of three good lines (one of two rows) and a bad line 2
    batch = Batch({}, ["a", "c", "d"], np.array([1, 3, 4]), np.array([1, 2, 1]), [Record(2, 0, "b", error="bad")])
    # When scoring line 3 alone fails
    for rec in batch:
        if rec.line == 3:
            rec.error = "refused"
    kept = batch.without_errors()
    # Then lines 1 and 4 remain with their rows, and the bad lines are 2 then 3
    assert kept.ids == ["a", "d"] and kept.lines.tolist() == [1, 4] and kept.rows == 2
    assert [(r.line, r.error) for r in kept.bad] == [(2, "bad"), (3, "refused")]


def test_the_vectorised_part_is_byte_identical_to_the_line_by_line_encoding():
    from tierserve.batch.io import Batch

    # Given 20 one-row lines with ids of several JSON types, and outputs of rank 1, 2 and 3 (a % in a name)
    rng = np.random.default_rng(5)
    ids = [f"r{i}" if i % 3 else (i if i % 2 else None) for i in range(20)]
    outs = {"label": rng.integers(0, 9, 20), "p%": rng.random((20, 3), dtype=np.float32),
            "img": rng.random((20, 2, 2))}
    types = {"label": "INT64", "p%": "FP32", "img": "FP64"}
    one = Batch({}, ids, np.arange(1, 21))
    # When it is encoded as one row a line (the template) and with explicit row counts (the general loop)
    fast = encode_part(one, outs, types)
    general = encode_part(Batch({}, ids, np.arange(1, 21), np.ones(20, dtype=np.int64)), outs, types)
    # Then the bytes are the same, and each line reads back as its row
    assert fast == general
    line = json.loads(fast.splitlines()[4])
    assert line["id"] == "r4" and line["line"] == 5 and line["outputs"][1]["name"] == "p%"
    assert line["outputs"][2]["shape"] == [1, 2, 2] and len(line["outputs"][2]["data"]) == 4


def test_parquet_chunks_hold_exactly_n_rows_across_row_groups_and_resumes(digits):
    pytest.importorskip("pyarrow")
    from tierserve.batch.io import S3Location, iter_chunks, parquet_records

    # Given 30 rows in row groups of 7
    rows = np.random.default_rng(6).integers(0, 17, (30, 64))
    s3, loc = FakeS3({"k.parquet": _parquet(rows, [f"p{i}" for i in range(30)])}), S3Location("bucket-1", "k.parquet")
    # When it is read in chunks of 8 from row 0, and again from row 16 (a checkpoint)
    whole = list(iter_chunks(parquet_records(s3, loc, {}, digits, 0, 8), 8))
    resumed = list(iter_chunks(parquet_records(s3, loc, {}, digits, 16, 8), 8))
    # Then every chunk but the last holds 8 rows, the resumed ones are the same chunks, columns in float32
    assert [(c.first_row, len(c)) for c in whole] == [(0, 8), (8, 8), (16, 8), (24, 6)]
    assert [(c.first_row, c.ids) for c in resumed] == [(c.first_row, c.ids) for c in whole[2:]]
    batch = whole[1].assemble(digits)
    np.testing.assert_array_equal(batch.feeds["input"], rows[8:16].astype(np.float32))
    assert batch.lines.tolist() == list(range(9, 17)) and whole[1].end == 16 and whole[1].next_line == 17


def test_columnar_parts_are_larger_within_the_memory_budget_and_jsonl_keeps_chunk_rows(digits):
    from tierserve.batch.io import part_rows
    from tierserve.manifest import ModelVersion, TensorSpec

    dynamic = ModelVersion("m", "1", (TensorSpec("ids", "INT64", (-1, -1)),), (TensorSpec("y", "FP32", (-1, 4)),),
                           {}, "fp32")
    # Then JSONL parts keep CHUNK_ROWS, NPZ / Parquet parts grow up to COLUMNAR_CHUNK_ROWS, fewer with less memory
    assert part_rows("jsonl", digits, 4096, 65536, 3538) == 4096
    assert part_rows("parquet", digits, 4096, 65536, 3538) == 65536
    assert 4096 < part_rows("npz", digits, 4096, 65536, 1024) < 65536
    assert part_rows("parquet", digits, 4096, 65536, 1) == 4096  # never fewer than CHUNK_ROWS
    # And a model whose rows have no fixed size keeps CHUNK_ROWS
    assert part_rows("parquet", dynamic, 4096, 65536, 3538) == 4096


@pytest.mark.parametrize(("ids", "expected"), [
    ([7, 8, 9], [7, 8, 9]), (["a", "b", "c"], ["a", "b", "c"]), ([b"x", b"\xff", b"z"], ["x", "\ufffd", "z"]),
], ids=["integers", "strings", "binary"])
def test_parquet_ids_come_back_as_python_values_whatever_their_column_type(digits, ids, expected):
    pa = pytest.importorskip("pyarrow")
    import io as _io

    import pyarrow.parquet as pq

    from tierserve.batch.io import S3Location, iter_chunks, parquet_records

    # Given three rows whose id column is integers, strings or (not always UTF-8) bytes
    buf = _io.BytesIO()
    pq.write_table(pa.table({"input": pa.array([[1.0] * 64] * 3), "id": pa.array(ids)}), buf)
    s3 = FakeS3({"k.parquet": buf.getvalue()})
    # When they are read as a chunk
    (chunk,) = iter_chunks(parquet_records(s3, S3Location("bucket-1", "k.parquet"), {}, digits, 0, 8), 8)
    # Then the ids are plain Python values (bytes decoded, as the record path does)
    assert chunk.ids == expected and [type(i) for i in chunk.ids] == [type(e) for e in expected]
