"""Chunks: the input of one part (lines or rows, bad ones included), assembled into columns (``Batch``).

Why: a part is scored as one batch and written as one object, and its boundaries never move (``part_rows``
is pinned in the job's state), so a part rewritten after a crash has the same bytes. A chunk carries the
reader's position after it (``end``: what the checkpoint stores) and the next line's number. Chunks are
columns: a JSONL chunk is cut from the stream with ``bytes.split`` and parsed with one
``map(orjson.loads, ...)``, its feeds built with one numpy call per input; only a chunk with a line that does
not fit is parsed again line by line (``tierserve.batch.records``). NPZ and Parquet columns go straight
into arrays, without a Python object per row.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import orjson

from tierserve.batch.records import Record, chunk_feeds, column_feeds, read_line
from tierserve.manifest import ModelVersion
from tierserve.protocol.tensors import datatype_to_dtype


@dataclass(eq=False)
class Batch:
    """The lines of a chunk that can be scored, as columns, and those that cannot.

    ``feeds`` holds every good line's rows concatenated in order; ``ids``, ``lines`` (1-based line or row
    numbers) and ``counts`` (rows per line; None: one each) describe the good lines; ``bad`` holds the
    lines that cannot be scored, in line order, ``blank`` counts blank lines. Why columns: a regular chunk
    (4,096 one-row JSONL lines, or 65,536 Parquet rows) goes to onnxruntime and back out to its part
    without one Python object per row. Iterating gives one ``Record`` per good line (made on first use),
    for the rare chunk whose lines must be scored one at a time."""

    feeds: dict[str, np.ndarray]
    ids: list[Any]
    lines: np.ndarray
    counts: np.ndarray | None = None
    bad: list[Record] = field(default_factory=list)
    blank: int = 0
    _records: list[Record] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def rows(self) -> int:
        return len(self.ids) if self.counts is None else int(self.counts.sum())

    def __iter__(self) -> Iterator[Record]:
        if self._records is None:
            counts: Iterable[int] = self.counts.tolist() if self.counts is not None else itertools.repeat(1)
            self._records = [Record(line, 0, rid, None, rows)
                             for line, rid, rows in zip(self.lines.tolist(), self.ids, counts)]  # noqa: B905
        return iter(self._records)

    def without_errors(self) -> Batch:
        """This batch less the lines whose ``Record`` got an error while being scored one at a time: they join
        ``bad`` in line order. (``feeds`` is left empty: the lines' outputs are already computed.)"""
        failed = [r for r in self if r.error is not None]
        if not failed:
            return self
        ok = [r for r in self if r.error is None]
        counts = np.array([r.rows for r in ok], dtype=np.int64) if self.counts is not None else None
        return Batch({}, [r.id for r in ok], np.array([r.line for r in ok], dtype=np.int64), counts,
                     sorted(self.bad + failed, key=lambda r: r.line), self.blank)


def records_batch(records: list[Record], model: ModelVersion) -> Batch:
    """A batch from parsed records (``chunk_feeds``: at once when regular, else line by line)."""
    feeds = chunk_feeds(records, model)
    good = [r for r in records if r.error is None]
    counts = [r.rows for r in good]
    return Batch(feeds, [r.id for r in good], np.array([r.line for r in good], dtype=np.int64),
                 None if all(c == 1 for c in counts) else np.array(counts, dtype=np.int64),
                 [r for r in records if r.error], sum(1 for r in records if r.error == ""))


class Chunk(Protocol):
    """The input of one part: ``len`` records (lines or rows, blank and bad ones included), the reader's
    position after them (``end``: what the checkpoint stores) and the next line's number."""

    end: int
    next_line: int

    def __len__(self) -> int: ...

    def assemble(self, model: ModelVersion) -> Batch: ...


class RecordChunk:
    """A chunk of records from any record reader."""

    def __init__(self, records: list[Record]) -> None:
        self.records = records
        self.end, self.next_line = records[-1].end, records[-1].line + 1

    def __len__(self) -> int:
        return len(self.records)

    def assemble(self, model: ModelVersion) -> Batch:
        return records_batch(self.records, model)


class LineChunk:
    """A chunk of raw JSONL lines (blank ones included): the first's line number and offset, and the offset
    just after the last.

    ``assemble`` parses every line with one ``map(orjson.loads, ...)`` and builds the feeds column by column;
    only a chunk where that fails - a line that is blank, not JSON to orjson, not an object with ``inputs``,
    or not a one-row shorthand of regular numbers - is parsed again line by line (``read_line`` and
    ``chunk_feeds``, the reference path), which names each bad line with the HTTP API's message. Both
    paths give the same feeds for the same lines (tested)."""

    def __init__(self, raws: list[bytes], first_line: int, start: int, end: int) -> None:
        self.raws, self.first_line, self.start, self.end = raws, first_line, start, end
        self.next_line = first_line + len(raws)

    def __len__(self) -> int:
        return len(self.raws)

    def assemble(self, model: ModelVersion) -> Batch:
        try:
            objs = list(map(orjson.loads, self.raws))
            inputs = [o["inputs"] for o in objs]  # TypeError for a line that is not an object
        except (orjson.JSONDecodeError, TypeError, KeyError):
            return records_batch(self.records(), model)
        feeds = column_feeds(inputs, model)
        if feeds is None:
            return records_batch(self.records(), model)
        return Batch(feeds, [o.get("id") for o in objs],
                     np.arange(self.first_line, self.next_line, dtype=np.int64))

    def records(self) -> list[Record]:
        """The lines parsed one by one (JSON only; ``chunk_feeds`` builds the feeds), blank ones skipped."""
        ends = list(itertools.accumulate((len(raw) + 1 for raw in self.raws), initial=self.start))[1:]
        ends[-1] = self.end  # the last line of the object may have no newline
        return [read_line(raw, self.first_line + i, end) if raw.strip() else
                Record(line=self.first_line + i, end=end, error="")
                for i, (raw, end) in enumerate(zip(self.raws, ends, strict=True))]


class ColumnChunk:
    """A chunk of NPZ or Parquet rows read straight into arrays (one per input, in the model's dtypes)."""

    def __init__(self, feeds: dict[str, np.ndarray], ids: list[Any], first_row: int) -> None:
        self.feeds, self.ids, self.first_row = feeds, ids, first_row
        self.end = first_row + len(ids)
        self.next_line = self.end + 1

    def __len__(self) -> int:
        return len(self.ids)

    def assemble(self, model: ModelVersion) -> Batch:
        return Batch(self.feeds, self.ids, np.arange(self.first_row + 1, self.end + 1, dtype=np.int64))

    def records(self) -> Iterator[Record]:
        """One-row records over the columns (views, not copies)."""
        for i, rid in enumerate(self.ids):
            yield Record(line=self.first_row + i + 1, end=self.first_row + i + 1, id=rid,
                         feeds={name: a[i:i + 1] for name, a in self.feeds.items()}, rows=1)


def iter_chunks(source: Iterable[Record], n: int) -> Iterator[Chunk]:
    """Chunks of ``n`` records (the last one shorter): a reader's own chunks when it has them (JSONL lines,
    NPZ / Parquet columns), else records grouped as they come."""
    chunks: Callable[[int], Iterator[Chunk]] | None = getattr(source, "chunks", None)
    if chunks is not None:
        yield from chunks(n)
        return
    it = iter(source)
    while batch := list(itertools.islice(it, n)):
        yield RecordChunk(batch)


#: bytes a row costs besides its tensors: its id (a Python object) and line number, in and out
_ROW_OVERHEAD = 128


def part_rows(fmt: str, model: ModelVersion, chunk_rows: int, columnar_rows: int, memory_mb: int) -> int:
    """Rows per part, pinned in the job's state at its start (part boundaries never move).

    JSONL: ``CHUNK_ROWS``. NPZ and Parquet, whose columns are read straight into arrays: up to
    ``COLUMNAR_CHUNK_ROWS`` (fewer parts: fewer S3 PUTs and checkpoints), as long as three parts' arrays,
    ids and encoded output (one being written, one waiting for the writer, one being computed) stay within
    an eighth of the function's memory. A model with a dynamic dimension past the batch axis keeps
    ``CHUNK_ROWS``: its row size is not known before the rows are read."""
    if fmt == "jsonl" or columnar_rows <= chunk_rows:
        return chunk_rows
    per_row = _ROW_OVERHEAD
    for specs, each in ((model.inputs, 1), (model.outputs, 1 if fmt == "parquet" else 64)):
        for spec in specs:
            dims = spec.shape[1:]
            if any(d < 0 for d in dims) or spec.datatype == "BYTES":
                return chunk_rows
            per_row += math.prod(dims) * datatype_to_dtype(spec.datatype).itemsize * each
    budget = memory_mb * (1 << 20) // 8
    return max(chunk_rows, min(columnar_rows, budget // (3 * per_row)))
