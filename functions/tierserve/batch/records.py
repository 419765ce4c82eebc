"""One input record (a JSONL line or an NPZ / Parquet row) and its numpy feeds, checked as the HTTP API does.

Why: a batch line is scored with exactly the checks of an HTTP request (names, datatypes, shapes, values):
the same parser (``tierserve.protocol.header``, ``tierserve.protocol.tensors``), applied to a line in its
protocol form or its ``{"id", "inputs": {name: data}}`` shorthand. ``chunk_feeds`` builds a whole chunk's
feeds with one numpy call per input when every line is a regular one-row shorthand, and line by line
otherwise, which names each bad line with the HTTP API's message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from tierserve.errors import InvalidRequestError
from tierserve.manifest import ModelVersion
from tierserve.protocol import header as wire
from tierserve.protocol.messages import Tensor
from tierserve.protocol.tensors import json_array, materialize


@dataclass(slots=True)
class Record:
    """One input record: a JSONL line or an NPZ / Parquet row. ``error`` is set when it cannot be scored."""

    line: int  # 1-based line (JSONL) or row (NPZ, Parquet) number
    end: int  # position just after this record: byte offset (JSONL) or row index (NPZ, Parquet)
    id: Any = None
    feeds: dict[str, np.ndarray] | None = None
    rows: int = 0
    error: str | None = None
    #: a JSONL line's ``inputs`` as parsed JSON, until ``chunk_feeds`` (or ``build_feeds``) makes its feeds
    inputs: Any = None


def read_line(raw: bytes, line: int, end: int) -> Record:
    """One JSONL line parsed as JSON only: its id and its ``inputs`` value (no numpy yet)."""
    try:
        obj = wire.json_loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        return Record(line, end, error=f"not valid JSON: {exc}")
    if not isinstance(obj, dict):
        return Record(line, end, error="each line must be a JSON object with 'inputs'")
    return Record(line, end, obj.get("id"), None, 0, None, obj.get("inputs"))


def build_feeds(rec: Record, model: ModelVersion) -> Record:
    """The record's numpy feeds, through the same parser and checks as the HTTP API (or its error)."""
    if rec.error is None and rec.feeds is None:
        try:
            rec.feeds, rec.rows = _feeds(rec.inputs, model)
        except InvalidRequestError as exc:
            rec.error = exc.message
        rec.inputs = None
    return rec


def parse_line(raw: bytes, line: int, end: int, model: ModelVersion) -> Record:
    """Parse one JSONL line (protocol request or ``{"id", "inputs": {name: data}}`` shorthand)."""
    return build_feeds(read_line(raw, line, end), model)


def chunk_feeds(records: list[Record], model: ModelVersion) -> dict[str, np.ndarray]:
    """The feeds of every record without an error, concatenated in order (records that cannot be scored
    get their error): one numpy call per input for a chunk of one-row shorthand lines, else line by line."""
    pending = [r for r in records if r.error is None]
    if not pending:
        return {}
    if all(r.feeds is None for r in pending):
        feeds = _vector_feeds(pending, model)
        if feeds is not None:
            for r in pending:
                r.rows, r.inputs = 1, None
            return feeds
    for r in pending:
        build_feeds(r, model)
    good = [r for r in pending if r.error is None]
    if not good:
        return {}
    return {s.name: np.concatenate([r.feeds[s.name] for r in good]) for s in model.inputs}  # type: ignore[index]


def _vector_feeds(records: list[Record], model: ModelVersion) -> dict[str, np.ndarray] | None:
    """One array per input for records that are all one-row shorthand lines with regular data; None
    (nothing decided) as soon as one is not, so that the line-by-line path says which and why."""
    return column_feeds([r.inputs for r in records], model)


def column_feeds(inputs: list[Any], model: ModelVersion) -> dict[str, np.ndarray] | None:
    """The feeds of a column of shorthand ``inputs`` values ({name: one row}), one numpy call per input, with
    the HTTP API's checks; None when one value is anything else (the caller then goes line by line)."""
    names = {s.name for s in model.inputs}
    for value in inputs:
        if not isinstance(value, dict) or value.keys() != names:
            return None
    n = len(inputs)
    feeds: dict[str, np.ndarray] = {}
    for spec in model.inputs:
        if spec.datatype == "BYTES" or not spec.shape:
            return None
        column = [value[spec.name] for value in inputs]
        shape = wire.json_shape(column)
        if len(shape) != len(spec.shape) or any(w not in (-1, g) for w, g in zip(spec.shape[1:], shape[1:],
                                                                                   strict=True)):
            return None
        try:
            flat = json_array(column, spec.datatype, n * math.prod(shape[1:]), f"input {spec.name!r}")
        except InvalidRequestError:
            return None
        feeds[spec.name] = flat.reshape(shape)
    return feeds


def _feeds(inputs: Any, model: ModelVersion) -> tuple[dict[str, np.ndarray], int]:
    """numpy feeds for one line, through the same parser and checks as the HTTP API.

    Protocol form: a list of tensors (``name``, ``datatype``, ``shape``, ``data``), exactly as in a
    request body. Shorthand: ``{name: data}``; the datatype comes from the manifest and the shape
    from the data's nesting, a single row (rank one less than the model's) gaining its batch axis."""
    if isinstance(inputs, list):
        header = wire.Header(wire.tensor_headers(inputs, "input", None, InvalidRequestError), memoryview(b""), None)
        wire.check_request(header.tensors, [], model)  # names, datatypes, shapes: before any data is read
        tensors = materialize(header, "input", InvalidRequestError)
    elif isinstance(inputs, dict):
        wire.check_names([str(n) for n in inputs], model)
        tensors = []
        for name, data in inputs.items():
            spec = model.input_spec(str(name))
            assert spec is not None
            shape = wire.json_shape(data)
            flat = json_array(data, spec.datatype, None, f"input {name!r}")
            if len(shape) == len(spec.shape) - 1:
                shape = (1, *shape)  # the shorthand's single row
            tensors.append(Tensor(spec.name, spec.datatype, shape, flat.reshape(shape)))
    else:
        raise InvalidRequestError("'inputs' must be a list of tensors or an object {name: data}")
    wire.check_request(tensors, [], model)
    rows = int(tensors[0].shape[0]) if tensors and tensors[0].shape else 1
    if not rows:
        raise InvalidRequestError("a line must hold at least one row")
    return {t.name: t.data for t in tensors}, rows
