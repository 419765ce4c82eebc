"""tierserve.batch.readers: JSONL, NPZ and Parquet read in chunks, by range, resuming exactly (no AWS: a fake S3)."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from tests.support.batch_inputs import Body, FakeS3, jsonl_chunks, jsonl_lines, parquet_bytes
from tierserve.batch.locations import BatchInputError
from tierserve.batch.readers import iter_lines


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


def test_jsonl_shards_by_byte_range_cover_every_line_once(digits):
    from tierserve.batch.locations import S3Location
    from tierserve.batch.readers import jsonl_records

    # Given a 30-line object cut into three byte ranges that fall inside lines
    data = jsonl_lines(np.zeros((30, 64), int))
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


@pytest.mark.parametrize("fixed", [False, True], ids=["list", "fixed-size-list"])
def test_parquet_rows_are_read_by_row_range_across_row_groups(digits, fixed):
    pytest.importorskip("pyarrow")
    from tierserve.batch.locations import S3Location
    from tierserve.batch.readers import parquet_records

    # Given 30 rows in row groups of 7, with ids
    rows = np.random.default_rng(2).integers(0, 17, (30, 64))
    s3 = FakeS3({"k.parquet": parquet_bytes(rows, [f"p{i}" for i in range(30)], fixed=fixed)})
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

    from tierserve.batch.locations import S3Location
    from tierserve.batch.readers import parquet_records

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


def test_jsonl_chunks_cut_lines_like_the_line_reader_and_resume_at_their_end():
    # Given lines that straddle the reader's 7-byte pieces, a blank line, CRLF, and no final newline
    data = b'{"a":1}\n\n{"b":22}\r\n{"c":333}\n{"d":4444}\n{"e":5}'
    # When they are cut into chunks of 2 lines, and read again from the end of the first chunk
    chunks = jsonl_chunks(data, 2)
    again = jsonl_chunks(data, 2, chunks[0].end, chunks[0].next_line)
    # Then the chunks hold the line reader's lines, in order, each ending where the next one starts
    lines = [raw for _, _, raw in iter_lines(Body(data), 0, 1)]
    assert [raw for c in chunks for raw in c.raws] == lines
    assert [(c.first_line, len(c)) for c in chunks] == [(1, 2), (3, 2), (5, 2)]
    assert [c.end for c in chunks] == [9, 29, len(data)]
    assert [r.end for c in chunks for r in c.records()] == [end for _, end, _ in iter_lines(Body(data), 0, 1)]
    assert [c.raws for c in again] == [c.raws for c in chunks[1:]]


def test_jsonl_chunks_of_a_byte_range_hold_the_lines_that_start_inside_it():
    # Given 30 lines and a range that ends inside line 12
    data = jsonl_lines(np.zeros((30, 64), int))
    ends = [end for _, end, _ in iter_lines(Body(data), 0, 1)]
    # When the range [0, middle of line 12) is read in chunks of 5
    chunks = jsonl_chunks(data, 5, stop=ends[10] + 3)
    # Then lines 1-12 come back (the last chunk shorter), and the next shard starts at line 13's offset
    assert [len(c) for c in chunks] == [5, 5, 2] and chunks[-1].end == ends[11]
    assert jsonl_chunks(data, 5, ends[11], 13)[0].raws[0].startswith(b'{"id": "r12"')


def test_parquet_chunks_hold_exactly_n_rows_across_row_groups_and_resumes(digits):
    pytest.importorskip("pyarrow")
    from tierserve.batch.chunks import iter_chunks
    from tierserve.batch.locations import S3Location
    from tierserve.batch.readers import parquet_records

    # Given 30 rows in row groups of 7
    rows = np.random.default_rng(6).integers(0, 17, (30, 64))
    s3 = FakeS3({"k.parquet": parquet_bytes(rows, [f"p{i}" for i in range(30)])})
    loc = S3Location("bucket-1", "k.parquet")
    # When it is read in chunks of 8 from row 0, and again from row 16 (a checkpoint)
    whole = list(iter_chunks(parquet_records(s3, loc, {}, digits, 0, 8), 8))
    resumed = list(iter_chunks(parquet_records(s3, loc, {}, digits, 16, 8), 8))
    # Then every chunk but the last holds 8 rows, the resumed ones are the same chunks, columns in float32
    assert [(c.first_row, len(c)) for c in whole] == [(0, 8), (8, 8), (16, 8), (24, 6)]
    assert [(c.first_row, c.ids) for c in resumed] == [(c.first_row, c.ids) for c in whole[2:]]
    batch = whole[1].assemble(digits)
    np.testing.assert_array_equal(batch.feeds["input"], rows[8:16].astype(np.float32))
    assert batch.lines.tolist() == list(range(9, 17)) and whole[1].end == 16 and whole[1].next_line == 17


@pytest.mark.parametrize(("ids", "expected"), [
    ([7, 8, 9], [7, 8, 9]), (["a", "b", "c"], ["a", "b", "c"]), ([b"x", b"\xff", b"z"], ["x", "\ufffd", "z"]),
], ids=["integers", "strings", "binary"])
def test_parquet_ids_come_back_as_python_values_whatever_their_column_type(digits, ids, expected):
    pa = pytest.importorskip("pyarrow")
    import io as _io

    import pyarrow.parquet as pq

    from tierserve.batch.chunks import iter_chunks
    from tierserve.batch.locations import S3Location
    from tierserve.batch.readers import parquet_records

    # Given three rows whose id column is integers, strings or (not always UTF-8) bytes
    buf = _io.BytesIO()
    pq.write_table(pa.table({"input": pa.array([[1.0] * 64] * 3), "id": pa.array(ids)}), buf)
    s3 = FakeS3({"k.parquet": buf.getvalue()})
    # When they are read as a chunk
    (chunk,) = iter_chunks(parquet_records(s3, S3Location("bucket-1", "k.parquet"), {}, digits, 0, 8), 8)
    # Then the ids are plain Python values (bytes decoded, as the record path does)
    assert chunk.ids == expected and [type(i) for i in chunk.ids] == [type(e) for e in expected]
