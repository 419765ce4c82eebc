"""Find the external-data locations an ONNX file refers to, without importing onnx.

A minimal protobuf wire-format walk over ModelProto -> GraphProto -> TensorProto (initializers,
sparse initializers, Constant-node and subgraph attributes, functions). Large payloads such as
``raw_data`` are skipped by length, so a 100 MB model is scanned in milliseconds, and the
serving functions do not ship onnx (and ml_dtypes): about 57 MB less per Lambda package.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator

# Field numbers from onnx.proto3.
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER = 1, 5, 15
_NODE_ATTRIBUTE = 5
_FUNCTION_NODE = 7
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE_TENSOR, _ATTR_SPARSE_TENSORS = 5, 6, 10, 11, 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 8, 13, 14
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_MAX_DEPTH = 64


class ScanError(ValueError):
    pass


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ScanError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ScanError("varint too long")


def _fields(buf: memoryview) -> Iterator[tuple[int, int, memoryview | int]]:
    """(field number, wire type, value) for every field of one message."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield field, wire, value
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise ScanError("truncated length-delimited field")
            yield field, wire, buf[pos:pos + length]
            pos += length
        elif wire == 5:
            pos += 4
        else:
            raise ScanError(f"unsupported wire type {wire}")


def _tensor(buf: memoryview) -> tuple[str, bool, str]:
    name, external, location = "", False, ""
    for field, wire, value in _fields(buf):
        if field == _TENSOR_NAME and wire == 2:
            name = bytes(value).decode("utf-8", "replace")  # type: ignore[arg-type]
        elif field == _TENSOR_DATA_LOCATION and wire == 0:
            external = value == 1
        elif field == _TENSOR_EXTERNAL_DATA and wire == 2:
            key = val = ""
            for f2, w2, v2 in _fields(value):  # type: ignore[arg-type]
                if w2 == 2 and f2 == _ENTRY_KEY:
                    key = bytes(v2).decode("utf-8", "replace")  # type: ignore[arg-type]
                elif w2 == 2 and f2 == _ENTRY_VALUE:
                    val = bytes(v2).decode("utf-8", "replace")  # type: ignore[arg-type]
            if key == "location":
                location = val
    return name, external, location


def _sparse(buf: memoryview, depth: int) -> Iterator[tuple[str, str]]:
    for field, wire, value in _fields(buf):
        if wire == 2 and field in (_SPARSE_VALUES, _SPARSE_INDICES):
            yield from _external(value, depth)  # type: ignore[arg-type]


def _external(tensor: memoryview, depth: int) -> Iterator[tuple[str, str]]:
    name, external, location = _tensor(tensor)
    if external or location:
        yield name, location


def _nodes(buf: memoryview, depth: int) -> Iterator[tuple[str, str]]:
    for field, wire, value in _fields(buf):
        if field != _NODE_ATTRIBUTE or wire != 2:
            continue
        for f2, w2, v2 in _fields(value):  # type: ignore[arg-type]
            if w2 != 2:
                continue
            if f2 in (_ATTR_T, _ATTR_TENSORS):
                yield from _external(v2, depth)  # type: ignore[arg-type]
            elif f2 in (_ATTR_SPARSE_TENSOR, _ATTR_SPARSE_TENSORS):
                yield from _sparse(v2, depth)  # type: ignore[arg-type]
            elif f2 in (_ATTR_G, _ATTR_GRAPHS):
                yield from _graph(v2, depth + 1)  # type: ignore[arg-type]


def _graph(buf: memoryview, depth: int) -> Iterator[tuple[str, str]]:
    if depth > _MAX_DEPTH:
        raise ScanError("subgraphs nested too deeply")
    for field, wire, value in _fields(buf):
        if wire != 2:
            continue
        if field == _GRAPH_INITIALIZER:
            yield from _external(value, depth)  # type: ignore[arg-type]
        elif field == _GRAPH_SPARSE_INITIALIZER:
            yield from _sparse(value, depth)  # type: ignore[arg-type]
        elif field == _GRAPH_NODE:
            yield from _nodes(value, depth)  # type: ignore[arg-type]


def external_data_locations(model_bytes: bytes | memoryview | mmap.mmap) -> list[tuple[str, str]]:
    """(tensor name, location) for every tensor stored outside the model file; ScanError when it is no
    ONNX model.

    The error is raised afresh, without the walk's traceback: that traceback's frames hold views of
    ``model_bytes``, and an ``mmap`` with views still exported cannot be closed (its ``BufferError``
    would replace the clear "not a readable ONNX model")."""
    message = None
    buf = memoryview(model_bytes)
    try:
        return _locations(buf)
    except ScanError as exc:
        message = str(exc)
    finally:
        buf.release()
    raise ScanError(message)


