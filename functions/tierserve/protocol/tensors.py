"""Open Inference Protocol (KServe v2) codec: numpy tensors to and from the wire.

``tierserve.protocol.header`` reads a body's header without numpy (what routing needs); this module
materialises its tensors and encodes responses, as Triton and ``tritonclient.http`` speak them:

* JSON: tensor ``data`` is a (possibly nested) JSON array flattened in row-major order. BYTES
  elements are strings, BOOL elements ``true``/``false``.
* Binary tensor data extension: raw little-endian bytes after the JSON header, viewed in place
  (``np.frombuffer``), never copied. BYTES elements are each a 4-byte little-endian length
  followed by that many bytes.

Request decoding raises :class:`InvalidRequestError` for every client mistake; response
decoding (the router reading a backend's answer) raises :class:`InferenceError`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from typing import Any

import numpy as np

from tierserve.errors import InferenceError, InvalidRequestError, TierserveError
from tierserve.manifest import ModelVersion
from tierserve.protocol import header as wire
from tierserve.protocol.datatypes import DATATYPES
from tierserve.protocol.messages import InferRequest, InferResponse, RequestedOutput, Tensor

#: Protocol datatype -> numpy dtype (little-endian; BYTES is an object array of ``bytes``), from the one table.
DATATYPE_TO_DTYPE: dict[str, np.dtype] = {name: np.dtype(dt) for name, (dt, _) in DATATYPES.items()}

_LEN = struct.Struct("<I")
_SHM_KEYS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


# --- datatypes -----------------------------------------------------------------------------------


def datatype_to_dtype(datatype: str) -> np.dtype:
    """The numpy dtype of a protocol datatype; :class:`InvalidRequestError` for unknown ones."""
    return DATATYPE_TO_DTYPE[wire.check_datatype(datatype)]


def dtype_to_datatype(dtype: Any) -> str:
    """The protocol datatype of a numpy dtype; ``str``, ``bytes`` and ``object`` are BYTES."""
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise InvalidRequestError(f"{dtype!r} is not a numpy dtype") from exc
    if dt.kind in "USO":
        return "BYTES"
    for name, candidate in DATATYPE_TO_DTYPE.items():
        if name != "BYTES" and dt.kind == candidate.kind and dt.itemsize == candidate.itemsize:
            return name
    raise InvalidRequestError(f"numpy dtype {dt} has no Open Inference Protocol datatype")


def _bytes_array(values: Iterable[Any], count: int | None = None) -> np.ndarray:
    items = list(values)
    arr = np.empty(len(items) if count is None else count, dtype=object)
    arr[:] = items
    return arr


def _to_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    return str(value).encode("utf-8")


def _as_array(tensor: Tensor, err: type[TierserveError]) -> np.ndarray:
    """The tensor's data as a numpy array of its datatype's dtype, shaped as ``tensor.shape``."""
    dtype = datatype_to_dtype(tensor.datatype)
    label = f"tensor {tensor.name!r}"
    if dtype.kind == "O":
        raw = np.asarray(tensor.data, dtype=object)
        flat = _bytes_array((_to_bytes(x) for x in raw.ravel()), raw.size)
        arr = flat.reshape(raw.shape)
    else:
        try:
            arr = np.asarray(tensor.data, dtype=dtype)
        except (ValueError, TypeError, OverflowError) as exc:
            raise err(f"{label}: data cannot be converted to {tensor.datatype} ({exc})") from exc
    expected = math.prod(tensor.shape)
    if arr.size != expected:
        raise err(f"{label}: shape {list(tensor.shape)} needs {expected} elements, data has {arr.size}")
    return arr


def tensor_from_numpy(name: str, array: Any, parameters: dict[str, Any] | None = None) -> Tensor:
    """A :class:`Tensor` from a numpy array (or anything ``np.asarray`` accepts)."""
    arr = np.asarray(array)
    datatype = dtype_to_datatype(arr.dtype)
    if datatype == "BYTES":
        arr = _bytes_array((_to_bytes(x) for x in arr.ravel()), arr.size).reshape(arr.shape)
    return Tensor(
        name=name,
        datatype=datatype,
        shape=tuple(int(d) for d in arr.shape),
        data=arr,
        parameters=dict(parameters or {}),
    )


# --- materialising a header ----------------------------------------------------------------------


def _describe(values: Any) -> str:
    """The first values of a client's data, for a message (a huge integer abbreviated, never all of it)."""
    if isinstance(values, list):
        shown = ", ".join(wire.brief(v, 40) for v in values[:3])
        return f"[{shown}{', ...' if len(values) > 3 else ''}]"
    return wire.brief(values)


