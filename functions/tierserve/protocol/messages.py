"""Protocol-level value types shared by the codec, the backends and the router.

Kept free of heavy imports: numpy is imported by the codec, not here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


def batch_rows(tensors: Sequence[Any]) -> int:
    """Rows in a batch: the first dimension of the first tensor (1 for scalars or no tensors)."""
    if not tensors or not tensors[0].shape:
        return 1
    return int(tensors[0].shape[0])


@dataclass
class Tensor:
    """One named tensor. ``data`` is a numpy array of the datatype's dtype (BYTES: dtype=object of bytes)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Any
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class RequestedOutput:
    name: str
    binary_data: bool | None = None  # None: use the request's binary_data_output default
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class InferRequest:
    inputs: list[Tensor]
    id: str | None = None
    outputs: list[RequestedOutput] = field(default_factory=list)  # empty: every output
    parameters: dict[str, Any] = field(default_factory=dict)
    binary_input: bool = False  # the request used the binary tensor extension

    @property
    def rows(self) -> int:
        return batch_rows(self.inputs)


@dataclass
class InferResponse:
    model_name: str
    model_version: str
    outputs: list[Tensor]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
