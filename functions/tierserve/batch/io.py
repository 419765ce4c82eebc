"""Batch input and output: S3 locations, streaming readers (JSONL, NPZ, Parquet), chunks, row parsing, parts.

Readers never hold more than one chunk of lines (JSONL) or rows (NPZ, Parquet) at a time: memory is
bounded by the part size (``part_rows``), not by the file. Every chunk (and every record a reader yields
when iterated) carries the position just after it (a byte offset for JSONL, a row index for NPZ and
Parquet), which is what a checkpoint stores, so that a resumed job reopens the object at exactly the next
record. Every reader takes a range, ``start`` (inclusive) to ``stop`` (exclusive; None = the end), in those
same units, so that a job can be cut into shards: a JSONL shard owns the lines that *start* inside its
byte range.

Why chunks are columns (``Batch``): a JSONL chunk is cut from the stream with ``bytes.split`` and parsed
with one ``map(orjson.loads, ...)``; the numpy feeds of a chunk of one-row shorthand lines are then built
with one numpy call per input, the same checks as the HTTP API applied to the chunk. Only a chunk with a
line that does not fit (blank, not JSON, a protocol-form line, several rows, a bad value) is parsed again
line by line, which names the bad lines. NPZ and Parquet columns go straight into arrays, without a Python
object per row. Parts are written with orjson (JSONL, one template per part when every line is one row)
or pyarrow (Parquet, for Parquet inputs).
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import math
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

import numpy as np
import orjson

from tierserve import wire
from tierserve.codec import datatype_to_dtype, json_array, json_values, materialize
from tierserve.errors import InvalidNameError, InvalidRequestError
from tierserve.manifest import ModelVersion, check_model_name
from tierserve.store import check_s3_key
from tierserve.types import Tensor

BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
#: A job's name: the input object's file name without its extension.
JOB_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
INPUT_PREFIX = "batch/in/"
OUTPUT_PREFIX = "batch/out/"
WORK_PREFIX = "batch/work/"
FORMATS = (".jsonl", ".npz", ".parquet")
_READ_CHUNK = 1 << 20


class BatchInputError(InvalidRequestError):
    """A batch input (event, job message or object) cannot be processed; the message is poison."""

    code = "batch_input_error"


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def check_bucket(bucket: str) -> str:
    if not isinstance(bucket, str) or not BUCKET_RE.fullmatch(bucket):
        raise InvalidNameError(f"bucket {bucket!r} is not a valid S3 bucket name")
    return bucket


def parse_s3_uri(uri: Any, what: str) -> S3Location:
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise BatchInputError(f"{what} must be an s3://bucket/key URI, got {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    key = key.rstrip("/") if what == "output" else key
    return S3Location(check_bucket(bucket), check_s3_key(key))


def input_format(key: str) -> str:
    for ext in FORMATS:
        if key.endswith(ext):
            return ext[1:]
    raise BatchInputError(f"input {key!r} must end in .jsonl, .npz or .parquet")


def split_input_key(key: str) -> tuple[str | None, str]:
    """(model, job) for ``batch/in/{model}/{job}.{jsonl,npz,parquet}``; (None, stem) for any other key."""
    check_s3_key(key)
    ext = "." + input_format(key)
    rest = key[len(INPUT_PREFIX):] if key.startswith(INPUT_PREFIX) else None
    parts = rest.split("/") if rest is not None else []
    if len(parts) == 2:
        model, name = parts[0], parts[1][: -len(ext)]
        check_model_name(model)
    else:
        model, name = None, key.rsplit("/", 1)[-1][: -len(ext)]
    if not JOB_NAME_RE.fullmatch(name):
        raise InvalidNameError(f"job name {name!r} (from {key!r}) must be 1-128 letters, digits, '_', '-', '.'")
    return model, name


# --- records ------------------------------------------------------------------------------------


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
    return _column_feeds([r.inputs for r in records], model)


def _column_feeds(inputs: list[Any], model: ModelVersion) -> dict[str, np.ndarray] | None:
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


# --- chunks: what one part is made of -----------------------------------------------------------------


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
        feeds = _column_feeds(inputs, model)
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


# --- readers ------------------------------------------------------------------------------------


def get_body(s3: Any, loc: S3Location, version: dict[str, str], start: int = 0) -> Any:
    """A streaming body for ``loc`` pinned to the version seen at the job's start."""
    kwargs: dict[str, Any] = {"Bucket": loc.bucket, "Key": loc.key}
    if version.get("version_id") and version["version_id"] != "null":
        kwargs["VersionId"] = version["version_id"]
    elif version.get("etag"):
        kwargs["IfMatch"] = version["etag"]
    if start:
        kwargs["Range"] = f"bytes={start}-"
    try:
        return s3.get_object(**kwargs)["Body"]
    except Exception as exc:
        raise BatchInputError(f"cannot read {loc.uri} ({_reason(exc)}); check that the object exists, "
                              "was not replaced during the job, and that the function may read it") from exc


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
        raise BatchInputError(f"{loc.uri}: reading Parquet needs pyarrow in this function "
                              "(functions/requirements-batch.txt); or send .jsonl / .npz") from exc
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


# --- outputs ------------------------------------------------------------------------------------


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


def _reason(exc: Exception) -> str:
    err = getattr(exc, "response", {}).get("Error", {}) if hasattr(exc, "response") else {}
    if err:
        return f"{err.get('Code', 'error')}: {err.get('Message', '')}".strip()
    return f"{type(exc).__name__}: {exc}"