def json_array(data: Any, datatype: str, count: int | None, label: str,
               err: type[TierserveError] = InvalidRequestError) -> np.ndarray:
    """Flat numpy array from a JSON ``data`` value; checks element kinds, ranges and (unless None) count."""
    dtype = DATATYPE_TO_DTYPE[datatype]
    if not isinstance(data, list):
        raise err(f"{label}: 'data' must be a JSON array, got {type(data).__name__}")
    if datatype == "BYTES":
        flat = wire.flatten(data)
        if count is not None and len(flat) != count:
            raise err(f"{label}: shape needs {count} elements, data has {len(flat)}")
        for x in flat:
            if not isinstance(x, str):
                raise err(f"{label}: BYTES data must be JSON strings, got {x!r}")
        try:
            return _bytes_array([x.encode("utf-8") for x in flat], len(flat))
        except UnicodeEncodeError as exc:  # a lone surrogate such as "\ud800": JSON text, but no Unicode string
            bad = next(i for i, x in enumerate(flat) if not _is_unicode(x))
            text = flat[bad][exc.start:exc.end]
            raise err(f"{label}: BYTES element {bad} is not valid Unicode ({exc.reason}: {text!r}); "
                      "send the bytes as binary data instead") from None
    try:
        raw = np.asarray(data)
    except (ValueError, TypeError, OverflowError) as exc:
        raise err(f"{label}: data is not a regular (nested) array of numbers ({exc})") from exc
    if count is not None and raw.size != count:
        raise err(f"{label}: shape needs {count} elements, data has {raw.size}")
    if raw.size == 0:
        return np.empty(0, dtype=dtype)
    kind = raw.dtype.kind
    if datatype == "BOOL":
        if kind != "b":
            raise err(f"{label}: BOOL data must be true/false, got {_describe(data)}")
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        if kind in "fO":
            # Python ints that numpy could not hold in one integer dtype (e.g. UINT64 values above
            # the INT64 range mixed with small ones) come out as float64 or object: check them exactly.
            flat = wire.flatten(data)
            for x in flat:
                if isinstance(x, float) and x.is_integer() and not info.min <= x <= info.max:
                    # orjson reads an integer past 64 bits as a float: report it as the integer it was
                    raise err(f"{label}: value {wire.brief_int(int(x))} is out of range for {datatype} "
                              f"[{info.min}, {info.max}]")
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in flat):
                raise err(f"{label}: {datatype} data must be integers, got {_describe(data)}")
            raw = np.asarray(flat, dtype=object)
            kind = "i"
        if kind not in "iu":
            raise err(f"{label}: {datatype} data must be integers, got {_describe(data)}")
        lo, hi = int(raw.min()), int(raw.max())
        if lo < info.min or hi > info.max:
            bad = lo if lo < info.min else hi
            raise err(f"{label}: value {wire.brief_int(bad)} is out of range for {datatype} [{info.min}, {info.max}]")
    elif kind not in "iuf":
        if dtype.kind != "f" or kind not in "UO":
            raise err(f"{label}: {datatype} data must be numbers, got {_describe(data)}")
        raw = _floats(wire.flatten(data), datatype, label, err)
    try:
        return raw.astype(dtype, copy=False).reshape(-1)
    except (ValueError, TypeError, OverflowError) as exc:
        raise err(f"{label}: data cannot be converted to {datatype} ({exc})") from exc


