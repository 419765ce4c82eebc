"""Variants of a model, built from the fp32 graph through an explicit registry (:data:`VARIANTS`).

* ``fp32`` (``model.onnx``): the exported graph optimised offline by onnxruntime. The default
  level is ``basic`` (constant folding, redundant-node elimination): the result is plain ONNX that
  every execution provider (CPU, CUDA, TensorRT) accepts. ``extended`` adds onnxruntime contrib
  fusions, which load faster on CPU but are provider specific. Sessions still apply all
  optimisations at load time, so serving speed is the same either way.
* ``int8_dynamic``: ``onnxruntime.quantization.quantize_dynamic`` (int8 weights, activations
  quantised on the fly); per-channel weights unless ``per_channel=False`` (``--per-tensor``).
* ``int8_static``: ``quant_pre_process`` then ``quantize_static`` in QDQ format, calibrated on
  ``--calibration`` with MinMax, Entropy or Percentile.
* ``fp16``: float16 weights and compute with fp32 inputs/outputs (``keep_io_types``), via
  ``onnxconverter_common`` when installed, else ``onnxruntime.transformers.float16`` (ships with
  onnxruntime); numerically sensitive ops and ``ai.onnx.ml`` ops stay fp32.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tierserve_compiler.config import CompileConfig
from tierserve_compiler.data import Dataset
from tierserve_compiler.errors import VariantError, require

VariantBuilder = Callable[[Path, Path, CompileConfig, "Dataset | None"], dict[str, Any]]

QUANT_OPS = {
    "DynamicQuantizeLinear",
    "QuantizeLinear",
    "MatMulInteger",
    "ConvInteger",
    "QLinearMatMul",
    "QLinearConv",
    "DynamicQuantizeMatMul",
    "QGemm",
    "QAttention",
    "MatMulIntegerToFloat",
}
FP16_EXTRA_BLOCK = [
    "Range",
    "CumSum",
    "TopK",
    "NonMaxSuppression",
    "RandomNormalLike",
    "Resize",
    "Pow",
    "ReduceMean",
    "Softmax",
    "LayerNormalization",
    "Erf",
]


def _count_ops(path: Path) -> dict[str, int]:
    onnx = require("onnx", "compiler")
    counts: dict[str, int] = {}
    for n in onnx.load(str(path), load_external_data=False).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def _require_quantized(path: Path, what: str) -> int:
    n = sum(c for op, c in _count_ops(path).items() if op in QUANT_OPS)
    if n == 0:
        raise VariantError(
            f"{what}: nothing was quantized (the graph has no MatMul/Gemm/Conv weights that "
            "onnxruntime can quantize, e.g. scikit-learn ai.onnx.ml ops); use --quantize none"
        )
    return n


def build_fp32(src: Path, dst: Path, cfg: CompileConfig, data: Dataset | None) -> dict[str, Any]:
    ort = require("onnxruntime", "compiler")
    so = ort.SessionOptions()
    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }
    so.graph_optimization_level = levels[cfg.optimization_level]
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    try:
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise VariantError(f"onnxruntime cannot load the exported graph: {exc}; check the model's opset") from exc
    return {"method": f"onnxruntime offline optimisation, level {cfg.optimization_level}"}


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    """onnxruntime.quantization logs advice on the root logger; keep the CLI output readable."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def build_int8_dynamic(src: Path, dst: Path, cfg: CompileConfig, data: Dataset | None) -> dict[str, Any]:
    require("onnxruntime", "compiler")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        with _quiet_logs():
            quantize_dynamic(str(src), str(dst), per_channel=cfg.per_channel is not False, weight_type=QuantType.QInt8)
    except Exception as exc:
        raise VariantError(f"int8_dynamic: quantize_dynamic failed ({exc}); try --quantize static or none") from exc
    n = _require_quantized(dst, "int8_dynamic")
    return {
        "method": "quantize_dynamic, QInt8 weights",
        "per_channel": cfg.per_channel is not False,
        "quantized_nodes": n,
    }


