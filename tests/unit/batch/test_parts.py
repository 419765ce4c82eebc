"""tierserve.batch.parts: part encoders, deterministic bytes, the vectorised path equal to the line-by-line one."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tierserve.batch.parts import encode_errors, encode_part
from tierserve.batch.records import Record


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


def test_parquet_parts_are_deterministic_and_hold_one_row_per_input_row():
    pytest.importorskip("pyarrow")
    import io as _io

    import pyarrow.parquet as pq

    from tierserve.batch.parts import encode_parquet_part

    recs = [Record(line=1, end=1, id="a", rows=1), Record(line=2, end=2, id=7, rows=2)]
    outs = {"label": np.array([3, 1, 4], dtype=np.int64), "p": np.arange(6, dtype=np.float32).reshape(3, 2)}
    body = encode_parquet_part(recs, outs)
    assert body == encode_parquet_part(recs, outs)
    table = pq.read_table(_io.BytesIO(body)).to_pydict()
    assert table == {"id": ["a", "7", "7"], "line": [1, 2, 2], "label": [3, 1, 4],
                     "p": [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]}


def test_the_vectorised_part_is_byte_identical_to_the_line_by_line_encoding():
    from tierserve.batch.chunks import Batch

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
