"""Batch input and output: S3 locations, streaming readers (JSONL, NPZ, Parquet), row parsing, parts.

Readers never hold more than one line (JSONL) or one chunk of rows (NPZ, Parquet) at a time: memory is
bounded by ``CHUNK_ROWS``, not by the file. Every record a reader yields carries the position
just after it (a byte offset for JSONL, a row index for NPZ and Parquet), which is what a checkpoint
stores, so that a resumed job reopens the object at exactly the next record. Every reader takes a range,
``start`` (inclusive) to ``stop`` (exclusive; None = the end), in those same units, so that a job can be
cut into shards: a JSONL shard owns the lines that *start* inside its byte range.

Why a chunk is assembled at once (``chunk_feeds``): a JSONL line is parsed (orjson) into its JSON
values only; the numpy feeds of a whole chunk of one-row shorthand lines are then built with one
numpy call per input, the same checks as the HTTP API applied to the chunk. Only a chunk with a line
that does not fit (a protocol-form line, several rows, a bad value) is assembled line by line, which
names the bad lines. Parts are written with orjson (JSONL) or pyarrow (Parquet, for Parquet inputs).
"""

from __future__ import annotations

import contextlib
import math
import re
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

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
    names = {s.name for s in model.inputs}
    for r in records:
        if not isinstance(r.inputs, dict) or r.inputs.keys() != names:
            return None
    n = len(records)
    feeds: dict[str, np.ndarray] = {}
    for spec in model.inputs:
        if spec.datatype == "BYTES" or not spec.shape:
            return None
        column = [r.inputs[spec.name] for r in records]
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


def jsonl_records(s3: Any, loc: S3Location, version: dict[str, str], model: ModelVersion,
                  start: int, first_line: int, size: int, stop: int | None = None) -> Iterator[Record]:
    """The lines that start in ``[start, stop)``, parsed as JSON (feeds are built per chunk: ``chunk_feeds``).

    ``start`` must be a line's first byte (0, or a checkpoint's offset). A shard whose range starts
    mid-line starts at the first line that starts in it (``tierserve.batch.shards.plan_jsonl`` plans them so);
    ``first_line`` numbers the lines from there."""
    stop = size if stop is None else min(stop, size)
    if start >= stop:
        return
    body = get_body(s3, loc, version, start)
    try:
        pos = start
        for line, end, raw in iter_lines(body, start, first_line):
            if pos >= stop:
                break
            pos = end
            if not raw.strip():
                yield Record(line=line, end=end, error="")  # blank: skipped, not an error
                continue
            yield read_line(raw, line, end)
    finally:
        body.close()


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
                stop_row: int | None = None) -> Iterator[Record]:
    """Rows of an ``.npz`` (one array per input name, plus an optional ``id`` array), read in chunks.

    The archive is spooled to local disk (a zip needs seeking); each member is then read a
    chunk of rows at a time, so memory stays bounded by the chunk size."""
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
                yield from _array_records(block, ids, row, model)
                row += take


def _array_records(block: dict[str, np.ndarray], ids: Any, row: int, model: ModelVersion) -> Iterator[Record]:
    """One-row records over a block of columns (views, not copies), numbered from ``row``."""
    cast = {s.name: block[s.name].astype(datatype_to_dtype(s.datatype), copy=False) for s in model.inputs}
    id_list = ids.tolist() if ids is not None else range(row, row + len(next(iter(cast.values()))))
    for i, rid in enumerate(id_list):
        if isinstance(rid, bytes):
            rid = rid.decode("utf-8", "replace")
        yield Record(line=row + i + 1, end=row + i + 1, id=rid,
                     feeds={name: a[i:i + 1] for name, a in cast.items()}, rows=1)