class _Reader:
    """A ``CalibrationDataReader`` over a :class:`Dataset`, in small batches."""

    def __init__(self, data: Dataset, batch: int = 8) -> None:
        self._feeds = [{k: v[i : i + batch] for k, v in data.inputs.items()} for i in range(0, data.rows, batch)]
        self._i = 0

    def get_next(self) -> dict[str, Any] | None:
        if self._i >= len(self._feeds):
            return None
        self._i += 1
        return self._feeds[self._i - 1]

    def rewind(self) -> None:
        self._i = 0


def build_int8_static(src: Path, dst: Path, cfg: CompileConfig, data: Dataset | None) -> dict[str, Any]:
    require("onnxruntime", "compiler")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if data is None:
        raise VariantError("int8_static needs calibration data: pass --calibration or use --quantize dynamic")
    method = cfg.calibration_method or "minmax"
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    src, dst = Path(src).resolve(), Path(dst).resolve()
    # quant_pre_process and the calibrator write scratch files (sym_shape_infer_temp.onnx,
    # <uuid>.data) into the working directory: keep them inside the temp dir.
    with tempfile.TemporaryDirectory() as td, _quiet_logs(), contextlib.chdir(td):
        pre = Path(td) / "pre.onnx"
        try:
            quant_pre_process(str(src), str(pre))
        except Exception:
            # symbolic shape inference does not know every op (e.g. ai.onnx.ml); ONNX inference is enough
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        from onnxruntime.quantization import CalibrationDataReader

        reader = type("NpzReader", (_Reader, CalibrationDataReader), {})(data)
        try:
            quantize_static(
                str(pre),
                str(dst),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=cfg.per_channel is not False,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=methods[method],
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            )
        except Exception as exc:
            raise VariantError(
                f"int8_static: quantize_static failed ({exc}); try --calibration-method minmax or --quantize dynamic"
            ) from exc
    n = _require_quantized(dst, "int8_static")
    return {
        "method": "quant_pre_process + quantize_static (QDQ, int8 activations and weights)",
        "calibration_method": method,
        "calibration_rows": data.rows,
        "per_channel": cfg.per_channel is not False,
        "quantized_nodes": n,
    }


def build_fp16(src: Path, dst: Path, cfg: CompileConfig, data: Dataset | None) -> dict[str, Any]:
    onnx = require("onnx", "compiler")
    try:
        from onnxconverter_common import float16 as f16  # type: ignore[import-not-found]

        lib = "onnxconverter_common.float16"
    except ImportError:
        require("onnxruntime", "compiler")
        from onnxruntime.transformers import float16 as f16  # type: ignore[no-redef]

        lib = "onnxruntime.transformers.float16"
    model = onnx.load(str(src))
    ml_ops = sorted({n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    block = sorted(set(f16.DEFAULT_OP_BLOCK_LIST) | set(FP16_EXTRA_BLOCK) | set(ml_ops))
    if all(n.op_type in block for n in model.graph.node):
        raise VariantError(
            "fp16: every op of this graph must stay fp32 (e.g. scikit-learn ai.onnx.ml ops), so an "
            "fp16 variant would equal fp32; use --quantize none"
        )
    try:
        m16 = f16.convert_float_to_float16(model, keep_io_types=True, op_block_list=block)
    except Exception as exc:
        raise VariantError(f"fp16 conversion failed ({exc}); use --quantize none or dynamic") from exc
    onnx.save(m16, str(dst))
    return {"method": f"{lib}.convert_float_to_float16(keep_io_types=True)", "op_block_list": block}


#: Variant key -> builder. Keys are exactly the manifest's variant keys.
VARIANTS: dict[str, VariantBuilder] = {
    "fp32": build_fp32,
    "int8_dynamic": build_int8_dynamic,
    "int8_static": build_int8_static,
    "fp16": build_fp16,
}

#: Which variants each ``--quantize`` mode builds (fp32 always comes first).
MODE_VARIANTS: dict[str, tuple[str, ...]] = {
    "none": ("fp32",),
    "dynamic": ("fp32", "int8_dynamic"),
    "static": ("fp32", "int8_static"),
    "fp16": ("fp32", "fp16"),
    "auto": ("fp32", "int8_dynamic", "int8_static", "fp16"),
}


def filename(key: str) -> str:
    return "model.onnx" if key == "fp32" else f"{key}.onnx"
