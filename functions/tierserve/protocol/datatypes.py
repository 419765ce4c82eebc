"""The Open Inference Protocol's tensor datatypes: the one table every module reads.

Why here and pure Python (no numpy): the manifest (the compiler/runtime contract), the router's header
reader (``tierserve.protocol.header``) and the compiler all need the datatypes' names and sizes, and none of them may
pay numpy's import. The numpy dtypes are derived from the same table on first use (``numpy_dtypes``),
only by the paths that materialise tensors (``tierserve.protocol.tensors``, the Triton backend).
"""

from __future__ import annotations

from functools import cache
from typing import Any

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


@cache
def numpy_dtypes() -> dict[str, Any]:
    """Protocol datatype -> ``numpy.dtype``, derived from :data:`DATATYPES` (numpy is imported on the first
    call, never at import time)."""
    import numpy as np

    return {name: np.dtype(dtype) for name, (dtype, _) in DATATYPES.items()}
