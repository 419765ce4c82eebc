"""tierserve.batch.chunks: JSONL chunks parsed a chunk at a time, bad lines named, part sizes in the memory budget."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.support.batch_inputs import jsonl_chunks, jsonl_lines


def test_a_regular_jsonl_chunk_is_parsed_at_once_and_equals_the_line_by_line_path(digits):
    # Given 50 one-row shorthand lines with mixed id types
    rows = np.random.default_rng(4).integers(0, 17, (50, 64))
    data = b"".join(json.dumps({"id": i if i % 2 else f"s{i}", "inputs": {"input": r.tolist()}}).encode() + b"\n"
                    for i, r in enumerate(rows))
    (chunk,) = jsonl_chunks(data, 64)
    # When it is assembled at once, and through the record-by-record reference path
    fast = chunk.assemble(digits)
    from tierserve.batch.chunks import records_batch

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
    from tierserve.batch.chunks import LineChunk, records_batch

    # Given a chunk of good lines with one odd line in the middle
    good = jsonl_lines(np.ones((4, 64), int)).splitlines()
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
    from tierserve.batch.chunks import Batch
    from tierserve.batch.records import Record

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


def test_columnar_parts_are_larger_within_the_memory_budget_and_jsonl_keeps_chunk_rows(digits):
    from tierserve.batch.chunks import part_rows
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
