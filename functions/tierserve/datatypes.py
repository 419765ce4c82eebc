"""The Open Inference Protocol's tensor datatypes: the one table every module reads.

Pure Python (no numpy): the router reads a request's shapes and sizes from its JSON header with
this table alone, and only the paths that materialise tensors (``tierserve.codec``) turn the dtype
strings into numpy dtypes.
"""

from __future__ import annotations

#: Protocol datatype -> (numpy dtype string, little-endian; bytes per element). BYTES elements have no
#: fixed size (itemsize 0): on the wire each is a 4-byte little-endian length and that many bytes.
DATATYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("|b1", 1),
    "UINT8": ("<u1", 1),
    "UINT16": ("<u2", 2),
    "UINT32": ("<u4", 4),
    "UINT64": ("<u8", 8),
    "INT8": ("<i1", 1),
    "INT16": ("<i2", 2),
    "INT32": ("<i4", 4),
    "INT64": ("<i8", 8),
    "FP16": ("<f2", 2),
    "FP32": ("<f4", 4),
    "FP64": ("<f8", 8),
    "BYTES": ("|O", 0),
}

#: Datatypes of the protocol that tierserve does not serve, with what to do instead.
UNSUPPORTED: dict[str, str] = {
    "BF16": "BF16 is not supported by tierserve (numpy has no bfloat16); send FP32 or FP16 instead",
}


def itemsize(datatype: str) -> int:
    """Bytes per element (0 for BYTES, whose elements vary); KeyError for an unknown datatype."""
    return DATATYPES[datatype][1]


def triton_type(datatype: str) -> str:
    """Triton's model-config name for a protocol datatype (BYTES is ``TYPE_STRING`` there)."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"
