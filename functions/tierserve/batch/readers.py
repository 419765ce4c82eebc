"""Streaming readers of the input formats: JSONL lines, NPZ arrays and Parquet columns, in chunks.

Why: a batch input may be far larger than a function's memory. Readers never hold more than one chunk of
lines (JSONL) or rows (NPZ, Parquet) at a time: memory is bounded by the part size, not by the file. Every
chunk carries the position just after it (a byte offset for JSONL, a row index for NPZ and Parquet), which
is what a checkpoint stores, so that a resumed job reopens the object at exactly the next record. Every
reader takes a range, ``start`` (inclusive) to ``stop`` (exclusive; None = the end), in those same units,
so that a job can be cut into shards: a JSONL shard owns the lines that *start* inside its byte range.
Every read is pinned to the object's version seen at the job's start.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import math
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from typing import IO, Any

import numpy as np

from tierserve.batch.chunks import ColumnChunk, LineChunk
from tierserve.batch.locations import BatchInputError, S3Location, get_body, parquet_needs_pyarrow
from tierserve.batch.records import Record
from tierserve.manifest import ModelVersion
from tierserve.protocol.tensors import datatype_to_dtype

_READ_CHUNK = 1 << 20


def iter_lines(body: Any, start: int, first_line: int) -> Iterator[tuple[int, int, bytes]]:
    """(line number, offset just after the line, line) from a streaming body that starts at ``start``."""
    buf = b""
    pos = start  # offset of buf[0]
    line = first_line
    for chunk in iter(lambda: body.read(_READ_CHUNK), b""):
        buf += chunk
        cut = 0
        while (nl := buf.find(b"\n", cut)) >= 0:
            yield line, pos + nl + 1, buf[cut:nl]
            line += 1
            cut = nl + 1
        pos += cut
        buf = buf[cut:]
    if buf:
        yield line, pos + len(buf), buf


def iter_line_blocks(body: Any, start: int) -> Iterator[tuple[int, list[bytes], bool]]:
    """(offset of the first line, the lines, whether the last one ended with a newline) per block read from a
    streaming body that starts at ``start``: one ``bytes.split`` per block, not a Python step per line."""
    tail = b""
    pos = start  # offset of tail[0]
    for data in iter(lambda: body.read(_READ_CHUNK), b""):
        lines = (tail + data).split(b"\n")
        tail = lines.pop()
        if lines:
            yield pos, lines, True
            pos += sum(map(len, lines)) + len(lines)
    if tail:
        yield pos, [tail], False


def _line_chunks(body: Any, start: int, first_line: int, stop: int, n: int) -> Iterator[LineChunk]:
    """Chunks of ``n`` lines (blank ones included) of the lines that start in ``[start, stop)``."""
    raws: list[bytes] = []
    line, chunk_start, pos = first_line, start, start  # pos: the offset just after the lines taken
    for at, lines, newline in iter_line_blocks(body, start):
        if at >= stop:
            break
        last = len(lines)
        if at + sum(map(len, lines)) + len(lines) > stop:  # the range ends in this block
            starts = list(itertools.accumulate((len(x) + 1 for x in lines), initial=at))
            last = bisect.bisect_left(starts, stop, hi=len(lines))
        i = 0
        while i < last:
            take = lines[i:min(last, i + n - len(raws))]
            i += len(take)
            raws += take
            pos += sum(map(len, take)) + len(take) - (0 if newline or i < len(lines) else 1)
            if len(raws) == n:
                yield LineChunk(raws, line, chunk_start, pos)
                line, chunk_start, raws = line + n, pos, []
        if last < len(lines):
            break
    if raws:
        yield LineChunk(raws, line, chunk_start, pos)


class JsonlSource:
    """The lines of a JSONL object that start in ``[start, stop)``: as records (iterating), or as raw-line
    chunks (``chunks``) that are parsed a chunk at a time (``LineChunk.assemble``)."""

    def __init__(self, s3: Any, loc: S3Location, version: dict[str, str], start: int, first_line: int,
                 stop: int) -> None:
        self.s3, self.loc, self.version = s3, loc, version
        self.start, self.first_line, self.stop = start, first_line, stop

    def __iter__(self) -> Iterator[Record]:
        for chunk in self.chunks(_READ_CHUNK):
            yield from chunk.records()

    def chunks(self, n: int) -> Iterator[LineChunk]:
        if self.start >= self.stop:
            return
        body = get_body(self.s3, self.loc, self.version, self.start)
        try:
            yield from _line_chunks(body, self.start, self.first_line, self.stop, n)
        finally:
            body.close()


def jsonl_records(s3: Any, loc: S3Location, version: dict[str, str], model: ModelVersion,
                  start: int, first_line: int, size: int, stop: int | None = None) -> JsonlSource:
    """The lines that start in ``[start, stop)``, parsed as JSON (feeds are built per chunk).

    ``start`` must be a line's first byte (0, or a checkpoint's offset). A shard whose range starts
    mid-line starts at the first line that starts in it (``tierserve.batch.shards.plan_jsonl`` plans them so);
    ``first_line`` numbers the lines from there."""
    return JsonlSource(s3, loc, version, start, first_line, size if stop is None else min(stop, size))


class ColumnSource:
    """NPZ or Parquet rows: as one-row records (iterating), or as column chunks (``chunks``)."""

    def __init__(self, read: Callable[[int], Iterator[ColumnChunk]], rows: int) -> None:
        self.read, self.rows = read, rows

    def __iter__(self) -> Iterator[Record]:
        for chunk in self.read(self.rows):
            yield from chunk.records()

    def chunks(self, n: int) -> Iterator[ColumnChunk]:
        return self.read(n)


@contextlib.contextmanager
def _spooled(s3: Any, loc: S3Location, version: dict[str, str], tmp_dir: str | None) -> Iterator[IO[bytes]]:
    """The object copied to a local temporary file, for formats that must seek (a zip's directory and
    Parquet's footer are at the end); the file is gone when the block ends."""
    body = get_body(s3, loc, version)
    with tempfile.TemporaryFile(dir=tmp_dir) as f:
        for block in iter(lambda: body.read(_READ_CHUNK), b""):
            f.write(block)
        body.close()
        f.seek(0)
        yield f


def npz_records(s3: Any, loc: S3Location, version: dict[str, str], model: ModelVersion,
                start_row: int, chunk_rows: int, tmp_dir: str | None = None,
                stop_row: int | None = None) -> ColumnSource:
    """Rows of an ``.npz`` (one array per input name, plus an optional ``id`` array), read in chunks.

    The archive is spooled to local disk (a zip needs seeking); each member is then read a
    chunk of rows at a time, so memory stays bounded by the chunk size."""
    return ColumnSource(lambda n: _npz_chunks(s3, loc, version, model, start_row, n, tmp_dir, stop_row), chunk_rows)


def _npz_chunks(s3: Any, loc: S3Location, version: dict[str, str], model: ModelVersion,
                start_row: int, chunk_rows: int, tmp_dir: str | None, stop_row: int | None) -> Iterator[ColumnChunk]:
    with _spooled(s3, loc, version, tmp_dir) as f:
        try:
            zf = zipfile.ZipFile(f)
        except zipfile.BadZipFile as exc:
            raise BatchInputError(f"{loc.uri} is not a readable .npz archive ({exc})") from exc
        with zf:
            names = [s.name for s in model.inputs] + (["id"] if "id.npy" in zf.namelist() else [])
            members = {}
            for name in names:
                if f"{name}.npy" not in zf.namelist():
                    raise BatchInputError(f"{loc.uri} has no array {name!r}; model {model.name!r} takes "
                                          f"{', '.join(s.name for s in model.inputs)}")
                members[name] = _NpyRows(zf.open(f"{name}.npy"), name)
            total = {m.rows for m in members.values()}
            if len(total) != 1:
                raise BatchInputError(f"{loc.uri}: arrays have different row counts {sorted(total)}")
            n = total.pop() if stop_row is None else min(total.pop(), stop_row)
            for name, m in members.items():
                spec = model.input_spec(name)
                if spec is not None and (len(m.shape) != len(spec.shape) or any(
                        s not in (-1, d) for s, d in zip(spec.shape[1:], m.shape[1:], strict=True))):
                    raise BatchInputError(f"{loc.uri}: array {name!r} has shape {list(m.shape)}, the model "
                                          f"expects {list(spec.shape)}")
                m.seek_row(start_row)
            row = start_row
            while row < n:
                take = min(chunk_rows, n - row)
                block = {name: m.read_rows(take) for name, m in members.items()}
                ids = block.pop("id", None)
                yield _column_chunk(block, ids, row, model)
                row += take


def _column_chunk(block: dict[str, np.ndarray], ids: Any, row: int, model: ModelVersion) -> ColumnChunk:
    """A chunk over a block of columns, cast to the model's dtypes (no copy when they already are), numbered
    from ``row``; without an ``id`` column a row's id is its 0-based index."""
    cast = {s.name: block[s.name].astype(datatype_to_dtype(s.datatype), copy=False) for s in model.inputs}
    n = len(next(iter(cast.values())))
    id_list = ids.tolist() if ids is not None else list(range(row, row + n))
    if ids is not None and ids.dtype.kind in "SO":
        id_list = [x.decode("utf-8", "replace") if isinstance(x, bytes) else x for x in id_list]
    return ColumnChunk(cast, id_list, row)


def parquet_records(s3: Any, loc: S3Location, version: dict[str, str], model: ModelVersion,
                    start_row: int, chunk_rows: int, tmp_dir: str | None = None,
                    stop_row: int | None = None) -> ColumnSource:
    """Rows of a Parquet file: one column per input (a number per row, or a list / fixed-size list of the
    row's values, C order), plus an optional ``id`` column; read a chunk of rows at a time.

    The object is spooled to local disk (Parquet's footer is at the end); only the row groups that hold
    ``[start_row, stop_row)`` are read. Needs pyarrow (``pip install tierserve[batch]``)."""
    return ColumnSource(lambda n: _parquet_chunks(s3, loc, version, model, start_row, n, tmp_dir, stop_row),
                        chunk_rows)


def _parquet_chunks(s3: Any, loc: S3Location, version: dict[str, str], model: ModelVersion,
                    start_row: int, chunk_rows: int, tmp_dir: str | None,
                    stop_row: int | None) -> Iterator[ColumnChunk]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise parquet_needs_pyarrow(loc.uri) from exc
    with _spooled(s3, loc, version, tmp_dir) as f:
        try:
            pf = pq.ParquetFile(f)
        except Exception as exc:  # pyarrow raises ArrowInvalid (a ValueError) and OSError subclasses
            raise BatchInputError(f"{loc.uri} is not a readable Parquet file ({exc})") from exc
        columns = [s.name for s in model.inputs]
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise BatchInputError(f"{loc.uri} has no column {missing[0]!r}; model {model.name!r} takes "
                                  f"{', '.join(columns)} (plus an optional 'id')")
        has_id = "id" in pf.schema_arrow.names
        n = pf.metadata.num_rows if stop_row is None else min(pf.metadata.num_rows, stop_row)
        first, skip = 0, start_row  # the first row group holding start_row, and rows to skip in it
        while first < pf.num_row_groups and skip >= pf.metadata.row_group(first).num_rows:
            skip -= pf.metadata.row_group(first).num_rows
            first += 1
        groups = list(range(first, pf.num_row_groups))
        batches = pf.iter_batches(batch_size=chunk_rows, row_groups=groups,
                                  columns=columns + (["id"] if has_id else [])) if groups else iter(())
        row, pending, have = start_row, [], 0  # record batches not yet in a chunk, and their rows
        for batch in batches:
            if skip:
                drop = min(skip, batch.num_rows)
                batch, skip = batch.slice(drop), skip - drop
            if row + have >= n:
                break
            batch = batch.slice(0, n - row - have)
            pending.append(batch)
            have += batch.num_rows
            while have >= chunk_rows:  # exactly chunk_rows rows a chunk, across row groups and resumes
                table = pa.Table.from_batches(pending)
                yield _arrow_chunk(table.slice(0, chunk_rows), model, has_id, row, loc)
                pending, have, row = table.slice(chunk_rows).to_batches(), have - chunk_rows, row + chunk_rows
        if have:
            yield _arrow_chunk(pa.Table.from_batches(pending), model, has_id, row, loc)


def _arrow_chunk(table: Any, model: ModelVersion, has_id: bool, row: int, loc: S3Location) -> ColumnChunk:
    import pyarrow as pa

    block = {s.name: _arrow_column(table.column(s.name).combine_chunks(), s, loc) for s in model.inputs}
    if not has_id:
        return _column_chunk(block, None, row, model)
    col = table.column("id").combine_chunks()
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_integer(col.type):
        chunk = _column_chunk(block, None, row, model)  # no bytes among them: no per-row check
        chunk.ids = col.to_numpy(zero_copy_only=False).tolist()
        return chunk
    return _column_chunk(block, col.to_numpy(zero_copy_only=False), row, model)


def _arrow_column(col: Any, spec: Any, loc: S3Location) -> np.ndarray:
    """A column as a (rows, *row shape) array: numbers, or (nested) lists of one fixed length per row."""
    import pyarrow as pa

    rows = len(col)
    dims: list[int] = []
    while pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type):
        if col.null_count:
            raise BatchInputError(f"{loc.uri}: column {spec.name!r} has null rows")
        if pa.types.is_fixed_size_list(col.type):
            width = col.type.list_size
        else:
            lengths = np.diff(col.offsets.to_numpy())
            width = int(lengths[0]) if len(lengths) else 0
            if len(lengths) and not (lengths == width).all():
                raise BatchInputError(f"{loc.uri}: column {spec.name!r} has rows of different lengths "
                                      f"({int(lengths.min())} to {int(lengths.max())}); every row of a tensor "
                                      "column must have the model's shape")
        dims.append(width)
        col = col.flatten()
    if col.null_count:
        raise BatchInputError(f"{loc.uri}: column {spec.name!r} has null values")
    values = col.to_numpy(zero_copy_only=False)
    shape = (rows, *dims)
    if len(shape) != len(spec.shape) or any(w not in (-1, g) for w, g in zip(spec.shape[1:], shape[1:], strict=True)):
        raise BatchInputError(f"{loc.uri}: column {spec.name!r} holds rows of shape {list(shape[1:])}, the model "
                              f"expects {list(spec.shape[1:])}")
    return values.reshape(shape)


class _NpyRows:
    """Row-wise reader of one ``.npy`` member of a zip (C order only)."""

    def __init__(self, fp: Any, name: str) -> None:
        self.fp = fp
        major, minor = np.lib.format.read_magic(fp)
        if (major, minor) == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        if fortran or dtype.hasobject or not shape:
            raise BatchInputError(f"array {name!r} must be a C-ordered, non-object array with a batch axis")
        self.shape, self.dtype = tuple(shape), dtype
        self.rows = int(shape[0])
        self.row_bytes = int(math.prod(shape[1:])) * dtype.itemsize
        self.data_start = fp.tell()

    def seek_row(self, row: int) -> None:
        self.fp.seek(self.data_start + row * self.row_bytes)

    def read_rows(self, n: int) -> np.ndarray:
        raw = self.fp.read(n * self.row_bytes)
        return np.frombuffer(raw, dtype=self.dtype).reshape((n, *self.shape[1:]))