def _locations(buf: memoryview) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for field, wire, value in _fields(buf):
        if wire != 2:
            continue
        if field == _MODEL_GRAPH:
            found.extend(_graph(value, 0))  # type: ignore[arg-type]
        elif field == _MODEL_FUNCTIONS:
            for f2, w2, v2 in _fields(value):  # type: ignore[arg-type]
                if f2 == _FUNCTION_NODE and w2 == 2:
                    found.extend(_nodes(v2, 1))  # type: ignore[arg-type]
    return found


# --- operator domains ---------------------------------------------------------------------------------------

_NODE_DOMAIN, _FUNCTION_DOMAIN = 7, 10

#: The operator domains a served model may use: ONNX's own and onnxruntime's built-in contrib ops (what the
#: compiler's optimizer and quantizer emit). tierserve never loads a custom-op library, so anything else is
#: at best a model that cannot load and at worst one that expects code it should not get.
ALLOWED_OP_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})


def _node_domains(buf: memoryview, depth: int, found: set[str]) -> None:
    for field, wire, value in _fields(buf):
        if wire != 2:
            continue
        if field == _NODE_DOMAIN:
            found.add(bytes(value).decode("utf-8", "replace"))  # type: ignore[arg-type]
        elif field == _NODE_ATTRIBUTE:
            for f2, w2, v2 in _fields(value):  # type: ignore[arg-type]
                if w2 == 2 and f2 in (_ATTR_G, _ATTR_GRAPHS):
                    _graph_domains(v2, depth + 1, found)  # type: ignore[arg-type]


def _graph_domains(buf: memoryview, depth: int, found: set[str]) -> None:
    if depth > _MAX_DEPTH:
        raise ScanError("subgraphs nested too deeply")
    for field, wire, value in _fields(buf):
        if wire == 2 and field == _GRAPH_NODE:
            _node_domains(value, depth, found)  # type: ignore[arg-type]


def operator_domains(model_bytes: bytes | memoryview | mmap.mmap) -> tuple[set[str], set[str]]:
    """(domains the model's nodes use, subgraphs and functions included; domains of the functions the model
    defines itself). Opset imports are not counted: optimizers declare domains no node uses."""
    used: set[str] = set()
    local: set[str] = set()
    message = None
    buf = memoryview(model_bytes)
    try:
        for field, wire, value in _fields(buf):
            if wire != 2:
                continue
            if field == _MODEL_GRAPH:
                _graph_domains(value, 0, used)  # type: ignore[arg-type]
            elif field == _MODEL_FUNCTIONS:
                for f2, w2, v2 in _fields(value):  # type: ignore[arg-type]
                    if f2 == _FUNCTION_DOMAIN and w2 == 2:
                        local.add(bytes(v2).decode("utf-8", "replace"))  # type: ignore[arg-type]
                    elif f2 == _FUNCTION_NODE and w2 == 2:
                        _node_domains(v2, 1, used)  # type: ignore[arg-type]
    except ScanError as exc:
        message = str(exc)
    finally:
        buf.release()
    if message is not None:
        raise ScanError(message)
    return used, local


def disallowed_domains(model_bytes: bytes | memoryview | mmap.mmap,
                       allowed: frozenset[str] = ALLOWED_OP_DOMAINS) -> list[str]:
    """The operator domains ``model_bytes`` uses that are neither allowed nor defined by the model itself."""
    used, local = operator_domains(model_bytes)
    return sorted(used - allowed - local)


def unsafe_location(location: str) -> str | None:
    """Why an external-data ``location`` may not be read (None when it is a plain relative path).

    The runtime and the compiler both ask this before touching the file: a NUL byte (which would
    otherwise raise deep inside ``os``), an absolute path (``/proc/self/environ``, ``C:\\...``), a ``..``
    component, or a path that is not in normal form. Symbolic links are the caller's business: they
    depend on the file system, not on the string.
    """
    if not location:
        return "is empty"
    if "\x00" in location:
        return "contains a NUL byte"
    if location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        return "is an absolute path"
    parts = location.replace("\\", "/").split("/")
    if ".." in parts:
        return "leaves the model's folder through '..'"
    if any(p in ("", ".") for p in parts) or any(ord(c) < 32 for c in location):
        return "is not a plain relative path (empty or '.' components, control characters)"
    return None