#: How JSON carries a non-finite float: standard JSON has no NaN or Infinity token, the protocol's
#: tensor data may hold strings, and numpy (so tritonclient's ``as_numpy``) and ``float()`` read these.
NON_FINITE_NAMES = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _floats(flat: list[Any], datatype: str, label: str, err: type[TierserveError]) -> np.ndarray:
    """Floating-point JSON data that spells some values as "NaN", "Infinity" or "-Infinity"."""
    values: list[float] = []
    for x in flat:
        if isinstance(x, str) and x in NON_FINITE_NAMES:
            values.append(NON_FINITE_NAMES[x])
        elif isinstance(x, float):
            values.append(x)
        elif isinstance(x, int) and not isinstance(x, bool):
            try:
                values.append(float(x))
            except OverflowError:  # an exact JSON integer past float64's range ("1" and 400 zeros)
                raise err(f"{label}: value {wire.brief_int(x)} is out of range for {datatype} (at most about "
                          f"{float(np.finfo(DATATYPE_TO_DTYPE[datatype]).max):.3g} in magnitude)") from None
        else:
            raise err(f"{label}: {datatype} data must be numbers (or \"NaN\", \"Infinity\", \"-Infinity\"), "
                      f"got {wire.brief(x)}")
    return np.asarray(values, dtype=np.float64)


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_bytes_blob(blob: memoryview, count: int, label: str, err: type[TierserveError]) -> np.ndarray:
    """Length-prefixed BYTES elements (4-byte little-endian length, then the bytes)."""
    items: list[bytes] = []
    off, n = 0, len(blob)
    while off < n:
        if len(items) >= count:
            raise err(f"{label}: binary BYTES data holds more than the {count} elements the shape needs")
        if off + 4 > n:
            raise err(f"{label}: BYTES element {len(items)} is truncated: its 4-byte length prefix is cut off")
        (length,) = _LEN.unpack_from(blob, off)
        off += 4
        if off + length > n:
            raise err(f"{label}: BYTES element {len(items)} declares {length} bytes but only {n - off} remain")
        items.append(bytes(blob[off : off + length]))
        off += length
    if len(items) != count:
        raise err(f"{label}: shape needs {count} elements, binary BYTES data has {len(items)}")
    return _bytes_array(items, count)


def _binary_array(blob: memoryview, datatype: str, count: int, label: str, err: type[TierserveError]) -> np.ndarray:
    if datatype == "BYTES":
        return _parse_bytes_blob(blob, count, label, err)
    if datatype == "BOOL":
        raw = np.frombuffer(blob, dtype=np.uint8)
        if raw.size and int(raw.max()) > 1:
            raise err(f"{label}: binary BOOL data must hold only 0 or 1 bytes")
        return raw.view(np.bool_)
    return np.frombuffer(blob, dtype=DATATYPE_TO_DTYPE[datatype])


def materialize(header: wire.Header, kind: str, err: type[TierserveError]) -> list[Tensor]:
    """numpy tensors for every tensor of ``header`` (binary data is viewed in place, not copied)."""
    tensors = []
    for t in header.tensors:
        label = f"{kind} {t.name!r}"
        if t.binary is not None:
            try:
                blob = header.blob(t)
            except ValueError as exc:  # binascii.Error: a base64 body that does not decode
                raise err(f"the body is flagged isBase64Encoded but is not valid base64: {exc}") from exc
            flat = _binary_array(blob, t.datatype, t.elements, label, err)
        else:
            flat = json_array(t.data, t.datatype, t.elements, label, err)
        tensors.append(Tensor(t.name, t.datatype, t.shape, flat.reshape(t.shape), dict(t.parameters)))
    return tensors


def request_from_header(header: wire.Header) -> InferRequest:
    return InferRequest(inputs=materialize(header, "input", InvalidRequestError), id=header.id,
                        outputs=list(header.outputs), parameters=dict(header.parameters),
                        binary_input=header.binary_input)


def decode_request(body: bytes, header_length: int | None = None) -> InferRequest:
    """Parse an inference request body (JSON, or JSON header + binary blobs)."""
    return request_from_header(wire.parse_request(body, header_length))


def decode_response(body: bytes, header_length: int | None = None) -> InferResponse:
    """Parse an inference response body; :class:`InferenceError` when it is malformed or an error."""
    header = wire.parse_response(body, header_length)
    return InferResponse(model_name=header.model_name, model_version=header.model_version,
                         outputs=materialize(header, "output", InferenceError), id=header.id,
                         parameters=dict(header.parameters))


# --- encoding ------------------------------------------------------------------------------------


def json_values(arr: np.ndarray, datatype: str) -> list[Any]:
    """Row-major flat JSON values; BYTES as utf-8 strings (UnicodeDecodeError when not utf-8); NaN and
    Infinity as the strings "NaN", "Infinity" and "-Infinity" (standard JSON has no such number)."""
    if datatype == "BYTES":
        return [x.decode("utf-8") for x in arr.ravel()]
    values = arr.ravel().tolist()
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():  # standard JSON always: see NON_FINITE_NAMES
        values = [v if math.isfinite(v) else ("NaN" if v != v else "Infinity" if v > 0 else "-Infinity")
                  for v in values]
    return values


