"""The Open Inference Protocol's request and response *headers*, read without materialising tensors.

Why a separate, numpy-free module: the router decides a request's tier from its names, datatypes,
shapes and sizes, checks them against the manifest, and then forwards the client's body untouched
to the CPU function (or materialises it only for the GPU tier). Importing numpy and converting a
million JSON numbers would cost more than the routing itself, so this module stops at the header:

* JSON only: the whole body is one JSON object; each tensor's ``data`` stays the parsed JSON list.
* Binary tensor data extension: the first ``Inference-Header-Content-Length`` bytes are the JSON
  header; a tensor whose ``parameters`` carry ``binary_data_size`` has no ``data`` and its raw
  little-endian bytes follow the header, in the order the tensors are listed. Its bytes are only
  located here (offset and size), never copied.

``tierserve.protocol.tensors`` turns a header into numpy arrays and back. Request errors raise
:class:`InvalidRequestError`; a malformed backend *response* raises :class:`InferenceError`.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from tierserve.errors import InvalidRequestError, TierserveError
from tierserve.manifest import ModelVersion, TensorSpec
from tierserve.protocol.datatypes import DATATYPES, UNSUPPORTED
from tierserve.protocol.messages import RequestedOutput, batch_rows

ErrorType = type[TierserveError]


# --- JSON ----------------------------------------------------------------------------------------------
# orjson: 2-4x faster than the standard library on the large bodies the router reads and forwards.
# What orjson refuses but clients send (tritonclient's JSON mode writes bare NaN/Infinity tokens;
# integers past 64 bits) is parsed again by the standard library, so that the codec can name the
# tensor and the value; JSON that neither accepts raises the standard library's error.


def json_loads(raw: bytes | bytearray | memoryview | str) -> Any:
    """Parse JSON (``json.JSONDecodeError``, a ``ValueError``, when it is not JSON at all)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(bytes(raw) if isinstance(raw, (bytearray, memoryview)) else raw)


def json_dumps(obj: Any) -> bytes:
    """Compact standard JSON as UTF-8 bytes."""
    return orjson.dumps(obj)


# What JSON text can spell but no JSON writer can write back: a lone surrogate ("\udfff" is valid JSON
# text, but no Unicode string) and an integer past 64 bits (orjson writes int64 and uint64 only). A
# request's id is echoed in its answer, and its parameters are re-encoded when a request is split, so
# both are checked when the header is read: a 400 before any inference, never a 500 after one.

#: The integers orjson writes (and Triton reads): from INT64's minimum to UINT64's maximum.
JSON_INT_RANGE = (-(2**63), 2**64 - 1)


def brief_int(n: int) -> str:
    """An integer as a message can carry it: whole when short, else its first and last digits and its length."""
    try:
        digits = str(abs(n))
    except ValueError:  # past Python's int-to-str limit (4300 digits)
        return f"{'-' if n < 0 else ''}(an integer of about {int(n.bit_length() * 0.30103) + 1} digits)"
    if len(digits) <= 40:
        return str(n)
    return f"{'-' if n < 0 else ''}{digits[:3]}...{digits[-3:]} ({len(digits)} digits)"