def parquet_records(s3: Any, loc: S3Location, version: dict[str, str], model: ModelVersion,
                    start_row: int, chunk_rows: int, tmp_dir: str | None = None,
                    stop_row: int | None = None) -> Iterator[Record]:
    """Rows of a Parquet file: one column per input (a number per row, or a list / fixed-size list of the
    row's values, C order), plus an optional ``id`` column; read a chunk of rows at a time.

    The object is spooled to local disk (Parquet's footer is at the end); only the row groups that hold
    ``[start_row, stop_row)`` are read. Needs pyarrow (``pip install tierserve[batch]``)."""
    try:
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
        row = start_row
        groups = list(range(first, pf.num_row_groups))
        batches = pf.iter_batches(batch_size=chunk_rows, row_groups=groups,
                                  columns=columns + (["id"] if has_id else [])) if groups else iter(())
        for batch in batches:
            if skip:
                drop = min(skip, batch.num_rows)
                batch, skip = batch.slice(drop), skip - drop
                if not batch.num_rows:
                    continue
            if row >= n:
                break
            batch = batch.slice(0, n - row)
            block = {name: _arrow_column(batch.column(name), spec, loc) for name, spec in
                     ((s.name, s) for s in model.inputs)}
            ids = batch.column("id").to_numpy(zero_copy_only=False) if has_id else None
            yield from _array_records(block, ids, row, model)
            row += batch.num_rows


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


def encode_part(records: list[Record], outputs: dict[str, np.ndarray], datatypes: dict[str, str]) -> bytes:
    """One JSON line per record, in order: ``{"id", "line", "outputs": [{name, datatype, shape, data}]}``.

    Deterministic: the same records and outputs always give the same bytes. Each output's rows are
    turned into Python values once for the whole part, and a line is joined from pre-encoded pieces."""
    if not records:
        return b""
    dumps = orjson.dumps
    names = list(outputs)
    rows_of = {}
    heads = {}
    for name, arr in outputs.items():
        rows_of[name] = _row_values(arr, datatypes[name])  # per-row flat lists (2-D+), or scalars (1-D)
        tail = b"".join(b",%d" % d for d in arr.shape[1:])
        heads[name] = (b'{"name":' + dumps(name) + b',"datatype":' + dumps(datatypes[name]) + b',"shape":[',
                       tail + b'],"data":', arr.ndim == 1)
    lines = []
    row = 0
    for rec in records:
        outs = []
        for name in names:
            head, tail, scalar = heads[name]
            values = rows_of[name]
            if scalar:
                data = values[row:row + rec.rows]
            elif rec.rows == 1:
                data = values[row]
            else:
                data = [x for r in values[row:row + rec.rows] for x in r]
            outs.append(b"%s%d%s%s}" % (head, rec.rows, tail, dumps(data)))
        row += rec.rows
        lines.append(b'{"id":%s,"line":%d,"outputs":[%s]}' % (dumps(rec.id), rec.line, b",".join(outs)))
    return b"\n".join(lines) + b"\n"


def _row_values(arr: np.ndarray, datatype: str) -> list[Any]:
    if arr.ndim <= 1:
        return json_values(arr, datatype)
    if datatype != "BYTES":
        return arr.reshape(len(arr), -1).tolist()
    flat, k = json_values(arr, datatype), int(math.prod(arr.shape[1:]))
    return [flat[i:i + k] for i in range(0, len(flat), k)]


def encode_parquet_part(records: list[Record], outputs: dict[str, np.ndarray]) -> bytes:
    """A Parquet part: columns ``id``, ``line`` and one per output (a fixed-size list per row when the
    output has more than one value per row); one row per input row, in order. Deterministic bytes."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = sum(r.rows for r in records)
    lines = np.repeat(np.array([r.line for r in records], dtype=np.int64), [r.rows for r in records])
    ids = [r.id for r in records for _ in range(r.rows)]
    cols: dict[str, Any] = {"id": pa.array([None if i is None else str(i) for i in ids], pa.string()),
                            "line": pa.array(lines)}
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