def _blob(arr: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        parts: list[bytes] = []
        for x in arr.ravel():
            parts.append(_LEN.pack(len(x)))
            parts.append(x)
        return b"".join(parts)
    return np.ascontiguousarray(arr).tobytes()


def _encode_tensors(
    tensors: Iterable[tuple[Tensor, bool]], err: type[TierserveError], force_binary_if_not_utf8: bool
) -> tuple[list[dict[str, Any]], list[bytes]]:
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for tensor, binary in tensors:
        arr = _as_array(tensor, err)
        params = {k: v for k, v in tensor.parameters.items() if k != "binary_data_size" and k not in _SHM_KEYS}
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": [int(d) for d in tensor.shape],
        }
        if not binary:
            try:
                entry["data"] = json_values(arr, tensor.datatype)
            except UnicodeDecodeError as exc:
                if not force_binary_if_not_utf8:
                    raise err(
                        f"tensor {tensor.name!r}: BYTES data is not valid utf-8 and cannot be sent as JSON; "
                        "send it as binary data"
                    ) from exc
                binary = True
        if binary:
            blob = _blob(arr, tensor.datatype)
            params["binary_data_size"] = len(blob)
            blobs.append(blob)
        if params:
            entry["parameters"] = params
        entries.append(entry)
    return entries, blobs


def _assemble(obj: dict[str, Any], blobs: list[bytes]) -> tuple[bytes, int | None]:
    header = wire.json_dumps(obj)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def encode_request(request: InferRequest, binary: bool = False) -> tuple[bytes, int | None]:
    """Serialize a request; with ``binary`` every input goes as binary data. Returns (body, header length)."""
    entries, blobs = _encode_tensors(
        ((t, binary) for t in request.inputs), InvalidRequestError, force_binary_if_not_utf8=False
    )
    obj: dict[str, Any] = {}
    if request.id is not None:
        obj["id"] = request.id
    if request.parameters:
        obj["parameters"] = dict(request.parameters)
    obj["inputs"] = entries
    if request.outputs:
        outs = []
        for out in request.outputs:
            params = dict(out.parameters)
            if out.binary_data is not None:
                params["binary_data"] = out.binary_data
            else:
                params.pop("binary_data", None)
            outs.append({"name": out.name, "parameters": params} if params else {"name": out.name})
        obj["outputs"] = outs
    return _assemble(obj, blobs)


def _wants_binary(out: RequestedOutput | None, request: InferRequest | wire.Header | None) -> bool:
    if request is None:
        return False
    if out is not None and out.binary_data is not None:
        return out.binary_data is True
    return request.parameters.get("binary_data_output") is True


def encode_response(response: InferResponse, request: InferRequest | wire.Header | None = None
                    ) -> tuple[bytes, dict[str, str]]:
    """Serialize a response for the client that sent ``request``; returns (body, HTTP headers).

    BYTES outputs that are not valid utf-8 go as binary data even where JSON was asked for:
    tritonclient reads either form, and JSON cannot carry them faithfully.
    """
    requested = {o.name: o for o in request.outputs} if request is not None and request.outputs else None
    selected: list[tuple[Tensor, bool]] = []
    for tensor in response.outputs:
        if requested is not None and tensor.name not in requested:
            continue
        wanted = requested.get(tensor.name) if requested is not None else None
        selected.append((tensor, _wants_binary(wanted, request)))
    entries, blobs = _encode_tensors(selected, InferenceError, force_binary_if_not_utf8=True)
    obj: dict[str, Any] = {"model_name": response.model_name, "model_version": str(response.model_version)}
    if response.id is not None:
        obj["id"] = response.id
    if response.parameters:
        obj["parameters"] = dict(response.parameters)
    obj["outputs"] = entries
    body, header_length = _assemble(obj, blobs)
    if header_length is None:
        return body, {"content-type": "application/json"}
    return body, {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(header_length),
    }


def error_body(message: str) -> bytes:
    """The error body Triton and KServe send: ``{"error": message}``."""
    return wire.json_dumps({"error": str(message)})


# --- validation against the manifest ---------------------------------------------------------------


