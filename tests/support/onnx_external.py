"""Tiny ONNX models whose weights live in external-data files, built inside tests.

The manifest entries are written as plain JSON (not through ``tierserve.manifest``), so that a test
describes the store exactly as a compiler or an attacker would have left it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

X_SPEC = {"name": "x", "datatype": "FP32", "shape": [-1, 4]}
Y_SPEC = {"name": "y", "datatype": "FP32", "shape": [-1, 3]}


def external_linear(folder: Path, location: str = "weights.bin", seed: int = 0, model: str = "model.onnx") -> tuple[
        Path, np.ndarray, np.ndarray]:
    """``y = x @ W + B`` saved as ``folder/model`` with W and B in ``folder/location``; returns (path, W, B)."""
    import onnx

    from tests.support.models import linear_onnx

    data, w, b = linear_onnx(seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(onnx.load_from_string(data), str(folder / model), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=location, size_threshold=0)
    return folder / model, w, b


def with_location(model_path: Path, location: str, *, in_constant: bool = False) -> Path:
    """Rewrite ``model_path`` so that one tensor claims to live in external file ``location``.

    ``in_constant``: the tensor is a ``Constant`` node's ``value`` attribute instead of an initializer.
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(model_path), load_external_data=False)
    evil = TensorProto(name="C", data_type=TensorProto.FLOAT, dims=[3], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", "12")):
        entry = evil.external_data.add()
        entry.key, entry.value = key, value
    if in_constant:
        model.graph.node.append(helper.make_node("Constant", [], ["c"], value=evil))
    else:
        model.graph.initializer.append(evil)
        model.graph.node.append(helper.make_node("Identity", ["C"], ["c"]))
    model.graph.output.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, [3]))
    model_path.write_bytes(model.SerializeToString())
    return model_path


def _entry(root: Path, rel: str) -> dict[str, Any]:
    data = (root / rel).read_bytes()
    return {"path": rel, "sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data)}


def write_entry(root: Path, name: str, version: str = "1", external: tuple[str, ...] = ("weights.bin",),
                model: str = "model.onnx", **fields: Any) -> dict[str, Any]:
    """Add ``name`` v``version`` (files already under ``root/name/version``) to ``root/manifest.json``,
    with sha256 and size of the model and of each ``external`` file; returns the variant entry."""
    folder = f"{name}/{version}"
    variant = _entry(root, f"{folder}/{model}")
    if external:
        variant["external_data"] = [_entry(root, f"{folder}/{e}") for e in external]
    body = {"inputs": [X_SPEC], "outputs": [Y_SPEC], "variants": {"fp32": variant}, "selected_variant": "fp32",
            "targets": ["cpu"], **fields}
    path = root / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {"schema_version": 1, "models": {}}
    manifest["models"][name] = {"default_version": version, "versions": {version: body}}
    path.write_text(json.dumps(manifest, indent=2))
    return variant


def with_custom_op(model_path: Path, domain: str = "evil.custom", in_subgraph: bool = False) -> Path:
    """Rewrite ``model_path`` so that one node is an operator from ``domain`` (top level, or inside an If's branch)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(model_path), load_external_data=False)
    if in_subgraph:
        then = helper.make_graph([helper.make_node("Steal", [], ["t"], domain=domain)], "then", [],
                                 [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1])])
        other = helper.make_graph([helper.make_node("Constant", [], ["e"], value_float=0.0)], "else", [],
                                  [helper.make_tensor_value_info("e", TensorProto.FLOAT, [])])
        model.graph.node.append(helper.make_node("Constant", [], ["flag"], value_int=0))
        model.graph.node.append(helper.make_node("Cast", ["flag"], ["cond"], to=TensorProto.BOOL))
        model.graph.node.append(helper.make_node("If", ["cond"], ["c"], then_branch=then, else_branch=other))
    else:
        model.graph.node.append(helper.make_node("Steal", ["x"], ["c"], domain=domain))
    model.opset_import.append(helper.make_opsetid(domain, 1))
    model.graph.output.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, None))
    model_path.write_bytes(model.SerializeToString())
    return model_path
