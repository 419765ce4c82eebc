"""Static int8 (calibrated activations): the recipe the ``int8_static`` variant uses, and the knobs
``tooling/tierserve_tools/bench/static_int8.py`` compares.

What was measured on all-MiniLM-L6-v2 (2-core AVX2 VM without VNNI, onnxruntime 1.32, 1 thread;
``python tooling/tierserve_tools/bench/static_int8.py`` prints every configuration):

* quantizing every op (the old recipe: QDQ, int8 activations, MinMax) gives cosine 0.41 against fp32
  and is 2-3x slower than fp32: Q/DQ pairs around Add, Softmax, LayerNorm and GELU cannot be fused;
* on x86 only **uint8 activations** let onnxruntime fuse every quantized MatMul (int8 activations
  leave half of them as DequantizeLinear(weights) + float MatMul, recomputed on every run);
* the main loss is **requantizing MatMul outputs**: keeping them float (``OpTypesToExcludeOutputQuantization``,
  fused into ``MatMulIntegerToFloat``) takes cosine from 0.94 to 0.988;
* MatMuls of two activations (attention scores) are left float (``MatMulConstBOnly``); the embedding
  ``Gather`` is quantized (90 -> 32 MB);
* Percentile and Entropy calibration, symmetric activations, per-tensor weights and QOperator do not
  help (see the benchmark's table); per-channel weights do (0.96 -> 0.988);
* the rest of the loss sits in a few MatMuls whose input has outlier channels (MiniLM: the FFN
  up-projections after the post-attention LayerNorm). They are found by measuring, not by name:
  :func:`sensitivity` ranks every weight MatMul by the relative error that quantizing its input (with
  the calibrated range) and its weights causes on its own output, and :func:`quantize_static_recipe`
  keeps the worst ones float, one step at a time, until the quantized model's outputs agree with
  fp32 on the calibration data (``target_cosine``).
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tierserve_compiler.errors import VariantError, require

if TYPE_CHECKING:
    from tierserve_compiler.data import Dataset


@dataclass(frozen=True)
class StaticRecipe:
    """One static int8 configuration. :data:`DEFAULT` is what the ``int8_static`` variant builds."""

    name: str = "default"
    quant_format: str = "QDQ"  # QDQ | QOperator
    activations: str = "uint8"  # uint8 | int8
    weights: str = "int8"  # int8 | uint8 (uint8 is symmetric around 128, as Optimum's avx2 preset)
    activation_symmetric: bool = False
    per_channel: bool = True
    calibration: str = "minmax"  # minmax | entropy | percentile
    op_types: tuple[str, ...] | None = ("MatMul", "Gemm", "Conv", "Gather")  # None = every op the tool knows
    float_matmul_outputs: bool = True  # MatMulIntegerToFloat instead of requantized outputs
    weight_matmuls_only: bool = True  # leave MatMuls of two activations (attention scores) float
    #: keep the most sensitive weight MatMuls float until the outputs agree with fp32 this well on the
    #: calibration data (mean cosine of each float output, per token for token outputs); None = quantize
    #: them all. The variant sets it from its accuracy budget (``Budget.min_cosine``).
    target_cosine: float | None = 0.99
    #: at most this fraction of the weight MatMuls is kept float, in steps of ``exclusion_step``
    max_excluded: float = 0.34
    exclusion_step: float = 1 / 6
    #: keep the last fraction of weight MatMuls (graph order: the last layers, the pooler) float
    exclude_last: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


DEFAULT = StaticRecipe()


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


def _session(path: Path) -> Any:
    ort = require("onnxruntime", "compiler")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _weight_matmuls(model: Any) -> tuple[list[Any], list[str]]:
    """(MatMuls with a constant 2-D B, names of MatMuls whose B is an activation)."""
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    weights = [n for n in matmuls if len(shapes.get(n.input[1], ())) == 2]
    return weights, [n.name for n in matmuls if n.input[1] not in shapes]


def _fake_quant(x: np.ndarray, lo: float, hi: float, symmetric: bool) -> np.ndarray:
    if symmetric:
        lo, hi = -max(abs(lo), abs(hi)), max(abs(lo), abs(hi))
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-12) / 255.0
    zero = np.round(-lo / scale)
    return np.asarray((np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale)


def _fake_quant_weights(w: np.ndarray, per_channel: bool) -> np.ndarray:
    scale = np.maximum(np.abs(w).max(axis=0 if per_channel else None, keepdims=per_channel), 1e-12) / 127.0
    return np.asarray(np.clip(np.round(w / scale), -127, 127) * scale)


def sensitivity(model_path: Path, data: Dataset, recipe: StaticRecipe) -> list[tuple[str, float]]:
    """Weight MatMuls, most sensitive first, with the relative error ``||XW - q(X)q(W)|| / ||XW||`` that
    quantizing each one alone causes (X: its fp32 input on ``data``, ranges calibrated on the same data)."""
    onnx = require("onnx", "compiler")
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    weights, _ = _weight_matmuls(model)
    if not weights:
        return []
    values = {i.name: i for i in model.graph.initializer}
    taps = list(dict.fromkeys(n.input[0] for n in weights))
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in taps if t not in known)
    with tempfile.TemporaryDirectory() as td:
        tapped = Path(td) / "tapped.onnx"
        onnx.save(model, str(tapped))
        inputs = dict(zip(taps, _session(tapped).run(taps, data.inputs), strict=True))
    scores = []
    for n in weights:
        x = inputs[n.input[0]].astype(np.float64)
        x = x.reshape(-1, x.shape[-1])
        w = numpy_helper.to_array(values[n.input[1]]).astype(np.float64)
        y = x @ w
        yq = _fake_quant(x, float(x.min()), float(x.max()), recipe.activation_symmetric) @ _fake_quant_weights(
            w, recipe.per_channel
        )
        scores.append((n.name, float(np.linalg.norm(y - yq) / max(float(np.linalg.norm(y)), 1e-12))))
    return sorted(scores, key=lambda s: -s[1])


def output_agreement(reference: Path, candidate: Path, data: Dataset) -> float:
    """The worst, over float outputs, of the mean per-row cosine between two models' outputs on ``data``
    (per non-padding token for ``[batch, seq, ...]`` outputs of models with an attention mask)."""
    ref, got = _session(reference), _session(candidate)
    names = [o.name for o in ref.get_outputs() if o.type in ("tensor(float)", "tensor(double)")]
    if not names:
        return 1.0
    from tierserve_compiler.gate import mask_for

    worst = 1.0
    for a, b in zip(ref.run(names, data.inputs), got.run(names, data.inputs), strict=True):
        mask = mask_for(a, data.inputs)  # per token, padding excluded, for [batch, seq, ...] outputs
        if mask is not None:
            a, b = a[mask], b[mask]
        a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
        cos = np.sum(a * b, axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        worst = min(worst, float(np.mean(cos)))
    return worst


def _quantize(pre: Path, dst: Path, data: Dataset, recipe: StaticRecipe, exclude: list[str]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    extra: dict[str, Any] = {"ActivationSymmetric": recipe.activation_symmetric, "WeightSymmetric": True}
    if recipe.float_matmul_outputs:
        extra["OpTypesToExcludeOutputQuantization"] = ["MatMul"]
    if recipe.weight_matmuls_only:
        extra["MatMulConstBOnly"] = True
    extra.update(recipe.extra)
    reader = type("NpzReader", (_Reader, CalibrationDataReader), {})(data)
    ort_quantize_static(
        str(pre),
        str(dst),
        reader,
        quant_format=QuantFormat.QDQ if recipe.quant_format == "QDQ" else QuantFormat.QOperator,
        op_types_to_quantize=list(recipe.op_types) if recipe.op_types is not None else None,
        nodes_to_exclude=exclude,
        per_channel=recipe.per_channel,
        activation_type=types[recipe.activations],
        weight_type=types[recipe.weights],
        calibrate_method=methods[recipe.calibration],
        extra_options=extra,
    )


def quantize_static_recipe(src: Path, dst: Path, data: Dataset, recipe: StaticRecipe = DEFAULT) -> dict[str, Any]:
    """``quant_pre_process`` + ``quantize_static`` with ``recipe``; keeps the most sensitive weight MatMuls
    float until the outputs agree with ``src`` (see the module docstring). Returns what it did."""
    require("onnxruntime", "compiler")
    onnx = require("onnx", "compiler")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from tierserve_compiler.variants import quiet_logs

    src, dst = Path(src).resolve(), Path(dst).resolve()
    # quant_pre_process and the calibrator write scratch files (sym_shape_infer_temp.onnx,
    # <uuid>.data) into the working directory: keep them inside the temp dir.
    with tempfile.TemporaryDirectory() as td, quiet_logs(), contextlib.chdir(td):
        pre = Path(td) / "pre.onnx"
        try:
            quant_pre_process(str(src), str(pre))
        except Exception:
            # symbolic shape inference does not know every op (e.g. ai.onnx.ml); ONNX inference is enough
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        weights, activation_matmuls = _weight_matmuls(onnx.load(str(pre), load_external_data=False))
        ranked = [name for name, _ in sensitivity(pre, data, recipe)] if recipe.target_cosine is not None else []
        step = max(1, math.ceil(len(ranked) * recipe.exclusion_step))
        limit = math.floor(len(ranked) * recipe.max_excluded)
        counts = [0, *range(step, limit + 1, step)] if ranked else [0]
        last = [n.name for n in weights][len(weights) - math.ceil(len(weights) * recipe.exclude_last) :]
        base = [*(activation_matmuls if recipe.weight_matmuls_only else []), *(last if recipe.exclude_last else [])]
        agreement = None
        for k in counts:
            try:
                _quantize(pre, dst, data, recipe, [*base, *ranked[:k]])
            except Exception as exc:
                hint = "try --calibration-method minmax or --quantize dynamic"
                raise VariantError(f"int8_static: quantize_static failed ({exc}); {hint}") from exc
            agreement = output_agreement(src, dst, data)
            if recipe.target_cosine is None or agreement >= recipe.target_cosine:
                break
    return {
        "recipe": recipe.name,
        "format": recipe.quant_format,
        "activations": f"{recipe.activations}{' symmetric' if recipe.activation_symmetric else ''}",
        "weights": f"{recipe.weights} symmetric",
        "calibration_method": recipe.calibration,
        "calibration_rows": data.rows,
        "per_channel": recipe.per_channel,
        "op_types": list(recipe.op_types) if recipe.op_types is not None else "all",
        "float_matmul_outputs": recipe.float_matmul_outputs,
        "weight_matmuls": len(weights),
        "kept_float": [*(last if recipe.exclude_last else []), *ranked[:k]],
        "calibration_agreement_cosine": agreement,
    }


def recipe_for(per_channel: bool | None, calibration: str | None, target_cosine: float) -> StaticRecipe:
    """:data:`DEFAULT` with the user's ``--per-tensor`` / ``--calibration-method`` and the budget applied."""
    return replace(
        DEFAULT,
        per_channel=per_channel is not False,
        calibration=calibration or DEFAULT.calibration,
        target_cosine=target_cosine,
    )
