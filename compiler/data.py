"""Tensor specs read from ONNX graphs, and the ``.npz`` files users pass (validation, calibration,
example inputs): arrays keyed by input name, a single array for single-input models, optional
``_labels``."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tierserve.manifest import TensorSpec
from tierserve_compiler.errors import InputDataError

LABELS_KEY = "_labels"

#: ONNX TensorProto element type -> Open Inference Protocol datatype.
ONNX_TO_PROTOCOL = {
    1: "FP32", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64", 8: "BYTES",
    9: "BOOL", 10: "FP16", 11: "FP64", 12: "UINT32", 13: "UINT64",
}  # fmt: skip
PROTOCOL_TO_NUMPY = {
    "FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32,
    "INT16": np.int16, "INT8": np.int8, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "BOOL": np.bool_, "BYTES": np.object_,
}  # fmt: skip


def specs_from_onnx(model: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of an ``onnx.ModelProto``; symbolic or unknown dims become -1.

    Inputs also keep what the runtime checks before running them: the names of their symbolic
    dimensions (inputs sharing one must agree on its size) and, for integer inputs that index an
    embedding, the valid range ``[0, rows - 1]``."""
    ranges = index_ranges(model)

    def spec(vi: Any, is_input: bool) -> TensorSpec:
        t = vi.type.tensor_type
        dt = ONNX_TO_PROTOCOL.get(t.elem_type)
        if dt is None:
            raise InputDataError(f"tensor {vi.name!r} has ONNX element type {t.elem_type}, which is not served")
        dims = tuple(int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in t.shape.dim)
        names = tuple(d.dim_param if d.HasField("dim_param") else "" for d in t.shape.dim)
        if not is_input:
            return TensorSpec(name=vi.name, datatype=dt, shape=dims)
        return TensorSpec(name=vi.name, datatype=dt, shape=dims, dim_names=names if any(names) else (),
                          value_range=ranges.get(vi.name))

    inits = {i.name for i in model.graph.initializer}
    inputs = [spec(i, True) for i in model.graph.input if i.name not in inits]
    outputs = [spec(o, False) for o in model.graph.output]
    return inputs, outputs


def index_ranges(model: Any) -> dict[str, tuple[float, float]]:
    """Graph inputs used (directly, or through Cast/Identity) as the indices of a ``Gather`` over an
    initializer: the input -> ``(0, rows - 1)`` along the gathered axis (an embedding's vocabulary).
    Negative indices, which Gather also accepts, are no token id and are refused too."""
    graph = model.graph
    sizes = {i.name: list(i.dims) for i in graph.initializer}
    inputs = {i.name for i in graph.input if i.name not in sizes}
    origin = {name: name for name in inputs}  # tensor -> the graph input it is a pass-through of
    ranges: dict[str, tuple[float, float]] = {}
    for node in graph.node:  # nodes are topologically sorted in a valid model
        if node.op_type in ("Cast", "Identity") and node.input and node.input[0] in origin:
            origin[node.output[0]] = origin[node.input[0]]
        elif node.op_type == "Gather" and len(node.input) == 2 and node.input[1] in origin:
            data = sizes.get(node.input[0])
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            if data and -len(data) <= axis < len(data):
                name = origin[node.input[1]]
                hi = int(data[axis]) - 1
                ranges[name] = (0, min(hi, ranges.get(name, (0, hi))[1]))
    return ranges


@dataclass
class Dataset:
    """Model inputs keyed by name, plus optional labels."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = ""

    @property
    def rows(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def take(self, n: int) -> Dataset:
        return Dataset(
            {k: v[:n] for k, v in self.inputs.items()}, None if self.labels is None else self.labels[:n], self.source
        )

    def batch(self, n: int) -> dict[str, np.ndarray]:
        """``n`` rows, repeating the data when it has fewer."""
        reps = -(-n // self.rows)
        return {k: np.concatenate([v] * reps)[:n] for k, v in self.inputs.items()}


def load_npz(path: Path, inputs: list[TensorSpec], what: str) -> Dataset:
    """Read ``path`` and check it against the model inputs; arrays are cast to the input dtypes."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:
        raise InputDataError(f"{what} file {path} is not a readable .npz ({exc}); write it with numpy.savez") from exc
    labels = arrays.pop(LABELS_KEY, None)
    return make_dataset(arrays, inputs, what=f"{what} file {path}", labels=labels)


def make_dataset(
    arrays: dict[str, np.ndarray], inputs: list[TensorSpec], *, what: str, labels: np.ndarray | None = None
) -> Dataset:
    names = [s.name for s in inputs]
    if len(inputs) == 1 and len(arrays) == 1 and names[0] not in arrays:
        arrays = {names[0]: next(iter(arrays.values()))}
    missing = [n for n in names if n not in arrays]
    if missing:
        raise InputDataError(
            f"{what} lacks arrays for inputs {missing}; the model's inputs are {names}; "
            f"save it with numpy.savez(path, {', '.join(f'{n}=...' for n in names)})"
        )
    out: dict[str, np.ndarray] = {}
    rows = None
    for s in inputs:
        a = np.asarray(arrays[s.name])
        if a.ndim != len(s.shape):
            raise InputDataError(
                f"{what}: input {s.name!r} has shape {list(a.shape)} but the model expects rank {len(s.shape)} "
                f"({list(s.shape)}, -1 = any)"
            )
        for i, (got, want) in enumerate(zip(a.shape, s.shape, strict=True)):
            if want > 0 and got != want and not (i == 0):
                raise InputDataError(f"{what}: input {s.name!r} dim {i} is {got}, the model expects {want}")
        if rows is not None and a.shape[0] != rows:
            raise InputDataError(f"{what}: inputs have different row counts ({rows} and {a.shape[0]})")
        rows = a.shape[0]
        out[s.name] = a.astype(PROTOCOL_TO_NUMPY[s.datatype], copy=False)
    if labels is not None and len(labels) != rows:
        raise InputDataError(f"{what}: {LABELS_KEY} has {len(labels)} rows, the inputs have {rows}")
    return Dataset(out, labels, what)


def synthetic_dataset(inputs: list[TensorSpec], rows: int, seed: int, dims: dict[str, int] | None = None) -> Dataset:
    """Seeded random inputs for models given without data (float: N(0,1); ints: small ids)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for s in inputs:
        shape = [rows] + [d if d > 0 else (dims or {}).get(s.name, 8) for d in s.shape[1:]]
        dt = PROTOCOL_TO_NUMPY[s.datatype]
        if np.issubdtype(dt, np.floating):
            out[s.name] = rng.standard_normal(shape).astype(dt)
        elif dt is np.bool_:
            out[s.name] = np.ones(shape, dtype=bool)
        else:
            out[s.name] = rng.integers(0, 2 if "mask" in s.name else 100, size=shape).astype(dt)
    return Dataset(out, None, "synthetic (seeded random) inputs")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def row_nbytes(ds: Dataset) -> int:
    """Bytes of one input row (all inputs together)."""
    return int(sum(v[:1].nbytes for v in ds.inputs.values()))
