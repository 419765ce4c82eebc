"""Batch input and output: S3 locations, streaming readers (JSONL, NPZ), row parsing, part encoding.

Readers never hold more than one line (JSONL) or one chunk of rows (NPZ) at a time: memory is
bounded by ``CHUNK_ROWS``, not by the file. Every record a reader yields carries the position
just after it (a byte offset for JSONL, a row index for NPZ), which is what a checkpoint stores,
so that a resumed job reopens the object at exactly the next record.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

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
FORMATS = (".jsonl", ".npz")
_READ_CHUNK = 1 << 20
_SEPARATORS = (",", ":")


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
    if not isinstance(bucket, str) or not BUCKET_RE.match(bucket):
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
    raise BatchInputError(f"input {key!r} must end in .jsonl or .npz")


def split_input_key(key: str) -> tuple[str | None, str]:
    """(model, job) for ``batch/in/{model}/{job}.{jsonl,npz}``; (None, stem) for any other key."""
    check_s3_key(key)
    ext = "." + input_format(key)
    rest = key[len(INPUT_PREFIX):] if key.startswith(INPUT_PREFIX) else None
    parts = rest.split("/") if rest is not None else []
    if len(parts) == 2:
        model, name = parts[0], parts[1][: -len(ext)]
        check_model_name(model)
    else:
        model, name = None, key.rsplit("/", 1)[-1][: -len(ext)]
    if not JOB_NAME_RE.match(name):
        raise InvalidNameError(f"job name {name!r} (from {key!r}) must be 1-128 letters, digits, '_', '-', '.'")
    return model, name


# --- records ------------------------------------------------------------------------------------


@dataclass
class Record:
    """One input record: a JSONL line or an NPZ row. ``error`` is set when it cannot be scored."""

    line: int  # 1-based line (JSONL) or row (NPZ) number
    end: int  # position just after this record: byte offset (JSONL) or row index (NPZ)
    id: Any = None
    feeds: dict[str, np.ndarray] | None = None
    rows: int = 0
    error: str | None = None


def parse_line(raw: bytes, line: int, end: int, model: ModelVersion) -> Record:
    """Parse one JSONL line (protocol request or ``{"id", "inputs": {name: data}}`` shorthand)."""
    rec = Record(line=line, end=end)
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        rec.error = f"not valid JSON: {exc}"
        return rec
    if not isinstance(obj, dict):
        rec.error = "each line must be a JSON object with 'inputs'"
        return rec
    rec.id = obj.get("id")
    try:
        rec.feeds, rec.rows = _feeds(obj.get("inputs"), model)
    except InvalidRequestError as exc:
        rec.error = exc.message
    return rec


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
                  start: int, first_line: int, size: int) -> Iterator[Record]:
    if start >= size:
        return
    body = get_body(s3, loc, version, start)
    try:
        for line, end, raw in iter_lines(body, start, first_line):
            if not raw.strip():
                yield Record(line=line, end=end, error="")  # blank: skipped, not an error
                continue
            yield parse_line(raw, line, end, model)
    finally:
        body.close()


def npz_records(s3: Any, loc: S3Location, version: dict[str, str], model: ModelVersion,
                start_row: int, chunk_rows: int, tmp_dir: str | None = None) -> Iterator[Record]:
    """Rows of an ``.npz`` (one array per input name, plus an optional ``id`` array), read in chunks.

    The archive is spooled to local disk (a zip needs seeking); each member is then read a
    chunk of rows at a time, so memory stays bounded by the chunk size."""
    body = get_body(s3, loc, version)
    with tempfile.TemporaryFile(dir=tmp_dir) as f:
        for block in iter(lambda: body.read(_READ_CHUNK), b""):
            f.write(block)
        body.close()
        f.seek(0)
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
            n = total.pop()
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
                for i in range(take):
                    feeds = {}
                    for spec in model.inputs:
                        feeds[spec.name] = block[spec.name][i:i + 1].astype(datatype_to_dtype(spec.datatype),
                                                                             copy=False)
                    rid = ids[i].item() if ids is not None else row + i
                    if isinstance(rid, bytes):
                        rid = rid.decode("utf-8", "replace")
                    yield Record(line=row + i + 1, end=row + i + 1, id=rid, feeds=feeds, rows=1)
                row += take


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

    Deterministic: the same records and outputs always give the same bytes."""
    lines = []
    flat = {name: json_values(arr, datatypes[name]) for name, arr in outputs.items()}
    per_row = {name: int(math.prod(arr.shape[1:])) for name, arr in outputs.items()}
    row = 0
    for rec in records:
        outs = []
        for name, values in flat.items():
            k = per_row[name]
            shape = [rec.rows, *outputs[name].shape[1:]]
            outs.append({"name": name, "datatype": datatypes[name], "shape": shape,
                         "data": values[row * k:(row + rec.rows) * k]})
        row += rec.rows
        lines.append(json.dumps({"id": rec.id, "line": rec.line, "outputs": outs}, separators=_SEPARATORS))
    return ("\n".join(lines) + "\n").encode() if lines else b""


def encode_errors(records: list[Record]) -> bytes:
    lines = [json.dumps({"line": r.line, "id": r.id, "reason": r.error}, separators=_SEPARATORS)
             for r in records]
    return ("\n".join(lines) + "\n").encode() if lines else b""


def _reason(exc: Exception) -> str:
    err = getattr(exc, "response", {}).get("Error", {}) if hasattr(exc, "response") else {}
    if err:
        return f"{err.get('Code', 'error')}: {err.get('Message', '')}".strip()
    return f"{type(exc).__name__}: {exc}"
