"""Tiny models built inside tests, written to a model store with a manifest."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from tierserve.manifest import Manifest, ModelVersion, TensorSpec, Variant


def write_model(root: Path, name: str, version: str, onnx_bytes: bytes, inputs: tuple[TensorSpec, ...],
                outputs: tuple[TensorSpec, ...], targets: tuple[str, ...] = ("cpu",), max_batch_size: int = 0,
                routing: dict | None = None) -> ModelVersion:
    """Write ``onnx_bytes`` as NAME/VERSION/model.onnx under ``root`` and add it to root/manifest.json."""
    rel = f"{name}/{version}/model.onnx"
    (root / name / version).mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(onnx_bytes)
    mv = ModelVersion(
        name=name, version=version, inputs=inputs, outputs=outputs,
        variants={"fp32": Variant(rel, hashlib.sha256(onnx_bytes).hexdigest(), len(onnx_bytes))},
        selected_variant="fp32", targets=targets, max_batch_size=max_batch_size, routing=routing or {},
    )
    manifest_path = root / "manifest.json"
    manifest = Manifest.loads(manifest_path.read_text()) if manifest_path.exists() else Manifest.empty()
    manifest_path.write_text(manifest.with_version(mv).dumps())
    return mv


def digits_classifier_onnx(seed: int = 0) -> tuple[bytes, object]:
    """StandardScaler + LogisticRegression on load_digits, exported with skl2onnx (no ZipMap)."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, random_state=seed)).fit(x, y)
    onx = to_onnx(model, initial_types=[("input", FloatTensorType([None, 64]))],
                  options={LogisticRegression: {"zipmap": False}})
    return onx.SerializeToString(), model


def write_digits(root: Path, version: str = "1") -> ModelVersion:
    data, _ = digits_classifier_onnx()
    return write_model(
        root, "digits", version, data,
        (TensorSpec("input", "FP32", (-1, 64)),),
        (TensorSpec("label", "INT64", (-1,)), TensorSpec("probabilities", "FP32", (-1, 10))),
    )


def linear_onnx(in_dim: int = 4, out_dim: int = 3, seed: int = 0) -> tuple[bytes, np.ndarray, np.ndarray]:
    """y = x @ W + b as an ONNX graph with a dynamic batch axis."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((in_dim, out_dim)).astype(np.float32)
    b = rng.standard_normal(out_dim).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "B"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, in_dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, out_dim])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString(), w, b


def embedding_onnx(vocab: int = 10, dim: int = 4, seed: int = 0) -> bytes:
    """A transformer's first steps in miniature: ``ids`` and ``mask`` (INT64 [batch, seq]) -> the
    masked mean of the ids' embedding rows, ``y`` FP32 [batch, dim]. An id outside [0, vocab) makes
    onnxruntime's Gather fail (INVALID_ARGUMENT); ids and mask of different lengths make its Mul fail (FAIL)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    table = numpy_helper.from_array(rng.standard_normal((vocab, dim)).astype(np.float32), "E")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["E", "ids"], ["e"]),
         helper.make_node("Cast", ["mask"], ["mf"], to=TensorProto.FLOAT),
         helper.make_node("Unsqueeze", ["mf", "axis2"], ["mu"]),
         helper.make_node("Mul", ["e", "mu"], ["masked"]),
         helper.make_node("ReduceMean", ["masked", "axis1"], ["y"], keepdims=0)],
        "embedding",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", dim])],
        [table, numpy_helper.from_array(np.array([2], np.int64), "axis2"),
         numpy_helper.from_array(np.array([1], np.int64), "axis1")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def write_embedding(root: Path, name: str = "emb", version: str = "1", vocab: int = 10,
                    checks: bool = True, targets: tuple[str, ...] = ("cpu",)) -> ModelVersion:
    """``embedding_onnx`` in the store at ``root``; with ``checks``, its specs as the compiler records them
    (dim names, the ids' value range), else bare shapes (what an older manifest holds)."""
    import onnx

    from tierserve_compiler.data import specs_from_onnx

    data = embedding_onnx(vocab)
    inputs, outputs = specs_from_onnx(onnx.load_from_string(data))
    if not checks:
        inputs = [TensorSpec(s.name, s.datatype, s.shape) for s in inputs]
    return write_model(root, name, version, data, tuple(inputs), tuple(outputs), targets=targets)


def write_dual_tier_linear(root: Path, name: str = "lin", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 4 -> 3 linear model on both tiers (the CPU copy and a Triton repository for the local Triton),
    routed to the GPU from 8 rows; returns its (w, b)."""
    from tierserve_compiler.triton import write_triton_repo

    x, y = (TensorSpec("x", "FP32", (-1, 4)),), (TensorSpec("y", "FP32", (-1, 3)),)
    data, w, b = linear_onnx(seed=seed)
    write_model(root, name, "1", data, x, y, targets=("gpu", "cpu"), max_batch_size=16,
                routing={"gpu_min_rows": 8, "gpu_min_bytes": 1 << 30})
    write_triton_repo(root, name, "1", root / name / "1" / "model.onnx", list(x), list(y), 16,
                      tensorrt_fp16=False, warmup=False)
    return w, b


def label_encoder_onnx() -> bytes:
    """s BYTES [-1] -> y INT64 [-1]: a string lookup (ai.onnx.ml LabelEncoder: a 1, b 2, é 3, else -1)."""
    from onnx import TensorProto, helper

    node = helper.make_node("LabelEncoder", ["s"], ["y"], domain="ai.onnx.ml", keys_strings=["a", "b", "é"],
                            values_int64s=[1, 2, 3], default_int64=-1)
    graph = helper.make_graph([node], "text", [helper.make_tensor_value_info("s", TensorProto.STRING, ["batch"])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, ["batch"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 2)])
    model.ir_version = 8
    return bytes(model.SerializeToString())
