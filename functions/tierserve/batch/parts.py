"""Part encoders: a part's scored lines as JSONL (or Parquet, for Parquet inputs), and its bad lines.

Why: a part's bytes must depend only on its lines and their outputs, so that a part rewritten after a crash
is identical and a job's output does not depend on who ran it (one function, or shards on many). Parts are
written with orjson (JSONL: one template per part when every line is one row) or pyarrow (Parquet),
a whole output column at a time, without a Python object per value where it can be avoided.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson

from tierserve.batch.chunks import Batch
from tierserve.batch.records import Record
from tierserve.protocol.tensors import json_values


def _columns(good: Batch | list[Record]) -> tuple[list[Any], np.ndarray, np.ndarray | None]:
    """(ids, line numbers, rows per line or None for one each) of the good lines of a part."""
    if isinstance(good, Batch):
        return good.ids, good.lines, good.counts
    counts = [r.rows for r in good]
    return ([r.id for r in good], np.array([r.line for r in good], dtype=np.int64),
            None if all(c == 1 for c in counts) else np.array(counts, dtype=np.int64))


def encode_part(good: Batch | list[Record], outputs: dict[str, np.ndarray], datatypes: dict[str, str]) -> bytes:
    """One JSON line per good input line, in order: ``{"id", "line", "outputs": [{name, datatype, shape, data}]}``.

    Deterministic: the same lines and outputs always give the same bytes. Each output's rows are turned
    into Python values once for the whole part and encoded with one ``map(orjson.dumps, ...)``; when every
    line holds one row (the usual case) each line is one ``%`` of a template built once per part."""
    ids, lines, counts = _columns(good)
    if not ids:
        return b""
    dumps = orjson.dumps
    heads: list[tuple[bytes, bytes]] = []  # per output: text before the row count, text between it and data
    values: list[list[Any]] = []
    for name, arr in outputs.items():
        values.append(_row_values(arr, datatypes[name]))  # per-row flat lists (2-D+), or scalars (1-D)
        tail = b"".join(b",%d" % d for d in arr.shape[1:])
        heads.append((b'{"name":' + dumps(name) + b',"datatype":' + dumps(datatypes[name]) + b',"shape":[',
                      tail + b'],"data":'))
    if counts is None:
        template = b'{"id":%s,"line":%d,"outputs":[' + b",".join(
            (head + b"1" + tail).replace(b"%", b"%%") + b"%s}" for head, tail in heads) + b"]}"
        pieces: list[Any] = [list(map(dumps, ids)), lines.tolist()]
        for arr, vals in zip(outputs.values(), values, strict=True):
            text = list(map(dumps, vals))
            pieces.append([b"[%s]" % x for x in text] if arr.ndim == 1 else text)
        return b"\n".join([template % args for args in zip(*pieces, strict=True)]) + b"\n"
    out_lines = []
    row = 0
    ndims = [arr.ndim for arr in outputs.values()]
    for rid, line, n in zip(ids, lines.tolist(), counts.tolist(), strict=True):
        outs = []
        for (head, tail), vals, ndim in zip(heads, values, ndims, strict=True):
            if ndim == 1:
                data = vals[row:row + n]
            elif n == 1:
                data = vals[row]
            else:
                data = [x for r in vals[row:row + n] for x in r]
            outs.append(b"%s%d%s%s}" % (head, n, tail, dumps(data)))
        row += n
        out_lines.append(b'{"id":%s,"line":%d,"outputs":[%s]}' % (dumps(rid), line, b",".join(outs)))
    return b"\n".join(out_lines) + b"\n"


def _row_values(arr: np.ndarray, datatype: str) -> list[Any]:
    if arr.ndim <= 1:
        return json_values(arr, datatype)
    if datatype != "BYTES":
        return arr.reshape(len(arr), -1).tolist()
    flat, k = json_values(arr, datatype), int(math.prod(arr.shape[1:]))
    return [flat[i:i + k] for i in range(0, len(flat), k)]


def encode_parquet_part(good: Batch | list[Record], outputs: dict[str, np.ndarray]) -> bytes:
    """A Parquet part: columns ``id``, ``line`` and one per output (a fixed-size list per row when the
    output has more than one value per row); one row per input row, in order. Deterministic bytes."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    ids, lines, counts = _columns(good)
    if counts is not None:
        lines = np.repeat(lines, counts)
        ids = [i for i, c in zip(ids, counts.tolist(), strict=True) for _ in range(c)]
    rows = len(lines)
    cols: dict[str, Any] = {"id": pa.array([None if i is None else i if isinstance(i, str) else str(i) for i in ids],
                                           pa.string()),
                            "line": pa.array(np.asarray(lines, dtype=np.int64))}
    for name, arr in outputs.items():
        arr = np.ascontiguousarray(arr)
        if arr.ndim == 1:
            cols[name] = pa.array(arr)
        else:
            width = int(math.prod(arr.shape[1:]))
            cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(rows * width)), width)
    buf = io.BytesIO()
    pq.write_table(pa.table(cols), buf, compression="snappy")
    return buf.getvalue()


def encode_errors(records: list[Record]) -> bytes:
    lines = [orjson.dumps({"line": r.line, "id": r.id, "reason": r.error}) for r in records]
    return b"\n".join(lines) + b"\n" if lines else b""