def validate_request(request: InferRequest, model: ModelVersion) -> None:
    """Check a request against the model's signature; :class:`InvalidRequestError` if it does not fit."""
    wire.check_request(request.inputs, request.outputs, model)


def _index(shape: tuple[int, ...], flat: int) -> list[int]:
    return [int(i) for i in np.unravel_index(flat, shape)] if shape else []


def check_values(request: InferRequest, model: ModelVersion) -> None:
    """Values the model cannot take, refused before any tier runs them (400, never a tier failure).

    * NaN and Infinity in a floating-point input, unless the manifest sets ``allow_non_finite``: a model
      fed NaN answers garbage that looks like an answer (an all-NaN row of the digits model is "0");
    * values outside an input's ``value_range`` (token ids past an embedding's vocabulary), which
      onnxruntime refuses with an error that would otherwise look like the tier's fault.

    Cost: one vectorised pass per checked input (about a millisecond per million values)."""
    where = f"model {model.name!r} v{model.version}"
    for tensor in request.inputs:
        spec = model.input_spec(tensor.name)
        arr = np.asarray(tensor.data)
        if spec is None or arr.size == 0 or arr.dtype.kind not in "iuf":
            continue
        if arr.dtype.kind == "f" and not model.allow_non_finite:
            finite = np.isfinite(arr)
            if not finite.all():
                flat = int(np.argmin(finite.ravel()))
                value = arr.ravel()[flat]
                raise InvalidRequestError(
                    f"input {tensor.name!r} holds {value} at index {_index(arr.shape, flat)}; {where} does not "
                    "accept NaN or Infinity (allow_non_finite is off in its manifest entry): replace them, "
                    "or publish the model with allow_non_finite if it handles them"
                )
        if spec.value_range is not None:
            lo, hi = spec.value_range
            outside = (arr < lo) | (arr > hi)
            if outside.any():
                flat = int(np.argmax(outside.ravel()))
                raise InvalidRequestError(
                    f"input {tensor.name!r} holds {arr.ravel()[flat]} at index {_index(arr.shape, flat)}, outside "
                    f"the range {where} accepts, [{lo:g}, {hi:g}] (for token ids: the vocabulary's size); "
                    "check the tokenizer matches the model"
                )


def probe_request(model: ModelVersion) -> InferRequest:
    """The smallest request ``model`` takes: one row, every dynamic dimension 1, zeros (or the low end of
    an input's ``value_range``); BYTES inputs empty strings. Readiness runs it: a model is ready when it
    loads *and runs*."""
    inputs = []
    for spec in model.inputs:
        shape = tuple(1 if d < 0 else d for d in spec.shape)
        dtype = DATATYPE_TO_DTYPE[spec.datatype]
        if spec.datatype == "BYTES":
            data = _bytes_array([b""] * math.prod(shape)).reshape(shape)
        else:
            low = 0 if spec.value_range is None else max(spec.value_range[0], min(0, spec.value_range[1]))
            data = np.full(shape, low, dtype=dtype)
        inputs.append(Tensor(spec.name, spec.datatype, shape, data))
    return InferRequest(inputs=inputs, id="readiness-probe")


# --- splitting a request by rows, merging the parts' responses ------------------------------------------


def slice_request(request: InferRequest, start: int, stop: int) -> InferRequest:
    """Rows ``start:stop`` of every input (views, not copies); the rest of the request as it was."""
    inputs = [Tensor(t.name, t.datatype, (stop - start, *t.shape[1:]), t.data[start:stop], dict(t.parameters))
              for t in request.inputs]
    return InferRequest(inputs=inputs, id=request.id, outputs=list(request.outputs),
                        parameters=dict(request.parameters), binary_input=request.binary_input)


def concat_responses(responses: list[InferResponse]) -> InferResponse:
    """The responses to the parts of a split request, as one: outputs concatenated along the batch axis, in order."""
    first = responses[0]
    outputs = []
    for i, tensor in enumerate(first.outputs):
        data = np.concatenate([r.outputs[i].data for r in responses], axis=0)
        outputs.append(Tensor(tensor.name, tensor.datatype, tuple(data.shape), data, dict(tensor.parameters)))
    return InferResponse(model_name=first.model_name, model_version=first.model_version, outputs=outputs,
                         id=first.id, parameters=dict(first.parameters))
