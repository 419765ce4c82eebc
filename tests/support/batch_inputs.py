"""Batch inputs in memory for the reader, chunk and part tests: a streaming body, a fake S3, JSONL and Parquet.

Why: the batch readers are tested without AWS; these build the bytes they read and hand them out in small
pieces, as botocore's streaming bodies do, so that lines straddle read boundaries.
"""

from __future__ import annotations

import io
import json

import numpy as np


class Body(io.BytesIO):
    """A streaming body that hands out data in small pieces, like botocore's."""

    def read(self, n: int = -1) -> bytes:
        return super().read(min(n, 7) if n and n > 0 else 7)


class FakeS3:
    """get_object with Range, over objects held in memory (what the readers ask of S3)."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects

    def get_object(self, Bucket: str, Key: str, Range: str | None = None, **_):
        data = self.objects[Key]
        if Range:
            data = data[int(Range.removeprefix("bytes=").rstrip("-")):]
        return {"Body": Body(data)}


def jsonl_lines(rows: np.ndarray, ids: str = "r") -> bytes:
    """One shorthand JSONL line per row, ids ``{ids}0``, ``{ids}1``..."""
    return b"".join(json.dumps({"id": f"{ids}{i}", "inputs": {"input": r.tolist()}}).encode() + b"\n"
                    for i, r in enumerate(rows))


def parquet_bytes(rows: np.ndarray, ids: list | None = None, row_group_size: int = 7, fixed: bool = False) -> bytes:
    """A Parquet file with an ``input`` list column (fixed-size lists if ``fixed``) and an optional ``id``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    flat = pa.array(rows.reshape(-1).astype(np.float32))
    col = (pa.FixedSizeListArray.from_arrays(flat, rows.shape[1]) if fixed
           else pa.ListArray.from_arrays(pa.array(np.arange(0, rows.size + 1, rows.shape[1], dtype=np.int32)), flat))
    cols = {"input": col, **({"id": pa.array(ids)} if ids is not None else {})}
    buf = io.BytesIO()
    pq.write_table(pa.table(cols), buf, row_group_size=row_group_size)
    return buf.getvalue()


def jsonl_chunks(data: bytes, n: int, start: int = 0, first_line: int = 1, stop: int | None = None) -> list:
    """The JSONL reader's chunks of ``n`` lines of ``data``, from ``start`` (a line's first byte) to ``stop``."""
    from tierserve.batch.chunks import iter_chunks
    from tierserve.batch.locations import S3Location
    from tierserve.batch.readers import jsonl_records

    src = jsonl_records(FakeS3({"k.jsonl": data}), S3Location("bucket-1", "k.jsonl"), {}, None, start, first_line,
                        len(data), stop=stop)
    return list(iter_chunks(src, n))
