"""Open Inference Protocol (KServe v2) codec: JSON and the binary tensor data extension.

Wire format, as Triton and ``tritonclient.http`` speak it:

* JSON only: the whole body is a JSON object; tensor ``data`` is a (possibly nested) JSON
  array flattened in row-major order. BYTES elements are strings, BOOL elements ``true``/``false``.
* Binary tensor data extension: the first ``Inference-Header-Content-Length`` bytes are the
  JSON header; every tensor whose ``parameters`` carry ``binary_data_size`` has no ``data``
  and its raw little-endian bytes follow the header, in the order the tensors are listed.
  BYTES elements are each a 4-byte little-endian length followed by that many bytes.

Request decoding raises :class:`InvalidRequestError` for every client mistake; response
decoding (the router reading a backend's answer) raises :class:`InferenceError`.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from typing import Any

import numpy as np

from tierserve.errors import InferenceError, InvalidRequestError, TierserveError
from tierserve.manifest import ModelVersion, TensorSpec
from tierserve.types import InferRequest, InferResponse, RequestedOutput, Tensor

PLATFORM = "onnxruntime_onnx"

#: Protocol datatype -> numpy dtype (little-endian; BYTES is an object array of ``bytes``).
DATATYPE_TO_DTYPE: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}

#: Datatypes of the protocol that tierserve does not serve, with what to do instead.
_UNSUPPORTED = {
    "BF16": "BF16 is not supported by tierserve (numpy has no bfloat16); send FP32 or FP16 instead",
}

_LEN = struct.Struct("<I")
_JSON_SEPARATORS = (",", ":")
_SHM_KEYS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


# --- datatypes -----------------------------------------------------------------------------------


def datatype_to_dtype(datatype: str) -> np.dtype:
    """The numpy dtype of a protocol datatype; :class:`InvalidRequestError` for unknown ones."""
    dtype = DATATYPE_TO_DTYPE.get(datatype) if isinstance(datatype, str) else None
    if dtype is not None:
        return dtype
    if isinstance(datatype, str) and datatype in _UNSUPPORTED:
        raise InvalidRequestError(_UNSUPPORTED[datatype])
    raise InvalidRequestError(f"unknown datatype {datatype!r}; expected one of {', '.join(DATATYPE_TO_DTYPE)}")


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


# --- decoding ------------------------------------------------------------------------------------


def _split_body(
    body: bytes, header_length: int | str | None, what: str, err: type[TierserveError]
) -> tuple[bytes, memoryview]:
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise err(f"{what} body must be bytes, got {type(body).__name__}")
    view = memoryview(body)
    if header_length is None:
        return bytes(view), memoryview(b"")
    try:
        hlen = int(header_length)
    except (TypeError, ValueError) as exc:
        raise err(f"Inference-Header-Content-Length must be an integer, got {header_length!r}") from exc
    if hlen < 0 or hlen > len(view):
        raise err(f"Inference-Header-Content-Length {hlen} is outside the {what} body of {len(view)} bytes")
    return bytes(view[:hlen]), view[hlen:]


def _load_json_object(
    raw: bytes, what: str, err: type[TierserveError], header_length_given: bool = True
) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        hint = ""
        if isinstance(exc, json.JSONDecodeError) and exc.msg == "Extra data" and not header_length_given:
            hint = " (binary tensor data needs the Inference-Header-Content-Length header)"
        raise err(f"{what} is not valid JSON: {exc}{hint}") from exc
    if not isinstance(obj, dict):
        raise err(f"{what} must be a JSON object, got {type(obj).__name__}")
    return obj


def _check_shape(shape: Any, label: str, err: type[TierserveError]) -> tuple[int, ...]:
    if not isinstance(shape, list):
        raise err(f"{label}: 'shape' must be a list of non-negative integers, got {shape!r}")
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise err(f"{label}: shape {shape!r} has an invalid dimension {d!r}; expected non-negative integers")
    return tuple(shape)


def _flatten_json(data: list[Any]) -> list[Any]:
    """Row-major flattening of nested JSON lists, without recursion."""
    if not any(isinstance(x, list) for x in data):
        return data
    out: list[Any] = []
    stack: list[Iterable[Any]] = [iter(data)]
    while stack:
        for x in stack[-1]:
            if isinstance(x, list):
                stack.append(iter(x))
                break
            out.append(x)
        else:
            stack.pop()
    return out


def _describe(values: Any) -> str:
    return f"{values[:3]!r}..." if isinstance(values, list) and len(values) > 3 else repr(values)


def _json_data(
    data: Any, datatype: str, dtype: np.dtype, count: int, label: str, err: type[TierserveError]
) -> np.ndarray:
    """Flat numpy array from a JSON ``data`` array; checks element kinds, ranges and count."""
    if not isinstance(data, list):
        raise err(f"{label}: 'data' must be a JSON array, got {type(data).__name__}")
    if datatype == "BYTES":
        flat = _flatten_json(data)
        if len(flat) != count:
            raise err(f"{label}: shape needs {count} elements, data has {len(flat)}")
        for x in flat:
            if not isinstance(x, str):
                raise err(f"{label}: BYTES data must be JSON strings, got {x!r}")
        return _bytes_array((x.encode("utf-8") for x in flat), count)
    try:
        raw = np.asarray(data)
    except (ValueError, TypeError, OverflowError) as exc:
        raise err(f"{label}: data is not a regular (nested) array of numbers ({exc})") from exc
    if raw.size != count:
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
            flat = _flatten_json(data)
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in flat):
                raise err(f"{label}: {datatype} data must be integers, got {_describe(data)}")
            raw = np.asarray(flat, dtype=object)
            kind = "i"
        if kind not in "iu":
            raise err(f"{label}: {datatype} data must be integers, got {_describe(data)}")
        lo, hi = int(raw.min()), int(raw.max())
        if lo < info.min or hi > info.max:
            bad = lo if lo < info.min else hi
            raise err(f"{label}: value {bad} is out of range for {datatype} [{info.min}, {info.max}]")
    elif kind not in "iuf":
        raise err(f"{label}: {datatype} data must be numbers, got {_describe(data)}")
    try:
        return raw.astype(dtype, copy=False).ravel()
    except (ValueError, TypeError, OverflowError) as exc:
        raise err(f"{label}: data cannot be converted to {datatype} ({exc})") from exc


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


def _binary_data(
    blob: memoryview, datatype: str, dtype: np.dtype, count: int, label: str, err: type[TierserveError]
) -> np.ndarray:
    if datatype == "BYTES":
        return _parse_bytes_blob(blob, count, label, err)
    expected = count * dtype.itemsize
    if len(blob) != expected:
        raise err(
            f"{label}: binary_data_size is {len(blob)} bytes, expected {expected} "
            f"({count} elements x {dtype.itemsize} bytes of {datatype})"
        )
    if datatype == "BOOL":
        raw = np.frombuffer(blob, dtype=np.uint8)
        if raw.size and int(raw.max()) > 1:
            raise err(f"{label}: binary BOOL data must hold only 0 or 1 bytes")
        return raw.view(np.bool_)
    return np.frombuffer(blob, dtype=dtype)


def _parse_tensors(
    items: Any,
    kind: str,
    blobs: memoryview,
    binary_section: bool,
    err: type[TierserveError],
) -> tuple[list[Tensor], int, bool]:
    """Tensors from the ``inputs``/``outputs`` JSON list; returns (tensors, blob bytes used, any binary)."""
    if not isinstance(items, list):
        raise err(f"'{kind}s' must be a JSON array, got {type(items).__name__}")
    tensors: list[Tensor] = []
    seen: set[str] = set()
    offset = 0
    any_binary = False
    for i, obj in enumerate(items):
        if not isinstance(obj, dict):
            raise err(f"{kind} #{i} must be a JSON object, got {type(obj).__name__}")
        name = obj.get("name")
        if not isinstance(name, str) or not name:
            raise err(f"{kind} #{i}: 'name' must be a non-empty string, got {name!r}")
        label = f"{kind} {name!r}"
        if name in seen:
            raise err(f"{label} is given more than once")
        seen.add(name)
        datatype = obj.get("datatype")
        if datatype is None:
            raise err(f"{label}: 'datatype' is missing")
        try:
            dtype = datatype_to_dtype(datatype)
        except InvalidRequestError as exc:
            raise err(f"{label}: {exc.message}") from exc
        if "shape" not in obj:
            raise err(f"{label}: 'shape' is missing")
        shape = _check_shape(obj["shape"], label, err)
        count = math.prod(shape)
        params = obj.get("parameters") or {}
        if not isinstance(params, dict):
            raise err(f"{label}: 'parameters' must be a JSON object, got {type(params).__name__}")
        if "shared_memory_region" in params:
            raise err(
                f"{label}: the shared-memory extension (shared_memory_region) is not supported by "
                "tierserve; send the tensor as JSON data or binary data instead"
            )
        has_data = "data" in obj
        if "binary_data_size" in params:
            size = params["binary_data_size"]
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise err(f"{label}: binary_data_size must be a non-negative integer, got {size!r}")
            if has_data:
                raise err(f"{label}: give either 'data' or parameters.binary_data_size, not both")
            if not binary_section:
                raise err(
                    f"{label}: binary_data_size is set but the body has no binary section "
                    "(the Inference-Header-Content-Length header is missing)"
                )
            if offset + size > len(blobs):
                raise err(
                    f"{label}: binary_data_size {size} exceeds the {len(blobs) - offset} bytes left in "
                    "the body (truncated?)"
                )
            data = _binary_data(blobs[offset : offset + size], datatype, dtype, count, label, err)
            offset += size
            any_binary = True
            params = {k: v for k, v in params.items() if k != "binary_data_size"}
        elif has_data:
            data = _json_data(obj["data"], datatype, dtype, count, label, err)
        else:
            raise err(f"{label}: needs either 'data' or parameters.binary_data_size")
        tensors.append(Tensor(name=name, datatype=datatype, shape=shape, data=data.reshape(shape), parameters=params))
    return tensors, offset, any_binary


def decode_request(body: bytes, header_length: int | None = None) -> InferRequest:
    """Parse an inference request body (JSON, or JSON header + binary blobs)."""
    err = InvalidRequestError
    header, blobs = _split_body(body, header_length, "request", err)
    obj = _load_json_object(header, "the inference request", err, header_length is not None)
    inputs = obj.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise err("the inference request needs a non-empty 'inputs' array")
    tensors, used, any_binary = _parse_tensors(inputs, "input", blobs, header_length is not None, err)
    if used != len(blobs):
        raise err(f"{len(blobs) - used} unexpected trailing bytes after the binary tensor data")
    req_id = obj.get("id")
    if req_id is not None and not isinstance(req_id, str):
        raise err(f"'id' must be a string, got {req_id!r}")
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise err(f"'parameters' must be a JSON object, got {type(params).__name__}")
    outputs = _parse_requested_outputs(obj.get("outputs"), err)
    return InferRequest(inputs=tensors, id=req_id, outputs=outputs, parameters=dict(params), binary_input=any_binary)


def _parse_requested_outputs(items: Any, err: type[TierserveError]) -> list[RequestedOutput]:
    if items is None:
        return []
    if not isinstance(items, list):
        raise err(f"'outputs' must be a JSON array, got {type(items).__name__}")
    outputs: list[RequestedOutput] = []
    seen: set[str] = set()
    for i, obj in enumerate(items):
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
            raise err(f"requested output #{i} must be an object with a non-empty string 'name'")
        name = obj["name"]
        if name in seen:
            raise err(f"output {name!r} is requested more than once")
        seen.add(name)
        params = obj.get("parameters") or {}
        if not isinstance(params, dict):
            raise err(f"output {name!r}: 'parameters' must be a JSON object")
        if "shared_memory_region" in params:
            raise err(
                f"output {name!r}: the shared-memory extension (shared_memory_region) is not supported "
                "by tierserve; ask for JSON or binary data instead"
            )
        if params.get("classification"):
            raise err(f"output {name!r}: the classification extension is not supported by tierserve")
        binary = params.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise err(f"output {name!r}: binary_data must be true or false, got {binary!r}")
        outputs.append(RequestedOutput(name=name, binary_data=binary, parameters=dict(params)))
    return outputs


def decode_response(body: bytes, header_length: int | None = None) -> InferResponse:
    """Parse an inference response body; :class:`InferenceError` when it is malformed or an error."""
    err = InferenceError
    header, blobs = _split_body(body, header_length, "response", err)
    obj = _load_json_object(header, "the inference response", err, header_length is not None)
    if "error" in obj and "outputs" not in obj:
        raise err(str(obj["error"]))
    tensors, used, _ = _parse_tensors(obj.get("outputs", []), "output", blobs, header_length is not None, err)
    if used != len(blobs):
        raise err(f"{len(blobs) - used} unexpected trailing bytes after the binary tensor data")
    resp_id = obj.get("id")
    params = obj.get("parameters") or {}
    return InferResponse(
        model_name=str(obj.get("model_name", "")),
        model_version=str(obj.get("model_version", "")),
        outputs=tensors,
        id=None if resp_id is None else str(resp_id),
        parameters=dict(params) if isinstance(params, dict) else {},
    )


# --- encoding ------------------------------------------------------------------------------------


def _json_values(arr: np.ndarray, datatype: str) -> list[Any]:
    """Row-major flat JSON values; BYTES as utf-8 strings (UnicodeDecodeError when not utf-8)."""
    if datatype == "BYTES":
        return [x.decode("utf-8") for x in arr.ravel()]
    return arr.ravel().tolist()


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
                entry["data"] = _json_values(arr, tensor.datatype)
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
    header = json.dumps(obj, separators=_JSON_SEPARATORS).encode("utf-8")
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


def _wants_binary(out: RequestedOutput | None, request: InferRequest | None) -> bool:
    if request is None:
        return False
    if out is not None and out.binary_data is not None:
        return out.binary_data is True
    return request.parameters.get("binary_data_output") is True


def encode_response(response: InferResponse, request: InferRequest | None = None) -> tuple[bytes, dict[str, str]]:
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
    return json.dumps({"error": str(message)}, separators=_JSON_SEPARATORS).encode("utf-8")


# --- validation against the manifest ---------------------------------------------------------------


def _fmt_shape(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def validate_request(request: InferRequest, model: ModelVersion) -> None:
    """Check a request against the model's signature; :class:`InvalidRequestError` if it does not fit."""
    where = f"model {model.name!r} v{model.version}"
    expected_names = [s.name for s in model.inputs]
    expected_list = ", ".join(repr(n) for n in expected_names) or "none"
    given = {t.name: t for t in request.inputs}
    unknown = [t.name for t in request.inputs if model.input_spec(t.name) is None]
    if unknown:
        raise InvalidRequestError(
            f"unknown input(s) {', '.join(repr(n) for n in unknown)} for {where}; expected inputs: {expected_list}"
        )
    missing = [n for n in expected_names if n not in given]
    if missing:
        raise InvalidRequestError(
            f"missing input(s) {', '.join(repr(n) for n in missing)} for {where}; expected inputs: {expected_list}"
        )
    batch: tuple[str, int] | None = None
    for spec in model.inputs:
        tensor = given[spec.name]
        _validate_input(tensor, spec)
        if spec.shape and (model.max_batch_size > 0 or spec.shape[0] == -1):
            rows = int(tensor.shape[0])
            if batch is None:
                batch = (spec.name, rows)
            elif rows != batch[1]:
                raise InvalidRequestError(
                    f"input {spec.name!r}: batch size (dim 0) {rows} differs from "
                    f"input {batch[0]!r}'s {batch[1]}; "
                    "all inputs must have the same batch size"
                )
    known_outputs = [s.name for s in model.outputs]
    for out in request.outputs:
        if out.name not in known_outputs:
            raise InvalidRequestError(
                f"unknown requested output {out.name!r} for {where}; outputs: "
                f"{', '.join(repr(n) for n in known_outputs) or 'none'}"
            )


def _validate_input(tensor: Tensor, spec: TensorSpec) -> None:
    label = f"input {spec.name!r}"
    if tensor.datatype != spec.datatype:
        raise InvalidRequestError(f"{label}: expected datatype {spec.datatype}, got {tensor.datatype}")
    if len(tensor.shape) != len(spec.shape):
        raise InvalidRequestError(
            f"{label}: expected rank {len(spec.shape)} (shape {_fmt_shape(spec.shape)}), "
            f"got rank {len(tensor.shape)} (shape {_fmt_shape(tensor.shape)})"
        )
    for axis, (want, got) in enumerate(zip(spec.shape, tensor.shape, strict=True)):
        if want != -1 and want != got:
            raise InvalidRequestError(
                f"{label}: dimension {axis} must be {want} (shape {_fmt_shape(spec.shape)}), "
                f"got {got} (shape {_fmt_shape(tensor.shape)})"
            )


def model_metadata(model: ModelVersion, versions: list[str]) -> dict[str, Any]:
    """KServe v2 model metadata."""
    return {
        "name": model.name,
        "versions": [str(v) for v in versions],
        "platform": PLATFORM,
        "inputs": [s.to_json() for s in model.inputs],
        "outputs": [s.to_json() for s in model.outputs],
    }
