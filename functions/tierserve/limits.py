"""The AWS quotas every size and time limit in tierserve is derived from, and the arithmetic of fitting into them.

Why one module: a limit checked in one place and not in the next is how a 3.8 MB request that the
router accepted could not be forwarded to the CPU function, and how a 17 MB response failed as a 500.
Every limit below is a documented quota, and every check asks this module, so that anything the
router accepts can be forwarded, and anything that cannot be answered is refused up front (413)
with what to do instead.

* Lambda, synchronous Invoke: the request payload and the response payload are 6 MB each (the whole
  JSON: an API Gateway event with the body in it, the router's Invoke payload, a function's result).
* API Gateway HTTP API: a 10 MB request body, 30 s integration timeout, 10,240 bytes of request line
  and headers. A binary body reaches the function base64-encoded (4/3 of its size); a text body as
  a JSON string (its quotes and backslashes escaped).

Pure Python, no numpy: the router imports it on every request.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

MB = 1024 * 1024
#: Lambda: the synchronous Invoke request payload (an event, the router's Invoke of the CPU function).
LAMBDA_REQUEST_BYTES = 6 * MB
#: Lambda: the synchronous Invoke response payload (a function's JSON result, HTTP response included).
LAMBDA_RESPONSE_BYTES = 6 * MB
#: API Gateway HTTP API quotas.
APIGW_PAYLOAD_BYTES = 10 * MB
APIGW_INTEGRATION_TIMEOUT_S = 30.0
APIGW_REQUEST_LINE_AND_HEADERS_BYTES = 10240
#: Room kept in every payload for what wraps a body: the event's fields and the client's headers (at most
#: 10,240 bytes), or a reply's statusCode, headers and isBase64Encoded, and the escaped quotes of a JSON
#: body's own header.
ENVELOPE_BYTES = 16 * 1024


def base64_len(n: int) -> int:
    return 4 * math.ceil(n / 3)


def raw_len_for_base64(n: int) -> int:
    """The most raw bytes whose base64 fits in ``n`` characters."""
    return n // 4 * 3


#: The largest request body the router accepts: whatever its encoding, its API Gateway event fits
#: Lambda's request payload (a binary body travels base64-encoded). MAX_PAYLOAD_BYTES may lower it only.
MAX_REQUEST_BODY_BYTES = raw_len_for_base64(LAMBDA_REQUEST_BYTES - ENVELOPE_BYTES)
#: The largest response body a function can return: JSON text as it is, binary base64-encoded.
MAX_JSON_RESPONSE_BYTES = LAMBDA_RESPONSE_BYTES - ENVELOPE_BYTES
MAX_BINARY_RESPONSE_BYTES = raw_len_for_base64(LAMBDA_RESPONSE_BYTES - ENVELOPE_BYTES)


def json_string_len(text: str) -> int:
    """Bytes ``text`` takes as a JSON string value (UTF-8, quotes and backslashes escaped, control
    characters as escapes), without encoding it: what a text body costs inside an event or a payload."""
    n = len(text.encode("utf-8", "surrogatepass")) + 2 + text.count('"') + text.count("\\")
    controls = sum(1 for c in text if ord(c) < 32) if not text.isprintable() else 0
    return n + 5 * controls  # \u00XX for each (\n and \t take 2: an overestimate by 4, never less)


def response_fits(body_bytes: int, binary: bool) -> bool:
    """Whether a response body of ``body_bytes`` fits a Lambda response (base64 when ``binary``)."""
    return body_bytes <= (MAX_BINARY_RESPONSE_BYTES if binary else MAX_JSON_RESPONSE_BYTES)


# --- predicting a response's size from the manifest -------------------------------------------------------

#: Bytes one element takes in a JSON response, separator included, for typical values: floats as
#: Python writes a float32 or float64 (``0.12345679104328156,``), integers about half their widest,
#: BYTES unknown (a short string). Binary elements take exactly their itemsize.
JSON_BYTES_PER_ELEMENT = {
    "BOOL": 6, "UINT8": 4, "UINT16": 6, "UINT32": 8, "UINT64": 12, "INT8": 5, "INT16": 7, "INT32": 9,
    "INT64": 12, "FP16": 16, "FP32": 20, "FP64": 20, "BYTES": 12,
}  # fmt: skip
#: Binary bytes per element (BYTES: a 4-byte length and a short string).
BINARY_BYTES_PER_ELEMENT = {
    "BOOL": 1, "UINT8": 1, "UINT16": 2, "UINT32": 4, "UINT64": 8, "INT8": 1, "INT16": 2, "INT32": 4,
    "INT64": 8, "FP16": 2, "FP32": 4, "FP64": 8, "BYTES": 12,
}  # fmt: skip
#: The header of a response: model name, version, id and, per output, its name, datatype and shape.
HEADER_BYTES = 256


@dataclass(frozen=True)
class OutputSize:
    name: str
    binary: bool
    bytes_per_row: int  # estimated (JSON) or exact (binary, fixed-size datatypes)


@dataclass(frozen=True)
class ResponseSize:
    """A response's predicted size, for ``rows`` rows: its JSON part and its binary part."""

    rows: int
    outputs: tuple[OutputSize, ...]

    @property
    def json_bytes(self) -> int:
        return HEADER_BYTES * (1 + len(self.outputs)) + sum(o.bytes_per_row for o in self.outputs if not o.binary) \
            * self.rows

    @property
    def binary_bytes(self) -> int:
        return sum(o.bytes_per_row for o in self.outputs if o.binary) * self.rows

    @property
    def binary(self) -> bool:
        return any(o.binary for o in self.outputs)

    @property
    def body_bytes(self) -> int:
        return self.json_bytes + self.binary_bytes

    def fits(self) -> bool:
        return response_fits(self.body_bytes, self.binary)

    def max_rows(self) -> int:
        """The most rows whose response fits, with the outputs encoded as asked."""
        per_row = sum(o.bytes_per_row for o in self.outputs)
        room = (MAX_BINARY_RESPONSE_BYTES if self.binary else MAX_JSON_RESPONSE_BYTES) - HEADER_BYTES * (
            1 + len(self.outputs))
        return max(0, room // per_row) if per_row else self.rows


def elements_per_row(shape: Sequence[int], dim_names: Sequence[str], known: dict[str, int],
                     batched: bool) -> int:
    """Elements of one row of an output: its dimensions after the batch axis; a dynamic one named like
    an input's dimension takes the request's size of it, an unknown one counts 1."""
    dims = list(zip(shape, dim_names or ("",) * len(shape), strict=False))
    if batched and dims:
        dims = dims[1:]
    return math.prod(d if d >= 0 else known.get(name, 1) for d, name in dims)


_INTEGERS = {"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"}


def _json_width(spec: Any) -> int:
    """An integer output whose ``value_range`` the manifest gives takes at most its widest bound's digits
    plus a separator (labels 0..9: 2 bytes, not a typical INT64's 12); anything else, no tighter bound."""
    rng = getattr(spec, "value_range", None)
    if rng is None or spec.datatype not in _INTEGERS:
        return 1 << 30
    return max(len(str(int(rng[0]))), len(str(int(rng[1])))) + 1


def predict_response(outputs: Iterable[Any], rows: int, binary_of: dict[str, bool], known_dims: dict[str, int],
                     batched: bool) -> ResponseSize:
    """The response's size from the manifest's output specs (``name``, ``datatype``, ``shape``,
    ``dim_names``), the batch and the request's dimension sizes (by name), with each output encoded as
    ``binary_of`` says (absent outputs are not returned)."""
    sizes = []
    for spec in outputs:
        if spec.name not in binary_of:
            continue
        binary = binary_of[spec.name]
        per_element = (BINARY_BYTES_PER_ELEMENT if binary else JSON_BYTES_PER_ELEMENT)[spec.datatype]
        if not binary:
            per_element = min(per_element, _json_width(spec))
        n = elements_per_row(spec.shape, spec.dim_names, known_dims, batched)
        sizes.append(OutputSize(spec.name, binary, n * per_element))
    return ResponseSize(rows if batched else 1, tuple(sizes))


def mb(n: int) -> str:
    return f"{n / MB:.1f} MB"
