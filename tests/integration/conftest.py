"""Triton fixtures shared by the integration tests.

``triton_tiny_model``: a production-style Triton repository (``platform: "onnxruntime_onnx"``,
GPU instance group, dynamic batching, TensorRT optimization, warmup: exactly what the compiler
writes) holding one tiny ONNX model, ``y = x @ W + b`` (FP32 [-1, 4] -> [-1, 3]).
``triton_server``: the real local tritonserver serving it (session-scoped, always stopped).
Both skip cleanly when the nvidia-pytriton wheel is not installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

TINY_MODEL = "tiny_linear"
TINY_MAX_BATCH = 16

PRODUCTION_CONFIG = """\
name: "tiny_linear"
platform: "onnxruntime_onnx"
max_batch_size: 16
input [
  {
    name: "x"
    data_type: TYPE_FP32
    dims: [ 4 ]
  }
]
output [
  {
    name: "y"
    data_type: TYPE_FP32
    dims: [ 3 ]
  }
]
dynamic_batching {
  preferred_batch_size: [ 4, 8, 16 ]
  max_queue_delay_microseconds: 2000
}
instance_group [
  {
    kind: KIND_GPU
    count: 1
  }
]
optimization {
  execution_accelerators {
    gpu_execution_accelerator: [
      {
        name: "tensorrt"
        parameters { key: "precision_mode" value: "FP16" }
      }
    ]
  }
}
model_warmup [
  {
    name: "warmup"
    batch_size: 1
    inputs {
      key: "x"
      value: { data_type: TYPE_FP32 dims: [ 4 ] zero_data: true }
    }
  }
]
"""


_SESSIONS: dict[Path, object] = {}  # onnxruntime sessions are thread-safe for run()


@dataclass(frozen=True)
class TinyModel:
    name: str
    production_repo: Path  # DIR/triton
    onnx_path: Path
    weight: np.ndarray
    bias: np.ndarray

    def reference(self, x: np.ndarray) -> np.ndarray:
        """onnxruntime on the same ONNX file, in this process."""
        import onnxruntime as ort

        sess = _SESSIONS.get(self.onnx_path)
        if sess is None:
            sess = _SESSIONS[self.onnx_path] = ort.InferenceSession(
                str(self.onnx_path), providers=["CPUExecutionProvider"]
            )
        return sess.run(["y"], {"x": x})[0]

    def model_version(self):
        from tierserve.manifest import ModelVersion, TensorSpec

        return ModelVersion(
            name=self.name,
            version="1",
            inputs=(TensorSpec("x", "FP32", (-1, 4)),),
            outputs=(TensorSpec("y", "FP32", (-1, 3)),),
            variants={},
            selected_variant="fp32",
            targets=("gpu",),
            max_batch_size=TINY_MAX_BATCH,
        )


def _write_tiny_onnx(path: Path, weight: np.ndarray, bias: np.ndarray) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["y"]),
        ],
        "tiny_linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
        initializer=[numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime >= 1.10
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def _require_pytriton() -> None:
    from tierserve_tools.triton import pytriton_available

    if not pytriton_available():
        pytest.skip("nvidia-pytriton wheel not installed: no local tritonserver (pip install 'tierserve[local]')")


@pytest.fixture(scope="session")
def triton_tiny_model(tmp_path_factory) -> TinyModel:
    _require_pytriton()
    root = tmp_path_factory.mktemp("triton-prod")
    repo = root / "triton"
    rng = np.random.default_rng(1234)
    weight = rng.standard_normal((4, 3)).astype(np.float32)
    bias = rng.standard_normal(3).astype(np.float32)
    onnx_path = repo / TINY_MODEL / "1" / "model.onnx"
    _write_tiny_onnx(onnx_path, weight, bias)
    (repo / TINY_MODEL / "config.pbtxt").write_text(PRODUCTION_CONFIG)
    _write_row_sum(root)
    return TinyModel(TINY_MODEL, repo, onnx_path, weight, bias)


ROW_SUM_MODEL = "tiny_row_sum"


def row_sum_model_version():
    """``s = x.sum(axis=1)``: FP32 [-1, 4] -> FP32 [-1], an output with no dims past the batch axis."""
    from tierserve.manifest import ModelVersion, TensorSpec

    return ModelVersion(ROW_SUM_MODEL, "1", (TensorSpec("x", "FP32", (-1, 4)),), (TensorSpec("s", "FP32", (-1,)),),
                        {}, "fp32", targets=("gpu",), max_batch_size=TINY_MAX_BATCH)


def _write_row_sum(root: Path) -> None:
    """A second model, with its config written by the compiler itself (dims [1] plus an empty reshape)."""
    import onnx
    from onnx import TensorProto, helper

    from tierserve_compiler.triton import write_triton_repo

    mv = row_sum_model_version()
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=0)], ROW_SUM_MODEL,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, [None])],
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [1], [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    src = root / "row_sum.onnx"
    onnx.save(model, str(src))
    write_triton_repo(root, ROW_SUM_MODEL, "1", src, list(mv.inputs), list(mv.outputs), TINY_MAX_BATCH,
                      tensorrt_fp16=False, warmup=False)


@pytest.fixture(scope="session")
def triton_local_repo(triton_tiny_model, tmp_path_factory) -> Path:
    from tierserve_tools.triton import build_local_repository

    return build_local_repository(triton_tiny_model.production_repo, tmp_path_factory.mktemp("triton-local"))


@pytest.fixture(scope="session")
def triton_server(triton_local_repo, tmp_path_factory):
    """A real tritonserver on free loopback ports serving ``tiny_linear``; stopped at session end."""
    from tierserve_tools.triton import TritonServer

    server = TritonServer(triton_local_repo, log_path=tmp_path_factory.mktemp("triton-log") / "server.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()