def brief(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (a client's value in a message, never the whole of it)."""
    text = brief_int(value) if isinstance(value, int) and not isinstance(value, bool) else repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def lone_surrogate(text: str) -> str | None:
    """The first lone surrogate in ``text`` (what makes it no Unicode string), or None."""
    if text.isascii():
        return None
    return next((c for c in text if "\ud800" <= c <= "\udfff"), None)


def check_writable(value: Any, what: str, err: ErrorType) -> None:
    """``err`` naming where and why, unless ``value`` (an id, parameters) can be written back as JSON."""
    try:
        orjson.dumps(value)
        return
    except orjson.JSONEncodeError as exc:
        reason = str(exc)
    stack: list[tuple[Any, str]] = [(value, what)]
    while stack:
        v, where = stack.pop()
        if isinstance(v, str):
            bad = lone_surrogate(v)
            if bad is not None:
                raise err(f"{where} is not valid Unicode: it holds a lone surrogate, {bad!r}; send UTF-8 text")
        elif isinstance(v, int) and not isinstance(v, bool):
            if not JSON_INT_RANGE[0] <= v <= JSON_INT_RANGE[1]:
                raise err(f"{where}: the integer {brief_int(v)} does not fit in 64 bits (INT64 or UINT64); "
                          "send it as a string")
        elif isinstance(v, dict):
            for k in v:
                if isinstance(k, str) and lone_surrogate(k) is not None:
                    raise err(f"{where} holds a key that is not valid Unicode ({brief(k)}); send UTF-8 text")
            stack.extend((x, f"{where}[{brief(k)}]") for k, x in reversed(v.items()))
        elif isinstance(v, list):
            stack.extend((x, f"{where}[{i}]") for i, x in reversed(list(enumerate(v))))
    raise err(f"{what} cannot be written back as JSON ({reason})")


# --- datatypes ---------------------------------------------------------------------------------------


def check_datatype(datatype: Any, err: ErrorType = InvalidRequestError) -> str:
    """``datatype`` if the protocol knows it and tierserve serves it; else ``err`` saying what to send."""
    if isinstance(datatype, str) and datatype in DATATYPES:
        return datatype
    if isinstance(datatype, str) and datatype in UNSUPPORTED:
        raise err(UNSUPPORTED[datatype])
    raise err(f"unknown datatype {datatype!r}; expected one of {', '.join(DATATYPES)}")


# --- bodies ------------------------------------------------------------------------------------------


class Base64Body:
    """A binary body still in base64, as API Gateway's event carries it.

    Its size and its JSON header are read without decoding the tensor bytes that follow; the
    whole body is decoded (and validated) only when a tensor is materialised. The router forwards
    such a body to the CPU function without ever decoding it."""

    def __init__(self, text: str) -> None:
        if len(text) % 4:
            raise ValueError(f"base64 text of {len(text)} characters is not a multiple of 4 long")
        self.text = text
        self._data: bytes | None = None

    def __len__(self) -> int:
        return len(self.text) // 4 * 3 - self.text[-2:].count("=")

    def prefix(self, n: int) -> bytes:
        """The first ``n`` bytes, decoding only the base64 characters that hold them."""
        return base64.b64decode(self.text[: (n + 2) // 3 * 4], validate=True)[:n]

    def view(self) -> memoryview:
        if self._data is None:
            self._data = base64.b64decode(self.text, validate=True)
        return memoryview(self._data)


BodyBytes = bytes | bytearray | memoryview | Base64Body


def body_view(body: BodyBytes) -> memoryview:
    """The body's bytes (a base64 body is decoded here, once; binascii.Error if it is not base64)."""
    return body.view() if isinstance(body, Base64Body) else memoryview(body)


# --- headers -----------------------------------------------------------------------------------------


@dataclass
class TensorHeader:
    """One tensor as the header describes it: JSON ``data`` as parsed, or where its binary bytes are."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    parameters: dict[str, Any] = field(default_factory=dict)  # without binary_data_size
    data: Any = None  # the JSON ``data`` value (JSON form only)
    binary: tuple[int, int] | None = None  # (offset, size) in the body's binary section

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """The tensor's size as the model sees it: elements x itemsize (BYTES: its wire bytes)."""
        size = DATATYPES[self.datatype][1]
        if size:
            return self.elements * size
        if self.binary is not None:
            return self.binary[1]
        # surrogatepass: a lone surrogate is refused when the tensor is materialised, not while routing
        return sum(4 + len(x.encode("utf-8", "surrogatepass")) for x in flatten(self.data) if isinstance(x, str))


@dataclass
class Header:
    """A request's (or response's) header and the body it came in; nothing is materialised yet."""

    tensors: list[TensorHeader]
    body: BodyBytes  # the whole body, header included (a base64 body stays undecoded until a blob is read)
    binary_start: int | None  # where the binary section starts; None: JSON only
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: list[RequestedOutput] = field(default_factory=list)  # requests: the outputs asked for
    model_name: str = ""  # responses
    model_version: str = ""  # responses

    @property
    def rows(self) -> int:
        return batch_rows(self.tensors)

    @property
    def tensor_bytes(self) -> int:
        """Bytes of tensor data, whatever the encoding: what routing compares with its thresholds."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def binary_input(self) -> bool:
        return self.binary_start is not None and any(t.binary is not None for t in self.tensors)

    def blob(self, tensor: TensorHeader) -> memoryview:
        """The binary bytes of ``tensor`` (a view into the body, not a copy)."""
        assert tensor.binary is not None and self.binary_start is not None
        offset, size = tensor.binary
        start = self.binary_start + offset
        return body_view(self.body)[start : start + size]


def split_body(body: BodyBytes, header_length: Any, what: str, err: ErrorType) -> tuple[bytes, int | None]:
    """(JSON header bytes, where the binary section starts or None) for a body and its header length."""
    if not isinstance(body, (bytes, bytearray, memoryview, Base64Body)):
        raise err(f"{what} body must be bytes, got {type(body).__name__}")
    try:
        if header_length is None:
            return bytes(body_view(body)), None
        header_prefix = body.prefix if isinstance(body, Base64Body) else (lambda n: bytes(memoryview(body)[:n]))
    except binascii.Error as exc:
        raise err(f"the {what} body is flagged isBase64Encoded but is not valid base64: {exc}") from exc
    try:
        hlen = int(header_length)
    except (TypeError, ValueError) as exc:
        raise err(f"Inference-Header-Content-Length must be an integer, got {header_length!r}") from exc
    if hlen < 0 or hlen > len(body):
        raise err(f"Inference-Header-Content-Length {hlen} is outside the {what} body of {len(body)} bytes")
    try:
        return header_prefix(hlen), hlen
    except binascii.Error as exc:
        raise err(f"the {what} body is flagged isBase64Encoded but is not valid base64: {exc}") from exc


def load_json_object(raw: bytes, what: str, err: ErrorType, header_length_given: bool = True) -> dict[str, Any]:
    try:
        obj = json_loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        hint = ""
        if isinstance(exc, json.JSONDecodeError) and exc.msg == "Extra data" and not header_length_given:
            hint = " (binary tensor data needs the Inference-Header-Content-Length header)"
        raise err(f"{what} is not valid JSON: {exc}{hint}") from exc
    if not isinstance(obj, dict):
        raise err(f"{what} must be a JSON object, got {type(obj).__name__}")
    return obj


#: The most dimensions a tensor may have (numpy's own limit; Triton's is lower in practice).
MAX_RANK = 32
#: Dimensions are INT64 in the protocol: the largest one a shape may name.
MAX_DIM = 2**63 - 1
#: The most bytes the non-zero dimensions of a shape may describe: numpy cannot even shape an empty
#: array past this, and no body that fits an API Gateway request comes anywhere near it.
MAX_SHAPE_BYTES = 2**62


def check_shape(shape: Any, label: str, err: ErrorType, datatype: str | None = None) -> tuple[int, ...]:
    """The shape as a tuple: at most MAX_RANK non-negative INT64 dimensions that numpy can represent."""
    if not isinstance(shape, list):
        raise err(f"{label}: 'shape' must be a list of non-negative integers, got {shape!r}")
    if len(shape) > MAX_RANK:
        raise err(f"{label}: shape has {len(shape)} dimensions; at most {MAX_RANK} are supported")
    for d in shape:
        if isinstance(d, float) and d.is_integer() and d > MAX_DIM:  # orjson reads an int past 64 bits as a float
            raise err(f"{label}: dimension {brief_int(int(d))} does not fit in INT64 (at most {MAX_DIM})")
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise err(f"{label}: shape {brief(shape)} has an invalid dimension {brief(d)}; "
                      "expected non-negative integers")
        if d > MAX_DIM:
            raise err(f"{label}: dimension {brief_int(d)} does not fit in INT64 (at most {MAX_DIM})")
    itemsize = max(DATATYPES[datatype][1], 8) if datatype in DATATYPES else 8
    if math.prod(d for d in shape if d) * itemsize > MAX_SHAPE_BYTES:
        raise err(f"{label}: shape {fmt_shape(shape)} describes more elements than any tensor can hold; "
                  "check the shape")
    return tuple(shape)


def json_shape(data: Any) -> tuple[int, ...]:
    """The shape a nested JSON list implies, read along its first elements (regularity is checked
    when the data is materialised)."""
    shape: list[int] = []
    while isinstance(data, list):
        shape.append(len(data))
        if not data:
            break
        data = data[0]
    return tuple(shape)


def flatten(data: Any) -> list[Any]:
    """Row-major flattening of nested JSON lists, without recursion (a scalar is a list of one)."""
    if not isinstance(data, list):
        return [data]
    if not any(isinstance(x, list) for x in data):
        return data
    out: list[Any] = []
    stack: list[Iterator[Any]] = [iter(data)]
    while stack:
        for x in stack[-1]:
            if isinstance(x, list):
                stack.append(iter(x))
                break
            out.append(x)
        else:
            stack.pop()
    return out


def tensor_headers(items: Any, kind: str, binary_size: int | None, err: ErrorType) -> list[TensorHeader]:
    """Tensor headers from the ``inputs``/``outputs`` JSON list; binary sizes must add up to the section."""
    if not isinstance(items, list):
        raise err(f"'{kind}s' must be a JSON array, got {type(items).__name__}")
    tensors: list[TensorHeader] = []
    seen: set[str] = set()
    offset = 0
    for i, obj in enumerate(items):
        if not isinstance(obj, dict):
            raise err(f"{kind} #{i} must be a JSON object, got {type(obj).__name__}")
        name = obj.get("name")
        if not isinstance(name, str) or not name:
            raise err(f"{kind} #{i}: 'name' must be a non-empty string, got {brief(name)}")
        check_writable(name, f"{kind} #{i}: 'name'", err)
        label = f"{kind} {name!r}"
        if name in seen:
            raise err(f"{label} is given more than once")
        seen.add(name)
        if obj.get("datatype") is None:
            raise err(f"{label}: 'datatype' is missing")
        try:
            datatype = check_datatype(obj["datatype"], err)
        except TierserveError as exc:
            raise err(f"{label}: {exc.message}") from exc
        if "shape" not in obj:
            raise err(f"{label}: 'shape' is missing")
        shape = check_shape(obj["shape"], label, err, datatype)
        params = obj.get("parameters") or {}
        if not isinstance(params, dict):
            raise err(f"{label}: 'parameters' must be a JSON object, got {type(params).__name__}")
        if "shared_memory_region" in params:
            raise err(
                f"{label}: the shared-memory extension (shared_memory_region) is not supported by "
                "tierserve; send the tensor as JSON data or binary data instead"
            )
        check_writable(params, f"{label}: parameters", err)
        tensor = TensorHeader(name, datatype, shape)
        if "binary_data_size" in params:
            size = params["binary_data_size"]
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise err(f"{label}: binary_data_size must be a non-negative integer, got {size!r}")
            if "data" in obj:
                raise err(f"{label}: give either 'data' or parameters.binary_data_size, not both")
            if binary_size is None:
                raise err(
                    f"{label}: binary_data_size is set but the body has no binary section "
                    "(the Inference-Header-Content-Length header is missing)"
                )
            if offset + size > binary_size:
                raise err(
                    f"{label}: binary_data_size {size} exceeds the {binary_size - offset} bytes left in "
                    "the body (truncated?)"
                )
            itemsize = DATATYPES[datatype][1]
            if itemsize and size != tensor.elements * itemsize:
                raise err(
                    f"{label}: binary_data_size is {size} bytes, expected {tensor.elements * itemsize} "
                    f"({tensor.elements} elements x {itemsize} bytes of {datatype})"
                )
            tensor.binary = (offset, size)
            offset += size
            params = {k: v for k, v in params.items() if k != "binary_data_size"}
        elif "data" in obj:
            tensor.data = obj["data"]
        else:
            raise err(f"{label}: needs either 'data' or parameters.binary_data_size")
        tensor.parameters = params
        tensors.append(tensor)
    if binary_size is not None and offset != binary_size:
        raise err(f"{binary_size - offset} unexpected trailing bytes after the binary tensor data")
    return tensors


def parse_request(body: BodyBytes, header_length: int | str | None = None) -> Header:
    """A request's header: names, datatypes, shapes and where the data is; :class:`InvalidRequestError`."""
    err = InvalidRequestError
    raw, binary_start = split_body(body, header_length, "request", err)
    obj = load_json_object(raw, "the inference request", err, header_length is not None)
    inputs = obj.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise err("the inference request needs a non-empty 'inputs' array")
    binary_size = None if binary_start is None else len(body) - binary_start
    tensors = tensor_headers(inputs, "input", binary_size, err)
    req_id = obj.get("id")
    if req_id is not None and not isinstance(req_id, str):
        raise err(f"'id' must be a string, got {brief(req_id)}")
    if req_id is not None:
        check_writable(req_id, "'id'", err)  # the answer echoes it
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise err(f"'parameters' must be a JSON object, got {type(params).__name__}")
    check_writable(params, "parameters", err)  # a split request re-encodes them
    return Header(tensors, body, binary_start, req_id, dict(params),
                  requested_outputs(obj.get("outputs"), err))


def parse_response(body: BodyBytes, header_length: int | str | None = None,
                   err: ErrorType | None = None) -> Header:
    """A backend's response header; :class:`InferenceError` when it is malformed or an error body."""
    from tierserve.errors import InferenceError

    err = err or InferenceError
    raw, binary_start = split_body(body, header_length, "response", err)
    obj = load_json_object(raw, "the inference response", err, header_length is not None)
    if "error" in obj and "outputs" not in obj:
        raise err(str(obj["error"]))
    binary_size = None if binary_start is None else len(body) - binary_start
    tensors = tensor_headers(obj.get("outputs", []), "output", binary_size, err)
    resp_id = obj.get("id")
    params = obj.get("parameters") or {}
    return Header(tensors, body, binary_start, None if resp_id is None else str(resp_id),
                  dict(params) if isinstance(params, dict) else {},
                  model_name=str(obj.get("model_name", "")), model_version=str(obj.get("model_version", "")))


def requested_outputs(items: Any, err: ErrorType = InvalidRequestError) -> list[RequestedOutput]:
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
        check_writable(name, f"requested output #{i}: 'name'", err)
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
        check_writable(params, f"output {name!r}: parameters", err)
        binary = params.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise err(f"output {name!r}: binary_data must be true or false, got {binary!r}")
        outputs.append(RequestedOutput(name=name, binary_data=binary, parameters=dict(params)))
    return outputs


# --- validation against the manifest -----------------------------------------------------------------


def fmt_shape(shape: Any) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def check_request(inputs: list[Any], outputs: list[RequestedOutput], model: ModelVersion) -> None:
    """Check inputs (anything with name, datatype, shape) and requested outputs against the model's signature.

    :class:`InvalidRequestError` says what was expected and what was given."""
    check_names([t.name for t in inputs], model)
    given = {t.name: t for t in inputs}
    where = f"model {model.name!r} v{model.version}"
    batch: tuple[str, int] | None = None
    for spec in model.inputs:
        tensor = given[spec.name]
        _check_input(tensor, spec)
        if spec.shape and (model.max_batch_size > 0 or spec.shape[0] == -1):
            rows = int(tensor.shape[0])
            if batch is None:
                batch = (spec.name, rows)
            elif rows != batch[1]:
                raise InvalidRequestError(
                    f"input {spec.name!r}: batch size (dim 0) {rows} differs from "
                    f"input {batch[0]!r}'s {batch[1]}; all inputs must have the same batch size"
                )
    check_shared_dims(given, model)
    known_outputs = [s.name for s in model.outputs]
    for out in outputs:
        if out.name not in known_outputs:
            raise InvalidRequestError(
                f"unknown requested output {out.name!r} for {where}; outputs: "
                f"{', '.join(repr(n) for n in known_outputs) or 'none'}"
            )


def check_shared_dims(given: dict[str, Any], model: ModelVersion) -> None:
    """Inputs whose dimensions share a symbolic name in the model (``input_ids`` and ``attention_mask``
    on ``sequence``) must agree on its size: checked here, before any tier runs a mismatched pair."""
    seen: dict[str, tuple[str, int, int]] = {}
    for spec in model.inputs:
        for axis, dim in enumerate(spec.dim_names):
            if not dim:
                continue
            size = int(given[spec.name].shape[axis])
            first = seen.setdefault(dim, (spec.name, axis, size))
            if first[2] != size:
                raise InvalidRequestError(
                    f"input {spec.name!r}: dimension {axis} ({dim!r}) is {size}, but input {first[0]!r} has "
                    f"{first[2]} in its dimension {first[1]} ({dim!r}); inputs that share a dimension must agree"
                )


def check_names(names: list[str], model: ModelVersion) -> None:
    """Every input the model takes is given, and no other: :class:`InvalidRequestError` naming both."""
    where = f"model {model.name!r} v{model.version}"
    expected_names = [s.name for s in model.inputs]
    expected_list = ", ".join(repr(n) for n in expected_names) or "none"
    unknown = [n for n in names if model.input_spec(n) is None]
    if unknown:
        raise InvalidRequestError(
            f"unknown input(s) {', '.join(repr(n) for n in unknown)} for {where}; expected inputs: {expected_list}"
        )
    missing = [n for n in expected_names if n not in names]
    if missing:
        raise InvalidRequestError(
            f"missing input(s) {', '.join(repr(n) for n in missing)} for {where}; expected inputs: {expected_list}"
        )


def _check_input(tensor: Any, spec: TensorSpec) -> None:
    label = f"input {spec.name!r}"
    if tensor.datatype != spec.datatype:
        raise InvalidRequestError(f"{label}: expected datatype {spec.datatype}, got {tensor.datatype}")
    if len(tensor.shape) != len(spec.shape):
        raise InvalidRequestError(
            f"{label}: expected rank {len(spec.shape)} (shape {fmt_shape(spec.shape)}), "
            f"got rank {len(tensor.shape)} (shape {fmt_shape(tensor.shape)})"
        )
    for axis, (want, got) in enumerate(zip(spec.shape, tensor.shape, strict=True)):
        if want != -1 and want != got:
            raise InvalidRequestError(
                f"{label}: dimension {axis} must be {want} (shape {fmt_shape(spec.shape)}), "
                f"got {got} (shape {fmt_shape(tensor.shape)})"
            )
